"""pipeline.color: embedded colour descriptions applied as Chromium applies them (the browser comparison itself is
tests/integration/test_color_browser.py). Profiles are written byte by byte in tests/color_profiles.py."""

from __future__ import annotations

import io
import re
import struct

import numpy as np
import pytest
from PIL import Image, ImageCms, PngImagePlugin

from pipeline.color import to_srgb
from pipeline.errors import ImageDecodeError
from tests.color_profiles import (
    check_parses,
    cmyk_profile,
    grey_profile,
    inverted_srgb_profile,
    png_with_chunks,
    srgb_decode,
    structured_picture,
)
from tests.conftest import encode

PICTURE = structured_picture()  # (64, 128, 3): left half red, right half a gradient
SRGB_ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
LEVELS = np.arange(256, dtype=np.uint8)


def _srgb_encode(linear):
    linear = np.clip(linear, 0, 1)
    return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)


def _reopen(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def _png(arr: np.ndarray, gamma: int | None = None, chrm=None, cicp=None, **kw) -> Image.Image:
    return _reopen(png_with_chunks(arr, gamma, chrm, cicp, **kw))


def _ramp() -> np.ndarray:
    return np.repeat(np.stack([LEVELS, LEVELS, LEVELS], axis=1)[None], 4, axis=0)  # (4, 256, 3) grey ramp


def _diff(a, b) -> np.ndarray:
    return np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))


def test_profile_builders_parse_with_littlecms():
    assert check_parses(inverted_srgb_profile()).startswith("diffguard test: inverted sRGB")
    assert check_parses(grey_profile()).startswith("diffguard test: grey gamma 2.2")
    assert check_parses(cmyk_profile()).startswith("diffguard test: naive CMYK")


@pytest.mark.parametrize(
    ("fmt", "kw", "mean"),
    [
        ("PNG", {}, 0.0),
        ("WEBP", {"lossless": True}, 0.0),
        ("TIFF", {}, 0.0),
        ("JPEG", {"quality": 95}, 1.5),  # JPEG's own loss, mostly at the red/gradient edge (4:2:0 chroma)
        ("AVIF", {"quality": 95}, 2.5),
    ],
    ids=["png-iccp", "webp-iccp", "tiff", "jpeg-app2", "avif"],
)
def test_inverted_profile_attack_is_undone(fmt, kw, mean):
    im = _reopen(encode(Image.fromarray(255 - PICTURE), fmt, icc_profile=inverted_srgb_profile(), **kw))
    assert im.info["icc_profile"] == inverted_srgb_profile()  # what Pillow 13 exposes for this format
    shown = to_srgb(im)
    assert shown.mode == "RGB" and shown.size == (128, 64)
    assert _diff(shown, 255 - np.asarray(im)).max() <= 1  # the profile exactly inverts what was decoded
    assert _diff(shown, PICTURE).mean() <= mean  # which is the picture, up to the codec's loss
    assert _diff(im.convert("RGB"), PICTURE).mean() > 100  # without colour management: the negative


def test_inverted_profile_on_rgba_keeps_alpha_exactly():
    alpha = np.tile(LEVELS[:128], (64, 1))  # (64, 128)
    stored = Image.fromarray(np.dstack([255 - PICTURE, alpha]), "RGBA")
    shown = to_srgb(_reopen(encode(stored, "PNG", icc_profile=inverted_srgb_profile())))
    assert shown.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(shown)[..., 3], alpha)  # not premultiplied, not transformed
    assert _diff(np.asarray(shown)[..., :3], PICTURE).max() <= 1


def test_palette_with_transparency_keeps_alpha_and_applies_the_profile_to_the_palette():
    stored = Image.fromarray(255 - PICTURE).quantize(64)
    stored.info["transparency"] = 0
    im = _reopen(encode(stored, "PNG", icc_profile=inverted_srgb_profile(), transparency=0))
    assert im.mode == "P"
    shown = to_srgb(im)
    expected = 255 - np.asarray(im.convert("RGBA"))[..., :3]
    assert shown.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(shown)[..., 3], np.asarray(im.convert("RGBA"))[..., 3])
    assert (np.asarray(shown)[..., 3] == 0).any() and _diff(np.asarray(shown)[..., :3], expected).max() <= 1


