"""The security headers every page diffguard serves carries: the Serve page and the review app (and its JSON).

A page may run only its own scripts and styles, fetch only from its own origin, submit no forms, and never be framed
(a click in an invisible frame on another origin must not reach a button). Plain constants: no FastAPI.
"""

from __future__ import annotations

PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; form-action 'none'; base-uri 'self'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

# The generated API docs (/docs, /redoc) start their bundled viewer with an inline script and inline styles; they hold
# no data. Still never framed.
DOCS_HEADERS = {
    **PAGE_HEADERS,
    "Content-Security-Policy": "default-src 'none'; script-src 'self' 'unsafe-inline'; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
    "form-action 'none'; base-uri 'self'; frame-ancestors 'none'",
}
