"""The review app: a plain FastAPI app (no Ray) over a scan's current view, its SOURCE and its decisions.

Routes (all JSON under ``/api``, documented at ``/docs`` and ``/openapi.json``; the page at ``/``):

- ``GET /api/items?state=&category=&action=&cursor=&limit=``: a page of the queue, highest score first;
- ``GET /api/items/{key}``: one object; ``GET /api/items/{key}/thumbnail``: a blurred 256-px PNG (blurred here, on the
  server); ``?reveal=1`` sends that one thumbnail unblurred; ``GET /api/items/{key}/image``: the full image, unblurred
  (re-encoded as PNG, never the stored bytes);
- ``POST /api/items/{key}/decision`` ``{"decision": "confirm|overturn|relabel", "category", "note"}``;
- ``GET /api/decisions``: every decision, each marked ``stale`` when the object changed since.

Every pixel shown is of the bytes the scan scored: the object is read pinned to the scanned version (S3: its
VersionId, else If-Match on its ETag; locally the etag before and after the read) and its sha256 checked against the
row's; a changed object answers 409 "changed since the scan: rescan first", with no pixels. A decision is recorded
against that sha256, after the same check (``pipeline.decisions``), and the scan honours it only for those bytes.

Keys go in the path percent-encoded as one segment (``encodeURIComponent``); ``/`` and any other character are allowed.
Every ``/api`` route needs ``Authorization: Bearer <key>`` (an API key, a keys file's, else a token made at start),
checked with the Host, a POST's origin and the body's size by the edge (:mod:`.edge`) before any route runs.
"""

from __future__ import annotations

import getpass
import io
import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import unquote

import numpy as np
from fastapi import Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from PIL import Image

from ..decisions import Decision, DecisionLog, now, validate
from ..errors import DiffguardError, ImageDecodeError, InvalidInput, ObjectChanged, Unauthorized
from ..images import DecodeLimits
from ..keys import KeyRing
from ..policy import blur
from ..scan.state import MANIFEST, read_current
from ..storage import Location, Version, locate, parse_location, sha256
from .edge import UNAUTHORIZED, ReviewEdge, edge_rules
from .queue import PAGE_MAX, STATES, ReviewQueue
from .schemas import ERRORS, DecisionIn, DecisionOut, Info, ItemOut, ItemsPage

log = logging.getLogger(__name__)
STATIC = Path(__file__).with_name("static")
THUMBNAIL_PX = 256  # long side of a thumbnail


# --- the app --------------------------------------------------------------------------------------------------------
def _decision_out(decision: Decision, stale: bool) -> DecisionOut:
    return DecisionOut(**decision.to_json(), stale=stale)


def _item_out(item: dict[str, Any]) -> ItemOut:
    decision = item.pop("decision")
    out = ItemOut(**{k: v for k, v in item.items() if k in ItemOut.model_fields}, decision=None)
    if decision is not None:
        out.decision = DecisionOut(**decision, stale=item["state"] == "stale")
    return out


def _route(request: Request, key: str, kind: str) -> tuple[str, str]:
    """(key, kind) from the raw path when the key came percent-encoded as one segment (``/`` as ``%2F``), so a key
    like ``a/thumbnail`` is never mistaken for the thumbnail of ``a``; else the routed key and kind."""
    raw = request.scope.get("raw_path")
    if raw:
        parts = raw.decode("latin-1").split("?", 1)[0].split("/")[3:]  # after "", "api", "items"
        if len(parts) == 1:
            return unquote(parts[0]), "item"
        if len(parts) == 2 and parts[1] in ("thumbnail", "image", "decision"):
            return unquote(parts[0]), parts[1]
    return key, kind


