"""Plain single-frame PNG and JPEG decoded by libspng (pyspng) and libjpeg-turbo (simplejpeg), bit-identical to Pillow.

Pillow's per-image overhead roughly doubles the decode time of an ordinary photo. :func:`fast_frame` decodes the
images whose pixels need nothing but the codec (no colour description, no orientation, no transparency key, one
frame) with those libraries and returns exactly the array :func:`pipeline.views._array` gives for the Pillow path;
for anything else it returns None and the caller decodes with Pillow, which then decides and words any error. It
fails closed: a header it does not fully recognise, any error or warning from the codec (corrupt or truncated data:
Pillow then scores what decodes), an image over the pixel limit (Pillow refuses it with its own message, before any
pixel is decoded) all give None.

Eligible, decided from the headers alone (a walk of the PNG chunks or the JPEG markers, then Pillow's lazy
``Image.open``, which parses headers only, must agree on format, mode and size):

- **PNG**: IHDR with bit depth 8, colour type 0 (grey), 2 (RGB) or 6 (RGBA), standard compression and filter
  method, interlace none or Adam7. Every chunk of the file, before and after the image data, is one of IHDR, IDAT
  (consecutive), IEND, ``pHYs`` (9 bytes), ``tIME``, ``sBIT``, ``bKGD`` or ``tEXt`` with a keyword from
  :data:`PNG_TEXT_KEYWORDS` (at most 1 MiB of text in all). Everything else sends the file to Pillow, notably
  ``tRNS``, ``iCCP``, ``sRGB``, ``gAMA``, ``cHRM``, ``cICP``, ``mDCv``, ``cLLI`` (colour, see :mod:`pipeline.color`),
  ``acTL`` (APNG), ``eXIf``, ``zTXt``, ``iTXt`` (EXIF or XMP orientation), ``PLTE`` and private chunks. A text
  keyword outside the list could land in Pillow's ``info`` under a name Pillow acts on (``exif``, ``interlace``,
  ``bbox``, ``transparency``...), so only those standard ones pass.
- **JPEG**: markers before the first scan are SOF0 (baseline) or SOF2 (progressive) once, DQT, DHT, DRI, COM and
  APPn other than APP2 (ICC profile, MPF/MPO, FlashPix all go to Pillow); 8-bit precision; 1 component (grey), or
  3 components known to be YCbCr (a JFIF APP0, an Adobe APP14 with transform 1, or component ids 1, 2, 3 with no
  Adobe marker) sampled 4:4:4, 4:2:2 or 4:2:0 (chroma 1x1, luma 1x1, 2x1 or 2x2). An Adobe APP14 with any other
  transform (RGB, CMYK, YCCK) goes to Pillow. EXIF and XMP are allowed: the orientation is read by Pillow itself
  (``Image.getexif()``, which also reads XMP's ``tiff:Orientation``, exactly as ``ImageOps.exif_transpose`` does)
  and must be 1 or absent. simplejpeg decodes with the ISLOW DCT and fancy upsampling (Pillow's libjpeg defaults)
  and strict warnings, so any corrupt-data warning falls back.

PNG image data is checked before libspng sees it: pyspng has libspng ignore chunk CRCs and the zlib Adler-32, and
Pillow refuses a stream whose Adler-32 is wrong. So zlib inflates the IDAT stream first (never past the size the
header implies; it must be exactly that size, end there and check out), and the checked scanlines go to libspng as
stored deflate blocks, which it only copies and unfilters. Still faster than Pillow, all the more as the inflate is
ISA-L's (python-isal: the same bytes, the same checks, ~2.3x zlib's speed), and it runs without the GIL.

Grey is replicated to (H, W, 3); RGBA keeps 4 channels only when some pixel is translucent, else the (H, W, 3) view
of the colour channels, as :func:`pipeline.views._array` does. The result is read-only, like the array Pillow's path
gives. pyspng and simplejpeg are imported lazily: where one is missing its format is simply not fast-pathed. No state
is shared between calls (safe from any thread).
"""

