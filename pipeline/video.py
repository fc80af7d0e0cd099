"""Video bytes -> a few sampled RGB frames, priced from the container header before any frame is decoded.

A video is scored on what a viewer sees: its first frame, the frame on screen every ``1 / limits.video_fps``
seconds, and its last frame. Only those frames are converted to RGB (the expensive step) and each is resized at
once, so memory stays at a few small arrays however long the video. Work is capped three ways: pixels per frame
(``max_pixels``), pixels decoded per object (``max_decoded_pixels``, estimated from the header first, then counted,
since headers can lie) and wall-clock time (``max_decode_s``). At most ``max_views`` frames are kept: past that the
samples are thinned to every other one and the sampling interval doubles, so coverage stays even.

The display matrix's rotation (``frame.rotation``, multiples of 90 degrees) is applied; its flips are not exposed by
PyAV and are ignored.

    clip = video_frames(data, DecodeLimits(), resize=lambda rgb: rgb[::4, ::4])
    for rgb, t in clip.frames:  # (H, W, 3) uint8, seconds since the first frame
        ...
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import av
import numpy as np

from .errors import ImageDecodeError

if TYPE_CHECKING:
    from .images import DecodeLimits

_VIDEO_BRANDS = frozenset(
    {b"isom", b"iso2", b"iso3", b"iso4", b"iso5", b"iso6", b"iso7", b"iso8", b"iso9", b"mp41", b"mp42", b"mp71"}
    | {b"avc1", b"M4V ", b"M4VH", b"M4VP", b"qt  ", b"3gp4", b"3gp5", b"3gp6", b"3gp7", b"3gs7", b"3ge6", b"3ge7"}
    | {b"3gg6", b"3g2a", b"3g2b", b"3g2c", b"dash", b"mmp4", b"MSNV", b"f4v ", b"f4p ", b"XAVC", b"NDAS", b"mj2s"}
)
# HEIF, AVIF and JPEG XL still images and image sequences: Pillow (pillow-heif) opens these, not the video path
_IMAGE_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"mif2", b"msf1"})
_IMAGE_BRANDS |= {b"avif", b"avis", b"avio", b"jxl ", b"crx "}
_QUICKTIME_BOXES = frozenset({b"moov", b"mdat", b"wide", b"free", b"skip"})  # old QuickTime files open without ftyp
_DEMUXERS = frozenset({"mov", "matroska", "avi", "ogg", "flv", "mpegts", "mpeg"})  # FFmpeg demuxers ever opened
DEFAULT_FPS = 25.0  # frames per second assumed when a stream states no rate


class VideoHeader(NamedTuple):
    """What a container's header says about its first video stream; None where it does not say."""

    width: int
    height: int
    duration_s: float | None
    fps: float | None


@dataclass(frozen=True)
class VideoFrames:
    """Sampled frames of one video, in time order."""

    frames: list[tuple[np.ndarray, float]]  # (RGB uint8 (H, W, 3) after `resize`, seconds since the first frame)
    duration_s: float  # the header's duration, or the last frame's time when the header has none
    width: int  # px, as displayed (after rotation), before `resize`
    height: int
    rate_samples: int = 0  # frames the sampling rate gives (first, one per 1/video_fps s, last) before any thinning
    thinned: bool = False  # over max_views: the rate was halved until the samples fit


def _ftyp_is_video(data: bytes) -> bool:
    size = int.from_bytes(data[:4], "big")
    end = min(len(data), size if 16 <= size <= 4096 else 64)
    brands = {data[8:12]} | {data[i : i + 4] for i in range(16, end - 3, 4)}  # major, then compatible brands
    return not (brands & _IMAGE_BRANDS) and bool(brands & _VIDEO_BRANDS)


def is_video(data: bytes) -> bool:
    """Whether the bytes start like a video container on the allow-list (content, never names)."""
    if data[4:8] == b"ftyp":
        return _ftyp_is_video(data)
    return (
        data.startswith((b"\x1a\x45\xdf\xa3", b"OggS", b"FLV\x01", b"\x00\x00\x01\xba"))  # Matroska/WebM, Ogg, FLV, PS
        or (data[:4] == b"RIFF" and data[8:12] == b"AVI ")
        or (len(data) > 376 and data[0] == data[188] == data[376] == 0x47)  # MPEG-TS: a sync byte every 188 bytes
        or (data[:1] == b"\x00" and data[4:8] in _QUICKTIME_BOXES)
    )


def _rate(stream: Any) -> float | None:
    rate = stream.average_rate or stream.guessed_rate
    return float(rate) if rate and rate > 0 else None


def _header(container: Any, stream: Any) -> VideoHeader:
    fps = _rate(stream)
    if container.duration and container.duration > 0:
        duration = container.duration / av.time_base
    elif stream.duration and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    else:
        duration = stream.frames / fps if stream.frames and fps else None
    return VideoHeader(stream.codec_context.width, stream.codec_context.height, duration, fps)


def _open(data: bytes) -> tuple[Any, Any]:
    """Open an allow-listed container and its first video stream, or raise :class:`ImageDecodeError`."""
    if not is_video(data):
        raise ImageDecodeError(f"not a recognised video container (first bytes {data[:12].hex()})")
    container = av.open(io.BytesIO(data), mode="r", metadata_errors="replace")
    if not set(container.format.name.split(",")) & _DEMUXERS:
        container.close()
        raise ImageDecodeError(f"video container {container.format.name!r} is not allowed")
    if not container.streams.video:
        container.close()
        raise ImageDecodeError("no video stream in the container (audio only?)")
    return container, container.streams.video[0]


