"""The typed API and the page at `/`, on a real local Ray Serve app: the OpenAPI document, schemathesis against it,
the README's curl examples, and the page driven by Debian's Chromium through Playwright.

The app's generator and checker are scripted (tests/integration/page_support.py) so a generation shows every action;
uploads are scored by the real tiny checker. The README's screenshots come from a real `diffguard serve` instead
(`make screenshots`, tools/screenshots.py).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.adversarial import image_bytes
from tests.conftest import ROOT
from tests.detected import nsfw_png
from tests.integration.browser import new_page
from tests.integration.conftest import free_port
from tests.integration.test_serve import apply, photo_png

pytestmark = pytest.mark.slow  # deselected by `make test-fast`

KEY = "page-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
CORRUPT = b"\x89PNG\r\n\x1a\n" + b"\0" * 24  # a PNG signature, then a corrupt header


def _app(name: str, prefix: str, key: str | None, env: dict | None = None) -> dict:
    ingress = {"name": "Ingress", "ray_actor_options": {"num_cpus": 0.05}}
    if key is not None or env:
        env = env or {"DIFFGUARD_API_KEY": key}
        ingress["ray_actor_options"]["runtime_env"] = {"env_vars": env}
    return {
        "name": name,
        "route_prefix": prefix,
        "import_path": "deployments.app:build_app",
        "args": {
            "checker": {"factory": "tests.integration.page_support:ScriptedChecker"},
            "generator": {"factory": "tests.integration.page_support:ScriptedGenerator"},
            "ingress": {"max_body_bytes": 2_000_000},
        },
        "deployments": [
            ingress,
            {"name": "Generator", "ray_actor_options": {"num_cpus": 0.05}},
            {
                "name": "SafetyChecker",
                "ray_actor_options": {"num_cpus": 0.2},
                "autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
            },
        ],
    }


TENANT_KEY = "kids-page-key"


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory):
    import hashlib

    import yaml
    from ray import serve

    keys = tmp_path_factory.mktemp("page-keys") / "keys.yaml"
    digest = hashlib.sha256(TENANT_KEY.encode()).hexdigest()
    keys.write_text(yaml.safe_dump({"keys": [{"id": "kids-app", "sha256": digest, "tenant": "kids"}]}))
    port = free_port()
    tenants = _app("tenants", "/tenants", None, {"DIFFGUARD_KEYS_FILE": str(keys)})
    raw = {
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [_app("page", "/", KEY), _app("open", "/open", None), tenants],
    }
    apply(raw)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def openapi(service) -> dict:
    r = httpx.get(f"{service}/openapi.json", timeout=60)
    assert r.status_code == 200
    return r.json()


# --- the OpenAPI document ---------------------------------------------------------------------------------------------
def test_openapi_documents_every_body_and_response(openapi):
    paths, schemas = openapi["paths"], openapi["components"]["schemas"]
    generate, moderate = paths["/v1/generate"]["post"], paths["/v1/moderate"]["post"]
    assert generate["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/GenerateRequest")
    body = schemas["GenerateRequest"]
    assert body["required"] == ["prompt"] and body["additionalProperties"] is False
    assert body["properties"]["num_images"]["maximum"] == 4 and body["properties"]["steps"]["maximum"] == 150
    width = next(b for b in body["properties"]["width"]["anyOf"] if b.get("type") == "integer")
    assert (width["minimum"], width["maximum"], width["multipleOf"]) == (64, 1024, 8)
    assert body["properties"]["prompt"]["maxLength"] == 2000
    content = moderate["requestBody"]["content"]
    assert set(content) == {"multipart/form-data", "image/*", "application/octet-stream"}
    multipart = schemas[content["multipart/form-data"]["schema"]["$ref"].rpartition("/")[2]]
    assert multipart["required"] == ["files"] and multipart["properties"]["files"]["maxItems"] == 64
    assert multipart["properties"]["files"]["items"]["type"] == "string"  # binary: format or contentMediaType
    expected = {
        ("/v1/generate", "post"): {"200", "400", "401", "403", "408", "413", "415", "422", "429", "503"},
        ("/v1/moderate", "post"): {"200", "400", "401", "403", "408", "413", "415", "422", "429", "503"},
        ("/v1/info", "get"): {"200", "400", "401", "403", "503"},
        ("/healthz", "get"): {"200", "503"},
    }
    for (path, method), statuses in expected.items():
        responses = paths[path][method]["responses"]
        assert set(responses) == statuses, (path, set(responses))
        for status, response in responses.items():
            ref = response["content"]["application/json"]["schema"]["$ref"]
            if status != "200" and path != "/healthz":
                assert ref.endswith("/ErrorResponse"), (path, status)
        for status in ("429", "503"):
            if status in statuses and path != "/healthz":
                assert "Retry-After" in responses[status]["headers"], (path, status)
    for name in ("GenerateResponse", "ModerateResponse", "ModerationResult", "HealthResponse", "InfoResponse"):
        assert name in schemas
    assert "HTTPValidationError" not in schemas  # validation errors use the one error shape
    assert openapi["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_validation_errors_name_field_value_and_range(service):
    r = httpx.post(f"{service}/v1/generate", json={"prompt": "a", "steps": "many"}, headers=AUTH, timeout=60)
    assert r.status_code == 422 and set(r.json()) == {"error", "request_id"}
    assert "`steps`" in r.json()["error"] and "'many'" in r.json()["error"] and "1..150" in r.json()["error"]
    r = httpx.post(f"{service}/v1/generate", json={"prompt": "a", "num_images": 9}, headers=AUTH, timeout=60)
    assert r.status_code == 422 and "`num_images` must be within 1..4, got 9" in r.json()["error"]
    r = httpx.post(f"{service}/v1/generate", json={"prompt": "a", "colour": 1}, headers=AUTH, timeout=60)
    assert r.status_code == 422 and "`colour` is not a known field" in r.json()["error"]
    r = httpx.post(f"{service}/v1/generate", content=b"{nope", headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.json()["error"]
    r = httpx.post(f"{service}/v1/generate", content=b'{"prompt": "a", "steps": "many"}', headers=AUTH)  # no type
    assert r.status_code == 415 and "no Content-Type header" in r.json()["error"]
    r = httpx.post(f"{service}/v1/generate", content=b'{"prompt": "a"}', headers={**AUTH, "Content-Type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]
    r = httpx.get(f"{service}/v1/nothing", headers=AUTH)
    assert r.status_code == 404 and set(r.json()) == {"error", "request_id"}


def test_generate_returns_every_action_and_no_blocked_pixels(service):
    r = httpx.post(f"{service}/v1/generate", json={"prompt": "a", "num_images": 4, "seed": 5}, headers=AUTH)
    assert r.status_code == 200, r.text
    images = r.json()["images"]
    assert [i["action"] for i in images] == ["allow", "flag", "blur", "block"]
    assert [i["image_png_base64"] is None for i in images] == [False, False, False, True]
    assert images[1]["flagged_categories"] and images[1]["moderation"]["batch_size"] >= 1


# --- the README's curl examples, unchanged --------------------------------------------------------------------------
def _readme_curls() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("## A taste", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [c for c in block.replace("\\\n", " ").splitlines() if c.strip().startswith("curl")]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_curl_examples_work_unchanged(service):
    commands = _readme_curls()
    assert len(commands) == 5
    base = service.removeprefix("http://") + "/open"  # the keyless app: the README's curls send no key
    for command in commands:
        args = shlex.split(command.replace("localhost:8000", base))
        out = subprocess.run([*args, "-w", "\n%{http_code}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        body, _, status = out.stdout.rpartition("\n")
        assert status == "200", (command, out.stdout[-500:], out.stderr[-500:])
        assert body.startswith("{"), command


# --- schemathesis against the live /openapi.json ----------------------------------------------------------------------
def test_schemathesis_finds_no_server_error_and_no_schema_violation(service, openapi, tmp_path):
    """No 5xx other than a documented 503; every response conforms to its declared status, headers and schema."""
    pytest.importorskip("schemathesis")
    checks = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
    cmd = [
        str(Path(sys.executable).parent / "schemathesis"),
        "run",
        f"{service}/openapi.json",
        f"--checks={checks},response_headers_conformance",
        f"--header=Authorization: Bearer {KEY}",
        "--max-examples=10",  # per operation and phase; the schema's own bounds keep bodies small
        "--max-time=40",  # the whole run's budget, coverage and fuzzing phases together
        "--mode=all",
        "--request-timeout=60",
        "--workers=1",
        "--seed=1",
        "--suppress-health-check=all",
        "--no-color",
    ]
    if not Path(cmd[0]).exists():
        cmd[0] = shutil.which("schemathesis") or pytest.skip("the schemathesis command is not installed")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert re.search(r"Tested:\s+4\b", out.stdout), out.stdout[-3000:]  # every operation was exercised


# --- the page in Chromium ---------------------------------------------------------------------------------------------
@pytest.fixture
def page(browser, service):
    context, page = new_page(browser)  # nothing but the service: the page and /docs must be self-contained
    yield page
    context.close()


def _enter_key(page, key: str) -> None:
    page.wait_for_selector("#key-form:not([hidden])")  # shown by the script once /v1/info answered 401
    page.fill("#api-key", key)
    page.press("#api-key", "Enter")


def _errors_but_the_first_401(page) -> list[str]:
    """Console errors, less the browser's own line for the /v1/info refused before the key was entered."""
    errors = list(page.console_errors)
    first = next((e for e in errors if "status of 401" in e), None)
    if first is not None:
        errors.remove(first)
    return errors


