"""Bytes, PIL images or arrays -> validated RGB uint8 arrays (H, W, 3), one decoding path for every adapter.

Each input either becomes an array or an :class:`ImageDecodeError` naming what was wrong; one bad image never
affects its neighbours.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import ImageDecodeError

ImageFile.LOAD_TRUNCATED_IMAGES = False

DEFAULT_MAX_PIXELS = 40_000_000
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".jfif", ".ppm", ".pgm", ".ico"}
)


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int = DEFAULT_MAX_PIXELS  # width × height above which an image is refused (decompression bombs)


_MAGIC = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}


def sniff_format(data: bytes) -> str | None:
    """The image format the leading bytes announce, if any."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in _MAGIC.items() if data.startswith(magic)), None)


def _describe(data: bytes) -> str:
    head = data[:16]
    text = head.decode("ascii", "replace").strip()
    if text.lower().startswith(("<svg", "<?xml", "<!doctype", "<html")):
        return "it looks like SVG/HTML text"
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "it looks like plain text"
    return f"first bytes {head[:8].hex()}"


def _check_pixels(width: int, height: int, limits: DecodeLimits) -> None:
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})")
    if width * height > limits.max_pixels:
        raise ImageDecodeError(
            f"image is {width}x{height} = {width * height / 1e6:.1f} MP, over the limit of "
            f"{limits.max_pixels / 1e6:.1f} MP (raise max_pixels to allow it)"
        )


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> RGB uint8. 16/32-bit integers are scaled, not clipped; alpha is dropped as diffusers does."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im).astype(np.int64)
        scale = 256 if arr.max(initial=0) <= 65535 else 16_777_216
        gray = np.clip(arr // scale, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode == "F":
        gray = np.clip(np.nan_to_num(np.asarray(im)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """Encoded bytes -> RGB uint8 (H, W, 3): first frame of animations, EXIF orientation applied."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            _check_pixels(*im.size, limits)
            im.seek(0)
            im.load()
            im = ImageOps.exif_transpose(im)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"image refused as a decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        if fmt := sniff_format(data):
            raise ImageDecodeError(f"corrupt or truncated {fmt} image ({len(data)} bytes)") from None
        raise ImageDecodeError(f"not a recognised image format ({_describe(data)})") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        raise ImageDecodeError(f"corrupt or truncated image ({type(exc).__name__}: {exc})") from None
    return _to_rgb(im)


def from_array(arr: np.ndarray, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """A uint8 array, (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> RGB uint8 (H, W, 3), without copying RGB input."""
    if arr.dtype != np.uint8:
        raise ImageDecodeError(f"array images must be uint8 HWC, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ImageDecodeError(f"array images must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {arr.shape}")
    _check_pixels(arr.shape[1], arr.shape[0], limits)
    if arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2)
    return arr[..., :3]


def load_image(item: Any, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """One input of any accepted kind (bytes, PIL image, uint8 array, path) -> RGB uint8 (H, W, 3)."""
    if isinstance(item, bytes | bytearray | memoryview):
        return decode_image(bytes(item), limits)
    if isinstance(item, np.ndarray):
        return from_array(item, limits)
    if isinstance(item, Image.Image):
        _check_pixels(*item.size, limits)
        return _to_rgb(ImageOps.exif_transpose(item))
    if isinstance(item, str | Path):
        try:
            data = Path(item).read_bytes()
        except OSError as exc:
            raise ImageDecodeError(f"cannot read {item}: {exc.strerror or exc}") from None
        return decode_image(data, limits)
    raise ImageDecodeError(f"unsupported image input of type {type(item).__name__}; use bytes, PIL or uint8 array")


def load_images(items: list[Any], limits: DecodeLimits = DecodeLimits()) -> list[np.ndarray | ImageDecodeError]:
    """Decode a batch; each failure becomes that item's :class:`ImageDecodeError`, never the batch's."""
    out: list[np.ndarray | ImageDecodeError] = []
    for item in items:
        try:
            out.append(load_image(item, limits))
        except ImageDecodeError as exc:
            out.append(exc)
    return out
