"""pipeline.color against Chromium itself: each file's screenshot equals ``to_srgb`` of the file, within a few levels.

Every case is one <img> (a data: URL) on one page of Debian's Chromium; the element's screenshot (device scale 1,
no resampling) is what a person sees. The attack cases also show the stored pixels differ a lot from that.
"""

from __future__ import annotations

import base64
import functools
import io

import numpy as np
import pytest
from PIL import Image

from pipeline.color import to_srgb
from tests.color_profiles import (
    cmyk_profile,
    grey_profile,
    inverted_srgb_profile,
    png_with_chunks,
    structured_picture,
)
from tests.conftest import encode

pytestmark = pytest.mark.slow  # deselected by `make test-fast`

PICTURE = structured_picture()
P3 = (0.3127, 0.3290, 0.68, 0.32, 0.265, 0.69, 0.15, 0.06)  # cHRM order: white, red, green, blue
D50_WHITE_SRGB = (0.3457, 0.3585, 0.64, 0.33, 0.30, 0.60, 0.15, 0.06)
# (mean, 99th percentile) of |ours - shown| allowed. Matrix/TRC profiles and PNG chunks match to a level; a LUT
# profile (the CMYK one) is interpolated differently by skcms and LittleCMS: measured mean 1.4, p99 4, max 8 levels.
TOLERANCE = {"cmyk-jpeg-profile": (2.0, 6)}


def _png(arr: np.ndarray, gamma: int | None = None, chrm=None, cicp=None, **kw) -> bytes:
    return png_with_chunks(arr, gamma, chrm, cicp, **kw)


@functools.cache
def _cases() -> dict[str, tuple[str, bytes, bool]]:
    """name -> (MIME type, file, whether the stored pixels differ a lot from what is shown)."""
    inverted, icc = Image.fromarray(255 - PICTURE), inverted_srgb_profile()
    cmyk = Image.fromarray(np.concatenate([PICTURE, PICTURE[..., :1]], axis=2), "CMYK")
    grey = encode(Image.fromarray(PICTURE[..., 1]), "PNG", icc_profile=grey_profile())
    return {
        "inverted-icc-png": ("image/png", encode(inverted, "PNG", icc_profile=icc), True),
        "inverted-icc-jpeg": ("image/jpeg", encode(inverted, "JPEG", quality=95, icc_profile=icc), True),
        "inverted-icc-webp": ("image/webp", encode(inverted, "WEBP", lossless=True, icc_profile=icc), True),
        "gama-1.0": ("image/png", _png(PICTURE, gamma=100000), True),
        "gama-0.5": ("image/png", _png(PICTURE, gamma=50000), False),
        "gama-0.45455": ("image/png", _png(PICTURE, gamma=45455), False),
        "gama-0.44-near-srgb": ("image/png", _png(PICTURE, gamma=44000), False),
        "gama-1.0-chrm-p3": ("image/png", _png(PICTURE, gamma=100000, chrm=P3), True),
        "gama-0.45455-chrm-d50-white": ("image/png", _png(PICTURE, gamma=45455, chrm=D50_WHITE_SRGB), False),
        "grey-profile": ("image/png", grey, False),
        "cmyk-jpeg-profile": ("image/jpeg", encode(cmyk, "JPEG", quality=95, icc_profile=cmyk_profile()), False),
        # cICP outranks iCCP in Chromium: the stored pixels are shown, the inverting profile is not applied.
        "cicp-outranks-icc": ("image/png", _png(PICTURE, cicp=(1, 13, 0, 1), icc_profile=icc), False),
        "cicp-p3": ("image/png", _png(PICTURE, cicp=(12, 13, 0, 1)), False),
    }


@pytest.fixture(scope="module")
def shots(browser) -> dict[str, np.ndarray]:
    cases = _cases()
    page = browser.new_page(viewport={"width": 400, "height": 300}, device_scale_factor=1)
    html = "".join(
        f'<img id="{name}" src="data:{mime};base64,{base64.b64encode(data).decode()}" style="display:block">'
        for name, (mime, data, _) in cases.items()
    )
    page.set_content(f"<body style='margin:0;background:#fff'>{html}</body>")
    page.wait_for_function("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
    out = {}
    for name in cases:
        png = page.locator(f"img[id='{name}']").screenshot()
        out[name] = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)  # (H, W, 3)
    page.close()
    return out


@pytest.mark.parametrize("name", list(_cases()))
def test_to_srgb_matches_chromium(shots, name):
    _, data, attack = _cases()[name]
    with Image.open(io.BytesIO(data)) as im:
        stored = np.asarray(im.convert("RGB"), dtype=np.int16)
        ours = np.asarray(to_srgb(im), dtype=np.int16)
    shown = shots[name]
    assert ours.shape == shown.shape == stored.shape
    diff = np.abs(ours - shown)
    mean, p99 = TOLERANCE.get(name, (0.2, 1))
    assert diff.mean() < mean and np.percentile(diff, 99) <= p99, f"{name}: mean {diff.mean():.2f}, max {diff.max()}"
    if attack:  # what the checker saw before colour management: far from what a person sees
        assert np.abs(stored - shown).mean() > 40
