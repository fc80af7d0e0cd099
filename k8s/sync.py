"""One truth for the Serve configs: each RayService ``serveConfigV2`` is written from ``deployments/configs``.

    python -m k8s.sync            # rewrite the serveConfigV2 blocks in place (`make k8s` runs this)
    python -m k8s.sync --check    # exit 1 naming the manifests that differ from their source (the tests assert this),
                                  # and every drain or timeout that is not the one k8s/grace.py derives

The production RayService carries ``deployments/configs/production.yaml`` verbatim, comments included. The dev
overlay carries ``local.yaml`` with the few changes a pod needs (``DEV_OVERRIDES``), merged and re-serialised.
"""

from __future__ import annotations

import copy
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from k8s import grace

REPO = Path(__file__).resolve().parent.parent

# What a pod needs that a laptop does not (local.yaml binds 127.0.0.1 and runs one proxy on the head):
# - the proxy listens on every interface, or the Service cannot reach it;
# - a proxy on every node with replicas: KubeRay's readiness probe of a RayService worker asks the worker's own proxy
#   (:8000/-/healthz), so with HeadOnly the worker pod would never be Ready.
DEV_OVERRIDES: dict[str, Any] = {"proxy_location": "EveryNode", "http_options": {"host": "0.0.0.0"}}


@dataclass(frozen=True)
class Target:
    manifest: str  # repo-relative YAML file holding one `serveConfigV2: |` block
    source: str  # repo-relative Serve config the block must carry
    overrides: dict[str, Any] | None = field(default=None, hash=False)  # merged in (JSON merge patch); None: verbatim


TARGETS = (
    Target("k8s/base/rayservice.yaml", "deployments/configs/production.yaml"),
    Target("k8s/overlays/dev/serve-config.yaml", "deployments/configs/local.yaml", DEV_OVERRIDES),
)

_KEY = re.compile(r"^(?P<indent> *)serveConfigV2: *\|[-+]? *$")


def expected(target: Target) -> str:
    """The exact ``serveConfigV2`` string ``target.manifest`` must hold."""
    text = (REPO / target.source).read_text()
    if target.overrides is None:
        return text.rstrip("\n") + "\n"
    merged = merge_patch(yaml.safe_load(text), target.overrides)
    header = f"# {target.source} + {_flat(target.overrides)} (by python -m k8s.sync)\n"
    return header + yaml.safe_dump(merged, sort_keys=False, width=1000)


def replace_block(manifest_text: str, value: str, where: str = "manifest") -> str:
    """``manifest_text`` with its one ``serveConfigV2: |`` literal block replaced by ``value`` (same indentation)."""
    lines = manifest_text.split("\n")
    starts = [i for i, line in enumerate(lines) if _KEY.match(line)]
    if len(starts) != 1:
        raise ValueError(f"{where}: expected exactly one `serveConfigV2: |` line, found {len(starts)}")
    start = starts[0]
    indent = _KEY.match(lines[start])["indent"]
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip(" ")) > len(indent)):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():  # blank lines after the block stay where they are
        end -= 1
    if value[:1] in (" ", "\t"):
        raise ValueError(f"{where}: a Serve config starting with whitespace needs an indentation indicator")
    pad = indent + "  "
    block = [f"{indent}serveConfigV2: |"] + [pad + line if line else "" for line in value.rstrip("\n").split("\n")]
    return "\n".join(lines[:start] + block + lines[end:])


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: mappings merge recursively, ``None`` deletes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def stale() -> list[str]:
    """Manifests whose ``serveConfigV2`` differs from what their source says it must be."""
    out = []
    for target in TARGETS:
        text = (REPO / target.manifest).read_text()
        if replace_block(text, expected(target), target.manifest) != text:
            out.append(target.manifest)
    return out


def write() -> list[str]:
    """Rewrite every stale manifest; returns the ones changed."""
    changed = []
    for target in TARGETS:
        path = REPO / target.manifest
        text = path.read_text()
        new = replace_block(text, expected(target), target.manifest)
        if new != text:
            value = _serve_config_of(new)
            if value != expected(target):  # never write a file that would not parse back to the source
                raise ValueError(f"{target.manifest}: the rewritten block does not parse back to {target.source}")
            path.write_text(new)
            changed.append(target.manifest)
    return changed


def _serve_config_of(text: str) -> str:
    for doc in yaml.safe_load_all(text):
        if isinstance(doc, dict) and "serveConfigV2" in doc.get("spec", {}):
            return doc["spec"]["serveConfigV2"]
    raise ValueError("no spec.serveConfigV2 found")


def _flat(overrides: dict[str, Any], prefix: str = "") -> str:
    parts = []
    for key, value in overrides.items():
        if isinstance(value, dict):
            parts.append(_flat(value, f"{prefix}{key}."))
        else:
            parts.append(f"{prefix}{key}={value}")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args not in ([], ["--check"]):
        print("usage: python -m k8s.sync [--check]", file=sys.stderr)
        return 2
    if args == ["--check"]:
        bad = stale()
        for manifest in bad:
            print(f"{manifest}: serveConfigV2 differs from its source; run `make k8s`", file=sys.stderr)
        wrong = grace.problems()
        for problem in wrong:
            print(f"{problem} (k8s/grace.py)", file=sys.stderr)
        return 1 if bad or wrong else 0
    for manifest in write():
        print(f"updated {manifest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
