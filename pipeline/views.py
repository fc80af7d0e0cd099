"""One object -> the views a person sees, each an RGB array scored in the same batch as every other image.

What a viewer shows is more than the first 224×224 of the first frame Pillow decodes, so an object becomes views:

- **frames and pages**: every frame of animated GIF, APNG and animated WebP (composed with disposal and blending by
  Pillow, as a browser does), every page of a multi-page TIFF, every image of an MPO, every size of an ICO, and video
  frames sampled at ``video_fps`` per second of display time plus the first and last (:mod:`pipeline.video`).
  Identical consecutive frames are one view. Past ``max_views`` the frames are sampled evenly over display time and
  the object says ``sampled``.
- **alpha**: a frame with any pixel less than opaque is composited over white and over black (light and dark pages;
  viewers' checkerboards sit between them), in sRGB as browsers blend. An opaque RGBA frame is one view.
- **colour**: embedded ICC profiles and PNG's sRGB/gAMA/cHRM are applied first (:mod:`pipeline.color`).
- **the whole picture**: the checker resizes the short side and centre-crops; when the long side at that scale
  exceeds ``TILE_BEYOND`` × the crop, the crop would leave more than an eighth of each end unseen, so the frame is
  also scored as tiles of the crop's size along its long side (the last flush with the end). The centre crop stays
  the first view: an opaque single-frame image of ordinary aspect ratio is one view, exactly as diffusers scores it.
  A uint8 array (a generated image) is composed pixels: one view, scored whole (two when it has translucent pixels).
- **formats**: whatever Pillow opens (PNG, JPEG, GIF, WebP, TIFF, BMP, ICO, MPO, AVIF, and HEIC/HEIF and JPEG XL
  through their plugins), SVG rasterised in a sandboxed renderer (:mod:`pipeline.svg`), video through PyAV. A plain
  PNG or JPEG is decoded by libspng or libjpeg-turbo instead, to Pillow's exact pixels (:mod:`pipeline.fastdecode`).

The frames of a multi-frame object are kept at the checker's scale as they decode (:meth:`Preprocess.resize`, the
checker's own kernel, so scoring them equals scoring the full frames), at most ``KEPT_FRAMES`` × ``max_views`` of them
(past that, neighbouring frames merge into the one shown longer), so memory is bounded whatever the frame count; a
single frame stays whole. Every view has a
label naming where it is (``frame 12 @ 1.50 s``, ``page 2``, ``over white``, ``tile 3/3``, joined by ", "); an object
whose only view is the image itself has the label None. Ray-free: the CLI, the Serve replicas and the scan's stages
all call :func:`load_views`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .color import to_srgb
from .errors import ImageDecodeError
from .fastdecode import fast_frame
from .images import DecodeLimits, check_pixels, decode_pil, from_array, open_image, read_path
from .preprocess import Preprocess

TILE_BEYOND = 4 / 3  # tiles when the long side at the checker's scale exceeds this many crops (the crop sees < 3/4)
KEPT_FRAMES = 4  # a multi-frame object holds at most this many × max_views distinct frames while it decodes
MIN_FRAME_MS = 100  # browsers show GIF frames of <= 10 ms (and 0) for 100 ms; every animation here is timed so
_PAGED = {"TIFF": "page", "MPO": "image"}  # multi-frame formats whose frames are pages, not moments


@dataclass(frozen=True)
class View:
    array: np.ndarray  # RGB uint8 (H, W, 3)
    label: str | None  # where it is in the object; None: the object's only view, the image itself


@dataclass
class Viewed:
    """One object's views: what is scored, how many it has, whether they were sampled, whether it was truncated."""

    views: list[View]
    total: int  # views the object has (consecutive identical frames counted once); > len(views) when sampled
    sampled: bool = False
    truncated: bool = False  # a truncated file, scored on what decodes (what a browser shows)

    @classmethod
    def single(cls, array: np.ndarray, truncated: bool = False) -> Viewed:
        return cls([View(array, None)], 1, False, truncated)


@dataclass
class _Frame:
    layers: list[tuple[np.ndarray, str | None]]  # RGB uint8 (H, W, 3) as shown: itself, or over white and over black
    label: str | None
    start: float  # display time in seconds
    duration: float = 0.0  # display time it stands for (its own, plus that of frames merged into it)
    views: list[View] = field(default_factory=list)
    shown: float = 0.0  # its own display time: which of two frames a merge keeps

    def same(self, other: _Frame) -> bool:
        return len(self.layers) == len(other.layers) and all(
            a.shape == b.shape and np.array_equal(a, b)
            for (a, _), (b, _) in zip(self.layers, other.layers, strict=True)
        )


