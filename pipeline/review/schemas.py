"""The review app's typed edge: the pydantic request and response models (the OpenAPI document) and its errors."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from ..decisions import NOTE_MAX


class DecisionIn(BaseModel):
    decision: Literal["confirm", "overturn", "relabel"]  # the machine was right | a false positive | another category
    category: str | None = Field(None, max_length=200, description="relabel only: one of the scan's categories")
    note: str | None = Field(None, max_length=NOTE_MAX)
    sha256: str | None = Field(
        None,
        pattern="^[0-9a-f]{64}$",
        description="the sha256 of the bytes shown (the X-Diffguard-Sha256 header of the thumbnail or image): the "
        "decision is refused (409) unless it is the scan row's",
    )


class DecisionOut(BaseModel):
    key: str
    etag: str
    fingerprint: str | None
    decision: str
    category: str | None
    note: str | None
    reviewer: str
    decided_at: str
    sha256: str | None = None  # of the bytes reviewed: the decision is in force only for an object with these bytes
    stale: bool = False  # made on other bytes than the ones the current row scored


class ItemOut(BaseModel):
    key: str
    etag: str
    sha256: str | None = None  # of the bytes scored (null: not read); every pixel shown is checked against it
    size: int | None
    action: str | None  # the policy's: flag | blur | black | block
    flagged: bool | None
    nsfw: bool | None
    score: float | None  # the queue's sort score (null: unscorable, listed first)
    categories: dict[str, float]  # category -> score (margin; > 0 is flagged)
    flagged_categories: list[str] | None
    bad_concept_names: list[str] | None
    error: str | None
    unscorable: bool | None
    truncated: bool | None
    views: int | None = None  # views scored (frames, pages, backgrounds, tiles); null in tables written before views
    views_total: int | None = None  # views the object has
    views_sampled: bool | None = None  # more than max_views: sampled over display time
    view: str | None = None  # the view that decided: what the thumbnail shows (null: the image itself)
    detector_scores: dict[str, dict[str, float]] | None = None  # detector -> output -> probability (null: none, older)
    demo: list[str] | None = None  # parts of the verdict from demo weights (meaningless scores); null in older tables
    real: list[str] | None = None  # parts of the verdict from real, trained weights
    quarantined_to: str | None
    tagged: bool | None
    last_modified: str | None
    scanned_at: str | None
    state: str  # undecided | stale | confirm | overturn | relabel
    decision: DecisionOut | None  # the latest decision on the key (stale when not made on the bytes scored)


class ItemsPage(BaseModel):
    items: list[ItemOut]
    next_cursor: str | None  # pass back as ?cursor= for the next page; null on the last
    total: int  # objects in the queue, all filters off


class Info(BaseModel):
    dest: str
    source: str | None
    queue: int
    categories: list[str]
    actions: list[str]
    states: list[str]
    decisions: int
    reviewer: str  # the caller's: the name recorded on their decisions
    auth_required: bool  # always true: every /api route needs a key
    demo_weights: bool | None = None  # the last scan ran tiny demo weights (verdicts meaningless); null: not recorded


class Problem(BaseModel):
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "missing or wrong API key"},
    404: {"model": Problem, "description": "no such object in the review queue"},
    409: {"model": Problem, "description": "the object changed since the scan (rescan first): no pixels, no decision"},
    422: {"model": Problem, "description": "a parameter outside what is allowed (names the field, value, allowed)"},
    502: {"model": Problem, "description": "the store could not be read or written"},
}
