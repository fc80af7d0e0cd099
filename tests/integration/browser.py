"""The browser the page tests drive: Debian's Chromium through Playwright (its own browser download is unreachable).

The `browser` fixture (conftest.py, one Chromium per module) launches it with these arguments; ``new_page`` gives
pages that may reach nothing but 127.0.0.1 (a CDN request is refused, so a page that needs the network fails its
test), with console errors collected for the test to assert on. Used by test_page.py, test_review_page.py and
test_review_loop.py.
"""

from __future__ import annotations

import os
import re

CHROMIUM = os.environ.get("DIFFGUARD_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def new_page(browser, **context_options):
    """-> (context, page): loopback only, ``page.console_errors`` filled as the page runs."""
    context = browser.new_context(**({"viewport": {"width": 1100, "height": 900}} | context_options))
    context.route(re.compile(r"^(?!http://127\.0\.0\.1:).*"), lambda route: route.abort())
    page = context.new_page()
    page.console_errors = []
    page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
    page.on("pageerror", lambda e: page.console_errors.append(str(e)))
    return context, page
