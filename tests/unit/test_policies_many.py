"""One checker pass, many policies (issue 28 §2): a mixed batch gives each object the verdict its own policy gives it
alone, yet takes one vision pass per chunk, one matmul and one forward per detector."""

from __future__ import annotations

import io

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline import policyset
from pipeline.checker import SafetyChecker
from pipeline.errors import InvalidInput
from tests.conftest import varied_images
from tests.detected import counting_forwards, nsfw_array, only_open_nsfw_row, photo

# every image is hit by a text row at threshold -1: the whole batch is blurred under it (never an action of `stock`)
LOW = {
    "version": 1,
    "name": "low",
    "nsfw_action": "allow",
    "categories": {"anything": {"action": "blur", "concepts": [{"text": "a photo"}]}},
}
LOW["categories"]["anything"]["concepts"][0]["threshold"] = -1.0


def _write(tmp_path, name: str, data: dict) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _load(policy="default", **kw) -> SafetyChecker:
    return SafetyChecker.load("tiny", device="cpu", dtype="float32", policy=policy, **kw)


def _gif(frames: int) -> bytes:
    images = [Image.fromarray(np.full((32, 32, 3), (3 * i, 0, 0), np.uint8)) for i in range(frames)]
    buf = io.BytesIO()
    images[0].save(buf, "GIF", save_all=True, append_images=images[1:], duration=100)
    return buf.getvalue()


@pytest.fixture(scope="module")
def low(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("policies"), "low", LOW)


@pytest.fixture(scope="module")
def many(low):
    return _load(policies={"low": low, "plain": "stock"})


def test_a_mixed_batch_gives_each_object_the_verdict_its_policy_gives_it_alone(many, low):
    images = varied_images(9, seed=4)
    names = [None, "low", "plain", "low", None, "blur", "plain", None, "low"]
    mixed = many.check(images, policies=names)
    alone = {None: _load(), "low": _load(low), "plain": _load("stock"), "blur": _load("blur")}
    for image, name, verdict in zip(images, names, mixed, strict=True):
        assert verdict.to_dict() == alone[name].check([image])[0].to_dict(), name
    assert [v.action for v, n in zip(mixed, names, strict=True) if n == "low"] == ["blur"] * 3
    assert all(v.action in ("allow", "flag", "block") for v, n in zip(mixed, names, strict=True) if n == "plain")
    # the same image, two policies, two decisions
    same = many.check([images[0]] * 2, policies=["low", "plain"])
    assert same[0].action == "blur" != same[1].action and same[0].categories.keys() != same[1].categories.keys()


def test_without_policies_nothing_changes(many):
    images = varied_images(6, seed=5)
    own = _load().check(images)
    assert [v.to_dict() for v in many.check(images)] == [v.to_dict() for v in own]
    assert [v.to_dict() for v in many.check(images, policies=[None] * 6)] == [v.to_dict() for v in own]


