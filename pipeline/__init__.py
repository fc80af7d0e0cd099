"""diffguard's core: the exact, batched Stable Diffusion safety checker and everything it needs. No Ray, no HTTP.

Names are imported lazily, so ``import pipeline.errors`` (or a Serve config import) never pulls in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SafetyChecker": "checker",
    "CheckerSpec": "spec",
    "Scores": "verdict",
    "Verdict": "verdict",
    "Generator": "generator",
    "GenerationRequest": "requests",
    "GenerationLimits": "requests",
    "DiffguardError": "errors",
    "ImageDecodeError": "errors",
    "InvalidInput": "errors",
    "ModelSourceError": "errors",
    "DecodeLimits": "images",
    "decode_image": "images",
    "load_image": "images",
    "View": "views",
    "Viewed": "views",
    "load_views": "views",
    "media_format": "media",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
