"""Why an image could not be scored: a verdict's ``error`` -> one reason of a closed set (the ``reason`` label of
``diffguard_images_unscorable``).

The error text is what crosses every boundary (a Ray result, an HTTP response, a Parquet row), so it is what is
read here; each rule names the messages it covers, and a unit test renders every ``ImageDecodeError`` raised in
``pipeline/`` through :func:`unscorable_reason` so a new message cannot fall to ``other`` unnoticed.

    >>> unscorable_reason("corrupt or truncated PNG image (60 bytes)")
    'corrupt'
"""

from __future__ import annotations

import re

# The closed set, in the order the rules are tried (``other`` last: none matched).
REASONS: tuple[str, ...] = ("view_budget", "detector", "too_large", "corrupt", "unsupported", "other")

_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    # more views than max_views under ``over_view_budget: unscorable`` (pipeline.checker.over_view_budget)
    ("view_budget", re.compile(r"over_view_budget")),
    # a detector could not prepare a view, or answered NaN/inf (pipeline.detectors, pipeline.checker._withhold)
    ("detector", re.compile(r"^(?:a )?detector\b")),
    # over a limit: bytes, pixels, decoded pixels (frames), decode time, SVG nesting or the renderer's memory cap
    (
        "too_large",
        re.compile(
            r"over the limit|more than the limit|decompression bomb|took over \S+ s|nested too deeply"
            r"|more than \d+ deep|memory cap"
        ),
    ),
    # bytes that do not decode as what they claim to be: cut off, bad checksums, malformed XML, no pixels or frames
    (
        "corrupt",
        re.compile(r"corrupt|truncated|not well-formed|empty file|has no pixels|no decodable frames", re.IGNORECASE),
    ),
    # a format, container, input type or colour description diffguard does not read, or refuses by design
    (
        "unsupported",
        re.compile(
            r"not a recognised|is not allowed|not an SVG document|unsupported|entity declaration|internal subset"
            r"|array images must be|cannot be applied|no video stream"
        ),
    ),
)


def unscorable_reason(error: str) -> str:
    """An unscorable image's error message -> one of :data:`REASONS` (``other``: no rule matched)."""
    return next((reason for reason, pattern in _RULES if pattern.search(error)), "other")
