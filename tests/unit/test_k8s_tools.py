"""The tools under k8s/: the offline kustomize renderer, the serveConfigV2 sync and the model-cache init container.

The manifests themselves are tested in test_k8s.py.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from k8s import kustomize, model_cache, sync
from k8s.kustomize import KustomizeError

K8S = Path(__file__).resolve().parents[2] / "k8s"
OVERLAYS = ["dev", "dev/scan", "prod", "prod/scan"]


def write(directory: Path, files: dict[str, Any]) -> Path:
    for name, content in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return directory


JOB = {
    "apiVersion": "ray.io/v1",
    "kind": "RayJob",
    "metadata": {"name": "j"},
    "spec": {"a": {"b": 1, "c": [1, 2]}, "t": {"spec": {"initContainers": [{"name": "i", "image": "img:1"}]}}},
}
JOB_PATCH = {**{k: JOB[k] for k in ("apiVersion", "kind", "metadata")}, "spec": {"a": {"b": None, "c": [9]}}}
PVC = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "p"}}


# --- the renderer ---
def test_renderer_applies_json6902_merge_patches_images_and_deletes(tmp_path):
    write(
        tmp_path,
        {
            "base/kustomization.yaml": {"resources": ["job.yaml", "pvc.yaml"]},
            "base/job.yaml": JOB,
            "base/pvc.yaml": PVC,
            "o/kustomization.yaml": {
                "resources": ["../base"],
                "images": [{"name": "img", "newName": "reg/img", "newTag": "2"}],
                "patches": [
                    {"path": "ops.yaml", "target": {"kind": "RayJob", "name": "j"}},
                    {"patch": yaml.safe_dump(JOB_PATCH)},
                    {"patch": "$patch: delete\napiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: p}\n"},
                ],
            },
            "o/ops.yaml": [
                {"op": "test", "path": "/spec/a/b", "value": 1},
                {"op": "add", "path": "/spec/a/c/-", "value": 3},
                {"op": "copy", "from": "/spec/a/c", "path": "/spec/d"},
                {"op": "add", "path": "/metadata/labels", "value": {"x~y/z": "1"}},
                {"op": "replace", "path": "/metadata/labels/x~0y~1z", "value": "2"},
            ],
        },
    )
    (job,) = kustomize.build(tmp_path / "o")  # the PVC was deleted
    assert job["spec"]["a"] == {"c": [9]}  # merge patch: null deletes, lists are replaced whole
    assert job["spec"]["d"] == [1, 2, 3] and job["metadata"]["labels"] == {"x~y/z": "2"}
    assert job["spec"]["t"]["spec"]["initContainers"][0]["image"] == "reg/img:2"


def json6902_on_job(ops: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "o/kustomization.yaml": {
            "resources": ["job.yaml"],
            "patches": [{"path": "p.yaml", "target": {"kind": "RayJob"}}],
        },
        "o/job.yaml": JOB,
        "o/p.yaml": ops,
    }


REFUSED = {
    "file-outside-root": ({"o/kustomization.yaml": {"resources": ["../job.yaml"]}, "job.yaml": JOB}, "outside"),
    "base-is-parent": (
        {
            "kustomization.yaml": {"resources": ["job.yaml"]},
            "job.yaml": JOB,
            "o/kustomization.yaml": {"resources": [".."]},
        },
        "parent folder",
    ),
    "unsupported-field": (
        {"o/kustomization.yaml": {"resources": ["job.yaml"], "namePrefix": "x-"}, "o/job.yaml": JOB},
        "not supported",
    ),
    "failed-test-op": (json6902_on_job([{"op": "test", "path": "/spec/a/b", "value": 2}]), "test failed"),
    "bad-path": (json6902_on_job([{"op": "remove", "path": "/spec/nope"}]), "no key 'nope'"),
    "no-match": (
        {
            "o/kustomization.yaml": {
                "resources": ["job.yaml"],
                "patches": [{"patch": "kind: Deployment\nmetadata: {name: d}"}],
            },
            "o/job.yaml": JOB,
        },
        "no resource matches",
    ),
    "strategic-merge-on-a-builtin-kind": (
        {
            "o/kustomization.yaml": {
                "resources": ["d.yaml"],
                "patches": [
                    {"patch": "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: {replicas: 2}"}
                ],
            },
            "o/d.yaml": {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}},
        },
        "JSON 6902",
    ),
}


@pytest.mark.parametrize("files, message", REFUSED.values(), ids=REFUSED.keys())
def test_renderer_refuses_what_kustomize_refuses(tmp_path, files, message):
    write(tmp_path, files)
    with pytest.raises(KustomizeError, match=message):
        kustomize.build(tmp_path / "o")


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed: only the Python renderer is used")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renderer_matches_kubectl_kustomize_on_every_overlay(overlay):
    directory = K8S / "overlays" / overlay
    out = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    key = kustomize.resource_id
    ours = kustomize.build(directory)
    assert sorted(yaml.safe_load_all(out.stdout), key=key) == sorted(ours, key=key)
    assert list(yaml.safe_load_all(kustomize.render(directory))) == ours  # the printed stream is the same objects


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
