"""The API key as a file: DIFFGUARD_API_KEY_FILE (a mounted Kubernetes Secret) before DIFFGUARD_API_KEY, failing
closed. The rule itself (stripped, empty refused) is tested with the edge in test_serve_edge.py."""

from __future__ import annotations

import pytest

from pipeline.auth import ENV, FILE_ENV, api_key
from pipeline.errors import AuthConfigError


def test_the_file_content_stripped(tmp_path):
    (tmp_path / "api-key").write_text("  s3cr3t-key\n")
    assert api_key({FILE_ENV: str(tmp_path / "api-key")}) == "s3cr3t-key"


def test_the_environment_without_a_file_and_none_without_either():
    assert api_key({}) is None
    assert api_key({ENV: "k\n"}) == "k"


@pytest.mark.parametrize("content", [None, "", " \n"])
def test_a_missing_or_empty_file_fails_closed(tmp_path, content):
    path = tmp_path / "api-key"
    if content is not None:
        path.write_text(content)
    with pytest.raises(AuthConfigError, match=ENV):
        api_key({FILE_ENV: str(path)})


def test_both_set_is_ambiguous(tmp_path):
    (tmp_path / "api-key").write_text("a")
    with pytest.raises(AuthConfigError, match="both"):
        api_key({FILE_ENV: str(tmp_path / "api-key"), ENV: "b"})
