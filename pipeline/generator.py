"""Text-to-image generation on diffusers' Stable Diffusion pipeline, with Safe Latent Diffusion presets and an
optional text-encoder swap (Safe-CLIP). diffusers' own safety checker never runs: every image is scored by
:class:`pipeline.SafetyChecker` in the moderated chain (``pipeline.moderate``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import unicodedata
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import models
from .checker import resolve_device, resolve_dtype, weights_digest
from .errors import InvalidInput

log = logging.getLogger(__name__)

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


@dataclass
class Rendering:
    """What a generation produced: uint8 RGB images (H, W, 3), the seed that reproduces them, and warnings."""

    images: list[np.ndarray]
    seed: int
    width: int
    height: int
    warnings: list[str] = field(default_factory=list)


class Generator:
    """Stable Diffusion (1.x and 2.x) text-to-image with SLD presets; never runs diffusers' safety checker.

    >>> gen = Generator.load("tiny")                   # or "stable-diffusion-v1-5/stable-diffusion-v1-5", or a dir
    >>> images = gen.generate(GenerationRequest.parse({"prompt": "a red bicycle", "seed": 7}))
    """

    def __init__(
        self,
        pipe: Any,
        *,
        source: str = "",
        demo: bool = False,
        text_encoder_source: str | None = None,
        limits: GenerationLimits = GenerationLimits(),
    ):
        self.pipe = pipe
        self.source, self.demo, self.text_encoder_source = source, demo, text_encoder_source
        self.limits = limits
        self.device, self.dtype = pipe.device, pipe.unet.dtype
        self._sld: Any = None
        self._lock = threading.Lock()  # the scheduler keeps per-call state: one generation at a time
        config = json.dumps(dict(pipe.scheduler.config), sort_keys=True, default=str)
        digest = weights_digest(pipe.unet, pipe.vae, pipe.text_encoder)
        self.fingerprint = hashlib.sha256(f"{digest}|{type(pipe.scheduler).__name__}|{config}".encode()).hexdigest()[
            :16
        ]
        pipe.set_progress_bar_config(disable=True)

    @classmethod
    def load(
        cls,
        model: str = models.TINY,
        device: str = "auto",
        dtype: str = "auto",
        text_encoder: str | None = None,
        limits: GenerationLimits = GenerationLimits(),
    ) -> Generator:
        """Load a Stable Diffusion pipeline (tiny | directory | hub id), optionally swapping its text encoder."""
        models.quiet_libraries()
        from diffusers import StableDiffusionPipeline

        dev = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, dev)
        src = models.resolve(model, "sd")
        pipe = models.from_pretrained(
            StableDiffusionPipeline,
            src,
            "Stable Diffusion pipeline",
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **models.dtype_kwargs(torch_dtype),
        )
        demo = src.demo
        if text_encoder is not None:
            from transformers import CLIPTextModel

            enc_src = models.resolve(text_encoder, "safeclip")
            encoder = models.from_pretrained(CLIPTextModel, enc_src, "text encoder", dtype=torch_dtype)
            expected = pipe.unet.config.cross_attention_dim
            if encoder.config.hidden_size != expected:
                raise InvalidInput(
                    f"text encoder {text_encoder!r} has hidden size {encoder.config.hidden_size}, but the UNet of "
                    f"{model!r} attends to {expected}-d text states (Safe-CLIP ViT-L/14 fits SD 1.x)"
                )
            pipe.text_encoder = encoder.eval()
            demo = demo or enc_src.demo
        pipe = pipe.to(dev)
        return cls(pipe, source=model, demo=demo, text_encoder_source=text_encoder, limits=limits)

    @property
    def native_size(self) -> int:
        return int(self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor)

    def safe_pipeline(self) -> Any:
        """diffusers' StableDiffusionPipelineSafe over the same modules (no second copy of any weight)."""
        if self._sld is None:
            from diffusers.pipelines.deprecated.stable_diffusion_safe import StableDiffusionPipelineSafe

            p = self.pipe
            self._sld = StableDiffusionPipelineSafe(
                vae=p.vae,
                text_encoder=p.text_encoder,
                tokenizer=p.tokenizer,
                unet=p.unet,
                scheduler=p.scheduler,
                safety_checker=None,  # its checker keeps a hard-coded buffer of 2 unsafe images; ours scores all
                feature_extractor=None,
                requires_safety_checker=False,
            )
            self._sld.set_progress_bar_config(disable=True)
        return self._sld

    def truncation_warnings(self, request: GenerationRequest) -> list[str]:
        tok = self.pipe.tokenizer
        out = []
        for name in ("prompt", "negative_prompt"):
            text = getattr(request, name)
            if text:
                n = len(tok(text, truncation=False).input_ids)
                if n > tok.model_max_length:
                    out.append(f"`{name}` is {n} tokens; the text encoder reads only the first {tok.model_max_length}")
        return out

    def render(self, request: GenerationRequest) -> Rendering:
        """Generate the request's images (uint8 HWC) with the seed that reproduces them."""
        request.check(self.limits)
        seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
        width, height = request.width or self.native_size, request.height or self.native_size
        kwargs: dict[str, Any] = dict(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            num_images_per_prompt=request.num_images,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            width=width,
            height=height,
            generator=torch.Generator("cpu").manual_seed(seed),  # CPU noise: same latents on every device
            output_type="np",
        )
        with self._lock, torch.inference_mode():
            if request.safety == "off":
                out = self.pipe(**kwargs)
            else:
                with warnings.catch_warnings():  # the deprecated pipeline warns on every call
                    warnings.simplefilter("ignore", FutureWarning)
                    out = self.safe_pipeline()(**kwargs, **SLD_PRESETS[request.safety])
        images = np.asarray(out.images)  # (N, H, W, 3) float in [0, 1]
        pixels = (np.clip(np.nan_to_num(images), 0, 1) * 255).round().astype(np.uint8)
        return Rendering(list(pixels), seed, width, height, self.truncation_warnings(request))

    def generate(self, request: GenerationRequest) -> list[np.ndarray]:
        """The request's images as uint8 (H, W, 3) arrays. Unmoderated: use ``pipeline.moderate`` to serve them."""
        return self.render(request).images

    def info(self) -> dict[str, Any]:
        return {
            "model": self.source,
            "text_encoder": self.text_encoder_source,
            "fingerprint": self.fingerprint,
            "demo_weights": self.demo,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "native_size": self.native_size,
            "limits": self.limits.__dict__,
        }
