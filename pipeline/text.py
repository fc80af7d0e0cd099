"""The CLIP text tower that embeds text concepts (custom and policy), and what happens when it cannot load.

Loaded on first use. A policy whose text concepts cannot be embedded is an error that says how to fix it, unless a
fallback to the stock policy was asked for (``policy_fallback: stock``): never a silent weaker policy.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch

from . import models
from .errors import InvalidInput, ModelSourceError
from .policy import Policy, load_policy, strongest

log = logging.getLogger("pipeline.checker")


class TextTower:
    """``CLIPTextModelWithProjection`` + its tokenizer from a model source, loaded on first use.

    >>> tower = TextTower("tiny")
    >>> tower.embed(["a photo of gore"], width=32).shape
    torch.Size([1, 32])
    """

    def __init__(self, source: str):
        self.source = source
        self._loaded: tuple[Any, Any] | None = None

    @property
    def demo(self) -> bool:
        """Tiny demo weights: text concept scores are meaningless."""
        try:
            return models.resolve(self.source, "text").demo if self.source != models.TINY else True
        except ModelSourceError:
            return False

    def load(self) -> tuple[Any, Any]:
        """(tower, tokenizer); raises :class:`ModelSourceError` when the source cannot be loaded."""
        if self._loaded is None:
            from transformers import CLIPTextModelWithProjection, CLIPTokenizer

            src = models.resolve(self.source, "text")
            tower = models.from_pretrained(CLIPTextModelWithProjection, src, "concept text tower").eval()
            tokenizer = models.from_pretrained(CLIPTokenizer, src, "concept text tokenizer")
            self._loaded = (tower, tokenizer)
        return self._loaded

    def embed(self, texts: list[str], width: int) -> torch.Tensor:
        """(T, D) float32 text embeddings; ``width`` is the checker's embedding width D, which the tower must match."""
        tower, tokenizer = self.load()
        if tower.config.projection_dim != width:
            raise InvalidInput(
                f"concept text tower {self.source!r} projects to {tower.config.projection_dim}-d, but the "
                f"checker's embeddings are {width}-d: use the matching CLIP text tower"
            )
        tokens = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            return tower(**tokens).text_embeds.float()


def policy_or_fallback(policy: Policy, tower: TextTower, allowed: str | None) -> tuple[Policy, str | None]:
    """The policy itself when ``tower`` loads (or it has no text concepts); else the stock policy if a fallback was
    allowed (``allowed``, or the policy's own ``policy_fallback``), with why; else an error that says how to fix it."""
    if not any(spec.text for c in policy.categories for spec in c.concepts):
        return policy, None
    try:
        tower.load()
        return policy, None
    except ModelSourceError as exc:
        reason = exc.message.split(". ")[0]
        fallback = allowed or policy.policy_fallback
        if fallback is None:
            raise ModelSourceError(
                f"policy {policy.name!r} has text concepts, which need the CLIP text tower "
                f"{tower.source!r}, and it cannot be loaded ({reason}). Fix it one of three ways: "
                f"download it (`diffguard models download {models.DEFAULT_TEXT_TOWER} DIR`, then pass "
                "--concept-text-model DIR), score with the stock concepts only (`--policy stock`), or accept that "
                "fallback explicitly (`policy_fallback: stock` in the policy file or the checker config)"
            ) from None
    unchecked = [c.name for c in policy.categories if any(spec.text for spec in c.concepts)]
    log.warning(
        "WARNING: policy %r cannot be used: its text concepts need the CLIP text tower %r (%s). policy_fallback "
        "is %r, so scoring with the stock policy and the policy's detector rows: only the stock (sexual) concepts "
        "and the detectors are checked; the text concepts of %s are NOT checked.",
        policy.name,
        tower.source,
        reason,
        fallback,
        ", ".join(unchecked),
    )
    return stock_with_detectors(policy), (
        f"policy {policy.name!r} replaced by the stock policy: text tower unavailable ({reason})"
    )


def stock_with_detectors(policy: Policy) -> Policy:
    """The stock policy, with ``policy``'s ``unscorable_action`` and its detector rows (they need no text tower) in
    their categories: what ``policy_fallback: stock`` scores with. A category that exists in both takes the stronger
    of the two actions (the policy's detector rows never act more weakly than the policy says)."""
    stock = load_policy("stock")
    categories = {c.name: c for c in stock.categories}
    for category in policy.categories:
        rows = tuple(spec for spec in category.concepts if spec.detector is not None)
        if rows:
            base = categories.get(category.name)
            categories[category.name] = (
                replace(base, action=strongest([base.action, category.action]), concepts=base.concepts + rows)
                if base
                else replace(category, concepts=rows)
            )
    extra = any(spec.detector for c in policy.categories for spec in c.concepts)
    return replace(
        stock,
        name="stock" + ("+detectors" if extra else ""),
        categories=tuple(categories.values()),
        unscorable_action=policy.unscorable_action,
        base_dir=policy.base_dir,
    )
