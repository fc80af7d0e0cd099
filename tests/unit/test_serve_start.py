"""`diffguard serve` says it is serving only once ``/healthz`` answers 200 (deployments.run.wait_healthy, issue 27):
polled against a real HTTP server that answers 503 until it is ready."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from deployments.run import wait_healthy
from pipeline.errors import DeployFailed


class Health(BaseHTTPRequestHandler):
    """/healthz: 503 with the Ingress's body for the first ``server.unready`` requests, then 200."""

    def do_GET(self):  # noqa: N802 - http.server's name
        server = self.server
        server.seen.append(self.path)
        ready = len(server.seen) > server.unready
        body = b'{"ready": true}' if ready else b'{"ready": false, "deployments": {"checker": "unavailable"}}'
        self.send_response(200 if ready else 503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def health():
    def start(unready: int) -> tuple[str, ThreadingHTTPServer]:
        server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
        server.seen, server.unready = [], unready
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/healthz", server

    servers: list[ThreadingHTTPServer] = []
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_waits_through_503_until_healthz_answers_200(health):
    url, server = health(unready=3)
    assert wait_healthy(url, timeout_s=60, poll_s=0.01) is True
    assert server.seen == ["/healthz"] * 4  # three 503s, then the 200 it returned on: not one poll more


def test_a_service_that_never_gets_ready_fails_with_its_last_answer(health):
    url, server = health(unready=10**9)
    with pytest.raises(DeployFailed, match=r"did not answer 200 in 0s: HTTP 503: .*checker.*unavailable"):
        wait_healthy(url, timeout_s=0, poll_s=0.01)
    assert len(server.seen) == 1


def test_nothing_listening_is_not_healthy(health):
    url, server = health(unready=0)
    server.shutdown()
    server.server_close()
    with pytest.raises(DeployFailed, match="did not answer 200"):
        wait_healthy(url, timeout_s=0)


def test_ctrl_c_while_waiting_stops_the_wait(health):
    url, server = health(unready=10**9)
    stop = threading.Event()
    stop.set()
    assert wait_healthy(url, timeout_s=60, stop=stop) is False
    assert server.seen == []
