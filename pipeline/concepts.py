"""Concept sets: the rows every image embedding is compared against, with their thresholds.

Rows are the checker's 3 stock special-care concepts, its 17 stock concepts, then any custom concepts (from example
images or text) and a policy's category concepts. Stock and custom rows decide ``nsfw``; policy rows only feed their
categories (:func:`add_policy_rows`), as do a policy's detector rows (a trained classifier's output against a
probability threshold: :class:`DetectorRow`). A saved concept set holds the custom rows and any threshold overrides
of stock rows, in one safetensors file with JSON metadata, so it can be applied to any checker with the same embedding
width.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .errors import InvalidInput
from .images import IMAGE_SUFFIXES

if TYPE_CHECKING:
    from .policy import Policy

FORMAT = "diffguard.concepts/1"


@dataclass
class Concept:
    name: str  # unique; stock rows are concept_0..concept_16 and special_0..special_2; policy rows "<category>:<i>"
    kind: str  # "stock" | "special" | "image" | "text" (these decide nsfw) | "policy" (feeds categories only)
    threshold: float  # cosine above which (after adjustment) the concept is hit
    source: str = ""  # the text phrase, or how many example images made it


@dataclass(frozen=True)
class DetectorRow:
    """A policy row that reads a detector's output: its margin is probability - threshold + adjustment."""

    name: str  # "<category>:<i>", like the category's concept rows
    detector: str  # the reference as the policy writes it: the name results use (``detector_scores``)
    output: str  # one of the detector's outputs
    threshold: float  # probability in [0, 1]
    source: str = ""  # where it loads from when that differs from ``detector`` (a folder beside the policy file)

    def digested(self) -> dict[str, Any]:
        """What the fingerprint covers: not ``source`` (a path on this machine; the weights' digest is covered)."""
        return {"name": self.name, "detector": self.detector, "output": self.output, "threshold": self.threshold}


