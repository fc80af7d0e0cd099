"""Bytes, PIL images or arrays -> validated RGB uint8 arrays (H, W, 3), one decoding path for every adapter.

Each input either becomes an array or an :class:`ImageDecodeError` naming what was wrong; one bad image never
affects its neighbours.
"""

from __future__ import annotations

import io
import types
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .color import to_srgb
from .errors import ImageDecodeError
from .fastdecode import fast_frame

ImageFile.LOAD_TRUNCATED_IMAGES = False  # the global stays off: truncation is tolerated per call (see decode)

DEFAULT_MAX_PIXELS = 40_000_000
# 256 MiB: a 40 MP (the pixel limit) 8-bit RGBA image stored uncompressed is 160 MB, so no image the pixel limit
# admits is refused for its size, while one reader never holds more than this in memory for one object.
DEFAULT_MAX_OBJECT_BYTES = 256 * 1024 * 1024
SNIFF_BYTES = 64 * 1024  # leading bytes a ranged read fetches to identify an object
MIN_TRUNCATED_FRACTION = 0.01  # a truncated image is scored only if this share of its rows holds decoded data
IMAGE_SUFFIXES = frozenset(  # named like something a browser or phone shows (content decides; names only hint)
    {".png", ".apng", ".jpg", ".jpeg", ".jfif", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".ico"}
    | {".mpo", ".avif", ".heic", ".heif", ".jxl", ".svg", ".svgz"}
    | {".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".3gp", ".ogv"}
)


DEFAULT_MAX_DECODED_PIXELS = 2_000_000_000  # every frame of one object: ~a minute of 720p video at 30 fps
DEFAULT_MAX_DECODE_S = 60.0
DEFAULT_MAX_VIEWS = 64
DEFAULT_VIDEO_FPS = 2.0


@dataclass(frozen=True)
class DecodeLimits:
    """What one object may cost to decode, and how many of its views are scored (see :mod:`pipeline.views`)."""

    max_pixels: int = DEFAULT_MAX_PIXELS  # width × height of one frame, page or canvas above which it is refused
    max_bytes: int = DEFAULT_MAX_OBJECT_BYTES  # encoded size above which an object is refused unread
    max_decoded_pixels: int = DEFAULT_MAX_DECODED_PIXELS  # every frame decoded for one object, summed (from headers)
    max_decode_s: float = DEFAULT_MAX_DECODE_S  # wall-clock decode budget of one object (video, SVG)
    max_views: int = DEFAULT_MAX_VIEWS  # views scored per object; beyond it frames are sampled over display time
    video_fps: float = DEFAULT_VIDEO_FPS  # video frames sampled per second of display time (+ the first and last)


@dataclass(frozen=True)
class ImageHeader:
    """What the first bytes of an object say: Pillow's format name and, when the prefix held it, the size."""

    format: str  # Pillow's format name ("PNG", "JPEG", "GIF", ...)
    width: int | None  # None when a prefix ended before the size was known
    height: int | None

    @property
    def pixels(self) -> int | None:
        return None if self.width is None or self.height is None else self.width * self.height


@dataclass(frozen=True)
class Decoded:
    """One decoded image: RGB uint8 (H, W, 3), and whether it came from a truncated file (scored on what decodes)."""

    array: np.ndarray
    truncated: bool = False


_MAGIC = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}


_UNAMBIGUOUS = frozenset({"PNG", "JPEG", "GIF", "TIFF", "WEBP"})  # signatures text or other binaries never start with


def sniff_format(data: bytes) -> str | None:
    """The image format the leading bytes announce, if any."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in _MAGIC.items() if data.startswith(magic)), None)


def identify(data: bytes) -> ImageHeader | None:
    """Format (and size when present) from the bytes or a prefix of them, using Pillow's own format detection.

    Any format Pillow can open counts; None when it is not an image. Parses headers only: never decodes pixels,
    never raises, and applies no pixel limit (a decompression bomb is still identified, with its size). A prefix
    that ends inside the header still counts for the formats with an unambiguous signature (PNG, JPEG, GIF, TIFF,
    WebP: size None); for the others (whose signature is a couple of bytes, like BMP's "BM" or PPM's "P1") Pillow
    must parse the header, so that text files starting with those letters are not taken for images.
    """
    if not data:
        return None
    register_plugins()
    head = bytes(data[:16])
    for fmt in Image.ID:  # the order Image.open tries them in
        factory, accept = Image.OPEN[fmt]
        try:
            if accept is not None and not accept(head):
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                im = factory(io.BytesIO(data), "")
            width, height = im.size
            return ImageHeader(im.format or fmt, int(width), int(height))
        except Exception:  # noqa: BLE001, S112 - any plugin failure means "not this format" (or not this prefix)
            continue
    fmt = sniff_format(data)
    return ImageHeader(fmt, None, None) if fmt in _UNAMBIGUOUS else None


def _describe(data: bytes) -> str:
    head = data[:16]
    text = head.decode("ascii", "replace").strip()
    if text.lower().startswith(("<svg", "<?xml", "<!doctype", "<html")):
        return "it looks like SVG/HTML text"
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "it looks like plain text"
    return f"first bytes {head[:8].hex()}"


def check_pixels(width: int, height: int, limits: DecodeLimits) -> None:
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})")
    if width * height > limits.max_pixels:
        raise ImageDecodeError(
            f"image is {width}x{height} = {width * height / 1e6:.1f} MP, over the limit of "
            f"{limits.max_pixels / 1e6:.1f} MP (raise max_pixels to allow it)"
        )


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> sRGB uint8 (H, W, 3): its colour profile applied, any alpha composited over white."""
    return _over_white(np.asarray(to_srgb(im), dtype=np.uint8))


