"""The moderated chain: generate -> score every image with the checker -> apply the policy.

The CLI runs :func:`generate_moderated` in-process; the Serve app runs the same steps across deployments and calls
:func:`moderate` to turn images and verdicts into what may leave.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .checker import SafetyChecker, Verdict
from .errors import Unavailable
from .generator import GenerationRequest, Generator
from .policy import apply_action


@dataclass
class ModeratedImage:
    index: int
    verdict: Verdict
    action: str  # allow | flag | blur | black | block
    image: np.ndarray | None  # the pixels that may leave; None when blocked

    @property
    def nsfw(self) -> bool:
        return self.verdict.nsfw

    def report(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "nsfw": self.nsfw,
            "action": self.action,
            "flagged_categories": self.verdict.flagged_categories,
            "moderation": self.verdict.to_dict(),
        }


@dataclass
class ModeratedGeneration:
    request: GenerationRequest
    seed: int
    size: tuple[int, int]  # (width, height) actually generated
    images: list[ModeratedImage]
    models: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        return {
            "request": self.request.public(),
            "seed": self.seed,
            "width": self.size[0],
            "height": self.size[1],
            "images": [m.report() for m in self.images],
            "models": self.models,
            "warnings": self.warnings,
        }


def moderate(images: list[np.ndarray], verdicts: list[Verdict]) -> list[ModeratedImage]:
    """Pair images with their verdicts and carry out each verdict's action. A missing verdict means nothing leaves."""
    if len(verdicts) != len(images):
        raise Unavailable(f"the checker returned {len(verdicts)} verdicts for {len(images)} images; nothing released")
    out = []
    for i, (image, verdict) in enumerate(zip(images, verdicts, strict=True)):
        action, pixels = apply_action(image, verdict)
        out.append(ModeratedImage(i, verdict, action, pixels))
    return out


def weight_parts(generator_info: dict[str, Any] | None, checker_info: dict[str, Any]) -> dict[str, list[str]]:
    """Which parts come from demo weights (meaningless scores) and which from real, trained ones: the checker's parts
    (``SafetyChecker.parts``; ``stock checker`` by ``demo_weights`` for a checker that lists none), then ``generator``
    when there is one."""
    demo, real = list(checker_info.get("demo") or []), list(checker_info.get("real") or [])
    if not demo and not real:
        (demo if checker_info["demo_weights"] else real).append("stock checker")
    if generator_info is not None:
        (demo if generator_info["demo_weights"] else real).append("generator")
    return {"demo": demo, "real": real}


def model_info(generator_info: dict[str, Any], checker_info: dict[str, Any]) -> dict[str, Any]:
    return {
        "generator": generator_info["model"],
        "generator_fingerprint": generator_info["fingerprint"],
        "text_encoder": generator_info.get("text_encoder"),
        "checker": checker_info["model"],
        "checker_fingerprint": checker_info["fingerprint"],
        "demo_weights": bool(generator_info["demo_weights"] or checker_info["demo_weights"]),
        **weight_parts(generator_info, checker_info),
    }


def generate_moderated(generator: Generator, checker: SafetyChecker, request: GenerationRequest) -> ModeratedGeneration:
    """Generate, score every image, apply the checker's policy: the only way the CLI releases generated pixels."""
    rendering = generator.render(request)
    verdicts = checker.check_arrays(rendering.images)
    return ModeratedGeneration(
        request=request,
        seed=rendering.seed,
        size=(rendering.width, rendering.height),
        images=moderate(rendering.images, verdicts),
        models=model_info(generator.info(), checker.info()),
        warnings=rendering.warnings,
    )
