"""`diffguard evaluate` and `diffguard calibrate`, and `--policy` on check, as a user runs them."""

from __future__ import annotations

import json

from PIL import Image

from pipeline.policy import load_policy
from tests.e2e.test_cli_check import run
from tests.labelled import write_labelled, write_policy


def test_evaluate_writes_metrics_and_plots(tmp_path):
    examples = write_labelled(tmp_path / "examples", {"violence": 5, "sexual": 5}, seed=1)
    labelled = write_labelled(tmp_path / "eval", {"safe": 20, "violence": 10, "sexual": 10}, seed=2)
    policy = write_policy(tmp_path / "policy.yaml", examples)
    out = run("evaluate", str(labelled), "--policy", str(policy), "--plots", str(tmp_path / "plots"), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert set(report["categories"]) == {"violence", "sexual"}
    for m in report["categories"].values():
        assert {"precision", "recall", "f1", "fpr_safe"} <= set(m)
    assert report["confusion"]["safe"] and report["demo_weights"] is True
    for name in ("violence", "sexual"):
        with Image.open(tmp_path / "plots" / f"{name}.png") as png:
            assert png.format == "PNG" and png.size[0] > 300

    table = run("evaluate", str(labelled), "--policy", str(policy))
    assert table.returncode == 0 and "precision" in table.stdout and "meaningless" in table.stdout


def test_calibrate_writes_a_policy_meeting_the_target(tmp_path):
    examples = write_labelled(tmp_path / "examples", {"violence": 5, "sexual": 5}, seed=1)
    labelled = write_labelled(tmp_path / "eval", {"safe": 40, "violence": 10, "sexual": 10}, seed=3)
    policy = write_policy(tmp_path / "policy.yaml", examples)
    out_file = tmp_path / "calibrated.yaml"
    out = run(
        "calibrate", str(labelled), "--policy", str(policy), "--target-fpr", "0.05", "--out", str(out_file), "--json"
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert all(m["fpr_safe"] <= 0.05 for m in report["categories"].values())
    assert load_policy(out_file).calibrated

    check = run("check", "--json", "--policy", str(out_file), str(labelled / "violence"))
    rows = [json.loads(line) for line in check.stdout.splitlines()]
    assert check.returncode == 0 and all({"categories", "flagged_categories", "action"} <= set(r) for r in rows)
    assert any("violence" in r["flagged_categories"] and r["action"] == "block" for r in rows)


def test_bad_policy_and_labelled_dir_exit_2(tmp_path):
    assert "neither a file nor" in run("check", "--policy", "nope.yaml", "examples/").stderr
    (tmp_path / "violence").mkdir()
    out = run("evaluate", str(tmp_path))
    assert out.returncode == 2 and "needs a `safe/` sub-folder" in out.stderr


def test_missing_text_tower_fails_unless_the_fallback_is_asked_for(tmp_path):
    missing = run("check", "--concept-text-model", "./no/such/tower", "examples/shapes.jpg")
    assert missing.returncode == 2 and missing.stdout == ""
    for remedy in (
        "diffguard models download openai/clip-vit-large-patch14",
        "--policy stock",
        "policy_fallback: stock",
    ):
        assert remedy in missing.stderr
    stock = run(
        "check", "--json", "--concept-text-model", "./no/such/tower", "--policy", "stock", "examples/shapes.jpg"
    )
    assert stock.returncode == 0, stock.stderr
    fallback = run(
        "check",
        "--json",
        "--concept-text-model",
        "./no/such/tower",
        "--policy-fallback",
        "stock",
        "examples/shapes.jpg",
    )
    assert fallback.returncode == 0, fallback.stderr
    assert (
        "WARNING: policy 'diffguard-default' cannot be used" in fallback.stderr and "are NOT checked" in fallback.stderr
    )
    # the policy scored: the stock one, keeping the default policy's detector rows (open_nsfw needs no text tower)
    from pipeline.policy import load_policy
    from pipeline.text import stock_with_detectors

    scored = tmp_path / "scored.yaml"
    scored.write_text(stock_with_detectors(load_policy("default")).to_yaml())
    expected = run(
        "check", "--json", "--concept-text-model", "./no/such/tower", "--policy", str(scored), "examples/shapes.jpg"
    )
    assert expected.returncode == 0, expected.stderr
    assert json.loads(fallback.stdout)["fingerprint"] == json.loads(expected.stdout.splitlines()[0])["fingerprint"]
    assert json.loads(fallback.stdout)["fingerprint"] != json.loads(stock.stdout)["fingerprint"]
