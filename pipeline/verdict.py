"""One image's result (:class:`Verdict`) and the reference's scoring rule on a whole batch (:func:`score`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
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
    detector_scores: dict[str, dict[str, float]] = field(default_factory=dict)  # detector -> output -> probability
    bad_concepts: list[int] = field(default_factory=list)  # indices into concept_scores
    bad_concept_names: list[str] = field(default_factory=list)
    special_care: bool = False
    categories: dict[str, float] = field(default_factory=dict)  # category -> its highest concept margin
    flagged_categories: list[str] = field(default_factory=list)  # categories with a margin > 0
    action: str | None = None  # what the policy does: allow | flag | blur | black | block (None: no policy)
    error: str | None = None
    truncated: bool = False  # decoded from a truncated file: scored on what decodes (what a browser shows)
    unscorable: bool = False  # read but could not be scored (undecodable, too many pixels or bytes, unsupported)
    views: int = 1  # views scored: frames, pages, backgrounds under the alpha, tiles (see pipeline.views)
    views_total: int = 1  # views the object has; more than `views` when they were sampled (`views_sampled`)
    views_sampled: bool = False  # over max_views: frames sampled evenly over display time
    view: str | None = None  # the view that decided ("frame 12 @ 1.50 s", "page 2", "over white", "tile 3/3")
    demo: list[str] = field(default_factory=list)  # parts of the verdict from demo weights (meaningless scores)
    real: list[str] = field(default_factory=list)  # parts of the verdict from real, trained weights

    @classmethod
    def failed(cls, error: str, action: str | None = None, views_total: int = 0) -> Verdict:
        """A verdict with ``error`` set; with ``action`` it is an unscorable image's (the policy's action for it)."""
        return cls(error=error, action=action, unscorable=action is not None, views=0, views_total=views_total)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Scores:
    """Whole-batch scoring output on CPU: (B, C) concept margins, (B, S) special margins, (B, K) category scores,
    (B, P) detector probabilities (columns: ``ConceptSet.detector_columns``)."""

    concept: torch.Tensor
    special: torch.Tensor
    categories: torch.Tensor
    detector: torch.Tensor | None = None  # None: no detectors in force

    @property
    def nsfw(self) -> torch.Tensor:
        return (self.concept > 0).any(dim=1)

    def per_object(self, owners: torch.Tensor, n: int, key: torch.Tensor) -> tuple[Scores, torch.Tensor]:
        """Views' scores (V rows) -> each object's (n rows, the maximum over its views), and the row of the view that
        decided each object: the highest ``key`` (V,) among its views (the first view on a tie)."""
        if owners.numel() == n and bool((owners == torch.arange(n)).all()):  # one view each: nothing to combine
            return self, torch.arange(n)

        def amax(x: torch.Tensor) -> torch.Tensor:  # (V, k) -> (n, k)
            out = torch.full((n, x.shape[1]), float("-inf"), dtype=x.dtype)
            return out.scatter_reduce(0, owners[:, None].expand(-1, x.shape[1]), x, "amax")

        best = torch.full((n,), float("-inf")).scatter_reduce(0, owners, key, "amax")  # (n,)
        rows = torch.arange(len(owners))
        first = torch.full((n,), len(owners), dtype=torch.long)
        first = first.scatter_reduce(0, owners, torch.where(key == best[owners], rows, len(owners)), "amin")
        detector = amax(self.detector) if self.detector is not None else None
        return Scores(amax(self.concept), amax(self.special), amax(self.categories), detector), first


def cosines(embeds: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Image embeddings (B, D) and L2-normalised concept rows (N, D) -> (B, N) cosines, one matmul."""
    return torch.nn.functional.normalize(embeds.float()) @ rows.T


def score(
    embeds: torch.Tensor,
    concepts: ConceptSet,
    adjustment: float,
    detector: torch.Tensor | None = None,
    cos: torch.Tensor | None = None,
) -> Scores:
    """The reference's rule on a whole batch, plus category scores.

    ``embeds`` (B, D) float32 image embeddings. Every concept row is compared in one matmul. Special-care rows are
    scored in order and, from the first hit on, the adjustment is raised by 0.01 for the image's remaining special
    rows and its stock/custom rows, exactly as ``StableDiffusionSafetyChecker.forward`` does; every margin is rounded
    to 3 decimals before it is compared with 0. Policy rows take the adjustment but not the special-care bump.
    ``detector`` (B, P) are the detectors' probabilities (``concepts.detector_columns``); a detector row's margin is
    its probability - threshold + adjustment, rounded alike. A category's score is the maximum margin over its rows.
    ``cos`` (B, N): the cosines of ``embeds`` to ``concepts``' rows when the caller computed them already (columns of
    one matmul against several policies' rows: :mod:`pipeline.policyset`).
    """
    cos = cosines(embeds, concepts.embeds) if cos is None else cos  # (B, N)
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
    if concepts.detector_rows:
        if detector is None or detector.shape != (embeds.shape[0], len(concepts.detector_columns)):
            raise ValueError(f"detector rows need (B, {len(concepts.detector_columns)}) probabilities")
        thresholds = torch.tensor([r.threshold for r in concepts.detector_rows], dtype=torch.float32)  # (M,)
        rows = detector.float()[:, concepts.detector_row_columns()] - thresholds + adjustment  # (B, M)
        margins = torch.cat([margins, torch.round(rows, decimals=3)], dim=1)  # (B, N + M)
    mask = concepts.category_mask()  # (K, N + M)
    categories = margins[:, None, :].masked_fill(~mask, float("-inf")).amax(dim=2) if len(mask) else margins[:, :0]
    return Scores(margins[:, nsfw_rows], margins[:, special_rows], categories, detector if concepts.detectors else None)


