"""A small, offline ``kustomize build`` for the kustomizations in this folder, so tests need neither network nor binary.

It supports exactly what ``k8s/`` uses, with kustomize's semantics, and refuses anything else:

- ``resources``: YAML files (several documents allowed) and directories holding a ``kustomization.yaml``. As in
  kustomize, files must lie inside the kustomization's own directory (its default load restrictor, symlinks resolved)
  and a base may not be a parent folder of a kustomization that uses it (its cycle check);
- ``patches`` (``path`` or inline ``patch``, optional ``target``): a YAML list is a JSON 6902 patch (add, remove,
  replace, move, copy, test) applied to every resource the target selects; a mapping is a strategic-merge patch,
  identified by its own kind and name unless a target is given. ``$patch: delete`` removes the resource. Other
  strategic-merge patches are accepted for ``ray.io`` custom resources only, where kustomize applies them as JSON
  merge patches (RFC 7386: mappings merge, ``null`` deletes, lists are replaced whole);
- ``images``: ``newName``/``newTag``/``digest`` for every ``image`` in a ``containers`` or ``initContainers`` list,
  at any depth (kustomize's default image field specs).

Resources keep their input order (kustomize sorts them by kind; the set is the same). ``kubectl kustomize DIR`` gives
the same objects (a test compares the two where kubectl is installed).

    python -m k8s.kustomize k8s/overlays/dev      # print the rendered YAML stream
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "patches", "images"}
MERGE_PATCH_GROUPS = ("ray.io",)  # custom resources: kustomize's strategic merge is a JSON merge patch there

Resource = dict[str, Any]


class KustomizeError(ValueError):
    """A kustomization this renderer (or kustomize itself) would refuse; the message names the file and the field."""


def build(directory: str | Path, _visited: tuple[Path, ...] = ()) -> list[Resource]:
    """Render the kustomization in ``directory`` (recursively through its bases) -> resources, in input order."""
    root = Path(directory).resolve()
    for seen in _visited:
        if seen.is_relative_to(root):
            raise KustomizeError(
                f"{root} is a parent folder of {seen}, which uses it: kustomize refuses this as a cycle"
            )
    path = next((root / name for name in KUSTOMIZATION_FILES if (root / name).is_file()), None)
    if path is None:
        raise KustomizeError(f"{root}: no kustomization.yaml")
    spec = yaml.safe_load(path.read_text()) or {}
    unsupported = sorted(set(spec) - SUPPORTED_FIELDS)
    if unsupported:
        raise KustomizeError(
            f"{path}: fields {unsupported} are not supported here (supported: {sorted(SUPPORTED_FIELDS)})"
        )

    resources: list[Resource] = []
    for entry in spec.get("resources") or []:
        target = (root / entry).resolve()
        if target.is_dir():
            resources.extend(build(target, (*_visited, root)))
        else:
            resources.extend(_load_documents(_inside(root, entry, path)))
    _check_unique(resources, path)
    for patch in spec.get("patches") or []:
        resources = _apply_patch(resources, patch, root, path)
    for image in spec.get("images") or []:
        for resource in resources:
            _set_images(resource, image)
    return resources


def render(directory: str | Path) -> str:
    """The YAML stream ``kustomize build`` would print for ``directory`` (resources in input order)."""
    return yaml.safe_dump_all(build(directory), sort_keys=False, width=1000)


def resource_id(resource: Resource) -> tuple[str, str, str]:
    return resource.get("apiVersion", ""), resource.get("kind", ""), resource.get("metadata", {}).get("name", "")


def _inside(root: Path, entry: str, kustomization: Path) -> Path:
    target = (root / entry).resolve()
    if not target.is_relative_to(root):
        raise KustomizeError(
            f"{kustomization}: {entry!r} is outside {root}; kustomize only loads files under the kustomization's "
            f"directory (reference a directory with its own kustomization.yaml instead)"
        )
    if not target.is_file():
        raise KustomizeError(f"{kustomization}: {entry!r} does not exist")
    return target


def _load_documents(path: Path) -> list[Resource]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for doc in docs:
        if (
            not isinstance(doc, dict)
            or not {"apiVersion", "kind"} <= set(doc)
            or not doc.get("metadata", {}).get("name")
        ):
            raise KustomizeError(f"{path}: every document needs apiVersion, kind and metadata.name")
    return docs


def _check_unique(resources: list[Resource], kustomization: Path) -> None:
    seen: set[tuple[str, str]] = set()
    for r in resources:
        key = (r["kind"], r["metadata"]["name"])
        if key in seen:
            raise KustomizeError(f"{kustomization}: {key[0]} {key[1]!r} is defined twice")
        seen.add(key)


# --- patches ---
def _apply_patch(resources: list[Resource], patch: dict[str, Any], root: Path, kustomization: Path) -> list[Resource]:
    if ("path" in patch) == ("patch" in patch):
        raise KustomizeError(f"{kustomization}: a patch needs exactly one of `path` or `patch`, got {sorted(patch)}")
    unknown = set(patch) - {"path", "patch", "target"}
    if unknown:
        raise KustomizeError(f"{kustomization}: unsupported patch fields {sorted(unknown)}")
    where = patch.get("path") or "inline patch"
    text = _inside(root, patch["path"], kustomization).read_text() if "path" in patch else patch["patch"]
    body = yaml.safe_load(text)
    target = patch.get("target")
    if isinstance(body, list):
        if not target:
            raise KustomizeError(f"{kustomization}: JSON 6902 patch {where} needs a target")
        return _each_match(resources, target, where, lambda r: _json6902(r, body, where))
    if not isinstance(body, dict):
        raise KustomizeError(f"{kustomization}: patch {where} is neither a list (JSON 6902) nor a mapping")
    if target is None:
        target = {"kind": body.get("kind"), "name": body.get("metadata", {}).get("name")}
        group, _, version = str(body.get("apiVersion", "")).rpartition("/")
        target.update({"group": group, "version": version})
    if body.get("$patch") == "delete":
        return _each_match(resources, target, where, lambda r: None)
    return _each_match(resources, target, where, lambda r: _merge_patch(r, body, where))


def _each_match(resources: list[Resource], target: dict[str, Any], where: str, fn: Any) -> list[Resource]:
    out, matched = [], 0
    for r in resources:
        if _selected(r, target):
            matched += 1
            r = fn(copy.deepcopy(r))
            if r is None:
                continue
        out.append(r)
    if not matched:
        raise KustomizeError(f"patch {where}: no resource matches target {target}")
    return out


def _selected(resource: Resource, target: dict[str, Any]) -> bool:
    unknown = set(target) - {"group", "version", "kind", "name"}
    if unknown:
        raise KustomizeError(f"unsupported target fields {sorted(unknown)}")
    group, _, version = resource["apiVersion"].rpartition("/")
    actual = {"group": group, "version": version, "kind": resource["kind"], "name": resource["metadata"]["name"]}
    return all(target.get(k) in (None, "", actual[k]) for k in actual)


def _merge_patch(resource: Resource, body: dict[str, Any], where: str) -> Resource:
    group = resource["apiVersion"].rpartition("/")[0]
    if group not in MERGE_PATCH_GROUPS:
        raise KustomizeError(
            f"patch {where}: strategic-merge patches of {resource['kind']} merge lists by key in kustomize, which this "
            f"renderer does not implement; use a JSON 6902 patch (or `$patch: delete`)"
        )
    return merge_patch(resource, body)


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


def _json6902(resource: Resource, ops: list[dict[str, Any]], where: str) -> Resource:
    for i, op in enumerate(ops):
        try:
            resource = json_patch_op(resource, op)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise KustomizeError(f"patch {where}, operation {i} ({op.get('op')} {op.get('path')}): {exc}") from None
    return resource


def json_patch_op(doc: Any, op: dict[str, Any]) -> Any:
    """One RFC 6902 operation on ``doc`` (modified in place and returned)."""
    kind = op["op"]
    if kind == "test":
        actual = _get(doc, _pointer(op["path"]))
        if actual != op["value"]:
            raise ValueError(f"test failed: found {actual!r}, expected {op['value']!r}")
        return doc
    if kind in ("move", "copy"):
        value = copy.deepcopy(_get(doc, _pointer(op["from"])))
        if kind == "move":
            doc = _remove(doc, _pointer(op["from"]))
        return _add(doc, _pointer(op["path"]), value)
    if kind == "remove":
        return _remove(doc, _pointer(op["path"]))
    if kind == "add":
        return _add(doc, _pointer(op["path"]), copy.deepcopy(op["value"]))
    if kind == "replace":
        tokens = _pointer(op["path"])
        _get(doc, tokens)  # must exist
        if not tokens:
            return copy.deepcopy(op["value"])
        parent = _get(doc, tokens[:-1])
        parent[_index(parent, tokens[-1])] = copy.deepcopy(op["value"])
        return doc
    raise ValueError(f"unknown op {kind!r}")


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ValueError(f"JSON pointer must start with '/', got {path!r}")
    return [t.replace("~1", "/").replace("~0", "~") for t in path[1:].split("/")]


def _index(container: Any, token: str, *, append: bool = False) -> Any:
    if isinstance(container, list):
        if append and token == "-":
            return len(container)
        if not token.isdigit() or int(token) > len(container) - (0 if append else 1):
            raise IndexError(f"index {token!r} out of range for a list of {len(container)}")
        return int(token)
    if isinstance(container, dict):
        if not append and token not in container:
            raise KeyError(f"no key {token!r}")
        return token
    raise TypeError(f"cannot index a {type(container).__name__} with {token!r}")


def _get(doc: Any, tokens: list[str]) -> Any:
    for token in tokens:
        doc = doc[_index(doc, token)]
    return doc


def _add(doc: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    parent = _get(doc, tokens[:-1])
    key = _index(parent, tokens[-1], append=True)
    if isinstance(parent, list):
        parent.insert(key, value)
    else:
        parent[key] = value
    return doc


def _remove(doc: Any, tokens: list[str]) -> Any:
    if not tokens:
        raise ValueError("cannot remove the whole document")
    parent = _get(doc, tokens[:-1])
    del parent[_index(parent, tokens[-1])]
    return doc


# --- images ---
def split_image(image: str) -> tuple[str, str | None, str | None]:
    """``name[:tag][@digest]`` -> (name, tag, digest); a registry port is part of the name."""
    name, _, digest = image.partition("@")
    last = name.rsplit("/", 1)[-1]
    tag = None
    if ":" in last:
        name, tag = name.rsplit(":", 1)
    return name, tag, digest or None


def _set_images(node: Any, image: dict[str, Any]) -> None:
    unknown = set(image) - {"name", "newName", "newTag", "digest"}
    if unknown:
        raise KustomizeError(f"unsupported image fields {sorted(unknown)}")
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    if isinstance(container, dict) and isinstance(container.get("image"), str):
                        container["image"] = _new_image(container["image"], image)
            _set_images(value, image)
    elif isinstance(node, list):
        for item in node:
            _set_images(item, image)


def _new_image(current: str, image: dict[str, Any]) -> str:
    name, tag, digest = split_image(current)
    if name != image["name"]:
        return current
    name = image.get("newName", name)
    if image.get("digest"):
        return f"{name}@{image['digest']}"
    if "newTag" in image:
        return f"{name}:{image['newTag']}"
    return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m k8s.kustomize DIR   (prints the rendered YAML stream)", file=sys.stderr)
        return 2
    try:
        sys.stdout.write(render(args[0]))
    except KustomizeError as exc:
        print(f"kustomize: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
