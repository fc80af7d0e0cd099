"""pipeline.fastdecode: plain PNG and JPEG decoded by libspng / libjpeg-turbo give exactly the Pillow path's array
(values, dtype, shape, flags), every object's views are the same with the fast path on and off, and everything else
falls back to Pillow (None), bombs included, before any pixel is decoded."""

from __future__ import annotations

import functools
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageCms, PngImagePlugin
from skimage import data as samples

from pipeline import images, views
from pipeline.errors import ImageDecodeError
from pipeline.fastdecode import PNG_SIGNATURE, fast_frame
from pipeline.images import DecodeLimits, decode, decode_pil
from pipeline.views import CLIP_GEOMETRY, decode_views
from tests.conftest import encode

LIMITS = DecodeLimits()


# --- images ----------------------------------------------------------------------------------------------------------
def _chunk(cid: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + cid + body + struct.pack(">I", zlib.crc32(cid + body))


_ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]


def _png(
    arr: np.ndarray, colour: int, depth: int = 8, interlace: int = 0, size: tuple[int, int] | None = None
) -> bytes:
    """A PNG written here (Pillow writes neither Adam7 nor 16-bit RGB): filter 0 rows, one IDAT; ``size`` (w, h)
    overrides the IHDR's (a bomb's header over a small image's data)."""
    h, w = arr.shape[:2]
    width, height = size or (w, h)
    px = arr.astype(">u2" if depth == 16 else np.uint8).reshape(h, w, -1)
    passes = [px[y0::dy, x0::dx] for x0, y0, dx, dy in _ADAM7] if interlace else [px]
    raw = b"".join(b"\0" + row.tobytes() for p in passes if p.size for row in p)
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    return PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def _after_data(png: bytes, *chunks: bytes) -> bytes:
    """``png`` with ``chunks`` between its image data and IEND (Pillow writes none there for a still image)."""
    return png[:-12] + b"".join(chunks) + png[-12:]


def _split_data(png: bytes, between: bytes) -> bytes:
    """``png``'s one IDAT as two, with ``between`` (chunks, or b"") between them."""
    start = png.index(b"IDAT") - 4
    (length,) = struct.unpack_from(">I", png, start)
    stream = png[start + 8 : start + 8 + length]
    half = len(stream) // 2
    pieces = _chunk(b"IDAT", stream[:half]) + between + _chunk(b"IDAT", stream[half:])
    return png[:start] + pieces + png[start + 12 + length :]


def _bad_adler(png: bytes) -> bytes:
    """``png`` with the Adler-32 of its image data wrong (chunk CRC right): Pillow refuses it, libspng would not."""
    start = png.index(b"IDAT") - 4
    (length,) = struct.unpack_from(">I", png, start)
    stream = bytearray(png[start + 8 : start + 8 + length])
    stream[-1] ^= 0xFF
    return png[:start] + _chunk(b"IDAT", bytes(stream)) + png[start + 12 + length :]


def _photo(name: str, size: tuple[int, int] | None = None) -> np.ndarray:
    arr = getattr(samples, name)()
    return np.asarray(Image.fromarray(arr).resize(size, Image.Resampling.BICUBIC)) if size else arr


def _random(h: int, w: int, seed: int, smooth: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if not smooth:
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    small = Image.fromarray(rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8))
    return np.asarray(small.resize((w, h), Image.Resampling.BICUBIC))


def _alpha(rgb: np.ndarray, opaque: bool) -> np.ndarray:
    h, w = rgb.shape[:2]
    alpha = np.full((h, w), 255, np.uint8) if opaque else (np.arange(h * w).reshape(h, w) % 256).astype(np.uint8)
    return np.dstack([rgb, alpha])


def _save(arr: np.ndarray, fmt: str, mode: str | None = None, **kw) -> bytes:
    return encode(Image.fromarray(arr, mode), fmt, **kw)


def _pnginfo(cid: bytes, body: bytes) -> PngImagePlugin.PngInfo:
    """A chunk for Pillow to write before the image data."""
    info = PngImagePlugin.PngInfo()
    info.add(cid, body)
    return info


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