def test_grey_image_with_grey_profile():
    im = _reopen(encode(Image.fromarray(np.tile(LEVELS, (4, 1))), "PNG", icc_profile=grey_profile(2.2)))
    shown = np.asarray(to_srgb(im))  # (4, 256, 3)
    expected = np.round(_srgb_encode((LEVELS / 255) ** 2.2) * 255)
    assert shown.shape == (4, 256, 3) and (shown[..., 0] == shown[..., 2]).all()
    assert _diff(shown[0, :, 1], expected).max() <= 1
    la = Image.fromarray(np.dstack([np.tile(LEVELS, (4, 1)), np.full((4, 256), 77, np.uint8)]), "LA")
    shown = to_srgb(_reopen(encode(la, "PNG", icc_profile=grey_profile(2.2))))
    assert shown.mode == "RGBA" and (np.asarray(shown)[..., 3] == 77).all()
    assert _diff(np.asarray(shown)[0, :, 0], expected).max() <= 1


def test_cmyk_jpeg_with_cmyk_profile():
    cmyk = Image.fromarray(
        np.dstack([PICTURE, np.zeros((64, 128), np.uint8)]), "CMYK"
    )  # stored: the picture as c, m, y
    im = _reopen(encode(cmyk, "JPEG", quality=95, icc_profile=cmyk_profile(inverted=True)))
    assert im.mode == "CMYK" and im.info["icc_profile"] == cmyk_profile(inverted=True)
    shown = to_srgb(im)
    # The profile shows c, m, y as r, g, b; the 9-point table interpolated in Lab adds a few levels to JPEG's loss.
    assert shown.mode == "RGB" and _diff(shown, PICTURE).mean() < 3
    assert _diff(im.convert("RGB"), PICTURE).mean() > 100  # Pillow's naive conversion: the negative


def test_srgb_profile_is_a_no_op():
    im = _png(_ramp(), icc_profile=SRGB_ICC)
    assert _diff(to_srgb(im), _ramp()).max() <= 1


@pytest.mark.parametrize(
    ("gamma", "at_64"),
    [(100000, 137), (50000, 71), (45455, 64), (44000, 64), (47700, 64), (43000, 56)],
    ids=["linear-brightens", "gamma-2", "srgb", "near-srgb-low", "near-srgb-high", "outside-5pct"],
)
def test_png_gamma_only(gamma, at_64):
    """Expected values at 64 measured on Chromium 156; the ramp is checked against the exact formula."""
    shown = np.asarray(to_srgb(_png(_ramp(), gamma=gamma)))
    assert shown[0, 64, 0] == at_64
    if at_64 != 64:
        expected = np.round(_srgb_encode((LEVELS / 255) ** (100000 / gamma)) * 255)
        np.testing.assert_array_equal(shown[0, :, 1], expected)


def test_png_chrm_with_srgb_primaries_changes_nothing_but_the_gamma():
    srgb_chrm = (0.3127, 0.3290, 0.64, 0.33, 0.30, 0.60, 0.15, 0.06)
    with_chrm = to_srgb(_png(PICTURE, gamma=100000, chrm=srgb_chrm))
    assert _diff(with_chrm, to_srgb(_png(PICTURE, gamma=100000))).max() <= 1
    # gAMA 1/2.2 with cHRM is a pure 2.2 power (Chromium's sRGB shortcut is for gAMA alone): 64 shows as 62.
    shown = np.asarray(to_srgb(_png(_ramp(), gamma=45455, chrm=srgb_chrm)))
    expected = np.round(_srgb_encode((LEVELS / 255) ** (1 / 0.45455)) * 255)
    assert shown[0, 64, 0] == 62 and _diff(shown[0, :, 0], expected).max() <= 1


P3_CHRM = (0.3127, 0.3290, 0.68, 0.32, 0.265, 0.69, 0.15, 0.06)  # cHRM order: white, red, green, blue
P3_TO_SRGB = np.array([[1.2249, -0.2247, 0.0], [-0.0420, 1.0419, 0.0], [-0.0197, -0.0786, 1.0979]])  # published


def test_png_chrm_display_p3_primaries_use_the_standard_matrix():
    pixels = np.array([[[128, 51, 26], [200, 200, 200], [10, 240, 90]]], np.uint8)  # linear-light values (gAMA 1)
    shown = np.asarray(to_srgb(_png(pixels, gamma=100000, chrm=P3_CHRM)))
    expected = np.round(_srgb_encode(pixels / 255 @ P3_TO_SRGB.T) * 255)
    assert _diff(shown, expected).max() <= 1
    assert shown[0, 1, 0] == shown[0, 1, 1] == shown[0, 1, 2]  # grey stays grey


