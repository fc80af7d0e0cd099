"""The adversarial corpus of issue 14 ("no bypass") as a scenario: one corpus, generated here from
``tests/adversarial.py``, driven through every path a user has, each case's outcome compared with its documented one.

Paths: ``diffguard check --json`` (a subprocess), ``/v1/moderate`` and ``/v1/generate`` on a real Serve app (tiny
models, strict: ``adjustment: 1`` flags every readable image), and ``diffguard scan --apply`` three ways: a local
directory into a quarantine directory, an S3 bucket (moto) into a local quarantine directory, and an S3 bucket with
``--tag``. Everything runs with ``--adjustment 1`` and ``--max-object-bytes 200000``, so the documented outcome of
every image is "withheld", whether scored (``block``) or unscorable (``unscorable_action: block``).

Invariants: unscored images released = 0; unscored (or flagged) objects left in place untagged under ``--apply`` = 0;
objects overwritten or lost = 0 (the SHA-256 multiset of source + quarantine is the same before and after); every
(case, path) got its documented outcome. The CI version is ``tests/integration/test_adversarial.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from tests import adversarial as adv
from tests.conftest import ROOT
from tests.hidden import CASES as HIDDEN
from tests.hidden import FILENAMES

ADJUSTMENT = "1"  # every readable image is flagged: any "allow" below would be a bypass
MAX_OBJECT_BYTES = 200_000
WITHHELD = {"blur", "black", "block"}
PATHS = ("check", "/v1/moderate", "scan local", "scan S3 → local quarantine", "scan S3 --tag")
SIZES = {"report": {"bombs": 16, "bombs_http": 6}, "ci": {"bombs": 2, "bombs_http": 2}}

# S3 keys that a local quarantine cannot hold as they are: colliding pairs, a file/dir name clash, NUL and odd keys
ODD_KEYS = {
    "colliding keys a//b.png + a/b.png": ["a//b.png", "a/b.png"],
    "colliding keys ./c.png + c.png": ["./c.png", "c.png"],
    "file/dir name clash f + f/g.png": ["f", "f/g.png"],
    "trailing slash d/ + d/e.png": ["d/", "d/e.png"],
    "NUL and control characters": ["n\x00ul.png", "ctl\x01.png"],
    "dot-dot, leading slash, %": ["x/../y.png", "/lead.png", "%41.png", "A.png"],
    "NFD + NFC é.png": [unicodedata.normalize("NFD", "é.png"), unicodedata.normalize("NFC", "é.png")],
}


@dataclass(frozen=True)
class Case:
    name: str
    key: str  # the file name / object key it is stored under
    data: bytes
    kind: str  # "scored" | "truncated" | "unscorable" | "non-image": its documented nature at the limits above


@dataclass
class Result:
    """What the scenario measured: outcome per (case, path), figures, and the invariants' counters."""

    cells: dict[str, dict[str, str]] = field(default_factory=dict)  # case -> path -> outcome
    measured: dict[str, str] = field(default_factory=dict)  # case -> bytes, pixels, time
    mismatches: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    unscored_released: int = 0
    left_in_place: int = 0
    lost: int = 0
    duplicated: int = 0

    def compare(self, before: Counter, after: Counter) -> None:
        lost, extra = _lost(before, after)
        self.lost, self.duplicated = self.lost + lost, self.duplicated + extra

    def cell(self, case: str, path: str, outcome: str, ok: bool) -> None:
        text = outcome if ok else f"**{outcome}** (not as documented)"
        row = self.cells.setdefault(case, {})
        if path in row:  # a group of objects (the 1-bit PNGs): one cell, each distinct outcome counted
            counts = Counter(dict(row[path])) if isinstance(row[path], list) else Counter({row[path]: 1})
            counts[text] += 1
            row[path] = sorted(counts.items())
        else:
            row[path] = text
        if not ok:
            self.mismatches.append(f"{case} via {path}: {outcome}")


