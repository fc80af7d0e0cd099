"""Shared pieces of the scan tests: a real S3 API over HTTP (moto's server mode), images, and running the CLI.

Importing this module sets fake AWS credentials in the environment, at collection time, before any test starts Ray:
Ray's workers inherit the environment of the process that started the cluster, and boto3 finds the credentials
through its standard chain (no credentials are passed around in code).
"""

from __future__ import annotations

import io
import json
import logging
import os
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
for _var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(_var, None)


@pytest.fixture(scope="session", name="s3_endpoint")
def s3_endpoint_fixture():
    """moto's S3 server on 127.0.0.1 and a free port, for the whole session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(name="s3")
def s3_fixture(s3_endpoint):
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint)


def new_bucket(s3) -> str:
    name = f"t-{uuid.uuid4().hex[:16]}"
    s3.create_bucket(Bucket=name)
    return name


def png(seed: int, size: tuple[int, int] = (12, 16)) -> bytes:
    """A small seeded image: noise on a seeded background colour (distinct bytes, varied scores)."""
    rng = np.random.default_rng(seed)
    arr = np.clip(rng.integers(0, 256, 3) + rng.integers(-40, 40, (*size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def put_many(s3, bucket: str, objects: dict[str, bytes]) -> None:
    with ThreadPoolExecutor(8) as pool:  # within the client's connection pool
        list(pool.map(lambda kv: s3.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), objects.items()))


def all_keys(s3, bucket: str, prefix: str = "") -> set[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def body(s3, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def scan(capsys, *args: str) -> tuple[int, dict | None]:
    """``diffguard scan ... --json`` in-process (sharing the session's Ray): exit code and the one JSON object."""
    from pipeline.cli import main

    capsys.readouterr()
    rc = main(["scan", *args, "--json", "--dtype", "float32", "--device", "cpu"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) <= 1, f"stdout must hold one JSON object, got {out!r}"
    return rc, json.loads(lines[0]) if lines else None


def summary(
    scanned: int, unchanged: int, non_image: int, flagged: int, errors: int, output: str, symlinks: int = 0
) -> dict:
    return {
        "scanned": scanned,
        "skipped_unchanged": unchanged,
        "skipped_non_image": non_image,
        "skipped_symlinks": symlinks,
        "flagged": flagged,
        "errors": errors,
        "output": output,
    }


def results_layout(keys: set[str], dest_prefix: str) -> dict[str, int]:
    """What a DEST holds, by kind (from its keys): the manifest, Delta log commits, table data files, anything else."""
    rel = sorted(k[len(dest_prefix) :] for k in keys if k.startswith(dest_prefix))
    return {
        "manifest": sum(k == "_diffguard_scan.json" for k in rel),
        "commits": sum(k.startswith("results/_delta_log/") and k.endswith(".json") for k in rel),
        "data": sum(k.startswith("results/shard-") and k.endswith(".parquet") for k in rel),
        "other": sum(not (k == "_diffguard_scan.json" or k.startswith("results/")) for k in rel),
    }


def rows_by_key(dest: str, endpoint: str | None = None) -> dict[str, dict]:
    """The current view as {key: row}, asserting it holds exactly one row per key."""
    from pipeline.scan import read_current

    table = read_current(dest, endpoint)
    rows = table.to_pylist()
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)), "the current view must hold one row per object"
    return {r["key"]: r for r in rows}


def mixed_adjustment(checker, images: list[bytes]) -> float:
    """An adjustment that flags some but not all of ``images``, away from every decision boundary.

    At adjustment ``a`` an image is flagged when its highest concept margin at 0 plus ``a`` is > 0; a split between
    two neighbouring top margins more than 0.03 apart is clear of the 3-decimal rounding and the 0.01 special-care bump.
    """
    tops = sorted(max(v.concept_scores) for v in checker.check(images))
    splits = [(abs(i - len(tops) // 2), i) for i in range(len(tops) - 1) if tops[i + 1] - tops[i] > 0.03]
    assert splits, f"no clear split between these images' top margins: {tops}"
    _, i = min(splits)
    return round(-(tops[i] + tops[i + 1]) / 2, 4)


def checker_at(adjustment: float):
    from pipeline.checker import SafetyChecker

    return SafetyChecker.load("tiny", "cpu", "float32", adjustment=adjustment)