def test_one_vision_pass_per_chunk_and_one_matmul_for_a_mixed_batch(low, monkeypatch):
    checker = _load(policies={"low": low}, max_batch_size=4)
    passes = []
    hook = checker.vision.register_forward_hook(lambda module, args, out: passes.append(1))
    matmuls = []
    original = policyset.cosines
    monkeypatch.setattr(policyset, "cosines", lambda e, r: matmuls.append(tuple(r.shape)) or original(e, r))
    try:
        verdicts = checker.check(varied_images(10, seed=6), policies=["low", None, "stock"] * 3 + [None])
    finally:
        hook.remove()
    views = sum(v.views for v in verdicts)  # varied images: some have several views (alpha, long pictures)
    assert views > 10 and len(passes) == -(-views // 4)  # one pass per chunk of 4 views, whatever the policies
    own, low_rows, stock = (checker.concepts_for(n).embeds.shape[0] for n in (None, "low", "stock"))
    assert matmuls == [(own + low_rows + stock, checker.concepts.embeds.shape[1])]  # every policy's rows at once
    assert [v.action for v in verdicts[0:9:3]] == ["blur"] * 3


def test_the_detectors_union_is_scored_once_and_each_policy_reads_its_own(tmp_path):
    strict = _write(tmp_path, "strict", only_open_nsfw_row())
    lenient = only_open_nsfw_row()
    lenient["categories"]["sexual"]["concepts"][0]["threshold"] = 0.999  # the same detector, read differently
    checker = _load("stock", policies={"strict": strict, "lenient": _write(tmp_path, "lenient", lenient)})
    images = [photo("coffee"), nsfw_array(), nsfw_array(), photo("rocket"), nsfw_array()]
    names = ["strict", "strict", "lenient", None, None]
    with counting_forwards(checker.detectors) as calls:
        mixed = checker.check(images, policies=names)
    assert calls == [3]  # one forward, on the views of the policies that read it (not the stock policy's)
    assert mixed[1].action == "block" and mixed[1].detector_scores["open_nsfw"]["nsfw"] > 0.95
    assert mixed[2].action == "allow" and mixed[2].categories["sexual"] < 0  # 0.95 < 0.999: not flagged
    assert mixed[4].detector_scores == {} and mixed[4].real == [] and mixed[1].real == ["open_nsfw"]
    alone = {"strict": _load(strict), "lenient": _load(_write(tmp_path, "lenient", lenient)), None: _load("stock")}
    for image, name, verdict in zip(images, names, mixed, strict=True):
        assert verdict.to_dict() == alone[name].check([image])[0].to_dict(), name


def test_an_unknown_name_is_refused_with_the_allowed_names(many):
    with pytest.raises(InvalidInput) as err:
        many.check(varied_images(2, seed=1), policies=[None, "tenant-x"])
    message = str(err.value)
    assert "'tenant-x'" in message
    for allowed in ("low", "plain", "default", "stock", "block", "blur", "black"):
        assert allowed in message
    with pytest.raises(InvalidInput, match="'tenant-x' is not configured"):
        many.fingerprint_for("tenant-x")
    with pytest.raises(InvalidInput, match="2 names for 1 objects"):
        many.check(varied_images(1, seed=1), policies=[None, None])


def test_keywords_resolve_on_first_use_and_are_cached_until_configure(low):
    checker = _load(policies={"low": low})
    built = []
    original = checker._add_policy
    checker._add_policy = lambda concepts, policy: built.append(policy.name) or original(concepts, policy)
    assert checker.fingerprint_for("blur") == _load("blur").fingerprint
    checker.check(varied_images(2, seed=2), policies=["blur", "blur"])
    assert built == ["diffguard-default+blur"]  # built once, on first use
    rows = checker.concepts_for("blur")
    checker.configure(policies={"low": low})
    assert checker.concepts_for("blur") is not rows and built[-1] == "diffguard-default+blur"  # rebuilt afresh


def test_configure_is_atomic(low, tmp_path):
    checker = _load(policies={"low": low})
    before = (checker.fingerprint, checker.fingerprint_for("low"), checker.policies.names)
    with pytest.raises(InvalidInput, match="neither a file nor one of"):
        checker.configure(policy="stock", policies={"low": low, "bad": str(tmp_path / "missing.yaml")})
    assert (checker.fingerprint, checker.fingerprint_for("low"), checker.policies.names) == before
    with pytest.raises(InvalidInput, match="policy name must be a non-empty string"):
        checker.configure(policies={"": "stock"})
    checker.configure(policy="stock")  # no named policies any more
    assert checker.policies.names == [] and checker.fingerprint == _load("stock").fingerprint
    with pytest.raises(InvalidInput, match="'low' is not configured"):
        checker.concepts_for("low")


def test_each_object_is_decoded_with_its_policys_view_budget(tmp_path):
    two = _write(tmp_path, "two", {**LOW, "max_views": 2})
    withheld = _write(tmp_path, "withheld", {**LOW, "max_views": 3, "over_view_budget": "unscorable"})
    checker = _load("stock", policies={"two": two, "withheld": withheld})
    gif = _gif(8)
    viewed = checker.views([gif, gif, gif], policies=[None, "two", "withheld"])
    assert [len(v.views) for v in viewed] == [8, 2, 3] and [v.sampled for v in viewed] == [False, True, True]
    own, sampled, refused = checker.score_views(viewed, policies=[None, "two", "withheld"])
    assert (own.views, sampled.views, sampled.views_total, sampled.views_sampled) == (8, 2, 8, True)
    assert sampled.action == "blur" and refused.unscorable and "over max_views=3" in refused.error
    assert sampled.to_dict() == _load(two).check([gif])[0].to_dict()


def test_fingerprint_parts_and_info_follow_the_policy(many, low):
    assert many.fingerprint_for(None) == many.fingerprint == _load().fingerprint
    assert many.fingerprint_for("low") == _load(low).fingerprint
    assert len({many.fingerprint, many.fingerprint_for("low"), many.fingerprint_for("plain")}) == 3
    assert many.fingerprint_for("plain") == many.fingerprint_for("stock") == _load("stock").fingerprint
    assert many.parts_for("plain") == {"demo": ["stock checker"], "real": []}
    assert many.parts_for("low") == {"demo": ["stock checker", "text concepts"], "real": []}
    info = many.info("low")
    assert info["fingerprint"] == many.fingerprint_for("low") and info["policy"]["categories"] == {"anything": "blur"}
    assert many.info()["fingerprint"] == many.fingerprint and many.info()["policies"] == ["low", "plain"]
    with pytest.raises(InvalidInput, match="'nope' is not configured"):
        many.info("nope")


def test_the_replica_scores_a_batch_of_tenants_and_policies_at_once():
    """The Serve adapter's decode and score steps (what its ``@serve.batch`` runs) on one mixed batch."""
    from deployments.checker import Item, SafetyCheckerDeployment

    replica = SafetyCheckerDeployment.func_or_class({"model": "tiny", "device": "cpu", "dtype": "float32"})
    replica.reconfigure({"policy": "default", "policies": {"plain": "stock"}})
    image = varied_images(1, seed=7)[0]
    items = [Item(image), Item(image, "plain", "t1"), Item(image, "nope", "t2"), Item(image, "blur")]
    objects, unknown = replica._decode(items)
    own, plain, bad, blur = replica._score_sync(items, objects, unknown)
    assert bad == {"unavailable": "policy 'nope' is not configured; allowed: plain, default, stock, block, blur, black"}
    assert set(own) == {"verdict", "batch_size", "fingerprint", "checker", "policy"} and own["batch_size"] == 4
    core = replica.checker
    for result, name in ((own, None), (plain, "plain"), (blur, "blur")):
        assert result["policy"] == name and result["fingerprint"] == core.fingerprint_for(name)
        assert result["checker"] == {"model": "tiny", "demo_weights": True, "fingerprint": result["fingerprint"]} | (
            core.parts_for(name)
        )
        assert result["verdict"].to_dict() == core.check([image], policies=[name])[0].to_dict()
    assert replica.info("plain")["fingerprint"] == core.fingerprint_for("plain") != replica.info()["fingerprint"]
    with pytest.raises(InvalidInput, match="'nope' is not configured"):
        replica.info("nope")
