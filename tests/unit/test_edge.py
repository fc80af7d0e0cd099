"""The Serve edge's refusals, without Ray: the Edge middleware in front of a small FastAPI app with the Ingress's
content-type rules, driven as ASGI (exact headers, duplicates included) and over a real socket through uvicorn.
(Through the real served app and the page: tests/integration/test_edge_served.py.)"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from contextlib import contextmanager
from typing import Any

import pytest
import uvicorn
from fastapi import Depends, FastAPI, File, Request, UploadFile
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.formparsers import MultiPartException, MultiPartParser

from deployments.edge import Edge, EdgeSettings, json_only, upload_kinds
from deployments.uploads import _file_parts
from pipeline.errors import DiffguardError

HOST = "127.0.0.1:8000"


def _app(key: str | None = None, max_files: int = 2, timeout: float = 30.0) -> FastAPI:
    """The Ingress's edge and content-type rules in front of routes that say what they received."""
    app = FastAPI()
    app.state.edge = EdgeSettings(key, 10_000, max_files, timeout)
    app.add_middleware(Edge, request_id=lambda request: "rid")

    @app.exception_handler(DiffguardError)
    async def _error(request: Request, exc: DiffguardError) -> JSONResponse:
        return JSONResponse({"error": exc.message, "request_id": "rid"}, status_code=exc.status_code)

    @app.post("/v1/generate", dependencies=[Depends(json_only)])
    async def generate(body: dict[str, Any]) -> dict[str, Any]:
        return body

    @app.post("/v1/moderate", dependencies=[Depends(upload_kinds)])
    async def moderate(files: list[UploadFile] | None = File(None)) -> dict[str, Any]:
        return {"files": len(files or [])}

    @app.get("/v1/info")
    async def info() -> dict[str, Any]:
        return {"ok": True}

    return app


def _call(
    app: FastAPI, headers: list[tuple[str, str]], body: bytes = b"", path: str = "/v1/generate", method: str = "POST"
) -> tuple[int, Any]:
    """One request as an ASGI server would pass it: these header lines exactly (duplicates kept), then the body."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in [("host", HOST), *headers]],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)  # the client is still there
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


# --- 1. /v1/generate takes application/json only ---------------------------------------------------------------------
def test_generate_refuses_a_body_without_a_content_type():
    """A no-cors cross-site fetch with a Blob body sends no Content-Type: it must not be read as JSON."""
    status, body = _call(_app(), [], b'{"prompt": "a"}')
    assert status == 415
    assert body["error"] == "/v1/generate takes `Content-Type: application/json`; got no Content-Type header"
    status, body = _call(_app(), [("content-type", "text/plain")], b'{"prompt": "a"}')
    assert status == 415 and body["error"].endswith("got 'text/plain'")
    assert _call(_app(), [("content-type", "application/json; charset=utf-8")], b'{"prompt": "a"}') == (
        200,
        {"prompt": "a"},
    )


# --- 2. a keyless service refuses browsers' cross-site requests ------------------------------------------------------
@pytest.mark.parametrize(
    "headers",
    [
        [("sec-fetch-site", "cross-site")],
        [("sec-fetch-site", "same-site")],  # another port of the same host: http://localhost:3000 is same-site
        [("sec-fetch-site", "CROSS-SITE")],
        [("origin", "http://evil.example")],
        [("origin", "http://127.0.0.1:3000")],  # same host, another port: another origin
        [("origin", "null")],  # a sandboxed frame, a file: page
        [("sec-fetch-site", "same-origin"), ("origin", "http://evil.example")],
    ],
)
def test_a_keyless_service_refuses_cross_site_requests(headers):
    app = _app(key=None)
    status, body = _call(app, [*headers, ("content-type", "application/json")], b'{"prompt": "a"}')
    assert status == 403, body
    name, value = headers[-1]
    shown = {"sec-fetch-site": "Sec-Fetch-Site", "origin": "Origin"}[name]
    assert f"`{shown}: {value}`" in body["error"] and "no API key" in body["error"]
    assert _call(app, headers, path="/v1/info", method="GET")[0] == 403


@pytest.mark.parametrize(
    "headers",
    [
        [],  # curl, SDKs
        [("sec-fetch-site", "same-origin"), ("origin", f"http://{HOST}")],  # the page's own fetch
        [("sec-fetch-site", "none")],  # typed into the address bar
        [("origin", f"https://{HOST}")],  # behind a TLS proxy the service sees http: the scheme is not compared
    ],
)
def test_a_keyless_service_answers_same_origin_and_non_browser_requests(headers):
    request = [*headers, ("content-type", "application/json")]
    assert _call(_app(key=None), request, b'{"prompt": "a"}') == (200, {"prompt": "a"})


def test_a_service_with_a_key_relies_on_the_key():
    """A cross-site page cannot send the key (it would need a preflight the service never grants)."""
    headers = [("sec-fetch-site", "cross-site"), ("authorization", "Bearer k"), ("content-type", "application/json")]
    assert _call(_app(key="k"), headers, b'{"prompt": "a"}') == (200, {"prompt": "a"})
    assert _call(_app(key="k"), headers[:1] + headers[2:], b'{"prompt": "a"}')[0] == 401


# --- 3. headers the edge decides on come once ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("twice", "headers"),
    [
        ("content-type", [("content-type", "text/plain"), ("content-type", "application/json")]),
        ("content-type", [("content-type", "application/json"), ("content-type", "application/json")]),
        ("content-length", [("content-type", "application/json"), ("content-length", "15"), ("content-length", "15")]),
        (
            "authorization",
            [("content-type", "application/json"), ("authorization", "Bearer k"), ("authorization", "Bearer k")],
        ),
    ],
)
def test_duplicate_headers_are_refused_before_anything_reads_them(twice, headers):
    status, body = _call(_app(key="k" if twice == "authorization" else None), headers, b'{"prompt": "a"}')
    assert status == 400 and f"more than one `{twice}` header" in body["error"], body


# --- 4. the multipart boundary and file count, as Starlette parses them ----------------------------------------------
def _part(
    name: str, filename: str | None = None, extra: bytes = b"", data: bytes = b"x", boundary: bytes = b"b"
) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    return b"--%s\r\nContent-Disposition: %s\r\n%s\r\n%s\r\n" % (boundary, disposition.encode(), extra, data)


def _starlette_files(body: bytes, content_type: str) -> int:
    """How many UploadFiles Starlette's own form parser makes of this body (0 when it refuses it)."""

    async def stream():
        yield body

    try:
        form = asyncio.run(MultiPartParser(Headers({"content-type": content_type}), stream()).parse())
    except MultiPartException:
        return 0
    return sum(not isinstance(value, str) for _, value in form.multi_items())