def _over_white(arr: np.ndarray) -> np.ndarray:
    """sRGB uint8 (H, W, 3) or (H, W, 4) -> (H, W, 3), any alpha composited over white."""
    if arr.shape[2] == 3:
        return arr
    rgb, alpha = arr[..., :3].astype(np.uint16), arr[..., 3:].astype(np.uint16)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


# Pillow's own ImageFile.load with LOAD_TRUNCATED_IMAGES true in its globals only: stop reading at the end of the
# data instead of raising, for the one image it is called on. The module-wide flag stays off, so concurrent decodes
# in other threads are unaffected (setting the global would tolerate truncation for every image in the process).
_load_truncated = types.FunctionType(
    ImageFile.ImageFile.load.__code__,
    {**vars(ImageFile), "LOAD_TRUNCATED_IMAGES": True},
    "_load_truncated",
    ImageFile.ImageFile.load.__defaults__,
)
_JPEG_EOI = b"\xff\xd9"


def register_plugins() -> None:
    """HEIC/HEIF (pillow-heif) and JPEG XL (pillow-jxl-plugin) as Pillow formats; AVIF is Pillow's own. Idempotent."""
    global _PLUGINS
    if _PLUGINS:
        return
    import pillow_heif
    import pillow_jxl  # noqa: F401 - registers the JXL format on import

    pillow_heif.register_heif_opener()
    Image.init()
    _PLUGINS = True


_PLUGINS = False


def _open(data: bytes, limits: DecodeLimits) -> Image.Image:
    register_plugins()
    im = Image.open(io.BytesIO(data))
    check_pixels(*im.size, limits)
    im.seek(0)
    return im


def _decoded_rows(im: Image.Image, fill: Image.Image) -> int:
    """Rows that differ from what an empty decode of the same header gives (bottom-up formats count too)."""
    diff = np.asarray(im.convert("RGB")) != np.asarray(fill.convert("RGB"))  # (H, W, 3)
    return int(diff.any(axis=(1, 2)).sum())


def _pixel_data_start(data: bytes, im: Image.Image) -> int:
    """Offset where the pixel data begins: the first tile's, or for JPEG the end of the first scan header."""
    if im.format == "JPEG":
        sos = data.find(b"\xff\xda")
        return len(data) if sos < 0 else sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
    return im.tile[0][2] if im.tile else len(data)


def _decode_truncated(data: bytes, limits: DecodeLimits) -> Image.Image:
    """What a browser shows of a truncated file: the rows (or progressive scans) that decode, the rest filled.

    Refused (``ImageDecodeError``) when less than ``MIN_TRUNCATED_FRACTION`` of the rows hold decoded data, e.g. a
    file cut off in its header or right after it: that is no picture to score, not a blank one.
    """
    fmt = sniff_format(data)
    body = data + _JPEG_EOI if fmt == "JPEG" and not data.endswith(_JPEG_EOI) else data  # as LOAD_TRUNCATED does
    im = _open(body, limits)
    start = _pixel_data_start(body, im)
    _load_truncated(im)
    fill = _open(body[:start] + (_JPEG_EOI if fmt == "JPEG" else b""), limits)
    try:
        _load_truncated(fill)
    except (OSError, SyntaxError, ValueError, EOFError, IndexError):
        fill = Image.new(im.mode, im.size)
    rows = _decoded_rows(im, fill)
    if rows < max(1, MIN_TRUNCATED_FRACTION * im.size[1]):
        raise ImageDecodeError(
            f"corrupt or truncated {fmt or im.format} image ({len(data)} bytes): it ends before enough image "
            f"data to score ({rows} of {im.size[1]} rows decode; at least {MIN_TRUNCATED_FRACTION:.0%} must)"
        )
    return im


