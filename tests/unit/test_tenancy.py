"""The Ingress's callers (deployments/tenancy.py): keys polled from the file in a thread, a bad change kept out and
reported to the metric hook, routes per key, and what /v1/info tells a caller about itself."""

from __future__ import annotations

import hashlib
import os
import time

import pytest
import yaml

from deployments.tenancy import ANONYMOUS, Callers, caller_info, check_start, route_refusal
from pipeline.errors import AuthConfigError


def _write(path, entries) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"keys": entries}))
    os.replace(tmp, path)


def _entry(key: str, **fields) -> dict:
    return {"id": f"{key}-app", "sha256": hashlib.sha256(key.encode()).hexdigest(), **fields}


def _until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_the_poller_swaps_in_a_good_change_and_keeps_the_last_good_on_a_bad_one(tmp_path):
    path = tmp_path / "keys.yaml"
    _write(path, [_entry("a", tenant="kids", policy="block", routes=["moderate"], limits={"requests_per_s": 2})])
    reports: list[str | None] = []
    callers = Callers.from_environ({"DIFFGUARD_KEYS_FILE": str(path)}, poll_s=0.02, on_reload=reports.append)
    callers.start()
    try:
        a = callers.find("Bearer a")
        assert (a.tenant, a.policy, callers.kind, callers.required) == ("kids", "block", "keys_file", True)
        assert callers.find("Bearer b") is None and callers.find(None) is None
        _write(path, [_entry("b")])
        _until(lambda: reports == [None])  # the hook hears of a reload after the swap
        assert callers.find("Bearer b") is not None and callers.find("Bearer a") is None
        broken = path.with_suffix(".tmp")  # replaced whole, as a Secret volume swaps: never seen half-written
        broken.write_text("keys: [ {id: broken")
        os.replace(broken, path)  # a malformed change: the last good ring stays, the hook hears why
        _until(lambda: any(r is not None for r in reports))
        assert callers.find("Bearer b") is not None
        assert "keys file" in next(r for r in reports if r is not None)
        time.sleep(0.3)  # fifteen more polls of the same bad content: said (and counted) once
        assert sum(r is not None for r in reports) == 1
    finally:
        callers.stop()


def test_routes_info_and_the_keyless_caller():
    callers = Callers.single("s3cret")
    key = callers.find("Bearer s3cret")
    assert (key.id, key.tenant, key.policy, callers.kind) == ("api-key", "default", None, "api_key")
    assert route_refusal(key, "/v1/generate") is None
    assert caller_info(key) == {
        "key_id": "api-key",
        "tenant": "default",
        "policy": None,
        "routes": ["generate", "moderate"],
        "limits": None,
    }
    keyless = Callers.single(None)
    assert keyless.find(None) is ANONYMOUS and not keyless.required and keyless.kind == "none"
    with pytest.raises(AuthConfigError, match="not loopback"):
        check_start(keyless, "0.0.0.0", allow_unauthenticated=False)
    check_start(keyless, "127.0.0.1", allow_unauthenticated=False)


def test_a_route_outside_a_keys_routes_is_refused_naming_them(tmp_path):
    path = tmp_path / "keys.yaml"
    _write(path, [_entry("m", routes=["moderate"], limits={"images_per_min": 3})])
    moderator = Callers.from_environ({"DIFFGUARD_KEYS_FILE": str(path)}).find("Bearer m")
    assert route_refusal(moderator, "/v1/generate") == "key 'm-app' may not call /v1/generate (its routes: moderate)"
    assert route_refusal(moderator, "/v1/moderate") is None and route_refusal(moderator, "/v1/info") is None
    assert caller_info(moderator)["limits"] == {"images_per_min": 3}


def test_the_review_app_reads_only_its_fields_and_routes_may_be_paths(tmp_path):
    """The review app (service=False) ignores the service's fields, right or wrong (the service checks them); the
    service takes a route by its name or its path."""
    from pipeline.keys import load_keys

    path = tmp_path / "keys.yaml"
    _write(path, [_entry("a", routes=["/v1/moderate"]), _entry("b", reviewer="Bob", limits={"rps": 5})])
    assert load_keys(path, service=False).find("Bearer b").reviewer == "Bob"
    with pytest.raises(AuthConfigError, match=r"keys\[1\].*unknown limit rps"):
        load_keys(path)
    _write(path, [_entry("a", routes=["/v1/moderate"])])
    assert load_keys(path).find("Bearer a").routes == frozenset({"moderate"})
