"""A detector that fails on one view, or answers NaN, never fails the batch nor lets the image out: that object is
unscorable (withheld by the policy's unscorable_action), its neighbours are scored as usual."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.checker import SafetyChecker
from pipeline.policy import parse_policy
from tests.detected import Faulty

POLICY = {
    "version": 1,
    "name": "open_nsfw-only",
    "nsfw_action": "allow",
    "categories": {"sexual": {"action": "block", "concepts": [{"detector": "open_nsfw", "threshold": 0.8}]}},
}


@pytest.fixture(scope="module")
def checker():
    checker = SafetyChecker.load("tiny", "cpu", "float32", policy=parse_policy(POLICY))
    checker.detectors.loaded["open_nsfw"] = Faulty(checker.detectors.get("open_nsfw"))
    return checker


def test_one_view_that_cannot_be_prepared_withholds_its_object_only(checker):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), np.uint8), rng.integers(0, 256, (7, 7, 3), np.uint8)]
    images.append(rng.integers(0, 256, (40, 24, 3), np.uint8))
    ok, bad, also_ok = checker.check(images)
    assert (bad.unscorable, bad.action) == (True, "block") and "cannot prepare a 7x7 view" in bad.error
    for verdict in (ok, also_ok):
        assert verdict.error is None and verdict.action == "allow" and verdict.detector_scores["open_nsfw"]["nsfw"] >= 0


def test_a_nan_score_is_never_read_as_not_detected(checker):
    images = [np.full((32, 32, 3), 128, np.uint8), np.zeros((9, 9, 3), np.uint8)]
    ok, nan = checker.check(images)
    assert (nan.unscorable, nan.action, nan.error) == (True, "block", "a detector returned a non-finite score")
    assert ok.error is None and ok.action == "allow"
    pixels = checker.preprocess(images)  # the scan's path (score_pixels) withholds it alike
    inputs = checker.detectors.prepare(checker.concepts, images)
    _, again = checker.score_pixels(pixels, [[None], [None]], inputs)
    assert (again.unscorable, again.action) == (True, "block")


def test_the_scan_checks_each_objects_prepared_shape():
    from pipeline.scan.score import _prepared

    assert len(_prepared("d", lambda arrays: np.zeros((len(arrays), 2, 3), np.float32), (2, 3), [1, 2])) == 48
    with pytest.raises(ValueError, match=r"detector 'd' prepared \(1, 2, 3\) for 2 views"):
        _prepared("d", lambda arrays: np.zeros((1, 2, 3), np.float32), (2, 3), [1, 2])
