"""The core agrees with diffusers' StableDiffusionSafetyChecker.forward on the same weights and inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

from pipeline import SafetyChecker
from pipeline.preprocess import processor_class
from pipeline.tiny import set_thresholds, varied_images, widest_gap

N = 64


def _cosines(ref: StableDiffusionSafetyChecker, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        e = torch.nn.functional.normalize(ref.visual_projection(ref.vision_model(pixels)[1]))
        special = e @ torch.nn.functional.normalize(ref.special_care_embeds).T
        concept = e @ torch.nn.functional.normalize(ref.concept_embeds).T
    return special.numpy(), concept.numpy()


@pytest.fixture(scope="module")
def setup(tiny_checker_dir):
    ref = StableDiffusionSafetyChecker.from_pretrained(tiny_checker_dir).eval()
    processor = processor_class().from_pretrained(tiny_checker_dir)
    images = varied_images(N, seed=1)
    pixels = processor(images, return_tensors="pt").pixel_values
    return ref, processor, images, pixels


def test_decisions_equal_reference_forward_on_same_input(setup):
    ref, _, _, pixels = setup
    checker = SafetyChecker.load("tiny", device="cpu", dtype="float32", policy="stock")  # pixels only: no detector rows
    special, concept = _cosines(ref, pixels)
    # Median thresholds put many margins near 0, where the 3-decimal rounding and the +0.01 special-care bump decide.
    special_thr = np.quantile(special, 0.7, axis=0).astype(np.float32)
    concept_thr = np.quantile(concept, 0.8, axis=0).astype(np.float32)
    # One image with a clear special-care hit gets concept 0 just 0.005 below its threshold and every other concept
    # well below: the reference flags it only through the +0.01 bump.
    i0 = int(np.argmax(special[:, 0] - special_thr[0]))
    concept_thr = np.maximum(concept_thr, concept[i0] + 0.02).astype(np.float32)
    concept_thr[0] = np.float32(concept[i0, 0] + 0.005)
    set_thresholds(ref, checker, special_thr, concept_thr)

    black = [np.ones((4, 4, 3)) for _ in range(N)]
    _, ref_nsfw = ref(pixels.clone(), black)
    ours = checker.score_pixels(pixels, [[None]] * len(pixels))

    assert [v.nsfw for v in ours] == ref_nsfw
    assert 0 < sum(ref_nsfw) < N, "thresholds must make both outcomes occur"
    # The bump matters in this data: some image is flagged only because of a special-care hit.
    bumped = [v for v in ours if v.special_care and v.nsfw and max(v.concept_scores) <= 0.01 + 1e-9]
    assert bumped, "the test data must exercise the +0.01 special-care adjustment"
    assert any(v.special_care for v in ours) and not all(v.special_care for v in ours)


def test_reference_rounding_reproduced_exactly(setup):
    """Margins equal the reference's per-image Python arithmetic (float32, round to 3 decimals) bit for bit."""
    ref, _, _, pixels = setup
    checker = SafetyChecker.load("tiny", device="cpu", dtype="float32", policy="stock")
    special, concept = _cosines(ref, pixels)
    special_thr = np.quantile(special, 0.5, axis=0).astype(np.float32)
    concept_thr = np.quantile(concept, 0.5, axis=0).astype(np.float32)
    set_thresholds(ref, checker, special_thr, concept_thr)
    ours = checker.score_pixels(pixels, [[None]] * len(pixels))
    for i, v in enumerate(ours):  # the reference's loop, as written in diffusers, on the same float32 cosines
        adjustment = 0.0
        for j in range(special.shape[1]):
            s = round(special[i][j] - float(special_thr[j]) + adjustment, 3)
            assert v.special_scores[j] == pytest.approx(float(s), abs=1.5e-3)
            if s > 0:
                adjustment = 0.01
        expected = [round(concept[i][j] - float(concept_thr[j]) + adjustment, 3) for j in range(concept.shape[1])]
        assert v.concept_scores == pytest.approx([float(x) for x in expected], abs=1.5e-3)
        assert v.bad_concepts == [j for j, x in enumerate(expected) if x > 0]


def test_decisions_unchanged_by_tensor_preprocessing(setup):
    """check() (our batched preprocessing) decides as the reference does on CLIPImageProcessor output: on arrays (one
    view each, as generated images are scored) for every image, and on PIL images for those whose aspect ratio needs
    no tiles (one view: the tiles of a long image are extra views the reference never sees)."""
    ref, _, images, pixels = setup
    checker = SafetyChecker.load("tiny", device="cpu", dtype="float32")
    special, concept = _cosines(ref, pixels)
    special_thr = np.array([widest_gap(special[:, j], 0.5, 0.9) for j in range(special.shape[1])], np.float32)
    concept_thr = np.array([widest_gap(concept[:, j], 0.92, 1.0) for j in range(concept.shape[1])], np.float32)
    set_thresholds(ref, checker, special_thr, concept_thr)
    _, ref_nsfw = ref(pixels.clone(), [np.ones((2, 2, 3)) for _ in range(N)])
    ours = checker.check([np.asarray(im) for im in images])
    assert [v.nsfw for v in ours] == ref_nsfw
    assert 0 < sum(ref_nsfw) < N
    viewed = checker.check(images)
    single = [i for i, v in enumerate(viewed) if v.views == 1]
    assert len(single) >= N // 4 and [viewed[i].nsfw for i in single] == [ref_nsfw[i] for i in single]
    assert all(v.nsfw or not ours[i].nsfw for i, v in enumerate(viewed))  # more views: never less strict


def test_input_is_never_mutated(checker):
    arr = np.full((64, 64, 3), 200, np.uint8)
    before = arr.copy()
    checker.set_threshold(0, -1.0)  # everything hits: the reference would black the image in place
    try:
        assert checker.check([arr])[0].nsfw
    finally:
        checker.set_threshold(0, checker.concepts.stock_thresholds["concept_0"])
    np.testing.assert_array_equal(arr, before)


def test_batching_and_chunking_do_not_change_results(tiny_checker_dir):
    images = varied_images(20, seed=5)
    big = SafetyChecker.load(str(tiny_checker_dir), device="cpu", dtype="float32", max_batch_size=32)
    small = SafetyChecker.load(str(tiny_checker_dir), device="cpu", dtype="float32", max_batch_size=3)
    one_by_one = [big.check([im])[0] for im in images]
    for a, b, c in zip(big.check(images), small.check(images), one_by_one, strict=True):
        assert a.nsfw == b.nsfw == c.nsfw
        assert a.concept_scores == pytest.approx(b.concept_scores, abs=1e-3)
        assert a.concept_scores == pytest.approx(c.concept_scores, abs=1e-3)


def test_bfloat16_agrees_with_float32(tiny_checker_dir):
    images = varied_images(32, seed=7)
    f32 = SafetyChecker.load(str(tiny_checker_dir), device="cpu", dtype="float32").check(images)
    bf16 = SafetyChecker.load(str(tiny_checker_dir), device="cpu", dtype="bfloat16").check(images)
    agree = np.mean([a.nsfw == b.nsfw for a, b in zip(f32, bf16, strict=True)])
    pairs = zip(f32, bf16, strict=True)
    diff = max(abs(x - y) for a, b in pairs for x, y in zip(a.concept_scores, b.concept_scores, strict=True))
    print(f"bfloat16 vs float32: decision agreement {agree:.3f}, max score difference {diff:.4f}")
    assert diff < 0.05
    assert agree >= 0.9
