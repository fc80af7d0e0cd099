"""The bad-input corpus: one shared set of hostile and unusual inputs, run against every entry point.

Image cases (bytes + the name they arrive under) go through the core ``check``, ``diffguard check``, ``/v1/moderate``
and the bucket ``scan``; each expects either a score or a per-image error matching the "Bad input" table of docs/CLI.md.
A per-image error is an unscorable image: its verdict carries the policy's ``unscorable_action`` (``block`` by default),
never a null action. A truncated file with enough image data is scored on what decodes (``truncated``); one cut off
before its image data is unscorable.
HTTP cases add what only a request can carry: bodies, content types, multipart framing, prompts and parameters.

>>> from tests.corpus import image_cases, generate_cases
>>> [c.name for c in image_cases()][:3]
['zero-bytes', 'plain-text', 'svg-as-png']
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from tests import adversarial

# The documented per-image errors (docs/CLI.md, "Bad input"); a case's ``error`` is one of these patterns.
EMPTY = r"empty file"
NOT_IMAGE = r"not a recognised image format"
CORRUPT = r"corrupt or truncated"
TOO_LARGE = r"over the limit|decompression bomb"
SCORED = None  # decoded (converted when needed) and scored


@dataclass(frozen=True)
class ImageCase:
    name: str  # unique id, also the file stem
    suffix: str  # what the file claims to be
    data: bytes
    error: str | None  # regex the per-image error must match; None: the image is scored
    content_type: str = "application/octet-stream"  # sent with raw /v1/moderate bodies
    truncated: bool = False  # a truncated file that is scored on what decodes (the verdict says truncated: true)

    @property
    def unscorable(self) -> bool:
        """Read but not scorable: withheld with the policy's ``unscorable_action`` (``block`` by default)."""
        return self.error is not None

    @property
    def filename(self) -> str:
        return f"{self.name}{self.suffix}"


@dataclass(frozen=True)
class HttpCase:
    name: str
    route: str  # /v1/moderate or /v1/generate
    status: int  # the documented status
    message: str  # regex the response's `error` must match ("" for 200)
    request: Callable[[], dict[str, Any]] = field(repr=False)  # fresh httpx.post kwargs (bodies may be generators)


def _encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noise(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _chunk(kind: bytes, payload: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + payload) if crc is None else crc
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming ``width`` x ``height``, a token IDAT: a bomb's header, no payload."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def gif_header_only(width: int, height: int) -> bytes:
    """A GIF whose logical screen and single frame claim ``width`` x ``height`` with a one-pixel payload."""
    screen = b"GIF89a" + struct.pack("<HH", width, height) + b"\x80\x00\x00" + b"\0\0\0\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHH", 0, 0, width, height) + b"\x00" + b"\x02\x02\x44\x01\x00" + b"\x3b"
    return screen + frame


def _exif_rotated() -> bytes:
    im = Image.new("RGB", (40, 20), (10, 200, 10))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90° on display
    return _encode(im, "JPEG", exif=exif)


def _palette_transparent() -> bytes:
    im = Image.new("P", (8, 8), 1)
    im.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)
    return _encode(im, "PNG", transparency=0)


def _animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    return _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def _bad_crc_png() -> bytes:
    good = _encode(_noise(16, 16), "PNG")
    ihdr_crc_at = 8 + 8 + 13  # signature, length + type, payload
    return good[:ihdr_crc_at] + b"\0\0\0\0" + good[ihdr_crc_at + 4 :]


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


