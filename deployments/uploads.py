"""``/v1/moderate`` uploads at the edge: count their file parts and price them in pixels before any image reaches the
checker (FastAPI parses the multipart body itself, once). Headers only (the core's ``identify``): nothing here
decodes pixels (torch-free: the ingress never loads it).
"""

from __future__ import annotations

import re

from pipeline.errors import PayloadTooLarge
from pipeline.images import DecodeLimits

MAX_LISTED = 10  # an error body lists at most this many problems


def listing(items: list[str], limit: int = MAX_LISTED) -> str:
    """``a; b; ...; and N more``: at most ``limit`` items of a problem list in an error message."""
    shown = "; ".join(items[:limit])
    return shown + (f"; and {len(items) - limit} more" if len(items) > limit else "")


def _file_parts(body: bytes, content_type: str) -> int:
    """Parts of a multipart body whose headers carry a filename (only to report how many were sent, exactly).

    Reads each part's header block in place: no copy of the parts (a split would copy the whole body once more)."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if match is None:
        return 0
    delimiter = b"--" + match.group(1).encode("latin-1")
    count, at = 0, body.find(delimiter)
    while at != -1:
        start = at + len(delimiter)
        at = body.find(delimiter, start)
        end = len(body) if at == -1 else at
        stop = body.find(b"\r\n\r\n", start, end)  # the part's headers end here
        headers = body[start : end if stop == -1 else stop]
        count += b"filename=" in headers.lower()
    return count


def request_pixels(blobs: list[bytes], limits: DecodeLimits) -> int:
    """Pixels the checker would decode into views for these uploads, from their headers (:func:`pipeline.media.price`:
    every frame and page, a video's sampled frames); what is refused from its header, or is not media, costs 0."""
    from pipeline.media import price

    return sum(price(blob, limits) for blob in blobs)


def check_request_pixels(blobs: list[bytes], limits: DecodeLimits, max_request_pixels: int) -> None:
    total = request_pixels(blobs, limits)
    if total > max_request_pixels:
        raise PayloadTooLarge(
            f"the request's images hold {total} pixels in all (from their headers); the limit is "
            f"{max_request_pixels} (`max_request_pixels`): send fewer or smaller images per request"
        )
