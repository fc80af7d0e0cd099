"""Shared fixtures. Tests are marked unit / integration / e2e by the folder they live in."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from PIL import Image

from pipeline.tiny import varied_images  # noqa: F401 - tests take it from here too

ROOT = Path(__file__).resolve().parent.parent
# A warning or an error in a CLI's output, as Python's logging, Ray's Python loggers and Ray's C++ core print them, or
# relayed by Ray from the raylet (what a person must never be shown unless it is a real problem: issue 27)
ALARM = re.compile(r"\b(WARNING|ERROR|CRITICAL|Traceback)\b|^\[[^\]]* [WEF] \d+ \d+\]|\(raylet\)")


def pytest_collection_modifyitems(items):
    for item in items:
        for kind in ("unit", "integration", "e2e"):
            if f"{Path('tests') / kind}" in str(item.fspath):
                item.add_marker(getattr(pytest.mark, kind))


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="session")
def tiny_checker_dir() -> Path:
    from pipeline.tiny import tiny_path

    return tiny_path("checker")


@pytest.fixture(scope="session")
def checker():
    from pipeline import SafetyChecker

    return SafetyChecker.load("tiny", device="cpu", dtype="float32")
