"""The safety checker core: diffusers' ``StableDiffusionSafetyChecker`` made exact, batched and customisable.

One vision pass per image, then every concept row (stock, special-care and custom) in one matrix product, then the
reference's scoring rule as whole-tensor operations; the policy's detectors (:mod:`pipeline.detectors`) score the same
views in the same batches. Plain Python + torch: no Ray, no HTTP.

long: the one core every adapter holds (about 460 lines): configuration, fingerprint and the hot path share one class
so that a policy swap is atomic and every adapter scores alike.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import models
from .concepts import Concept, ConceptSet, add_policy_rows, example_centroid
from .detectors import DetectorSet
from .devices import resolve_device, resolve_dtype, weights_digest
from .errors import ImageDecodeError, InvalidInput
from .hf import quiet_libraries
from .images import (
    DEFAULT_MAX_DECODED_PIXELS,
    DEFAULT_MAX_OBJECT_BYTES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_VIEWS,
    DEFAULT_VIDEO_FPS,
    Decoded,
    DecodeLimits,
    load_images,
)
from .policy import Policy, check_policy_fallback, load_policy
from .preprocess import Preprocess, processor_class
from .text import TextTower, policy_or_fallback
from .verdict import Scores, Verdict, object_verdicts, score, verdicts
from .views import Viewed, load_views, view_rules

log = logging.getLogger(__name__)

DEFAULT_TEXT_THRESHOLD = 0.22  # uncalibrated default for text concepts (CLIP image-text cosines run ~0.15-0.35)


class SafetyChecker:
    """The Stable Diffusion safety checker, exact to diffusers in float32, batched and customisable.

    >>> checker = SafetyChecker.load("tiny")             # or "CompVis/stable-diffusion-safety-checker", or a directory
    >>> [v.nsfw for v in checker.check([png_bytes, pil_image, uint8_array])]
    [False, True, False]
    >>> checker.add_concept("gore", text="a photo of gore", threshold=0.2)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Preprocess,
        *,
        source: str = "",
        demo: bool = False,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        adjustment: float = 0.0,
        max_batch_size: int = 32,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
        max_decoded_pixels: int = DEFAULT_MAX_DECODED_PIXELS,
        max_views: int = DEFAULT_MAX_VIEWS,
        video_fps: float = DEFAULT_VIDEO_FPS,
        concept_text_model: str | None = None,
        policy_fallback: str | None = None,
        detector_runtime: str = "auto",
    ):
        if max_batch_size < 1:
            raise InvalidInput(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.source, self.demo = source, demo
        self.device, self.dtype = torch.device(device), dtype
        self.preprocess = preprocess
        self.preprocess_s = 0.0  # seconds spent preprocessing views since loading (the Serve replica reports it)
        if max_views < 1:
            raise InvalidInput(f"max_views must be >= 1, got {max_views}")
        if not 0 < video_fps <= 60:
            raise InvalidInput(f"video_fps must be in (0, 60] frames per second, got {video_fps}")
        self._limits = DecodeLimits(
            max_pixels=max_pixels,
            max_bytes=max_object_bytes,
            max_decoded_pixels=max_decoded_pixels,
            max_views=max_views,
            video_fps=video_fps,
        )
        self.policy_fallback = check_policy_fallback(policy_fallback, "policy_fallback")
        self.fallback_reason: str | None = None  # set when the policy in force is the stock fallback (loudly)
        self.max_batch_size = max_batch_size
        self.concepts = ConceptSet.from_checker(model)
        self._stock = copy.deepcopy(self.concepts)
        self._weights = weights_digest(model.vision_model, model.visual_projection)
        self.vision = model.vision_model.to(self.device, dtype).eval()
        self.projection = model.visual_projection.to(self.device, dtype).eval()
        self.adjustment = adjustment
        self.concept_text_model = concept_text_model or (models.TINY if demo else models.DEFAULT_TEXT_TOWER)
        self.text_tower = TextTower(self.concept_text_model)
        self.detectors = DetectorSet(self.device, dtype, detector_runtime)  # those the policy's rows name

    @classmethod
    def load(
        cls,
        model: str = models.TINY,
        device: str = "auto",
        dtype: str = "auto",
        *,
        adjustment: float = 0.0,
        concepts: str | Path | None = None,
        thresholds: dict[str | int, float] | None = None,
        policy: str | Path | Policy | None = "default",
        **kwargs: Any,
    ) -> SafetyChecker:
        """Load from ``tiny``, a local directory (a checker, or a Stable Diffusion pipeline folder) or a hub id."""
        quiet_libraries()
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

        dev = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, dev)
        src = models.resolve(model, "checker")
        sub: dict[str, str] = {}
        if src.path is not None and (src.path / "model_index.json").exists():  # a whole SD pipeline directory
            sub = {"model": "safety_checker", "processor": "feature_extractor"}
        net = models.from_pretrained(
            StableDiffusionSafetyChecker,
            src,
            "safety checker",
            **({"subfolder": sub["model"]} if sub else {}),
        ).eval()
        processor = models.from_pretrained(
            processor_class(), src, "image processor", **({"subfolder": sub["processor"]} if sub else {})
        )
        checker = cls(
            net,
            Preprocess.from_processor(processor),
            source=model,
            demo=src.demo,
            device=dev,
            dtype=torch_dtype,
            adjustment=adjustment,
            **kwargs,
        )
        checker.configure(adjustment=adjustment, thresholds=thresholds, concepts=concepts, policy=policy)
        return checker

    # --- configuration ------------------------------------------------------------------------------------------------
    @property
    def adjustment(self) -> float:
        return self._adjustment

    @adjustment.setter
    def adjustment(self, value: float) -> None:
        value = float(value)
        if not -1.0 <= value <= 1.0:
            raise InvalidInput(f"adjustment must be within [-1, 1], got {value}")
        self._adjustment = value

    def set_threshold(self, concept: str | int, value: float) -> None:
        """Override one concept's threshold, by name or by index into ``concept_scores``."""
        self.concepts.set_threshold(concept, value)

    def configure(
        self,
        *,
        adjustment: float = 0.0,
        thresholds: dict[str | int, float] | None = None,
        concepts: str | Path | None = None,
        policy: str | Path | Policy | None = "default",
    ) -> None:
        """Replace the whole scoring policy at once: stock concepts, then ``concepts`` (a saved concept set),
        ``policy`` (file or keyword; None: no categories), ``thresholds`` (by concept name or index), ``adjustment``.

        Declarative (the same settings always give the same fingerprint) and atomic: on any error nothing changes.
        """
        fresh, fallback = copy.deepcopy(self._stock), None
        if concepts is not None:
            fresh.apply_file(concepts)
        if policy is not None:
            fallback = self._add_policy(fresh, load_policy(policy))
        for name, value in (thresholds or {}).items():
            fresh.set_threshold(int(name) if isinstance(name, str) and name.isdigit() else name, value)
        self.adjustment = adjustment  # validates before anything is replaced
        self.concepts, self.fallback_reason = fresh, fallback

    def adopt(self, concepts: ConceptSet, adjustment: float) -> None:
        """Score with rows another checker resolved (concept sets, policy, thresholds), as a copy.

        Workers of a distributed job use it so that only one process reads concept files, policy image folders and
        the text tower; the fingerprint then matches the resolving checker's exactly when the weights do too.
        """
        if concepts.embeds.shape[1] != self._stock.embeds.shape[1]:
            raise InvalidInput(
                f"concept rows of width {concepts.embeds.shape[1]} do not fit this checker's "
                f"{self._stock.embeds.shape[1]}-d embeddings (they belong to another model)"
            )
        self.detectors.require(concepts)
        self.adjustment = adjustment  # validates before anything is replaced
        self.concepts = copy.deepcopy(concepts)

    def set_policy(self, policy: str | Path | Policy | None) -> None:
        """Apply a policy (file, keyword or :class:`Policy`) on top of the current concepts, replacing any other."""
        fresh = copy.deepcopy(self.concepts)
        fresh.concepts = [c for c in fresh.concepts if c.kind != "policy"]
        fresh.embeds = fresh.embeds[[i for i, c in enumerate(self.concepts.concepts) if c.kind != "policy"]]
        fresh.categories, fresh.policy_digest, fresh.nsfw_action, fresh.unscorable_action = [], "", "block", "block"
        fresh.over_view_budget, fresh.max_views = "sample", None
        fresh.detector_rows, fresh.detectors, fresh.detector_sources, fresh.text_rows = [], {}, {}, []
        fallback = self._add_policy(fresh, load_policy(policy)) if policy is not None else None
        self.concepts, self.fallback_reason = fresh, fallback

    def _add_policy(self, concepts: ConceptSet, policy: Policy) -> str | None:
        """Add a policy's concept rows and categories to ``concepts`` (text via the text tower, images embedded).

        -> why the stock policy replaced it (``policy_fallback``), or None when it is the policy asked for.
        """
        policy, fallback = policy_or_fallback(policy, self.text_tower, self.policy_fallback)
        texts = [((c.name, i), spec.text) for c in policy.categories for i, spec in enumerate(c.concepts) if spec.text]
        embeds = self.embed_text([text for _, text in texts]) if texts else []
        text_rows = dict(zip([key for key, _ in texts], embeds, strict=True))
        add_policy_rows(concepts, policy, text_rows, self.embed, self.detectors.outputs)
        return fallback

    def save_concepts(self, path: str | Path) -> None:
        self.concepts.save(path)

    def load_concepts(self, path: str | Path) -> None:
        self.concepts.apply_file(path)

    @property
    def limits(self) -> DecodeLimits:
        """The decode limits in force: the checker's, with the policy's ``max_views`` when it sets a lower one."""
        policy_views = self.concepts.max_views
        if policy_views is None or policy_views >= self._limits.max_views:
            return self._limits
        return replace(self._limits, max_views=policy_views)

    @property
    def transform(self) -> dict[str, Any]:
        """What turns an object into the model's input (it travels with the weights: both are in the fingerprint)."""
        return {"preprocess": asdict(self.preprocess), "views": view_rules(self.limits, self.concepts.over_view_budget)}

    @property
    def fingerprint(self) -> str:
        """Short stable hash of weights + preprocessing and view rules + concept and detector rows + thresholds +
        adjustment + the detectors' weights: any change means a new policy."""
        transform = json.dumps(self.transform, sort_keys=True, default=str)
        detectors = f"|{self.detectors.digest(self.concepts)}" if self.concepts.detectors else ""
        rows = f"{self.concepts.digest()}|{self._adjustment!r}{detectors}"
        h = hashlib.sha256(f"{self._weights}|{transform}|{rows}".encode())
        return h.hexdigest()[:16]

    @property
    def parts(self) -> dict[str, list[str]]:
        """Which parts of a verdict come from demo weights (meaningless) and which from real, trained ones."""
        parts: dict[str, list[str]] = {"demo": [], "real": []}
        parts["demo" if self.demo else "real"].append("stock checker")
        if any(c.kind == "text" for c in self.concepts.concepts) or self.concepts.text_rows:
            parts["demo" if self.text_tower.demo else "real"].append("text concepts")
        for name, demo in self.detectors.demo(self.concepts).items():
            parts["demo" if demo else "real"].append(name)
        return parts

    def info(self) -> dict[str, Any]:
        return {
            "model": self.source,
            "fingerprint": self.fingerprint,
            "demo_weights": self.demo,
            **self.parts,
            "detectors": self.detectors.info(self.concepts),
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "adjustment": self.adjustment,
            "max_batch_size": self.max_batch_size,
            "views": self.transform["views"],
            "concepts": [{"name": c.name, "kind": c.kind, "threshold": c.threshold} for c in self.concepts.concepts],
            "policy": {
                "nsfw_action": self.concepts.nsfw_action,
                "unscorable_action": self.concepts.unscorable_action,
                "over_view_budget": self.concepts.over_view_budget,
                "categories": {name: action for name, action, _ in self.concepts.categories},
            },
            "policy_fallback": {"allowed": self.policy_fallback, "active": self.fallback_reason},
        }

    # --- custom concepts ----------------------------------------------------------------------------------------------
    def add_concept(
        self,
        name: str,
        *,
        images: Sequence[Any] | None = None,
        text: str | None = None,
        threshold: float | None = None,
    ) -> Concept:
        """Add a concept from example images (their mean embedding) or a text phrase (the CLIP text tower).

        Without ``threshold``, an image concept takes the lowest cosine of its own examples to the centroid (every
        example is a hit) and a text concept takes ``DEFAULT_TEXT_THRESHOLD`` (uncalibrated).
        """
        if (images is None) == (text is None):
            raise InvalidInput("add_concept needs exactly one of images=[...] or text='...'")
        if images is not None:
            centroid, lowest = example_centroid(self.embed(images))
            threshold = lowest if threshold is None else threshold
            concept = Concept(name, "image", float(threshold), f"{len(images)} example images")
        else:
            if not text or not text.strip():
                raise InvalidInput("text concepts need a non-empty phrase")
            centroid = self.embed_text([text])[0]
            concept = Concept(name, "text", float(DEFAULT_TEXT_THRESHOLD if threshold is None else threshold), text)
        self.concepts.add(concept, centroid)
        self.concepts.set_threshold(name, concept.threshold)  # validates the range
        return concept

    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """(T, D) float32 text embeddings from the concept text tower (loaded on first use)."""
        return self.text_tower.embed(texts, self.concepts.embeds.shape[1])

    # --- the hot path -------------------------------------------------------------------------------------------------
    def embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels (B, 3, H, W) -> image embeddings (B, D) float32, in chunks of ``max_batch_size``."""
        out = []
        with torch.inference_mode():
            for chunk in pixels.split(self.max_batch_size):
                x = chunk.to(self.device, self.dtype, non_blocking=True)
                pooled = self.vision(pixel_values=x)[1]  # (b, hidden)
                out.append(self.projection(pooled).float().cpu())  # (b, D)
        if not out:
            return torch.empty((0, self.concepts.embeds.shape[1]))
        return torch.cat(out)

    def score_embeddings(self, embeds: torch.Tensor, detector: torch.Tensor | None = None) -> Scores:
        """Embeddings (B, D) and detector probabilities (B, P) -> whole-batch :func:`~pipeline.verdict.score`."""
        with torch.inference_mode():
            return score(embeds, self.concepts, self.adjustment, detector)

    def unscorable(self, error: str) -> Verdict:
        """The verdict of an image that was read but cannot be scored: ``error`` set, ``unscorable`` true, and the
        policy's ``unscorable_action`` (``block`` unless the policy says otherwise; ``block`` without a policy)."""
        return self._labelled([Verdict.failed(error, self.concepts.unscorable_action)])[0]

    def _labelled(self, verdicts: list[Verdict]) -> list[Verdict]:
        parts = self.parts
        for verdict in verdicts:
            verdict.demo, verdict.real = list(parts["demo"]), list(parts["real"])
        return verdicts

    def views(self, items: Sequence[Any]) -> list[Viewed | ImageDecodeError]:
        """Objects (encoded bytes of any format read here, paths, PIL images, uint8 arrays) -> their views, or each
        one's decode error (see :mod:`pipeline.views`). No model work: adapters run it outside the model lock."""
        return load_views(list(items), self.limits, self.preprocess)

    def score_views(self, objects: Sequence[Viewed | ImageDecodeError]) -> list[Verdict]:
        """Objects' views -> one verdict per object, in order: every object's views share vision passes (never one
        forward per object); an object scores the maximum over its views, ``view`` names the one that decided. A
        decode error is :meth:`unscorable`, as is a sampled object under ``over_view_budget: unscorable``."""
        verdicts: list[Verdict | None] = [None] * len(objects)
        scored, where = [], []
        for i, obj in enumerate(objects):
            if isinstance(obj, ImageDecodeError):
                verdicts[i] = self.unscorable(str(obj))
            elif (refused := self.over_view_budget(obj.sampled, obj.total)) is not None:
                verdicts[i] = refused
            else:
                scored.append(obj)
                where.append(i)
        arrays = [v.array for obj in scored for v in obj.views]
        embeds, probs, failed = [], [], {}
        for start in range(0, len(arrays), self.max_batch_size):  # the float pixels of every view never exist at once
            chunk = arrays[start : start + self.max_batch_size]
            began = time.perf_counter()
            pixels, (inputs, bad) = self.preprocess(chunk), self.detectors.prepare_each(self.concepts, chunk)
            self.preprocess_s += time.perf_counter() - began
            failed.update({start + i: why for i, why in bad.items()})
            embeds.append(self.embed_pixels(pixels))
            probs.append(self.detectors.score(self.concepts, inputs))  # one forward per detector per batch
        if scored:
            labels = [[v.label for v in obj.views] for obj in scored]
            detector = torch.cat(probs) if self.concepts.detectors else None  # type: ignore[arg-type]
            per_view = self.score_embeddings(torch.cat(embeds), detector)
            results = self._withhold(object_verdicts(per_view, self.concepts, labels), labels, detector, failed)
            for i, obj, verdict in zip(where, scored, results, strict=True):
                verdict.views_total, verdict.views_sampled, verdict.truncated = obj.total, obj.sampled, obj.truncated
                verdicts[i] = verdict
        return self._labelled(verdicts)  # type: ignore[arg-type] - every slot is filled above

    def _withhold(
        self,
        verdicts: list[Verdict],
        labels: Sequence[Sequence[str | None]],
        detector: torch.Tensor | None,
        failed: dict[int, str],
    ) -> list[Verdict]:
        """Objects with a view a detector could not prepare (``failed``: view -> why) or scored non-finite ->
        :meth:`unscorable` (withheld by default), the others as they are: one bad view never fails its neighbours."""
        failed = dict(failed)
        for v in self.detectors.nonfinite(detector):
            failed.setdefault(v, "a detector returned a non-finite score")
        if not failed:
            return verdicts
        owner = [k for k, views in enumerate(labels) for _ in views]
        why = {owner[v]: reason for v, reason in sorted(failed.items(), reverse=True)}
        return [self.unscorable(why[k]) if k in why else verdict for k, verdict in enumerate(verdicts)]

    def score_pixels(
        self, pixels: torch.Tensor, labels: Sequence[Sequence[str | None]], inputs: dict[str, np.ndarray] | None = None
    ) -> list[Verdict]:
        """Preprocessed views (V, 3, H, W) and each detector's prepared inputs (V, ...), ``len(labels[k])`` rows for
        object k -> one verdict per object, for adapters that preprocess elsewhere (the scan's CPU stage: it sets
        ``views_total`` and ``views_sampled``)."""
        detector = self.detectors.score(self.concepts, inputs or {})
        scores = self.score_embeddings(self.embed_pixels(pixels), detector)
        return self._labelled(self._withhold(object_verdicts(scores, self.concepts, labels), labels, detector, {}))

    def over_view_budget(self, sampled: bool, total: int) -> Verdict | None:
        """The unscorable verdict of an object whose views were sampled when the policy withholds such objects
        (``over_view_budget: unscorable``); None when it is scored."""
        if not sampled or self.concepts.over_view_budget != "unscorable":
            return None
        failed = Verdict.failed(
            f"{total} views, over max_views={self.limits.max_views}, and the policy withholds what it cannot see "
            "whole (over_view_budget: unscorable)",
            self.concepts.unscorable_action,
            total,
        )
        return self._labelled([failed])[0]

    def check_arrays(self, arrays: Sequence[np.ndarray | Decoded | ImageDecodeError]) -> list[Verdict]:
        """Generated images (uint8 arrays: one view each, as diffusers scores them) or decode errors -> verdicts."""
        objects = [Viewed.single(a.array, a.truncated) if isinstance(a, Decoded) else a for a in arrays]
        return self.score_views(self.views(objects))

    def check(self, images: Sequence[Any]) -> list[Verdict]:
        """Objects of any kind :meth:`views` takes -> one :class:`Verdict` each, in order.

        Undecodable inputs get :meth:`unscorable`'s verdict (``error`` set, the policy's ``unscorable_action``); they
        never affect the others. Truncated files are scored on what decodes (``truncated``). Inputs are not mutated.
        """
        return self.score_views(self.views(images))

    def embed(self, images: Sequence[Any]) -> torch.Tensor:
        """Images -> (N, D) float32 embeddings; raises on the first undecodable image."""
        arrays = load_images(list(images), self.limits)
        for i, a in enumerate(arrays):
            if isinstance(a, ImageDecodeError):
                raise InvalidInput(f"image {i}: {a}")
        return self.embed_pixels(self.preprocess(arrays)) if arrays else torch.empty(0)  # type: ignore[arg-type]

    def verdicts(self, scores: Scores) -> list[Verdict]:
        """Tensors -> per-image Python objects (the only per-image loop, after all the arithmetic)."""
        return verdicts(scores, self.concepts)
