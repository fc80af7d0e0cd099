"""Model sources: tiny builds are deterministic, load from a directory through from_pretrained, hub ids fail fast."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import ModelSourceError, SafetyChecker
from pipeline.models import resolve, split_revision
from pipeline.tiny import build_tiny
from tests.conftest import varied_images


def _digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.parametrize("component", ["checker", "text"])
def test_tiny_build_is_deterministic(tmp_path, component):
    build_tiny(component, tmp_path / "a")
    build_tiny(component, tmp_path / "b")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")


def test_saved_directory_loads_like_real_weights(tmp_path, checker):
    """save_pretrained -> directory -> SafetyChecker.load(DIR): the path real weights take."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    from pipeline.preprocess import processor_class
    from pipeline.tiny import tiny_path

    src = tiny_path("checker")
    StableDiffusionSafetyChecker.from_pretrained(src).save_pretrained(tmp_path / "ckpt")
    processor_class().from_pretrained(src).save_pretrained(tmp_path / "ckpt")
    loaded = SafetyChecker.load(str(tmp_path / "ckpt"), device="cpu", dtype="float32", concept_text_model="tiny")
    assert not loaded.demo  # no tiny marker: treated as user weights
    assert loaded.fingerprint == checker.fingerprint
    imgs = varied_images(4)
    ours, tiny = loaded.check(imgs), checker.check(imgs)
    parts = {"demo", "real"}  # which parts are demo is the one difference: these weights carry no tiny marker
    assert [{k: v for k, v in x.to_dict().items() if k not in parts} for x in ours] == [
        {k: v for k, v in x.to_dict().items() if k not in parts} for x in tiny
    ]
    assert "stock checker" in ours[0].real and "stock checker" in tiny[0].demo


def test_stable_diffusion_pipeline_folder_layout(tmp_path, checker):
    """A diffusers pipeline folder keeps the checker in safety_checker/ and its processor in feature_extractor/."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    from pipeline.preprocess import processor_class
    from pipeline.tiny import tiny_path

    src = tiny_path("checker")
    StableDiffusionSafetyChecker.from_pretrained(src).save_pretrained(tmp_path / "safety_checker")
    processor_class().from_pretrained(src).save_pretrained(tmp_path / "feature_extractor")
    (tmp_path / "model_index.json").write_text("{}")
    loaded = SafetyChecker.load(str(tmp_path), device="cpu", dtype="float32", concept_text_model="tiny")
    assert loaded.fingerprint == checker.fingerprint


def test_unreachable_hub_fails_fast_with_instructions(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    start = time.monotonic()
    with pytest.raises(ModelSourceError) as info:
        SafetyChecker.load("CompVis/stable-diffusion-safety-checker", device="cpu")
    assert time.monotonic() - start < 30  # a bound on hanging, not a speed claim
    message = str(info.value)
    assert "CompVis/stable-diffusion-safety-checker" in message
    assert "diffguard models download" in message and "no cached copy" in message


@pytest.mark.parametrize("spec", ["./does/not/exist", "/abs/missing", "a/b/c"])
def test_missing_directories_are_named(spec):
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve(spec, "checker")


def test_directory_without_weights(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(ModelSourceError, match=f"from directory {tmp_path}"):
        SafetyChecker.load(str(tmp_path), device="cpu")


def test_bad_device_and_dtype():
    from pipeline import InvalidInput

    with pytest.raises(InvalidInput, match="device must be"):
        SafetyChecker.load("tiny", device="tpu")
    with pytest.raises(InvalidInput, match="dtype must be one of"):
        SafetyChecker.load("tiny", device="cpu", dtype="int8")
    with pytest.raises(InvalidInput, match="float16' is for CUDA"):
        SafetyChecker.load("tiny", device="cpu", dtype="float16")


# --- pinned revisions: ID@REVISION ---
SHA_A, SHA_B = "a" * 40, "b" * 40


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("org/name", ("org/name", None)),
        (f"org/name@{SHA_A}", ("org/name", SHA_A)),
        ("org/name@v1.0", ("org/name", "v1.0")),
        ("org/name@refs/pr/1", ("org/name", "refs/pr/1")),
    ],
)
def test_split_revision(spec, expected):
    assert split_revision(spec) == expected
    assert resolve(spec, "checker").revision == expected[1] and resolve(spec, "checker").repo_id == expected[0]


@pytest.mark.parametrize(
    "spec", ["org/name@", "@abc", "org/name@-x", "org/name@a b", "org/name@../x", "a/b/c@" + SHA_A]
)
def test_malformed_revisions_are_refused_naming_the_spec(spec):
    with pytest.raises(ModelSourceError, match=re.escape(repr(spec))):
        resolve(spec, "checker")


def fake_hub_cache(root: Path) -> Path:
    """A Hugging Face hub cache holding ``org/checker`` at two commits (different weights), main -> the second."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    from pipeline.models import tiny_path

    repo = root / "models--org--checker"
    net = StableDiffusionSafetyChecker.from_pretrained(tiny_path("checker"))
    for sha, delta in ((SHA_A, 0.0), (SHA_B, 0.5)):
        with torch.no_grad():
            net.visual_projection.weight.add_(delta)
        net.save_pretrained(repo / "snapshots" / sha)
        shutil.copy(tiny_path("checker") / "preprocessor_config.json", repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA_B)
    return root


def test_a_pinned_revision_reaches_from_pretrained(tmp_path):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    from pipeline import models

    cache = fake_hub_cache(tmp_path / "hub")

    def projection(spec: str):
        net = models.from_pretrained(StableDiffusionSafetyChecker, resolve(spec, "checker"), "x", cache_dir=cache)
        return net.visual_projection.weight.detach()

    a, b, main = projection(f"org/checker@{SHA_A}"), projection(f"org/checker@{SHA_B}"), projection("org/checker")
    assert float((b - a).mean()) == pytest.approx(0.5, abs=1e-6) and bool((main == b).all())


def test_info_and_fingerprint_show_the_revision(tmp_path):
    """A real load from the hub cache (offline): /v1/info's model is ID@REVISION, and each revision its fingerprint."""
    cache = fake_hub_cache(tmp_path / "hub")
    code = (
        "import json; from pipeline import SafetyChecker\n"
        "rows = [SafetyChecker.load(s, device='cpu', dtype='float32', concept_text_model='tiny').info() for s in "
        f"['org/checker@{SHA_A}', 'org/checker@{SHA_B}', 'org/checker']]\n"
        "print(json.dumps([[r['model'], r['fingerprint'], r['demo_weights']] for r in rows]))"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (a, b, main) = json.loads(out.stdout.strip().splitlines()[-1])
    assert a[0] == f"org/checker@{SHA_A}" and b[0] == f"org/checker@{SHA_B}" and main[0] == "org/checker"
    assert a[1] != b[1] and b[1] == main[1]  # main is the second commit
    assert not a[2] and not b[2]
