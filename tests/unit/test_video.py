"""Video sniffing and sampling: tiny videos made here with PyAV, priced before decoding, sampled at fixed times."""

from __future__ import annotations

import functools
import io
from dataclasses import replace

import av
import numpy as np
import pytest
from PIL import Image

from pipeline import video
from pipeline.errors import ImageDecodeError
from pipeline.images import DecodeLimits
from pipeline.video import VideoHeader, is_video, probe, video_frames
from tests.conftest import encode

COLOURS = [(220, 30, 30), (30, 220, 30), (30, 30, 220)]  # one solid colour per second
LIMITS = DecodeLimits(max_bytes=1 << 20)
TOLERANCE = 16  # lossy codecs (yuv420p) shift a solid colour by a few levels


def _limits(**changes) -> DecodeLimits:
    return replace(LIMITS, **changes)


def _codec(*wanted: str) -> str:
    return next(c for c in wanted if c in av.codecs_available)


@functools.cache
def make(fmt: str, codec: str, fps: int = 10, seconds: int = 3, rotation: int | None = None, **options: str) -> bytes:
    """A 64x48 video, solid COLOURS[second] (with rotation, the left half only; the right half is white)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt, options=options) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(fps * seconds):
            rgb = np.empty((48, 64, 3), np.uint8)
            rgb[:] = COLOURS[i // fps]
            if rotation is not None:
                rgb[:, 32:] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def mp4() -> bytes:
    return make("mp4", _codec("libx264", "mpeg4"))


def webm() -> bytes:
    return make("webm", _codec("libvpx-vp9", "libvpx"))


def _close(rgb: np.ndarray, colour) -> bool:
    return bool(np.abs(rgb[rgb.shape[0] // 2, rgb.shape[1] // 2].astype(int) - colour).max() <= TOLERANCE)


@pytest.mark.parametrize("build", [mp4, webm], ids=["mp4", "webm"])
def test_first_every_half_second_and_last_frame_are_sampled(build):
    clip = video_frames(build(), LIMITS)
    assert [t for _, t in clip.frames] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 2.9])
    expected = [COLOURS[0], COLOURS[0], COLOURS[1], COLOURS[1], COLOURS[2], COLOURS[2], COLOURS[2]]
    assert [_close(rgb, c) for (rgb, _), c in zip(clip.frames, expected, strict=True)] == [True] * 7
    assert all(rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8 for rgb, _ in clip.frames)
    assert (clip.width, clip.height, clip.duration_s) == (64, 48, pytest.approx(3.0))


def test_resize_is_applied_to_each_kept_frame():
    clip = video_frames(mp4(), LIMITS, resize=lambda rgb: rgb[::4, ::4])
    assert {rgb.shape for rgb, _ in clip.frames} == {(12, 16, 3)}
    assert (clip.width, clip.height) == (64, 48)  # the video's own size, before resize


def test_views_are_thinned_evenly_to_max_views():
    clip = video_frames(mp4(), _limits(max_views=4))
    assert [t for _, t in clip.frames] == pytest.approx([0.0, 1.0, 2.0, 2.9])


def test_display_rotation_is_applied():
    clip = video_frames(make("mp4", _codec("libx264", "mpeg4"), rotation=90), LIMITS)
    rgb = clip.frames[0][0]
    assert rgb.shape == (64, 48, 3) and (clip.width, clip.height) == (48, 64)
    # 90 degrees counterclockwise: the white right half ends up on top, the coloured left half at the bottom
    assert rgb[8, 24].min() > 255 - TOLERANCE and _close(rgb[32:], COLOURS[0])


def test_probe_reads_the_header_only():
    assert probe(mp4()) == VideoHeader(64, 48, pytest.approx(3.0), pytest.approx(10.0))
    assert probe(encode(Image.new("RGB", (4, 4)), "PNG")) is None


def test_decoded_pixel_budget_is_refused_from_the_header(monkeypatch):
    def never(*args):
        raise AssertionError("decoded although the header already says the video is over the budget")

    monkeypatch.setattr(video, "_sample", never)
    message = (
        r"video is 64x48 at 10.0 fps for 3.0 s = 92160 decoded pixels, over the limit of 50000 \(max_decoded_pixels\)"
    )
    with pytest.raises(ImageDecodeError, match=message):
        video_frames(mp4(), _limits(max_decoded_pixels=50_000))


def test_decoded_pixels_are_counted_when_the_header_has_no_duration():
    live = make("matroska", "mpeg4", live="1")  # a live Matroska stream states neither duration nor frame count
    assert probe(live).duration_s is None
    message = r"video decoded 52224 pixels in 17 frames, over the limit of 50000 \(max_decoded_pixels\)"
    with pytest.raises(ImageDecodeError, match=message):
        video_frames(live, _limits(max_decoded_pixels=50_000))
    assert len(video_frames(live, LIMITS).frames) == 7  # a control: within the budget it decodes


def test_frame_size_is_refused_before_decoding():
    with pytest.raises(
        ImageDecodeError, match=r"video frames are 64x48 = 3072 pixels, over the limit of 3000 \(max_pixels\)"
    ):
        video_frames(mp4(), _limits(max_pixels=3000))


def test_wall_clock_budget():
    with pytest.raises(ImageDecodeError, match=r"video decoding took over 1e-09 s \(max_decode_s\)"):
        video_frames(mp4(), _limits(max_decode_s=1e-9))


def _audio_only() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buf.getvalue()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (lambda: mp4()[:200], "corrupt or unsupported video"),
        (lambda: b"\x1a\x45\xdf\xa3" + bytes(range(256)) * 4, "corrupt or unsupported video"),
        (lambda: mp4()[:344] + bytes(400) + mp4()[744:], "corrupt or unsupported video: .*Invalid data"),  # in mdat
        (_audio_only, "no video stream"),
        (lambda: b"hello, not a video", "not a recognised video container"),
        (lambda: mp4() + bytes(1 << 20), r"bytes, over the limit of 1048576 bytes \(max_bytes\)"),
    ],
    ids=["truncated-header", "ebml-junk", "damaged-frames", "audio-only", "text", "too-many-bytes"],
)
def test_bad_videos_give_clear_errors(data, message):
    with pytest.raises(ImageDecodeError, match=message):
        video_frames(data(), LIMITS)


HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)
AVIF_SEQUENCE = b"\x00\x00\x00\x1cftypavis\x00\x00\x00\x00avismsf1iso8" + bytes(64)
MP4_BRANDS = b"\x00\x00\x00\x1cftypmp42\x00\x00\x00\x00mp42isomavc1" + bytes(64)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (mp4, True),
        (webm, True),
        (lambda: make("matroska", "mpeg4"), True),
        (lambda: make("avi", "mpeg4"), True),
        (lambda: make("mpegts", "mpeg4"), True),
        (lambda: make("flv", "flv"), True),
        (lambda: MP4_BRANDS, True),
        (lambda: HEIC, False),
        (lambda: AVIF_SEQUENCE, False),
        (lambda: encode(Image.new("RGB", (4, 4)), "PNG"), False),
        (lambda: encode(Image.new("RGB", (4, 4)), "WEBP"), False),
        (lambda: b"Once upon a time, there was a video.", False),
        (lambda: np.random.default_rng(0).integers(1, 256, 4096, dtype=np.uint8).tobytes(), False),
        (lambda: b"", False),
    ],
    ids=[
        "mp4",
        "webm",
        "mkv",
        "avi",
        "mpegts",
        "flv",
        "mp42",
        "heic",
        "avif-seq",
        "png",
        "webp",
        "text",
        "random",
        "empty",
    ],
)
def test_is_video_sniffs_content(data, expected):
    assert is_video(data()) is expected
