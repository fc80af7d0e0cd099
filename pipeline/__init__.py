"""diffguard's core: the exact, batched Stable Diffusion safety checker and everything it needs. No Ray, no HTTP."""

from .checker import SafetyChecker, Scores, Verdict
from .errors import DiffguardError, ImageDecodeError, InvalidInput, ModelSourceError
from .images import DecodeLimits, decode_image, load_image

__all__ = [
    "DecodeLimits",
    "DiffguardError",
    "ImageDecodeError",
    "InvalidInput",
    "ModelSourceError",
    "SafetyChecker",
    "Scores",
    "Verdict",
    "decode_image",
    "load_image",
]
