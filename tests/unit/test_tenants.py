"""Tenants in the keys file (``pipeline.keys``, issue 28 §1): each key's tenant, policy, routes and limits, the
tenants' settings, the ring's digest, the live reload that keeps the last good ring (a Kubernetes Secret volume's
``..data`` symlink swap included), the single API key as a ring and the service's start-up rule."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import pytest

from pipeline.errors import AuthConfigError
from pipeline.keys import (
    ROUTES,
    Key,
    KeyRing,
    KeysFile,
    Limits,
    TenantSettings,
    check_policies,
    load_keys,
    ring_for_single,
    service_keys,
)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


FULL = f"""
keys:
  - id: kids-app
    sha256: {digest("k1")}
    tenant: kids
    policy: strict
    routes: [generate, moderate]
    limits: {{requests_per_s: 5, burst: 10, images_per_min: 600}}
  - id: ops
    sha256: {digest("k2")}
    limits: {{requests_per_s: 2.5}}
  - id: ana
    reviewer: Ana Ruiz
    sha256: {digest("k3")}
    tenant: kids
tenants:
  kids: {{log_prompt_text: true}}
"""


def write(tmp_path: Path, text: str, name: str = "keys.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_field_of_an_entry_and_the_defaults(tmp_path: Path):
    ring = load_keys(write(tmp_path, FULL))
    kids, ops, ana = ring.keys
    assert kids == Key(
        id="kids-app",
        reviewer="kids-app",
        sha256=bytes.fromhex(digest("k1")),
        tenant="kids",
        policy="strict",
        routes=frozenset({"generate", "moderate"}),
        limits=Limits(requests_per_s=5.0, burst=10, images_per_min=600),
        log_prompt_text=True,
    )
    # Defaults: tenant = the id, the service's own policy, every route, the burst the rate rounded up, no image limit.
    assert (ops.tenant, ops.policy, ops.routes, ops.log_prompt_text) == ("ops", None, frozenset(ROUTES), False)
    assert ops.limits == Limits(requests_per_s=2.5, burst=3) and ops.limits.as_dict() == {
        "requests_per_s": 2.5,
        "burst": 3,
    }
    assert ana.limits == Limits() and ana.limits.unlimited and ana.limits.as_dict() == {} and ana.log_prompt_text
    assert ring.find("Bearer k1") is kids and ring.find("Bearer k3").reviewer == "Ana Ruiz"
    assert ring.tenant_settings("kids") == TenantSettings(log_prompt_text=True)
    assert ring.tenant_settings("ops") == TenantSettings() == TenantSettings(log_prompt_text=False)
    assert Limits(requests_per_s=0.2).burst == 1 and Limits.parse({"requests_per_s": 0.2, "burst": 4}).burst == 4
    assert Limits.parse(kids.limits.as_dict()) == kids.limits and Limits.parse(None) == Limits.parse({}) == Limits()


def test_the_review_apps_format_still_loads_with_every_default(tmp_path: Path):
    ring = load_keys(write(tmp_path, f"keys:\n  - id: ana\n    reviewer: Ana\n    sha256: {digest('k')}\n"))
    (key,) = ring.keys
    assert (key.id, key.reviewer, key.tenant, key.policy, key.routes, key.limits) == (
        "ana",
        "Ana",
        "ana",
        None,
        frozenset(ROUTES),
        Limits(),
    )
    assert KeyRing.single("k", "bob").keys[0].tenant == "bob"


@pytest.mark.parametrize(
    ("field", "named"),
    [
        ("tenant: ''", ["keys[0] (id 'a')", "`tenant`", "non-empty string", "''"]),
        ("tenant: [x]", ["`tenant`", "['x']"]),
        ("policy: ''", ["`policy`", "policy name", "''"]),
        ("policy: 3", ["`policy`", "got 3"]),
        ("routes: generate", ["`routes`", "list of generate, moderate, info", "'generate'"]),
        ("routes: []", ["`routes`", "non-empty list", "[]"]),
        ("routes: [generate, admin]", ["unknown route 'admin'", "allowed: ('generate', 'moderate', 'info')"]),
        ("limits: 5", ["`limits` must be a mapping of requests_per_s, burst, images_per_min", "got int '5'"]),
        ("limits: {rps: 5}", ["unknown limit rps", "allowed: ('requests_per_s', 'burst', 'images_per_min')"]),
        ("limits: {requests_per_s: 0}", ["`limits.requests_per_s`", "number > 0", "got 0"]),
        ("limits: {requests_per_s: -1.5}", ["`limits.requests_per_s`", "got -1.5"]),
        ("limits: {requests_per_s: .inf}", ["`limits.requests_per_s`", "got inf"]),
        ("limits: {requests_per_s: true}", ["`limits.requests_per_s`", "got True"]),
        ("limits: {requests_per_s: '5'}", ["`limits.requests_per_s`", "got '5'"]),
        ("limits: {requests_per_s: 5, burst: 0}", ["`limits.burst`", "whole number >= 1", "got 0"]),
        ("limits: {requests_per_s: 5, burst: 2.5}", ["`limits.burst`", "got 2.5"]),
        ("limits: {requests_per_s: 5, burst: true}", ["`limits.burst`", "got True"]),
        ("limits: {burst: 4}", ["`limits.burst` (4) needs `limits.requests_per_s`"]),
        ("limits: {images_per_min: 0}", ["`limits.images_per_min`", "whole number >= 1", "got 0"]),
        ("limits: {images_per_min: false}", ["`limits.images_per_min`", "got False"]),
        ("limits: {images_per_min: .nan}", ["`limits.images_per_min`", "got nan"]),
    ],
)
def test_each_fields_validation_names_the_entry_the_field_and_the_value(tmp_path: Path, field: str, named: list[str]):
    path = write(tmp_path, f"keys:\n  - id: a\n    sha256: {digest('a')}\n    {field}\n")
    with pytest.raises(AuthConfigError) as refused:
        load_keys(path)
    for part in [str(path), "keys[0] (id 'a')", *named]:
        assert part in refused.value.message, (part, refused.value.message)


@pytest.mark.parametrize(
    ("tenants", "named"),
    [
        ("tenants: [kids]", ["tenants", "mapping of tenant name to settings", "list"]),
        ("tenants: {kid: {log_prompt_text: true}}", ["tenant 'kid' is the tenant of no key", "['a', 'kids']"]),
        ("tenants: {kids: 3}", ["tenants.kids", "mapping of settings", "int"]),
        ("tenants: {kids: {log_prompt: true}}", ["tenants.kids", "unknown setting log_prompt", "('log_prompt_text',)"]),
        (
            "tenants: {kids: {log_prompt_text: 'yes please'}}",
            ["`log_prompt_text` must be true or false", "'yes please'"],
        ),
        ("tenants: {kids: {log_prompt_text: 1}}", ["`log_prompt_text`", "got 1"]),
    ],
)
def test_tenants_settings_are_validated(tmp_path: Path, tenants: str, named: list[str]):
    text = f"keys:\n  - id: a\n    sha256: {digest('a')}\n  - id: b\n    sha256: {digest('b')}\n    tenant: kids\n"
    path = write(tmp_path, text + tenants + "\n")
    with pytest.raises(AuthConfigError) as refused:
        load_keys(path)
    for part in [str(path), *named]:
        assert part in refused.value.message, (part, refused.value.message)
    ok = load_keys(write(tmp_path, text + "tenants: {kids: }\n", "ok.yaml"))  # a tenant without settings: defaults
    assert ok.tenant_settings("kids") == TenantSettings() and not ok.keys[1].log_prompt_text


def test_check_policies_names_the_key_the_policy_and_the_allowed_names(tmp_path: Path):
    ring = load_keys(write(tmp_path, FULL))
    check_policies(ring, ["strict", "lenient"])
    text = f"keys:\n  - id: a\n    sha256: {digest('a')}\n    policy: blur\n"
    check_policies(load_keys(write(tmp_path, text, "kw.yaml")), [])  # keywords need no configured name
    with pytest.raises(AuthConfigError) as refused:
        check_policies(ring, ["lenient"])
    message = refused.value.message
    for part in ["key 'kids-app'", "policy 'strict'", "lenient, default, stock, block, blur, black", "keys.yaml"]:
        assert part in message, (part, message)


def test_the_digest_follows_the_content_not_the_formatting(tmp_path: Path):
    ring = load_keys(write(tmp_path, FULL))
    assert len(ring.digest) == 64 and load_keys(write(tmp_path, FULL + "# a comment\n", "b.yaml")).digest == ring.digest
    changed = FULL.replace("images_per_min: 600", "images_per_min: 601")
    assert load_keys(write(tmp_path, changed, "c.yaml")).digest != ring.digest
    untenanted = FULL.replace("log_prompt_text: true", "log_prompt_text: false")
    assert load_keys(write(tmp_path, untenanted, "d.yaml")).digest != ring.digest


def one_key(name: str, per_min: int = 60) -> str:
    return f"keys:\n  - id: {name}\n    sha256: {digest(name)}\n    limits: {{images_per_min: {per_min}}}\n"


def test_a_keys_file_reloads_a_change_and_keeps_the_last_good_ring_on_a_bad_one(tmp_path: Path):
    path = write(tmp_path, one_key("a"))
    clock = iter(range(100, 200)).__next__
    keys = KeysFile(path, clock=clock)
    first = keys.load()
    assert (keys.ring, keys.loaded_at, keys.reloads, keys.failures, keys.error) == (first, 100, 0, 0, None)
    assert keys.poll() is None and keys.ring is first  # unchanged: nothing read into a new ring
    path.write_text(one_key("a") + "# only a comment\n")
    assert keys.poll() is None and keys.ring is first and keys.reloads == 0  # same content: no reload
    path.write_text(one_key("b"))
    assert keys.poll() is None and keys.reloads == 1 and keys.loaded_at == 101
    assert keys.find("Bearer b").id == "b" and keys.find("Bearer a") is None
    good = keys.ring
    path.write_text(one_key("c", per_min=0))
    error = keys.poll()
    assert error is not None and error == keys.error and keys.failures == 1 and keys.ring is good
    for part in [str(path), "keys[0] (id 'c')", "`limits.images_per_min`", "got 0", "still in force", good.digest[:12]]:
        assert part in error, (part, error)
    assert keys.poll() == error and keys.failures == 1  # the same bad content is one failure, still reported
    path.unlink()
    assert "cannot be read" in keys.poll() and keys.failures == 2 and keys.find("Bearer b").id == "b"
    path.write_text(one_key("b"))  # back to the content in force: the error clears, nothing reloads
    assert keys.poll() is None and keys.error is None and keys.ring is good and keys.reloads == 1
    path.write_text(one_key("d"))
    assert keys.poll() is None and keys.find("Bearer d").id == "d" and keys.reloads == 2


def test_a_reload_naming_a_policy_the_service_lacks_is_refused(tmp_path: Path):
    path = write(tmp_path, one_key("a"))
    keys = KeysFile(path, policies=["strict"])
    keys.load()
    path.write_text(one_key("a") + "    policy: lenient\n")
    assert "policy 'lenient'" in keys.poll() and keys.ring.keys[0].policy is None
    path.write_text(one_key("a") + "    policy: strict\n")
    assert keys.poll() is None and keys.ring.keys[0].policy == "strict"


def test_a_malformed_or_missing_file_at_first_load_refuses_to_start(tmp_path: Path):
    with pytest.raises(AuthConfigError, match="not valid YAML"):
        KeysFile(write(tmp_path, "keys: [\n")).load()
    with pytest.raises(AuthConfigError, match="cannot be read"):
        KeysFile(tmp_path / "missing.yaml").poll()  # a first poll is a first load
    with pytest.raises(AuthConfigError, match="policy 'strict'"):
        KeysFile(write(tmp_path, FULL, "full.yaml"), policies=[]).load()
    with pytest.raises(RuntimeError, match="load"):
        KeysFile(tmp_path / "full.yaml").find("Bearer k1")


def secret_volume(mount: Path, version: str, text: str) -> None:
    """What the kubelet does to a Secret volume: write a new timestamped folder, point a temporary symlink at it and
    rename that over ``..data`` (atomic); ``keys.yaml`` is a symlink to ``..data/keys.yaml`` and never changes."""
    folder = mount / f"..{version}"
    folder.mkdir()
    (folder / "keys.yaml").write_text(text)
    tmp = mount / "..data_tmp"
    tmp.symlink_to(folder.name)
    os.replace(tmp, mount / "..data")
    if not (mount / "keys.yaml").is_symlink():
        (mount / "keys.yaml").symlink_to("..data/keys.yaml")


def test_a_secret_volumes_symlink_swap_is_picked_up(tmp_path: Path):
    secret_volume(tmp_path, "2026_01_01_v1", one_key("a"))
    keys = KeysFile(tmp_path / "keys.yaml")
    keys.load()
    stat = (tmp_path / "keys.yaml").lstat()
    secret_volume(tmp_path, "2026_01_01_v2", one_key("b"))
    assert (tmp_path / "keys.yaml").lstat().st_mtime_ns == stat.st_mtime_ns  # the path itself did not change
    assert keys.poll() is None and keys.reloads == 1 and keys.find("Bearer b").id == "b"
    secret_volume(tmp_path, "2026_01_01_v3", "keys: []\n")
    assert "non-empty list" in keys.poll() and keys.find("Bearer b").id == "b"


def test_the_single_api_key_is_a_ring_of_one_unlimited_key():
    (key,) = ring_for_single("s3cret").keys
    assert (key.id, key.tenant, key.policy, key.routes, key.limits) == (
        "api-key",
        "default",
        None,
        frozenset(ROUTES),
        Limits(),
    )
    assert ring_for_single("s3cret").find("Bearer s3cret") is not None


def test_the_services_keys_one_source_at_most(tmp_path: Path):
    path = str(write(tmp_path, FULL))
    assert service_keys({}) is None
    keys = service_keys({"DIFFGUARD_KEYS_FILE": path}, policies=["strict"])
    assert isinstance(keys, KeysFile) and keys.find("Bearer k1").tenant == "kids"
    single = service_keys({"DIFFGUARD_API_KEY": " s3cret\n"})
    assert isinstance(single, KeyRing) and single.find("Bearer s3cret").id == "api-key"
    secret = write(tmp_path, "from-file\n", "api-key")
    assert service_keys({"DIFFGUARD_API_KEY_FILE": str(secret)}).find("Bearer from-file").tenant == "default"
    for other in ("DIFFGUARD_API_KEY", "DIFFGUARD_API_KEY_FILE"):
        with pytest.raises(AuthConfigError) as refused:
            service_keys({"DIFFGUARD_KEYS_FILE": path, other: str(secret)})
        assert "DIFFGUARD_KEYS_FILE" in refused.value.message and other in refused.value.message
    with pytest.raises(AuthConfigError, match="DIFFGUARD_KEYS_FILE is set but empty"):
        service_keys({"DIFFGUARD_KEYS_FILE": " "})
    with pytest.raises(AuthConfigError, match="policy 'strict'"):
        service_keys({"DIFFGUARD_KEYS_FILE": path}, policies=[])
    with pytest.raises(AuthConfigError, match="empty"):
        service_keys({"DIFFGUARD_API_KEY": "  "})


def test_limits_refuse_what_a_handle_call_could_carry_wrong():
    with pytest.raises(AuthConfigError, match=r"key 'x': `limits.requests_per_s` must be a number > 0, got nan"):
        Limits.parse({"requests_per_s": math.nan}, "key 'x'")
    with pytest.raises(AuthConfigError, match="unknown limit images_per_s"):
        Limits.parse({"images_per_s": 1})
