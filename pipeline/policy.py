"""What happens to a flagged image: ``block`` (no pixels leave), ``blur`` (unrecoverably blurred) or ``black``.

Fail closed: an image whose verdict has an error (it was not scored) is always blocked, whatever the policy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image, ImageFilter

from .errors import InvalidInput

if TYPE_CHECKING:
    from .checker import Verdict

ImagePolicy = Literal["block", "blur", "black"]
POLICIES: tuple[str, ...] = ("block", "blur", "black")
BLUR_KEEP_PIXELS = 16  # a blurred image keeps at most this many pixels of information on its short side


def check_policy(policy: str) -> ImagePolicy:
    if policy not in POLICIES:
        raise InvalidInput(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    return policy  # type: ignore[return-value]


def blur(image: np.ndarray) -> np.ndarray:
    """Strong, unrecoverable blur: downsample to ≤16 px on the short side, upsample, then Gaussian-blur."""
    h, w = image.shape[:2]
    scale = BLUR_KEEP_PIXELS / min(h, w)
    small = Image.fromarray(image).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BOX)
    big = small.resize((w, h), Image.BICUBIC).filter(ImageFilter.GaussianBlur(radius=max(2, max(h, w) / 32)))
    return np.asarray(big, dtype=np.uint8)


def apply_policy(image: np.ndarray, verdict: Verdict, policy: ImagePolicy) -> tuple[str, np.ndarray | None]:
    """-> (action, pixels to release or None). Actions: allow | block | blur | black."""
    if verdict.error is not None:
        return "block", None
    if not verdict.nsfw:
        return "allow", image
    if policy == "blur":
        return "blur", blur(image)
    if policy == "black":
        return "black", np.zeros_like(image)
    return "block", None
