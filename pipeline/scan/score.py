"""The scan's decode and score stages as plain functions over Arrow batches (no Ray: :mod:`pipeline.scan.job` runs
them as Ray Data stages). The same core as ``check`` and the Serve replicas: :meth:`SafetyChecker.views` rules
(:func:`pipeline.views.load_views`), the checker's preprocessing, and :meth:`SafetyChecker.score_pixels`.

decode: bytes -> views -> preprocessed pixels, one row per object (its views' pixels as one float32 blob, their labels,
and each detector's prepared inputs as another blob)
score: rows of many objects -> their views in shared vision passes and one forward per detector -> one result row per
object.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import InvalidInput
from ..images import DecodeLimits
from ..policy import outcome
from ..preprocess import Preprocess
from ..spec import CheckerSpec
from ..verdict import Verdict
from ..views import load_views
from .state import NOT_IMAGE, rows_table

VIEW_COLUMNS = [
    ("truncated", pa.bool_()),
    ("view_labels", pa.list_(pa.string())),  # one per view, in the order of the pixels
    ("views_total", pa.int32()),
    ("views_sampled", pa.bool_()),
    ("pixels", pa.large_binary()),  # float32 (views, 3, crop_h, crop_w), C order; empty when nothing is scored
    ("detector_inputs", pa.list_(pa.large_binary())),  # per detector in force: float32 (views, *its input shape)
]
Transforms = dict[str, tuple[Callable[[list[np.ndarray]], np.ndarray], tuple[int, ...]]]  # DetectorSet.transforms


def decode_stage(
    batch: pa.Table, preprocess: Preprocess, limits: DecodeLimits, detectors: Transforms | None = None
) -> pa.Table:
    """Read rows -> the same rows with their views preprocessed, for the checker and for each detector in force
    (``detectors``: :meth:`DetectorSet.transforms`); what cannot be decoded is that row's error."""
    errors, kinds = batch["error"].to_pylist(), batch["error_kind"].to_pylist()
    readable = [i for i in range(batch.num_rows) if errors[i] is None and kinds[i] is None]
    bodies = batch["data"].to_pylist()
    objects = load_views([bodies[i] for i in readable], limits, preprocess)
    columns: dict[str, list[Any]] = {
        "truncated": [False] * batch.num_rows,
        "view_labels": [[] for _ in range(batch.num_rows)],
        "views_total": [0] * batch.num_rows,
        "views_sampled": [False] * batch.num_rows,
        "pixels": [b""] * batch.num_rows,
        "detector_inputs": [[] for _ in range(batch.num_rows)],
    }
    for i, obj in zip(readable, objects, strict=True):
        if isinstance(obj, Exception):
            errors[i], kinds[i] = str(obj), "decode"
            continue
        try:
            arrays = [v.array for v in obj.views]
            pixels = preprocess(arrays).numpy()  # (V, 3, H, W) float32
            inputs = [_prepared(ref, transform, shape, arrays) for ref, (transform, shape) in (detectors or {}).items()]
        except Exception as exc:  # noqa: BLE001 - this object's error, never the batch's
            errors[i], kinds[i] = f"cannot preprocess image: {exc}", "decode"
            continue
        columns["truncated"][i], columns["views_total"][i], columns["views_sampled"][i] = (
            obj.truncated,
            obj.total,
            obj.sampled,
        )
        columns["view_labels"][i] = [v.label for v in obj.views]
        columns["pixels"][i] = pixels.tobytes()
        columns["detector_inputs"][i] = inputs
    table = batch.drop_columns(["data", "error", "error_kind", "whole"])
    table = table.append_column("error", pa.array(errors, pa.string()))
    table = table.append_column("error_kind", pa.array(kinds, pa.string()))
    for name, type_ in VIEW_COLUMNS:
        table = table.append_column(name, pa.array(columns[name], type_))
    return table


def _prepared(ref: str, transform: Callable[[list[np.ndarray]], np.ndarray], shape: tuple, arrays: list) -> bytes:
    """One object's views prepared for detector ``ref``, checked to be (views, *shape) float32 (what Scorer reads)."""
    out = np.ascontiguousarray(transform(arrays), dtype=np.float32)
    if out.shape != (len(arrays), *shape):
        raise ValueError(f"detector {ref!r} prepared {out.shape} for {len(arrays)} views, expected (views, *{shape})")
    return out.tobytes()