@dataclass
class ConceptSet:
    """Special-care rows first, then concept rows; ``embeds`` is (N, D) L2-normalised float32."""

    concepts: list[Concept]
    embeds: torch.Tensor
    stock_thresholds: dict[str, float] = field(default_factory=dict)  # the weights' own thresholds, for overrides
    categories: list[tuple[str, str, list[str]]] = field(default_factory=list)  # (name, action, row names)
    nsfw_action: str = "block"  # the action the stock decision leads to
    unscorable_action: str = "block"  # the action for an image that was read but could not be scored
    policy_digest: str = ""  # the policy these categories came from
    over_view_budget: str = "sample"  # an object with more than max_views views: "sample" them | "unscorable"
    max_views: int | None = None  # the policy's own view budget (None: the checker's)
    detector_rows: list[DetectorRow] = field(default_factory=list)  # a policy's detector rows, after the concepts'
    detectors: dict[str, list[str]] = field(default_factory=dict)  # detectors in force -> their outputs, in order
    detector_sources: dict[str, str] = field(default_factory=dict)  # a detector's name -> where it loads from, if other
    text_rows: list[str] = field(default_factory=list)  # policy rows the CLIP text tower embedded

    @classmethod
    def from_checker(cls, model: torch.nn.Module) -> ConceptSet:
        special = model.special_care_embeds.detach().float().cpu()
        stock = model.concept_embeds.detach().float().cpu()
        concepts = [
            Concept(f"special_{i}", "special", float(t))
            for i, t in enumerate(model.special_care_embeds_weights.detach().float())
        ] + [
            Concept(f"concept_{i}", "stock", float(t))
            for i, t in enumerate(model.concept_embeds_weights.detach().float())
        ]
        embeds = torch.nn.functional.normalize(torch.cat([special, stock]))
        return cls(concepts, embeds, {c.name: c.threshold for c in concepts})

    # --- views -------------------------------------------------------------------------------------------------------
    @property
    def num_special(self) -> int:
        return sum(c.kind == "special" for c in self.concepts)

    @property
    def nsfw_rows(self) -> list[int]:
        """Rows of ``concept_scores``: stock and custom concepts, in order."""
        return [i for i, c in enumerate(self.concepts) if c.kind in ("stock", "image", "text")]

    @property
    def special_rows(self) -> list[int]:
        return [i for i, c in enumerate(self.concepts) if c.kind == "special"]

    @property
    def names(self) -> list[str]:
        return [self.concepts[i].name for i in self.nsfw_rows]

    @property
    def special_names(self) -> list[str]:
        return [self.concepts[i].name for i in self.special_rows]

    @property
    def detector_columns(self) -> list[tuple[str, str]]:
        """(detector, output) of each column of the detectors' probabilities (``Scores.detector``), in order."""
        return [(name, output) for name, outputs in self.detectors.items() for output in outputs]

    def detector_row_columns(self) -> list[int]:
        """For each detector row, its column in :attr:`detector_columns`."""
        columns = {key: j for j, key in enumerate(self.detector_columns)}
        return [columns[(r.detector, r.output)] for r in self.detector_rows]

    def category_mask(self) -> torch.Tensor:
        """(C, N + M) bool: which rows (N concept rows, then M detector rows) each category takes its maximum over."""
        mask = torch.zeros((len(self.categories), len(self.concepts) + len(self.detector_rows)), dtype=torch.bool)
        row = {c.name: i for i, c in enumerate([*self.concepts, *self.detector_rows])}
        for k, (_, _, names) in enumerate(self.categories):
            mask[k, [row[n] for n in names]] = True
        return mask

    def thresholds(self) -> torch.Tensor:
        """(N,) float32 in row order, the same dtype the reference compares in."""
        return torch.tensor([c.threshold for c in self.concepts], dtype=torch.float32)

    def index(self, name_or_index: str | int) -> int:
        """Row of a concept given by name, or by index into ``concept_scores`` (ints)."""
        if isinstance(name_or_index, int):
            rows = self.nsfw_rows
            if not 0 <= name_or_index < len(rows):
                raise InvalidInput(f"concept index {name_or_index} is out of range 0..{len(rows) - 1}")
            return rows[name_or_index]
        for row, c in enumerate(self.concepts):
            if c.name == name_or_index:
                return row
        raise InvalidInput(f"unknown concept {name_or_index!r}; known: {[c.name for c in self.concepts]}")

    # --- edits -------------------------------------------------------------------------------------------------------
    def add(self, concept: Concept, embed: torch.Tensor) -> None:
        if not concept.name or concept.name in {c.name for c in self.concepts}:
            raise InvalidInput(f"concept name {concept.name!r} is empty or already used")
        if embed.shape != (self.embeds.shape[1],):
            raise InvalidInput(f"concept embedding must have shape ({self.embeds.shape[1]},), got {tuple(embed.shape)}")
        # Canonical order (special, stock, custom, policy) whatever the order of edits: one policy, one fingerprint.
        at = len(self.concepts)
        if concept.kind != "policy":
            at = next((i for i, c in enumerate(self.concepts) if c.kind == "policy"), at)
        self.concepts.insert(at, concept)
        row = torch.nn.functional.normalize(embed.detach().float().cpu(), dim=0)
        self.embeds = torch.cat([self.embeds[:at], row[None], self.embeds[at:]])

    def set_threshold(self, name_or_index: str | int, value: float) -> None:
        value = float(value)
        if not -1.0 <= value <= 1.0:
            raise InvalidInput(f"threshold for {name_or_index!r} must be a cosine in [-1, 1], got {value}")
        self.concepts[self.index(name_or_index)].threshold = value

    # --- persistence -------------------------------------------------------------------------------------------------
    def custom(self) -> tuple[list[Concept], torch.Tensor]:
        rows = [i for i, c in enumerate(self.concepts) if c.kind in ("image", "text")]
        return [self.concepts[i] for i in rows], self.embeds[rows]

    def overrides(self) -> dict[str, float]:
        return {
            c.name: c.threshold
            for c in self.concepts
            if c.name in self.stock_thresholds and c.threshold != self.stock_thresholds[c.name]
        }

    def save(self, path: str | Path) -> None:
        concepts, embeds = self.custom()
        meta = {
            "format": FORMAT,
            "dim": self.embeds.shape[1],
            "concepts": [c.__dict__ for c in concepts],
            "threshold_overrides": self.overrides(),
        }
        save_file({"embeds": embeds.contiguous()}, str(path), metadata={"diffguard": json.dumps(meta)})

    def apply_file(self, path: str | Path) -> None:
        """Add a saved file's custom concepts and apply its threshold overrides."""
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {})["diffguard"])
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise InvalidInput(f"concepts file {path} is not a diffguard concept set: {exc}") from None
        if meta.get("format") != FORMAT:
            raise InvalidInput(f"concepts file {path} has format {meta.get('format')!r}; expected {FORMAT!r}")
        if meta["dim"] != self.embeds.shape[1]:
            raise InvalidInput(
                f"concepts file {path} was made for {meta['dim']}-d embeddings; this checker's are "
                f"{self.embeds.shape[1]}-d (it belongs to another model)"
            )
        for concept, embed in zip(meta["concepts"], tensors["embeds"], strict=True):
            self.add(Concept(**concept), embed)
        for name, value in meta["threshold_overrides"].items():
            self.set_threshold(name, value)

    def digest(self) -> str:
        h = hashlib.sha256()
        h.update(self.embeds.contiguous().numpy().tobytes())
        h.update(json.dumps([c.__dict__ for c in self.concepts], sort_keys=True).encode())
        h.update(json.dumps([self.categories, self.nsfw_action, self.unscorable_action, self.policy_digest]).encode())
        if (self.over_view_budget, self.max_views) != ("sample", None):  # unchanged digest for the defaults
            h.update(json.dumps([self.over_view_budget, self.max_views]).encode())
        if self.detector_rows:  # unchanged digest without detectors
            h.update(json.dumps([[r.digested() for r in self.detector_rows], self.detectors], sort_keys=True).encode())
        return h.hexdigest()