from __future__ import annotations

import io
import os
import struct
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from PIL import Image

try:  # ISA-L's inflate (python-isal): the same zlib streams and checks, ~2.3x faster than zlib's on a photo's PNG
    from isal import isal_zlib as zlib
except ImportError:  # pragma: no cover - a dependency; zlib gives the same bytes, slower
    import zlib  # type: ignore[no-redef]

if TYPE_CHECKING:  # imports nothing of the pipeline at run time: pipeline.images imports this module
    from .images import DecodeLimits

SWITCH = "DIFFGUARD_FAST_DECODE"  # "0": every image through Pillow
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_TEXT_KEYWORDS = frozenset(  # the PNG specification's predefined keywords, and ImageMagick's dates
    {"Title", "Author", "Description", "Copyright", "Creation Time", "Software", "Disclaimer", "Warning", "Source"}
    | {"Comment", "date:create", "date:modify", "date:timestamp"}
)
_PNG_MODES = {0: "L", 2: "RGB", 6: "RGBA"}  # IHDR colour type -> Pillow's mode (8-bit)
_PNG_PASSIVE = frozenset({b"pHYs", b"tIME", b"sBIT", b"bKGD", b"tEXt"})  # change no pixel Pillow or libspng gives
_PNG_LENGTHS = {b"pHYs": 9, b"tIME": 7}
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
# Adam7's passes: (first column, first row, column step, row step)
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_MAX_TEXT_BYTES = 1 << 20
_JPEG_SOF = (0xC0, 0xC2)  # baseline, progressive (Huffman, 8-bit)
_JPEG_PASSIVE = frozenset({0xDB, 0xC4, 0xDD, 0xFE} | set(range(0xE0, 0xF0)) - {0xE2})  # DQT DHT DRI COM APPn
_LUMA_SAMPLING = frozenset({(1, 1), (2, 1), (2, 2)})  # 4:4:4, 4:2:2, 4:2:0 with chroma 1x1
_COLOUR_INFO = ("icc_profile", "cicp", "nclx_profile", "srgb", "gamma", "chromaticity", "transparency", "mp")


class _Header(NamedTuple):
    width: int
    height: int
    mode: str  # Pillow's mode for it: L, RGB or RGBA
    idat: tuple[tuple[int, int], ...] = ()  # PNG: (start, end) offsets of each IDAT chunk's data, in order
    raw_size: int = 0  # PNG: bytes of filtered scanlines the image data must inflate to


def fast_frame(data: bytes, limits: DecodeLimits) -> np.ndarray | None:
    """The one frame of a plain single-frame PNG or JPEG decoded by libspng / libjpeg-turbo, exactly the array the
    Pillow path gives (views._array(decode_pil(data, limits)[0])): (H, W, 3) uint8, or (H, W, 4) when some pixel is
    translucent. None for anything else (the caller falls back to Pillow, which then decides and words any error),
    and for everything while ``$DIFFGUARD_FAST_DECODE`` is ``0`` (Pillow alone: an operator's switch, read per call)."""
    if not data or len(data) > limits.max_bytes or os.environ.get(SWITCH) == "0":
        return None
    if data.startswith(PNG_SIGNATURE):
        header, decode = _png_header(data), _decode_png
    elif data.startswith(b"\xff\xd8\xff"):
        header, decode = _jpeg_header(data), _decode_jpeg
    else:
        return None
    if header is None:
        return None
    pixels, bomb = header.width * header.height, Image.MAX_IMAGE_PIXELS
    if pixels > limits.max_pixels or (bomb is not None and pixels > bomb):
        return None  # Pillow's path refuses it, in its own words, before decoding
    if not _pillow_agrees(data, header):
        return None
    arr = decode(data, header)
    channels = 4 if header.mode == "RGBA" else 3
    if arr is None or arr.dtype != np.uint8 or arr.shape != (header.height, header.width, channels):
        return None
    if channels == 4 and arr[..., 3].min() == 255:
        arr = arr[..., :3]
    arr.flags.writeable = False  # as np.asarray gives Pillow's pixels: views are shared, never written
    return arr