class ReviewApp:
    """What the routes share: the DEST, the SOURCE, the queue and the decisions. Built once at start."""

    def __init__(self, dest: str, endpoint_url: str | None = None, reviewer: str | None = None):
        self.endpoint_url = endpoint_url
        self.dest: Location = parse_location(dest, endpoint_url, "DEST")
        if self.dest.store.head(self.dest.key(MANIFEST)) is None and not any(
            True for _ in self.dest.store.list(self.dest.key("parts/"))
        ):
            raise InvalidInput(f"DEST {self.dest} holds no scan results (no {MANIFEST}, no parts/): run a scan first")
        self.decisions = DecisionLog(self.dest)
        table = read_current(self.dest)
        self.queue = ReviewQueue(table, self.decisions)
        manifest = self._manifest()
        self.source = manifest.get("source")
        self.demo = (manifest.get("last_run") or {}).get("demo")  # None: not recorded (a scan before it was)
        self.reviewer = reviewer or os.environ.get("DIFFGUARD_REVIEWER") or getpass.getuser()
        self.limits = DecodeLimits()

    def _manifest(self) -> dict[str, Any]:
        try:
            raw, _ = self.dest.store.read(self.dest.key(MANIFEST))
            return json.loads(raw)
        except DiffguardError:
            return {}  # a first run still in progress: parts only

    def item(self, key: str) -> dict[str, Any]:
        item = self.queue.get(key)
        if item is None:
            raise HTTPException(
                404, f"key: got {key!r}; allowed: a key in the review queue ({self.queue_size} objects)"
            )
        return item

    @property
    def queue_size(self) -> int:
        return len(self.queue.keys)

    def scanned_bytes(self, key: str) -> tuple[bytes, dict[str, Any]]:
        """The object's bytes, read from where it is now (its quarantine copy once moved), and its row: only the bytes
        the scan scored (the read pinned to the scanned version, their sha256 the row's), else 409."""
        row = self.queue.table.slice(self.queue.position[key], 1).to_pylist()[0]
        store, object_key = locate(row, self.endpoint_url)
        url = store.url(object_key)
        if not row.get("sha256"):
            raise ObjectChanged(f"{url}: the scan did not read its bytes ({row.get('error')}): rescan first")
        info = store.head(object_key)
        if info is None:
            raise HTTPException(404, f"{url} is gone (moved or deleted since the scan)")
        if info.size > self.limits.max_bytes:
            raise ImageDecodeError(f"{url} is over the limit of {self.limits.max_bytes} bytes")
        version = None if row.get("quarantined_to") else Version.of(row)  # a quarantine copy: its sha256 pins it
        try:
            moved = version is not None and version.version_id and info.version_id != version.version_id
            if version is not None and (info.etag != version.etag or moved):
                raise ObjectChanged(f"its current version is not the one scanned (etag {info.etag})")
            data, _ = store.read(object_key, version)  # pinned too: a write between the two is never read
        except ObjectChanged as exc:
            raise ObjectChanged(f"{url} changed since the scan: rescan first ({exc})") from None
        if sha256(data) != row["sha256"]:
            raise ObjectChanged(f"{url} changed since the scan: rescan first (its bytes are not the ones scored)")
        return data, row

    def pixels(self, key: str, whole: bool = False) -> np.ndarray:
        """The view of the object that decided its verdict (its whole frame with ``whole``: a tile's frame, say), of
        the bytes the scan scored (:meth:`scanned_bytes`). RGB uint8 (H, W, 3)."""
        from ..views import find_view  # torch (the view rules' resize): loaded on the first image, not at start

        data, row = self.scanned_bytes(key)
        label = row.get("view")
        if whole and label:
            label = ", ".join(p for p in label.split(", ") if not p.startswith("tile ")) or None
        return find_view(data, self.limits, label).array


def _shown(item: dict[str, Any]) -> dict[str, str]:
    """Headers of a response with pixels: never cached; the sha256 of the bytes shown (a decision may name it)."""
    return {"Cache-Control": "no-store", "X-Diffguard-Sha256": item["sha256"]}


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _thumbnail(array: np.ndarray) -> np.ndarray:
    im = Image.fromarray(array)
    im.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX), Image.BICUBIC)
    return np.asarray(im, dtype=np.uint8)


