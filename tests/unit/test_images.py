"""Bad and unusual image inputs: each is converted or becomes a clear per-image error, never a batch failure."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline import DecodeLimits, ImageDecodeError, decode_image, load_image
from tests.conftest import encode


def _rgb(h=32, w=48, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty file"),
        (b"hello, I am not an image at all\n", "plain text"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"><rect/></svg>', "SVG/HTML"),
        (b"<!DOCTYPE html><html><body>hi</body></html>", "SVG/HTML"),
        (b"\x00\x01\x02\x03binary junk", "not a recognised image format"),
        (encode(_rgb(), "PNG")[:60], "corrupt or truncated"),
        (encode(_rgb(), "JPEG")[:200], "corrupt or truncated"),
        (encode(_rgb(), "GIF")[:400], "corrupt or truncated"),
        (encode(_rgb(), "WEBP")[:50], "corrupt or truncated"),
    ],
    ids=["empty", "text", "svg", "html", "binary", "png-trunc", "jpeg-trunc", "gif-trunc", "webp-trunc"],
)
def test_bad_bytes_give_clear_errors(data, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data)


def test_decompression_bomb_refused_before_decoding():
    bomb = encode(Image.new("L", (10_000, 5_000)), "PNG")  # 50 MP of zeros: a few KB on disk
    assert len(bomb) < 200_000
    with pytest.raises(ImageDecodeError, match=r"10000x5000 = 50.0 MP, over the limit of 40.0 MP"):
        decode_image(bomb)
    assert decode_image(bomb, DecodeLimits(max_pixels=60_000_000)).shape == (5000, 10000, 3)
    with pytest.raises(ImageDecodeError, match="over the limit"):
        decode_image(encode(_rgb(100, 100), "PNG"), DecodeLimits(max_pixels=9_999))


@pytest.mark.parametrize(
    ("image", "fmt"),
    [
        (Image.new("CMYK", (20, 10), (0, 255, 0, 0)), "JPEG"),
        (Image.new("L", (20, 10), 128), "PNG"),
        (Image.new("LA", (20, 10), (128, 10)), "PNG"),
        (Image.new("RGBA", (20, 10), (255, 0, 0, 0)), "PNG"),
        (Image.new("1", (20, 10), 1), "PNG"),
        (Image.new("I;16", (20, 10), 40000), "PNG"),
        (Image.new("RGB", (20, 10), (1, 2, 3)), "BMP"),
        (Image.new("RGB", (20, 10), (1, 2, 3)), "TIFF"),
    ],
    ids=["cmyk", "gray", "gray-alpha", "rgba", "1bit", "16bit", "bmp", "tiff"],
)
def test_modes_convert_to_rgb(image, fmt):
    arr = decode_image(encode(image, fmt))
    assert arr.dtype == np.uint8 and arr.shape == (10, 20, 3)


def test_16bit_is_scaled_not_clipped():
    arr = decode_image(encode(Image.new("I;16", (4, 4), 40000), "PNG"))
    assert arr[0, 0, 0] == 40000 // 256


def test_palette_with_transparency():
    im = Image.new("P", (8, 8), 1)
    im.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)
    arr = decode_image(encode(im, "PNG", transparency=0))
    assert tuple(arr[0, 0]) == (200, 30, 40)


def test_animated_uses_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    arr = decode_image(data)
    assert arr[0, 0, 0] > 200 and arr[0, 0, 2] < 50


def test_exif_orientation_applied():
    im = Image.new("RGB", (40, 20), (10, 200, 10))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90°
    assert decode_image(encode(im, "JPEG", exif=exif)).shape == (40, 20, 3)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((8, 8, 3), np.float32), "dtype float32"),
        (np.zeros((8, 8, 2), np.uint8), r"got \(8, 8, 2\)"),
        (np.zeros((2, 8, 8, 3), np.uint8), r"got \(2, 8, 8, 3\)"),
        (np.zeros((0, 8, 3), np.uint8), "no pixels"),
    ],
)
def test_bad_arrays(array, message):
    with pytest.raises(ImageDecodeError, match=message):
        load_image(array)


def test_other_array_layouts_and_types():
    assert load_image(np.zeros((5, 6), np.uint8)).shape == (5, 6, 3)
    assert load_image(np.zeros((5, 6, 4), np.uint8)).shape == (5, 6, 3)
    with pytest.raises(ImageDecodeError, match="unsupported image input of type int"):
        load_image(42)


def test_one_bad_image_never_fails_its_neighbours(checker):
    good = encode(_rgb(64, 64), "PNG")
    results = checker.check([good, b"", b"garbage", _rgb(10, 300), np.zeros((4, 4), np.float64), good])
    assert [r.error is None for r in results] == [True, False, False, True, False, True]
    assert results[0].concept_scores == results[5].concept_scores
    assert len(results[1].concept_scores) == 0 and "empty" in results[1].error
    assert "not a recognised image format" in results[2].error
    assert all(r.to_dict()["error"] == r.error for r in results)


def test_tiny_and_extreme_aspect_images_are_scored(checker):
    results = checker.check(
        [np.zeros((1, 1, 3), np.uint8), np.zeros((1, 2000, 3), np.uint8), np.zeros((900, 2), np.uint8)]
    )
    assert all(r.error is None and len(r.concept_scores) == 17 for r in results)
