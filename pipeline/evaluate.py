"""Evaluate a policy on labelled images, and calibrate its thresholds to a target false-positive rate.

A labelled folder holds one sub-folder per label: ``safe/`` (negatives) and one per category (``violence/``,
``sexual/``, ...; ``self_harm`` matches ``self-harm``). Every view of every object (frames, pages, backgrounds, tiles:
:mod:`pipeline.views`) is embedded once, and scored once by the policy's detectors in the same batches; thresholds of
concept and detector rows alike are then explored on the cached embeddings and probabilities with the checker's own
scoring function, an object scoring the maximum over its views, so the numbers are those the service would produce.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checker import SafetyChecker
from .concepts import Concept, ConceptSet, DetectorRow, reference_picks
from .errors import InvalidInput
from .images import IMAGE_SUFFIXES
from .policy import ConceptSpec, Policy
from .verdict import Scores
from .views import Viewed

log = logging.getLogger(__name__)
SAFE = "safe"
ROUNDING = 0.0005  # margins are rounded to 3 decimals: a hit needs value - threshold + adjustment >= 0.0005


def canonical(label: str) -> str:
    return label.strip().lower().replace("_", "-").replace(" ", "-")


@dataclass
class LabelledSet:
    paths: list[Path]
    labels: list[str]  # canonical label per object
    embeds: torch.Tensor  # (V, D) float32: every view of every object
    skipped: list[dict[str, str]]  # undecodable files, with the reason
    owners: torch.Tensor | None = None  # (V,) the object of each view; None: one view per object
    detector: torch.Tensor | None = None  # (V, P) float32 probabilities of every view; None: no detectors in force
    detector_columns: list[tuple[str, str]] = field(default_factory=list)  # (detector, output) of each column

    def per_object(self, per_view: torch.Tensor) -> torch.Tensor:
        """(V, k) per view -> (N, k) per object: the maximum over its views (what decides an object)."""
        if self.owners is None:
            return per_view
        out = torch.full((len(self.labels), per_view.shape[1]), float("-inf"), dtype=per_view.dtype)
        return out.scatter_reduce(0, self.owners[:, None].expand(-1, per_view.shape[1]), per_view, "amax")

    def probabilities(self, concepts: ConceptSet) -> torch.Tensor | None:
        """(V, P) the cached probabilities in ``concepts.detector_columns`` order; None when no detector is in force."""
        if not concepts.detectors:
            return None
        have = {key: j for j, key in enumerate(self.detector_columns)}
        missing = [key for key in concepts.detector_columns if key not in have]
        if self.detector is None or missing:
            raise InvalidInput(
                f"the policy's detector rows read {missing or concepts.detector_columns}, but these labelled images "
                f"were scored by {self.detector_columns or 'no detector'}: load them with the checker of this policy"
            )
        return self.detector[:, [have[key] for key in concepts.detector_columns]]

    def values(self, concepts: ConceptSet) -> np.ndarray:
        """(N, rows + M) float32 per object, the maximum over its views: each concept row's cosine, then each detector
        row's probability (the order of ``concepts.category_mask()``), what each row's threshold is compared with."""
        per_view = torch.nn.functional.normalize(self.embeds) @ concepts.embeds.T  # (V, rows) cosines
        probs = self.probabilities(concepts)
        if concepts.detector_rows and probs is not None:
            per_view = torch.cat([per_view, probs.float()[:, concepts.detector_row_columns()]], dim=1)  # (V, rows + M)
        return self.per_object(per_view).numpy()

    def scores(self, checker: SafetyChecker) -> Scores:
        """The checker's scores of every object, each the maximum over its views (as the service combines them)."""
        per_view = checker.score_embeddings(self.embeds, self.probabilities(checker.concepts))
        owners = self.owners if self.owners is not None else torch.arange(len(self.labels))
        return per_view.per_object(owners, len(self.labels), torch.zeros(len(owners)))[0]

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
    return labelled_set(checker, paths, labels, objects, skipped)


def labelled_set(
    checker: SafetyChecker, paths: list[Any], labels: list[str], objects: list[Viewed], skipped: list[dict[str, str]]
) -> LabelledSet:
    """Labelled objects' views -> a :class:`LabelledSet` with their embeddings and detector probabilities cached."""
    embeds, owners, detector = view_features(checker, objects)
    return LabelledSet(paths, labels, embeds, skipped, owners, detector, checker.concepts.detector_columns)


