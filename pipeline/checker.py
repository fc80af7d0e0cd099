"""The safety checker core: diffusers' ``StableDiffusionSafetyChecker`` made exact, batched and customisable.

One vision pass per image, then every concept row (stock, special-care and custom) in one matrix product, then the
reference's scoring rule as whole-tensor operations. Plain Python + torch: no Ray, no HTTP.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import models
from .concepts import Concept, ConceptSet, add_policy_rows, example_centroid
from .devices import resolve_device, resolve_dtype, weights_digest
from .errors import ImageDecodeError, InvalidInput
from .hf import quiet_libraries
from .images import (
    DEFAULT_MAX_OBJECT_BYTES,
    DEFAULT_MAX_PIXELS,
    Decoded,
    DecodeLimits,
    load_decoded,
    load_images,
)
from .policy import Policy, check_policy_fallback, load_policy, strongest
from .preprocess import Preprocess, processor_class
from .text import TextTower, policy_or_fallback
from .verdict import Scores, Verdict, score

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
        concept_text_model: str | None = None,
        policy_fallback: str | None = None,
    ):
        if max_batch_size < 1:
            raise InvalidInput(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.source, self.demo = source, demo
        self.device, self.dtype = torch.device(device), dtype
        self.preprocess = preprocess
        self.limits = DecodeLimits(max_pixels=max_pixels, max_bytes=max_object_bytes)
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
        self.adjustment = adjustment  # validates before anything is replaced
        self.concepts = copy.deepcopy(concepts)

    def set_policy(self, policy: str | Path | Policy | None) -> None:
        """Apply a policy (file, keyword or :class:`Policy`) on top of the current concepts, replacing any other."""
        fresh = copy.deepcopy(self.concepts)
        fresh.concepts = [c for c in fresh.concepts if c.kind != "policy"]
        fresh.embeds = fresh.embeds[[i for i, c in enumerate(self.concepts.concepts) if c.kind != "policy"]]
        fresh.categories, fresh.policy_digest, fresh.nsfw_action, fresh.unscorable_action = [], "", "block", "block"
        fallback = self._add_policy(fresh, load_policy(policy)) if policy is not None else None
        self.concepts, self.fallback_reason = fresh, fallback

    def _add_policy(self, concepts: ConceptSet, policy: Policy) -> str | None:
        """Add a policy's concept rows and categories to ``concepts`` (text via the text tower, images embedded).

        -> why the stock policy replaced it (``policy_fallback``), or None when it is the policy asked for.
        """
        policy, fallback = policy_or_fallback(policy, self.text_tower, self.policy_fallback)
        texts = [((c.name, i), spec.text) for c in policy.categories for i, spec in enumerate(c.concepts) if spec.text]
        embeds = self.embed_text([text for _, text in texts]) if texts else []
        add_policy_rows(concepts, policy, dict(zip([key for key, _ in texts], embeds, strict=True)), self.embed)
        return fallback

    def save_concepts(self, path: str | Path) -> None:
        self.concepts.save(path)

    def load_concepts(self, path: str | Path) -> None:
        self.concepts.apply_file(path)

    @property
    def fingerprint(self) -> str:
        """Short stable hash of weights + concept rows + thresholds + adjustment: any change means a new policy."""
        h = hashlib.sha256(f"{self._weights}|{self.concepts.digest()}|{self._adjustment!r}".encode())
        return h.hexdigest()[:16]

    def info(self) -> dict[str, Any]:
        return {
            "model": self.source,
            "fingerprint": self.fingerprint,
            "demo_weights": self.demo,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "adjustment": self.adjustment,
            "max_batch_size": self.max_batch_size,
            "concepts": [{"name": c.name, "kind": c.kind, "threshold": c.threshold} for c in self.concepts.concepts],
            "policy": {
                "nsfw_action": self.concepts.nsfw_action,
                "unscorable_action": self.concepts.unscorable_action,
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

    def score_embeddings(self, embeds: torch.Tensor) -> Scores:
        with torch.inference_mode():
            return score(embeds, self.concepts, self.adjustment)

    def check_pixels(self, pixels: torch.Tensor) -> list[Verdict]:
        """Preprocessed pixels (B, 3, H, W) -> verdicts (for adapters that preprocess elsewhere)."""
        return self.verdicts(self.score_embeddings(self.embed_pixels(pixels)))

    def unscorable(self, error: str) -> Verdict:
        """The verdict of an image that was read but cannot be scored: ``error`` set, ``unscorable`` true, and the
        policy's ``unscorable_action`` (``block`` unless the policy says otherwise; ``block`` without a policy)."""
        return Verdict.failed(error, self.concepts.unscorable_action)

    def check_arrays(self, arrays: Sequence[np.ndarray | Decoded | ImageDecodeError]) -> list[Verdict]:
        """Decoded images (arrays or :class:`Decoded`) or decode errors -> verdicts, in order.

        A decode error becomes :meth:`unscorable`'s verdict, so every verdict has an action.
        """
        items = [Decoded(a) if isinstance(a, np.ndarray) else a for a in arrays]
        good = [i for i, a in enumerate(items) if isinstance(a, Decoded)]
        results: list[Verdict] = [self.unscorable(str(a)) if not isinstance(a, Decoded) else Verdict() for a in items]
        for start in range(0, len(good), self.max_batch_size):
            idx = good[start : start + self.max_batch_size]
            pixels = self.preprocess([items[i].array for i in idx])  # type: ignore[union-attr]
            for i, verdict in zip(idx, self.check_pixels(pixels), strict=True):
                verdict.truncated = items[i].truncated  # type: ignore[union-attr]
                results[i] = verdict
        return results

    def check(self, images: Sequence[Any]) -> list[Verdict]:
        """PIL images, uint8 HWC arrays, encoded bytes or paths -> one :class:`Verdict` each, in order.

        Undecodable inputs get :meth:`unscorable`'s verdict (``error`` set, the policy's ``unscorable_action``); they
        never affect the others. Truncated files are scored on what decodes (``truncated``). Inputs are not mutated.
        """
        return self.check_arrays(load_decoded(list(images), self.limits))

    def embed(self, images: Sequence[Any]) -> torch.Tensor:
        """Images -> (N, D) float32 embeddings; raises on the first undecodable image."""
        arrays = load_images(list(images), self.limits)
        for i, a in enumerate(arrays):
            if isinstance(a, ImageDecodeError):
                raise InvalidInput(f"image {i}: {a}")
        return self.embed_pixels(self.preprocess(arrays)) if arrays else torch.empty(0)  # type: ignore[arg-type]

    def verdicts(self, scores: Scores) -> list[Verdict]:
        """Tensors -> per-image Python objects (the only per-image loop, after all the arithmetic)."""
        names = self.concepts.names
        cats = [(name, action) for name, action, _ in self.concepts.categories]
        concept = np.round(scores.concept.double().numpy(), 3)
        special = np.round(scores.special.double().numpy(), 3)
        category = np.round(scores.categories.double().numpy(), 3)
        hits, flagged = concept > 0, category > 0
        special_hit = (special > 0).any(axis=1)
        policy = bool(cats) or self.concepts.policy_digest != ""
        out = []
        for i in range(concept.shape[0]):
            bad = np.flatnonzero(hits[i]).tolist()
            flags = [cats[k][0] for k in np.flatnonzero(flagged[i])]
            actions = [cats[k][1] for k in np.flatnonzero(flagged[i])] + ([self.concepts.nsfw_action] if bad else [])
            out.append(
                Verdict(
                    nsfw=bool(bad),
                    concept_scores=concept[i].tolist(),
                    special_scores=special[i].tolist(),
                    bad_concepts=bad,
                    bad_concept_names=[names[j] for j in bad],
                    special_care=bool(special_hit[i]),
                    categories={name: float(category[i, k]) for k, (name, _) in enumerate(cats)},
                    flagged_categories=flags,
                    action=strongest(actions) if policy else None,
                )
            )
        return out