@functools.cache
def image_cases() -> tuple[ImageCase, ...]:
    """48 image inputs. Built once per process (the 50 MP bomb takes a moment)."""
    png, jpeg = _encode(_noise(48, 64), "PNG"), _encode(_noise(48, 64), "JPEG", quality=90)
    return (
        ImageCase("zero-bytes", ".png", b"", EMPTY, "image/png"),
        ImageCase("plain-text", ".png", b"hello, I am not an image at all\n", NOT_IMAGE, "image/png"),
        # An SVG is what a browser shows: rendered (no scripts, network or files) and scored, whatever its name.
        ImageCase("svg-as-png", ".png", b'<svg xmlns="http://www.w3.org/2000/svg"><rect/></svg>', SCORED),
        ImageCase("html-as-jpg", ".jpg", b"<!DOCTYPE html><html><body>hi</body></html>", NOT_IMAGE, "image/jpeg"),
        ImageCase("random-binary", ".png", bytes(np.random.default_rng(1).integers(0, 256, 512, np.uint8)), NOT_IMAGE),
        ImageCase("zip-as-png", ".png", b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + b"\x00" * 40, NOT_IMAGE),
        ImageCase("pdf-as-jpg", ".jpg", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", NOT_IMAGE),
        ImageCase("utf16-text", ".png", "not an image".encode("utf-16"), NOT_IMAGE),
        ImageCase("png-signature-only", ".png", png[:8], CORRUPT, "image/png"),
        ImageCase("png-truncated-header", ".png", png[:60], CORRUPT, "image/png"),
        ImageCase("png-truncated-half", ".png", _half(png), SCORED, "image/png", truncated=True),
        ImageCase("png-bad-crc", ".png", _bad_crc_png(), CORRUPT, "image/png"),
        ImageCase("jpeg-truncated-half", ".jpg", _half(jpeg), SCORED, "image/jpeg", truncated=True),
        ImageCase("jpeg-soi-then-junk", ".jpg", b"\xff\xd8\xff\xe0 not really a jpeg", CORRUPT, "image/jpeg"),
        ImageCase("gif-truncated", ".gif", _encode(_noise(32, 32), "GIF")[:400], CORRUPT, "image/gif"),
        ImageCase("webp-truncated", ".webp", _encode(_noise(32, 32), "WEBP")[:50], CORRUPT, "image/webp"),
        ImageCase("bmp-truncated", ".bmp", _half(_encode(_noise(32, 32), "BMP")), SCORED, "image/bmp", truncated=True),
        ImageCase("tiff-truncated", ".tif", _encode(_noise(32, 32), "TIFF")[:100], CORRUPT, "image/tiff"),
        ImageCase("bomb-50mp-png", ".png", _encode(Image.new("L", (10_000, 5_000)), "PNG"), TOO_LARGE, "image/png"),
        ImageCase("bomb-header-10gp-png", ".png", png_header_only(100_000, 100_000), TOO_LARGE, "image/png"),
        ImageCase("bomb-header-4gp-gif", ".gif", gif_header_only(65_535, 65_535), TOO_LARGE, "image/gif"),
        ImageCase("one-by-one-png", ".png", _encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), SCORED, "image/png"),
        ImageCase("one-by-one-jpeg", ".jpg", _encode(Image.new("RGB", (1, 1), (9, 9, 9)), "JPEG"), SCORED),
        ImageCase("aspect-1x4000", ".png", _encode(_noise(4000, 1), "PNG"), SCORED, "image/png"),
        ImageCase("aspect-4000x1", ".png", _encode(_noise(1, 4000), "PNG"), SCORED, "image/png"),
        ImageCase("cmyk-jpeg", ".jpg", _encode(Image.new("CMYK", (20, 10), (0, 255, 0, 0)), "JPEG"), SCORED),
        ImageCase("gray16-png", ".png", _encode(Image.new("I;16", (20, 10), 40_000), "PNG"), SCORED, "image/png"),
        ImageCase("gray16-tiff", ".tif", _encode(Image.new("I;16", (20, 10), 40_000), "TIFF"), SCORED),
        ImageCase("float32-tiff", ".tiff", _encode(Image.new("F", (20, 10), 3.5), "TIFF"), SCORED),
        ImageCase("palette-transparent-png", ".png", _palette_transparent(), SCORED, "image/png"),
        ImageCase("rgba-png", ".png", _encode(Image.new("RGBA", (20, 10), (255, 0, 0, 0)), "PNG"), SCORED),
        ImageCase("one-bit-png", ".png", _encode(Image.new("1", (20, 10), 1), "PNG"), SCORED, "image/png"),
        ImageCase("animated-gif", ".gif", _animated("GIF"), SCORED, "image/gif"),
        ImageCase("animated-png", ".png", _animated("PNG"), SCORED, "image/png"),
        ImageCase("animated-webp", ".webp", _animated("WEBP"), SCORED, "image/webp"),
        ImageCase("exif-rotated-jpeg", ".jpg", _exif_rotated(), SCORED, "image/jpeg"),
        ImageCase("png-trailing-junk", ".png", png + b"\0junk after IEND" * 8, SCORED, "image/png"),
        ImageCase("ico", ".ico", _encode(_noise(32, 32), "ICO"), SCORED, "image/x-icon"),
        ImageCase("bmp", ".bmp", _encode(_noise(20, 30), "BMP"), SCORED, "image/bmp"),
        ImageCase("progressive-jpeg", ".jpg", _encode(_noise(40, 40), "JPEG", progressive=True), SCORED),
        ImageCase("png-labelled-jpeg", ".jpg", png, SCORED, "image/jpeg"),  # the bytes decide, not the name
        *_truncated_cases(),
    )