def _frame(arr: np.ndarray, label: str | None, start: float, duration: float, shrink: Preprocess | None) -> _Frame:
    """A decoded frame (RGB, or RGBA with translucent pixels) as the layers a person sees; with ``shrink`` (a frame of
    many) each layer is kept at the checker's scale when it is larger (scores unchanged: the checker's own kernel)."""
    layers = _backgrounds(arr)
    if shrink is not None and min(arr.shape[:2]) > shrink.shortest_edge:
        layers = [(shrink.resize(a), background) for a, background in layers]
    return _Frame(layers, label, start, duration, shown=duration)


def _keep(frames: list[_Frame], frame: _Frame, cap: int) -> None:
    """Append ``frame`` to a multi-frame object's frames as it is decoded, holding at most ``cap`` in memory: an
    identical consecutive frame only lengthens the previous one; past ``cap``, neighbouring pairs are merged into the
    one shown longer (their times summed), so what a viewer sees longest survives and memory stays bounded."""
    if frames and frames[-1].same(frame):
        frames[-1].duration += frame.duration
        frames[-1].shown += frame.shown
        return
    frames.append(frame)
    if len(frames) > cap:
        merged = []
        for a, b in zip(frames[0::2], frames[1::2], strict=False):
            kept = a if a.shown >= b.shown else b
            kept.duration = a.duration + b.duration
            kept.start = a.start
            merged.append(kept)
        if len(frames) % 2:
            merged.append(frames[-1])
        frames[:] = merged


# --- frames ----------------------------------------------------------------------------------------------------------
def _array(im: Image.Image) -> np.ndarray:
    """A colour-managed frame -> (H, W, 3) RGB, or (H, W, 4) RGBA only when some pixel is less than opaque."""
    arr = np.asarray(to_srgb(im), dtype=np.uint8)
    if arr.shape[2] == 4 and arr[..., 3].min() == 255:
        return arr[..., :3]
    return arr


def _pil_frames(im: Image.Image, limits: DecodeLimits, started: float) -> Iterator[tuple[Image.Image, str, float]]:
    """(frame, label, duration in seconds) for every frame/page of a multi-frame Pillow image, composed."""
    kind = _PAGED.get(im.format or "", "frame")
    t = 0.0
    for i in range(im.n_frames):
        im.seek(i)
        im.load()
        if time.monotonic() - started > limits.max_decode_s:
            raise ImageDecodeError(f"decoding took over {limits.max_decode_s:g} s (max_decode_s) at {kind} {i + 1}")
        frame = ImageOps.exif_transpose(im) if kind != "frame" else im
        duration = float(im.info.get("duration") or 0)
        duration = MIN_FRAME_MS if duration <= 10 else duration
        label = f"{kind} {i + 1}" if kind != "frame" else f"frame {i + 1} @ {t:.2f} s"
        yield frame, label, duration / 1000
        t += duration / 1000


def _ico_frames(im: Image.Image, limits: DecodeLimits) -> Iterator[tuple[Image.Image, str, float]]:
    sizes = sorted(im.ico.sizes(), key=lambda s: s[0] * s[1], reverse=True)  # type: ignore[attr-defined]
    for w, h in sizes:
        frame = im.ico.getimage((w, h))  # type: ignore[attr-defined]
        yield frame, f"size {frame.width}x{frame.height}", 0.0


def _budget(frames: int, width: int, height: int, limits: DecodeLimits, what: str) -> None:
    total = frames * width * height
    if total > limits.max_decoded_pixels:
        raise ImageDecodeError(
            f"{what} has {frames} frames of {width}x{height} = {total / 1e9:.2f} G decoded pixels, over the limit of "
            f"{limits.max_decoded_pixels / 1e9:.2f} G (raise max_decoded_pixels to allow it)"
        )


def _image_frames(data: bytes, limits: DecodeLimits, geometry: Preprocess) -> tuple[list[_Frame], bool]:
    """Encoded image bytes -> its frames (sRGB) and whether the file was truncated."""
    if (arr := fast_frame(data, limits)) is not None:  # a plain PNG or JPEG: Pillow's pixels, decoded without Pillow
        return [_frame(arr, None, 0.0, 0.0, None)], False
    return _frames_of(open_image(data, limits), data, limits, geometry)


