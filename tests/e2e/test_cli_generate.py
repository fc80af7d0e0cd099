"""`diffguard generate` as a user runs it: only what the policy allows reaches the disk."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from pipeline.generator import GenerationRequest, Generator
from tests.e2e.test_cli_check import run

ARGS = ["a red bicycle", "--seed", "5", "-n", "2", "--steps", "2"]


def _unmoderated():
    gen = Generator.load("tiny", device="cpu", dtype="float32")
    return gen.generate(GenerationRequest.parse({"prompt": "a red bicycle", "seed": 5, "num_images": 2, "steps": 2}))


def test_allowed_images_are_written_exactly(tmp_path):
    out = run("generate", *ARGS, "--dtype", "float32", "--adjustment", "-1", "--out", str(tmp_path / "o"))
    assert out.returncode == 0, out.stderr
    assert "MEANINGLESS" in out.stderr
    summary = json.loads(out.stdout)
    assert [i["action"] for i in summary["images"]] == ["allow", "allow"]
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["seed"] == 5 and report["request"]["prompt"] == "a red bicycle"
    assert report["models"]["demo_weights"] is True and len(report["models"]["checker_fingerprint"]) == 16
    for expected, entry in zip(_unmoderated(), report["images"], strict=True):
        written = np.asarray(Image.open(tmp_path / "o" / entry["file"]))
        assert np.array_equal(written, expected)  # the checked pixels, unchanged


def test_blocked_images_never_reach_the_disk(tmp_path):
    out = run("generate", *ARGS, "--dtype", "float32", "--adjustment", "1", "--out", str(tmp_path / "o"))
    assert out.returncode == 0, out.stderr
    files = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert files == ["report.json"]
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert [(i["action"], i["file"], i["nsfw"]) for i in report["images"]] == [("block", None, True)] * 2
    blob = (tmp_path / "o" / "report.json").read_bytes()
    for image in _unmoderated():  # neither raw nor PNG-encoded pixels appear anywhere in what was written
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        assert image.tobytes()[:64] not in blob and buf.getvalue()[-64:] not in blob


def test_blur_policy_writes_blurred_pixels(tmp_path):
    out = run("generate", *ARGS, "--dtype", "float32", "--adjustment", "1", "--policy", "blur", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    for expected, name in zip(_unmoderated(), ["image-0.png", "image-1.png"], strict=True):
        written = np.asarray(Image.open(tmp_path / name))
        assert written.shape == expected.shape and not np.array_equal(written, expected)


def test_invalid_parameters_exit_2_and_write_nothing(tmp_path):
    for bad in (["-n", "9"], ["--steps", "0"], ["--width", "100"], ["--seed", "-3"]):
        out = run("generate", "a cat", *bad, "--out", str(tmp_path / "o"))
        assert out.returncode == 2, (bad, out.stderr)
        assert "diffguard: error: `" in out.stderr
        assert not (tmp_path / "o").exists()
    assert run("generate", "a cat", "--policy", "hide", "--out", str(tmp_path / "o")).returncode == 2
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    out = run("generate", "a cat", "--steps", "1", "--out", str(tmp_path / "full"))
    assert out.returncode == 2 and "is not empty" in out.stderr
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["keep.txt"]