FILES = b"".join(_part("files", f"{i}.png") for i in range(3)) + _part("note") + b"--b--\r\n"
SMUGGLED = (  # "--b" inside a file's bytes (not after CRLF) is data, not a delimiter
    _part("files", "real.png", data=b'x--b\r\nContent-Disposition: form-data; name="files"; filename="fake"\r\n\r\ny')
    + b"--b--\r\n"
)
NOT_DISPOSITION = _part("files", extra=b'Content-Type: image/png; filename="x.png"\r\n') + b"--b--\r\n"


@pytest.mark.parametrize(
    ("content_type", "body", "files"),
    [
        ("multipart/form-data; boundary=b", FILES, 3),
        ('multipart/form-data; boundary="b"', FILES, 3),
        ("multipart/form-data; xboundary=b", FILES, 0),  # no boundary: Starlette refuses the body
        ("multipart/form-data; xboundary=zz; boundary=b", FILES, 3),
        ('multipart/form-data; boundary="a;b"', FILES.replace(b"--b", b"--a;b"), 3),
        ("multipart/form-data; boundary=b", SMUGGLED, 1),
        ("multipart/form-data; boundary=b", NOT_DISPOSITION, 0),  # a filename outside Content-Disposition
        ("multipart/form-data", FILES, 0),
    ],
)
def test_file_parts_are_counted_as_starlette_parses_them(content_type, body, files):
    assert _file_parts(body, content_type) == files == _starlette_files(body, content_type)


def test_a_parameter_ending_in_boundary_is_not_the_boundary():
    """``xboundary=b`` is not ``boundary=b``: FastAPI refuses the body (400), the edge does not count its parts."""
    status, body = _call(
        _app(max_files=2), [("content-type", "multipart/form-data; xboundary=b")], FILES, "/v1/moderate"
    )
    assert status == 400 and "boundary" in json.dumps(body), body
    status, body = _call(
        _app(max_files=2), [("content-type", "multipart/form-data; boundary=b")], FILES, "/v1/moderate"
    )
    assert status == 413 and "carries 3 files; the limit is 2" in body["error"]


# --- 5. the body must arrive within body_read_timeout_s --------------------------------------------------------------
@contextmanager
def _serving(app: FastAPI):
    """``app`` behind a real uvicorn on a loopback port, in a thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(1000):
        if server.started:
            break
        time.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def _exchange(port: int, request: bytes, timeout_s: float = 30) -> bytes:
    """Send ``request`` and read until the server closes the connection (a generous timeout, not a timing assert)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as conn:
        conn.sendall(request)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        return data


def test_a_stalled_body_gets_408_over_a_real_socket():
    """Content-Length: 100, 10 bytes sent, then nothing: a 408 after the deadline, and the connection closes."""
    head = b"POST /v1/moderate HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100\r\n\r\n"
    with _serving(_app(timeout=1.0)) as port:
        reply = _exchange(port, head + b"x" * 10)
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
    error = json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]
    assert error == "the request body did not arrive within 1s (`body_read_timeout_s`)"


def test_the_deadline_is_for_the_whole_body_not_each_chunk():
    """A byte every 0.2 s forever: each chunk is prompt, the body never ends; 408 all the same."""
    app = _app(timeout=1.0)
    scope_headers = [(b"host", b"x"), (b"content-type", b"image/png")]
    scope = {"type": "http", "method": "POST", "path": "/v1/moderate", "root_path": "", "query_string": b""}
    scope |= {"headers": scope_headers, "http_version": "1.1", "scheme": "http", "asgi": {"version": "3.0"}}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(0.2)
        return {"type": "http.request", "body": b"x", "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))
    assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"]