_MIME = {"JPEG": ("image/jpeg", ".jpg"), "PROGRESSIVE_JPEG": ("image/jpeg", ".jpg")}


def _truncated_cases() -> list[ImageCase]:
    """The adversarial truncations (tests/adversarial.py): the last 2% cut off (scored on what decodes) and cut
    where the image data begins (unscorable), per format."""
    cases = []
    for fmt in adversarial.TRUNCATED_FORMATS:
        mime, suffix = _MIME.get(fmt, (f"image/{fmt.lower()}", f".{fmt.lower()}"))
        name = fmt.lower().replace("_", "-")
        cases.append(ImageCase(f"{name}-last-2pct-cut", suffix, adversarial.truncated(fmt), SCORED, mime, True))
        if fmt != "PROGRESSIVE_JPEG":
            cases.append(ImageCase(f"{name}-header-only", suffix, adversarial.header_only(fmt), CORRUPT, mime))
    return cases


def scored_cases() -> list[ImageCase]:
    return [c for c in image_cases() if c.error is None]


# --- HTTP cases ---------------------------------------------------------------------------------------------------
def _chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    """A body streamed without Content-Length (chunked transfer): the limit must hold while reading."""
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        sent += n
        yield b"\0" * n


def _multipart(body: bytes, boundary: str = "zzz") -> dict[str, Any]:
    return {"content": body, "headers": {"Content-Type": f"multipart/form-data; boundary={boundary}"}}