# --- headers ---------------------------------------------------------------------------------------------------------
def _png_header(data: bytes) -> _Header | None:
    """An eligible PNG's header, from a walk of all its chunks; None when it is not eligible."""
    if len(data) < 33 or data[8:16] != b"\x00\x00\x00\x0dIHDR":
        return None
    width, height, depth, colour, compression, filtering, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    if depth != 8 or colour not in _PNG_MODES or compression or filtering or interlace > 1:
        return None
    mode = _PNG_MODES[colour]
    idat: list[tuple[int, int]] = []
    pos, end, text, state = 33, len(data), 0, "header"  # state: header -> data (IDATs) -> trailer
    while pos + 12 <= end:
        length, cid = struct.unpack_from(">I4s", data, pos)
        body, pos = pos + 8, pos + 12 + length
        if length > 0x7FFFFFFF or pos > end:
            return None
        if cid == b"IDAT":
            if state == "trailer":
                return None  # image data split by other chunks: Pillow stops at the first gap
            state = "data"
            idat.append((body, body + length))
            continue
        if state == "data":
            state = "trailer"
        if cid == b"IEND":
            if state != "trailer":
                return None
            return _Header(width, height, mode, tuple(idat), _raw_size(width, height, len(mode), interlace))
        if cid not in _PNG_PASSIVE or _PNG_LENGTHS.get(cid, length) != length:
            return None
        if cid == b"tEXt":
            keyword = data[body : body + length].split(b"\0", 1)[0]
            text += length
            if keyword.decode("latin-1") not in PNG_TEXT_KEYWORDS or text > _MAX_TEXT_BYTES:
                return None
    return None  # no IEND: truncated, or garbage after the signature