def test_png_chrm_with_a_d50_white_is_bradford_adapted():
    d50_white = (0.3457, 0.3585, 0.64, 0.33, 0.30, 0.60, 0.15, 0.06)
    shown = np.asarray(to_srgb(_png(_ramp(), gamma=45455, chrm=d50_white)))
    assert (shown[..., 0] == shown[..., 2]).all()  # the file's white is the screen's white: greys stay neutral
    red = np.asarray(to_srgb(_png(np.full((2, 2, 3), (200, 60, 60), np.uint8), gamma=45455, chrm=d50_white)))
    assert _diff(red[0, 0], (210, 59, 61)).max() <= 1  # Chromium 156 shows (210, 59, 61)


def test_png_srgb_chunk_and_no_description_are_the_plain_conversion():
    np.testing.assert_array_equal(to_srgb(_png(PICTURE)), PICTURE)
    info = PngImagePlugin.PngInfo()
    info.add(b"sRGB", b"\0")
    info.add(b"gAMA", struct.pack(">I", 100000))
    im = _reopen(encode(Image.fromarray(PICTURE), "PNG", pnginfo=info))
    assert im.info["srgb"] == 0 and im.info["gamma"] == 1.0
    np.testing.assert_array_equal(to_srgb(im), PICTURE)  # sRGB outranks gAMA


@pytest.mark.parametrize(
    "image",
    [
        Image.new("RGB", (4, 3), (1, 2, 3)),
        Image.new("L", (4, 3), 9),
        Image.new("1", (4, 3), 1),
        Image.new("CMYK", (4, 3), (0, 255, 0, 0)),
        Image.new("YCbCr", (4, 3), (100, 120, 140)),
        Image.new("RGB", (4, 3), (7, 8, 9)).quantize(4),
    ],
    ids=["rgb", "l", "1bit", "cmyk-naive", "ycbcr", "palette"],
)
def test_no_description_is_convert_rgb(image):
    out = to_srgb(image)
    assert out.mode == "RGB"
    np.testing.assert_array_equal(out, image.convert("RGB"))


def test_alpha_modes_without_description_keep_alpha():
    assert to_srgb(Image.new("LA", (2, 2), (9, 33))).getpixel((0, 0)) == (9, 9, 9, 33)
    assert to_srgb(Image.new("RGBA", (2, 2), (1, 2, 3, 4))).getpixel((0, 0)) == (1, 2, 3, 4)


