"""The keys file (``pipeline.keys``: each key by its SHA-256, naming its reviewer) and the review edge's Host rule and
start-up auth rule, in process: every malformed file refused naming the file, the entry and the field."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pipeline.errors import AuthConfigError
from pipeline.keys import KeyRing, load_keys
from pipeline.review.edge import EdgeRules, edge_rules, host_name
from pipeline.review.server import review_auth


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def test_a_keys_file_finds_each_key_and_its_reviewer(tmp_path: Path):
    path = tmp_path / "keys.yaml"
    path.write_text(
        f"keys:\n  - id: ana\n    sha256: {digest('k1')}\n    tenant: t\n    policy: strict.yaml\n"
        f"  - id: bob\n    reviewer: ' Bob Stone '\n    sha256: '{digest('k2').upper()}'\n"
    )
    ring = load_keys(path)
    assert [(k.id, k.reviewer) for k in ring.keys] == [("ana", "ana"), ("bob", "Bob Stone")]
    assert ring.find("Bearer k1").reviewer == "ana" and ring.find("bearer  k2 ").reviewer == "Bob Stone"
    for header in (None, "", "Bearer", "Bearer ", "Basic k1", "k1", "Bearer k3", f"Bearer {digest('k1')}"):
        assert ring.find(header) is None, header


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("", ["non-empty list `keys:`", "an empty file"]),
        ("keys: []\n", ["non-empty list `keys:`"]),
        ("keys: [\n", ["not valid YAML"]),
        ("keys:\n  - just-a-string\n", ["keys[0]", "mapping"]),
        (f"keys:\n  - sha256: {digest('a')}\n", ["keys[0]", "`id`", "None"]),
        ("keys:\n  - id: ana\n", ["keys[0]", "(id 'ana')", "`sha256`", "None"]),
        ("keys:\n  - id: ana\n    sha256: abc\n", ["keys[0]", "`sha256`", "64 hex digits", "'abc'"]),
        (f"keys:\n  - id: ana\n    sha256: {'1' * 64}\n", ["keys[0]", "`sha256`", "number", "quotes"]),
        (f"keys:\n  - id: ana\n    reviewer: ''\n    sha256: {digest('a')}\n", ["keys[0]", "`reviewer`"]),
        (
            f"keys:\n  - id: ana\n    sha256: {digest('a')}\n  - id: ana\n    sha256: {digest('b')}\n",
            ["keys[1]", "`id` 'ana'", "unique"],
        ),
        (
            f"keys:\n  - id: ana\n    sha256: {digest('a')}\n  - id: bob\n    sha256: {digest('a')}\n",
            ["keys[1]", "(id 'bob')", "`sha256`", "earlier entry"],
        ),
    ],
)
def test_a_malformed_keys_file_is_refused_naming_the_entry_and_field(tmp_path: Path, text: str, named: list[str]):
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    with pytest.raises(AuthConfigError) as refused:
        load_keys(path)
    for part in [str(path), *named]:
        assert part in refused.value.message, (part, refused.value.message)


def test_an_unreadable_keys_file_is_refused(tmp_path: Path):
    with pytest.raises(AuthConfigError, match="cannot be read"):
        load_keys(tmp_path / "missing.yaml")


def test_hosts_loopback_names_any_port_and_the_configured_ones():
    rules = EdgeRules.build(KeyRing.single("k", "ana"), ["0.0.0.0", "review.internal", "::"])
    assert (
        host_name("[::1]:8300") == "[::1]" and host_name("::1") == "[::1]" and host_name("LocalHost:80") == "localhost"
    )
    allowed = ["127.0.0.1", "127.0.0.1:8300", "localhost", "LOCALHOST:1", "[::1]", "[::1]:8300", "127.0.0.2:9"]
    allowed += ["review.internal:443", "0.0.0.0:8300", "[::]"]
    for host in allowed:
        assert rules.host_allowed(host), host
    for host in ("", "evil.example", "evil.example:8300", "localhost.evil.example", "127.0.0.1.nip.io", "localhost:x"):
        assert not rules.host_allowed(host), host


def test_start_up_auth_rules(tmp_path: Path):
    path = tmp_path / "keys.yaml"
    path.write_text(f"keys:\n  - id: ana\n    sha256: {digest('k')}\n")
    assert review_auth("127.0.0.1", environ={}) == (None, None)
    key, keys = review_auth("0.0.0.0", environ={"DIFFGUARD_KEYS_FILE": str(path)})
    assert key is None and keys.find("Bearer k").reviewer == "ana"
    with pytest.raises(AuthConfigError, match="DIFFGUARD_API_KEY"):
        review_auth("127.0.0.1", str(path), environ={"DIFFGUARD_API_KEY": "x"})
    with pytest.raises(AuthConfigError, match="empty"):
        review_auth("127.0.0.1", environ={"DIFFGUARD_KEYS_FILE": " "})
    with pytest.raises(AuthConfigError, match="not loopback"):
        review_auth("0.0.0.0", environ={})
    rules, token = edge_rules(None, None, "ana", ["127.0.0.1"])  # no key: a fresh token, the reviewer's
    assert token and rules.keys.find(f"Bearer {token}").reviewer == "ana"
    assert edge_rules(None, None, "ana")[1] != token
    rules, token = edge_rules("s3cret", None, "bob")
    assert token is None and rules.keys.find("Bearer s3cret").reviewer == "bob"
