"""SVG sniffing and rendering: what a browser shows, and nothing fetched from the network or the filesystem."""

from __future__ import annotations

import base64
import gzip
import http.server
import io
import threading
from dataclasses import replace

import numpy as np
import pytest
import resvg_py
from PIL import Image

from pipeline.errors import ImageDecodeError
from pipeline.images import DecodeLimits
from pipeline.svg import MAX_SIDE, MIN_SIDE, is_svg, render_svg
from tests.conftest import encode

LIMITS = DecodeLimits(max_bytes=1 << 20)
NS = 'xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink"'
ICON = f'<svg {NS} viewBox="0 0 24 24"><circle cx="12" cy="12" r="10" fill="#ff0000"/></svg>'.encode()


def _pixels(png: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(png))
    assert im.mode == "RGBA"
    return np.asarray(im)


def _png_url(colour: tuple[int, int, int]) -> str:
    return "data:image/png;base64," + base64.b64encode(encode(Image.new("RGB", (8, 8), colour), "PNG")).decode()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (ICON, True),
        (b'\xef\xbb\xbf\n<?xml version="1.0" encoding="UTF-8"?>\n<!-- drawn by hand -->\n' + ICON, True),
        (
            b'<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd">'
            + ICON,
            True,
        ),
        (gzip.compress(ICON), True),
        (b"<!DOCTYPE html><html><body><svg></svg></body></html>", False),
        (b"<html><svg></svg></html>", False),
        (b"a line of text mentioning <svg> later\n", False),
        (b"<svgfoo/>", False),
        (gzip.compress(b"just some text"), False),
        (encode(Image.new("RGB", (4, 4)), "PNG"), False),
        (b"", False),
    ],
    ids=[
        "svg",
        "bom-xml-comment",
        "doctype",
        "svgz",
        "html",
        "html-no-doctype",
        "text",
        "other-element",
        "gz-text",
        "png",
        "empty",
    ],
)
def test_is_svg_sniffs_content(data, expected):
    assert is_svg(data) is expected