def _frames_of(
    im: Image.Image, data: bytes | None, limits: DecodeLimits, geometry: Preprocess
) -> tuple[list[_Frame], bool]:
    """An opened Pillow image (from ``data``, or given by a caller: None) -> its frames and truncation."""
    started = time.monotonic()
    frames = getattr(im, "n_frames", 1)
    if im.format == "ICO":
        sizes = im.ico.sizes()  # type: ignore[attr-defined]
        _budget(len(sizes), *max(sizes, key=lambda s: s[0] * s[1]), limits, "the icon")
        if len(sizes) > 1:
            return [_frame(_array(f), label, 0.0, 0.0, geometry) for f, label, _ in _ico_frames(im, limits)], False
    if frames <= 1:
        if data is None:
            check_pixels(*im.size, limits)
            return [_frame(_array(ImageOps.exif_transpose(im)), None, 0.0, 0.0, None)], False
        frame, truncated = decode_pil(data, limits)
        return [_frame(_array(frame), None, 0.0, 0.0, None)], truncated
    _budget(frames, *im.size, limits, f"the {im.format} image")
    out: list[_Frame] = []
    t, truncated = 0.0, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            for frame, label, duration in _pil_frames(im, limits, started):
                _keep(out, _frame(_array(frame), label, t, duration, geometry), KEPT_FRAMES * limits.max_views)
                t += duration
    except ImageDecodeError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        if not out and data is not None:  # the first frame itself is broken: the single-frame decoder's rules
            frame, truncated = decode_pil(data, limits)
            return [_frame(_array(frame), None, 0.0, 0.0, None)], truncated
        if "truncated" not in str(exc).lower() and not isinstance(exc, EOFError):
            raise ImageDecodeError(f"corrupt {im.format} image at frame {len(out) + 1}: {exc}") from None
        truncated = True  # a browser shows the frames that decode
    return out, truncated


