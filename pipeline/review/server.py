"""Run the review app with uvicorn: loopback by default; any other host needs a key (as the service).

Who may call it, at start: ``--keys FILE`` (``$DIFFGUARD_KEYS_FILE``; :mod:`pipeline.keys`: each key names its
reviewer), else ``DIFFGUARD_API_KEY`` (its holder is ``--reviewer``), else, on loopback only, a random token made at
this start and printed in the URL's fragment (``http://127.0.0.1:8300/#token=...``: a fragment never reaches a server
log nor a Referer; the page keeps it for the tab and takes it out of the address bar). A keys file and an API key
together are refused, as is an empty setting of either.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

from ..auth import ENV, FILE_ENV, api_key, is_loopback
from ..errors import AuthConfigError
from ..keys import KEYS_ENV, KeyRing, load_keys
from .edge import host_name

log = logging.getLogger("diffguard")
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8300


def review_auth(
    host: str, keys_file: str | None = None, environ: Mapping[str, str] = os.environ
) -> tuple[str | None, KeyRing | None]:
    """(the API key, the keys file's keys): at most one set; neither only on loopback (the app then makes a token)."""
    path = keys_file if keys_file is not None else environ.get(KEYS_ENV)
    if path is not None and not path.strip():
        raise AuthConfigError(f"{'--keys' if keys_file is not None else KEYS_ENV} is set but empty: name a keys file")
    key = api_key(environ)
    if path is not None and key is not None:
        raise AuthConfigError(
            f"both a keys file ({path!r}) and {ENV if environ.get(ENV) is not None else FILE_ENV} are set: "
            f"set only one (with a keys file, every key is one of its entries and names its reviewer)"
        )
    keys = load_keys(path, service=False) if path is not None else None
    if key is None and keys is None and not is_loopback(host):
        raise AuthConfigError(
            f"refusing to serve the review app without an API key on host {host!r}, which is not loopback: "
            f"set {FILE_ENV} or {ENV} (clients send `Authorization: Bearer <key>`), or --keys FILE, or bind 127.0.0.1"
        )
    return key, keys


def serve(
    dest: str,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    endpoint_url: str | None = None,
    reviewer: str | None = None,
    keys_file: str | None = None,
    allowed_hosts: Sequence[str] = (),
) -> None:
    """Build the app (reads the current view once) and serve it until interrupted."""
    import time

    import uvicorn

    from .app import create_app

    key, keys = review_auth(host, keys_file)
    if keys is not None and reviewer is not None:
        raise AuthConfigError(
            f"--reviewer {reviewer!r} with {keys.source}: each key names its reviewer there; drop --reviewer"
        )
    started = time.perf_counter()
    app = create_app(dest, endpoint_url, api_key=key, reviewer=reviewer, keys=keys, hosts=(host, *allowed_hosts))
    state, token = app.state.review, app.state.token
    log.info(
        "review of %s: %d objects in the queue, %d decisions, ready in %.2f s",
        state.dest,
        len(state.queue.keys),
        len(state.decisions.all()),
        time.perf_counter() - started,
    )
    url = f"http://{host_name(host)}:{port}/"
    if token is not None:
        log.info(
            "review app at %s#token=%s (a key for this start only: open this URL; reviewer %s)",
            url,
            token,
            state.reviewer,
        )
    elif keys is not None:
        log.info("review app at %s (auth: %d keys from %s, each its reviewer)", url, len(keys), keys.source)
    else:
        log.info("review app at %s (auth: the API key; reviewer %s)", url, state.reviewer)
    uvicorn.run(app, host=host, port=port, log_level="warning")
