"""Minimal ICC v2 profiles written byte by byte, for tests of colour management (pipeline/color.py).

Pillow's ImageCms can only create sRGB, Lab and XYZ profiles; these builders cover what it cannot: an RGB
matrix/TRC profile with any tone curves (the *inverted* one is the attack: pixels stored inverted, shown upright),
a grey profile and a CMYK profile (one lut16 table). Every builder's output parses with ``ImageCms``.

    >>> from PIL import ImageCms
    >>> ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(inverted_srgb_profile())))
    'diffguard test: inverted sRGB\\n'
"""

from __future__ import annotations

import io
import struct

import numpy as np

D50 = (0.9642, 1.0, 0.8249)
# sRGB's primaries adapted to D50 (Bradford), as LittleCMS's own sRGB profile stores them: columns r, g, b.
SRGB_D50 = ((0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141))


def srgb_decode(s: np.ndarray) -> np.ndarray:
    """sRGB-encoded 0..1 -> linear light 0..1 (IEC 61966-2-1)."""
    return np.where(s <= 0.04045, s / 12.92, ((s + 0.055) / 1.055) ** 2.4)


def _s15(x: float) -> bytes:
    return struct.pack(">i", round(x * 65536))


def _xyz(x: float, y: float, z: float) -> bytes:
    return b"XYZ \0\0\0\0" + _s15(x) + _s15(y) + _s15(z)


def _curve(table: np.ndarray) -> bytes:
    """curveType from values in 0..1 (a table of any length >= 2)."""
    values = np.round(np.clip(table, 0, 1) * 65535).astype(">u2")
    return b"curv\0\0\0\0" + struct.pack(">I", len(values)) + values.tobytes()


def _desc(text: str) -> bytes:
    ascii_ = text.encode("ascii") + b"\0"
    return b"desc\0\0\0\0" + struct.pack(">I", len(ascii_)) + ascii_ + b"\0" * 8 + b"\0\0\0" + b"\0" * 67


def _text(text: str) -> bytes:
    return b"text\0\0\0\0" + text.encode("ascii") + b"\0"


def _profile(device_class: bytes, space: bytes, pcs: bytes, tags: dict[bytes, bytes]) -> bytes:
    """Header (128 bytes) + tag table + 4-byte aligned tag data."""
    table_size = 4 + 12 * len(tags)
    offset = 128 + table_size
    entries, data = [], b""
    for sig, body in tags.items():
        body += b"\0" * (-len(body) % 4)
        entries.append(struct.pack(">4sII", sig, offset + len(data), len(body)))
        data += body
    size = 128 + table_size + len(data)
    header = (
        struct.pack(">I4sI4s4s4s", size, b"\0\0\0\0", 0x02100000, device_class, space, pcs)
        + struct.pack(">6H", 2024, 1, 1, 0, 0, 0)
        + b"acsp"
        + b"\0" * 24  # platform, flags, manufacturer, model, attributes
        + struct.pack(">I", 0)  # rendering intent: perceptual
        + _xyz(*D50)[8:]
        + b"\0" * 48  # creator, profile id, reserved
    )
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + b"".join(entries) + data


def rgb_profile(name: str, trc: np.ndarray, primaries=SRGB_D50) -> bytes:
    """RGB matrix/TRC display profile: one tone curve (values 0..1) for all three channels, D50-adapted primaries."""
    curve = _curve(trc)
    tags = {b"desc": _desc(name), b"cprt": _text("public domain"), b"wtpt": _xyz(*D50)}
    tags |= {b"rXYZ": _xyz(*primaries[0]), b"gXYZ": _xyz(*primaries[1]), b"bXYZ": _xyz(*primaries[2])}
    tags |= {b"rTRC": curve, b"gTRC": curve, b"bTRC": curve}
    return _profile(b"mntr", b"RGB ", b"XYZ ", tags)


def inverted_srgb_profile() -> bytes:
    """sRGB with decreasing tone curves: stored value 255 - v is shown as sRGB v (exact at the 256 table points)."""
    return rgb_profile("diffguard test: inverted sRGB", srgb_decode(1 - np.arange(256) / 255))


