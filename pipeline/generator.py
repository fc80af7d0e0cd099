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

    def batch_key(self, request: GenerationRequest) -> tuple[Any, ...]:
        """Requests with equal keys can share one pipeline call: size, steps, guidance and SLD preset (the scheduler
        is the pipeline's own, so it is the same for all). Prompts, negative prompts, seeds and image counts differ."""
        width, height = request.width or self.native_size, request.height or self.native_size
        return (width, height, request.steps, float(request.guidance_scale), request.safety)

    def render(self, request: GenerationRequest) -> Rendering:
        """Generate the request's images (uint8 HWC) with the seed that reproduces them."""
        return self.render_many([request])[0]

    def render_many(self, requests: list[GenerationRequest]) -> list[Rendering]:
        """Render compatible requests (equal :meth:`batch_key`) in one pipeline call, one Rendering per request.

        Each request's initial latents are drawn from its own seed exactly as when it is rendered alone, and every
        image gets its own generator for any per-step noise, so a request's images match its unbatched render up to
        the reduction order of the batched kernels. Raises ``InvalidInput`` for incompatible requests.
        """
        if not requests:
            return []
        for request in requests:
            request.check(self.limits)
        key = self.batch_key(requests[0])
        if any(self.batch_key(r) != key for r in requests[1:]):
            keys = sorted({str(self.batch_key(r)) for r in requests})
            raise InvalidInput(
                f"requests rendered together need equal (width, height, steps, guidance, safety); got {keys}"
            )
        width, height, steps, guidance, safety = key
        seeds = [r.seed if r.seed is not None else secrets.randbelow(MAX_SEED + 1) for r in requests]
        prompts = [r.prompt for r in requests for _ in range(r.num_images)]
        negatives = [r.negative_prompt or "" for r in requests for _ in range(r.num_images)]  # None encodes as ""
        with self._lock, torch.inference_mode():
            # Under the lock too: the tokenizer is shared and a call sets its padding/truncation state for everyone.
            notes = [self.truncation_warnings(r) for r in requests]
            latents = torch.cat(
                [self._initial_latents(r, s, width, height) for r, s in zip(requests, seeds, strict=True)]
            )
            kwargs: dict[str, Any] = dict(
                prompt=prompts,
                negative_prompt=negatives,
                num_inference_steps=steps,
                guidance_scale=guidance,
                width=width,
                height=height,
                latents=latents,  # (N, C, h, w): each request's own, drawn as when it renders alone
                # per-image noise for stochastic schedulers (image i of a request: seed + i)
                generator=[
                    torch.Generator("cpu").manual_seed((s + i) % (MAX_SEED + 1))
                    for r, s in zip(requests, seeds, strict=True)
                    for i in range(r.num_images)
                ],
                output_type="np",
            )
            if safety == "off":
                out = self.pipe(**kwargs)
            else:
                with warnings.catch_warnings():  # the deprecated pipeline warns on every call
                    warnings.simplefilter("ignore", FutureWarning)
                    out = self.safe_pipeline()(**kwargs, **SLD_PRESETS[safety])
        images = np.asarray(out.images)  # (N, H, W, 3) float in [0, 1]
        pixels = list((np.clip(np.nan_to_num(images), 0, 1) * 255).round().astype(np.uint8))
        renderings, start = [], 0
        for request, seed, note in zip(requests, seeds, notes, strict=True):
            stop = start + request.num_images
            renderings.append(Rendering(pixels[start:stop], seed, width, height, note))
            start = stop
        return renderings

    def _initial_latents(self, request: GenerationRequest, seed: int, width: int, height: int) -> torch.Tensor:
        """The request's latents as diffusers' ``prepare_latents`` draws them from one CPU generator (unscaled)."""
        from diffusers.utils.torch_utils import randn_tensor

        scale = self.pipe.vae_scale_factor
        shape = (request.num_images, self.pipe.unet.config.in_channels, height // scale, width // scale)
        generator = torch.Generator("cpu").manual_seed(seed)  # CPU noise: same latents on every device
        return randn_tensor(shape, generator=generator, device=self.device, dtype=self.pipe.text_encoder.dtype)

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