def corpus(bombs: int) -> list[Case]:
    """The image corpus shared by every path (plus path-specific cases added where they apply)."""
    cases = [
        Case(
            f"truncated {f.replace('_', ' ').lower()} (last 2% cut)",
            f"cut/{f.lower()}.img",
            adv.truncated(f, 0.98, seed=i),
            "truncated",
        )
        for i, f in enumerate(adv.TRUNCATED_FORMATS)
    ]
    cases += [
        Case("truncated JPEG under a non-image name", "upload.bin", adv.truncated("JPEG", 0.98, seed=9), "truncated"),
        Case("JPEG cut where its image data begins", "cut/header-only.jpg", adv.header_only("JPEG"), "unscorable"),
        Case("PNG named upload.bin", "upload-png.bin", adv.image_bytes(1, "PNG"), "scored"),
        Case("JPEG named photo.png.txt", "photo.png.txt", adv.image_bytes(2, "JPEG"), "scored"),
        Case("GIF without a name suffix", "noext", adv.image_bytes(3, "GIF"), "scored"),
        Case(
            "progressive JPEG without a suffix",
            "deep/dir/PROGRESSIVE",
            adv.image_bytes(4, "PROGRESSIVE_JPEG"),
            "scored",
        ),
        Case("oversized PNG (300 kB, small pixels)", "big.png", adv.oversized_png(300_000, seed=1), "unscorable"),
        Case("oversized PNG without a suffix", "big-noext", adv.oversized_png(300_000, seed=2), "unscorable"),
        Case("empty file named .png", "empty.png", b"", "unscorable"),
        Case("garbage named .jpg", "garbage.jpg", b"\xff\xd8\xff\xe0 and then nothing a decoder can use", "unscorable"),
        Case("text file", "notes.txt", b"not an image\n", "non-image"),
        Case("random bytes named .bin", "data.bin", bytes(range(256)) * 20, "non-image"),
        Case("text without a suffix", "readme", b"# hello\n" * 100, "non-image"),
    ]
    # Issue 24: a picture hidden where a person sees it (a frame, a page, the alpha, a profile, SVG, HEIC, video).
    cases += [Case(f"hidden: {n}", f"hidden/{FILENAMES[n]}", make().data, "scored") for n, make in HIDDEN.items()]
    bomb = adv.huge_bilevel_png(seed=0)  # one seed: the same 5 kB, n names (seeds would cost seconds each)
    group = f"{bombs} × 1-bit {adv.HUGE_SIDE}² PNG ({len(bomb):,} bytes each)"
    cases += [Case(group, f"bombs/{i:03d}.png", bomb, "scored") for i in range(bombs)]
    return cases


def _pixels(data: bytes) -> str:
    try:
        w, h = Image.open(io.BytesIO(data)).size
    except Exception:  # noqa: BLE001 - not an image: no pixels
        return "no image header"
    return f"{w}×{h} ({w * h / 1e6:.1f} MP)" if w * h >= 1e6 else f"{w}×{h}"


def _reason(error: str | None) -> str:
    for pattern, short in (
        (r"over the limit|limit of", "over the byte limit"),
        (r"MP|pixels|decompression bomb", "over the pixel limit"),
        (r"empty", "empty"),
        (r"not a recognised image", "not an image"),
        (r"corrupt or truncated", "corrupt/cut before its image data"),
    ):
        if error and re.search(pattern, error):
            return short
    return (error or "")[:40]


def _verdict_outcome(row: dict[str, Any]) -> str:
    """A check/moderate row as an outcome: scored (truncated?) or unscorable (why), and its action."""
    if row.get("error"):
        return f"unscorable ({_reason(row['error'])}), action {row.get('action')}"
    return f"scored{', truncated' if row.get('truncated') else ''}, action {row.get('action')}"


