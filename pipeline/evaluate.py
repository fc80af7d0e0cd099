"""Evaluate a policy on labelled images, and calibrate its thresholds to a target false-positive rate.

A labelled folder holds one sub-folder per label: ``safe/`` (negatives) and one per category (``violence/``,
``sexual/``, ...; ``self_harm`` matches ``self-harm``). Every view of every object (frames, pages, backgrounds, tiles:
:mod:`pipeline.views`) is embedded once; thresholds are then explored on the cached embeddings with the checker's own
scoring function, an object scoring the maximum over its views, so the numbers are those the service would produce.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checker import SafetyChecker
from .concepts import reference_picks
from .errors import InvalidInput
from .images import IMAGE_SUFFIXES
from .policy import ConceptSpec, Policy
from .verdict import Scores
from .views import Viewed

log = logging.getLogger(__name__)
SAFE = "safe"
ROUNDING = 0.0005  # margins are rounded to 3 decimals: a hit needs cosine - threshold >= 0.0005


def canonical(label: str) -> str:
    return label.strip().lower().replace("_", "-").replace(" ", "-")


@dataclass
class LabelledSet:
    paths: list[Path]
    labels: list[str]  # canonical label per object
    embeds: torch.Tensor  # (V, D) float32: every view of every object
    skipped: list[dict[str, str]]  # undecodable files, with the reason
    owners: torch.Tensor | None = None  # (V,) the object of each view; None: one view per object

    def per_object(self, per_view: torch.Tensor) -> torch.Tensor:
        """(V, k) per view -> (N, k) per object: the maximum over its views (what decides an object)."""
        if self.owners is None:
            return per_view
        out = torch.full((len(self.labels), per_view.shape[1]), float("-inf"), dtype=per_view.dtype)
        return out.scatter_reduce(0, self.owners[:, None].expand(-1, per_view.shape[1]), per_view, "amax")

    def scores(self, checker: SafetyChecker) -> Scores:
        """The checker's scores of every object, each the maximum over its views."""
        per_view = checker.score_embeddings(self.embeds)
        return Scores(*(self.per_object(t) for t in (per_view.concept, per_view.special, per_view.categories)))

    def mask(self, label: str) -> np.ndarray:
        return np.array([lab == label for lab in self.labels])

    def counts(self) -> dict[str, int]:
        return {lab: int(self.mask(lab).sum()) for lab in sorted(set(self.labels))}


def load_labelled(root: str | Path, checker: SafetyChecker) -> LabelledSet:
    root = Path(root)
    if not root.is_dir():
        raise InvalidInput(f"labelled folder {root} does not exist")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not any(canonical(f.name) == SAFE for f in folders):
        raise InvalidInput(f"labelled folder {root} needs a `safe/` sub-folder; found {[f.name for f in folders]}")
    paths, labels, skipped, objects = [], [], [], []
    for folder in folders:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        for path, viewed in zip(files, checker.views(files), strict=True):
            if isinstance(viewed, Exception):
                skipped.append({"path": str(path), "error": str(viewed)})
                continue
            paths.append(path)
            labels.append(canonical(folder.name))
            objects.append(viewed)
    if not objects:
        raise InvalidInput(f"no readable images under {root}")
    embeds, owners = embed_views(checker, objects)
    return LabelledSet(paths, labels, embeds, skipped, owners)


def embed_views(checker: SafetyChecker, objects: list[Viewed]) -> tuple[torch.Tensor, torch.Tensor]:
    """Objects' views -> ((V, D) embeddings, (V,) the object of each), embedded a batch at a time."""
    arrays = [v.array for obj in objects for v in obj.views]
    owners = torch.repeat_interleave(torch.arange(len(objects)), torch.tensor([len(o.views) for o in objects]))
    step = checker.max_batch_size
    embeds = [checker.embed_pixels(checker.preprocess(arrays[i : i + step])) for i in range(0, len(arrays), step)]
    return torch.cat(embeds), owners


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b else None


