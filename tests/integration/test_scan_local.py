"""`diffguard scan` with a local directory as SOURCE, DEST and quarantine (the embedded default)."""

from __future__ import annotations

import json
import logging
import os

import pytest

from tests.integration.scan_support import checker_at, mixed_adjustment, png, rows_by_key, scan, summary


@pytest.mark.usefixtures("ray_cluster")
def test_local_directories(tmp_path, capsys, checker):
    src, held = tmp_path / "photos", tmp_path / "held"
    images = {f"{d}/{i:02d}.png": png(600 + i) for i, d in enumerate(["a", "a/b", "c d", "ü 名前"] * 3)}
    for rel, data in images.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    (src / "zero.png").write_bytes(b"")
    (src / "a" / "broken.gif").write_bytes(b"GIF89a\x01")
    (src / "notes.txt").write_text("not an image")
    dest = str(src / "_scan")  # inside the source: excluded from the listing
    adjustment = mixed_adjustment(checker, list(images.values()))
    expected = {k: v.nsfw for k, v in zip(images, checker_at(adjustment).check(list(images.values())), strict=True)}
    flagged = {k for k, nsfw in expected.items() if nsfw}
    assert 0 < len(flagged) < len(images)
    args = (str(src), "--output", dest, "--adjustment", str(adjustment), "--quarantine", str(held))

    unscorable = {"zero.png", "a/broken.gif"}  # read but not scorable: withheld (flagged) as well as errors
    rc, out = scan(capsys, *args)
    assert rc == 0 and out == summary(14, 0, 1, len(flagged) + 2, 2, dest)
    rows = rows_by_key(dest)
    assert set(rows) == set(images) | {"zero.png", "a/broken.gif"}  # keys are paths relative to SOURCE
    assert {k: rows[k]["nsfw"] for k in images} == expected
    assert rows["zero.png"]["error"].startswith("empty file") and rows["zero.png"]["error_kind"] == "decode"
    for key in unscorable:
        assert (rows[key]["action"], rows[key]["flagged"], rows[key]["unscorable"]) == ("block", True, True), key
    assert all(r["bucket"] == str(src) for r in rows.values())
    assert not held.exists()  # dry run

    rc, out = scan(capsys, *args)
    assert out == summary(0, 14, 1, 0, 0, dest)  # nothing rescored

    (src / "a/00.png").write_bytes(png(777))  # rewritten: new size/mtime etag
    os.utime(src / "a/04.png")  # touched only: the etag changes too, so it is rescored (same verdict)
    rc, out = scan(capsys, *args, "--apply")
    assert rc == 0 and out["scanned"] == 2 and out["skipped_unchanged"] == 12
    after = rows_by_key(dest)
    assert after["a/00.png"]["etag"] != rows["a/00.png"]["etag"]
    images["a/00.png"] = png(777)
    moved = {k for k, r in after.items() if r["quarantined_to"]}
    assert moved == {k for k, r in after.items() if r["nsfw"]} | unscorable and moved
    assert not (src / "zero.png").exists() and (held / "zero.png").read_bytes() == b""
    for key in images:
        if key in moved:
            assert not (src / key).exists()
            assert (held / key).read_bytes() == images[key]  # verified copy, then the original was removed
            assert after[key]["quarantined_to"] == str(held / key)
        else:
            assert (src / key).read_bytes() == images[key]
    assert sorted(p.name for p in (src / "_scan").iterdir()) == ["_diffguard_scan.json", "results"]  # parts folded in
    last_run = json.loads((src / "_scan" / "_diffguard_scan.json").read_text())["last_run"]
    assert last_run["demo"] is True  # the tiny checker: the review page warns that the verdicts are meaningless

    from pipeline.cli import main

    capsys.readouterr()
    assert main(["scan-results", dest, "--flagged"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["key"] for r in printed} == moved


@pytest.mark.usefixtures("ray_cluster")
def test_policy_categories_reach_the_rows_and_decide_the_actions(tmp_path, capsys):
    """`--policy`: every row carries categories, flagged_categories and action exactly as the core scores them, and
    quarantine moves what the policy withholds (a `block` category), not only the stock `nsfw` decision."""
    from PIL import Image

    from pipeline.checker import SafetyChecker
    from pipeline.cli import main
    from tests.labelled import write_labelled, write_policy

    examples = write_labelled(tmp_path / "examples", {"violence": 6, "sexual": 6}, seed=1)
    # Example-image concepts default to the lowest cosine of their examples to the centroid, so images of the same
    # class land near a margin of 0; a threshold 0.2 lower keeps every decision clear of rounding. Tiny stock weights
    # flag everything, so the stock decision only flags here: what is withheld is what the `block` category decides.
    defaults = SafetyChecker.load("tiny", "cpu", "float32", policy=write_policy(tmp_path / "p0.yaml", examples))
    threshold = {c["name"]: c["threshold"] - 0.2 for c in defaults.info()["concepts"] if c["kind"] == "policy"}
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"""version: 1
name: scan-test
nsfw_action: flag
categories:
  violence:
    action: block
    concepts: [{{images: {examples / "violence"}, threshold: {threshold["violence:0"]}}}]
  sexual:
    action: flag
    concepts: [{{images: {examples / "sexual"}, threshold: {threshold["sexual:0"]}}}]
"""
    )
    src, held, dest = tmp_path / "photos", tmp_path / "held", str(tmp_path / "results")
    write_labelled(src, {"safe": 5, "violence": 5, "sexual": 3}, seed=2)
    keys = sorted(str(p.relative_to(src)) for p in src.rglob("*.png"))
    reference = SafetyChecker.load("tiny", "cpu", "float32", policy=policy)
    expected = dict(zip(keys, reference.check([Image.open(src / k) for k in keys]), strict=True))
    withheld = {k for k, v in expected.items() if v.action in ("blur", "black", "block")}
    assert withheld == {k for k in keys if k.startswith("violence/")}, "the example concept must catch its class"

    rc, out = scan(capsys, str(src), "--output", dest, "--policy", str(policy), "--quarantine", str(held), "--apply")
    assert rc == 0 and out == summary(len(keys), 0, 0, len(withheld), 0, dest)
    rows = rows_by_key(dest)
    for key, verdict in expected.items():
        row = rows[key]
        assert dict(row["categories"]) == verdict.categories, key
        assert (row["flagged_categories"], row["action"]) == (verdict.flagged_categories, verdict.action), key
        assert row["flagged"] == (key in withheld) and row["nsfw"] == verdict.nsfw
    assert {k for k, r in rows.items() if r["quarantined_to"]} == withheld
    assert {str(p.relative_to(held)) for p in held.rglob("*.png")} == withheld
    assert not any((src / k).exists() for k in withheld)

    capsys.readouterr()
    assert main(["scan-results", dest, "--flagged"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["key"] for r in printed} == withheld
    assert all(set(r["categories"]) == {"violence", "sexual"} for r in printed)  # a JSON object, not pairs

    rc, out = scan(capsys, str(src), "--output", dest, "--policy", "stock")  # another policy: a new fingerprint
    assert rc == 0 and out["scanned"] == len(keys) - len(withheld) and out["skipped_unchanged"] == 0


@pytest.mark.usefixtures("ray_cluster")
def test_table_and_progress_line_count_in_the_same_words(tmp_path, capsys, caplog):
    """The summary table and the stderr progress line use the words of docs/CLI.md (Words)."""
    from pipeline.cli import main

    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"{i}.png").write_bytes(png(900 + i))
    (src / "zero.png").write_bytes(b"")  # unscorable: withheld
    (src / "notes.txt").write_text("not an image")  # read (sniffed) and committed, but skipped: not scanned
    caplog.set_level(logging.INFO, logger="diffguard")
    capsys.readouterr()
    args = ["scan", str(src), "--output", str(tmp_path / "dest"), "--adjustment", "1", "--dtype", "float32"]
    assert main([*args, "--device", "cpu"]) == 0
    table = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines()]
    assert "scanned in this run 5 (images read: scored, unscorable or read errors)" in table
    assert "scored 4" in table and "unscorable 1 (the policy's unscorable_action: block)" in table
    assert 'withheld 5 (4 flagged + 1 unscorable; JSON "flagged")' in table and "skipped: not images 1" in table
    progress = (
        "6 of 6 objects read and committed: 5 scanned (4 scored, 1 unscorable, 0 read errors), 1 skipped: not images"
    )
    assert progress in caplog.messages
