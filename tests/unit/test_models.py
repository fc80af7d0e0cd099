"""Model sources: tiny builds are deterministic, load from a directory through from_pretrained, hub ids fail fast."""

from __future__ import annotations

import hashlib
import time

import pytest

from pipeline import ModelSourceError, SafetyChecker
from pipeline.models import resolve
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
    assert [v.to_dict() for v in loaded.check(imgs)] == [v.to_dict() for v in checker.check(imgs)]


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
