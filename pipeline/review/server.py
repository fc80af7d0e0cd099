"""Run the review app with uvicorn: loopback by default; any other host needs DIFFGUARD_API_KEY (as the service)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from ..auth import ENV, FILE_ENV, api_key, is_loopback
from ..errors import AuthConfigError

log = logging.getLogger("diffguard")
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8300


def review_key(host: str, environ: Mapping[str, str] = os.environ) -> str | None:
    """The bearer key the app requires: ``DIFFGUARD_API_KEY`` stripped (empty refused); None only on loopback."""
    key = api_key(environ)
    if key is None and not is_loopback(host):
        raise AuthConfigError(
            f"refusing to serve the review app without an API key on host {host!r}, which is not loopback: "
            f"set {FILE_ENV} or {ENV} (clients send `Authorization: Bearer <key>`), or bind 127.0.0.1"
        )
    return key


def serve(
    dest: str,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    endpoint_url: str | None = None,
    reviewer: str | None = None,
) -> None:
    """Build the app (reads the current view once) and serve it until interrupted."""
    import time

    import uvicorn

    from .app import create_app

    key = review_key(host)
    started = time.perf_counter()
    app = create_app(dest, endpoint_url, api_key=key, reviewer=reviewer)
    state = app.state.review
    log.info(
        "review of %s: %d objects in the queue, %d decisions, ready in %.2f s",
        state.dest,
        len(state.queue.keys),
        len(state.decisions.all()),
        time.perf_counter() - started,
    )
    log.info("review app at http://%s:%d/ (auth %s)", host, port, "required" if key else "off: loopback")
    uvicorn.run(app, host=host, port=port, log_level="warning")