class Scorer:
    """Holds the core checker (loaded from the driver's spec, adopting its resolved concept rows): decoded rows of
    many objects in, one result row per object out, their views scored in shared passes."""

    def __init__(self, spec: CheckerSpec, concepts: Any, fingerprint: str, bucket: str, threads: int | None):
        if threads:  # Ray gives a 1-CPU actor OMP_NUM_THREADS=1: a third of a 2-core machine's matmul throughput
            import torch

            torch.set_num_threads(threads)
        self.checker = spec.load(concepts=concepts)
        if self.checker.fingerprint != fingerprint:
            raise InvalidInput(
                f"the checker loaded on this worker has fingerprint {self.checker.fingerprint}, the driver's is "
                f"{fingerprint}: model {spec.model!r} differs between nodes"
            )
        self.bucket, self.max_pixels, self.max_object_bytes = bucket, spec.max_pixels, spec.max_object_bytes

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        meta = batch.drop_columns(["pixels", "detector_inputs"]).to_pylist()
        blobs, inputs = batch["pixels"].to_pylist(), batch["detector_inputs"].to_pylist()
        verdicts: list[Verdict | None] = [None] * len(meta)
        scored = []
        for i, m in enumerate(meta):
            if m["error"] is not None or m["error_kind"] is not None:
                continue
            if (refused := self.checker.over_view_budget(m["views_sampled"], m["views_total"])) is not None:
                verdicts[i] = refused
            else:
                scored.append(i)
        if scored:
            ch, cw = self.checker.preprocess.crop
            pixels = np.concatenate([np.frombuffer(blobs[i], np.float32).reshape(-1, 3, ch, cw) for i in scored])
            labels = [meta[i]["view_labels"] for i in scored]
            concepts = self.checker.concepts
            shapes = [(ref, self.checker.detectors.of(concepts, ref).input_shape) for ref in concepts.detectors]
            prepared = {  # each detector's inputs for every scored view, in the pixels' order
                ref: np.concatenate([np.frombuffer(inputs[i][k], np.float32).reshape(-1, *shape) for i in scored])
                for k, (ref, shape) in enumerate(shapes)
            }
            if any(len(p) != len(pixels) for p in prepared.values()):  # the decode stage's shapes are checked there
                raise InvalidInput(f"detector inputs {[len(p) for p in prepared.values()]} for {len(pixels)} views")
            results = self.checker.score_pixels(torch.from_numpy(pixels), labels, prepared)
            for i, verdict in zip(scored, results, strict=True):
                verdict.views_total, verdict.views_sampled = meta[i]["views_total"], meta[i]["views_sampled"]
                verdict.truncated = bool(meta[i]["truncated"])
                verdicts[i] = verdict
        now = datetime.now(UTC)
        return rows_table([self._row(m, v, now) for m, v in zip(meta, verdicts, strict=True)])

    def _row(self, m: dict[str, Any], verdict: Verdict | None, now: datetime) -> dict[str, Any]:
        kind = m["error_kind"]
        if verdict is not None:  # scored (or withheld for its view budget): the policy decides
            fields = outcome(verdict)
        elif kind == "decode":  # read, but not scorable: the policy's unscorable_action (block by default)
            fields = outcome(self.checker.unscorable(m["error"]))
        elif kind == NOT_IMAGE:  # recorded so that it is not read again while unchanged
            fields = {**Verdict(views=0, views_total=0).to_dict(), "action": None, "flagged": False}
        else:  # a read error is not content: retried next run, never acted on
            fields = {**Verdict.failed(m["error"]).to_dict(), "action": None, "flagged": False}
        return {
            "bucket": self.bucket,
            **{k: m[k] for k in ("key", "etag", "size", "sha256", "version_id")},
            "last_modified": datetime.fromtimestamp(m["last_modified_us"] / 1e6, UTC),
            **fields,
            "error_kind": kind,
            "model_fingerprint": self.checker.fingerprint,
            "max_pixels": self.max_pixels,
            "max_object_bytes": self.max_object_bytes,
            "scanned_at": now,
            "quarantined_to": None,
            "tagged": False,
        }
