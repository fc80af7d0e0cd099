"""What a screen shows: a decoded frame's embedded colour description applied as Chromium applies it, to sRGB.

An image's pixels are not what a viewer shows when the file carries a colour description: a PNG whose pixels are
stored inverted, with an ICC profile whose tone curves invert them back, is shown upright by every browser, and a
checker that ignores the profile scores the negative. :func:`to_srgb` converts one decoded Pillow frame to the sRGB
pixels Chromium puts on an sRGB screen, in the order Chromium 156 chooses between descriptions (measured, see
tests/integration/test_color_browser.py):

1. PNG ``cICP`` chunk (coding-independent code points; Chromium then ignores iCCP, so an attacker could pair a
   harmless cICP with an ICC profile that only *we* would apply). Pillow 13 does not read the chunk: importing
   this module registers a handler that stores it as ``info["cicp"]``, for PNGs opened after the import.
2. ICC profile (``info["icc_profile"]``: PNG iCCP, JPEG APP2, WebP ICCP, TIFF, AVIF and HEIF ``colr prof``),
   applied with LittleCMS. Intent perceptual: Chromium's skcms reads a LUT profile's A2B0 table, the perceptual
   one, and for matrix/TRC profiles every intent but absolute is the same matrix-shaper transform. Known
   difference: LittleCMS forces black-point compensation for perceptual v4 LUT profiles, skcms has none.
3. HEIF ``nclx`` (pillow-heif's ``info["nclx_profile"]``), as for cICP (Chromium shows no HEIF; Safari does).
4. PNG ``sRGB`` chunk: already sRGB.
5. PNG ``gAMA`` (+ ``cHRM``), as Skia: linear light L = s ** (1 / g) for the stored encoding exponent g, sRGB
   primaries unless cHRM gives others (converted by a 3x3 matrix with Bradford adaptation of the white point,
   clipped to the sRGB gamut), re-encoded with the sRGB curve. gAMA alone within 5% of 1/2.2 is shown as sRGB.

Fail closed: a description that cannot be parsed or applied (garbage bytes, a CMYK profile on an RGB image, a
singular cHRM, gAMA 0, PQ or HLG transfer, a profile over 4 MiB) raises :class:`ImageDecodeError`. Chromium
ignores such descriptions and shows the stored pixels; we refuse rather than guess which one a viewer will get.

Not handled, because Pillow 13 does not expose it: AVIF CICP without an ICC profile (Pillow's AVIF plugin keeps
only the ICC profile; the stored values are taken as sRGB).

Accepted modes: every mode Pillow decodes to. I;16, I;16B, I;16L, I;16N and I scale to 8 bits by integer division
(by 256, or 2**24 when values exceed 16 bits) and F clips to 0..255, as pipeline/images.py always did; then
"1" and L are grey, P, PA and RGB with a tRNS colour key become RGB(A), RGBa/La are un-premultiplied, YCbCr and HSV
convert to RGB, LAB goes through LittleCMS's Lab profile, CMYK needs a CMYK profile to be more than Pillow's naive
conversion. The result is "RGBA" when the frame has alpha (kept exactly, not premultiplied), else "RGB".
"""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image, ImageCms, PngImagePlugin

from pipeline.errors import ImageDecodeError

_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
_LAB = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB"))
_D65 = (0.3127, 0.3290)
_SRGB_PRIMARIES = (0.64, 0.33, 0.30, 0.60, 0.15, 0.06)
# ITU-T H.273 colour primaries: code -> (rx, ry, gx, gy, bx, by, wx, wy); 1 (BT.709) and 2 (unspecified) are sRGB's.
_CICP_PRIMARIES = {
    1: (*_SRGB_PRIMARIES, *_D65),
    2: (*_SRGB_PRIMARIES, *_D65),
    9: (0.708, 0.292, 0.170, 0.797, 0.131, 0.046, *_D65),  # BT.2020
    11: (0.680, 0.320, 0.265, 0.690, 0.150, 0.060, 0.314, 0.351),  # DCI-P3
    12: (0.680, 0.320, 0.265, 0.690, 0.150, 0.060, *_D65),  # Display P3
}
# H.273 transfer characteristics -> decoding exponent (None: the sRGB curve). Chromium (gfx::ColorSpace) draws
# BT.709, BT.601 and BT.2020 content with the sRGB curve.
_CICP_TRANSFER = {1: None, 2: None, 4: 2.2, 5: 2.8, 6: None, 8: 1.0, 13: None, 14: None, 15: None}
_CICP_NAMES = {16: "PQ (SMPTE ST 2084)", 18: "HLG (ARIB STD-B67)"}
_BRADFORD = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])
_PROFILE_MODES = {"RGB": ("RGB",), "GRAY": ("L",), "CMYK": ("CMYK",), "Lab": ("LAB",)}
_ICC, _MAX_ICC_BYTES = "ICC colour profile", 4 << 20  # large printer profiles are 1-3 MB


