"""SVG and SVGZ documents -> RGBA PNG bytes of what a browser shows, rasterised without network, files or runaway work.

resvg (through ``resvg_py``) rather than cairosvg: resvg is a maintained Rust renderer with no script engine and no
network stack, and it renders deterministically; cairosvg fetches ``href`` URLs unless given a ``url_fetcher`` override
and depends on the system's cairo. resvg does read local files named by ``href``, so every document is sanitised
first (:func:`sanitise`): entity declarations are refused, non-``data:`` references, scripts and ``foreignObject``
are removed. Native code cannot be interrupted from Python, so rendering runs in a child process
(``python -m pipeline.svg``: SVG on stdin, PNG on stdout) under a memory cap and a wall-clock timeout.

    png = render_svg(data, DecodeLimits())  # RGBA PNG; the caller composites it over white and black
"""

from __future__ import annotations

import base64
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import urllib.parse
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any
from xml.parsers import expat

from .errors import ImageDecodeError

if TYPE_CHECKING:
    from .images import DecodeLimits

SNIFF_BYTES = 64 * 1024  # leading bytes (decompressed, for svgz) that must reach the <svg> root element
MAX_SIDE = 1024  # px: the canvas's long side is scaled down to this
MIN_SIDE = 224  # px: a small canvas is scaled up until its short side reaches this (the checker's input size)
DEFAULT_SIZE = (300.0, 150.0)  # px: a browser's size for an SVG that states none
MAX_RENDER_S = 30.0  # s: the child's timeout never exceeds this, whatever limits.max_decode_s says
MEMORY_CAP = 2 * 1024**3  # bytes of address space the rendering child may map (RLIMIT_AS)
MAX_NESTING = 3  # data:image/svg+xml documents nested deeper than this are refused
_UNITS = {"": 1.0, "px": 1.0, "pt": 4 / 3, "pc": 16.0, "mm": 96 / 25.4, "cm": 96 / 2.54, "in": 96.0, "em": 16, "ex": 8}
# px per unit (CSS: 96 px per inch; em and ex at the 16 px default font size)
_PROLOG = re.compile(
    r"\s*(?:<\?.*?\?>|<!--.*?-->|<!DOCTYPE\s+(?:\w+:)?svg\b[^\[>]*(?:\[.*?\]\s*)?>)", re.DOTALL | re.IGNORECASE
)
_ROOT = re.compile(r"\s*<(?:[A-Za-z_][\w.-]*:)?svg[\s/>]")
_LENGTH = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*([a-z%]*)\s*$", re.IGNORECASE)
_DROPPED = frozenset({"script", "foreignObject"})
_RASTERS = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a")  # with WebP: what resvg's <image> decodes


def _local(name: Any) -> str:
    return name.rsplit("}", 1)[-1] if isinstance(name, str) else ""


def _gunzip(data: bytes, limit: int) -> bytes:
    """A gzip stream's content, refused once it passes ``limit`` bytes (a gzip bomb is never inflated in full)."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as e:
        raise ImageDecodeError(f"corrupt gzip-compressed SVG: {e}") from None
    if len(out) > limit:
        raise ImageDecodeError(f"SVGZ decompresses to more than the limit of {limit} bytes (max_bytes)")
    return out


def is_svg(data: bytes) -> bool:
    """Whether the bytes are an SVG document (or a gzip-compressed one), judged by content, never by name."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[:SNIFF_BYTES], SNIFF_BYTES)
        except zlib.error:
            return False
    data = data[:SNIFF_BYTES].removeprefix(b"\xef\xbb\xbf")
    head = data[:1024].decode("utf-8", "replace").lstrip()  # what \s* skips, then the first character
    if len(head) > 8 and head[0] != "<":  # no prolog or root can start here: a PNG or JPEG costs no 64 KiB decode
        return False
    text = data.decode("utf-8", "replace")
    pos = 0
    while match := _PROLOG.match(text, pos):  # the XML declaration, comments, processing instructions, a DOCTYPE svg
        pos = match.end()
    return _ROOT.match(text, pos) is not None


