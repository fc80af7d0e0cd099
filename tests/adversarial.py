"""The adversarial corpus of issue 14, generated: pure, seeded functions that return bytes (no files, no network).

Every test that checks "no bypass" (``check``, ``/v1/moderate``, ``/v1/generate``, ``scan --apply``) builds its inputs
here, so each path is tried with the same content:

>>> png = image_bytes(seed=3)                       # a small noise PNG
>>> cut = truncated("PROGRESSIVE_JPEG", keep=0.98)  # its last 2% cut off: what a browser still mostly shows
>>> bomb = huge_bilevel_png()                       # a few KB that decode to 6320 x 6320 = 40 MP
"""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
from PIL import Image, ImageFilter

TRUNCATED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "PROGRESSIVE_JPEG", "GIF")
HUGE_SIDE = 6320  # 6320^2 = 39.9 MP: just under the default 40 MP limit, so it decodes (to 120 MB of RGB)


def picture(seed: int = 0, size: tuple[int, int] = (256, 256)) -> Image.Image:
    """A smooth picture with texture (gradients + blurred noise): compresses like a photo, not like noise or flat
    colour, so that truncation at a fraction of the bytes cuts at about that fraction of the rows."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3)
    base = np.stack([128 + 100 * np.sin(x / w * (2 + c) * np.pi + y / h * 3 + phase[c]) for c in range(3)], axis=-1)
    noisy = np.clip(base + rng.normal(0, 24, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(noisy).filter(ImageFilter.GaussianBlur(1))


def encode(img: Image.Image, fmt: str) -> bytes:
    """``fmt`` is a Pillow format name, or ``PROGRESSIVE_JPEG``."""
    buf = io.BytesIO()
    if fmt == "PROGRESSIVE_JPEG":
        img.save(buf, "JPEG", progressive=True, quality=90)
    elif fmt == "JPEG":
        img.save(buf, "JPEG", quality=90)
    else:
        img.save(buf, fmt)
    return buf.getvalue()


def image_bytes(seed: int = 0, fmt: str = "PNG", size: tuple[int, int] = (64, 64)) -> bytes:
    """A valid image of ``size`` (width, height), different for each seed."""
    return encode(picture(seed, size), fmt)


def truncated(fmt: str, keep: float = 0.98, size: tuple[int, int] = (256, 256), seed: int = 0) -> bytes:
    """A picture encoded as ``fmt`` (one of ``TRUNCATED_FORMATS``, or any Pillow format) with only the first ``keep``
    of its bytes: the end cut off as by an interrupted upload."""
    if not 0 < keep < 1:
        raise ValueError(f"keep must be in (0, 1), got {keep}")
    data = encode(picture(seed, size), fmt)
    return data[: int(len(data) * keep)]


def truncate_bytes(data: bytes, keep: float = 0.98) -> bytes:
    """Any encoded image with only the first ``keep`` of its bytes (for images made elsewhere)."""
    return data[: int(len(data) * keep)]


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def huge_bilevel_png(side: int = HUGE_SIDE, seed: int = 0) -> bytes:
    """A 1-bit PNG of side x side: a few KB on the wire that decodes to side^2 RGB pixels (6320: 40 MP, 120 MB).

    Written chunk by chunk with one zlib stream of mostly-zero rows (Pillow would need the whole bitmap in memory),
    with a seeded sparse pattern so that two seeds give different files.
    """
    rng = np.random.default_rng(seed)
    row_bytes = (side + 7) // 8
    zero_row = b"\x00" + bytes(row_bytes)  # filter byte 0 + the row
    marked = set(rng.choice(side, size=min(side, 8), replace=False).tolist())
    comp = zlib.compressobj(9)
    parts = []
    for y in range(side):
        row = zero_row if y not in marked else b"\x00" + bytes([0xAA]) * row_bytes
        parts.append(comp.compress(row))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


def oversized_png(min_bytes: int, seed: int = 0) -> bytes:
    """A valid PNG of at least ``min_bytes`` (incompressible noise padded with a private ancillary chunk), small in
    pixels: what only a byte limit refuses."""
    data = image_bytes(seed, "PNG", (16, 16))
    pad = max(0, min_bytes - len(data)) + 1
    filler = np.random.default_rng(seed).integers(0, 256, pad, dtype=np.uint8).tobytes()
    return data[:33] + _png_chunk(b"prVt", filler) + data[33:]  # after the signature and IHDR


def header_only(fmt: str, size: tuple[int, int] = (64, 64), seed: int = 0) -> bytes:
    """An image cut off where its pixel data begins (after JPEG's first scan header): identifiable with its size,
    nothing to score."""
    data = encode(picture(seed, size), fmt)
    if fmt in ("JPEG", "PROGRESSIVE_JPEG"):
        sos = data.find(b"\xff\xda")
        return data[: sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")]
    return data[: Image.open(io.BytesIO(data)).tile[0][2]]


def deep_json(depth: int, leaf: object = 0) -> str:
    """A JSON text nested ``depth`` levels deep (alternating lists and objects), without recursion."""
    opens, closes = [], []
    for i in range(depth):
        if i % 2:
            opens.append('{"a":')
            closes.append("}")
        else:
            opens.append("[")
            closes.append("]")
    return "".join(opens) + json.dumps(leaf) + "".join(reversed(closes))
