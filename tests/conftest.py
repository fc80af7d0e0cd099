"""Shared fixtures. Tests are marked unit / integration / e2e by the folder they live in."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(items):
    for item in items:
        for kind in ("unit", "integration", "e2e"):
            if f"{Path('tests') / kind}" in str(item.fspath):
                item.add_marker(getattr(pytest.mark, kind))


def varied_images(n: int, seed: int = 0) -> list[Image.Image]:
    """Seeded pictures of varied sizes, aspect ratios and content (noise, gradients, blocks, solid)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(40, 420, size=2))
        kind = i % 4
        if kind == 0:
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        elif kind == 1:
            y, x = np.mgrid[0:h, 0:w]
            c = rng.uniform(0.2, 1.0, 3)
            arr = (np.stack([x / w, y / h, (x + y) / (w + h)], -1) * 255 * c).astype(np.uint8)
        elif kind == 2:
            small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            arr = np.asarray(Image.fromarray(small).resize((w, h), Image.NEAREST))
        else:
            arr = np.full((h, w, 3), rng.integers(0, 256, 3), dtype=np.uint8)
        out.append(Image.fromarray(arr))
    return out


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="session")
def tiny_checker_dir() -> Path:
    from pipeline.models import tiny_path

    return tiny_path("checker")


@pytest.fixture(scope="session")
def checker():
    from pipeline import SafetyChecker

    return SafetyChecker.load("tiny", device="cpu", dtype="float32")
