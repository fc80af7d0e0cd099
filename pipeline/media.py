"""What an object is by its content, and what it costs to score, from headers alone (no torch, no pixels decoded).

:func:`media_format` is how every path picks what to moderate (``check``'s folder walk, the scan's sniff of objects
not named like images, ``/v1/moderate``): anything a browser or phone shows as a picture or a video, whatever its
name. :func:`price` is what the HTTP edge counts against ``max_request_pixels`` before anything is decoded.
"""

from __future__ import annotations

import io

from .images import DecodeLimits, identify, register_plugins

SVG_CANVAS_PIXELS = 1024 * 1024  # an SVG is rendered within 1024 px on its long side (pipeline.svg.fit_canvas)


def media_format(data: bytes) -> str | None:
    """What the bytes (or a prefix of them) are: Pillow's format name (every image format read here, HEIC and JPEG XL
    included), ``"SVG"``, ``"VIDEO"``, or None when a person would not see a picture in them."""
    from .svg import is_svg
    from .video import is_video

    if header := identify(data):
        return header.format
    if is_svg(data):
        return "SVG"
    return "VIDEO" if is_video(data) else None


def price(data: bytes, limits: DecodeLimits) -> int:
    """Pixels scoring ``data`` decodes into views, from its headers: every frame of an animation or page of a
    document, the sampled frames of a video (at ``video_fps``, at most ``max_views``), an SVG's render canvas.
    0 for what is refused from its header alone (over a limit: never decoded) or is not media at all."""
    header = identify(data)
    if header is not None:
        if header.pixels is None or header.pixels > limits.max_pixels:
            return 0
        return header.pixels * _frames(data)
    kind = media_format(data)
    if kind == "SVG":
        return SVG_CANVAS_PIXELS
    if kind == "VIDEO":
        from .video import probe

        head = probe(data)
        if head is None or head.width * head.height > limits.max_pixels:
            return 0
        samples = 2 + int((head.duration_s or 0) * limits.video_fps)
        return head.width * head.height * min(samples, limits.max_views)
    return 0


def _frames(data: bytes) -> int:
    """Frames or pages Pillow would decode (1 when the header says nothing else)."""
    from PIL import Image

    register_plugins()
    try:
        with Image.open(io.BytesIO(data)) as im:
            return max(1, int(getattr(im, "n_frames", 1)))
    except Exception:  # noqa: BLE001 - a header Pillow cannot walk prices as one frame; decoding will say why
        return 1