# --- a policy's categories as concept rows ----------------------------------------------------------------------------
def example_centroid(embeds: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Example image embeddings (N, D) -> (their L2-normalised mean (D,), a threshold at which every example is a
    hit: the lowest cosine of an example to the mean, less 0.001)."""
    embeds = torch.nn.functional.normalize(embeds)
    centroid = torch.nn.functional.normalize(embeds.mean(0), dim=0)
    return centroid, round(float((embeds @ centroid).min()) - 1e-3, 4)


def reference_picks(concepts: ConceptSet, kind: str, ref: Any, category: str) -> list[tuple[int, int]]:
    """A policy's reference to stock rows (``kind`` "stock" or "special"; ``ref`` an index or "all") ->
    (index among the stock rows of that kind, row in ``concepts``) for each row it names."""
    pool = [i for i, c in enumerate(concepts.concepts) if c.kind == kind]
    if ref == "all":
        return list(enumerate(pool))
    if not isinstance(ref, int) or not 0 <= ref < len(pool):
        raise InvalidInput(f"category {category!r}: {kind} reference must be 'all' or 0..{len(pool) - 1}, got {ref!r}")
    return [(ref, pool[ref])]


def detector_row(
    category: str, i: int, spec: Any, base_dir: Path, outputs: Callable[[str], Sequence[str]]
) -> DetectorRow:
    """A policy's detector row -> :class:`DetectorRow`; ``outputs(source)`` loads the detector and names its outputs.
    A built-in name (``open_nsfw``) is always the built-in detector, whatever folders exist; another relative
    directory is read relative to the policy file, like example-image folders (else as ``--model`` reads one)."""
    from .detectors import BUILTIN

    ref = source = str(spec.detector)
    if ref not in BUILTIN and not Path(ref).is_absolute() and (base_dir / ref).is_dir():
        source = str((base_dir / ref).resolve())
    names = list(outputs(source))
    output = spec.output if spec.output is not None else (names[0] if len(names) == 1 else None)
    if output not in names:
        raise InvalidInput(
            f"category {category!r}, concept {i}: detector {spec.detector!r} has outputs {names}; "
            f"`output` must name one of them, got {spec.output!r}"
        )
    return DetectorRow(f"{category}:{i}", ref, str(output), float(spec.threshold), "" if source == ref else source)


def add_policy_rows(
    concepts: ConceptSet,
    policy: Policy,
    text_embeds: dict[tuple[str, int], torch.Tensor],
    embed_images: Callable[[list[Path]], torch.Tensor],
    detector_outputs: Callable[[str], Sequence[str]] | None = None,
) -> None:
    """Add ``policy``'s categories to ``concepts``: stock references (thresholds overridden where given), text rows
    (``text_embeds`` by (category, concept index)), example-image sets (``embed_images(files)`` -> (N, D)) and
    detector rows (``detector_outputs(ref)`` loads a detector and names its outputs)."""
    for category in policy.categories:
        rows: list[str] = []
        for i, spec in enumerate(category.concepts):
            kind = spec.kind()
            if kind == "detector":
                if detector_outputs is None:
                    raise InvalidInput(f"category {category.name!r}: detector rows need a checker that loads detectors")
                row = detector_row(category.name, i, spec, policy.base_dir, detector_outputs)
                concepts.detector_rows.append(row)
                concepts.detectors.setdefault(row.detector, list(detector_outputs(row.source or row.detector)))
                if row.source:
                    concepts.detector_sources[row.detector] = row.source
                rows.append(row.name)
                continue
            if kind in ("stock", "special"):
                for _, row in reference_picks(concepts, kind, getattr(spec, kind), category.name):
                    if spec.threshold is not None:
                        concepts.concepts[row].threshold = float(spec.threshold)
                    rows.append(concepts.concepts[row].name)
                continue
            if kind == "text":
                embed, source, threshold = text_embeds[(category.name, i)], spec.text, spec.threshold
            else:
                directory = policy.base_dir / str(spec.images)
                files = (
                    sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
                    if directory.is_dir()
                    else []
                )
                if not files:
                    raise InvalidInput(f"category {category.name!r}: no example images under {directory}")
                embed, threshold = example_centroid(embed_images(files))
                source = f"{len(files)} example images in {directory}"
                threshold = spec.threshold if spec.threshold is not None else threshold
            concepts.add(Concept(f"{category.name}:{i}", "policy", float(threshold), str(source)), embed)
            if kind == "text":
                concepts.text_rows.append(f"{category.name}:{i}")
            rows.append(f"{category.name}:{i}")
        concepts.categories.append((category.name, category.action, rows))
    concepts.nsfw_action = policy.nsfw_action
    concepts.unscorable_action = policy.unscorable_action
    concepts.over_view_budget, concepts.max_views = policy.over_view_budget, policy.max_views
    concepts.policy_digest = policy.digest()
