"""``/v1/moderate`` uploads at the edge: count their file parts and price them in pixels before any image reaches the
checker (FastAPI parses the multipart body itself, once). Headers only (the core's ``identify``): nothing here
decodes pixels (torch-free: the ingress never loads it).
"""

from __future__ import annotations

from typing import Any

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from pipeline.errors import PayloadTooLarge
from pipeline.images import DecodeLimits

MAX_LISTED = 10  # an error body lists at most this many problems


def listing(items: list[str], limit: int = MAX_LISTED) -> str:
    """``a; b; ...; and N more``: at most ``limit`` items of a problem list in an error message."""
    shown = "; ".join(items[:limit])
    return shown + (f"; and {len(items) - limit} more" if len(items) > limit else "")


def media_type(content_type: str | None) -> str:
    """The media type of a Content-Type value, lower case, as Starlette's form parsing reads it."""
    return parse_options_header(content_type)[0].decode("latin-1")


class _FileCounter:
    """python-multipart callbacks that count the parts Starlette's form parser makes an ``UploadFile`` of: those whose
    Content-Disposition (the last one, as there) has a ``filename`` option."""

    def __init__(self) -> None:
        self.files, self.field, self.value, self.disposition = 0, b"", b"", b""

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]

    def on_header_end(self) -> None:
        if self.field.lower() == b"content-disposition":
            self.disposition = self.value
        self.field = self.value = b""

    def on_headers_finished(self) -> None:
        self.files += b"filename" in parse_options_header(self.disposition)[1]
        self.disposition = b""


def _file_parts(body: bytes, content_type: str) -> int:
    """Parts of a multipart body that Starlette would parse as files, counted with the same parser (python-multipart)
    and option parsing. Without a ``boundary`` option (``xboundary=`` is not one): 0, and FastAPI refuses the body
    (400); counting stops where the body stops parsing, and FastAPI then refuses it the same way."""
    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        return 0
    counter = _FileCounter()
    callbacks: Any = {name: getattr(counter, name) for name in vars(_FileCounter) if name.startswith("on_")}
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except FormParserError:
        pass
    return counter.files


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