def moderate_cases(max_body_bytes: int) -> list[HttpCase]:
    """What a /v1/moderate request can get wrong beyond the image bytes. ``max_body_bytes``: the ingress limit."""
    over = max_body_bytes + 100
    one_png = _encode(_noise(16, 16), "PNG")
    good_part = (
        b'--zzz\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + one_png + b"\r\n--zzz--\r\n"
    )
    return [
        HttpCase("oversized-declared", "/v1/moderate", 413, "limit", lambda: {"content": b"\0" * over}),
        HttpCase("oversized-chunked", "/v1/moderate", 413, "limit", lambda: {"content": _chunks(over)}),
        HttpCase(
            "oversized-multipart",
            "/v1/moderate",
            413,
            "limit",
            lambda: {"files": [("files", ("big.png", b"\0" * over, "image/png"))]},
        ),
        HttpCase("json-body", "/v1/moderate", 415, "multipart/form-data", lambda: {"json": {"image": "abc"}}),
        HttpCase(
            "text-plain",
            "/v1/moderate",
            415,
            "multipart/form-data",
            lambda: {"content": one_png, "headers": {"Content-Type": "text/plain"}},
        ),
        HttpCase(
            "form-urlencoded",
            "/v1/moderate",
            415,
            "multipart/form-data",
            lambda: {"data": {"files": "x"}},
        ),
        HttpCase("multipart-garbage", "/v1/moderate", 422, "no `files` field", lambda: _multipart(b"--zzz\r\nxx")),
        HttpCase(
            "multipart-bad-part-header",
            "/v1/moderate",
            400,
            "malformed multipart",
            lambda: _multipart(b"--zzz\r\nthis is not a header\r\n\r\nabc\r\n--zzz--\r\n"),
        ),
        HttpCase(
            "multipart-part-without-name",
            "/v1/moderate",
            400,
            "malformed multipart",
            lambda: _multipart(b"--zzz\r\nContent-Type: image/png\r\n\r\nabc\r\n--zzz--\r\n"),
        ),
        HttpCase(
            "multipart-unterminated",
            "/v1/moderate",
            422,
            "no `files` field",
            lambda: _multipart(good_part[: len(good_part) // 2]),
        ),
        HttpCase(
            "multipart-wrong-boundary",
            "/v1/moderate",
            400,
            "malformed multipart",
            lambda: _multipart(good_part, boundary="other"),
        ),
        HttpCase(
            "multipart-no-boundary",
            "/v1/moderate",
            400,
            "malformed multipart",
            lambda: {"content": good_part, "headers": {"Content-Type": "multipart/form-data"}},
        ),
        HttpCase("multipart-empty", "/v1/moderate", 422, "no `files` field", lambda: _multipart(b"--zzz--\r\n")),
        HttpCase(
            "multipart-files-as-text",
            "/v1/moderate",
            422,
            "no `files` field",
            lambda: {"data": {"files": "not a file"}, "files": {"other": ("o.txt", b"1", "text/plain")}},
        ),
        HttpCase("empty-raw-body", "/v1/moderate", 400, "empty file", lambda: {"content": b""}),
        HttpCase(
            "image-type-text-body",
            "/v1/moderate",
            400,
            NOT_IMAGE,
            lambda: {"content": b"just words", "headers": {"Content-Type": "image/png"}},
        ),
        HttpCase(
            "all-files-broken",
            "/v1/moderate",
            400,
            "no uploaded file could be decoded",
            lambda: {"files": [("files", ("a.png", b"\x89PNG\r\n\x1a\n", "image/png")), ("files", ("b", b"", ""))]},
        ),
        HttpCase(
            "odd-filename-header",
            "/v1/moderate",
            200,
            "",
            lambda: {
                "content": one_png,
                "headers": {"Content-Type": "image/png", "X-Filename": b"\xfc ../../etc/passwd<script>"},
            },
        ),
        HttpCase(
            "many-files",
            "/v1/moderate",
            200,
            "",
            lambda: {"files": [("files", (f"{i}.png", one_png, "image/png")) for i in range(64)]},
        ),
        HttpCase(
            "files-over-limit",
            "/v1/moderate",
            413,
            "carries 65 files; the limit is 64",
            lambda: {"files": [("files", (f"{i}.png", one_png, "image/png")) for i in range(65)]},
        ),
        HttpCase(
            "a-thousand-files",
            "/v1/moderate",
            413,
            "carries 1000 files; the limit is 64",
            lambda: {"files": [("files", (f"{i}.png", b"x", "image/png")) for i in range(1000)]},
        ),
    ]


def _json(body: Any) -> Callable[[], dict[str, Any]]:
    return lambda: {"json": body}


def _raw(body: bytes, content_type: str = "application/json") -> Callable[[], dict[str, Any]]:
    return lambda: {"content": body, "headers": {"Content-Type": content_type}}


FAST = {"steps": 1, "width": 64, "height": 64, "seed": 5}  # the cheapest valid generation


def generate_cases(max_body_bytes: int) -> list[HttpCase]:
    """Prompts and parameters for /v1/generate: 422 for each bad field, 200 for odd-but-valid ones."""
    g = "/v1/generate"
    return [
        HttpCase("missing-prompt", g, 422, "`prompt` is required", _json({"steps": 2})),
        HttpCase("empty-prompt", g, 422, "must not be empty", _json({"prompt": "   ", **FAST})),
        HttpCase("prompt-not-string", g, 422, "`prompt`", _json({"prompt": ["a", "b"]})),
        HttpCase("prompt-too-long", g, 422, "the limit is 2000", _json({"prompt": "a" * 2001})),
        HttpCase("prompt-control-chars", g, 422, r"control characters U\+0000", _json({"prompt": "a\x00b\x1bc"})),
        HttpCase("prompt-lone-surrogate", g, 422, r"U\+D800", _raw(b'{"prompt": "bad \\ud800 half"}')),
        HttpCase(
            "negative-control-chars", g, 422, "`negative_prompt`", _json({"prompt": "a", "negative_prompt": "\x07"})
        ),
        HttpCase("invalid-utf8", g, 422, "not valid JSON", _raw(b'{"prompt": "caf\xc3\x28 \xff"}')),
        HttpCase("not-json", g, 422, "not valid JSON", _raw(b"{not json")),
        HttpCase("empty-body", g, 422, "not valid JSON", _raw(b"")),
        HttpCase("json-array", g, 422, "must be a JSON object", _json(["prompt", "a"])),
        HttpCase("json-nested-100k", g, 422, "nested too deeply", _raw(b"[" * 100_000 + b"]" * 100_000)),
        HttpCase(
            "prompt-nested-100k",
            g,
            422,
            "nested too deeply",
            _raw(b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        ),
        HttpCase("prompt-nested-500", g, 422, "`prompt`", _raw(b'{"prompt": ' + b"[" * 500 + b"]" * 500 + b"}")),
        HttpCase("json-string", g, 422, "must be a JSON object", _json("a red bicycle")),
        HttpCase("unknown-field", g, 422, "not a known field", _json({"prompt": "a", "nsfw_ok": True})),
        HttpCase(
            "num-images-huge", g, 422, "`num_images` must be within 1..4", _json({"prompt": "a", "num_images": 10**9})
        ),
        HttpCase("num-images-zero", g, 422, "`num_images` must be within", _json({"prompt": "a", "num_images": 0})),
        HttpCase("num-images-text", g, 422, "`num_images`", _json({"prompt": "a", "num_images": "four"})),
        HttpCase("num-images-float", g, 422, "`num_images`", _json({"prompt": "a", "num_images": 2.0})),
        HttpCase("steps-negative", g, 422, "`steps` must be within 1..150", _json({"prompt": "a", "steps": -1})),
        HttpCase("steps-bool", g, 422, "`steps`", _json({"prompt": "a", "steps": True})),
        HttpCase(
            "guidance-nan", g, 422, "`guidance_scale` must be within", _raw(b'{"prompt": "a", "guidance_scale": NaN}')
        ),
        HttpCase("guidance-inf", g, 422, "`guidance_scale`", _raw(b'{"prompt": "a", "guidance_scale": Infinity}')),
        HttpCase("width-not-multiple", g, 422, "`width` must be a multiple of 8", _json({"prompt": "a", "width": 100})),
        HttpCase("height-huge", g, 422, "`height` must be a multiple", _json({"prompt": "a", "height": 1 << 20})),
        HttpCase("width-text", g, 422, "`width`", _json({"prompt": "a", "width": "wide"})),
        HttpCase("seed-negative", g, 422, "`seed` must be within", _json({"prompt": "a", "seed": -1})),
        HttpCase("seed-huge", g, 422, "`seed` must be within", _json({"prompt": "a", "seed": 2**70})),
        HttpCase("safety-unknown", g, 422, "`safety`", _json({"prompt": "a", "safety": "extreme"})),
        HttpCase(
            "safety-without-cfg",
            g,
            422,
            "needs `guidance_scale` > 1",
            _json({"prompt": "a", "safety": "max", "guidance_scale": 1}),
        ),
        HttpCase("wrong-content-type", g, 415, "application/json", _raw(b"prompt=a", "text/plain")),
        HttpCase("form-content-type", g, 415, "application/json", lambda: {"data": {"prompt": "a"}}),
        HttpCase("oversized-body", g, 413, "limit", _raw(b"x" * (max_body_bytes + 100))),
        HttpCase("oversized-chunked", g, 413, "limit", lambda: {"content": _chunks(max_body_bytes + 100)}),
        # odd but valid: each must generate, and every image must carry its own verdict
        HttpCase("unicode-prompt", g, 200, "", _json({"prompt": "ein Fahrrad 🚲 — 自転車 دراجة", **FAST})),
        HttpCase("tabs-newlines", g, 200, "", _json({"prompt": "a\tred\nbicycle", "negative_prompt": "", **FAST})),
        HttpCase("over-77-tokens", g, 200, "", _json({"prompt": "red bicycle " * 100, **FAST})),
        HttpCase(
            "charset-json",
            g,
            200,
            "",
            _raw(b'{"prompt": "a", "steps": 1, "seed": 0}', "application/json; charset=utf-8"),
        ),
        HttpCase(
            "seed-max", g, 200, "", _json({"prompt": "a", "steps": 1, "width": 64, "height": 64, "seed": 2**32 - 1})
        ),
    ]
