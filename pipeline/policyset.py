"""Many policies, one checker pass: the named policies a checker holds beside its own (:class:`PolicySet`), the
detectors several policies name, each scored once (:class:`DetectorUnion`), and every policy's scores read from one
matmul against the union of their concept rows (:func:`score_sets`).

A tenant's objects are scored with its policy, yet a batch that mixes tenants takes one vision pass per chunk of
views, one matmul and one forward per detector: only the reading of the margins (thresholds, categories, actions) is
per policy, and that is whole-tensor per policy (a handful), never per object. Plain Python + torch: no Ray, no HTTP.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .errors import InvalidInput
from .policy import KEYWORDS
from .verdict import Scores, cosines, score

if TYPE_CHECKING:
    import numpy as np

    from .concepts import ConceptSet
    from .detectors import Detector, DetectorSet

Built = tuple["ConceptSet", "str | None"]  # a policy's rows, and why the stock policy replaced it (None: it did not)


class PolicySet:
    """Named policies beside a checker's own: those configured, and keywords of :func:`~pipeline.policy.load_policy`
    (``default``, ``stock``, ``block``, ``blur``, ``black``) built on first use with the same recipe, then cached.

    Immutable but for that cache: a checker replaces the whole set when it is configured again, so a build in flight
    never lands in the new one.

    >>> policies = PolicySet({"strict": build("strict.yaml")}, build)  # build(policy) -> (ConceptSet, fallback)
    >>> policies.get("strict"), policies.get("blur")                   # "blur": built now, cached until configure
    """

    def __init__(self, named: dict[str, Built] | None = None, build: Callable[[str], Built] | None = None):
        self._named: dict[str, Built] = dict(named or {})
        self._cache: dict[str, Built] = {}
        self._build = build
        self._lock = threading.Lock()  # one build per keyword, whichever thread asks first

    @property
    def names(self) -> list[str]:
        """The configured names, in order."""
        return list(self._named)

    @property
    def allowed(self) -> list[str]:
        """Every name :meth:`get` accepts: the configured ones, then the keywords."""
        return [*self._named, *(k for k in KEYWORDS if k not in self._named)]

    def resolved(self, name: str) -> Built:
        """-> (rows, fallback reason) of policy ``name``; InvalidInput naming it and what is allowed when unknown."""
        if name in self._named:
            return self._named[name]
        if not isinstance(name, str) or name not in KEYWORDS or self._build is None:
            raise InvalidInput(f"policy {name!r} is not configured; allowed: {', '.join(self.allowed)}")
        with self._lock:
            if name not in self._cache:
                self._cache[name] = self._build(name)
            return self._cache[name]

    def get(self, name: str) -> ConceptSet:
        return self.resolved(name)[0]


def check_names(policies: Sequence[str | None] | None, n: int) -> list[str | None]:
    """A per-object sequence of policy names (None: the checker's own) -> a list of ``n``; None -> all own."""
    if policies is None:
        return [None] * n
    names = list(policies)
    if len(names) != n:
        raise InvalidInput(f"policies must name one policy per object: got {len(names)} names for {n} objects")
    if bad := [p for p in names if p is not None and (not isinstance(p, str) or not p)]:
        raise InvalidInput(f"policies must be names (str) or None, got {bad[0]!r}")
    return names


class DetectorUnion:
    """The detectors any of ``sets`` names, each once (by where it loads from), and each set's columns in their
    joint probabilities: one forward per detector per chunk, on the views whose policy reads it.

    >>> union = DetectorUnion(checker.detectors, [own, strict])
    >>> plan, failed = union.prepare(views, owner)   # owner (b,): the index in sets of each view's policy
    >>> probs = union.score(plan, len(views))        # (b, P); set k reads probs[:, union.of_set[k]]
    """

    def __init__(self, detectors: DetectorSet, sets: Sequence[ConceptSet]):
        self.detectors = detectors
        self.refs: dict[str, str] = {}  # where a detector loads from -> a name a policy calls it (for messages)
        for s in sets:
            for name in s.detectors:
                self.refs.setdefault(s.detector_sources.get(name, name), name)
        self.columns = [(ref, out) for ref in self.refs for out in detectors.get(ref).outputs]  # (P,)
        index = {column: j for j, column in enumerate(self.columns)}
        self.of_set = [[index[(s.detector_sources.get(n, n), o)] for n, o in s.detector_columns] for s in sets]
        loads = [{s.detector_sources.get(n, n) for n in s.detectors} for s in sets]
        self.uses = torch.tensor([[ref in used for ref in self.refs] for used in loads], dtype=torch.bool)  # (S, R)
        self.uses = self.uses.reshape(len(sets), len(self.refs))

    def prepare(self, arrays: list[np.ndarray], owner: torch.Tensor) -> tuple[list[Any], dict[int, str]]:
        """Views (b) and their policies' indices (b,) -> (each detector's inputs for the views that need it,
        {view: why it could not be prepared}): CPU work, one call per detector."""
        plan: list[Any] = []
        failed: dict[int, str] = {}
        need = self.uses[owner]  # (b, R)
        column = 0
        for r, (ref, name) in enumerate(self.refs.items()):
            detector: Detector = self.detectors.get(ref)
            rows = torch.nonzero(need[:, r]).flatten().tolist()
            if rows:
                inputs, bad = self.detectors.prepare_one(detector, name, [arrays[i] for i in rows])
                for i, why in bad.items():
                    failed.setdefault(rows[i], why)
                plan.append((detector, column, rows, inputs))
            column += len(detector.outputs)
        return plan, failed

    def score(self, plan: list[Any], n: int) -> torch.Tensor | None:
        """:meth:`prepare`'s plan -> (n, P) probabilities (NaN where a view's policy does not read the detector, so
        a column read by mistake fails closed); None without detectors."""
        if not self.refs:
            return None
        probs = torch.full((n, len(self.columns)), float("nan"))
        for detector, column, rows, inputs in plan:  # one forward per detector
            probs[rows, column : column + len(detector.outputs)] = detector(inputs).float()
        return probs


def score_sets(
    embeds: torch.Tensor,
    sets: Sequence[ConceptSet],
    owner: torch.Tensor,
    adjustment: float,
    detector: torch.Tensor | None,
    union: DetectorUnion,
) -> list[tuple[torch.Tensor, Scores]]:
    """Views' embeddings (V, D), the index in ``sets`` of each view's policy ``owner`` (V,) and the union's detector
    probabilities (V, P) -> for each set, (its views' rows (V_k,), their :class:`Scores` under it). One matmul against
    every set's rows; each set reads its own columns."""
    rows = sets[0].embeds if len(sets) == 1 else torch.cat([s.embeds for s in sets])  # (ΣN, D)
    cos = cosines(embeds, rows)  # (V, ΣN): one matmul for every policy
    out, start = [], 0
    for k, s in enumerate(sets):  # a handful of policies; each step is whole-tensor
        mine = torch.nonzero(owner == k).flatten()  # (V_k,)
        probs = detector[mine][:, union.of_set[k]] if detector is not None and s.detectors else None
        width = s.embeds.shape[0]
        out.append((mine, score(embeds[mine], s, adjustment, probs, cos[mine, start : start + width])))
        start += width
    return out