def probe(data: bytes) -> VideoHeader | None:
    """Size, duration and rate from the container header (FFmpeg's probe reads a few packets, nothing is sampled);
    None if the bytes are not a readable video."""
    try:
        container, stream = _open(data)
    except (ImageDecodeError, av.FFmpegError):
        return None
    with container:
        return _header(container, stream)


def _count(pixels: float) -> str:
    return f"{pixels / 1e9:.1f} G" if pixels >= 1e8 else f"{pixels / 1e6:.1f} M" if pixels >= 1e5 else f"{pixels:.0f}"


def _check_header(head: VideoHeader, frames: int, limits: DecodeLimits) -> None:
    """Refuse from the header alone: frame size over max_pixels, estimated decoded pixels over max_decoded_pixels."""
    pixels = head.width * head.height
    if pixels > limits.max_pixels:
        raise ImageDecodeError(
            f"video frames are {head.width}x{head.height} = {_count(pixels)} pixels, "
            f"over the limit of {_count(limits.max_pixels)} (max_pixels)"
        )
    budget = limits.max_decoded_pixels
    if head.duration_s and head.fps and head.duration_s * head.fps * pixels > budget:
        raise ImageDecodeError(
            f"video is {head.width}x{head.height} at {head.fps:.1f} fps for {head.duration_s:.1f} s = "
            f"{_count(head.duration_s * head.fps * pixels)} decoded pixels, "
            f"over the limit of {_count(budget)} (max_decoded_pixels)"
        )
    if frames * pixels > budget:
        raise ImageDecodeError(
            f"video is {head.width}x{head.height} for {frames} frames = {_count(frames * pixels)} decoded pixels, "
            f"over the limit of {_count(budget)} (max_decoded_pixels)"
        )


def video_frames(
    data: bytes, limits: DecodeLimits, resize: Callable[[np.ndarray], np.ndarray] | None = None
) -> VideoFrames:
    """Decode a video within ``limits`` and return its sampled frames (see the module docstring)."""
    if len(data) > limits.max_bytes:
        raise ImageDecodeError(f"video is {len(data)} bytes, over the limit of {limits.max_bytes} bytes (max_bytes)")
    try:
        container, stream = _open(data)
    except av.FFmpegError as e:
        raise ImageDecodeError(f"corrupt or unsupported video: {e}") from None
    with container:
        head = _header(container, stream)
        _check_header(head, stream.frames or 0, limits)
        stream.thread_type = "AUTO"
        try:
            kept, last_t, size, step = _sample(container, stream, head, limits, resize)
        except av.FFmpegError as e:
            raise ImageDecodeError(f"corrupt or unsupported video: {e}") from None
    if not kept:
        raise ImageDecodeError("video has no decodable frames")
    rate_samples = 2 + int(last_t * limits.video_fps - 1e-9)  # first, one per sample time, last
    frames = [(rgb, t) for rgb, t, _ in kept]
    return VideoFrames(frames, head.duration_s or last_t, *size, rate_samples, step > 1.0 / limits.video_fps + 1e-12)


def _sample(
    container: Any,
    stream: Any,
    head: VideoHeader,
    limits: DecodeLimits,
    resize: Callable[[np.ndarray], np.ndarray] | None,
) -> tuple[list[tuple[np.ndarray, float, int]], float, tuple[int, int], float]:
    """Decode every frame, keeping (RGB, time, sample index) for the first, each sample time and the last; with the
    last frame's time, the displayed size and the final step between samples (doubled each time they were thinned)."""
    budget = limits.max_decoded_pixels
    deadline = limits.max_decode_s  # s of wall-clock time
    max_views = limits.max_views
    step = 1.0 / limits.video_fps  # s between sample times
    kept: list[tuple[np.ndarray, float, int]] = []  # (RGB, seconds, index k of the sample time k * step)
    size = (head.width, head.height)
    start, decoded, next_k, t0 = time.monotonic(), 0, 1, None
    previous: tuple[Any, float] | None = None  # the last decoded frame not kept yet, and its time

    def keep(frame: Any, t: float, k: int) -> None:
        nonlocal size
        rgb = frame.to_ndarray(format="rgb24")  # (H, W, 3) uint8
        quarter_turns = round((frame.rotation or 0) / 90) % 4  # counterclockwise
        if quarter_turns:
            rgb = np.ascontiguousarray(np.rot90(rgb, quarter_turns))
        size = (rgb.shape[1], rgb.shape[0])
        kept.append((resize(rgb) if resize else rgb, t, k))

    for index, frame in enumerate(container.decode(stream)):
        decoded += frame.width * frame.height
        if frame.width * frame.height > limits.max_pixels:
            _check_header(VideoHeader(frame.width, frame.height, None, None), 0, limits)
        if decoded > budget:
            raise ImageDecodeError(
                f"video decoded {_count(decoded)} pixels in {index + 1} frames, "
                f"over the limit of {_count(budget)} (max_decoded_pixels)"
            )
        if time.monotonic() - start > deadline:
            raise ImageDecodeError(f"video decoding took over {deadline:g} s (max_decode_s)")
        raw_t = frame.time if frame.time is not None else index / (head.fps or DEFAULT_FPS)
        t0 = raw_t if t0 is None else t0
        t = raw_t - t0
        if index == 0:
            keep(frame, t, 0)
            continue
        while next_k * step < t:  # sample time passed: the frame on screen then is the previous one
            if previous is not None:
                keep(*previous, next_k)
                previous = None
                while len(kept) >= max(max_views, 2):  # one place stays free for the last frame
                    kept[:] = [(rgb, ts, k // 2) for rgb, ts, k in kept if k % 2 == 0]
                    step, next_k = step * 2, next_k // 2
            next_k += 1
        previous = (frame, t)
    if previous is not None:
        keep(*previous, next_k)
    return kept, kept[-1][1] if kept else 0.0, size, step