# --- views of frames -------------------------------------------------------------------------------------------------
def _backgrounds(arr: np.ndarray) -> list[tuple[np.ndarray, str | None]]:
    """An RGBA array -> composited over white and over black; RGB -> itself."""
    if arr.shape[2] == 3:
        return [(arr, None)]
    rgb, alpha = arr[..., :3].astype(np.uint16), arr[..., 3:].astype(np.uint16)  # (H, W, 3), (H, W, 1)
    over = [((rgb * alpha + bg * (255 - alpha) + 127) // 255).astype(np.uint8) for bg in (255, 0)]
    return [(over[0], "over white"), (over[1], "over black")]


def _tiles(arr: np.ndarray, geometry: Preprocess) -> list[tuple[np.ndarray, str]]:
    """Tiles of the crop's size along the long side at the checker's scale, when the centre crop would leave more
    than an eighth of either end unseen (see the module docstring); [] otherwise."""
    ch, cw = geometry.crop
    nh, nw = geometry.output_size(*arr.shape[:2])
    wide = nw / cw
    if max(nh / ch, wide) <= TILE_BEYOND:
        return []
    small = geometry.resize(arr)  # (nh, nw, 3) at the checker's scale: each tile is scored without a resize
    length, crop = (nw, cw) if wide >= nh / ch else (nh, ch)
    n = -(-length // crop)
    starts = [k * crop for k in range(n - 1)] + [length - crop]
    if length == nw:
        return [(small[:, x : x + cw], f"tile {k + 1}/{n}") for k, x in enumerate(starts)]
    return [(small[y : y + ch], f"tile {k + 1}/{n}") for k, y in enumerate(starts)]


def _join(*parts: str | None) -> str | None:
    text = ", ".join(p for p in parts if p)
    return text or None


def _frame_views(frame: _Frame, geometry: Preprocess) -> list[View]:
    views = []
    for arr, background in frame.layers:
        views.append(View(arr, _join(frame.label, background)))
        views += [View(t, _join(frame.label, background, name)) for t, name in _tiles(arr, geometry)]
    return views


def _distinct(frames: list[_Frame]) -> list[_Frame]:
    """Consecutive identical frames are one: the first, shown for their summed duration."""
    out: list[_Frame] = []
    for f in frames:
        if out and out[-1].same(f):
            out[-1].duration += f.duration
            continue
        out.append(f)
    return out


def _sample(frames: list[_Frame], keep: int) -> list[_Frame]:
    """``keep`` frames evenly over display time: the frame shown at the middle of each of ``keep`` equal spans, the
    first always included (a frame shown longer is proportionally likelier to be taken, as a viewer sees it)."""
    ends = np.cumsum([max(f.duration, 1e-6) for f in frames])
    span = ends[-1] / keep
    at = np.searchsorted(ends, (np.arange(keep) + 0.5) * span, side="right")
    chosen = sorted({0, *np.minimum(at, len(frames) - 1).tolist()})
    return [frames[i] for i in chosen]


def frames_to_views(frames: list[_Frame], geometry: Preprocess, limits: DecodeLimits, truncated: bool) -> Viewed:
    frames = _distinct(frames)
    if len(frames) == 1 and frames[0].label is not None and not frames[0].label.startswith("size"):
        frames[0].label = None  # an animation of one distinct frame is that image
    for f in frames:
        f.views = _frame_views(f, geometry)
    total = sum(len(f.views) for f in frames)
    if total <= limits.max_views:
        return Viewed([v for f in frames for v in f.views], total, False, truncated)
    per_frame = max(len(f.views) for f in frames)
    chosen = _sample(frames, max(1, limits.max_views // per_frame)) if len(frames) > 1 else frames
    views = [v for f in chosen for v in f.views]
    if len(views) > limits.max_views:  # one frame alone has more tiles than the budget: evenly over them
        views = [views[i] for i in np.linspace(0, len(views) - 1, limits.max_views).round().astype(int)]
    return Viewed(views, total, True, truncated)


def view_rules(limits: DecodeLimits, over_view_budget: str) -> dict[str, Any]:
    """The rules that turn an object into views, as the checker's fingerprint and ``info()`` name them."""
    return {
        "max_views": limits.max_views,
        "video_fps": limits.video_fps,
        "max_decoded_pixels": limits.max_decoded_pixels,
        "tile_beyond": round(TILE_BEYOND, 6),
        "over_view_budget": over_view_budget,
    }


# --- objects ---------------------------------------------------------------------------------------------------------
def _video_views(data: bytes, limits: DecodeLimits, geometry: Preprocess) -> Viewed:
    from .video import video_frames

    got = video_frames(data, limits, resize=geometry.resize)
    frames = [_Frame([(arr, None)], f"frame @ {t:.2f} s", t) for arr, t in got.frames]
    for f, nxt in zip(frames, [*frames[1:], None], strict=True):
        f.duration = (nxt.start if nxt is not None else max(got.duration_s, f.start + 1e-3)) - f.start
    viewed = frames_to_views(frames, geometry, limits, False)
    if got.thinned:  # more samples at the rate than max_views: PyAV's sampler halved the rate until they fit
        viewed.sampled, viewed.total = True, max(viewed.total, got.rate_samples)
    return viewed


def decode_views(data: bytes, limits: DecodeLimits, geometry: Preprocess) -> Viewed:
    """Encoded bytes of any format read here -> :class:`Viewed`; :class:`ImageDecodeError` when nothing can be
    scored (the error says why)."""
    from .svg import is_svg, render_svg
    from .video import is_video

    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageDecodeError(
            f"object is {len(data):,} bytes, over the limit of {limits.max_bytes:,} bytes (raise max_object_bytes "
            "to allow it)"
        )
    if is_svg(data):
        data = render_svg(data, limits)
    elif is_video(data):
        return _video_views(data, limits, geometry)
    frames, truncated = _image_frames(data, limits, geometry)
    return frames_to_views(frames, geometry, limits, truncated)


def object_views(item: Any, limits: DecodeLimits, geometry: Preprocess) -> Viewed:
    """One input of any accepted kind (encoded bytes, a path, a PIL image, a uint8 array) -> its views."""
    if isinstance(item, Viewed):
        return item
    if isinstance(item, ImageDecodeError):  # decoded elsewhere, and failed there
        raise item
    if isinstance(item, bytes | bytearray | memoryview):
        return decode_views(bytes(item), limits, geometry)
    if isinstance(item, str | Path):
        return decode_views(read_path(item, limits), limits, geometry)
    if isinstance(item, np.ndarray):  # composed pixels (a generated image): scored whole, as diffusers does
        arr = from_array(item, limits, keep_alpha=True)
        if arr.shape[2] == 4 and arr[..., 3].min() == 255:
            arr = arr[..., :3]
        views = [View(a, label) for a, label in _backgrounds(arr)]
        return Viewed(views, len(views))
    if isinstance(item, Image.Image):
        frames, _ = _frames_of(item, None, limits, geometry)
        return frames_to_views(frames, geometry, limits, False)
    raise ImageDecodeError(f"unsupported image input of type {type(item).__name__}; use bytes, PIL or uint8 array")


# CLIP's own transform (every checker shipped or built here: ViT-L/14 and the tiny one): the review app, which holds no
# checker, finds the view a scan named with it.
CLIP_GEOMETRY = Preprocess(224, (224, 224), (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def find_view(data: bytes, limits: DecodeLimits, label: str | None, geometry: Preprocess = CLIP_GEOMETRY) -> View:
    """The view of ``data`` named ``label`` (as a verdict's ``view`` names it); the first view when the label is None
    or no longer found (another checker's transform, other limits). :class:`ImageDecodeError` if nothing decodes."""
    from dataclasses import replace

    viewed = decode_views(data, replace(limits, max_views=max(limits.max_views, 4096)), geometry)
    return next((v for v in viewed.views if v.label == label), viewed.views[0])


def load_views(items: list[Any], limits: DecodeLimits, geometry: Preprocess) -> list[Viewed | ImageDecodeError]:
    """Decode a batch into views; each failure becomes that item's :class:`ImageDecodeError`, never the batch's."""
    out: list[Viewed | ImageDecodeError] = []
    for item in items:
        try:
            out.append(object_views(item, limits, geometry))
        except ImageDecodeError as exc:
            out.append(exc)
    return out
