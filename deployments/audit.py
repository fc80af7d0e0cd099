"""The Ingress's side of the audit log (:mod:`pipeline.audit`): one row per decision of ``/v1/generate`` and
``/v1/moderate``, durable before the response leaves.

An answered decision waits for its row's group commit; when the log cannot be written the route answers 503 and
releases nothing (``audit_required: true``, the default), or answers and counts the failure
(``diffguard_audit_failures``) when the config says ``audit_required: false``. Refused and failed requests are
recorded too, without delaying their error response. The prompt's text is kept only for tenants whose keys file
entry asks for it (``log_prompt_text``); otherwise its SHA-256.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

from pipeline.errors import Unavailable

log = logging.getLogger("ray.serve")


def sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def image_row(verdict: dict[str, Any], action: str, digest: str | None, filename: str | None = None) -> dict[str, Any]:
    """One image of a row: the bytes' SHA-256 (returned or uploaded; None when nothing left) and its verdict."""
    return {
        "sha256": digest,
        "filename": filename,
        "nsfw": bool(verdict.get("nsfw")),
        "flagged": list(verdict.get("flagged_categories") or []),
        "categories": json.dumps(verdict.get("categories") or {}, sort_keys=True),
        "action": action,
        "views": int(verdict.get("views") or 0),
        "error": verdict.get("error"),
    }


class Auditor:
    """Rows for one Ingress replica; ``None`` dest: no audit log (every call is a no-op).

    >>> auditor = Auditor("s3://bucket/audit", required=True, replica="ingress-1")
    >>> await auditor.decision(request, "moderate", 200, images=[...], policy=..., fingerprint=...)
    """

    def __init__(self, dest: str | None, *, required: bool = True, replica: str = "", on_failure: Any = None):
        self.dest, self.required, self.on_failure = dest, required, on_failure
        self.log = None
        if dest is not None:
            from pipeline.audit import AuditLog

            self.log = AuditLog(dest, replica=replica)
        self._pending: set[asyncio.Task[None]] = set()

    def row(self, request: Any, route: str, status: int, **fields: Any) -> dict[str, Any]:
        caller, state = request.state.caller, request.state
        started = getattr(state, "started", None)
        latency = 1000 * (time.perf_counter() - started) if started is not None else None
        row = {
            "time": datetime.now(UTC),
            "request_id": getattr(state, "request_id", None) or "",
            "key_id": caller.id,
            "tenant": caller.tenant,
            "route": route,
            "status": status,
            "latency_ms": latency,
            "prompt_sha256": None,
            "prompt": None,
            "seed": None,
            "params": None,
            "images": [],
            "policy": caller.policy,
            "policy_fingerprint": None,
            "models": None,
            "error": None,
        }
        row.update(fields)
        return row

    def generation(self, request: Any, body: dict[str, Any], seed: int | None) -> dict[str, Any]:
        """The prompt (its SHA-256; its text for tenants that ask), seed and parameters of a generation."""
        caller = request.state.caller
        prompt = str(body.get("prompt", ""))
        params = {k: v for k, v in body.items() if k not in ("prompt", "negative_prompt")}
        if body.get("negative_prompt"):
            params["negative_prompt_sha256"] = sha256(str(body["negative_prompt"]))
        return {
            "prompt_sha256": sha256(prompt),
            "prompt": prompt if getattr(caller, "log_prompt_text", False) else None,
            "seed": seed,
            "params": json.dumps(params, sort_keys=True, default=str),
        }

    async def decision(self, request: Any, route: str, status: int, **fields: Any) -> None:
        """Record an answered decision and return once it is durable; 503 when it cannot be (unless not required)."""
        if self.log is None:
            return
        try:
            await self.log.record(self.row(request, route, status, **fields))
        except Exception as exc:  # noqa: BLE001 - AuditUnavailable, or anything the sink raised
            if self.on_failure is not None:
                self.on_failure(route)
            log.error("audit log %s could not record request %s: %r", self.dest, request.state.request_id, exc)
            if self.required:
                raise Unavailable(
                    "the audit log cannot be written, so no decision is answered; nothing was released"
                ) from None

    def failure(self, request: Any, route: str, status: int, message: str) -> None:
        """Record a refused or failed decision request in the background (its error response does not wait)."""
        if self.log is None:
            return
        row = self.row(request, route, status, error=message[:500])
        task = asyncio.get_running_loop().create_task(self._quietly(row))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _quietly(self, row: dict[str, Any]) -> None:
        try:
            await self.log.record(row)  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001
            if self.on_failure is not None:
                self.on_failure(row["route"])
            log.warning("audit log %s could not record failed request %s: %r", self.dest, row["request_id"], exc)
