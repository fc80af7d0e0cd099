"""``evaluate`` and ``calibrate`` read detector rows like concept rows: the real open_nsfw weights on real photographs
(``safe/``: scikit-image's samples) and on images made to score high against them (``sexual/``: tests.detected), an
animation among them decided by its second frame. The stock checker is the tiny one; its concept rows only matter in
the mixed category."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline.checker import SafetyChecker
from pipeline.errors import InvalidInput
from pipeline.evaluate import LabelledSet, calibrate, load_labelled, metrics
from pipeline.policy import load_policy, parse_policy
from tests.detected import nsfw_array, photo

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")  # open_nsfw: 0.032 at most
DETECTOR = {"detector": "open_nsfw", "output": "nsfw", "threshold": 0.5}
MIXED_STOCK = {"stock": 3, "threshold": 0.2}  # the tiny checker's cosines to concept 3 run ~0.03-0.4 here


def policy(*rows: dict) -> dict:
    return {"version": 1, "name": "detected", "categories": {"sexual": {"action": "block", "concepts": list(rows)}}}


def load(policy_or_path) -> SafetyChecker:
    if isinstance(policy_or_path, dict):
        policy_or_path = parse_policy(policy_or_path)
    return SafetyChecker.load("tiny", device="cpu", dtype="float32", policy=policy_or_path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("detected")
    (root / "safe").mkdir()
    (root / "sexual").mkdir()
    for name in PHOTOS:
        Image.fromarray(photo(name)).save(root / "safe" / f"{name}.png")
    detected = nsfw_array(0).astype(np.int16)  # one made image (seconds of autograd) and photometric variants of it
    noise = np.random.default_rng(0).integers(-4, 5, detected.shape)
    variants = {"detected": detected, "brighter": detected + 6, "noisier": detected + noise}  # open_nsfw: > 0.97
    for name, array in variants.items():
        Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(root / "sexual" / f"{name}.png")
    contrast = Image.fromarray(np.clip((detected - 128) * 1.05 + 128, 0, 255).astype(np.uint8))
    first = Image.fromarray(photo("coffee")).resize((256, 256))  # a safe frame, then a detected one
    first.save(root / "sexual" / "animated.png", save_all=True, append_images=[contrast])
    return root


@pytest.fixture(scope="module")
def only_detector(folder) -> tuple[SafetyChecker, LabelledSet]:
    checker = load(policy(DETECTOR))
    return checker, load_labelled(folder, checker)


def test_views_are_scored_by_the_detectors_once(folder, only_detector, monkeypatch):
    checker, data = only_detector
    assert data.detector_columns == [("open_nsfw", "nsfw")]
    assert data.detector is not None and data.detector.shape == (len(data.embeds), 1)
    animated = data.paths.index(folder / "sexual" / "animated.png")
    frames = data.detector[data.owners == animated, 0]  # a coffee cup, then the made image: the second decides
    assert len(frames) == 2 and frames[0] < 0.05 and frames[1] > 0.9

    def forward(*_):
        raise AssertionError("a detector ran again: evaluate and calibrate read the cached probabilities")

    monkeypatch.setattr(checker.detectors, "score", forward)
    metrics(checker, data)
    calibrate(checker, data, parse_policy(policy(DETECTOR)), 0.0)


def test_evaluate_counts_a_detector_only_category(only_detector):
    checker, data = only_detector
    m = metrics(checker, data)["categories"]["sexual"]
    assert m | {"labelled": 4, "tp": 4, "fp": 0, "fn": 0} == m
    assert (m["precision"], m["recall"], m["fpr_safe"]) == (1.0, 1.0, 0.0)


def detector_scores(checker: SafetyChecker, files: list[Path]) -> np.ndarray:
    """open_nsfw's probability of each file as ``check`` reports it (the maximum over its views)."""
    return np.array([v.detector_scores["open_nsfw"]["nsfw"] for v in checker.check(files)])