@pytest.mark.parametrize(
    ("image", "value"),
    [
        (Image.new("I;16", (3, 2), 40000), 156),  # 40000 // 256, as pipeline/images.py scaled 16-bit grey
        (Image.new("I", (3, 2), 70000 * 256), 70000 * 256 // 16_777_216),
        (Image.new("F", (3, 2), 300.5), 255),
    ],
    ids=["i16", "i32", "float"],
)
def test_wide_modes_scale_to_eight_bits(image, value):
    assert to_srgb(image).getpixel((0, 0)) == (value,) * 3


def test_sixteen_bit_png_with_gamma():
    im = _reopen(encode(Image.new("I;16", (3, 2), 64 * 256 + 200), "PNG", pnginfo=_gama_info(100000)))
    assert im.mode.startswith("I;16") and to_srgb(im).getpixel((0, 0)) == (137, 137, 137)


def _gama_info(gamma: int) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add(b"gAMA", struct.pack(">I", gamma))
    return info


def test_lab_mode_goes_through_littlecms():
    assert _diff(to_srgb(Image.new("LAB", (2, 2), (128, 128, 128))).getpixel((0, 0)), (119, 119, 119)).max() <= 1


def test_png_cicp_is_read_and_outranks_the_icc_profile():
    im = _png(PICTURE, cicp=(1, 13, 0, 1), icc_profile=inverted_srgb_profile())
    assert im.info["cicp"] == (1, 13, 0, 1)
    np.testing.assert_array_equal(to_srgb(im), PICTURE)  # what Chromium shows: the profile is ignored
    p3 = to_srgb(_png(PICTURE, cicp=(12, 13, 0, 1)))  # Display P3: P3 primaries, the sRGB curve
    expected = np.round(_srgb_encode(srgb_decode(PICTURE / 255) @ P3_TO_SRGB.T) * 255)
    assert _diff(p3, expected).max() <= 1 and _diff(p3, PICTURE).max() > 20


def test_heif_nclx_profile():
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    grey = Image.new("RGB", (16, 16), (120, 120, 120))
    plain = _reopen(encode(grey, "HEIF", quality=-1))
    assert plain.info["nclx_profile"]["transfer_characteristics"] == 13  # sRGB, as pillow-heif 1.9 writes
    assert _diff(to_srgb(plain), grey).max() <= 2
    pq = _reopen(encode(grey, "HEIF", quality=-1, color_primaries=9, transfer_characteristics=16))
    with pytest.raises(ImageDecodeError, match=r"transfer characteristics 16: PQ"):
        to_srgb(pq)
    red = Image.new("RGB", (16, 16), (200, 60, 60))
    p3 = _reopen(encode(red, "HEIF", quality=-1, color_primaries=12, transfer_characteristics=13))
    assert p3.info["nclx_profile"]["color_primaries"] == 12
    expected = to_srgb(_png(np.asarray(p3), cicp=(12, 13, 0, 1)))
    assert _diff(to_srgb(p3), expected).max() <= 1 and _diff(to_srgb(p3), p3).max() > 10


def _with_info(im: Image.Image, **info) -> Image.Image:
    im.info.update(info)
    return im


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (
            _with_info(Image.new("RGB", (4, 4)), icc_profile=b"garbage " * 40),
            "embedded ICC colour profile cannot be applied: it does not parse",
        ),
        (_with_info(Image.new("RGB", (4, 4)), icc_profile=cmyk_profile()), r"profile for 'CMYK' colour on a RGB image"),
        (_with_info(Image.new("L", (4, 4)), icc_profile=inverted_srgb_profile()), r"'RGB' colour on a L image"),
        (_with_info(Image.new("CMYK", (4, 4)), icc_profile=grey_profile()), r"'GRAY' colour on a CMYK image"),
        (_with_info(Image.new("RGB", (4, 4)), gamma=0.0), "gAMA 0.0 is not a positive exponent"),
        (_with_info(Image.new("RGB", (4, 4)), gamma=1.0, chromaticity=(0.0,) * 8), "invalid chromaticities"),
        (_with_info(Image.new("RGB", (4, 4)), cicp=(1, 18, 0, 1)), r"18: HLG"),
        (_with_info(Image.new("RGB", (4, 4)), cicp=(1, 13, 1, 1)), "matrix coefficients 1"),
        (_with_info(Image.new("RGB", (4, 4)), cicp=(22, 13, 0, 1)), "colour primaries 22 are not implemented"),
    ],
    ids=["garbage", "cmyk-on-rgb", "rgb-on-grey", "grey-on-cmyk", "gama-0", "chrm-zero", "hlg", "yuv-cicp", "ebu"],
)
def test_descriptions_that_cannot_be_applied_are_refused(image, message):
    """Chromium shows the stored pixels for all of these; we fail closed (pipeline/color.py's docstring)."""
    with pytest.raises(ImageDecodeError, match=message) as info:
        to_srgb(image)
    assert re.match(r"embedded (ICC colour profile|colour description) cannot be applied: ", str(info.value))


def test_garbage_profile_in_a_real_png_is_refused():
    with pytest.raises(ImageDecodeError, match="does not parse"):
        to_srgb(_png(PICTURE, icc_profile=b"\0" * 200))
    huge = _with_info(Image.new("RGB", (4, 4)), icc_profile=inverted_srgb_profile() + b"\0" * (4 << 20))
    with pytest.raises(ImageDecodeError, match=r"4,196,\d+ bytes, over the limit of 4,194,304"):
        to_srgb(huge)


def test_decreasing_curve_is_what_the_builder_wrote():
    """The attack profile's curve, read back: stored 255 - v decodes to sRGB v's linear light."""
    curve = np.frombuffer(inverted_srgb_profile()[-512:], ">u2") / 65535  # bTRC is the last tag
    np.testing.assert_allclose(curve, srgb_decode(1 - LEVELS / 255), atol=1 / 65535)
