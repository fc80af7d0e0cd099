"""One image's result (:class:`Verdict`) and the reference's scoring rule on a whole batch (:func:`score`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .concepts import ConceptSet

SPECIAL_CARE_BUMP = 0.01  # the reference raises the adjustment to this after a special-care hit


@dataclass
class Verdict:
    """One image's result. Scores are margins (cosine − threshold + adjustment), rounded to 3 decimals; > 0 is a hit."""

    nsfw: bool = False
    concept_scores: list[float] = field(default_factory=list)
    special_scores: list[float] = field(default_factory=list)
    bad_concepts: list[int] = field(default_factory=list)  # indices into concept_scores
    bad_concept_names: list[str] = field(default_factory=list)
    special_care: bool = False
    categories: dict[str, float] = field(default_factory=dict)  # category -> its highest concept margin
    flagged_categories: list[str] = field(default_factory=list)  # categories with a margin > 0
    action: str | None = None  # what the policy does: allow | flag | blur | black | block (None: no policy)
    error: str | None = None
    truncated: bool = False  # decoded from a truncated file: scored on what decodes (what a browser shows)
    unscorable: bool = False  # read but could not be scored (undecodable, too many pixels or bytes, unsupported)

    @classmethod
    def failed(cls, error: str, action: str | None = None) -> Verdict:
        """A verdict with ``error`` set; with ``action`` it is an unscorable image's (the policy's action for it)."""
        return cls(error=error, action=action, unscorable=action is not None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Scores:
    """Whole-batch scoring output on CPU: (B, C) concept margins, (B, S) special margins, (B, K) category scores."""

    concept: torch.Tensor
    special: torch.Tensor
    categories: torch.Tensor

    @property
    def nsfw(self) -> torch.Tensor:
        return (self.concept > 0).any(dim=1)


def score(embeds: torch.Tensor, concepts: ConceptSet, adjustment: float) -> Scores:
    """The reference's rule on a whole batch, plus category scores.

    ``embeds`` (B, D) float32 image embeddings. Every concept row is compared in one matmul. Special-care rows are
    scored in order and, from the first hit on, the adjustment is raised by 0.01 for the image's remaining special
    rows and its stock/custom rows, exactly as ``StableDiffusionSafetyChecker.forward`` does; every margin is rounded
    to 3 decimals before it is compared with 0. Policy rows take the adjustment but not the special-care bump.
    A category's score is the maximum margin over its rows.
    """
    rows = concepts.embeds  # (N, D) L2-normalised
    cos = torch.nn.functional.normalize(embeds.float()) @ rows.T  # (B, N) cosines, one matmul
    margins = cos - concepts.thresholds() + adjustment  # (B, N) float32, as the reference computes with numpy
    special_rows, nsfw_rows = concepts.special_rows, concepts.nsfw_rows
    bump = torch.zeros(embeds.shape[0], dtype=torch.float32)  # (B,) 0.01 once a special-care row hit
    for j in special_rows:  # a handful of rows; each step is whole-batch
        margins[:, j] = torch.round(margins[:, j] + bump, decimals=3)
        bump = torch.where(margins[:, j] > 0, SPECIAL_CARE_BUMP, bump)
    bumped = torch.zeros(len(concepts.concepts), dtype=torch.bool)
    bumped[nsfw_rows] = True
    others = torch.ones_like(bumped)
    others[special_rows] = False
    margins[:, others] = torch.round(margins[:, others] + bump[:, None] * bumped[others], decimals=3)
    mask = concepts.category_mask()  # (K, N)
    categories = margins[:, None, :].masked_fill(~mask, float("-inf")).amax(dim=2) if len(mask) else margins[:, :0]
    return Scores(concept=margins[:, nsfw_rows], special=margins[:, special_rows], categories=categories)
