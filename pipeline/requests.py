"""Generation requests and their limits: validated at the edge, shared by the CLI, the service and the generator.

Pydantic only (no torch), so the HTTP layer can import it cheaply.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import InvalidInput

Safety = Literal["off", "weak", "medium", "strong", "max"]

# Safe Latent Diffusion hyper-parameters (Schramowski et al., CVPR 2023, Table 1). diffusers' SafetyConfig matches the
# paper except Hyp-Weak's safety guidance scale: the paper uses 200, diffusers 20. We follow the paper: at 20 "weak"
# is nearly a no-op next to "medium"'s 1000, and 200 keeps the presets a monotone ladder (200 < 1000 < 2000 < 5000).
SLD_PRESETS: dict[str, dict[str, float]] = {
    "weak": {
        "sld_warmup_steps": 15,
        "sld_guidance_scale": 200,
        "sld_threshold": 0.0,
        "sld_momentum_scale": 0.0,
        "sld_mom_beta": 0.0,
    },
    "medium": {
        "sld_warmup_steps": 10,
        "sld_guidance_scale": 1000,
        "sld_threshold": 0.01,
        "sld_momentum_scale": 0.3,
        "sld_mom_beta": 0.4,
    },
    "strong": {
        "sld_warmup_steps": 7,
        "sld_guidance_scale": 2000,
        "sld_threshold": 0.025,
        "sld_momentum_scale": 0.5,
        "sld_mom_beta": 0.7,
    },
    "max": {
        "sld_warmup_steps": 0,
        "sld_guidance_scale": 5000,
        "sld_threshold": 1.0,
        "sld_momentum_scale": 0.5,
        "sld_mom_beta": 0.7,
    },
}
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class GenerationLimits:
    """Every bound a generation request is validated against: one object, shared by the CLI and the service."""

    max_prompt_chars: int = 2000  # prompt and negative prompt length, in characters
    max_images: int = 4  # images per request
    min_steps: int = 1  # denoising steps
    max_steps: int = 150
    min_guidance: float = 0.0  # classifier-free guidance scale
    max_guidance: float = 30.0
    min_size: int = 64  # width and height, pixels
    max_size: int = 1024
    size_multiple: int = 8  # width and height must be multiples of this


class GenerationRequest(BaseModel):
    """One text-to-image request. Build it with :meth:`parse` to validate against configurable limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(description="what to draw")
    negative_prompt: str | None = Field(None, description="what to steer away from")
    num_images: int = Field(1, strict=True, description="images to generate (1..4 by default)")
    steps: int = Field(25, strict=True, description="denoising steps (1..150)")
    guidance_scale: float = Field(7.5, description="classifier-free guidance (0..30)")
    width: int | None = Field(None, strict=True, description="pixels, multiple of 8 (default: the model's size)")
    height: int | None = Field(None, strict=True, description="pixels, multiple of 8 (default: the model's size)")
    seed: int | None = Field(None, strict=True, description="0..2^32-1; same seed, device and dtype -> same pixels")
    safety: Safety = Field("off", description="Safe Latent Diffusion preset: off | weak | medium | strong | max")

    @classmethod
    def parse(cls, data: Any, limits: GenerationLimits = GenerationLimits()) -> GenerationRequest:
        """Validate a dict (e.g. a JSON body); raises :class:`InvalidInput` naming each bad field and its range."""
        if not isinstance(data, dict):
            raise InvalidInput(f"the request must be a JSON object with at least `prompt`, got {type(data).__name__}")
        try:
            request = cls.model_validate(data)
        except ValidationError as exc:
            raise InvalidInput("; ".join(_describe(e) for e in exc.errors())) from None
        request.check(limits)
        return request

    def check(self, limits: GenerationLimits) -> None:
        problems = []
        for name in ("prompt", "negative_prompt"):
            text = getattr(self, name)
            if text is None:
                continue
            if name == "prompt" and not text.strip():
                problems.append("`prompt` must not be empty")
            if len(text) > limits.max_prompt_chars:
                problems.append(f"`{name}` has {len(text)} characters; the limit is {limits.max_prompt_chars}")
            bad = sorted(
                {f"U+{ord(c):04X}" for c in text if unicodedata.category(c) in ("Cc", "Cs") and c not in "\t\n"}
            )
            if bad:
                problems.append(f"`{name}` contains control characters {', '.join(bad[:5])}; remove them")
        ranges = [
            ("num_images", self.num_images, 1, limits.max_images),
            ("steps", self.steps, limits.min_steps, limits.max_steps),
            ("guidance_scale", self.guidance_scale, limits.min_guidance, limits.max_guidance),
        ]
        for name, value, lo, hi in ranges:
            if not lo <= value <= hi:
                problems.append(f"`{name}` must be within {lo}..{hi}, got {value}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (not limits.min_size <= value <= limits.max_size or value % limits.size_multiple):
                problems.append(
                    f"`{name}` must be a multiple of {limits.size_multiple} within "
                    f"{limits.min_size}..{limits.max_size}, got {value}"
                )
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            problems.append(f"`seed` must be within 0..{MAX_SEED}, got {self.seed}")
        if self.safety != "off" and self.guidance_scale <= 1:
            problems.append(f"`safety` {self.safety!r} needs `guidance_scale` > 1, got {self.guidance_scale}")
        if problems:
            raise InvalidInput("; ".join(problems))

    def public(self) -> dict[str, Any]:
        """The request for reports and logs, with the prompts shortened."""
        data = self.model_dump()
        for key in ("prompt", "negative_prompt"):
            if data[key] and len(data[key]) > 80:
                data[key] = data[key][:77] + "..."
        return data


def _describe(error: dict[str, Any]) -> str:
    where = ".".join(str(p) for p in error["loc"]) or "body"
    if error["type"] == "missing":
        return f"`{where}` is required"
    if error["type"] == "extra_forbidden":
        return f"`{where}` is not a known field; allowed: {', '.join(GenerationRequest.model_fields)}"
    received = repr(error.get("input"))
    return f"`{where}`: {error['msg'].lower()}, got {received[:60]}"
