"""The review app's edge over real HTTP (uvicorn in a subprocess) and in a real browser: only loopback Host names, no
POST from another site or origin, never framed, the key checked before a body is read, bodies capped, a per-start token
on loopback, and a keys file naming the reviewer of each key's decisions."""

from __future__ import annotations

import hashlib
import http.server
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import psutil
import pytest

from pipeline.decisions import DecisionLog
from tests.integration.browser import new_page
from tests.integration.review_support import ReviewServer, free_port, results

pytestmark = pytest.mark.integration
MB = 1 << 20


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    results(tmp_path / "dest", tmp_path / "src", [f"img/{i:02d}.png" for i in range(20)], seed=9)
    return tmp_path / "dest"


def queued(app: ReviewServer, headers: dict[str, str] | None = None) -> list[str]:
    page = httpx.get(app.url + "/api/items", params={"limit": 200}, headers=headers or app.headers).json()
    return [i["key"] for i in page["items"]]


def decision_url(app: ReviewServer, key: str) -> str:
    return f"{app.url}/api/items/{quote(key, safe='')}/decision"


def stream(port: int, head: str, chunks: Iterator[bytes]) -> tuple[int, int]:
    """Send ``head`` then ``chunks`` (a little at a time, so the server could read them all) until the answer's status
    line arrives. -> (status, bytes of body sent when it arrived)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n")
    sent, answered = 0, threading.Event()

    def write() -> None:
        nonlocal sent
        try:
            for chunk in chunks:
                if answered.is_set():
                    return
                sock.sendall(chunk)
                sent += len(chunk)
                time.sleep(0.002)
        except OSError:
            return  # the server closed the connection after answering

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    sock.settimeout(120)
    data = b""
    while b"\r\n" not in data:
        got = sock.recv(65536)
        if not got:
            break
        data += got
    at_answer = sent
    answered.set()
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    writer.join(30)
    return (int(data.split(b" ")[1]) if data else 0), at_answer


def test_a_foreign_host_is_refused_loopback_names_are_not(dest):
    with ReviewServer(dest) as app:
        r = httpx.get(app.url + "/api/info", headers={"Host": "evil.example", **app.headers})
        assert r.status_code == 421 and "evil.example" in r.text and "127.0.0.1" in r.text and "localhost" in r.text
        assert httpx.get(app.url + "/", headers={"Host": f"evil.example:{app.port}"}).status_code == 421
        for host in ("127.0.0.1", "localhost", "[::1]", "LOCALHOST"):
            for name in (host, f"{host}:{app.port}"):
                r = httpx.get(app.url + "/api/info", headers={"Host": name, **app.headers})
                assert r.status_code == 200, (name, r.text)
        twice = [("Authorization", app.headers["Authorization"]), ("Authorization", "Bearer another")]
        r = httpx.get(app.url + "/api/info", headers=twice)
        assert r.status_code == 400 and "Authorization" in r.text
        kinds = [*app.headers.items(), ("Content-Type", "application/json"), ("Content-Type", "text/plain")]
        r = httpx.post(decision_url(app, queued(app)[0]), content=b'{"decision": "overturn"}', headers=kinds)
        assert r.status_code == 400 and "Content-Type" in r.text
        assert httpx.get(app.url + "/api/decisions", headers=app.headers).json() == []


def test_a_cross_site_post_is_refused_and_nothing_stored(dest):
    with ReviewServer(dest) as app:  # even with the token (say it leaked): another site cannot decide
        key = queued(app)[0]
        for extra in (
            {"Sec-Fetch-Site": "cross-site", "Origin": "http://evil.example"},
            {"Sec-Fetch-Site": "same-site"},  # another port of this machine
            {"Origin": "http://evil.example"},
            {"Origin": f"http://127.0.0.1:{app.port + 1}"},
            {"Origin": "null"},
        ):
            r = httpx.post(decision_url(app, key), json={"decision": "overturn"}, headers={**app.headers, **extra})
            assert r.status_code == 403, (extra, r.text)
        assert httpx.get(app.url + "/api/decisions", headers=app.headers).json() == []
        own = {**app.headers, "Origin": app.url, "Sec-Fetch-Site": "same-origin"}
        assert httpx.post(decision_url(app, key), json={"decision": "overturn"}, headers=own).status_code == 200


class _Attacker(http.server.BaseHTTPRequestHandler):
    html = b""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(self.html)

    def log_message(self, *args: object) -> None:
        pass


def test_a_framed_click_is_blocked_in_chromium(browser, dest):
    with ReviewServer(dest) as app:
        handler = type("Attacker", (_Attacker,), {})
        handler.html = (  # an invisible frame of the app over a bait button, on another loopback port
            f'<!doctype html><button id="bait">win</button><iframe id="victim" src="{app.page_url}" '
            'style="opacity:0.01;position:absolute;top:0;left:0;width:1000px;height:800px"></iframe>'
        ).encode()
        attacker = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
        threading.Thread(target=attacker.serve_forever, daemon=True).start()
        context, page = new_page(browser)
        try:
            page.goto(f"http://127.0.0.1:{attacker.server_address[1]}/")
            blocked = clicked = False
            for _ in range(300):  # until Chromium reports the frame refused, or the app's button shows in it
                blocked = any("frame-ancestors" in e or "X-Frame-Options" in e for e in page.console_errors)
                frame = page.frame_locator("#victim")
                button = frame.locator("button[data-decision=overturn]")
                if not blocked and button.count():
                    button.first.click()  # what the victim's click on the bait does through the frame
                    clicked = True
                if blocked or clicked:
                    break
                page.wait_for_timeout(100)
            assert blocked and not clicked, page.console_errors
            assert page.frame_locator("#victim").locator("#queue").count() == 0  # nothing of the app rendered
        finally:
            context.close()
            attacker.shutdown()
        page_decisions = httpx.get(app.url + "/api/decisions", headers=app.headers).json()
        assert page_decisions == []


def test_a_60_mb_keyless_post_is_refused_before_its_body_is_read(dest):
    total = 60_000_000
    with ReviewServer(dest) as app:
        key = queued(app)[0]
        server = psutil.Process(app.proc.pid)
        before = server.memory_info().rss
        prefix, suffix = b'{"decision": "overturn", "note": "', b'"}'

        def body() -> Iterator[bytes]:  # valid JSON, 256 KiB at a time
            yield prefix
            left = total - len(prefix) - len(suffix)
            while left > 0:
                yield b"x" * min(256 * 1024, left)
                left -= 256 * 1024
            yield suffix

        path = f"/api/items/{quote(key, safe='')}/decision"
        head = f"POST {path} HTTP/1.1\nHost: 127.0.0.1:{app.port}\nContent-Type: application/json\n"
        status, sent = stream(app.port, f"{head}Content-Length: {total}\n", body())
        grown = server.memory_info().rss - before
        assert status == 401
        assert sent < total, "answered only after the whole body was sent"
        assert grown < 30 * MB, f"the server grew by {grown / MB:.0f} MB"
        # with the key: the declared length over 16 KB is refused (413) before the body is read
        keyed = f"{head}Authorization: {app.headers['Authorization']}\n"
        status, sent = stream(app.port, f"{keyed}Content-Length: {total}\n", body())
        assert status == 413 and sent < total
        chunked = (f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in body())  # no length declared: counted
        status, _ = stream(app.port, f"{keyed}Transfer-Encoding: chunked\n", chunked)
        assert status == 413
        assert httpx.get(app.url + "/api/decisions", headers=app.headers).json() == []


def test_loopback_needs_the_printed_token(browser, dest):
    with ReviewServer(dest, "--reviewer", "ana") as app:
        assert app.token and f"#token={app.token}" in app.stderr()
        assert httpx.get(app.url + "/api/info").status_code == 401
        assert httpx.get(app.url + "/api/info", headers={"Authorization": "Bearer guess"}).status_code == 401
        key = queued(app)[0]
        assert httpx.post(decision_url(app, key), json={"decision": "overturn"}).status_code == 401
        info = httpx.get(app.url + "/api/info", headers=app.headers)
        assert info.status_code == 200 and info.json()["reviewer"] == "ana" and info.json()["auth_required"] is True
        for public in ("/", "/static/review.js", "/openapi.json"):  # no data in them
            assert httpx.get(app.url + public).status_code == 200, public
        context, page = new_page(browser)  # the page takes the token from the fragment, then drops it from the bar
        try:
            page.goto(app.page_url)
            page.wait_for_selector("#queue li.item")
            assert page.evaluate("location.hash") == "" and page.evaluate("location.href") == app.url + "/"
            assert page.evaluate("sessionStorage.getItem('diffguard-token')") == app.token
            page.locator('#queue img.thumb[src^="blob:"]').first.wait_for()  # a thumbnail fetched with the token
            assert page.console_errors == []
        finally:
            context.close()


def write_keys(path: Path, keys: dict[str, str]) -> Path:
    ana, bob = (hashlib.sha256(keys[k].encode()).hexdigest() for k in ("ana", "bob"))
    path.write_text(
        "keys:\n"
        f"  - id: ana\n    sha256: {ana}\n    tenant: uploads\n    routes: [/v1/moderate]\n"
        f'  - id: bob\n    reviewer: "Bob Stone"\n    sha256: {bob.upper()}\n    limits: {{rps: 5}}\n'
    )
    return path


def test_a_keys_file_names_the_reviewer_of_each_key(dest, tmp_path):
    keys = {"ana": "ana-key-1", "bob": "bob-key-2"}
    path = write_keys(tmp_path / "keys.yaml", keys)
    with ReviewServer(dest, "--keys", str(path)) as app:
        assert "#token=" not in app.stderr()
        as_ = {name: {"Authorization": f"Bearer {key}"} for name, key in keys.items()}
        first, second = queued(app, as_["ana"])[:2]
        assert httpx.get(app.url + "/api/info", headers=as_["bob"]).json()["reviewer"] == "Bob Stone"
        ana = httpx.post(decision_url(app, first), json={"decision": "overturn"}, headers=as_["ana"])
        bob = httpx.post(decision_url(app, second), json={"decision": "confirm"}, headers=as_["bob"])
        assert (ana.json()["reviewer"], bob.json()["reviewer"]) == ("ana", "Bob Stone")
        stranger = {"Authorization": "Bearer not-in-the-file"}
        assert httpx.post(decision_url(app, first), json={"decision": "confirm"}, headers=stranger).status_code == 401
        assert httpx.get(app.url + "/api/info").status_code == 401
    stored = {d.key: d.reviewer for d in DecisionLog.open(str(dest)).all()}
    assert stored == {first: "ana", second: "Bob Stone"}


def refused(dest: Path, *extra: str, env: dict[str, str] | None = None) -> tuple[int | None, str]:
    """(exit status, stderr) of a review app that should refuse to start; stopped if it started after all."""
    app = ReviewServer(dest, *extra, env=env)
    try:
        app.proc.wait(60)
    except subprocess.TimeoutExpired:
        pass
    finally:
        err, status = app.stderr(), app.proc.poll()
        app.stop()
    return status, err


def test_a_keys_file_with_an_api_key_or_malformed_refuses_to_start(dest, tmp_path):
    path = write_keys(tmp_path / "keys.yaml", {"ana": "a", "bob": "b"})
    status, err = refused(dest, env={"DIFFGUARD_KEYS_FILE": str(path), "DIFFGUARD_API_KEY": "k"})
    assert status == 2 and "DIFFGUARD_API_KEY" in err and "keys file" in err, err
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        f"keys:\n  - id: ana\n    sha256: {hashlib.sha256(b'a').hexdigest()}\n  - id: bob\n    sha256: abc\n"
    )
    status, err = refused(dest, "--keys", str(bad))
    assert status == 2 and str(bad) in err and "keys[1]" in err and "'bob'" in err, err
    assert "sha256" in err and "'abc'" in err, err
