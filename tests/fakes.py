"""Fault-injecting stand-ins loaded by Serve replicas through the deployments' ``factory`` argument.

They replace the model, never the serving code under test: the ingress, batching and error paths run for real.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np


class _FakeChecker:
    """The core's interface (:class:`pipeline.interface.CheckerCore`): views are the items themselves, scoring is
    what the subclass injects. The replica runs its one path, decode then score, exactly as with the real checker."""

    fingerprint = "fault-injection"

    def __init__(self, args: Any):
        self.args = args

    def views(self, items: list[Any], policies: Any = None) -> list[Any]:  # one policy: names are ignored
        return list(items)

    def configure(self, **settings: Any) -> None:
        self.settings = settings

    def info(self, policy: str | None = None) -> dict[str, Any]:
        return {"model": "fault-injection", "fingerprint": self.fingerprint, "demo_weights": True, "concepts": []}


class RaisingChecker(_FakeChecker):
    """A checker whose every call fails."""

    def score_views(self, objects: list[Any], policies: Any = None) -> list[Any]:
        raise RuntimeError("injected checker failure")


class SlowChecker(_FakeChecker):
    """A checker slower than any sane timeout; it would flag nothing, so a leak would be visible."""

    def score_views(self, objects: list[Any], policies: Any = None) -> list[Any]:
        from pipeline import Verdict

        time.sleep(3)
        return [Verdict(nsfw=False, concept_scores=[-1.0]) for _ in objects]


class FakeGenerator:
    """Random pixels, instantly (the generate path's checker faults do not need a diffusion model)."""

    def __init__(self, args: Any, limits: Any):
        self.limits = limits

    def render(self, request: Any) -> Any:
        from pipeline.generator import Rendering

        rng = np.random.default_rng(request.seed or 0)
        size = request.width or 64
        images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(request.num_images)]
        return Rendering(images, request.seed or 0, size, size)

    def info(self) -> dict[str, Any]:
        return {"model": "fake", "fingerprint": "fake", "demo_weights": True, "text_encoder": None}


GATE_ENV = "DIFFGUARD_TEST_GATE"


def gated_checker(args: Any) -> Any:
    """The real tiny checker, absent until the file named by $DIFFGUARD_TEST_GATE exists: the replica's constructor
    waits for it, so the deployment has no ready replica (the checker is "absent at start-up") until a test opens it."""
    import os
    from pathlib import Path

    from pipeline import SafetyChecker

    gate = Path(os.environ[GATE_ENV])
    while not gate.exists():
        time.sleep(0.2)
    return SafetyChecker.load("tiny", "cpu", "float32", max_pixels=args.max_pixels)


class SlowGenerator(FakeGenerator):
    """Random pixels after 2 s: under load its two ongoing slots stay held by renders, so anything queued behind
    them (a health probe that called the generator, say) would wait."""

    def render(self, request: Any) -> Any:
        time.sleep(2)
        return super().render(request)
