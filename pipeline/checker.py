"""The safety checker core: diffusers' ``StableDiffusionSafetyChecker`` made exact, batched and customisable.

One vision pass per image, then every concept row (stock, special-care and custom) in one matrix product, then the
reference's scoring rule as whole-tensor operations; the policy's detectors (:mod:`pipeline.detectors`) score the same
views in the same batches. Plain Python + torch: no Ray, no HTTP.

long: the one core every adapter holds (about 560 lines): configuration, fingerprint and the hot path share one class
so that a policy swap is atomic and every adapter scores alike; what is particular to many policies in one pass (named
policies, the detectors' union, the shared matmul) lives in :mod:`pipeline.policyset`.
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
from .policyset import Built, DetectorUnion, PolicySet, check_names, score_sets
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
        self.policies = PolicySet()  # named policies beside the own one (configure's `policies`; keywords on use)

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
        policies: dict[str, str | Path | Policy] | None = None,
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
        checker.configure(
            adjustment=adjustment, thresholds=thresholds, concepts=concepts, policy=policy, policies=policies
        )
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
        policies: dict[str, str | Path | Policy] | None = None,
    ) -> None:
        """Replace the whole scoring policy at once: stock concepts, then ``concepts`` (a saved concept set),
        ``policy`` (file or keyword; None: no categories), ``thresholds`` (by concept name or index), ``adjustment``.
        ``policies``: named policies held beside it (name -> file, keyword or :class:`Policy`), each built the same
        way; a keyword of :func:`~pipeline.policy.load_policy` not named here is built on first use.

        Declarative (the same settings always give the same fingerprint) and atomic: on any error nothing changes.
        """

        def build(spec: str | Path | Policy | None) -> Built:
            fresh, fallback = copy.deepcopy(self._stock), None
            if concepts is not None:
                fresh.apply_file(concepts)
            if spec is not None:
                fallback = self._add_policy(fresh, load_policy(spec))
            for name, value in (thresholds or {}).items():
                fresh.set_threshold(int(name) if isinstance(name, str) and name.isdigit() else name, value)
            return fresh, fallback

        if bad := [name for name in (policies or {}) if not isinstance(name, str) or not name.strip()]:
            raise InvalidInput(f"policies: a policy name must be a non-empty string, got {bad[0]!r}")
        own = build(policy)
        named = {name: build(spec) for name, spec in (policies or {}).items()}
        self.adjustment = adjustment  # validates before anything is replaced
        (self.concepts, self.fallback_reason), self.policies = own, PolicySet(named, build)

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

    def concepts_for(self, policy: str | None) -> ConceptSet:
        """The rows of policy ``policy`` (None: the checker's own, :attr:`concepts`); InvalidInput when unknown."""
        return self.concepts if policy is None else self.policies.get(policy)

    def limits_for(self, policy: str | None) -> DecodeLimits:
        """The decode limits of ``policy``: the checker's, with the policy's ``max_views`` when it sets a lower one."""
        policy_views = self.concepts_for(policy).max_views
        if policy_views is None or policy_views >= self._limits.max_views:
            return self._limits
        return replace(self._limits, max_views=policy_views)

    @property
    def limits(self) -> DecodeLimits:
        """The decode limits in force under the checker's own policy (:meth:`limits_for`)."""
        return self.limits_for(None)

    def transform_for(self, policy: str | None) -> dict[str, Any]:
        """What turns an object into the model's input (it travels with the weights: both are in the fingerprint)."""
        views = view_rules(self.limits_for(policy), self.concepts_for(policy).over_view_budget)
        return {"preprocess": asdict(self.preprocess), "views": views}

    @property
    def transform(self) -> dict[str, Any]:
        return self.transform_for(None)

    def fingerprint_for(self, policy: str | None) -> str:
        """Short stable hash of weights + preprocessing and view rules + concept and detector rows + thresholds +
        adjustment + the detectors' weights, under ``policy`` (None: the own): any change means a new policy."""
        concepts = self.concepts_for(policy)
        transform = json.dumps(self.transform_for(policy), sort_keys=True, default=str)
        detectors = f"|{self.detectors.digest(concepts)}" if concepts.detectors else ""
        rows = f"{concepts.digest()}|{self._adjustment!r}{detectors}"
        h = hashlib.sha256(f"{self._weights}|{transform}|{rows}".encode())
        return h.hexdigest()[:16]

    @property
    def fingerprint(self) -> str:
        return self.fingerprint_for(None)

    def parts_for(self, policy: str | None) -> dict[str, list[str]]:
        """Which parts of a verdict under ``policy`` come from demo weights (meaningless) and which from real ones."""
        return self._parts(self.concepts_for(policy))

    def _parts(self, concepts: ConceptSet) -> dict[str, list[str]]:
        parts: dict[str, list[str]] = {"demo": [], "real": []}
        parts["demo" if self.demo else "real"].append("stock checker")
        if any(c.kind == "text" for c in concepts.concepts) or concepts.text_rows:
            parts["demo" if self.text_tower.demo else "real"].append("text concepts")
        for name, demo in self.detectors.demo(concepts).items():
            parts["demo" if demo else "real"].append(name)
        return parts

    @property
    def parts(self) -> dict[str, list[str]]:
        return self.parts_for(None)

    def info(self, policy: str | None = None) -> dict[str, Any]:
        """What scores under ``policy`` (None: the checker's own): model, fingerprint, rows, actions, view rules."""
        concepts = self.concepts_for(policy)
        fallback = self.fallback_reason if policy is None else self.policies.resolved(policy)[1]
        return {
            "model": self.source,
            "fingerprint": self.fingerprint_for(policy),
            "demo_weights": self.demo,
            **self.parts_for(policy),
            "detectors": self.detectors.info(concepts),
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "adjustment": self.adjustment,
            "max_batch_size": self.max_batch_size,
            "views": self.transform_for(policy)["views"],
            "concepts": [{"name": c.name, "kind": c.kind, "threshold": c.threshold} for c in concepts.concepts],
            "policy": {
                "nsfw_action": concepts.nsfw_action,
                "unscorable_action": concepts.unscorable_action,
                "over_view_budget": concepts.over_view_budget,
                "categories": {name: action for name, action, _ in concepts.categories},
            },
            "policy_fallback": {"allowed": self.policy_fallback, "active": fallback},
            "policies": self.policies.names,  # the named policies held beside the own one (keywords: on first use)
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

    def unscorable(self, error: str, concepts: ConceptSet | None = None) -> Verdict:
        """The verdict of an image that was read but cannot be scored: ``error`` set, ``unscorable`` true, and the
        policy's ``unscorable_action`` (``block`` unless the policy says otherwise; ``block`` without a policy)."""
        concepts = self.concepts if concepts is None else concepts
        return self._labelled([Verdict.failed(error, concepts.unscorable_action)], concepts)[0]

    def _labelled(self, verdicts: list[Verdict], concepts: ConceptSet | None = None) -> list[Verdict]:
        parts = self._parts(self.concepts if concepts is None else concepts)
        for verdict in verdicts:
            verdict.demo, verdict.real = list(parts["demo"]), list(parts["real"])
        return verdicts

    def views(
        self, items: Sequence[Any], policies: Sequence[str | None] | None = None
    ) -> list[Viewed | ImageDecodeError]:
        """Objects (encoded bytes of any format read here, paths, PIL images, uint8 arrays) -> their views, or each
        one's decode error (see :mod:`pipeline.views`), each under its policy's limits (``policies``: a name per
        object, None: the own policy). No model work: adapters run it outside the model lock."""
        items = list(items)
        names = check_names(policies, len(items))
        limits = {name: self.limits_for(name) for name in dict.fromkeys(names)}  # InvalidInput for an unknown name
        out: list[Viewed | ImageDecodeError] = [None] * len(items)  # type: ignore[list-item] - all filled below
        for budget in dict.fromkeys(limits.values()):  # one decode call per distinct budget
            at = [i for i, name in enumerate(names) if limits[name] == budget]
            for i, viewed in zip(at, load_views([items[i] for i in at], budget, self.preprocess), strict=True):
                out[i] = viewed
        return out

    def score_views(
        self, objects: Sequence[Viewed | ImageDecodeError], policies: Sequence[str | None] | None = None
    ) -> list[Verdict]:
        """Objects' views -> one verdict per object, in order: every object's views share vision passes (never one
        forward per object); an object scores the maximum over its views, ``view`` names the one that decided. A
        decode error is :meth:`unscorable`, as is a sampled object under ``over_view_budget: unscorable``.

        ``policies`` (a name per object; None: the own policy): each object is read with its policy, yet the batch
        takes one vision pass per chunk, one matmul over every involved policy's rows and one forward per detector
        (:mod:`pipeline.policyset`)."""
        names = check_names(policies, len(objects))
        named = {name: k for k, name in enumerate(dict.fromkeys(names))}  # each involved policy, in first-use order
        sets = [self.concepts_for(name) for name in named]  # InvalidInput for an unknown name, before any work
        which = [named[name] for name in names]  # (n,) each object's index in sets
        verdicts: list[Verdict | None] = [None] * len(objects)
        scored, where = [], []
        for i, obj in enumerate(objects):
            if isinstance(obj, ImageDecodeError):
                verdicts[i] = self.unscorable(str(obj), sets[which[i]])
            elif (refused := self.over_view_budget(obj.sampled, obj.total, names[i])) is not None:
                verdicts[i] = refused
            else:
                scored.append(obj)
                where.append(i)
        arrays = [v.array for obj in scored for v in obj.views]
        owner_of = [which[i] for i in where]  # each scored object's policy
        counts = torch.tensor([len(obj.views) for obj in scored], dtype=torch.long)
        owner = torch.repeat_interleave(torch.tensor(owner_of, dtype=torch.long), counts)  # (V,) each view's policy
        union = DetectorUnion(self.detectors, sets)
        embeds, probs, failed = [], [], {}
        for start in range(0, len(arrays), self.max_batch_size):  # the float pixels of every view never exist at once
            chunk = arrays[start : start + self.max_batch_size]
            began = time.perf_counter()
            pixels, (inputs, bad) = self.preprocess(chunk), union.prepare(chunk, owner[start : start + len(chunk)])
            self.preprocess_s += time.perf_counter() - began
            failed.update({start + i: why for i, why in bad.items()})
            embeds.append(self.embed_pixels(pixels))
            probs.append(union.score(inputs, len(chunk)))  # one forward per detector per batch
        if scored:
            detector = torch.cat(probs) if union.refs else None  # type: ignore[arg-type]
            with torch.inference_mode():
                per_set = score_sets(torch.cat(embeds), sets, owner, self.adjustment, detector, union)
            for i, verdict in zip(where, self._read(per_set, sets, scored, owner_of, failed), strict=True):
                verdicts[i] = verdict
        return verdicts  # type: ignore[return-value] - every slot is filled above

    def _read(
        self,
        per_set: list[tuple[torch.Tensor, Scores]],
        sets: list[ConceptSet],
        scored: list[Viewed],
        owner_of: list[int],
        failed: dict[int, str],
    ) -> list[Verdict]:
        """Each policy's views' scores -> the verdicts of ``scored`` (object k under ``sets[owner_of[k]]``)."""
        out: list[Verdict | None] = [None] * len(scored)
        for k, (rows, per_view) in enumerate(per_set):
            mine = [j for j, owner in enumerate(owner_of) if owner == k]  # this policy's objects
            if not mine:
                continue
            labels = [[v.label for v in scored[j].views] for j in mine]
            local = {int(v): r for r, v in enumerate(rows.tolist())}  # view in the batch -> row in per_view
            lost = {local[v]: why for v, why in failed.items() if v in local}
            results = self._withhold(
                object_verdicts(per_view, sets[k], labels), labels, per_view.detector, lost, sets[k]
            )
            for j, verdict in zip(mine, self._labelled(results, sets[k]), strict=True):
                obj, out[j] = scored[j], verdict
                verdict.views_total, verdict.views_sampled, verdict.truncated = obj.total, obj.sampled, obj.truncated
        return out  # type: ignore[return-value] - every object belongs to one policy

    def _withhold(
        self,
        verdicts: list[Verdict],
        labels: Sequence[Sequence[str | None]],
        detector: torch.Tensor | None,
        failed: dict[int, str],
        concepts: ConceptSet | None = None,
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
        return [self.unscorable(why[k], concepts) if k in why else verdict for k, verdict in enumerate(verdicts)]

    def score_pixels(
        self, pixels: torch.Tensor, labels: Sequence[Sequence[str | None]], inputs: dict[str, np.ndarray] | None = None
    ) -> list[Verdict]:
        """Preprocessed views (V, 3, H, W) and each detector's prepared inputs (V, ...), ``len(labels[k])`` rows for
        object k -> one verdict per object, for adapters that preprocess elsewhere (the scan's CPU stage: it sets
        ``views_total`` and ``views_sampled``)."""
        detector = self.detectors.score(self.concepts, inputs or {})
        scores = self.score_embeddings(self.embed_pixels(pixels), detector)
        return self._labelled(self._withhold(object_verdicts(scores, self.concepts, labels), labels, detector, {}))

    def over_view_budget(self, sampled: bool, total: int, policy: str | None = None) -> Verdict | None:
        """The unscorable verdict of an object whose views were sampled when the policy withholds such objects
        (``over_view_budget: unscorable``); None when it is scored."""
        concepts = self.concepts_for(policy)
        if not sampled or concepts.over_view_budget != "unscorable":
            return None
        failed = Verdict.failed(
            f"{total} views, over max_views={self.limits_for(policy).max_views}, and the policy withholds what it "
            "cannot see whole (over_view_budget: unscorable)",
            concepts.unscorable_action,
            total,
        )
        return self._labelled([failed], concepts)[0]

    def check_arrays(self, arrays: Sequence[np.ndarray | Decoded | ImageDecodeError]) -> list[Verdict]:
        """Generated images (uint8 arrays: one view each, as diffusers scores them) or decode errors -> verdicts."""
        objects = [Viewed.single(a.array, a.truncated) if isinstance(a, Decoded) else a for a in arrays]
        return self.score_views(self.views(objects))

    def check(self, images: Sequence[Any], policies: Sequence[str | None] | None = None) -> list[Verdict]:
        """Objects of any kind :meth:`views` takes -> one :class:`Verdict` each, in order (``policies``: a policy
        name per object, as :meth:`score_views` takes them).

        Undecodable inputs get :meth:`unscorable`'s verdict (``error`` set, the policy's ``unscorable_action``); they
        never affect the others. Truncated files are scored on what decodes (``truncated``). Inputs are not mutated.
        """
        return self.score_views(self.views(images, policies), policies)

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