def _refuse_entities(data: bytes) -> None:
    """Parse once with expat, refusing any DOCTYPE internal subset or entity declaration before anything expands."""

    def doctype(name: str, system_id: str | None, public_id: str | None, has_internal_subset: bool) -> None:
        if has_internal_subset:
            raise ImageDecodeError("SVG has a DOCTYPE with an internal subset; entity declarations are refused")

    def entity(name: str, *args: Any) -> None:
        raise ImageDecodeError(f"SVG declares the entity {name!r}; entity declarations are refused")

    parser = expat.ParserCreate()
    parser.StartDoctypeDeclHandler = doctype
    parser.EntityDeclHandler = entity
    try:
        parser.Parse(data, True)
    except expat.ExpatError as e:
        raise ImageDecodeError(f"SVG is not well-formed XML: {e}") from None


def _clean_css(text: str) -> str:
    """Disable ``@import`` rules; replace every ``url(...)`` that is neither a ``#fragment`` nor data: by ``none``.

    A scan with ``str.find`` rather than a regular expression: linear however many unclosed ``url(`` it holds.
    """
    text = re.sub("@import", "@ignored", text, flags=re.IGNORECASE)  # an unknown at-rule, which CSS skips
    lower, out, pos = text.lower(), [], 0
    while (start := lower.find("url(", pos)) >= 0:
        end = lower.find(")", start)
        end = len(text) - 1 if end < 0 else end
        target = text[start + 4 : end].strip(" \t\r\n'\"").lower()
        out += [text[pos:start], text[start : end + 1] if target.startswith(("#", "data:")) else "none"]
        pos = end + 1
    return "".join([*out, text[pos:]])


def _serialise(root: ET.Element) -> bytes:
    try:
        return ET.tostring(root, encoding="utf-8")
    except RecursionError:
        raise ImageDecodeError("SVG elements are nested too deeply to render") from None


def _clean_data_url(url: str, max_bytes: int, depth: int) -> str | None:
    """A raster data: URL unchanged, an SVG one sanitised in turn; None for payloads nothing renders."""
    meta, sep, payload = url.strip()[5:].partition(",")
    try:
        raw = base64.b64decode(payload) if meta.lower().endswith(";base64") else urllib.parse.unquote_to_bytes(payload)
    except ValueError:
        return None
    if not sep or raw.startswith(_RASTERS) or (raw[:4] == b"RIFF" and raw[8:12] == b"WEBP"):
        return url if sep else None  # a raster image cannot reference anything
    if raw[:2] == b"\x1f\x8b":
        raw = _gunzip(raw, max_bytes)
    if not is_svg(raw):
        return None  # neither an image resvg decodes nor an SVG document
    if depth >= MAX_NESTING:
        raise ImageDecodeError(f"SVG nests SVG images more than {MAX_NESTING} deep")
    clean = _serialise(sanitise(raw, max_bytes, depth + 1))
    return "data:image/svg+xml;base64," + base64.b64encode(clean).decode("ascii")


def sanitise(data: bytes, max_bytes: int, depth: int = 0) -> ET.Element:
    """Parse an SVG document, keeping only what renders from the document itself.

    Refuses DOCTYPE internal subsets and entities; removes ``<script>``, ``<foreignObject>``, every ``href`` that is
    not a ``#fragment`` or a ``data:`` URL (nested SVG data is sanitised in turn), CSS ``@import`` and ``url(...)``
    targets outside the document. Comments and processing instructions do not survive the parse.
    """
    _refuse_entities(data)
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise ImageDecodeError(f"SVG is not well-formed XML: {e}") from None
    if _local(root.tag) != "svg":
        raise ImageDecodeError(f"not an SVG document: the root element is <{_local(root.tag)}>")
    for parent in list(root.iter()):
        for child in [c for c in parent if _local(c.tag) in _DROPPED]:
            parent.remove(child)
        if _local(parent.tag) == "style" and parent.text:
            parent.text = _clean_css(parent.text)
        for name, value in list(parent.attrib.items()):
            if _local(name) == "href":
                target = value.strip().lower()
                clean = _clean_data_url(value, max_bytes, depth) if target.startswith("data:") else None
                if target.startswith("#") or clean is not None:
                    parent.attrib[name] = value if target.startswith("#") else clean
                else:
                    del parent.attrib[name]
            elif "url(" in value.lower() or "@import" in value.lower():
                parent.attrib[name] = _clean_css(value)
    return root


def _length(value: str | None) -> float | None:
    """An SVG length in px; None for absent, percentage, unknown-unit, zero, negative or non-finite values."""
    match = _LENGTH.match(value or "") if len(value or "") <= 64 else None
    if not match or match.group(2).lower() not in _UNITS:
        return None
    px = float(match.group(1)) * _UNITS[match.group(2).lower()]
    return px if math.isfinite(px) and px > 0 else None


