"""Why an image was unscorable (the ``reason`` of ``diffguard_images_unscorable``): real inputs through the real decode
and scoring path give the reason an operator expects, and every ``ImageDecodeError`` message raised in ``pipeline/``
maps to a reason of the closed set (``other`` only for the few listed below)."""

from __future__ import annotations

import ast
import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import SafetyChecker
from pipeline.policy import parse_policy
from pipeline.unscorable import REASONS, unscorable_reason
from pipeline.views import load_views
from tests import adversarial
from tests.corpus import CORRUPT, EMPTY, NOT_IMAGE, TOO_LARGE, image_cases, png_header_only
from tests.detected import Faulty
from tests.hidden import gradient, write_policy

ROOT = Path(__file__).resolve().parents[2]
BY_PATTERN = {EMPTY: "corrupt", NOT_IMAGE: "unsupported", CORRUPT: "corrupt", TOO_LARGE: "too_large"}
# Messages no rule claims, on purpose: an unreadable path (the CLI's), and the SVG renderer failing in a way that
# names no limit (resvg's own message, a crash without the memory cap, no PNG back): look at the logs.
OTHER = {
    "cannot read 7: 7",
    "SVG could not be rendered: the renderer crashed (77)",
    "SVG could not be rendered: 7",
    "SVG could not be rendered: the renderer returned no image",
}


@pytest.fixture(scope="module")
def tiny():
    return SafetyChecker.load("tiny", "cpu", "float32", policy=None)


def reason_of(checker: SafetyChecker, item) -> str:
    [verdict] = checker.check([item])
    assert verdict.error is not None and verdict.unscorable, verdict
    return unscorable_reason(verdict.error)


@pytest.mark.parametrize("case", [c for c in image_cases() if c.unscorable], ids=lambda c: c.name)
def test_every_unscorable_corpus_image_gets_the_reason_of_its_documented_error(tiny, case):
    assert reason_of(tiny, case.data) == BY_PATTERN[case.error]


def test_the_named_cases(tiny):
    png = adversarial.image_bytes(0, "PNG", (64, 64))
    assert reason_of(tiny, png[:60]) == "corrupt"  # a PNG cut off in its first chunk
    assert reason_of(tiny, adversarial.header_only("PNG")) == "corrupt"  # cut where its pixel data begins
    assert reason_of(tiny, b"") == "corrupt"
    assert reason_of(tiny, png_header_only(100_000, 100_000)) == "too_large"  # a bomb's header: 10 G pixels
    assert reason_of(tiny, adversarial.encode(Image.new("L", (10_000, 5_000)), "PNG")) == "too_large"  # 50 MP
    assert reason_of(tiny, b"hello, I am plain text, not an image\n") == "unsupported"
    assert reason_of(tiny, np.zeros((8, 8, 3), np.float32)) == "unsupported"  # arrays must be uint8
    entity = b'<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY x "y">]><svg xmlns="http://www.w3.org/2000/svg">&x;</svg>'
    assert reason_of(tiny, entity) == "unsupported"
    assert reason_of(tiny, b'<svg xmlns="http://www.w3.org/2000/svg"><rect></svg>') == "corrupt"  # not well-formed


def test_frames_over_the_decoded_pixel_budget_are_too_large(tiny):
    frames = [Image.new("L", (2000, 2000), i) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    [err] = load_views([buf.getvalue()], replace(tiny.limits, max_decoded_pixels=10_000_000), tiny.preprocess)
    assert unscorable_reason(str(err)) == "too_large", err


def test_an_animation_over_the_view_budget_under_a_withholding_policy_is_view_budget(tiny, tmp_path):
    frames = [Image.fromarray(np.full((32, 32, 3), (i, 0, 0), np.uint8)) for i in range(80)]  # over max_views
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100)
    tiny.configure(policy=write_policy(tmp_path, gradient(), over_view_budget="unscorable"))
    try:
        assert reason_of(tiny, buf.getvalue()) == "view_budget"
    finally:
        tiny.configure(policy="stock")


def test_a_detector_that_fails_or_answers_nan_is_detector():
    policy = {
        "version": 1,
        "name": "open_nsfw-only",
        "categories": {"sexual": {"action": "block", "concepts": [{"detector": "open_nsfw", "threshold": 0.8}]}},
    }
    checker = SafetyChecker.load("tiny", "cpu", "float32", policy=parse_policy(policy))
    checker.detectors.loaded["open_nsfw"] = Faulty(checker.detectors.get("open_nsfw"))
    rng = np.random.default_rng(0)
    unprepared, nan = checker.check([rng.integers(0, 256, (7, 7, 3), np.uint8), np.zeros((9, 9, 3), np.uint8)])
    assert "cannot prepare" in unprepared.error and unscorable_reason(unprepared.error) == "detector"
    assert nan.error == "a detector returned a non-finite score" and unscorable_reason(nan.error) == "detector"


def _rendered(arg: ast.expr) -> str | None:
    """A message argument as it reads with every interpolated value replaced by 7 (None: not a literal)."""
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr):
        return "".join(part.value if isinstance(part, ast.Constant) else "7" for part in arg.values)
    return None


def _messages() -> dict[str, str]:
    """Every ``ImageDecodeError(...)`` message literal in pipeline/ -> where it is raised."""
    found = {}
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ImageDecodeError" and node.args:
                message = _rendered(node.args[0])
                assert message is not None, f"{path}:{node.lineno}: a message this test cannot read"
                found[message] = f"{path.relative_to(ROOT)}:{node.lineno}"
    return found


def test_every_decode_error_raised_in_pipeline_has_a_reason():
    messages = _messages()
    assert len(messages) > 40, sorted(messages)  # the walk finds the raise sites (not vacuous)
    unclaimed = {m: where for m, where in messages.items() if unscorable_reason(m) == "other"}
    assert set(unclaimed) == OTHER, {m: w for m, w in unclaimed.items() if m not in OTHER} or OTHER - set(unclaimed)
    reasons = {unscorable_reason(m) for m in messages}
    assert reasons == set(REASONS) - {"view_budget", "detector"}  # those two are not decode errors


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        ("corrupt or unsupported video: Invalid data found when processing input", "corrupt"),
        ("video container 'mp3' is not allowed", "unsupported"),
        ("embedded ICC profile cannot be applied: 5,000,000 bytes, over the limit of 4,194,304", "too_large"),
        ("embedded ICC profile cannot be applied: a profile for 'GRAY' colour on a RGB image", "unsupported"),
        ("SVG could not be rendered: the renderer crashed (SIGKILL, over the 2 GiB memory cap)", "too_large"),
        ("decoding took over 5 s (max_decode_s) at frame 12", "too_large"),
        ("", "other"),
        ("something nobody wrote yet", "other"),
    ],
)
def test_messages_built_at_run_time(error, reason):
    assert unscorable_reason(error) == reason