@functools.cache
def eligible() -> dict[str, bytes]:
    """Plain PNGs and JPEGs: real photos and seeded random pictures, every layout the fast path takes."""
    astronaut, coffee, chelsea = _photo("astronaut"), _photo("coffee"), _photo("chelsea")
    odd = _photo("astronaut", (333, 517))  # (w, h)
    noise, smooth = _random(64, 96, seed=1), _random(517, 333, seed=2, smooth=True)
    grey = astronaut[..., 1]
    out = {
        "png-rgb-astronaut": _save(astronaut, "PNG"),
        "png-rgb-coffee": _save(coffee, "PNG"),
        "png-rgb-odd": _save(odd, "PNG"),
        "png-rgb-noise": _save(noise, "PNG"),
        "png-rgba-translucent": _save(_alpha(chelsea, opaque=False), "PNG"),
        "png-rgba-opaque": _save(_alpha(chelsea, opaque=True), "PNG"),
        "png-grey": _save(grey, "PNG"),
        "png-grey-odd": _save(odd[..., 0], "PNG"),
        "png-1x1": _save(noise[:1, :1], "PNG"),
        "png-interlaced-rgb": _png(odd, 2, interlace=1),
        "png-interlaced-rgba": _png(_alpha(noise, opaque=False), 6, interlace=1),
        "png-interlaced-grey": _png(smooth[:37, :29, 0], 0, interlace=1),
        "png-text-phys": _save(coffee, "PNG", dpi=(72, 72), pnginfo=_pnginfo(b"tEXt", b"Software\0test")),
        "png-text-after-data": _after_data(_save(noise, "PNG"), _chunk(b"tEXt", b"Comment\0after")),
        "png-two-idat-chunks": _split_data(_save(coffee, "PNG"), b""),
    }
    for w, h in ((1, 1), (2, 3), (5, 7), (9, 9)):  # Adam7 passes that are empty or one pixel wide
        out[f"png-interlaced-{w}x{h}"] = _png(_random(h, w, seed=w * h), 2, interlace=1)
    for name, arr in {"astronaut": astronaut, "coffee": coffee, "odd": odd, "smooth": smooth}.items():
        for quality in (50, 95):
            for subsampling, label in ((0, "444"), (1, "422"), (2, "420")):
                out[f"jpeg-{name}-q{quality}-{label}"] = _save(arr, "JPEG", quality=quality, subsampling=subsampling)
            out[f"jpeg-{name}-q{quality}-progressive"] = _save(arr, "JPEG", quality=quality, progressive=True)
    out |= {
        "jpeg-noise": _save(noise, "JPEG"),
        "jpeg-grey": _save(grey, "JPEG"),
        "jpeg-grey-progressive-odd": _save(odd[..., 2], "JPEG", progressive=True),
        "jpeg-1x1": _save(noise[:1, :1], "JPEG"),
        "jpeg-exif-orientation-1": _save(chelsea, "JPEG", exif=_exif(1)),
        "jpeg-xmp-without-orientation": _save(chelsea, "JPEG", xmp=b"<x:xmpmeta><rdf:Description/></x:xmpmeta>"),
        "jpeg-restart-markers": _save(coffee, "JPEG", restart_marker_blocks=4),
    }
    return out


def _in_scan(jpeg: bytes, insert: bytes) -> bytes:
    """``jpeg`` with ``insert`` put halfway through its entropy-coded data."""
    mid = (jpeg.index(b"\xff\xda") + len(jpeg)) // 2
    return jpeg[:mid] + insert + jpeg[mid:]