def test_page_loads_without_console_errors(page, service):
    """The keyless app under its route prefix: no key field, the demo warning, not one console error."""
    page.goto(f"{service}/open/")
    page.wait_for_selector("#demo-warning:not([hidden])")
    banner = " ".join(page.text_content("#demo-warning").split())
    assert banner == (
        "Demo weights: stock checker, text concepts, generator — their scores are meaningless. Real: open_nsfw."
    )
    assert page.is_hidden("#key-form") and page.is_hidden("#message")
    icon = page.get_attribute("link[rel=icon]", "href")  # a served icon: the console has no 404 for /favicon.ico
    served = httpx.get(f"{service}/open/{icon}", timeout=60)
    assert served.status_code == 200 and served.headers["content-type"].startswith("image/svg+xml")
    page.click("#generate-button")
    page.wait_for_selector("#generate-results .card >> nth=1")
    assert page.console_errors == []


def test_page_asks_for_the_key_when_the_service_requires_one(page, service):
    page.goto(f"{service}/")
    page.wait_for_selector("#key-form:not([hidden])")
    assert "401" in page.text_content("#message") and "Bearer" in page.text_content("#message")
    _enter_key(page, KEY)
    page.wait_for_selector("#demo-warning:not([hidden])")
    assert page.is_hidden("#message")
    assert page.evaluate("sessionStorage.getItem('diffguard.apiKey')") == KEY
    assert _errors_but_the_first_401(page) == []


