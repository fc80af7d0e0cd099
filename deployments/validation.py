"""FastAPI's validation errors as one message for the error body: each field, the value received, what is allowed."""

from __future__ import annotations

from typing import Any

from pipeline.requests import GenerationLimits, GenerationRequest

from .schemas import _bounds
from .uploads import listing

_TYPES = {
    "prompt": "a string",
    "negative_prompt": "a string or null",
    "num_images": "an integer",
    "steps": "an integer",
    "guidance_scale": "a number",
    "width": "an integer or null",
    "height": "an integer or null",
    "seed": "an integer or null",
    "safety": "one of off, weak, medium, strong, max",
}


def allowed(field: str, limits: GenerationLimits) -> str:
    """What ``field`` of a generation request may be under these limits, in words."""
    kind = _TYPES.get(field)
    if kind is None:
        return ""
    b = _bounds(limits).get(field, {})
    if "minimum" in b:
        kind += f" within {b['minimum']}..{b['maximum']}"
    if "multipleOf" in b:
        kind += f", a multiple of {b['multipleOf']}"
    if "maxLength" in b:
        kind += f" of at most {b['maxLength']} characters"
    return kind


def _one(error: dict[str, Any], limits: GenerationLimits) -> str:
    loc = [str(p) for p in error.get("loc", ())]
    if loc and loc[0] == "body":
        loc = loc[1:]
    kind = error.get("type", "")
    if kind == "json_invalid":
        return f"the body is not valid JSON ({error.get('ctx', {}).get('error', 'JSON decode error')})"
    where = ".".join(loc)
    if not where:
        if kind == "missing":
            return "the body is not valid JSON (it is empty): send a JSON object with at least `prompt`"
        received = type(error.get("input")).__name__
        return f"the request must be a JSON object with at least `prompt`, got {received}"
    if loc[0] == "files":  # multipart: a `files` part without a filename is a text field, not a file
        received = repr(error.get("input"))[:60]
        return f"multipart body has no `files` field with a file at `{where}`: send file parts, got text {received}"
    if kind == "missing":
        return f"`{where}` is required" + (f" ({allowed(where, limits)})" if allowed(where, limits) else "")
    if kind == "extra_forbidden":
        return f"`{where}` is not a known field; allowed: {', '.join(GenerationRequest.model_fields)}"
    received = repr(error.get("input"))
    rule = allowed(loc[0], limits)
    return f"`{where}`: {error.get('msg', 'invalid').lower()}, got {received[:60]}" + (
        f"; allowed: {rule}" if rule else ""
    )


def describe_validation(errors: list[dict[str, Any]], limits: GenerationLimits | None = None) -> str:
    """``"`steps`: input should be a valid integer, got 'many'; allowed: an integer within 1..150"``, at most 10."""
    return listing([_one(e, limits or GenerationLimits()) for e in errors])
