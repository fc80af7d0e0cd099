"""Custom concepts, threshold overrides, saved concept sets and the fingerprint."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import InvalidInput, SafetyChecker
from tests.conftest import varied_images


@pytest.fixture
def fresh():
    return SafetyChecker.load("tiny", device="cpu", dtype="float32")


def _solid(color, n=4, size=(64, 64)):
    rng = np.random.default_rng(sum(color))
    return [
        np.clip(np.full((*size, 3), color, np.int16) + rng.integers(-8, 8, (*size, 3)), 0, 255).astype(np.uint8)
        for _ in range(n)
    ]


def test_image_concept_hits_its_examples(fresh):
    examples = varied_images(6, seed=11)
    concept = fresh.add_concept("my-concept", images=examples)
    assert concept.kind == "image" and concept.source == "6 example images"
    verdicts = fresh.check(examples)
    assert all("my-concept" in v.bad_concept_names for v in verdicts)
    assert all(len(v.concept_scores) == 18 for v in verdicts)
    assert all(v.nsfw for v in verdicts)


def test_text_concept_uses_the_text_tower(fresh):
    concept = fresh.add_concept("cats", text="a photo of a cat", threshold=-1.0)
    assert concept.kind == "text"
    v = fresh.check(_solid((10, 200, 30), n=1))[0]
    assert "cats" in v.bad_concept_names  # threshold -1: every image hits
    fresh.set_threshold("cats", 1.0)
    assert "cats" not in fresh.check(_solid((10, 200, 30), n=1))[0].bad_concept_names


def test_threshold_override_by_index_and_name(fresh):
    img = _solid((90, 90, 90), n=1)
    fresh.set_threshold(3, -1.0)
    assert 3 in fresh.check(img)[0].bad_concepts
    fresh.set_threshold("concept_3", 1.0)
    assert 3 not in fresh.check(img)[0].bad_concepts
    with pytest.raises(InvalidInput, match="out of range 0..16"):
        fresh.set_threshold(17, 0.1)
    with pytest.raises(InvalidInput, match="unknown concept 'nope'"):
        fresh.set_threshold("nope", 0.1)
    with pytest.raises(InvalidInput, match=r"cosine in \[-1, 1\], got 3.0"):
        fresh.set_threshold(0, 3)


def test_adjustment_makes_the_filter_stricter(fresh):
    imgs = varied_images(16, seed=2)
    loose = sum(v.nsfw for v in fresh.check(imgs))
    fresh.adjustment = 0.5
    assert sum(v.nsfw for v in fresh.check(imgs)) == 16 >= loose
    with pytest.raises(InvalidInput, match="adjustment must be within"):
        fresh.adjustment = 5


def test_concept_set_round_trip_and_fingerprint(fresh, tmp_path):
    base = fresh.fingerprint
    fresh.add_concept("red", images=_solid((220, 20, 20)))
    with_concept = fresh.fingerprint
    fresh.set_threshold(5, 0.05)
    with_override = fresh.fingerprint
    assert len({base, with_concept, with_override}) == 3
    path = tmp_path / "concepts.safetensors"
    fresh.save_concepts(path)

    other = SafetyChecker.load("tiny", device="cpu", dtype="float32", concepts=path)
    assert other.fingerprint == with_override
    assert other.concepts.names[-1] == "red"
    imgs = _solid((220, 20, 20), n=2) + _solid((20, 20, 220), n=2)
    assert [v.to_dict() for v in other.check(imgs)] == [v.to_dict() for v in fresh.check(imgs)]
    other.adjustment = 0.01
    assert other.fingerprint != with_override
    assert SafetyChecker.load("tiny", device="cpu", dtype="float32").fingerprint == base  # stable across loads


def test_bad_concept_inputs(fresh, tmp_path):
    with pytest.raises(InvalidInput, match="exactly one of"):
        fresh.add_concept("x")
    with pytest.raises(InvalidInput, match="image 1: empty file"):
        fresh.add_concept("x", images=[_solid((1, 2, 3), n=1)[0], b""])
    fresh.add_concept("x", text="a dog", threshold=0.2)
    with pytest.raises(InvalidInput, match="already used"):
        fresh.add_concept("x", text="a dog")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nonsense")
    with pytest.raises(InvalidInput, match="not a diffguard concept set"):
        fresh.load_concepts(bad)


def test_verdicts_serialise_to_json(fresh):
    import json

    v = fresh.check(varied_images(1))[0]
    again = json.loads(json.dumps(v.to_dict()))
    assert set(again) >= {"nsfw", "concept_scores", "special_scores", "bad_concepts", "special_care", "error"}
    assert len(again["concept_scores"]) == 17 and len(again["special_scores"]) == 3


def test_adopt_scores_exactly_like_the_checker_that_resolved_the_rows(fresh):
    """What scan actors do: load weights only, adopt the driver's resolved rows, and match its fingerprint."""
    import dataclasses

    import torch

    driver = SafetyChecker.load("tiny", device="cpu", dtype="float32", policy="stock", adjustment=0.05)
    driver.add_concept("reds", images=_solid((200, 20, 20)))
    worker = SafetyChecker.load("tiny", device="cpu", dtype="float32", policy=None)
    assert worker.fingerprint != driver.fingerprint
    worker.adopt(driver.concepts, driver.adjustment)
    assert worker.fingerprint == driver.fingerprint
    images = varied_images(12, seed=3) + _solid((200, 20, 20), n=2)
    assert [v.to_dict() for v in worker.check(images)] == [v.to_dict() for v in driver.check(images)]
    assert any(v.nsfw for v in worker.check(images[-2:]))

    narrow = dataclasses.replace(driver.concepts, embeds=torch.zeros(len(driver.concepts.concepts), 7))
    with pytest.raises(InvalidInput, match="width 7"):
        worker.adopt(narrow, 0.0)
    assert worker.fingerprint == driver.fingerprint  # unchanged after a refused adopt