def test_the_page_shows_the_tenant_and_policy_of_its_key(page, service):
    """A keys file's key: the banner names its tenant and the policy it is moderated with; the single key's is the
    default tenant's."""
    page.goto(f"{service}/tenants/")
    _enter_key(page, TENANT_KEY)
    page.wait_for_selector("#caller:not([hidden])")
    assert page.text_content("#caller-tenant") == "kids"
    assert page.text_content("#caller-policy") == "the service's own"
    assert "(key kids-app)" in page.text_content("#caller")
    page.goto(f"{service}/")
    _enter_key(page, KEY)
    page.wait_for_selector("#caller:not([hidden])")
    page.wait_for_function("document.querySelector('#caller-tenant').textContent === 'default'")


def test_wrong_key_shows_the_401_message(page, service):
    page.goto(f"{service}/")
    _enter_key(page, "not-the-key")
    page.wait_for_function("document.querySelector('#message').textContent.includes('401')")
    text = page.text_content("#message")
    assert "401: missing or wrong API key: send `Authorization: Bearer <key>`" in text


def test_generation_shows_images_verdicts_and_never_blocked_pixels(page, service):
    page.goto(f"{service}/")
    _enter_key(page, KEY)
    page.wait_for_selector("#demo-warning:not([hidden])")
    page.fill("#num_images", "4")
    page.fill("#seed", "42")
    page.click("#generate-button")
    page.wait_for_selector("#generate-results .card >> nth=3")
    cards = page.query_selector_all("#generate-results .card")
    assert [c.get_attribute("data-action") for c in cards] == ["allow", "flag", "blur", "block"]
    for c in cards[:3]:
        src = c.query_selector("img").get_attribute("src")
        assert src.startswith("data:image/png;base64,")
    blocked = cards[3]
    assert blocked.query_selector("img") is None  # no <img>, no data: the pixels never reach the DOM
    assert "data:image" not in blocked.inner_html()
    assert blocked.query_selector(".placeholder").inner_text() == "Blocked by the policy: not shown"
    assert cards[1].query_selector(".chip") is not None and cards[1].query_selector(".bar.hit") is not None
    assert "seed 42" in page.text_content("#generate-summary")
    assert _errors_but_the_first_401(page) == []