@pytest.mark.parametrize(("target", "kept_out"), [(0.0, 0), (0.2, 1)])  # 5 safe photos: a budget of 0, then 1
def test_calibrate_puts_a_detector_threshold_between_safe_and_sexual(folder, only_detector, tmp_path, target, kept_out):
    checker, data = only_detector
    safe = np.sort(detector_scores(checker, sorted((folder / "safe").iterdir())))[::-1]
    sexual = detector_scores(checker, sorted((folder / "sexual").iterdir()))
    assert safe[0] < 0.05 and sexual.min() > 0.9

    calibrated = calibrate(checker, data, parse_policy(policy(DETECTOR)), target)
    [row] = calibrated.categories[0].concepts
    assert (row.detector, row.output) == ("open_nsfw", "nsfw")
    # the lowest threshold within the budget: just above the highest safe score it must keep out (margins: 3 decimals)
    assert safe[kept_out] < row.threshold <= safe[kept_out] + 0.001 < sexual.min()
    assert checker.concepts.detector_rows[0].threshold == 0.5, "calibrating leaves the checker's own policy alone"

    path = tmp_path / "calibrated.yaml"
    path.write_text(calibrated.to_yaml())
    written = yaml.safe_load(path.read_text())
    assert written["calibrated"] is True
    assert written["categories"]["sexual"]["concepts"] == [DETECTOR | {"threshold": row.threshold}]
    again = load(str(path))
    assert again.concepts.detector_rows[0].threshold == row.threshold
    m = metrics(again, data)["categories"]["sexual"]
    assert (m["recall"], m["fp"], m["fpr_safe"]) == (1.0, kept_out, kept_out / len(PHOTOS))
    flagged = np.array(["sexual" in v.flagged_categories for v in again.check(data.paths)])
    assert flagged[data.mask("sexual")].all() and flagged[data.mask("safe")].sum() == kept_out


def rounded(scores: torch.Tensor) -> list[float]:
    """float32 margins as a verdict reports them (3 decimals)."""
    return np.round(scores.double().numpy(), 3).tolist()


def test_a_mixed_category_evaluates_as_check_scores_it(folder):
    checker = load(policy(MIXED_STOCK, DETECTOR))
    data = load_labelled(folder, checker)
    scores = data.scores(checker).categories[:, 0]  # (N,) the sexual category's score of each object
    verdicts = checker.check(data.paths)
    assert rounded(scores) == [v.categories["sexual"] for v in verdicts]
    detector_margin = torch.round(data.per_object(data.detector)[:, 0] - DETECTOR["threshold"], decimals=3)
    decided_by_detector = scores == detector_margin
    assert decided_by_detector.any() and not decided_by_detector.all(), "both rows decide some object here"

    flagged = np.array(["sexual" in v.flagged_categories for v in verdicts])
    positive = data.mask("sexual")
    m = metrics(checker, data)["categories"]["sexual"]
    assert (m["tp"], m["fp"], m["fn"]) == (
        int((flagged & positive).sum()),
        int((flagged & ~positive).sum()),
        int((~flagged & positive).sum()),
    )
    assert m["fp"] > 0  # the stock row at 0.2 flags photographs: calibration has work to do

    calibrated = calibrate(checker, data, parse_policy(policy(MIXED_STOCK, DETECTOR)), 0.0)
    stock, detector = calibrated.categories[0].concepts
    assert stock.stock == 3 and stock.threshold > MIXED_STOCK["threshold"] and detector.detector == "open_nsfw"
    again = load(calibrated)
    m = metrics(again, data)["categories"]["sexual"]
    assert (m["recall"], m["precision"], m["fpr_safe"]) == (1.0, 1.0, 0.0)
    assert rounded(data.scores(again).categories[:, 0]) == [v.categories["sexual"] for v in again.check(data.paths)]


def test_a_set_without_probabilities_says_so(only_detector):
    checker, data = only_detector
    bare = LabelledSet(data.paths, data.labels, data.embeds, [], data.owners)  # embeddings only: no probabilities
    with pytest.raises(InvalidInput, match=r"detector rows read \[\('open_nsfw', 'nsfw'\)\].*no detector"):
        metrics(checker, bare)


def test_calibrate_cli_writes_detector_rows(folder, tmp_path, capsys):
    from pipeline.cli import main

    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy(DETECTOR)))
    out = tmp_path / "calibrated.yaml"
    common = ["--policy", str(tmp_path / "policy.yaml"), "--model", "tiny", "--device", "cpu", "--dtype", "float32"]
    assert main(["calibrate", str(folder), *common, "--target-fpr", "0", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["categories"]["sexual"] | {"recall": 1.0, "fpr_safe": 0.0} == report["categories"]["sexual"]
    assert report["real"] == ["open_nsfw"] and "stock checker" in report["demo"]
    [row] = load_policy(out).categories[0].concepts
    assert (row.detector, row.output) == ("open_nsfw", "nsfw") and 0.03 < row.threshold < 0.9
    plots = tmp_path / "plots"
    assert main(["evaluate", str(folder), "--policy", str(out), "--plots", str(plots), *common[2:]]) == 0
    table = capsys.readouterr().out
    assert "meaningless" in table and "real weights: open_nsfw" in table
    assert [p.name for p in plots.iterdir()] == ["sexual.png"]
