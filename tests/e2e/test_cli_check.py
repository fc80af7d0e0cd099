"""`diffguard check` as a user runs it: a subprocess, stdout/stderr and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from tests.conftest import ROOT


def run(*args, cwd=ROOT, columns=None):
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | ({"COLUMNS": str(columns)} if columns else {})
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=cwd, timeout=300, env=env
    )


def test_examples_table():
    out = run("check", "examples/")
    assert out.returncode == 0, out.stderr
    assert "MEANINGLESS" in out.stderr  # tiny weights are always announced
    assert "4 checked: 4 scored, 0 unscorable (block); 2 withheld (2 flagged, 0 unscorable), 0 reported" in out.stdout
    assert "tiny demo weights" in out.stdout


def test_examples_table_at_80_columns():
    out = run("check", "examples/", columns=80)
    assert out.returncode == 0, out.stderr
    table = out.stdout.split("\n\n")[0].splitlines()
    assert len(table) == 5 and all(len(line) <= 80 for line in table), table
    assert len({line.index("examples/") for line in table[1:]}) == 1 and table[0].endswith(" path")  # aligned
    flagged = [line for line in table if line.startswith("block")]
    assert flagged and all(line[20:].startswith("sexual,") for line in flagged)  # categories before concepts
    assert any("\u2026 examples/" in line for line in flagged)  # what does not fit ends with an ellipsis


def test_json_rows_and_exit_codes(tmp_path):
    Image.fromarray(np.full((40, 60, 3), 100, np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "sub").mkdir()
    Image.new("L", (30, 30), 5).save(tmp_path / "sub" / "gray.jpg")
    (tmp_path / "notes.txt").write_text("not an image")  # skipped when recursing
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")

    out = run("check", "--json", str(tmp_path / "ok.png"), str(tmp_path / "sub"))
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["path"].rsplit("/", 1)[-1] for r in rows] == ["ok.png", "gray.jpg"]
    for r in rows:
        assert {"path", "nsfw", "concept_scores", "special_scores", "bad_concepts", "error"} <= set(r)

    out = run("check", "--json", str(tmp_path))
    assert out.returncode == 3
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 3 and sum(r["error"] is not None for r in rows) == 1
    assert "notes.txt" not in out.stdout

    everything = run("check", "--json", "--fail-on-nsfw", "--adjustment", "1", str(tmp_path / "ok.png"))
    assert everything.returncode == 1 and json.loads(everything.stdout)["nsfw"] is True
    assert run("check", "--json", "--fail-on-nsfw", "--adjustment", "-1", str(tmp_path / "ok.png")).returncode == 0


def test_usage_errors_exit_2(tmp_path):
    assert run("check").returncode == 2
    bad = run("check", "--adjustment", "abc", "examples/")
    assert bad.returncode == 2 and "expected a number in [-1, 1], got 'abc'" in bad.stderr
    missing = run("check", "--model", "./no/such/dir", "examples/")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    (tmp_path / "empty").mkdir()
    assert run("check", str(tmp_path / "empty")).returncode == 2


def test_concepts_file_from_cli(tmp_path):
    from pipeline import SafetyChecker

    checker = SafetyChecker.load("tiny", device="cpu", dtype="float32")
    checker.set_threshold(0, -1.0)
    checker.save_concepts(tmp_path / "c.safetensors")
    out = run("check", "--json", "--concepts", str(tmp_path / "c.safetensors"), "examples/shapes.jpg")
    row = json.loads(out.stdout)
    assert 0 in row["bad_concepts"] and row["fingerprint"] == checker.fingerprint


def test_adversarial_inputs_are_selected_by_content_and_never_released_unscored(tmp_path):
    from tests import adversarial as adv

    png = adv.image_bytes(1)
    named = {"upload.bin": png, "photo.png.txt": png, "no_suffix": png}  # images under names that hide them
    cut = {"cut.jpg": adv.truncated("JPEG"), "cut-progressive.jpg": adv.truncated("PROGRESSIVE_JPEG")}
    unscorable = {"header-only.png": adv.header_only("PNG"), "header-only.gif": adv.header_only("GIF")}
    for name, data in {**named, **cut, **unscorable, "notes.txt": b"just text\n"}.items():
        (tmp_path / name).write_bytes(data)

    out = run("check", "--json", "--adjustment", "1", str(tmp_path))  # every readable image is flagged
    assert out.returncode == 3, out.stderr
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in map(json.loads, out.stdout.splitlines())}
    assert set(rows) == set(named) | set(cut) | set(unscorable), "selected by content; notes.txt is no image"
    assert all(r["action"] is not None for r in rows.values()), "no row without an action"
    for name in [*named, *cut]:
        assert rows[name]["error"] is None and rows[name]["nsfw"] and rows[name]["action"] == "block", name
        assert rows[name]["truncated"] is (name in cut) and not rows[name]["unscorable"]
    for name in unscorable:
        r = rows[name]
        assert r["unscorable"] and r["action"] == "block" and "corrupt or truncated" in r["error"], name

    table = run("check", "--adjustment", "1", str(tmp_path), columns=200)  # wide enough for the whole reason
    assert table.returncode == 3
    lines = {line.rsplit(" ", 1)[-1].rsplit("/", 1)[-1]: line for line in table.stdout.splitlines()}
    assert (
        lines["header-only.png"].startswith("block") and "UNSCORABLE: corrupt or truncated" in lines["header-only.png"]
    )
    assert "(truncated)" in lines["cut.jpg"]
    assert "7 checked: 5 scored, 2 unscorable (block); 7 withheld (5 flagged, 2 unscorable), 0 reported" in table.stdout
    narrow = run("check", "--adjustment", "1", str(tmp_path), columns=80).stdout.split("\n\n")[0].splitlines()
    assert len({line.rindex(" ") for line in narrow}) == 1  # UNSCORABLE: <why> stays in its column

    policy = tmp_path.parent / "lenient.yaml"  # unscorable_action: allow gives back the old behaviour, explicitly
    policy.write_text(
        "version: 1\nname: lenient\nunscorable_action: allow\ncategories:\n"
        "  sexual:\n    action: block\n    concepts:\n      - stock: all\n"
    )
    lenient = run("check", "--json", "--policy", str(policy), str(tmp_path / "header-only.png"))
    assert lenient.returncode == 3 and json.loads(lenient.stdout)["action"] == "allow"


def test_object_byte_limit(tmp_path):
    from tests import adversarial as adv

    (tmp_path / "big.png").write_bytes(adv.oversized_png(10_000))
    out = run("check", "--json", "--max-object-bytes", "10000", str(tmp_path / "big.png"))
    row = json.loads(out.stdout)
    assert out.returncode == 3 and row["action"] == "block" and "over the limit of 10,000 bytes" in row["error"]
    assert run("check", "--json", str(tmp_path / "big.png")).returncode == 0


def test_check_blocks_what_open_nsfw_detects_and_says_which_scores_are_real(tmp_path):
    """The default policy's open_nsfw row (real weights, offline) blocks an image it scores high; the JSON rows carry
    its scores and which parts of the verdict are demo and which real, and the banner says so."""
    from tests.detected import nsfw_png, photo

    (tmp_path / "detected.png").write_bytes(nsfw_png())
    Image.fromarray(photo("astronaut")).save(tmp_path / "astronaut.jpg", format="JPEG")
    out = run("check", "--json", str(tmp_path))
    assert out.returncode == 0, out.stderr
    rows = {json.loads(line)["path"].rsplit("/", 1)[1]: json.loads(line) for line in out.stdout.splitlines()}
    detected, photo = rows["detected.png"], rows["astronaut.jpg"]
    score = detected["detector_scores"]["open_nsfw"]["nsfw"]
    assert score > 0.95 and detected["action"] == "block" and detected["categories"]["sexual"] >= round(score - 0.8, 3)
    assert photo["detector_scores"]["open_nsfw"]["nsfw"] < 0.2
    assert all(r["real"] == ["open_nsfw"] and r["demo"] == ["stock checker", "text concepts"] for r in rows.values())
    assert "real, trained weights: open_nsfw" in out.stderr and "MEANINGLESS" in out.stderr
