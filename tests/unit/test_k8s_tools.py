"""The tools under k8s/: the serveConfigV2 sync and the model-cache init container (rendering is kubectl's).

The manifests themselves are tested in test_k8s.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from k8s import model_cache, sync

K8S = Path(__file__).resolve().parents[2] / "k8s"


# --- rendering: kubectl kustomize, not a copy of it ---
def test_overlays_are_rendered_by_kubectl_kustomize_only():
    assert not (K8S / "kustomize.py").exists()
    makefile = (K8S.parent / "Makefile").read_text()
    recipe = makefile[makefile.index("\nk8s:") : makefile.index("\n\n", makefile.index("\nk8s:"))]
    assert "kubectl kustomize k8s/overlays/$$o" in recipe, recipe


def test_sync_merge_patch_is_rfc7386():
    target = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    assert sync.merge_patch(target, {"a": {"b": None, "c": [9]}, "e": {"f": 1}}) == {
        "a": {"c": [9]},
        "d": 1,
        "e": {"f": 1},
    }
    assert target == {"a": {"b": 1, "c": [1, 2]}, "d": 1}  # not modified


# --- serveConfigV2 sync ---
def test_sync_replaces_only_the_serve_config_block():
    text = "a: 1\nspec:\n  serveConfigV2: |\n    old: 1\n\n    more: 2\n  after: 3\n\nb: 2\n"
    doc = yaml.safe_load(sync.replace_block(text, "# c\nx:\n  y: [1, 2]\n\nz: 3\n"))
    assert doc["spec"]["serveConfigV2"] == "# c\nx:\n  y: [1, 2]\n\nz: 3\n"
    assert doc["spec"]["after"] == 3 and doc["a"] == 1 and doc["b"] == 2
    with pytest.raises(ValueError, match="exactly one"):
        sync.replace_block("a: 1\n", "x: 1\n")


# --- the model-cache init container ---
def test_model_cache_picks_one_weight_format():
    both = model_cache.transformers_patterns(["config.json", "model.safetensors", "pytorch_model.bin"])
    assert "*.safetensors" in both and "pytorch_model*.bin" not in both
    assert model_cache.transformers_patterns(["config.json", "pytorch_model.bin"])[-1] == "pytorch_model*.bin"


def test_model_cache_fails_only_for_what_it_can_neither_fetch_nor_find_cached():
    fetched = []

    def ok(repo: str) -> str:
        fetched.append(repo)
        return f"/cache/{repo}"

    def offline(repo: str) -> str:
        raise OSError("network unreachable")

    argv = ["--pipeline=a/sd", "--model=b/checker"]
    assert model_cache.main(argv, {"pipeline": ok, "model": ok}) == 0 and fetched == ["a/sd", "b/checker"]
    assert model_cache.main(argv, {"pipeline": offline, "model": ok}, cached_copy=lambda r: None) == 1
    assert model_cache.main(argv, {"pipeline": offline, "model": ok}, cached_copy=lambda r: f"/c/{r}") == 0
    with pytest.raises(SystemExit):
        model_cache.parse_args([])  # nothing to fetch is a usage error


def test_model_cache_passes_the_pinned_revision_to_every_fetch(capsys):
    seen = []

    def record(spec: str) -> str:
        seen.append(spec)
        return "/cache/x"

    sha = "cb41f3a270d63d454d385fc2e4f571c487c253c5"
    argv = [f"--pipeline=a/sd@{sha}", "--model=b/checker", f"--model=c/tower@{sha}"]
    assert model_cache.main(argv, {"pipeline": record, "model": record}) == 0
    assert seen == [f"a/sd@{sha}", "b/checker", f"c/tower@{sha}"]
    with pytest.raises(SystemExit):
        model_cache.parse_args(["--model=b/checker@"])  # an empty revision is refused before any download
    assert "HUB_ID@REVISION" in capsys.readouterr().err