def metrics(checker: SafetyChecker, data: LabelledSet) -> dict[str, Any]:
    """Per-category precision, recall, F1 and false-positive rate on safe images; a confusion table."""
    scores = data.scores(checker)
    verdicts = checker.verdicts(scores)
    categories = [name for name, _, _ in checker.concepts.categories]
    safe = data.mask(SAFE)
    flagged = np.array([[c in v.flagged_categories for c in categories] for v in verdicts], dtype=bool).reshape(
        len(verdicts), len(categories)
    )
    out: dict[str, Any] = {}
    for k, cat in enumerate(categories):
        positive = data.mask(cat)
        tp = int((flagged[:, k] & positive).sum())
        fp = int((flagged[:, k] & ~positive).sum())
        fn = int((~flagged[:, k] & positive).sum())
        precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
        f1 = round(2 * precision * recall / (precision + recall), 4) if precision and recall else None
        out[cat] = {
            "labelled": int(positive.sum()),
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "fpr_safe": _ratio(int((flagged[:, k] & safe).sum()), int(safe.sum())),
        }
    any_flag = flagged.any(axis=1)
    nsfw = np.array([v.nsfw for v in verdicts])
    confusion: dict[str, dict[str, int]] = {}
    cat_scores = scores.categories.numpy()
    for i, label in enumerate(data.labels):
        top = "none"
        if any_flag[i]:
            top = categories[int(np.argmax(np.where(flagged[i], cat_scores[i], -np.inf)))]
        confusion.setdefault(label, {}).setdefault(top, 0)
        confusion[label][top] += 1
    return {
        "policy": checker.info()["policy"],
        "fingerprint": checker.fingerprint,
        "demo_weights": checker.demo,
        "images": data.counts(),
        "skipped": data.skipped,
        "unmatched_labels": sorted(set(data.labels) - set(categories) - {SAFE}),
        "categories": out,
        "any_category": {
            "fpr_safe": _ratio(int((any_flag & safe).sum()), int(safe.sum())),
            "recall_unsafe": _ratio(int((any_flag & ~safe).sum()), int((~safe).sum())),
        },
        "nsfw": {"fpr_safe": _ratio(int((nsfw & safe).sum()), int(safe.sum()))},
        "confusion": confusion,
    }


