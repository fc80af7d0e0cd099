"""No bypass through content (issue 14): images are identified by their bytes, truncated files are scored on what
decodes (per call, never Pillow's global flag), and whatever cannot be scored gets the policy's unscorable_action."""

from __future__ import annotations

import io
import json
import threading
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipeline import DecodeLimits, ImageDecodeError, SafetyChecker
from pipeline.errors import InvalidInput
from pipeline.images import (
    DEFAULT_MAX_OBJECT_BYTES,
    SNIFF_BYTES,
    Decoded,
    ImageHeader,
    decode,
    decode_image,
    identify,
    load_decoded,
)
from pipeline.policy import apply_action, image_action, load_policy, withheld
from pipeline.verdict import Verdict
from tests import adversarial as adv

FORMATS = adv.TRUNCATED_FORMATS
TOLERANCE = 0.05  # how far 2% of missing rows moves a tiny-checker margin here (measured: at most 0.048, PNG)


@pytest.fixture(scope="module")
def checker():
    return SafetyChecker.load("tiny", device="cpu", dtype="float32")


# --- identify -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "ICO", "TGA"])
def test_identify_by_content_with_size(fmt):
    header = identify(adv.image_bytes(1, fmt, (40, 30)))
    assert header is not None and header.format == fmt
    if fmt != "ICO":  # an icon's size is the entry Pillow picks
        assert (header.width, header.height, header.pixels) == (40, 30, 1200)


def test_identify_a_prefix():
    big = adv.image_bytes(2, "PNG", (400, 300))
    assert len(big) > SNIFF_BYTES
    assert identify(big[:SNIFF_BYTES]) == ImageHeader("PNG", 400, 300)
    for fmt in ("PNG", "JPEG", "GIF", "TIFF", "WEBP"):  # cut inside the header: the signature still says which
        header = identify(adv.image_bytes(2, fmt)[:12])
        assert header is not None and header.format == fmt and header.pixels in (None, 64 * 64)


def test_identify_bombs_without_decoding():
    header = identify(adv.huge_bilevel_png())
    assert header == ImageHeader("PNG", adv.HUGE_SIDE, adv.HUGE_SIDE)
    assert header.pixels == 39_942_400
    assert identify(adv.header_only("PNG")) == ImageHeader("PNG", 64, 64)


@pytest.mark.parametrize(
    "data",
    [b"", b"hello, I am text", b"BMW service notes\n", b"P1 results\n", b"%PDF-1.7\n", b"PK\x03\x04" + bytes(60)],
    ids=["empty", "text", "bm-text", "p1-text", "pdf", "zip"],
)
def test_identify_refuses_non_images(data):
    assert identify(data) is None


def test_identify_never_raises():
    rng = np.random.default_rng(0)
    png = adv.image_bytes(3)
    for n in range(300):
        junk = rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8).tobytes()
        assert identify(junk) is None or isinstance(identify(junk), ImageHeader)
        corrupt = bytearray(png)
        corrupt[int(rng.integers(8, len(png)))] ^= 0xFF
        header = identify(bytes(corrupt[: n + 1]))
        assert header is None or header.format == "PNG"


# --- truncated images -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_decodes_what_a_browser_shows(fmt):
    whole = decode(adv.encode(adv.picture(0, (256, 256)), fmt))
    cut = decode(adv.truncated(fmt, keep=0.98))
    assert not whole.truncated and cut.truncated
    assert cut.array.shape == whole.array.shape == (256, 256, 3)
    rows_equal = (cut.array == whole.array).all(axis=(1, 2))
    if fmt == "PROGRESSIVE_JPEG":  # every row has its coarse scans; only the last refinement is missing
        assert np.abs(cut.array.astype(int) - whole.array).mean() < 2
    else:  # the rows before the cut are the picture's own (JPEG: up to its 8-pixel MCU rows)
        assert rows_equal[:200].all() and not rows_equal.all()
    assert np.array_equal(decode_image(adv.truncated(fmt, keep=0.98)), cut.array)


