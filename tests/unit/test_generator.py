"""Generator core on tiny models: validation, determinism, SLD presets, the Safe-CLIP swap, SD 2.x, moderation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import InvalidInput, Verdict
from pipeline.generator import SLD_PRESETS, GenerationLimits, GenerationRequest, Generator
from pipeline.moderate import generate_moderated, moderate
from pipeline.policy import blur
from pipeline.tiny import build_tiny


@pytest.fixture(scope="module")
def gen():
    return Generator.load("tiny", device="cpu", dtype="float32")


def req(**kw):
    return GenerationRequest.parse({"prompt": "a red bicycle", "steps": 2, "seed": 1, **kw})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt": "   "}, "`prompt` must not be empty"),
        ({"prompt": "x" * 2001}, "`prompt` has 2001 characters; the limit is 2000"),
        ({"prompt": "bad\x00char"}, r"`prompt` contains control characters U\+0000"),
        ({"num_images": 0}, r"`num_images` must be within 1..4, got 0"),
        ({"num_images": 5}, r"`num_images` must be within 1..4, got 5"),
        ({"steps": 151}, r"`steps` must be within 1..150, got 151"),
        ({"guidance_scale": 31}, r"`guidance_scale` must be within 0.0..30.0, got 31"),
        ({"width": 100}, r"`width` must be a multiple of 8 within 64..1024, got 100"),
        ({"height": 2048}, r"`height` must be a multiple of 8 within 64..1024, got 2048"),
        ({"seed": -1}, r"`seed` must be within 0..4294967295, got -1"),
        ({"safety": "extreme"}, r"`safety`: input should be 'off', 'weak', 'medium', 'strong' or 'max'"),
        ({"steps": "ten"}, r"`steps`: input should be a valid integer, got 'ten'"),
        ({"steps": 2.5}, r"`steps`: input should be a valid integer"),
        ({"colour": "red"}, r"`colour` is not a known field"),
        ({"safety": "weak", "guidance_scale": 1.0}, r"needs `guidance_scale` > 1"),
    ],
)
def test_invalid_requests_name_field_value_and_range(fields, message):
    with pytest.raises(InvalidInput, match=message):
        GenerationRequest.parse({"prompt": "a cat", **fields})


def test_missing_prompt_and_non_object():
    with pytest.raises(InvalidInput, match="`prompt` is required"):
        GenerationRequest.parse({"steps": 3})
    with pytest.raises(InvalidInput, match="must be a JSON object"):
        GenerationRequest.parse(["a cat"])


def test_limits_are_configurable():
    limits = GenerationLimits(max_images=8, max_size=2048)
    assert GenerationRequest.parse({"prompt": "a", "num_images": 8, "width": 2048}, limits).num_images == 8
    with pytest.raises(InvalidInput, match="within 1..8"):
        GenerationRequest.parse({"prompt": "a", "num_images": 9}, limits)


def test_seeded_output_is_bit_for_bit_reproducible(gen):
    a, b = gen.generate(req(num_images=2)), gen.generate(req(num_images=2))
    assert len(a) == 2 and a[0].dtype == np.uint8 and a[0].shape == (64, 64, 3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], gen.generate(req(seed=2))[0])
    unseeded = gen.render(GenerationRequest.parse({"prompt": "a red bicycle", "steps": 2}))
    assert np.array_equal(unseeded.images[0], gen.generate(req(seed=unseeded.seed))[0])  # reported seed reproduces


def test_size_and_images(gen):
    out = gen.render(req(width=96, height=64, num_images=3))
    assert (out.width, out.height) == (96, 64) and [i.shape for i in out.images] == [(64, 96, 3)] * 3


@pytest.mark.parametrize("preset", list(SLD_PRESETS))
def test_every_sld_preset_runs_on_shared_weights(gen, preset):
    images = gen.generate(req(safety=preset, steps=3))
    assert images[0].shape == (64, 64, 3)
    sld = gen.safe_pipeline()
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(gen.pipe, name), getattr(sld, name)
        assert ours is theirs
        assert all(p.data_ptr() == q.data_ptr() for p, q in zip(ours.parameters(), theirs.parameters(), strict=True))
    assert sld.safety_checker is None


def test_sld_changes_the_image(gen):
    """Safety guidance enters the denoising loop: with MAX (no warm-up) the pixels differ from the plain run."""
    plain = gen.generate(req(steps=4))[0]
    safe = gen.generate(req(steps=4, safety="max"))[0]
    assert not np.array_equal(plain, safe)


def test_weak_preset_follows_the_paper():
    from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig

    assert SLD_PRESETS["weak"]["sld_guidance_scale"] == 200 != SafetyConfig.WEAK["sld_guidance_scale"]
    for name in ("medium", "strong", "max"):
        assert SLD_PRESETS[name] == getattr(SafetyConfig, name.upper())


def test_safe_clip_swap_from_local_directory(gen, tmp_path):
    build_tiny("safeclip", tmp_path / "safeclip")
    swapped = Generator.load("tiny", device="cpu", dtype="float32", text_encoder=str(tmp_path / "safeclip"))
    from transformers import CLIPTextModel

    expected = CLIPTextModel.from_pretrained(tmp_path / "safeclip")
    for p, q in zip(swapped.pipe.text_encoder.parameters(), expected.parameters(), strict=True):
        assert torch.equal(p, q)
    assert swapped.fingerprint != gen.fingerprint
    assert not np.array_equal(swapped.generate(req())[0], gen.generate(req())[0])


def test_text_encoder_of_the_wrong_width_is_refused(tmp_path):
    build_tiny("sd2", tmp_path / "sd2")
    with pytest.raises(InvalidInput, match="hidden size 32, but the UNet"):
        Generator.load(str(tmp_path / "sd2"), device="cpu", dtype="float32", text_encoder="tiny")


def test_sd2_architecture_through_the_same_code(tmp_path):
    build_tiny("sd2", tmp_path / "sd2")
    sd2 = Generator.load(str(tmp_path / "sd2"), device="cpu", dtype="float32")
    assert sd2.pipe.scheduler.config.prediction_type == "v_prediction"
    assert sd2.native_size == 64 and sd2.pipe.unet.config.cross_attention_dim == 64
    a, b = sd2.generate(req(safety="medium", steps=3)), sd2.generate(req(safety="medium", steps=3))
    assert np.array_equal(a[0], b[0])


def test_long_prompts_report_truncation(gen):
    out = gen.render(req(prompt="word " * 100))
    assert any("`prompt` is" in w and "first 77" in w for w in out.warnings)
    assert gen.render(req()).warnings == []


def test_moderation_carries_out_each_verdicts_action():
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    verdicts = [
        Verdict(action="allow"),
        Verdict(nsfw=True, action="flag", flagged_categories=["violence"]),
        Verdict(nsfw=True, action="blur"),
        Verdict(nsfw=True, action="black"),
        Verdict(nsfw=True, action="block"),
        Verdict.failed("checker error"),  # unscored: blocked whatever it says
        Verdict(nsfw=True),  # no policy: the stock decision blocks
        Verdict(nsfw=False),
    ]
    out = moderate([img] * len(verdicts), verdicts)
    assert [m.action for m in out] == ["allow", "flag", "blur", "black", "block", "block", "block", "allow"]
    assert out[0].image is img and out[1].image is img
    assert not np.array_equal(out[2].image, img) and out[3].image.max() == 0
    assert out[4].image is None and out[5].image is None and out[6].image is None
    from pipeline.errors import Unavailable

    with pytest.raises(Unavailable, match="1 verdicts for 2 images"):
        moderate([img, img], [verdicts[0]])


def test_blur_destroys_detail():
    img = np.random.default_rng(0).integers(0, 256, (128, 96, 3), dtype=np.uint8)
    out = blur(img)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.abs(np.diff(out.astype(int), axis=1)).mean() < 0.1 * np.abs(np.diff(img.astype(int), axis=1)).mean()


def test_generate_moderated_scores_every_image(gen, checker):
    result = generate_moderated(gen, checker, req(num_images=3))
    assert len(result.images) == 3 and result.seed == 1
    report = result.report()
    assert report["models"]["generator_fingerprint"] == gen.fingerprint
    assert report["models"]["checker_fingerprint"] == checker.fingerprint and report["models"]["demo_weights"]
    assert all(len(m.verdict.concept_scores) == 17 for m in result.images)
