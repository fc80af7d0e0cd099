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
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import models
from .devices import resolve_device, resolve_dtype, weights_digest
from .errors import InvalidInput
from .hf import dtype_kwargs, quiet_libraries
from .requests import MAX_SEED, SLD_PRESETS, GenerationLimits, GenerationRequest

__all__ = ["MAX_SEED", "SLD_PRESETS", "GenerationLimits", "GenerationRequest", "Generator", "Rendering"]

log = logging.getLogger(__name__)


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
        quiet_libraries()
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
            **dtype_kwargs(torch_dtype),
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
            # Under the lock too: the tokenizer is shared and a call sets its padding/truncation state for everyone.
            notes = self.truncation_warnings(request)
            if request.safety == "off":
                out = self.pipe(**kwargs)
            else:
                with warnings.catch_warnings():  # the deprecated pipeline warns on every call
                    warnings.simplefilter("ignore", FutureWarning)
                    out = self.safe_pipeline()(**kwargs, **SLD_PRESETS[request.safety])
        images = np.asarray(out.images)  # (N, H, W, 3) float in [0, 1]
        pixels = (np.clip(np.nan_to_num(images), 0, 1) * 255).round().astype(np.uint8)
        return Rendering(list(pixels), seed, width, height, notes)

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