def test_icon_scales_up_to_the_minimum_side_and_keeps_alpha():
    px = _pixels(render_svg(ICON, LIMITS))
    assert px.shape == (MIN_SIDE, MIN_SIDE, 4)
    assert tuple(px[MIN_SIDE // 2, MIN_SIDE // 2]) == (255, 0, 0, 255)
    assert px[0, 0, 3] == 0  # outside the circle stays transparent: the caller composites


def test_svgz_renders_like_svg():
    assert np.array_equal(_pixels(render_svg(gzip.compress(ICON), LIMITS)), _pixels(render_svg(ICON, LIMITS)))


@pytest.mark.parametrize("kind", ["png", "svg"])
def test_embedded_data_images_are_rendered(kind):
    inner = f'<svg {NS} width="8" height="8"><rect width="8" height="8" fill="#0ac81e"/></svg>'.encode()
    url = _png_url((10, 200, 30)) if kind == "png" else "data:image/svg+xml;base64," + base64.b64encode(inner).decode()
    svg = f'<svg {NS} width="300" height="300"><image width="300" height="300" xlink:href="{url}"/></svg>'
    px = _pixels(render_svg(svg.encode(), LIMITS))
    assert px.shape == (300, 300, 4)
    assert tuple(px[150, 150]) == (10, 200, 30, 255)


class _Recorder(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []
    body = b""

    def do_GET(self):  # noqa: N802 - http.server's naming
        type(self).requests.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        self.wfile.write(type(self).body)

    def log_message(self, *args):
        pass


def test_external_references_are_never_fetched(tmp_path, monkeypatch):
    red = encode(Image.new("RGB", (8, 8), (255, 0, 0)), "PNG")
    (tmp_path / "x.png").write_bytes(red)
    monkeypatch.chdir(tmp_path)
    _Recorder.body, _Recorder.requests = red, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        hrefs = ["file:///etc/passwd", f"http://127.0.0.1:{port}/x.png", "x.png", str(tmp_path / "x.png")]
        hrefs += [(tmp_path / "x.png").as_uri(), f"data:image/svg+xml;base64,{_nested(str(tmp_path / 'x.png'))}"]
        images = "".join(f'<image x="0" y="0" width="200" height="200" xlink:href="{h}"/>' for h in hrefs)
        url = f"http://127.0.0.1:{port}"
        style = f"<style>@import url({url}/a.css); .none {{ fill: url({url}/p#g) }}</style>"
        body = f'<rect width="200" height="200" fill="#0000ff"/><foreignObject><img src="http://127.0.0.1:{port}/f"/></foreignObject>'
        attacked = f'<svg {NS} width="200" height="200">{style}{images}{body}</svg>'
        plain = f'<svg {NS} width="200" height="200">{body}</svg>'
        # resvg alone does load the absolute path: the sanitiser is what keeps it out (this control can fail).
        raw = resvg_py.svg_to_bytes(
            svg_string=f'<svg {NS} width="8" height="8"><image width="8" height="8" href="{hrefs[3]}"/></svg>'
        )
        assert tuple(_pixels(raw)[4, 4]) == (255, 0, 0, 255)
        rendered = _pixels(render_svg(attacked.encode(), LIMITS))
        assert np.array_equal(rendered, _pixels(render_svg(plain.encode(), LIMITS)))
        assert tuple(rendered[100, 100]) == (0, 0, 255, 255)
    finally:
        server.shutdown()
        server.server_close()
    assert _Recorder.requests == []


def _nested(href: str) -> str:
    inner = f'<svg {NS} width="200" height="200"><image width="200" height="200" href="{href}"/></svg>'
    return base64.b64encode(inner.encode()).decode()


@pytest.mark.parametrize(
    ("attrs", "size"),
    [
        ('width="100000000" height="100000000"', (MAX_SIDE, MAX_SIDE)),
        ('width="1e9" height="5e8"', (MAX_SIDE, MAX_SIDE // 2)),
        ('width="0" height="0" viewBox="0 0 10 20"', (MIN_SIDE, 2 * MIN_SIDE)),
        ("", (448, MIN_SIDE)),  # no size at all: a browser's 300x150, scaled up to the minimum side
    ],
    ids=["huge", "huge-exponent", "zero-with-viewbox", "no-size"],
)
def test_canvas_is_bounded(attrs, size):
    svg = f'<svg {NS} {attrs}><rect width="100%" height="100%" fill="#00ff00"/></svg>'.encode()
    px = _pixels(render_svg(svg, LIMITS))
    assert (px.shape[1], px.shape[0]) == size
    assert tuple(px[size[1] // 2, size[0] // 2]) == (0, 255, 0, 255)


def test_canvas_respects_max_pixels():
    px = _pixels(render_svg(ICON, replace(LIMITS, max_pixels=10_000)))
    assert px.shape[0] * px.shape[1] <= 10_000 and px.shape[0] == px.shape[1] == 100


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE svg [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<svg xmlns="http://www.w3.org/2000/svg"><text>&lol3;</text></svg>"""


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (BILLION_LAUGHS, "entity declarations are refused"),
        (b'<!DOCTYPE svg [<!ELEMENT svg ANY>]><svg xmlns="http://www.w3.org/2000/svg"/>', "internal subset"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"><rect></svg>', "not well-formed XML"),
        (b"<html><body>hi</body></html>", "not an SVG document"),
        (b"plain text", "not an SVG document"),
        (gzip.compress(b"<svg>" + b" " * (2 << 20) + b"</svg>"), r"more than the limit of 1048576 bytes \(max_bytes\)"),
        (
            f'<svg {NS} width="10" height="10"><rect width="10" height="10" transform="matrix(1 0 0)"/></svg>'.encode(),
            "",
        ),
    ],
    ids=["billion-laughs", "internal-subset", "malformed", "html", "text", "svgz-bomb", "odd-but-valid"],
)
def test_refusals_name_the_reason(data, message):
    if not message:  # a control: an unusual but valid document renders
        assert render_svg(data, LIMITS).startswith(b"\x89PNG")
        return
    with pytest.raises(ImageDecodeError, match=message):
        render_svg(data, LIMITS)


def _use_chain(n: int) -> bytes:
    uses = "".join(f'<use id="u{i}" href="#u{i - 1}"/>' for i in range(1, n))
    defs = f'<defs><rect id="u0" width="5" height="5"/>{uses}</defs>'
    return f'<svg {NS} width="10" height="10">{defs}<use href="#u{n - 1}"/></svg>'.encode()


def test_fragment_references_are_kept():
    px = _pixels(render_svg(_use_chain(5), LIMITS))  # 10x10 scaled to 224x224: the 5x5 rect fills the top-left quarter
    assert tuple(px[50, 50]) == (0, 0, 0, 255) and px[200, 200, 3] == 0


@pytest.mark.parametrize(
    ("n", "message"),
    [
        (1000, "SVG could not be rendered: SVG data parsing failed cause nodes limit reached"),
        (300, "SVG could not be rendered: "),
    ],
    ids=["resvg-refuses", "resvg-crashes"],  # 300 chained <use> overflow resvg's stack (SIGSEGV) with an 8 MiB stack
)
def test_renderer_failure_is_reported_and_the_caller_survives(n, message):
    with pytest.raises(ImageDecodeError, match=message):
        render_svg(_use_chain(n), LIMITS)


def test_timeout_is_reported():
    limits = replace(LIMITS, max_decode_s=0.001)  # no child process starts in 1 ms
    with pytest.raises(ImageDecodeError, match=r"SVG rendering took over 0.001 s"):
        render_svg(ICON, limits)
