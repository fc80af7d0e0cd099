"""Randomly initialised checkers with real CLIP vision architectures, and the images the benchmarks score.

The weights are random (verdicts mean nothing) but the architecture, and so the cost, is the real one. Thresholds
are set at high quantiles of the concept cosines over a calibration set drawn like (but not equal to) the benchmark
images, so both decisions occur and agreement numbers mean something.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.hf import cache_root, quiet_libraries
from pipeline.preprocess import processor_class
from pipeline.tiny import random_checker, varied_images


@dataclass(frozen=True)
class Arch:
    name: str
    vision: dict[str, Any]  # CLIPVisionConfig fields
    projection_dim: int

    @property
    def label(self) -> str:
        return {"vit-l-14": "ViT-L/14", "vit-b-32": "ViT-B/32"}[self.name]


ARCHS = {
    # CompVis/stable-diffusion-safety-checker: CLIP ViT-L/14 vision tower, 224 px, projection 768.
    "vit-l-14": Arch(
        "vit-l-14",
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14),
        768,
    ),
    # openai/clip-vit-base-patch32 (the CLIP seed's architecture): the fast case.
    "vit-b-32": Arch(
        "vit-b-32",
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=32),
        512,
    ),
}
VERSION = "1"
CALIBRATION_SEED = 99  # the calibration pictures; the benchmark images use other seeds


def model_dir(arch: str) -> Path:
    """A ``save_pretrained`` checker directory for ``arch`` (built once, seeded, under the diffguard cache)."""
    spec = ARCHS[arch]
    target = cache_root() / "bench" / VERSION / arch
    if (target / "model.safetensors").exists():
        return target
    import torch

    quiet_libraries()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{arch}-", dir=target.parent))
    try:
        processor = processor_class()()
        probe = processor(varied_images(64, seed=CALIBRATION_SEED), return_tensors="pt").pixel_values
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = random_checker({**spec.vision, "image_size": 224}, spec.projection_dim, probe=probe)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def images(n: int, seed: int = 1, size: int | None = None) -> list[Image.Image]:
    """Seeded varied pictures (noise, gradients, blocks, solid; varied sizes, or all ``size`` x ``size``)."""
    out = varied_images(n, seed=seed)
    return out if size is None else [im.resize((size, size), Image.BILINEAR) for im in out]


def pngs(pictures: list[Image.Image]) -> list[bytes]:
    out = []
    for im in pictures:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def arrays(pictures: list[Image.Image]) -> list[np.ndarray]:
    return [np.asarray(im) for im in pictures]