def _verdict_ok(case: Case, row: dict[str, Any] | None, res: Result) -> bool:
    """Documented: every readable image scored (truncated ones say so) and every unscorable one withheld."""
    if row is None:
        return case.kind == "non-image"
    unscored = bool(row.get("error")) or not row.get("concept_scores")
    if unscored and row.get("action") not in WITHHELD:
        res.unscored_released += 1
    if case.kind in ("scored", "truncated"):
        return (
            not row.get("error")
            and bool(row.get("truncated")) == (case.kind == "truncated")
            and row["action"] == "block"
        )
    return bool(row.get("error")) and row.get("action") == "block" and row.get("unscorable") is not False


def _counts(counter: Counter) -> str:
    return ", ".join(f"{k} ×{n}" for k, n in counter.most_common())


def _write(root: Path, items: dict[str, bytes]) -> None:
    for rel, data in items.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def files(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root`` (symlinks not followed), by path relative to it."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink():
                out[path.relative_to(root).as_posix()] = path.read_bytes()
    return out


def digests(blobs: Any) -> Counter:
    return Counter(hashlib.sha256(b).hexdigest() for b in blobs)


def _lost(before: Counter, after: Counter) -> tuple[int, int]:
    """(objects lost or overwritten, objects that appeared twice): differences of two SHA-256 multisets."""
    return sum((before - after).values()), sum((after - before).values())


# --- check ------------------------------------------------------------------------------------------------------------
def run_check(cases: list[Case], tmp: Path, res: Result) -> None:
    src = tmp / "check"
    _write(src, {c.key: c.data for c in cases})
    cmd = [sys.executable, "-m", "pipeline", "check", "--json", "--device", "cpu", "--dtype", "float32"]
    cmd += ["--adjustment", ADJUSTMENT, "--max-object-bytes", str(MAX_OBJECT_BYTES), str(src)]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    rows = {Path(r["path"]).relative_to(src).as_posix(): r for r in map(json.loads, proc.stdout.splitlines())}
    res.figures["check"] = {
        "exit_code": proc.returncode,
        "rows": len(rows),
        "seconds": round(time.monotonic() - start, 1),
    }
    for c in cases:
        row = rows.get(c.key)
        outcome = "skipped (not an image)" if row is None else _verdict_outcome(row)
        res.cell(c.name, "check", outcome, _verdict_ok(c, row, res))
    if proc.returncode != 3:  # documented: 3 when any input is unscorable
        res.mismatches.append(f"check exit code {proc.returncode}, documented 3: {proc.stderr[-500:]}")


# --- /v1/moderate and /v1/generate ------------------------------------------------------------------------------------
def run_endpoints(port: int, cases: list[Case], bombs_http: int, res: Result) -> None:
    from ray import serve

    from .apps import TINY, app, apply, serve_config
    from .load import Call, LoadStats, audit

    checker = {**TINY, "max_object_bytes": MAX_OBJECT_BYTES}
    strict = {"user_config": {"adjustment": float(ADJUSTMENT)}}
    apply(serve_config(port, [app("adv", checker=checker, generator=TINY, checker_options=strict)]))
    path = "/v1/moderate"
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/adv", timeout=600) as client:
            uploads = [c for c in cases if not c.key.startswith("bombs/")]
            start = time.monotonic()
            r = client.post(
                path, files=[("files", (Path(c.key).name, c.data, "application/octet-stream")) for c in uploads]
            )
            res.figures["moderate_corpus"] = {
                "status": r.status_code,
                "files": len(uploads),
                "seconds": round(time.monotonic() - start, 2),
            }
            rows = r.json()["results"] if r.status_code == 200 else [None] * len(uploads)
            for c, row in zip(uploads, rows, strict=True):
                # an upload claims to be an image: a non-image is unscorable here, not skipped
                expect = Case(c.name, c.key, c.data, "unscorable" if c.kind == "non-image" else c.kind)
                ok = row is not None and _verdict_ok(expect, row, res)
                res.cell(c.name, path, _verdict_outcome(row) if row else f"HTTP {r.status_code}", ok)
            bomb = adv.huge_bilevel_png(seed=0)
            one = adv.image_bytes(3, size=(8, 8))
            limits = [  # (case, files, documented status, what the 413 must name)
                (f"{bombs_http} × 1-bit {adv.HUGE_SIDE}² PNG in one request", [bomb] * bombs_http, 200, None),
                (
                    "7 × 1-bit 6320² PNG (280 MP) in one request",
                    [bomb] * 7,
                    413,
                    rf"{7 * adv.HUGE_SIDE**2} pixels.*256000000",
                ),
                ("64 files in one request", [one] * 64, 200, None),
                ("65 files in one request", [one] * 65, 413, r"carries 65 files; the limit is 64"),
                ("1,024 files in one request", [b"x"] * 1024, 413, r"carries 1024 files; the limit is 64"),
            ]
            for name, blobs, status, names in limits:
                start = time.monotonic()
                r = client.post(path, files=[("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)])
                took = time.monotonic() - start
                if r.status_code == 200:
                    got = r.json()["results"]
                    actions = Counter(row["action"] for row in got)
                    ok = status == 200 and all(_verdict_ok(Case(name, "", b"", "scored"), row, res) for row in got)
                    outcome = f"200, {len(got)} scored, action {_counts(actions)}"
                else:
                    message = r.json().get("error", "")
                    ok = r.status_code == status and re.search(names or "$^", message) is not None
                    ok = ok and "concept_scores" not in r.text
                    outcome = f"{r.status_code}: {message[:200]}"
                res.cell(name, path, outcome, ok)
                pixels = sum(Image.open(io.BytesIO(b)).size[0] ** 2 for b in blobs if b.startswith(b"\x89PNG"))
                mp = f", {pixels / 1e6:,.1f} MP in all" if pixels >= 1e6 else ""
                res.measured[name] = f"{sum(map(len, blobs)):,} bytes{mp}; {took:.2f} s"
            stats = LoadStats()
            generate = "/v1/generate"
            requests = [  # (case, body, documented status)
                ("JSON nested 100,000 deep", adv.deep_json(100_000).encode(), 422),
                ("`prompt` nested 100,000 deep", ('{"prompt": ' + adv.deep_json(100_000) + "}").encode(), 422),
                ("JSON nested 2,000 deep", adv.deep_json(2_000).encode(), 422),
                ("`prompt` nested 2,000 deep", ('{"prompt": ' + adv.deep_json(2_000) + "}").encode(), 422),
                (
                    "a valid prompt, 2 images, strict checker",
                    json.dumps(
                        {"prompt": "a red bicycle", "num_images": 2, "steps": 1, "width": 64, "height": 64, "seed": 3}
                    ).encode(),
                    200,
                ),
            ]
            for name, body, status in requests:
                start = time.monotonic()
                r = client.post(generate, content=body, headers={"Content-Type": "application/json"})
                took = time.monotonic() - start
                before = stats.images_out
                audit(stats, Call("generate", generate, lambda i: {}, 2), r)
                if r.status_code == 200:
                    images = r.json()["images"]
                    actions = Counter(i["action"] for i in images)
                    outcome = (
                        f"200, {len(images)} images, action {_counts(actions)}, {stats.images_out - before} released"
                    )
                    ok = stats.images_out == before and set(actions) <= WITHHELD  # adjustment 1: all withheld
                else:
                    outcome = f"{r.status_code}: {r.json().get('error', '')[:80]}"
                    ok = "image_png_base64" not in r.text
                res.cell(name, generate, outcome, ok and r.status_code == status)
                res.measured[name] = f"{len(body):,} bytes; {took:.2f} s"
            res.unscored_released += stats.unchecked_images_out
            res.figures["generate"] = {
                "images_out": stats.images_out,
                "images_withheld": stats.images_withheld,
                "unchecked_images_out": stats.unchecked_images_out,
                "problems": stats.problems,
            }
            health = client.get("/healthz").status_code
            res.figures["healthz_after"] = health
            if health != 200:
                res.mismatches.append(f"/healthz after the corpus: {health}")
    finally:
        serve.shutdown()


# --- scan -------------------------------------------------------------------------------------------------------------
def cli(*argv: str) -> tuple[int, list[dict[str, Any]]]:
    """``diffguard ...`` in this process (sharing its Ray): exit code and the JSON objects it printed."""
    from pipeline.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(list(argv))
    return rc, [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]


def scan(*args: str) -> tuple[dict[str, Any], float]:
    start = time.monotonic()
    rc, out = cli(
        "scan",
        *args,
        "--json",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--adjustment",
        ADJUSTMENT,
        "--max-object-bytes",
        str(MAX_OBJECT_BYTES),
    )
    took = round(time.monotonic() - start, 1)
    if rc != 0 or not out:
        raise RuntimeError(f"diffguard scan {' '.join(args)} exited {rc}")
    return {k: v for k, v in out[-1].items() if k != "output"}, took


def results(dest: str, endpoint: str | None = None) -> dict[str, dict[str, Any]]:
    rc, rows = cli("scan-results", dest, *(("--endpoint-url", endpoint) if endpoint else ()))
    if rc != 0:
        raise RuntimeError(f"diffguard scan-results {dest} exited {rc}")
    return {r["key"]: r for r in rows}


def _scan_outcome(
    case: Case, row: dict[str, Any] | None, in_place: bool, tags: dict[str, str] | None
) -> tuple[str, bool]:
    if case.kind == "non-image":
        return ("skipped_non_image, left in place", row is None and in_place and not tags)
    if row is None:
        return ("no row", False)
    what = "unscorable" if row.get("unscorable") else "scored" + (", truncated" if row.get("truncated") else "")
    if row.get("quarantined_to"):
        acted = "quarantined"
    elif row.get("tagged"):
        acted = f"tagged {','.join(f'{k}={v}' for k, v in (tags or {}).items())}"
    else:
        acted = "LEFT IN PLACE"
    expected = {"scored": "scored", "truncated": "scored, truncated", "unscorable": "unscorable"}[case.kind]
    ok = row.get("flagged") and acted != "LEFT IN PLACE" and what == expected
    ok = ok and (in_place == (tags is not None))  # quarantined: gone from the source; tagged: still there
    return (f"{what} → {acted}", bool(ok))


def run_scan_local(cases: list[Case], tmp: Path, res: Result) -> None:
    path = "scan local"
    src, held, dest, outside = tmp / "src", tmp / "held", tmp / "results-local", tmp / "outside"
    _write(src, {c.key: c.data for c in cases})
    _write(outside, {"secret.png": adv.image_bytes(8), "dir/x.png": adv.image_bytes(9)})
    (src / "link.png").symlink_to(outside / "secret.png")  # out of the source
    (src / "linked-dir").symlink_to(outside / "dir", target_is_directory=True)
    first, second = adv.image_bytes(10, "BMP"), adv.image_bytes(11, "BMP")  # BMP: same size for the same dimensions
    (src / "rewritten.bmp").write_bytes(first)
    outside_before = digests(files(outside).values())
    args = (str(src), "--output", str(dest), "--quarantine", str(held))
    dry, t_dry = scan(*args)
    st = os.stat(src / "rewritten.bmp")
    (src / "rewritten.bmp").write_bytes(second)  # same size, in place, then the old mtime restored
    os.utime(src / "rewritten.bmp", ns=(st.st_atime_ns, st.st_mtime_ns))
    restored = os.stat(src / "rewritten.bmp")
    before = digests(files(src).values())
    applied, t_apply = scan(*args, "--apply")
    rows = results(str(dest))
    after_src, after_held = files(src), files(held)
    res.compare(before, digests([*after_src.values(), *after_held.values()]))
    res.left_in_place += sum(1 for k, r in rows.items() if r.get("flagged") and k in after_src)
    for c in cases:
        outcome, ok = _scan_outcome(c, rows.get(c.key), c.key in after_src, None)
        res.cell(c.name, path, outcome, ok)
    row = rows.get("rewritten.bmp") or {}
    rescored = applied["scanned"] == 1 and row.get("sha256") == hashlib.sha256(second).hexdigest()
    moved = row.get("quarantined_to") and Path(row["quarantined_to"]).read_bytes() == second
    name = "same-size rewrite, old mtime restored (os.utime)"
    res.cell(
        name,
        path,
        "rescored (new sha256) → quarantined with the new bytes" if rescored and moved else f"not rescored: {row}",
        bool(rescored and moved),
    )
    res.measured[name] = (
        f"{len(second):,} bytes both; mtime_ns {restored.st_mtime_ns == st.st_mtime_ns and 'equal' or 'differs'}"
    )
    name = "symlinks out of the source (file and dir)"
    res.measured[name] = "link.png → ../outside/secret.png, linked-dir → ../outside/dir"
    untouched = digests(files(outside).values()) == outside_before and (src / "link.png").is_symlink()
    res.cell(
        name,
        path,
        f"skipped_symlinks {applied['skipped_symlinks']}, targets untouched" if untouched else "targets changed",
        untouched and applied["skipped_symlinks"] == 2,
    )
    res.figures["scan local"] = {
        "dry_run": dry,
        "dry_run_s": t_dry,
        "apply": applied,
        "apply_s": t_apply,
        "held_files": len(after_held),
    }


def run_scan_s3(cases: list[Case], tmp: Path, endpoint: str, res: Result) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint)
    odd = [
        Case(group, key, adv.image_bytes(100 + i * 10 + j), "scored")
        for i, (group, keys) in enumerate(ODD_KEYS.items())
        for j, key in enumerate(keys)
    ]
    objects = {c.key: c.data for c in [*cases, *odd]}

    def bucket() -> str:
        name = f"adv-{os.urandom(6).hex()}"
        s3.create_bucket(Bucket=name)
        for key, data in objects.items():
            s3.put_object(Bucket=name, Key=key, Body=data)
        return name

    def listing(name: str) -> dict[str, bytes]:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=name)
        keys = [o["Key"] for p in pages for o in p.get("Contents", [])]
        return {k: s3.get_object(Bucket=name, Key=k)["Body"].read() for k in keys}

    # into a local quarantine directory (an absolute path: local even though SOURCE is S3)
    path, name, held, dest = "scan S3 → local quarantine", bucket(), tmp / "held-s3", str(tmp / "results-s3")
    before = digests(listing(name).values())
    summary, took = scan(
        f"s3://{name}", "--output", dest, "--endpoint-url", endpoint, "--quarantine", str(held), "--apply"
    )
    rows, left, stored = results(dest), listing(name), files(held)
    res.compare(before, digests([*left.values(), *stored.values()]))
    res.left_in_place += sum(1 for k, r in rows.items() if r.get("flagged") and k in left)
    for c in cases:
        outcome, ok = _scan_outcome(c, rows.get(c.key), c.key in left, None)
        res.cell(c.name, path, outcome, ok)
    for group, keys in ODD_KEYS.items():
        got = [rows.get(k) or {} for k in keys]
        targets = [r.get("quarantined_to") for r in got]
        intact = all(t and Path(t).read_bytes() == objects[k] for k, t in zip(keys, targets, strict=True))
        ok = intact and len(set(targets)) == len(keys) and not set(keys) & set(left)
        res.cell(
            group,
            path,
            f"{len(set(filter(None, targets)))} files for {len(keys)} objects, each with its own bytes (sha256 intact)"
            if ok
            else f"collided or lost: {targets}",
            bool(ok),
        )
        res.measured[group] = "; ".join(
            f"{k!r} → {Path(t).relative_to(held).as_posix() if t else None}" for k, t in zip(keys, targets, strict=True)
        )
    res.figures["scan S3 → local quarantine"] = {
        "summary": summary,
        "seconds": took,
        "objects": len(objects),
        "held_files": len(stored),
    }

    # tagged in place
    path, name, dest = "scan S3 --tag", bucket(), str(tmp / "results-tag")
    before = digests(listing(name).values())
    summary, took = scan(f"s3://{name}", "--output", dest, "--endpoint-url", endpoint, "--tag", "--apply")
    rows, left = results(dest), listing(name)
    res.compare(before, digests(left.values()))

    def tags(key: str) -> dict[str, str]:
        return {t["Key"]: t["Value"] for t in s3.get_object_tagging(Bucket=name, Key=key)["TagSet"]}

    untagged = [k for k, r in rows.items() if r.get("flagged") and tags(k) != {"moderation": "nsfw"}]
    res.left_in_place += len(untagged)
    for c in cases:
        outcome, ok = _scan_outcome(c, rows.get(c.key), c.key in left, tags(c.key))
        res.cell(c.name, path, outcome, ok)
    for group, keys in ODD_KEYS.items():
        ok = all((rows.get(k) or {}).get("tagged") and tags(k) == {"moderation": "nsfw"} for k in keys)
        res.cell(group, path, "each tagged moderation=nsfw, bytes unchanged" if ok else "untagged", ok)
    res.figures["scan S3 --tag"] = {"summary": summary, "seconds": took, "untagged_flagged": untagged}


def adversarial_scenario(port: int, endpoint: str, size: str = "report") -> dict[str, Any]:
    """Build the corpus, drive it through every path, and return the report scenario (``figures['table']`` holds
    the (case, path) matrix)."""
    sizes = SIZES[size]
    cases = corpus(sizes["bombs"])
    res = Result()
    for c in cases:
        res.measured[c.name] = f"{len(c.data):,} bytes; {_pixels(c.data)}"
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        run_check(cases, Path(tmp), res)
        run_endpoints(port, cases, sizes["bombs_http"], res)
        run_scan_local(cases, Path(tmp), res)
        run_scan_s3(cases, Path(tmp), endpoint, res)
    figures = {
        "case_count": len(res.cells),
        "outcomes": sum(map(len, res.cells.values())),
        "mismatches": res.mismatches,
        "unchecked_images_out": res.unscored_released,
        "left_in_place_untagged": res.left_in_place,
        "violations": {"lost_objects": res.lost, "duplicated_objects": res.duplicated},
        **res.figures,
        "seconds": round(time.monotonic() - started, 1),
        "table": {
            "paths": ["check", "/v1/moderate", "/v1/generate", *PATHS[2:]],
            "cells": res.cells,
            "measured": res.measured,
        },
    }
    return {
        "title": "Adversarial corpus (issue 14: no bypass)",
        "injected": f"{len(cases)} adversarial objects ({sizes['bombs']} of them 1-bit {adv.HUGE_SIDE}² PNGs) plus "
        f"{sum(map(len, ODD_KEYS.values()))} odd S3 keys, a symlink pair, a same-size rewrite and request-limit and "
        "deep-JSON requests (tests/reliability/adversarial.py), and issue 24's pictures hidden where a person sees "
        f"them ({len(HIDDEN)} `hidden:` rows: a frame, a page, the alpha, a colour profile, a tile, SVG, HEIC, ICO, "
        "MPO, video; here every one must be read and scored, never skipped; that each is flagged at the view that "
        "hides it, with a policy firing on that picture alone, is tests/integration/test_views_paths.py), "
        "through `diffguard check`, `/v1/moderate`, "
        "`/v1/generate` and `diffguard scan --apply` (local → quarantine dir, S3 → local quarantine dir, S3 --tag), "
        f"all at `--adjustment {ADJUSTMENT}` and `--max-object-bytes {MAX_OBJECT_BYTES}`",
        "figures": figures,
        "invariants": {
            "unscored images released = 0": res.unscored_released == 0,
            "unscored or flagged objects left in place untagged under --apply = 0": res.left_in_place == 0,
            "objects overwritten or lost = 0 (sha256 multiset of source + quarantine)": res.lost == res.duplicated == 0,
            "every (case, path) as documented": not res.mismatches,
        },
    }