@contextmanager
def _decoding(data: bytes) -> Iterator[None]:
    """Pillow's exceptions while opening or decoding ``data`` -> one :class:`ImageDecodeError` saying what is wrong."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
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


def _check_bytes(data: bytes, limits: DecodeLimits) -> None:
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    if len(data) > limits.max_bytes:
        raise _oversize(len(data), limits)


def open_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> Image.Image:
    """Encoded bytes -> a Pillow image opened lazily (headers parsed, frame size checked, no pixels decoded)."""
    _check_bytes(data, limits)
    with _decoding(data):
        return _open(data, limits)


def decode_pil(data: bytes, limits: DecodeLimits = DecodeLimits()) -> tuple[Image.Image, bool]:
    """Encoded bytes -> (the first frame as Pillow decodes it, EXIF orientation applied; truncated).

    A truncated file is decoded as far as it goes (what a browser would show; the rest is filled as Pillow's decoder
    leaves it: grey for JPEG, black or the background elsewhere) and reported as truncated, per call.
    """
    _check_bytes(data, limits)
    truncated = False
    with _decoding(data):
        im = _open(data, limits)
        try:
            im.load()
        except OSError as exc:
            if "truncated" not in str(exc).lower():
                raise
            im, truncated = _decode_truncated(data, limits), True
        im = ImageOps.exif_transpose(im)
    return im, truncated


def decode(data: bytes, limits: DecodeLimits = DecodeLimits()) -> Decoded:
    """Encoded bytes -> :class:`Decoded`: the first frame as RGB, colour-managed, alpha over white (its first view).

    Scoring goes through :func:`pipeline.views.load_views`, which sees every frame, both backgrounds and the whole
    length; this is the one-array form for callers that need a single picture (thumbnails, concept examples).
    """
    if (arr := fast_frame(data, limits)) is not None:  # a plain PNG or JPEG: Pillow's pixels, decoded without Pillow
        return Decoded(_over_white(arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)))
    im, truncated = decode_pil(data, limits)
    return Decoded(_to_rgb(im), truncated)


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """Encoded bytes -> RGB uint8 (H, W, 3) (see :func:`decode`; truncated files give what decodes)."""
    return decode(data, limits).array


def from_array(arr: np.ndarray, limits: DecodeLimits = DecodeLimits(), keep_alpha: bool = False) -> np.ndarray:
    """A uint8 array, (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> RGB uint8 (H, W, 3) (RGBA kept with
    ``keep_alpha``), without copying RGB input."""
    if arr.dtype != np.uint8:
        raise ImageDecodeError(f"array images must be uint8 HWC, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ImageDecodeError(f"array images must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {arr.shape}")
    check_pixels(arr.shape[1], arr.shape[0], limits)
    if arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2)
    return arr if keep_alpha else arr[..., :3]


def _oversize(size: int, limits: DecodeLimits) -> ImageDecodeError:
    return ImageDecodeError(
        f"image is {size:,} bytes, over the limit of {limits.max_bytes:,} bytes (raise max_object_bytes to allow it)"
    )


def read_path(path: str | Path, limits: DecodeLimits = DecodeLimits()) -> bytes:
    """A file's bytes, refused unread when over ``limits.max_bytes``."""
    try:
        if (size := Path(path).stat().st_size) > limits.max_bytes:
            raise _oversize(size, limits)
        return Path(path).read_bytes()
    except OSError as exc:
        raise ImageDecodeError(f"cannot read {path}: {exc.strerror or exc}") from None


def _load(item: Any, limits: DecodeLimits) -> Decoded:
    if isinstance(item, bytes | bytearray | memoryview):
        return decode(bytes(item), limits)
    if isinstance(item, np.ndarray):
        return Decoded(from_array(item, limits))
    if isinstance(item, Image.Image):
        check_pixels(*item.size, limits)
        return Decoded(_to_rgb(ImageOps.exif_transpose(item)))
    if isinstance(item, str | Path):
        return decode(read_path(item, limits), limits)
    raise ImageDecodeError(f"unsupported image input of type {type(item).__name__}; use bytes, PIL or uint8 array")


def load_image(item: Any, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """One input of any accepted kind (bytes, PIL image, uint8 array, path) -> RGB uint8 (H, W, 3)."""
    return _load(item, limits).array


def load_decoded(items: list[Any], limits: DecodeLimits = DecodeLimits()) -> list[Decoded | ImageDecodeError]:
    """Decode a batch, keeping each image's truncation; each failure becomes that item's :class:`ImageDecodeError`."""
    out: list[Decoded | ImageDecodeError] = []
    for item in items:
        try:
            out.append(_load(item, limits))
        except ImageDecodeError as exc:
            out.append(exc)
    return out


def load_images(items: list[Any], limits: DecodeLimits = DecodeLimits()) -> list[np.ndarray | ImageDecodeError]:
    """Decode a batch; each failure becomes that item's :class:`ImageDecodeError`, never the batch's."""
    return [d.array if isinstance(d, Decoded) else d for d in load_decoded(items, limits)]
