"""The edge rules the Ingress applies, without Ray: listing problems, counting multipart files, pricing pixels from
headers, and which hosts count as loopback. (Through real Serve + HTTP: tests/integration/test_serve.py.)"""

from __future__ import annotations

import pytest

from deployments.auth import AuthConfigError, api_key, is_loopback, require_key_or_loopback
from deployments.uploads import _file_parts, listing, request_pixels
from pipeline.images import DecodeLimits
from tests.adversarial import huge_bilevel_png, image_bytes
from tests.corpus import png_header_only


def test_listing_keeps_ten():
    assert listing([str(i) for i in range(3)]) == "0; 1; 2"
    assert listing([str(i) for i in range(13)]) == "0; 1; 2; 3; 4; 5; 6; 7; 8; 9; and 3 more"


def test_file_parts_counts_parts_with_a_filename():
    part = b'--b\r\nContent-Disposition: form-data; name="files"; filename="%d.png"\r\n\r\nx\r\n'
    field = b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n'
    body = b"".join(part % i for i in range(70)) + field + b"--b--\r\n"
    assert _file_parts(body, "multipart/form-data; boundary=b") == 70
    assert _file_parts(body, 'multipart/form-data; boundary="b"') == 70
    assert _file_parts(body, "multipart/form-data") == 0


def test_request_pixels_from_headers():
    small = image_bytes(0, size=(64, 48))
    assert request_pixels([small, small], DecodeLimits()) == 2 * 64 * 48
    assert request_pixels([huge_bilevel_png(side=2000)], DecodeLimits()) == 4_000_000  # never decoded to count
    # Over the per-image limit: refused from its header by the checker, so it costs nothing here; not an image: 0.
    assert request_pixels([png_header_only(100_000, 100_000), b"just text", b""], DecodeLimits()) == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST"])
def test_loopback_hosts(host):
    assert is_loopback(host)
    require_key_or_loopback(host, None, False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "my-host", "", None])
def test_open_hosts_need_a_key_or_an_explicit_opt_in(host):
    assert not is_loopback(host)
    with pytest.raises(AuthConfigError, match="refusing to serve without an API key"):
        require_key_or_loopback(host, None, False)
    require_key_or_loopback(host, "k", False)
    require_key_or_loopback(host, None, True)


@pytest.mark.parametrize(("raw", "key"), [("k", "k"), ("  k\n", "k"), ("a b", "a b")])
def test_keys_are_stripped(raw, key):
    assert api_key({"DIFFGUARD_API_KEY": raw}) == key


@pytest.mark.parametrize("raw", ["", " ", "\n", "\t \r\n"])
def test_blank_keys_are_refused(raw):
    with pytest.raises(AuthConfigError, match="empty or whitespace"):
        api_key({"DIFFGUARD_API_KEY": raw})


def test_request_pixels_count_every_view_a_file_decodes_into():
    """Every frame of an animation, every page, a video's sampled frames (not its whole length), an SVG's canvas."""
    from tests.hidden import CASES

    limits = DecodeLimits()
    assert request_pixels([CASES["animated-gif"]().data], limits) == 2 * 224 * 224
    assert request_pixels([CASES["multipage-tiff"]().data], limits) == 2 * 224 * 224
    video = CASES["mp4"]().data  # 2 s at 10 fps: the first frame, 2 per second, the last: 6 samples priced
    assert request_pixels([video], limits) == 6 * 224 * 224
    assert request_pixels([CASES["svg"]().data], limits) == 1024 * 1024