def plot(checker: SafetyChecker, data: LabelledSet, directory: str | Path) -> list[Path]:
    """One PNG per category: score distributions of safe and labelled images, the threshold (0) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    scores = data.scores(checker).categories.numpy()
    written = []
    for k, (cat, action, _) in enumerate(checker.concepts.categories):
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        groups = [(SAFE, data.mask(SAFE), "tab:blue"), (cat, data.mask(cat), "tab:red")]
        finite = scores[np.isfinite(scores[:, k]), k]
        bins = np.linspace(finite.min(initial=-0.5) - 0.01, finite.max(initial=0.5) + 0.01, 40)
        for label, mask, colour in groups:
            if mask.any():
                ax.hist(scores[mask, k], bins=bins, alpha=0.6, color=colour, label=f"{label} ({int(mask.sum())})")
        ax.axvline(0.0, color="black", linestyle="--", label="threshold (margin 0)")
        demo = " — tiny demo weights: meaningless" if checker.demo else ""
        ax.set_title(f"{cat} ({action}){demo}", fontsize=9)
        ax.set_xlabel("category score: highest concept margin (cosine − threshold)")
        ax.set_ylabel("images")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = directory / f"{cat}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def calibrate(checker: SafetyChecker, data: LabelledSet, policy: Policy, target_fpr: float) -> Policy:
    """Per-concept thresholds meeting ``target_fpr`` on safe images per category, greedily maximising recall.

    Concepts are taken best-first (by how well each alone separates the category from safe images); each gets the
    lowest threshold that keeps the category's false positives within budget given the ones before it. The result is
    verified with the checker's own scoring and tightened if needed. Categories without labelled images keep theirs.
    """
    if not 0 <= target_fpr < 1:
        raise InvalidInput(f"--target-fpr must be in [0, 1), got {target_fpr}")
    safe = data.mask(SAFE)
    budget = int(np.floor(target_fpr * safe.sum()))
    concepts = checker.concepts
    cos = data.per_object(torch.nn.functional.normalize(data.embeds) @ concepts.embeds.T).numpy()  # (N, rows)
    row = {c.name: i for i, c in enumerate(concepts.concepts)}
    thresholds: dict[str, float] = {}
    for name, _, rows in concepts.categories:
        positive = data.mask(name)
        if not positive.any():
            log.info("category %s: no labelled images, thresholds kept", name)
            continue
        idx = [row[r] for r in rows]
        order = sorted(idx, key=lambda j: -(cos[positive, j].mean() - cos[safe, j].mean()))
        covered = np.zeros(len(data.labels), dtype=bool)
        for j in order:
            free = np.sort(cos[safe & ~covered, j])[::-1]  # safe images not yet flagged, highest first
            allowed = budget - int((covered & safe).sum())
            t = (free[allowed] if allowed < len(free) else free[-1] - 1.0) + ROUNDING + 1e-6 - checker.adjustment
            thresholds[concepts.concepts[j].name] = float(min(max(t, -1.0), 1.0))
            covered |= cos[:, j] - t + checker.adjustment >= ROUNDING
    original = checker.concepts
    checker.concepts = trial_concepts = copy.deepcopy(original)
    try:
        for name, t in thresholds.items():
            trial_concepts.set_threshold(name, t)
        _tighten(checker, data, target_fpr, thresholds)
        return _with_thresholds(policy, checker, data, target_fpr)
    finally:
        checker.concepts = original


def _tighten(trial: SafetyChecker, data: LabelledSet, target_fpr: float, thresholds: dict[str, float]) -> None:
    row = {c.name: i for i, c in enumerate(trial.concepts.concepts)}
    labelled = {c for c, _, _ in trial.concepts.categories if data.mask(c).any()}
    for _ in range(200):  # verify with the real scoring (special-care bump, rounding) and tighten where needed
        m = metrics(trial, data)["categories"]
        over = [n for n in labelled if (m[n]["fpr_safe"] or 0) > target_fpr]
        if not over:
            return
        for n in over:
            for r in next(rows for c, _, rows in trial.concepts.categories if c == n):
                thresholds[r] = min(trial.concepts.concepts[row[r]].threshold + 0.001, 1.0)
                trial.concepts.set_threshold(r, thresholds[r])


def _with_thresholds(policy: Policy, checker: SafetyChecker, data: LabelledSet, target_fpr: float) -> Policy:
    """The policy with every concept's threshold written out (stock references expanded per concept)."""
    concepts = checker.concepts
    by_name = {c.name: c for c in concepts.concepts}
    categories = []
    for category in policy.categories:
        specs: list[ConceptSpec] = []
        for i, spec in enumerate(category.concepts):
            kind = spec.kind()
            if kind in ("stock", "special"):
                picks = reference_picks(concepts, kind, getattr(spec, kind), category.name)
                specs += [
                    ConceptSpec(**{kind: j}, threshold=round(concepts.concepts[row].threshold, 4)) for j, row in picks
                ]
            else:
                images = str((policy.base_dir / spec.images).resolve()) if spec.images else None
                threshold = round(by_name[f"{category.name}:{i}"].threshold, 4)
                specs.append(replace(spec, images=images, threshold=threshold))
        categories.append(replace(category, concepts=tuple(specs)))
    extra = {
        **policy.extra,
        "calibration": {
            "target_fpr": target_fpr,
            "images": data.counts(),
            "checker_fingerprint": checker.fingerprint,
            "date": dt.date.today().isoformat(),
        },
    }
    return replace(policy, name=f"{policy.name}-calibrated", calibrated=True, categories=tuple(categories), extra=extra)