@functools.cache
def fallbacks() -> dict[str, bytes]:
    """What the fast path leaves to Pillow: colour descriptions, orientation, transparency keys, many frames, depth."""
    rgb = _random(48, 64, seed=3, smooth=True)
    im = Image.fromarray(rgb)
    srgb_icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    png = encode(im, "PNG")
    jpeg = encode(im, "JPEG")
    sof = jpeg.index(b"\xff\xc0")
    return {
        "png-16-bit-grey": encode(Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), "PNG"),
        "png-16-bit-rgb": _png(rgb.astype(np.uint16) * 257, 2, depth=16),
        "png-palette": encode(im.convert("P"), "PNG"),
        "png-grey-alpha": encode(im.convert("LA"), "PNG"),
        "png-trns": encode(im, "PNG", transparency=tuple(int(v) for v in rgb[0, 0])),
        "png-trns-after-data": _after_data(png, _chunk(b"tRNS", bytes(6))),
        "png-iccp": encode(im, "PNG", icc_profile=srgb_icc),
        "png-srgb": encode(im, "PNG", pnginfo=_pnginfo(b"sRGB", b"\0")),
        "png-gama": encode(im, "PNG", pnginfo=_pnginfo(b"gAMA", struct.pack(">I", 100000))),
        "png-chrm": encode(im, "PNG", pnginfo=_pnginfo(b"cHRM", struct.pack(">8I", *[31270] * 8))),
        "png-cicp": encode(im, "PNG", pnginfo=_pnginfo(b"cICP", bytes([9, 13, 0, 1]))),
        "png-apng": encode(im, "PNG", save_all=True, append_images=[Image.fromarray(255 - rgb)]),
        "png-exif-orientation": encode(im, "PNG", exif=_exif(6)),
        "png-exif-after-data": _after_data(png, _chunk(b"eXIf", _exif(6).tobytes())),
        "png-iccp-after-data": _after_data(png, _chunk(b"iCCP", b"p\0\0" + zlib.compress(srgb_icc))),
        "png-text-exif-after-data": _after_data(png, _chunk(b"tEXt", b"exif\0" + _exif(6).tobytes())),
        "png-text-exif-keyword": encode(im, "PNG", pnginfo=_pnginfo(b"tEXt", b"exif\0" + _exif(6).tobytes())),
        "png-text-interlace-keyword": encode(im, "PNG", pnginfo=_pnginfo(b"tEXt", b"interlace\0" + b"1")),
        "png-ztxt": encode(im, "PNG", pnginfo=_pnginfo(b"zTXt", b"Comment\0\0" + zlib.compress(b"hi"))),
        "png-private-chunk": encode(im, "PNG", pnginfo=_pnginfo(b"prVt", b"data")),
        "png-split-image-data": _split_data(png, _chunk(b"tEXt", b"Comment\0split")),
        "png-bad-adler32": _bad_adler(png),
        "png-extra-image-data": _png(np.vstack([rgb, rgb]), 2, size=(64, 48)),  # twice the rows the header says
        "png-no-iend": png[:-12],
        "png-garbage-after-signature": PNG_SIGNATURE + np.random.default_rng(4).bytes(200),
        "jpeg-icc": encode(im, "JPEG", icc_profile=srgb_icc),
        "jpeg-exif-orientation-6": encode(im, "JPEG", exif=_exif(6)),
        "jpeg-xmp-orientation-6": encode(
            im, "JPEG", xmp=b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
        ),
        "jpeg-corrupt-scan": _in_scan(jpeg, b"\xff\xd3"),  # libjpeg warns (Pillow decodes on), simplejpeg refuses
        "jpeg-cmyk": encode(im.convert("CMYK"), "JPEG"),
        "jpeg-adobe-rgb": encode(im, "JPEG", keep_rgb=True),
        "jpeg-mpo": encode(im, "MPO", save_all=True, append_images=[Image.fromarray(255 - rgb)]),
        "jpeg-luma-1x2": jpeg[: sof + 11] + bytes([0x12]) + jpeg[sof + 12 :],  # 4:4:0 sampling in the frame header
        "jpeg-12-bit-header": jpeg[: sof + 4] + bytes([12]) + jpeg[sof + 5 :],
    }


# --- the same pixels -------------------------------------------------------------------------------------------------
def _pillow(data: bytes, limits: DecodeLimits = LIMITS) -> np.ndarray:
    return views._array(decode_pil(data, limits)[0])


def _viewed(data: bytes, limits: DecodeLimits = LIMITS) -> tuple:
    """Everything decode_views gives, comparable; or the error it raises."""
    try:
        got = decode_views(data, limits, CLIP_GEOMETRY)
    except ImageDecodeError as exc:
        return ("error", str(exc))
    arrays = [(v.label, v.array.dtype.str, v.array.shape, v.array.tobytes()) for v in got.views]
    return got.total, got.sampled, got.truncated, arrays


def _pillow_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(views, "fast_frame", lambda data, limits: None)
    monkeypatch.setattr(images, "fast_frame", lambda data, limits: None)


@pytest.mark.parametrize("name", sorted(eligible()))
def test_plain_png_and_jpeg_decode_to_exactly_the_pillow_array(name):
    data = eligible()[name]
    fast, slow = fast_frame(data, LIMITS), _pillow(data)
    assert fast is not None, "not taken by the fast path"
    assert (fast.dtype, fast.shape) == (slow.dtype, slow.shape) and np.array_equal(fast, slow)
    flags = ("C_CONTIGUOUS", "WRITEABLE")
    assert {f: fast.flags[f] for f in flags} == {f: slow.flags[f] for f in flags}


@pytest.mark.parametrize("name", sorted(eligible()))
def test_views_and_decode_are_the_same_with_the_fast_path_on_and_off(name, monkeypatch):
    data = eligible()[name]
    fast_views, fast_decoded = _viewed(data), decode(data)
    _pillow_only(monkeypatch)
    assert _viewed(data) == fast_views
    slow_decoded = decode(data)
    assert fast_decoded.truncated is slow_decoded.truncated is False
    assert np.array_equal(fast_decoded.array, slow_decoded.array)
    assert fast_decoded.array.shape == slow_decoded.array.shape
    assert fast_decoded.array.flags["C_CONTIGUOUS"] and slow_decoded.array.flags["C_CONTIGUOUS"]


def test_the_corpus_covers_translucent_opaque_and_grey_layouts():
    shapes = {name: fast_frame(data, LIMITS).shape for name, data in eligible().items()}
    assert shapes["png-rgba-translucent"][2] == 4 and shapes["png-rgba-opaque"][2] == 3
    assert shapes["png-grey"][2] == shapes["jpeg-grey"][2] == 3
    assert shapes["png-rgb-odd"] == shapes["jpeg-odd-q50-420"] == (517, 333, 3)


