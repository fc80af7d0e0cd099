"""What a person sees is what is scored (issue 24): views of frames, pages, alpha, tiles, formats; one verdict each.

Every hidden-picture case (tests/hidden.py) is flagged by a policy that fires on its one example picture only, with
``view`` naming where it was found; the pre-views decoder's rendering (first frame, alpha dropped, centre crop) is
not flagged by the same policy, so each case would have been a bypass.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline import SafetyChecker
from pipeline.errors import ImageDecodeError
from pipeline.views import load_views
from tests.hidden import CASES, gradient, target, write_policy


@pytest.fixture(scope="module")
def tiny():
    return SafetyChecker.load("tiny", "cpu", "float32", policy=None)


@pytest.mark.parametrize("name", sorted(CASES))
def test_hidden_picture_is_flagged_where_a_person_sees_it(tiny, tmp_path, name):
    case = CASES[name]()
    tiny.configure(policy=write_policy(tmp_path, case.example))
    verdict = tiny.check([case.data])[0]
    assert verdict.error is None, verdict.error
    assert verdict.flagged_categories == ["target"] and verdict.action == "block", (name, verdict.categories)
    if case.view is None:
        assert verdict.view is None or verdict.views == 1
    else:
        assert verdict.view is not None and verdict.view.startswith(case.view), verdict.view
    assert verdict.views <= verdict.views_total
    if case.naive is not None:  # what the first-frame, alpha-dropping, centre-cropping decoder saw: not flagged
        assert tiny.check_arrays([np.ascontiguousarray(case.naive)])[0].flagged_categories == []


def test_an_opaque_ordinary_image_is_one_view_scored_exactly_as_before(tiny):
    tiny.configure(policy="stock")
    im = target(size=(320, 240))  # 4:3: the centre crop sees 3/4 of the long side, no tiles
    buf = io.BytesIO()
    im.save(buf, "PNG")
    [bytes_verdict] = tiny.check([buf.getvalue()])
    [array_verdict] = tiny.check_arrays([np.asarray(im)])
    assert (bytes_verdict.views, bytes_verdict.views_total, bytes_verdict.view) == (1, 1, None)
    assert bytes_verdict.concept_scores == array_verdict.concept_scores
    opaque = np.dstack([np.asarray(im), np.full((240, 320), 255, np.uint8)])
    [rgba_verdict] = tiny.check([opaque])
    assert rgba_verdict.views == 1 and rgba_verdict.concept_scores == array_verdict.concept_scores


def test_views_of_a_long_translucent_animation_multiply_and_sample(tiny):
    frames = [Image.fromarray(np.dstack([gradient((672, 224)), np.full((224, 672), 128, np.uint8)]), "RGBA")]
    frames += [Image.fromarray(np.full((224, 672, 4), (i, 0, 0, 255), np.uint8), "RGBA") for i in range(1, 40)]
    buf = io.BytesIO()
    frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:], duration=100)
    [viewed] = load_views([buf.getvalue()], tiny.limits, tiny.preprocess)
    # frame 1: 2 backgrounds x (centre + 3 tiles) = 8; frames 2..40 opaque: 4 each
    assert viewed.total == 8 + 39 * 4 and viewed.sampled and len(viewed.views) <= tiny.limits.max_views
    assert viewed.views[0].label == "frame 1 @ 0.00 s, over white"
    assert {v.label.split(", ")[-1] for v in viewed.views} >= {"tile 1/3", "tile 3/3"}


def test_identical_consecutive_frames_are_one_view(tiny):
    frames = [target()] * 5 + [Image.fromarray(gradient())]
    buf = io.BytesIO()  # TIFF keeps identical pages (Pillow's GIF, APNG and WebP writers merge identical frames)
    frames[0].save(buf, "TIFF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(buf.getvalue())).n_frames == 6
    [viewed] = load_views([buf.getvalue()], tiny.limits, tiny.preprocess)
    assert viewed.total == 2 and [v.label for v in viewed.views] == ["page 1", "page 6"]


def test_sampling_follows_display_time_not_frame_count(tiny, tmp_path):
    """199 frames of 20 ms, then the picture for 20 s: sampled over display time (most of it is the picture, so the
    64 samples fall on few distinct frames), the picture is seen; sampled by frame count it would be missed."""
    blank = [Image.fromarray(np.full((64, 64, 3), (i % 250, 9, 9), np.uint8)) for i in range(199)]
    frames = [*blank, target(size=(64, 64))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=[20] * 199 + [20_000])
    shown = Image.open(io.BytesIO(buf.getvalue()))
    shown.seek(199)
    tiny.configure(policy=write_policy(tmp_path, np.asarray(shown.convert("RGB"))))
    [verdict] = tiny.check([buf.getvalue()])
    assert verdict.views_sampled and verdict.views < 64 and verdict.views_total == 200
    assert verdict.flagged_categories == ["target"] and verdict.view.startswith("frame 200 @")


def test_a_policy_may_withhold_what_it_cannot_see_whole(tiny, tmp_path):
    frames = [Image.fromarray(np.full((32, 32, 3), (i, 0, 0), np.uint8)) for i in range(80)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100)
    tiny.configure(policy=write_policy(tmp_path, gradient(), over_view_budget="unscorable"))
    [verdict] = tiny.check([buf.getvalue()])
    assert verdict.unscorable and verdict.action == "block" and verdict.views_total == 80 and verdict.views == 0
    assert "over_view_budget: unscorable" in verdict.error


def test_a_decode_bomb_of_frames_is_refused_before_decoding(tiny):
    frames = [Image.new("L", (2000, 2000), i) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    from dataclasses import replace

    limits = replace(tiny.limits, max_decoded_pixels=10_000_000)
    [err] = load_views([buf.getvalue()], limits, tiny.preprocess)
    assert (
        isinstance(err, ImageDecodeError) and "3 frames of 2000x2000" in str(err) and "max_decoded_pixels" in str(err)
    )


def test_views_of_many_objects_share_vision_passes(tiny, monkeypatch):
    tiny.configure(policy="stock")
    calls = []
    original = tiny.embed_pixels
    monkeypatch.setattr(tiny, "embed_pixels", lambda px: calls.append(len(px)) or original(px))
    long = CASES["wide-224x672"]().data
    verdicts = tiny.check([long] * 5)  # 4 views each: 20 views, max_batch_size 32 -> one pass
    assert calls == [20] and all(v.views == 4 for v in verdicts)


def test_the_fingerprint_names_the_view_rules(tiny):
    from dataclasses import replace

    before = tiny.fingerprint
    tiny._limits = replace(tiny._limits, max_views=8)
    try:
        assert tiny.fingerprint != before and tiny.info()["views"]["max_views"] == 8
    finally:
        tiny._limits = replace(tiny._limits, max_views=64)
    assert tiny.fingerprint == before


def test_evaluate_scores_an_object_by_its_views(tiny, tmp_path):
    """evaluate/calibrate see what check sees: a picture in frame 2 counts as found for its labelled category."""
    from pipeline.evaluate import load_labelled, metrics

    case = CASES["animated-gif"]()
    tiny.configure(policy=write_policy(tmp_path / "policy", case.example))
    (tmp_path / "set" / "target").mkdir(parents=True)
    (tmp_path / "set" / "safe").mkdir()
    (tmp_path / "set" / "target" / "hidden.gif").write_bytes(case.data)
    Image.fromarray(gradient()).save(tmp_path / "set" / "safe" / "plain.png")
    data = load_labelled(tmp_path / "set", tiny)
    assert len(data.embeds) == 3 and data.owners.tolist() == [0, 1, 1]  # safe/ first: one image, then two frames
    assert (
        metrics(tiny, data)["categories"]["target"] | {"tp": 1, "fp": 0} == metrics(tiny, data)["categories"]["target"]
    )


@pytest.mark.parametrize("fmt", ["AVIF", "JXL", "HEIF", "WEBP"])
def test_every_still_format_a_phone_or_browser_shows_is_one_scored_view(tiny, fmt):
    from pipeline.images import register_plugins
    from pipeline.media import media_format

    register_plugins()
    buf = io.BytesIO()
    target().save(buf, fmt, quality=90)
    data = buf.getvalue()
    assert media_format(data[:65536]) is not None  # found by content, whatever the name
    [verdict] = tiny.check([data])
    assert verdict.error is None and verdict.views == 1 and len(verdict.concept_scores) == 17


def test_what_looks_like_media_but_cannot_be_rendered_is_unscorable_never_skipped(tiny):
    from pipeline.media import media_format

    broken = {
        "svg": b'<svg xmlns="http://www.w3.org/2000/svg"><rect width="10" height="10"',  # cut off
        "mp4": b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + b"\x00" * 64,  # a header, no movie
        "webm": b"\x1a\x45\xdf\xa3" + b"\x00" * 64,
    }
    for name, data in broken.items():
        assert media_format(data) is not None, name
        [verdict] = tiny.check([data])
        assert verdict.unscorable and verdict.action == "block" and verdict.error, (name, verdict)


def test_policy_view_keys_are_validated_and_named(tmp_path):
    from pipeline.errors import InvalidInput
    from pipeline.policy import load_policy

    for key, value, allowed in (("over_view_budget", "skip", "sample, unscorable"), ("max_views", 0, ">= 1")):
        path = write_policy(tmp_path / key, gradient(), **{key: value})
        with pytest.raises(InvalidInput, match=rf"{key} must .*{allowed}.*got {value!r}"):
            load_policy(path)
    assert load_policy(write_policy(tmp_path / "ok", gradient(), max_views=8)).max_views == 8


def test_a_long_animation_holds_a_bounded_number_of_frames_and_keeps_the_longest_shown(tiny, tmp_path):
    """1,000 distinct frames: at most KEPT_FRAMES x max_views are held while decoding (memory is bounded), pairs merge
    into the frame shown longer, so the one frame shown for 20 s among 999 shown for 20 ms is still scored."""
    from dataclasses import replace

    from pipeline.views import KEPT_FRAMES, _image_frames

    frames = [Image.fromarray(np.full((32, 32, 3), (i % 250, i // 250, 9), np.uint8)) for i in range(999)]
    frames.insert(500, target(size=(32, 32)))
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=[20] * 500 + [20_000] + [20] * 499)
    limits = replace(tiny.limits, max_views=8)
    held, _ = _image_frames(buf.getvalue(), limits, tiny.preprocess)
    assert len(held) <= KEPT_FRAMES * 8 and any(f.label.startswith("frame 501 @") for f in held)
    assert abs(sum(f.duration for f in held) - (999 * 0.02 + 20)) < 1e-6  # every frame's time is still counted
    [viewed] = load_views([buf.getvalue()], limits, tiny.preprocess)
    assert viewed.sampled and any(v.label.startswith("frame 501 @") for v in viewed.views)
