"""The Serve edge through the real served app (a keyless one, on loopback, as `make serve` runs it): what a browser
on another site, a client without a Content-Type and a client that stalls its body get, and the page's Moderate view
with two files of one name. The edge's rules one by one, without Ray: tests/unit/test_edge.py.
"""

from __future__ import annotations

import io
import json
import socket

import httpx
import pytest
from PIL import Image

from tests.adversarial import image_bytes
from tests.integration.browser import new_page
from tests.integration.conftest import free_port
from tests.integration.edge_support import mark
from tests.integration.test_serve import apply

pytestmark = pytest.mark.slow  # a Serve app; deselected by `make test-fast`

LIGHT = {"ray_actor_options": {"num_cpus": 0.05}}


@pytest.fixture(scope="module")
def service(ray_cluster):
    from ray import serve

    port = free_port()
    app = {
        "name": "edge",
        "route_prefix": "/",
        "import_path": "deployments.app:build_app",
        "args": {
            "checker": {"factory": "tests.integration.edge_support:MarkedChecker"},
            "generator": {"factory": "tests.integration.page_support:ScriptedGenerator"},
            "ingress": {"max_body_bytes": 2_000_000, "body_read_timeout_s": 1},
        },
        "deployments": [
            {"name": "Ingress", **LIGHT},  # no DIFFGUARD_API_KEY: open, which loopback allows
            {"name": "Generator", **LIGHT},
            {
                "name": "SafetyChecker",
                "ray_actor_options": {"num_cpus": 0.2},
                "autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
            },
        ],
    }
    apply({"http_options": {"host": "127.0.0.1", "port": port}, "applications": [app]})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def test_generate_needs_application_json(service):
    """No Content-Type (a cross-site no-cors fetch with a Blob body) is a 415, even when the body is JSON."""
    r = httpx.post(f"{service}/v1/generate", content=b'{"prompt": "a", "steps": 1}', timeout=60)
    assert r.status_code == 415, r.text[:300]
    assert r.json()["error"] == "/v1/generate takes `Content-Type: application/json`; got no Content-Type header"
    assert httpx.post(f"{service}/v1/generate", json={"prompt": "a", "steps": 1}, timeout=60).status_code == 200


def test_the_keyless_service_refuses_cross_site_browser_requests(service):
    host = service.removeprefix("http://")
    refused = httpx.get(f"{service}/v1/info", headers={"Sec-Fetch-Site": "cross-site"}, timeout=60)
    assert refused.status_code == 403 and "`Sec-Fetch-Site: cross-site`" in refused.json()["error"]
    evil = {"Origin": "http://evil.example", "Content-Type": "application/json"}
    refused = httpx.post(f"{service}/v1/generate", content=b'{"prompt": "a"}', headers=evil, timeout=60)
    assert refused.status_code == 403 and "`Origin: http://evil.example`" in refused.json()["error"]
    own = {"Origin": service, "Sec-Fetch-Site": "same-origin"}
    assert httpx.get(f"{service}/v1/info", headers=own, timeout=60).status_code == 200
    assert httpx.get(f"http://{host}/v1/info", timeout=60).status_code == 200  # curl, SDKs: neither header


def test_a_stalled_body_gets_408(service):
    """Content-Length: 100, 10 bytes, then silence: Serve's proxy streams the body to the edge, whose deadline (1 s
    here) answers 408 and closes the connection. The socket's timeout is generous; nothing here times the reply."""
    host, port = service.removeprefix("http://").split(":")
    head = (
        f"POST /v1/moderate HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: image/png\r\nContent-Length: 100\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=60) as conn:
        conn.sendall(head.encode() + b"x" * 10)
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:300]
    error = json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]
    assert error == "the request body did not arrive within 1s (`body_read_timeout_s`)"


# --- the page ---------------------------------------------------------------------------------------------------------
SHOWN = """img => {
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const context = canvas.getContext("2d");
  context.drawImage(img, 0, 0);
  return [img.naturalWidth, img.naturalHeight, Array.from(context.getImageData(0, 0, 1, 1).data.slice(0, 3))];
}"""


@pytest.mark.parametrize("blocked_first", [False, True])
def test_two_uploads_of_one_name_each_show_their_own_pixels(browser, service, tmp_path, blocked_first):
    """Cards are matched to files by order, never by name: the allowed file's card shows the allowed file's pixels
    (64x64), never the blocked one's (40x24), and the blocked card shows none."""
    allowed_png, blocked_png = image_bytes(1), image_bytes(2, size=(40, 24))
    (tmp_path / "allowed").mkdir()
    (tmp_path / "blocked").mkdir()
    allowed, blocked = tmp_path / "allowed" / "a.png", tmp_path / "blocked" / "a.png"
    allowed.write_bytes(allowed_png + mark(0))
    blocked.write_bytes(blocked_png + mark(3))
    files = [blocked, allowed] if blocked_first else [allowed, blocked]
    context, page = new_page(browser)
    try:
        page.goto(f"{service}/")
        page.wait_for_selector("#demo-warning:not([hidden])")
        page.click("#tab-moderate")
        page.set_input_files("#files", [str(f) for f in files])
        page.wait_for_selector("#moderate-results .card >> nth=1")
        cards = page.query_selector_all("#moderate-results .card")
        assert [c.query_selector("h3 span").inner_text().strip() for c in cards] == ["a.png", "a.png"]
        shown, hidden = (cards[1], cards[0]) if blocked_first else (cards[0], cards[1])
        assert (shown.get_attribute("data-action"), hidden.get_attribute("data-action")) == ("allow", "block")
        assert hidden.query_selector("img") is None and "blob:" not in hidden.inner_html()
        img = shown.query_selector("img")
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img)
        width, height, pixel = img.evaluate(SHOWN)
        expected = Image.open(io.BytesIO(allowed_png)).convert("RGB")
        assert (width, height) == expected.size == (64, 64)
        assert max(abs(a - b) for a, b in zip(pixel, expected.getpixel((0, 0)), strict=True)) <= 2, pixel
        assert page.console_errors == []
    finally:
        context.close()