def test_upload_of_a_good_and_a_corrupt_file_shows_both_cards(page, service, tmp_path):
    good, bad = tmp_path / "good.png", tmp_path / "corrupt<img src=x onerror=alert(1)>.png"
    good.write_bytes(image_bytes(1))
    bad.write_bytes(CORRUPT)
    page.goto(f"{service}/")
    _enter_key(page, KEY)
    page.wait_for_selector("#demo-warning:not([hidden])")
    page.keyboard.press("Tab")  # keyboard: reach the tabs, then switch with an arrow key
    page.focus("#tab-generate")
    page.keyboard.press("ArrowRight")
    assert page.is_visible("#view-moderate") and page.is_hidden("#view-generate")
    drop = " ".join(page.inner_text("#drop").split())
    assert drop == "Drop images here, or click (or press Enter / Space) to pick files"
    page.set_input_files("#files", [str(good), str(bad)])
    page.wait_for_selector("#moderate-results .card >> nth=1")
    cards = page.query_selector_all("#moderate-results .card")
    assert cards[0].query_selector("h3").inner_text().startswith("good.png")
    corrupt = cards[1]
    assert corrupt.query_selector("h3 span").inner_text().strip() == bad.name  # shown as text, never parsed as HTML
    assert corrupt.get_attribute("data-action") == "block" and corrupt.query_selector("img") is None
    assert corrupt.query_selector(".error-text").inner_text()
    assert corrupt.query_selector(".placeholder").inner_text() == "Unscorable: not shown"  # the blocked card's style
    summary = page.text_content("#moderate-summary")
    assert re.fullmatch(r"2 file\(s\) · checker fingerprint [0-9a-f]+ · request \S+", summary), summary
    assert page.query_selector("#moderate-results img[src='x']") is None
    assert _errors_but_the_first_401(page) == []


def test_cards_show_detector_probabilities_beside_the_concept_scores(page, service, tmp_path):
    """Uploads scored by the tiny checker and the real open_nsfw: each card shows the detector's probability."""
    detected, photo = tmp_path / "detected.png", tmp_path / "astronaut.png"
    detected.write_bytes(nsfw_png())
    photo.write_bytes(photo_png())
    page.goto(f"{service}/open/")
    page.wait_for_selector("#demo-warning:not([hidden])")
    assert page.text_content("#real-note") == " Real: open_nsfw."
    page.click("#tab-moderate")
    page.set_input_files("#files", [str(detected), str(photo)])
    page.wait_for_selector("#moderate-results .card >> nth=1")
    cards = page.query_selector_all("#moderate-results .card")
    rows = []
    for c in cards:
        (name,) = [n.inner_text() for n in c.query_selector_all(".detectors .name")]
        (value,) = [float(v.inner_text()) for v in c.query_selector_all(".detectors .value")]
        assert c.query_selector(".detectors [role=list]").get_attribute("aria-label") == "detector scores"
        assert c.query_selector("details .scores") is not None  # the concept scores are still there
        rows.append((name, value))
    assert rows[0][0] == rows[1][0] == "open_nsfw: nsfw"  # real weights: no "(demo)"
    assert rows[0][1] > 0.95 and rows[1][1] < 0.2
    assert (
        cards[0].get_attribute("data-action") == "block" and "sexual" in cards[0].query_selector(".chips").inner_text()
    )
    assert page.console_errors == []


def test_an_animation_says_how_many_views_were_scored_and_which_decided(page, service, tmp_path):
    from tests.hidden import CASES

    gif = tmp_path / "anim.gif"
    gif.write_bytes(CASES["animated-gif"]().data)
    page.goto(f"{service}/")
    _enter_key(page, KEY)
    page.click("#tab-moderate")
    page.set_input_files("#files", [str(gif)])
    text = page.wait_for_selector("#moderate-results .card .view").inner_text()
    assert text.startswith("2 views scored; deciding view: frame "), text


def test_phone_width_has_no_horizontal_scroll(browser, service):
    context, page = new_page(browser, viewport={"width": 375, "height": 740}, is_mobile=True)
    page.goto(f"{service}/")
    page.wait_for_selector("#key-form:not([hidden])")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    context.close()


def test_docs_list_the_operations_with_no_network(page, service):
    page.goto(f"{service}/docs")
    page.wait_for_selector(".opblock-summary-path", timeout=60_000)
    listed = {e.inner_text().replace("\u200b", "") for e in page.query_selector_all(".opblock-summary-path")}
    assert {"/v1/generate", "/v1/moderate", "/v1/info", "/healthz"} <= listed
    assert page.console_errors == []