def grey_profile(gamma: float = 2.2) -> bytes:
    """Grey display profile with a pure power-law tone curve (256 entries)."""
    tags = {b"desc": _desc(f"diffguard test: grey gamma {gamma}"), b"cprt": _text("public domain")}
    tags |= {b"wtpt": _xyz(*D50), b"kTRC": _curve((np.arange(256) / 255) ** gamma)}
    return _profile(b"mntr", b"GRAY", b"XYZ ", tags)


def _srgb_to_lab16(rgb: np.ndarray) -> np.ndarray:
    """sRGB 0..1 (N, 3) -> ICC v2 16-bit Lab PCS encoding (N, 3) (D50)."""
    xyz = srgb_decode(rgb) @ np.array(SRGB_D50)  # (N, 3)
    f = np.cbrt(xyz / np.array(D50))
    f = np.where(f**3 > 216 / 24389, f, (24389 / 27 * xyz / np.array(D50) + 16) / 116)
    lab = np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=1)
    return np.round(np.stack([lab[:, 0] * 652.8, (lab[:, 1] + 128) * 256, (lab[:, 2] + 128) * 256], 1)).clip(0, 65535)


def cmyk_profile(grid: int = 9, inverted: bool = False) -> bytes:
    """CMYK output profile: naive CMYK (sRGB = (1 - cmy)(1 - k)) as one A2B0 lut16 table, Lab PCS.

    ``inverted``: sRGB = cmy (1 - k) instead, so Pillow's naive conversion gives the negative of what is shown.
    """
    axis = np.linspace(0, 1, grid)
    nodes = np.array(np.meshgrid(axis, axis, axis, axis, indexing="ij")).reshape(4, -1).T  # (grid**4, 4): c, m, y, k
    rgb = (nodes[:, :3] if inverted else 1 - nodes[:, :3]) * (1 - nodes[:, 3:])
    identity = b"".join(_s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
    ramp = np.array([0, 65535], ">u2").tobytes()
    lut = b"mft2\0\0\0\0" + bytes([4, 3, grid, 0]) + identity + struct.pack(">HH", 2, 2)
    lut += ramp * 4 + _srgb_to_lab16(rgb).astype(">u2").tobytes() + ramp * 3
    name = f"diffguard test: {'inverted' if inverted else 'naive'} CMYK"
    tags = {b"desc": _desc(name), b"cprt": _text("public domain"), b"wtpt": _xyz(*D50)}
    return _profile(b"prtr", b"CMYK", b"Lab ", tags | {b"A2B0": lut})


def check_parses(profile: bytes) -> str:
    """The profile's description as ImageCms reads it (raises PyCMSError if LittleCMS refuses it)."""
    from PIL import ImageCms

    return ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(profile)))


def structured_picture(height: int = 64, width: int = 128) -> np.ndarray:
    """A test picture (H, W, 3) uint8: left half red, right half a gradient (R across, G down, B against R)."""
    x, y = np.meshgrid(np.linspace(0, 255, width - width // 2), np.linspace(0, 255, height))
    right = np.stack([x, y, 255 - x], axis=2).round().astype(np.uint8)
    left = np.broadcast_to(np.array([200, 30, 30], np.uint8), (height, width // 2, 3))
    return np.concatenate([left, right], axis=1)


def png_with_chunks(arr: np.ndarray, gamma: int | None = None, chrm=None, cicp=None, **kw) -> bytes:
    """``arr`` as a PNG with colour chunks: gAMA (x100000), cHRM (8 chromaticities, white first), cICP (4 codes);
    ``kw`` goes to Pillow's PNG writer (e.g. ``icc_profile``)."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if gamma is not None:
        info.add(b"gAMA", struct.pack(">I", gamma))
    if chrm is not None:
        info.add(b"cHRM", struct.pack(">8I", *(round(v * 100000) for v in chrm)))
    if cicp is not None:
        info.add(b"cICP", bytes(cicp))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", pnginfo=info, **kw)
    return buf.getvalue()