def _raw_size(width: int, height: int, channels: int, interlace: int) -> int:
    """Bytes of filtered scanlines (a filter byte per row) of an 8-bit image, Adam7 passes summed when interlaced."""
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    sizes = (((width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy) for x0, y0, dx, dy in passes)
    return sum(h * (1 + w * channels) for w, h in sizes if w and h)


def _jpeg_header(data: bytes) -> _Header | None:
    """An eligible JPEG's header, from its markers up to the first scan; None when it is not eligible."""
    pos, end, sof, jfif, adobe = 2, len(data), None, False, None
    while True:
        if pos + 4 > end or data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        body, pos = pos + 4, pos + 2 + length
        if length < 2 or pos > end:
            return None
        if marker == 0xDA:  # start of scan
            break
        if marker in _JPEG_SOF and sof is None:
            sof = data[body:pos]
        elif marker == 0xE0 and data.startswith(b"JFIF\0", body, pos):
            jfif = jfif or length >= 16  # libjpeg counts a JFIF marker of at least 14 bytes of data
        elif marker == 0xEE and data.startswith(b"Adobe", body, pos):
            adobe = data[body + 11] if length >= 14 else -1  # the transform byte, as libjpeg reads it
        elif marker not in _JPEG_PASSIVE:
            return None
    if sof is None or len(sof) < 6:
        return None
    precision, height, width, count = struct.unpack_from(">BHHB", sof)
    if precision != 8 or not height or not width or count not in (1, 3) or len(sof) != 6 + 3 * count:
        return None
    if count == 1:
        return _Header(width, height, "L") if adobe in (None, 0) else None
    ids = tuple(sof[6::3])
    sampling = [(b >> 4, b & 15) for b in sof[7::3]]
    ycc = adobe == 1 or (adobe is None and (jfif or ids == (1, 2, 3)))
    if not ycc or sampling[0] not in _LUMA_SAMPLING or sampling[1:] != [(1, 1), (1, 1)]:
        return None
    return _Header(width, height, "RGB")


def _pillow_agrees(data: bytes, header: _Header) -> bool:
    """Pillow's own lazy open (headers only, as the Pillow path opens it) sees one plain frame of this size and mode,
    with no colour description and no EXIF/XMP orientation other than 1."""
    try:  # PNG and JPEG are Pillow's own formats: no plugin registered elsewhere comes before them
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in ("PNG", "JPEG") or im.size != (header.width, header.height) or im.mode != header.mode:
                return False
            if getattr(im, "n_frames", 1) != 1 or any(key in im.info for key in _COLOUR_INFO):
                return False
            if im.format == "PNG":
                return not any(key in im.info for key in ("exif", "xmp", "XML:com.adobe.xmp", "Raw profile type exif"))
            return im.getexif().get(0x0112, 1) == 1  # Orientation, from EXIF or XMP, as exif_transpose reads it
    except Exception:  # noqa: BLE001 - anything Pillow objects to is Pillow's to word
        return False


# --- decoders --------------------------------------------------------------------------------------------------------
def _decode_png(data: bytes, header: _Header) -> np.ndarray | None:
    """libspng's pixels for the image data, once zlib has checked it: pyspng tells libspng to ignore checksums, and
    Pillow refuses a stream whose Adler-32 is wrong. The checked scanlines go to libspng as stored (uncompressed)
    deflate blocks, so the stream is inflated once, and never past the size the header gives (a zip bomb)."""
    try:
        import pyspng
    except ImportError:
        return None
    view = memoryview(data)
    inflate = zlib.decompressobj()
    try:
        raw = inflate.decompress(b"".join(view[a:b] for a, b in header.idat), header.raw_size + 1)
    except zlib.error:  # corrupt: Pillow's path words it, or scores what decodes
        return None
    if len(raw) != header.raw_size or not inflate.eof or inflate.unused_data or inflate.unconsumed_tail:
        return None
    png = _stored_png(view[:33], raw)  # signature and IHDR, one IDAT, IEND
    del raw
    try:
        arr = pyspng.load(png)  # (H, W) grey, (H, W, 3) or (H, W, 4): no gamma, no tRNS applied
    except Exception:  # noqa: BLE001 - a bad filter type, say: Pillow's path words it
        return None
    if arr.ndim == 2:
        arr = np.stack([arr, arr, arr], axis=-1)  # (H, W, 3): grey as Pillow's convert("RGB") gives it
    return arr


def _stored_png(head: memoryview, raw: bytes) -> bytes:
    """A PNG of ``head`` (signature and IHDR), one IDAT holding ``raw`` in stored deflate blocks, and IEND."""
    view, step = memoryview(raw), 0xFFFF
    stream: list[bytes | memoryview] = [b"\x78\x01"]  # zlib header: deflate, 32 KiB window, no preset dictionary
    for start in range(0, len(raw), step):
        block = view[start : start + step]
        stream += [struct.pack("<BHH", start + step >= len(raw), len(block), len(block) ^ 0xFFFF), block]
    stream.append(struct.pack(">I", zlib.adler32(raw)))
    crc = zlib.crc32(b"IDAT")
    for part in stream:
        crc = zlib.crc32(part, crc)
    size = sum(len(part) for part in stream)
    return b"".join([head, struct.pack(">I", size), b"IDAT", *stream, struct.pack(">I", crc), _PNG_IEND])


def _decode_jpeg(data: bytes, header: _Header) -> np.ndarray | None:
    try:
        import simplejpeg
    except ImportError:
        return None
    try:  # ISLOW DCT, fancy upsampling: Pillow's libjpeg defaults; strict: any warning (corrupt data) raises
        return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False, strict=True)
    except Exception:  # noqa: BLE001 - corrupt or truncated: Pillow's path scores what decodes
        return None