@pytest.mark.parametrize("fmt", [*FORMATS, "BMP", "TIFF"])
def test_cut_before_the_image_data_is_unscorable(fmt):
    with pytest.raises(ImageDecodeError, match=r"corrupt or truncated .*(ends before enough image data|Truncated)"):
        decode(adv.header_only(fmt))


def test_truncation_is_tolerated_per_call_not_globally():
    cuts = {fmt: adv.truncated(fmt, keep=0.9) for fmt in ("JPEG", "PNG", "GIF")}
    errors: list[str] = []

    def plain_pillow():  # what any other code in the process sees: Pillow's default, which refuses truncation
        for _ in range(20):
            for fmt, data in cuts.items():
                try:
                    Image.open(io.BytesIO(data)).load()
                    errors.append(f"{fmt} loaded with Pillow's defaults")
                except OSError:
                    pass

    def ours():
        for _ in range(20):
            for data in cuts.values():
                if not decode(data).truncated:
                    errors.append("not reported truncated")

    threads = [threading.Thread(target=f) for f in (plain_pillow, ours, plain_pillow, ours)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_unsafe_image_is_caught_like_the_whole(checker, fmt):
    pictures = [adv.encode(adv.picture(seed, (256, 256)), fmt) for seed in range(3)]
    cuts = [adv.truncated(fmt, keep=0.98, seed=seed) for seed in range(3)]
    others = [adv.encode(adv.picture(seed + 10, (256, 256)), fmt) for seed in range(3)]
    verdicts = checker.check(pictures + cuts + others)
    whole, cut, other = verdicts[:3], verdicts[3:6], verdicts[6:]
    assert all(v.truncated and v.error is None for v in cut) and not any(v.truncated for v in whole)
    for w, c, o in zip(whole, cut, other, strict=True):
        w_scores, c_scores, o_scores = (np.array(v.concept_scores) for v in (w, c, o))
        assert np.abs(c_scores - w_scores).max() < TOLERANCE
        assert np.abs(c_scores - w_scores).mean() < np.abs(o_scores - w_scores).mean(), "it scores the picture"
    # an adjustment that flags each whole picture (by the tolerance) flags its truncated copy too
    strict = SafetyChecker.load("tiny", device="cpu", dtype="float32")
    for data, cut_data, w in zip(pictures, cuts, whole, strict=True):
        strict.adjustment = min(1.0, TOLERANCE - max(w.concept_scores) + 0.001)
        v_whole, v_cut = strict.check([data, cut_data])
        assert v_whole.nsfw and v_cut.nsfw and v_cut.action == v_whole.action == "block"
    strict.adjustment = 1.0  # the reproduction: every readable image is flagged, truncated ones included
    assert all(v.nsfw and v.action == "block" for v in strict.check(cuts))


# --- unscorable images ----------------------------------------------------------------------------------------------
UNSCORABLE = {
    "header-only": adv.header_only("PNG"),
    "garbage-jpeg": b"\xff\xd8\xff\xe0 not really a jpeg",
    "webp-cut": adv.truncate_bytes(adv.image_bytes(0, "WEBP"), 0.5),
    "bomb": adv.huge_bilevel_png(),
}


def test_unscorable_images_are_blocked_by_default(checker):
    small = SafetyChecker.load("tiny", device="cpu", dtype="float32", max_pixels=10_000_000)
    good = adv.image_bytes(5)
    verdicts = small.check([good, *UNSCORABLE.values(), good])
    assert verdicts[0].error is None and verdicts[0].action is not None and not verdicts[0].unscorable
    assert verdicts[0].concept_scores == verdicts[-1].concept_scores  # neighbours unaffected
    for name, v in zip(UNSCORABLE, verdicts[1:-1], strict=True):
        assert v.error and v.unscorable and v.action == "block", name
        assert v.flagged_categories == [] and v.concept_scores == [] and not v.nsfw
        assert image_action(v) == "block" and withheld(v)
        assert apply_action(np.zeros((4, 4, 3), np.uint8), v) == ("block", None)
    assert "39.9 MP, over the limit of 10.0 MP" in verdicts[4].error


def test_unscorable_action_comes_from_the_policy():
    allow = replace(load_policy("default"), unscorable_action="allow")
    lenient = SafetyChecker.load("tiny", device="cpu", dtype="float32", policy=allow)
    (v,) = lenient.check([UNSCORABLE["header-only"]])
    assert v.unscorable and v.action == "allow" and image_action(v) == "allow" and not withheld(v)
    blur = SafetyChecker.load("tiny", device="cpu", dtype="float32", policy=replace(allow, unscorable_action="blur"))
    assert blur.check([b"junk"])[0].action == "blur"
    bare = SafetyChecker.load("tiny", device="cpu", dtype="float32", policy=None)  # no policy: still fail closed
    (v,) = bare.check([b"junk"])
    assert v.unscorable and v.action == "block"
    assert bare.unscorable("why").to_dict()["action"] == "block"


def test_check_arrays_keeps_truncation_and_decode_errors(checker):
    items = load_decoded([adv.truncated("JPEG"), b"junk", adv.image_bytes(1)])
    assert isinstance(items[0], Decoded) and items[0].truncated and isinstance(items[1], ImageDecodeError)
    v = checker.check_arrays([*items, items[2].array])
    assert [x.truncated for x in v] == [True, False, False, False]
    assert v[1].unscorable and v[1].action == "block" and "not a recognised image format" in v[1].error
    assert v[2].concept_scores == v[3].concept_scores


def test_verdict_without_action_is_still_blocked():
    never_scored = Verdict.failed("the checker never answered")
    assert never_scored.action is None and not never_scored.unscorable
    assert image_action(never_scored) == "block" and withheld(never_scored)
    assert Verdict.failed("corrupt", "flag").unscorable and image_action(Verdict.failed("corrupt", "flag")) == "flag"


def test_byte_limit(tmp_path):
    assert DEFAULT_MAX_OBJECT_BYTES == 256 * 1024 * 1024 and DecodeLimits().max_bytes == DEFAULT_MAX_OBJECT_BYTES
    data = adv.oversized_png(5_000)
    assert len(data) > 5_000 and decode(data).array.shape == (16, 16, 3)
    with pytest.raises(ImageDecodeError, match=r"is 5,0\d\d bytes, over the limit of 5,000 bytes"):
        decode(data, DecodeLimits(max_bytes=5_000))
    path = tmp_path / "big.png"
    path.write_bytes(data)
    small = SafetyChecker.load("tiny", device="cpu", dtype="float32", max_object_bytes=5_000)
    assert all(v.unscorable and v.action == "block" and "over the limit" in v.error for v in small.check([data, path]))


def test_policy_fallback_value_is_checked():
    with pytest.raises(InvalidInput, match="policy_fallback must be unset"):
        SafetyChecker.load("tiny", device="cpu", policy="stock", policy_fallback="yes")


# --- the rest of the corpus -----------------------------------------------------------------------------------------
def test_corpus_generators_are_seeded_and_small():
    assert adv.image_bytes(1) == adv.image_bytes(1) != adv.image_bytes(2)
    assert adv.truncated("GIF", seed=1) == adv.truncated("GIF", seed=1)
    bomb = adv.huge_bilevel_png()
    assert len(bomb) < 10_000 and bomb == adv.huge_bilevel_png() != adv.huge_bilevel_png(seed=1)
    deep = adv.deep_json(100_000)  # Python's own json module gives up (RecursionError) far before this
    assert deep.count("[") + deep.count("{") == 100_000 and len(deep) < 500_000
    value, depth = json.loads(adv.deep_json(100)), 0
    while isinstance(value, list | dict):
        value, depth = (value[0] if isinstance(value, list) else value["a"]), depth + 1
    assert depth == 100