def _view_box(value: str | None) -> tuple[float, float] | None:
    try:
        _, _, w, h = (float(part) for part in re.split(r"[\s,]+", (value or "").strip()))
    except ValueError:
        return None
    return (w, h) if all(math.isfinite(v) and v > 0 for v in (w, h)) else None


def _canvas(width: float, height: float, max_pixels: int) -> tuple[int, int]:
    """Scale an intrinsic size so the long side is <= MAX_SIDE, the short side >= MIN_SIDE where that allows,
    and width × height <= max_pixels."""
    scale = min(max(1.0, MIN_SIDE / min(width, height)), MAX_SIDE / max(width, height))
    scale = min(scale, math.sqrt(max_pixels / (width * height)))
    return max(1, int(width * scale)), max(1, int(height * scale))


def fit_canvas(root: ET.Element, max_pixels: int) -> tuple[int, int]:
    """Set the root's width, height (and viewBox if absent) to a bounded canvas in px; return that canvas size."""
    width, height = _length(root.get("width")), _length(root.get("height"))
    box = _view_box(root.get("viewBox"))
    if box and width and not height:
        height = width * box[1] / box[0]
    elif box and height and not width:
        width = height * box[0] / box[1]
    elif not (width and height):
        width, height = box or (width or DEFAULT_SIZE[0], height or DEFAULT_SIZE[1])
    if not box:  # without a viewBox, changing width/height would crop rather than scale
        root.set("viewBox", f"0 0 {width!r} {height!r}")
    canvas = _canvas(width, height, max_pixels)
    root.attrib.update(width=str(canvas[0]), height=str(canvas[1]))
    return canvas


def render_svg(data: bytes, limits: DecodeLimits) -> bytes:
    """SVG or SVGZ bytes -> RGBA PNG bytes (transparency kept), or :class:`ImageDecodeError` saying why not."""
    if len(data) > limits.max_bytes:
        raise ImageDecodeError(f"SVG is {len(data)} bytes, over the limit of {limits.max_bytes} bytes (max_bytes)")
    if data[:2] == b"\x1f\x8b":
        data = _gunzip(data, limits.max_bytes)
    if not is_svg(data):
        raise ImageDecodeError("not an SVG document: no <svg> root element at the start")
    root = sanitise(data, limits.max_bytes)
    fit_canvas(root, limits.max_pixels)
    svg = _serialise(root)
    timeout = min(float(limits.max_decode_s), MAX_RENDER_S)  # s
    package_root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="svg-") as empty:  # the child's cwd: relative paths find nothing
        try:
            child = [sys.executable, "-m", "pipeline.svg"]
            done = subprocess.run(child, input=svg, capture_output=True, timeout=timeout, cwd=empty, env=env)
        except subprocess.TimeoutExpired:
            raise ImageDecodeError(f"SVG rendering took over {timeout:g} s") from None
    if done.returncode < 0:  # native code crashed (deep <use> chains overflow resvg's stack) or hit the memory cap
        name = signal.Signals(-done.returncode).name
        hint = f", over the {MEMORY_CAP // 1024**3} GiB memory cap" if name in ("SIGABRT", "SIGKILL") else ""
        raise ImageDecodeError(f"SVG could not be rendered: the renderer crashed ({name}{hint})")
    if done.returncode != 0:
        reason = (done.stderr.decode("utf-8", "replace").strip().splitlines() or ["no message"])[-1]
        raise ImageDecodeError(f"SVG could not be rendered: {reason}")
    if not done.stdout.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ImageDecodeError("SVG could not be rendered: the renderer returned no image")
    return done.stdout


def _main() -> int:
    """Child process: cap memory, read SVG from stdin, write the PNG to stdout; exit 2 with resvg's message."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    import resvg_py

    svg = sys.stdin.buffer.read().decode("utf-8")
    with tempfile.TemporaryDirectory(prefix="svg-resources-") as empty:  # resvg resolves relative hrefs here
        try:
            png = resvg_py.svg_to_bytes(svg_string=svg, skip_system_fonts=False, resources_dir=empty)
        except (ValueError, OSError, MemoryError) as e:
            print(e if isinstance(e, ValueError) else f"{type(e).__name__}: {e}", file=sys.stderr)
            return 2
    sys.stdout.buffer.write(png)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