def view_features(
    checker: SafetyChecker, objects: list[Viewed]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Objects' views -> ((V, D) embeddings, (V,) the object of each, (V, P) the probabilities of the detectors in
    force, or None without them), a batch at a time: each batch embedded and scored by every detector, as the
    checker does."""
    arrays = [v.array for obj in objects for v in obj.views]
    owners = torch.repeat_interleave(torch.arange(len(objects)), torch.tensor([len(o.views) for o in objects]))
    detect = bool(checker.concepts.detectors)
    embeds, probs = [], []
    for start in range(0, len(arrays), checker.max_batch_size):
        chunk = arrays[start : start + checker.max_batch_size]
        embeds.append(checker.embed_pixels(checker.preprocess(chunk)))
        if detect:  # one forward per detector per batch
            probs.append(checker.detectors.score(checker.concepts, checker.detectors.prepare(checker.concepts, chunk)))
    return torch.cat(embeds), owners, torch.cat(probs) if detect else None


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
        **checker.parts,  # which rows' weights are demo (meaningless scores) and which real
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
        ax.set_xlabel("category score: highest row margin (cosine or probability − threshold)")
        ax.set_ylabel("images")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = directory / f"{cat}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def calibrate(checker: SafetyChecker, data: LabelledSet, policy: Policy, target_fpr: float) -> Policy:
    """Per-row thresholds (concept rows: cosines; detector rows: probabilities) meeting ``target_fpr`` on safe images
    per category, greedily maximising recall.

    A category's rows are taken best-first (by the recall each alone reaches within the budget, then by how far apart
    its values on the category's images and on safe images lie); each gets the lowest threshold that keeps the
    category's false positives within budget given the ones before it. The result is verified with the checker's own
    scoring and tightened if needed. Categories without labelled images keep theirs.
    """
    if not 0 <= target_fpr < 1:
        raise InvalidInput(f"--target-fpr must be in [0, 1), got {target_fpr}")
    safe = data.mask(SAFE)
    budget = int(np.floor(target_fpr * safe.sum()))
    concepts, adjustment = checker.concepts, checker.adjustment
    values = data.values(concepts)  # (N, rows + M): cosines, then probabilities
    rows: list[Concept | DetectorRow] = [*concepts.concepts, *concepts.detector_rows]
    row = {r.name: i for i, r in enumerate(rows)}
    lowest = np.array([0.0 if isinstance(r, DetectorRow) else -1.0 for r in rows])  # (rows + M,) a threshold's range
    thresholds: dict[str, float] = {}
    for name, _, names in concepts.categories:
        positive = data.mask(name)
        if not positive.any():
            log.info("category %s: no labelled images, thresholds kept", name)
            continue
        idx = np.array([row[r] for r in names])
        alone = _lowest_thresholds(values[safe][:, idx], budget, lowest[idx], adjustment)  # (R,)
        recall = (values[positive][:, idx] - alone + adjustment >= ROUNDING).mean(axis=0)
        apart = values[positive][:, idx].mean(axis=0) - (values[safe][:, idx].mean(axis=0) if safe.any() else 0.0)
        covered = np.zeros(len(data.labels), dtype=bool)
        for k in sorted(range(len(idx)), key=lambda r: (-recall[r], -apart[r])):  # best first
            j = idx[k]
            allowed = budget - int((covered & safe).sum())
            t = float(_lowest_thresholds(values[safe & ~covered][:, [j]], allowed, lowest[[j]], adjustment)[0])
            thresholds[rows[j].name] = t
            covered |= values[:, j] - t + adjustment >= ROUNDING
    original = checker.concepts
    checker.concepts = trial_concepts = copy.deepcopy(original)
    try:
        for name, t in thresholds.items():
            _set_threshold(trial_concepts, name, t)
        _tighten(checker, data, target_fpr, thresholds)
        return _with_thresholds(policy, checker, data, target_fpr)
    finally:
        checker.concepts = original


def _lowest_thresholds(safe: np.ndarray, allowed: int, lowest: np.ndarray, adjustment: float) -> np.ndarray:
    """(S, R) safe images' values of R rows -> (R,) each row's lowest threshold (at 4 decimals, as a policy is
    written) that flags at most ``allowed`` of them on its own; ``lowest`` (R,) is the bottom of each row's range."""
    if allowed >= len(safe):
        return lowest
    kept_out = -np.sort(-safe, axis=0)[allowed]  # (R,) the highest value that must not be a hit
    t = np.ceil((kept_out.astype(np.float64) + ROUNDING + 1e-6 - adjustment) * 1e4) / 1e4
    return np.clip(t, lowest, 1.0)


def _threshold(concepts: ConceptSet, name: str) -> float:
    return next(r.threshold for r in [*concepts.concepts, *concepts.detector_rows] if r.name == name)


def _set_threshold(concepts: ConceptSet, name: str, value: float) -> None:
    """A concept row's threshold (a cosine) or a detector row's (a probability) by the row's name."""
    for k, r in enumerate(concepts.detector_rows):
        if r.name == name:
            if not 0.0 <= value <= 1.0:
                raise InvalidInput(f"threshold for detector row {name!r} must be a probability in [0, 1], got {value}")
            concepts.detector_rows[k] = replace(r, threshold=float(value))
            return
    concepts.set_threshold(name, value)


def _tighten(trial: SafetyChecker, data: LabelledSet, target_fpr: float, thresholds: dict[str, float]) -> None:
    labelled = {c for c, _, _ in trial.concepts.categories if data.mask(c).any()}
    for _ in range(200):  # verify with the real scoring (special-care bump, rounding) and tighten where needed
        m = metrics(trial, data)["categories"]
        over = [n for n in labelled if (m[n]["fpr_safe"] or 0) > target_fpr]
        if not over:
            return
        for n in over:
            for r in next(rows for c, _, rows in trial.concepts.categories if c == n):
                thresholds[r] = round(min(_threshold(trial.concepts, r) + 0.001, 1.0), 4)
                _set_threshold(trial.concepts, r, thresholds[r])


def _with_thresholds(policy: Policy, checker: SafetyChecker, data: LabelledSet, target_fpr: float) -> Policy:
    """The policy with every row's threshold written out (stock references expanded per concept; detector rows as
    ``{detector, output, threshold}`` with the reference they were loaded by)."""
    concepts = checker.concepts
    by_name = {c.name: c for c in concepts.concepts}
    detectors = {r.name: r for r in concepts.detector_rows}
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
            elif kind == "detector":
                r = detectors[f"{category.name}:{i}"]
                detector = r.source or r.detector  # a folder as an absolute path, like example-image folders
                specs.append(replace(spec, detector=detector, output=r.output, threshold=round(r.threshold, 4)))
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