def verdicts(scores: Scores, concepts: ConceptSet) -> list[Verdict]:
    """Tensors -> per-object Python objects (the only per-object loop, after all the arithmetic)."""
    from .policy import strongest

    names = concepts.names
    cats = [(name, action) for name, action, _ in concepts.categories]
    concept = np.round(scores.concept.double().numpy(), 3)
    special = np.round(scores.special.double().numpy(), 3)
    category = np.round(scores.categories.double().numpy(), 3)
    hits, flagged = concept > 0, category > 0
    special_hit = (special > 0).any(axis=1)
    columns = concepts.detector_columns
    detector = np.round(scores.detector.double().numpy(), 4) if scores.detector is not None else None
    policy = bool(cats) or concepts.policy_digest != ""
    out = []
    for i in range(concept.shape[0]):
        bad = np.flatnonzero(hits[i]).tolist()
        flags = [cats[k][0] for k in np.flatnonzero(flagged[i])]
        actions = [cats[k][1] for k in np.flatnonzero(flagged[i])] + ([concepts.nsfw_action] if bad else [])
        out.append(
            Verdict(
                nsfw=bool(bad),
                concept_scores=concept[i].tolist(),
                special_scores=special[i].tolist(),
                detector_scores=_by_detector(columns, detector[i]) if detector is not None else {},
                bad_concepts=bad,
                bad_concept_names=[names[j] for j in bad],
                special_care=bool(special_hit[i]),
                categories={name: float(category[i, k]) for k, (name, _) in enumerate(cats)},
                flagged_categories=flags,
                action=strongest(actions) if policy else None,
            )
        )
    return out


def _by_detector(columns: list[tuple[str, str]], row: np.ndarray) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for (name, output), value in zip(columns, row.tolist(), strict=True):
        out.setdefault(name, {})[output] = value
    return out


def deciding_key(scores: Scores, concepts: ConceptSet) -> torch.Tensor:
    """(V,) how strongly each view decides its object: the rank of the strongest action it leads to, then its highest
    margin among the rows that lead to that action (the closest call over every row when nothing is flagged)."""
    from .policy import RANK

    ranks = torch.tensor([RANK[action] for _, action, _ in concepts.categories], dtype=torch.float32)  # (K,)
    nsfw_rank = float(RANK[concepts.nsfw_action])
    rank = torch.full((len(scores.concept), 1), -1.0)  # (V, 1)
    if len(ranks):
        rank = torch.where(scores.categories > 0, ranks, -1.0).amax(dim=1, keepdim=True)
    rank = torch.where(scores.nsfw[:, None], rank.clamp(min=nsfw_rank), rank)
    deciding = torch.where(rank[:, 0] == nsfw_rank, scores.concept.amax(dim=1), float("-inf"))  # (V,)
    if len(ranks):
        deciding = torch.maximum(deciding, torch.where(ranks == rank, scores.categories, float("-inf")).amax(dim=1))
    anything = torch.cat([scores.concept, scores.categories], dim=1).amax(dim=1)  # (V,) margins in [-2, 2]
    return rank[:, 0] * 10 + torch.where(rank[:, 0] < 0, anything, deciding)


def object_verdicts(per_view: Scores, concepts: ConceptSet, labels: Sequence[Sequence[str | None]]) -> list[Verdict]:
    """Views' scores, ``len(labels[k])`` consecutive rows for object k -> one verdict per object: its scores the maximum
    over its views (whole-tensor), ``view`` the label of the view that decided, ``views`` how many were scored."""
    counts = torch.tensor([len(ls) for ls in labels])
    owners = torch.repeat_interleave(torch.arange(len(labels)), counts)  # (V,) the object of each view
    per_object, decided = per_view.per_object(owners, len(labels), deciding_key(per_view, concepts))
    flat = [label for ls in labels for label in ls]
    out = verdicts(per_object, concepts)
    for k, verdict in enumerate(out):
        verdict.views, verdict.views_total, verdict.view = len(labels[k]), len(labels[k]), flat[int(decided[k])]
    return out