def _chunk_cicp(self: PngImagePlugin.PngStream, pos: int, length: int) -> bytes:
    s = PngImagePlugin.ImageFile._safe_read(self.fp, length)
    if len(s) == 4:
        self.im_info["cicp"] = tuple(s)  # (primaries, transfer, matrix, full_range)
    return s


if not hasattr(PngImagePlugin.PngStream, "chunk_cICP"):
    PngImagePlugin.PngStream.chunk_cICP = _chunk_cicp


def _refuse(what: str, kind: str = "colour description") -> ImageDecodeError:
    return ImageDecodeError(f"embedded {kind} cannot be applied: {what}")


def _eight_bit(im: Image.Image) -> Image.Image:
    """Modes with more than 8 bits, premultiplied alpha, a palette or no RGB meaning -> L, LA, RGB, RGBA or CMYK."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im).astype(np.int64)
        scale = 256 if arr.max(initial=0) <= 65535 else 16_777_216
        return Image.fromarray(np.clip(arr // scale, 0, 255).astype(np.uint8), "L")
    if im.mode == "F":
        return Image.fromarray(np.clip(np.nan_to_num(np.asarray(im)), 0, 255).astype(np.uint8), "L")
    keyed = "transparency" in im.info
    if im.mode in ("PA", "RGBa") or (im.mode in ("P", "RGB") and keyed):
        return im.convert("RGBA")
    if im.mode == "La" or (im.mode in ("1", "L") and keyed):
        return im.convert("LA")
    if im.mode in ("P", "YCbCr", "HSV", "RGBX"):
        return im.convert("RGB")
    return im.convert("L") if im.mode == "1" else im


def _split_alpha(im: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    if im.mode in ("RGBA", "LA"):
        return im.convert(im.mode[:-1]), im.getchannel("A")
    return im, None


def _with_alpha(rgb: Image.Image, alpha: Image.Image | None) -> Image.Image:
    if alpha is not None:
        rgb.putalpha(alpha)
    return rgb


@functools.lru_cache(maxsize=32)
def _icc_transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform:
    if len(icc) > _MAX_ICC_BYTES:
        raise _refuse(f"{len(icc):,} bytes, over the limit of {_MAX_ICC_BYTES:,}", _ICC)
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    except (OSError, ImageCms.PyCMSError) as e:
        raise _refuse(f"it does not parse ({e})", _ICC) from None
    space = profile.profile.xcolor_space.strip()
    if mode not in _PROFILE_MODES.get(space, ()):
        raise _refuse(f"a profile for {space!r} colour on a {mode} image", _ICC)
    try:
        return ImageCms.buildTransform(profile, _SRGB, mode, "RGB", ImageCms.Intent.PERCEPTUAL)
    except ImageCms.PyCMSError as e:
        desc = profile.profile.profile_description or "no description"
        raise _refuse(f"LittleCMS cannot build a transform to sRGB from {desc!r}: {e}", _ICC) from None


def _apply_icc(im: Image.Image, icc: bytes) -> Image.Image:
    colour, alpha = _split_alpha(im)
    try:
        out = _icc_transform(bytes(icc), colour.mode).apply(colour)
    except ImageCms.PyCMSError as e:  # ImageDecodeError from _icc_transform passes through
        raise _refuse(f"LittleCMS failed applying it: {e}", _ICC) from None
    return _with_alpha(out, alpha)


def _xyz(x: float, y: float) -> np.ndarray:
    return np.array([x / y, 1.0, (1 - x - y) / y])


def _to_xyz(chromaticities) -> tuple[np.ndarray, np.ndarray]:
    """(rx, ry, gx, gy, bx, by, wx, wy) -> (RGB -> XYZ matrix (3, 3), white XYZ (3,)), Y of white = 1."""
    c = np.asarray(chromaticities, dtype=np.float64)
    if c.shape != (8,) or not np.all(np.isfinite(c)) or np.any(c[1::2] <= 0) or np.any(c < 0):
        raise _refuse(f"invalid chromaticities {tuple(chromaticities)}")
    primaries = np.stack([_xyz(*c[0:2]), _xyz(*c[2:4]), _xyz(*c[4:6])], axis=1)  # columns r, g, b
    white = _xyz(*c[6:8])
    if abs(np.linalg.det(primaries)) < 1e-6:
        raise _refuse(f"chromaticities {tuple(chromaticities)} do not span a colour space")
    return primaries * np.linalg.solve(primaries, white), white


_SRGB_TO_XYZ, _SRGB_WHITE = _to_xyz((*_SRGB_PRIMARIES, *_D65))


def _primaries_matrix(chromaticities) -> np.ndarray:
    """Linear RGB with these primaries -> linear sRGB (3, 3), the white point Bradford-adapted to D65."""
    to_xyz, white = _to_xyz(chromaticities)
    cone_src, cone_dst = _BRADFORD @ white, _BRADFORD @ _SRGB_WHITE
    adapt = np.linalg.inv(_BRADFORD) @ np.diag(cone_dst / cone_src) @ _BRADFORD
    return np.linalg.inv(_SRGB_TO_XYZ) @ adapt @ to_xyz


def _srgb_encode(linear: np.ndarray) -> np.ndarray:
    linear = np.clip(linear, 0.0, 1.0)
    return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)


def _srgb_decode(s: np.ndarray) -> np.ndarray:
    return np.where(s <= 0.04045, s / 12.92, ((s + 0.055) / 1.055) ** 2.4)


_ENCODE_16 = np.round(_srgb_encode(np.arange(65536) / 65535) * 255).astype(np.uint8)  # linear (16 bits) -> sRGB


def _apply_curve_and_primaries(im: Image.Image, exponent: float | None, chromaticities=None) -> Image.Image:
    """Decode with ``s ** exponent`` (None: the sRGB curve), map primaries to sRGB's, encode with the sRGB curve."""
    colour, alpha = _split_alpha(im)
    colour = colour.convert("RGB")
    levels = np.arange(256) / 255
    linear = _srgb_decode(levels) if exponent is None else levels**exponent  # (256,) decode LUT
    if chromaticities is None:
        lut = np.round(_srgb_encode(linear) * 255).astype(np.uint8)
        return _with_alpha(colour.point(lut.tolist() * 3), alpha)
    matrix, lut = _primaries_matrix(chromaticities).T.astype(np.float32), linear.astype(np.float32)
    arr = np.asarray(colour)  # (H, W, 3) uint8
    out = np.empty_like(arr)
    step = max(1, 2**20 // max(1, arr.shape[1]))  # rows per block: about 1 MP of float32 work at a time
    for y in range(0, arr.shape[0], step):
        linear_srgb = np.clip(lut[arr[y : y + step]] @ matrix, 0.0, 1.0)  # (rows, W, 3)
        out[y : y + step] = _ENCODE_16[(linear_srgb * 65535 + 0.5).astype(np.uint16)]
    return _with_alpha(Image.fromarray(out, "RGB"), alpha)


def _apply_cicp(im: Image.Image, primaries: int, transfer: int, chromaticities=None) -> Image.Image:
    if transfer not in _CICP_TRANSFER:
        name = _CICP_NAMES.get(transfer, "a transfer function this decoder does not implement")
        raise _refuse(f"CICP transfer characteristics {transfer}: {name}")
    if chromaticities is None and primaries not in _CICP_PRIMARIES:
        raise _refuse(f"CICP colour primaries {primaries} are not implemented")
    if primaries in (1, 2):
        chromaticities = None
    elif chromaticities is None:
        chromaticities = _CICP_PRIMARIES[primaries]
    if chromaticities is None and _CICP_TRANSFER[transfer] is None:
        return _plain(im)
    return _apply_curve_and_primaries(im, _CICP_TRANSFER[transfer], chromaticities)


def _nclx_chromaticities(nclx: dict):
    keys = [f"color_primary_{c}_{xy}" for c in ("red", "green", "blue", "white") for xy in "xy"]
    return tuple(nclx[k] for k in keys) if all(k in nclx for k in keys) else None


def _plain(im: Image.Image) -> Image.Image:
    return im.convert("RGBA" if im.mode in ("RGBA", "LA") else "RGB")


def to_srgb(im: Image.Image) -> Image.Image:
    """One decoded frame -> "RGB" or "RGBA" in sRGB, as Chromium shows it (see the module docstring)."""
    info = im.info
    im = _eight_bit(im)
    if "cicp" in info:
        primaries, transfer, matrix, full_range = info["cicp"]
        if matrix != 0 or full_range != 1:
            raise _refuse(f"PNG cICP with matrix coefficients {matrix} and full-range flag {full_range} (need 0, 1)")
        return _apply_cicp(im, primaries, transfer)
    if info.get("icc_profile"):
        return _apply_icc(im, info["icc_profile"])
    if im.mode == "LAB":
        return ImageCms.applyTransform(im, ImageCms.buildTransform(_LAB, _SRGB, "LAB", "RGB"))
    nclx = info.get("nclx_profile")
    if nclx:
        primaries, transfer = nclx.get("color_primaries", 2), nclx.get("transfer_characteristics", 2)
        return _apply_cicp(im, primaries, transfer, None if primaries in (1, 2) else _nclx_chromaticities(nclx))
    if "srgb" in info or "gamma" not in info:
        return _plain(im)
    gamma, chromaticities = info["gamma"], info.get("chromaticity")
    if not gamma > 0:
        raise _refuse(f"PNG gAMA {gamma} is not a positive exponent")
    if chromaticities is None:
        if abs(gamma * 2.2 - 1) <= 0.05:  # Chromium shows gAMA alone within 5% of 1/2.2 as sRGB
            return _plain(im)
        return _apply_curve_and_primaries(im, 1 / gamma)
    wx, wy, rx, ry, gx, gy, bx, by = chromaticities  # Pillow's order: white point first
    return _apply_curve_and_primaries(im, 1 / gamma, (rx, ry, gx, gy, bx, by, wx, wy))
