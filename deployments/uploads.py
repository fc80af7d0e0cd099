"""``/v1/moderate`` uploads at the edge: parse them within the file limit and price them in pixels before any image
reaches the checker. Headers only (the core's ``identify``): nothing here decodes pixels.
"""

from __future__ import annotations

import re
from typing import Any

from starlette.requests import Request

from pipeline.errors import ImageDecodeError, InvalidInput, PayloadTooLarge

MAX_LISTED = 10  # an error body lists at most this many problems


def listing(items: list[str], limit: int = MAX_LISTED) -> str:
    """``a; b; ...; and N more``: at most ``limit`` items of a problem list in an error message."""
    shown = "; ".join(items[:limit])
    return shown + (f"; and {len(items) - limit} more" if len(items) > limit else "")


def _file_parts(body: bytes, content_type: str) -> int:
    """Parts of a multipart body whose headers carry a filename (only to report how many were sent, exactly)."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if match is None:
        return 0
    delimiter = b"--" + match.group(1).encode("latin-1")
    count = 0
    for part in body.split(delimiter)[1:]:
        headers = part.split(b"\r\n\r\n", 1)[0]
        count += b"filename=" in headers.lower()
    return count


async def multipart_files(request: Request, body: bytes, max_files: int) -> tuple[list[str | None], list[bytes]]:
    """The ``files`` parts of a buffered multipart body. More than ``max_files`` file parts: 413 with the count."""

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        # Stop starlette's parser just past the limit (its default would accept 1,000 files). Inside an app it
        # reports its parse errors as HTTPException(400) with the message as `detail`.
        form = await Request(request.scope, replay).form(max_files=max_files + 1)
    except Exception as exc:  # noqa: BLE001 - starlette raises several types for malformed bodies
        message = str(getattr(exc, "detail", None) or getattr(exc, "message", None) or exc)
        if message.startswith("Too many files"):
            sent = _file_parts(body, request.headers.get("content-type", ""))
            raise PayloadTooLarge(
                f"the request carries {max(sent, max_files + 2)} files; the limit is {max_files} "
                f"(`max_files_per_request`)"
            ) from None
        raise ImageDecodeError(f"malformed multipart body: {message}") from None
    files = [f for f in form.getlist("files") if hasattr(f, "read")]
    if not files:
        fields = sorted(form.keys())
        raise InvalidInput(f"multipart body has no `files` field with a file; fields: [{listing(fields)}]")
    if len(files) > max_files:
        raise PayloadTooLarge(
            f"the request carries {len(files)} files; the limit is {max_files} (`max_files_per_request`)"
        )
    return [f.filename for f in files], [await f.read() for f in files]


def request_pixels(blobs: list[bytes], image_max_pixels: int) -> int:
    """Pixels the checker would decode for these uploads, from their headers: images over the per-image limit
    (refused from their header, never decoded) and files that are not images cost nothing here."""
    from pipeline.images import identify

    total = 0
    for blob in blobs:
        header = identify(blob)
        pixels = header.pixels if header is not None else None
        if pixels is not None and pixels <= image_max_pixels:
            total += pixels
    return total


def check_request_pixels(blobs: list[bytes], image_max_pixels: int, max_request_pixels: int) -> None:
    total = request_pixels(blobs, image_max_pixels)
    if total > max_request_pixels:
        raise PayloadTooLarge(
            f"the request's images hold {total} pixels in all (from their headers); the limit is "
            f"{max_request_pixels} (`max_request_pixels`): send fewer or smaller images per request"
        )