def test_decoding_from_many_threads_gives_the_same_arrays():
    corpus = list(eligible().values())
    serial = [fast_frame(d, LIMITS) for d in corpus]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda d: fast_frame(d, LIMITS), corpus * 2))
    assert all(np.array_equal(a, b) for a, b in zip(serial * 2, parallel, strict=True))


# --- what goes to Pillow ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(fallbacks()))
def test_anything_but_a_plain_image_goes_to_pillow(name, monkeypatch):
    data = fallbacks()[name]
    assert fast_frame(data, LIMITS) is None
    assert fast_frame(data, DecodeLimits(max_pixels=10**12)) is None
    on = _viewed(data)
    _pillow_only(monkeypatch)
    assert _viewed(data) == on


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_truncated_file_goes_to_pillow_which_scores_what_decodes(fmt, monkeypatch):
    whole = encode(Image.fromarray(_random(256, 256, seed=5)), fmt)
    data = whole[: len(whole) // 2]
    assert fast_frame(whole, LIMITS) is not None and fast_frame(data, LIMITS) is None
    got = decode_views(data, LIMITS, CLIP_GEOMETRY)
    assert got.truncated is True
    on = _viewed(data)
    _pillow_only(monkeypatch)
    assert _viewed(data) == on


def test_corrupt_image_data_goes_to_pillow(monkeypatch):
    png = bytearray(encode(Image.fromarray(_random(64, 64, seed=6)), "PNG"))
    start = png.index(b"IDAT") + 4
    png[start + 10 : start + 40] = bytes(30)  # broken deflate stream, chunk framing intact
    assert fast_frame(bytes(png), LIMITS) is None
    on = _viewed(bytes(png))
    _pillow_only(monkeypatch)
    assert _viewed(bytes(png)) == on


def test_a_png_pillow_refuses_for_its_checksum_stays_refused():
    """pyspng has libspng ignore the zlib Adler-32; Pillow refuses the file. The fast path checks it with zlib."""
    import pyspng

    data = fallbacks()["png-bad-adler32"]
    assert pyspng.load(data).shape == (48, 64, 3)  # what libspng alone would have scored
    assert fast_frame(data, LIMITS) is None
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        decode_views(data, LIMITS, CLIP_GEOMETRY)


@pytest.mark.parametrize(
    ("data", "limits"),
    [
        (_png(np.zeros((1, 1, 3), np.uint8), 2, size=(100_000, 100_000)), LIMITS),  # 10 G pixels, tiny IDAT
        (_png(np.zeros((8, 8, 3), np.uint8), 2, size=(8_000, 6_000)), LIMITS),  # 48 MP: over max_pixels only
        (encode(Image.fromarray(_random(20, 20, seed=7)), "PNG"), DecodeLimits(max_pixels=100)),
        (encode(Image.fromarray(_random(20, 20, seed=7)), "JPEG"), DecodeLimits(max_pixels=100)),
    ],
    ids=["png-10-gigapixels", "png-48-megapixels", "png-limit-100", "jpeg-limit-100"],
)
def test_a_bomb_is_refused_with_the_pillow_path_words_before_any_decode(data, limits, monkeypatch):
    import pyspng
    import simplejpeg

    def never(*args, **kwargs):
        raise AssertionError("decoded an image over the pixel limit")

    monkeypatch.setattr(pyspng, "load", never)
    monkeypatch.setattr(simplejpeg, "decode_jpeg", never)
    assert fast_frame(data, limits) is None
    with pytest.raises(ImageDecodeError) as fast_on:
        decode_views(data, limits, CLIP_GEOMETRY)
    _pillow_only(monkeypatch)
    with pytest.raises(ImageDecodeError) as fast_off:
        decode_views(data, limits, CLIP_GEOMETRY)
    assert str(fast_on.value) == str(fast_off.value)
    assert "bomb" in str(fast_on.value) or "over the limit" in str(fast_on.value)


def test_an_object_over_the_byte_limit_goes_to_pillow():
    data = eligible()["png-rgb-noise"]
    assert fast_frame(data, DecodeLimits(max_bytes=len(data) - 1)) is None
    assert fast_frame(b"", LIMITS) is None


def test_the_operator_switch_sends_everything_to_pillow(monkeypatch):
    data = next(iter(eligible().values()))
    assert fast_frame(data, LIMITS) is not None
    monkeypatch.setenv("DIFFGUARD_FAST_DECODE", "0")
    assert fast_frame(data, LIMITS) is None  # read per call: no restart of the process
    switched = _viewed(data)
    _pillow_only(monkeypatch)
    assert switched == _viewed(data)
