"""Synthetic labelled image sets whose classes differ visibly (colour and texture), so even random-weight
embeddings separate them. Used by the policy evaluation and calibration tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def _safe(rng: np.random.Generator, size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / size
    a, b = rng.uniform(0.3, 1.0, 2)
    return (np.stack([0.2 * x, a * y, b * (1 - x * y)], -1) * 255).astype(np.uint8)


def _violence(rng: np.random.Generator, size: int) -> np.ndarray:
    arr = rng.integers(0, 90, (size, size, 3))
    arr[..., 0] = rng.integers(150, 256, (size, size))
    return arr.astype(np.uint8)


def _sexual(rng: np.random.Generator, size: int) -> np.ndarray:
    block = rng.integers(0, 40, (8, 8, 3)) + np.array([200, 150, 120])
    arr = np.asarray(Image.fromarray(np.clip(block, 0, 255).astype(np.uint8)).resize((size, size), Image.BICUBIC))
    return arr


MAKERS = {"safe": _safe, "violence": _violence, "sexual": _sexual}


def write_labelled(root: Path, counts: dict[str, int], seed: int = 0, size: int = 64) -> Path:
    rng = np.random.default_rng(seed)
    for label, n in counts.items():
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(MAKERS[label](rng, size)).save(folder / f"{label}-{i}.png")
    return root


def write_policy(path: Path, examples: Path, action: str = "block") -> Path:
    path.write_text(
        f"""version: 1
name: synthetic
nsfw_action: block
categories:
  violence:
    action: {action}
    concepts:
      - images: {examples / "violence"}
  sexual:
    action: flag
    concepts:
      - images: {examples / "sexual"}
"""
    )
    return path