def create_app(
    dest: str,
    endpoint_url: str | None = None,
    *,
    api_key: str | None = None,
    reviewer: str | None = None,
    keys: KeyRing | None = None,
    hosts: tuple[str, ...] = (),
):
    """The review app over the scan results at ``dest``; /api needs ``api_key`` (held by ``reviewer``), one of ``keys``
    (each its reviewer) or a token made now (``app.state.token``); ``hosts``: Host names besides loopback's.

    >>> app = create_app("./results")            # then: uvicorn.run(app, host="127.0.0.1", port=8300)
    """
    state = ReviewApp(dest, endpoint_url, reviewer)

    async def authorize(request: Request) -> None:  # the edge checked the key and named its reviewer: never without it
        if getattr(request.state, "reviewer", None) is None:
            raise Unauthorized(UNAUTHORIZED)

    api = FastAPIOffline(  # /docs and /redoc from packaged assets: no CDN, works offline
        title="diffguard review",
        version="1",
        summary="A review queue over a bucket scan's results: blurred thumbnails, decisions the scan honours.",
    )
    api.state.review = state
    rules, api.state.token = edge_rules(api_key, keys, state.reviewer, hosts)
    api.add_middleware(ReviewEdge, rules=rules)
    guarded = [Depends(authorize)]

    @api.exception_handler(DiffguardError)
    async def _diffguard_error(_request: Request, exc: DiffguardError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        return JSONResponse({"detail": exc.message}, status_code=exc.status_code, headers=headers)

    @api.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    api.mount("/static", StaticFiles(directory=STATIC), name="static")

    @api.get("/api/info", dependencies=guarded, responses=ERRORS)
    def info(request: Request) -> Info:
        return Info(
            dest=str(state.dest),
            source=state.source,
            queue=state.queue_size,
            categories=sorted(state.queue.categories),
            actions=["flag", "blur", "black", "block"],
            states=list(STATES),
            decisions=len(state.decisions.all()),
            reviewer=request.state.reviewer,
            auth_required=True,
            demo_weights=state.demo if isinstance(state.demo, bool) else None,
        )

    @api.get("/api/items", dependencies=guarded, responses=ERRORS)
    def items(
        state_: Annotated[str, Query(alias="state", description=f"one of {', '.join(STATES)}")] = "all",
        category: Annotated[str | None, Query(description="only objects flagged in this category")] = None,
        action: Annotated[str | None, Query(description="only objects with this action")] = None,
        cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
        limit: Annotated[int, Query(ge=1, le=PAGE_MAX)] = 50,
    ) -> ItemsPage:
        page = state.queue.page(state_, category or None, action or None, cursor or None, limit)
        return ItemsPage(items=[_item_out(i) for i in page.items], next_cursor=page.next_cursor, total=page.total)

    @api.get("/api/decisions", dependencies=guarded, responses=ERRORS)
    def decisions() -> list[DecisionOut]:
        rows = {k: (d, e) for k, d, e in zip(state.queue.keys, state.queue.digests, state.queue.etags, strict=True)}

        def stale(d: Decision) -> bool:  # not in force for the bytes the key's current row scored
            return d.key in rows and state.decisions.get(d.key, *rows[d.key]) != d

        return [_decision_out(d, stale(d)) for d in state.decisions.all()]

    @api.get(
        "/api/items/{key:path}/thumbnail",
        dependencies=guarded,
        responses={**ERRORS, 200: {"content": {"image/png": {}}, "description": "PNG, blurred unless reveal=1"}},
        response_class=Response,
    )
    def thumbnail(
        request: Request,
        key: str,
        reveal: Annotated[bool, Query(description="send this one thumbnail unblurred")] = False,
    ) -> Any:
        key, kind = _route(request, key, "thumbnail")
        if kind != "thumbnail":
            return JSONResponse(one(request, key).model_dump())
        item = state.item(key)
        small = _thumbnail(state.pixels(key))
        if not reveal:
            small = blur(small)  # on the server: unblurred pixels leave only on an explicit reveal
        else:
            log.info("revealed %r to the reviewer", key)
        return Response(_png(small), media_type="image/png", headers=_shown(item))

    @api.get(
        "/api/items/{key:path}/image",
        dependencies=guarded,
        responses={**ERRORS, 200: {"content": {"image/png": {}}, "description": "the full image, unblurred, as PNG"}},
        response_class=Response,
    )
    def image(request: Request, key: str) -> Any:
        key, kind = _route(request, key, "image")
        if kind != "image":
            return JSONResponse(one(request, key).model_dump())
        item = state.item(key)
        whole = _png(state.pixels(key, whole=True))
        log.info("revealed the full image %r to the reviewer", key)  # only once there are pixels to send
        return Response(whole, media_type="image/png", headers=_shown(item))

    @api.post("/api/items/{key:path}/decision", dependencies=guarded, responses=ERRORS)
    def decide(request: Request, key: str, body: DecisionIn) -> DecisionOut:
        key, kind = _route(request, key, "decision")
        if kind != "decision":
            raise HTTPException(405, f"POST {request.url.path}: decisions are posted to /api/items/{{key}}/decision")
        item = state.item(key)
        validate(body.decision, body.category, body.note, state.queue.categories)
        if body.sha256 is not None and body.sha256 != item.get("sha256"):
            raise ObjectChanged(f"sha256: got {body.sha256}; the scan scored {item.get('sha256')}: reload the item")
        state.scanned_bytes(key)  # the object still holds the bytes scored: a swapped one is never decided on
        category = body.category
        if body.decision == "confirm":  # the label: the top flagged category (none for an unscorable object)
            flagged = item.get("flagged_categories") or []
            category = max(flagged, key=lambda c: item["categories"].get(c, float("-inf")), default=None)
        decision = Decision(
            key=key,
            etag=item["etag"],
            sha256=item["sha256"],
            fingerprint=item.get("model_fingerprint"),
            decision=body.decision,
            category=category,
            note=body.note or None,
            reviewer=request.state.reviewer,
            decided_at=now(),
        )
        state.decisions.append([decision])  # durable before it is acknowledged
        return _decision_out(decision, stale=False)

    @api.get("/api/items/{key:path}", dependencies=guarded, responses=ERRORS)
    def one(request: Request, key: str) -> ItemOut:
        return _item_out(state.item(_route(request, key, "item")[0]))

    return api
