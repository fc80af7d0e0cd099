"""Policies: categories beyond the stock checker, actions, evaluation and calibration on labelled images."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from pipeline import InvalidInput, ModelSourceError, SafetyChecker
from pipeline.evaluate import calibrate, load_labelled, metrics
from pipeline.policy import load_policy, parse_policy
from pipeline.text import stock_with_detectors
from tests.conftest import varied_images
from tests.labelled import write_labelled, write_policy

SEVEN = {"hate", "harassment", "violence", "self-harm", "sexual", "shocking", "illegal-activity"}


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    examples = write_labelled(root / "examples", {"violence": 6, "sexual": 6}, seed=1)
    evaluation = write_labelled(root / "eval", {"safe": 60, "violence": 30, "sexual": 30}, seed=2)
    return examples, evaluation, write_policy(root / "policy.yaml", examples)


def _load(policy="default", **kw):
    return SafetyChecker.load("tiny", device="cpu", dtype="float32", policy=policy, **kw)


def test_default_policy_keeps_the_stock_decisions():
    images = varied_images(64, seed=9)
    stock_only = _load(policy=None).check(images)
    default = _load().check(images)
    assert [v.nsfw for v in default] == [v.nsfw for v in stock_only]
    assert [v.concept_scores for v in default] == [v.concept_scores for v in stock_only]
    assert 0 < sum(v.nsfw for v in default) < 64
    for v in default:
        assert set(v.categories) == SEVEN | {"special_care"}
        assert ("sexual" in v.flagged_categories) == v.nsfw  # the stock concepts are the sexual category
        assert v.flagged_categories == [c for c, s in v.categories.items() if s > 0]
        assert v.action == ("block" if v.nsfw else ("flag" if v.flagged_categories else "allow"))


def test_policy_is_part_of_the_fingerprint(sets):
    _, _, policy = sets
    assert _load().fingerprint == _load().fingerprint
    assert len({_load().fingerprint, _load("stock").fingerprint, _load(str(policy)).fingerprint}) == 3
    assert _load("blur").fingerprint != _load().fingerprint


def test_keywords():
    assert load_policy("blur").nsfw_action == "blur"
    assert {c.action for c in load_policy("black").categories if c.name == "sexual"} == {"black"}
    stock = load_policy("stock")
    assert [c.name for c in stock.categories] == ["sexual", "special_care"]


MISSING_TOWER = "./no/such/tower"
X_TEXT_POLICY = {"version": 1, "categories": {"x": {"action": "flag", "concepts": [{"text": "a", "threshold": 0.2}]}}}


def test_default_policy_without_text_tower_is_an_error_that_says_how_to_fix_it():
    with pytest.raises(ModelSourceError) as err:
        _load(concept_text_model=MISSING_TOWER)
    message = str(err.value)
    assert f"'{MISSING_TOWER}' does not exist" in message
    for remedy in (
        "diffguard models download openai/clip-vit-large-patch14",
        "--policy stock",
        "policy_fallback: stock",
    ):
        assert remedy in message
    stock = _load("stock", concept_text_model=MISSING_TOWER)  # a policy without text concepts needs no tower
    assert stock.info()["policy_fallback"] == {"allowed": None, "active": None}
    with pytest.raises(ModelSourceError, match="policy_fallback: stock"):
        stock.set_policy(parse_policy(X_TEXT_POLICY))
    assert stock.fingerprint == _load("stock").fingerprint, "a failed set_policy changes nothing"


def test_policy_fallback_stock_falls_back_loudly(caplog):
    with caplog.at_level(logging.WARNING):
        checker = _load(concept_text_model=MISSING_TOWER, policy_fallback="stock")
    assert "are NOT checked" in caplog.text and "policy_fallback is 'stock'" in caplog.text
    assert [name for name, _, _ in checker.concepts.categories] == ["sexual", "special_care"]
    info = checker.info()["policy_fallback"]
    assert info["allowed"] == "stock" and "'diffguard-default' replaced by the stock policy" in info["active"]
    scored = stock_with_detectors(load_policy("default"))  # the stock concepts, and open_nsfw: it needs no tower
    assert [str(s.detector) for s in scored.categories[0].concepts] == ["None", "open_nsfw"]
    assert checker.fingerprint == _load(scored).fingerprint, "the fingerprint names the policy actually scored"
    assert checker.concepts.detectors == {"open_nsfw": ["nsfw"]}
    checker.configure(policy="stock")  # the fallback is over once a policy that loads replaces it
    assert checker.info()["policy_fallback"]["active"] is None
    # the same, asked for by the policy file itself
    own = parse_policy({**X_TEXT_POLICY, "policy_fallback": "stock"})
    stock = _load("stock", concept_text_model=MISSING_TOWER)
    stock.set_policy(own)
    assert [name for name, _, _ in stock.concepts.categories] == ["sexual", "special_care"]
    assert "'unnamed' replaced by the stock policy" in stock.info()["policy_fallback"]["active"]


def test_unscorable_action_is_validated_and_part_of_the_fingerprint(tmp_path):
    default = load_policy("default")
    assert default.unscorable_action == "block" and load_policy("stock").unscorable_action == "block"
    allow = replace(default, unscorable_action="allow")
    assert allow.digest() != default.digest()
    assert _load(allow).fingerprint != _load().fingerprint
    assert _load(allow).info()["policy"]["unscorable_action"] == "allow"
    path = tmp_path / "p.yaml"
    path.write_text(allow.to_yaml())
    assert load_policy(path).unscorable_action == "allow" and load_policy(path).digest() == allow.digest()
    with pytest.raises(InvalidInput, match=r"unscorable_action: action must be one of allow, .*, got 'skip'"):
        parse_policy({**X_TEXT_POLICY, "unscorable_action": "skip"})
    with pytest.raises(InvalidInput, match=r"policy_fallback must be unset .* or one of stock, got 'none'"):
        parse_policy({**X_TEXT_POLICY, "policy_fallback": "none"})
    with pytest.raises(InvalidInput, match="policy_fallback must be"):
        SafetyChecker.load("tiny", device="cpu", policy="stock", policy_fallback="default")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"version": 2, "categories": {}}, "`version` must be 1"),
        ({"version": 1}, "`categories` must be a non-empty mapping"),
        ({"version": 1, "categories": {"x": {"action": "hide", "concepts": [{"stock": 1}]}}}, "action must be one of"),
        ({"version": 1, "categories": {"x": {"action": "flag", "concepts": [{"text": "a"}]}}}, "need a threshold"),
        ({"version": 1, "categories": {"x": {"action": "flag", "concepts": [{"txt": "a"}]}}}, "exactly one of"),
        (
            {"version": 1, "categories": {"x": {"action": "flag", "concepts": [{"text": "a", "threshold": 5}]}}},
            r"cosine in \[-1, 1\], got 5",
        ),
        ({"version": 1, "categories": {"x": {"action": "flag"}}}, "non-empty `concepts`"),
    ],
)
def test_bad_policies_are_named(data, message):
    with pytest.raises(InvalidInput, match=message):
        parse_policy(data)


def test_missing_policy_file():
    with pytest.raises(InvalidInput, match="neither a file nor one of default, stock"):
        load_policy("nope.yaml")


def test_stock_reference_out_of_range():
    bad = parse_policy({"version": 1, "categories": {"x": {"action": "flag", "concepts": [{"stock": 17}]}}})
    with pytest.raises(InvalidInput, match=r"'all' or 0..16, got 17"):
        _load(policy=bad)


def test_image_example_concepts_separate_the_classes(sets):
    _, evaluation, policy = sets
    checker = _load(str(policy))
    report = metrics(checker, load_labelled(evaluation, checker))
    for category in ("violence", "sexual"):
        m = report["categories"][category]
        print(category, m)
        assert m["recall"] >= 0.7  # chance would be about a third
        assert m["fpr_safe"] <= 0.1
    assert report["images"] == {"safe": 60, "sexual": 30, "violence": 30}
    assert sum(report["confusion"]["safe"].values()) == 60


@pytest.mark.parametrize("target", [0.0, 0.05, 0.2])
def test_calibration_meets_the_target_fpr(sets, target):
    _, evaluation, policy = sets
    checker = _load(str(policy))
    data = load_labelled(evaluation, checker)
    calibrated = calibrate(checker, data, load_policy(policy), target)
    assert calibrated.calibrated and calibrated.extra["calibration"]["target_fpr"] == target
    checker.set_policy(calibrated)
    report = metrics(checker, data)
    for category in ("violence", "sexual"):
        assert report["categories"][category]["fpr_safe"] <= target
    if target >= 0.05:
        assert report["categories"]["violence"]["recall"] >= 0.8


def test_calibrated_policy_round_trips_through_yaml(sets, tmp_path):
    _, evaluation, policy = sets
    checker = _load(str(policy))
    data = load_labelled(evaluation, checker)
    calibrated = calibrate(checker, data, load_policy(policy), 0.05)
    path = tmp_path / "calibrated.yaml"
    path.write_text(calibrated.to_yaml())
    again = load_policy(path)
    assert again.categories == calibrated.categories and again.calibrated
    a, b = _load(str(path)), _load(policy=calibrated)
    assert a.fingerprint == b.fingerprint


def test_actions_follow_the_strongest_flag(sets):
    _, evaluation, policy = sets
    checker = _load(str(policy), thresholds={i: 1.0 for i in range(17)})  # the stock decision never fires
    files = sorted((evaluation / "violence").iterdir())[:5] + sorted((evaluation / "sexual").iterdir())[:5]
    verdicts = checker.check(files)
    for v in verdicts:
        expected = "allow"
        if "sexual" in v.flagged_categories:
            expected = "flag"
        if "violence" in v.flagged_categories or v.nsfw:
            expected = "block"
        assert v.action == expected
    assert {"block", "flag"} <= {v.action for v in verdicts}
