"""The scan scores the policy's detectors with the same core: real open_nsfw weights decide a quarantine, the rows
carry detector_scores and which parts of the verdict are demo or real, and scan-results prints them."""

from __future__ import annotations

import io
import json

import pytest
import yaml
from PIL import Image

from tests.detected import nsfw_png, only_open_nsfw_row, photo
from tests.integration.scan_support import png, rows_by_key, scan, summary


def _photo(name: str, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(photo(name)).save(buf, format=fmt)
    return buf.getvalue()


def default_detector_policy(path) -> str:
    """The built-in default policy's own open_nsfw row, alone in `sexual` (the tiny stock checker only flags)."""
    path.write_text(yaml.safe_dump(only_open_nsfw_row(nsfw_action="flag")))
    return str(path)


@pytest.mark.usefixtures("ray_cluster")
def test_the_default_policys_open_nsfw_row_quarantines_what_it_detects(tmp_path, capsys):
    src, held, dest = tmp_path / "src", tmp_path / "held", str(tmp_path / "dest")
    src.mkdir()
    objects = {
        "detected.png": nsfw_png(),
        "astronaut.jpg": _photo("astronaut", "JPEG"),
        "coffee.png": _photo("coffee", "PNG"),
        "small.png": png(5),
    }
    for key, data in objects.items():
        (src / key).write_bytes(data)
    policy = default_detector_policy(tmp_path / "policy.yaml")

    rc, out = scan(capsys, str(src), "--output", dest, "--policy", policy, "--quarantine", str(held), "--apply")
    assert rc == 0 and out == summary(4, 0, 0, 1, 0, dest)
    rows = rows_by_key(dest)
    detected = rows["detected.png"]
    score = dict(detected["detector_scores"])["open_nsfw"]
    assert dict(score)["nsfw"] > 0.95
    assert dict(detected["categories"])["sexual"] == pytest.approx(round(dict(score)["nsfw"] - 0.8, 3), abs=1e-3)
    assert (detected["action"], detected["flagged"], detected["quarantined_to"]) == (
        "block",
        True,
        str(held / "detected.png"),
    )
    assert (held / "detected.png").read_bytes() == objects["detected.png"]
    for key in ("astronaut.jpg", "coffee.png"):  # real photographs: open_nsfw scores them low, nothing is moved
        assert dict(dict(rows[key]["detector_scores"])["open_nsfw"])["nsfw"] < 0.2, key
        assert rows[key]["quarantined_to"] is None and (src / key).exists()
    assert all(r["real"] == ["open_nsfw"] and r["demo"] == ["stock checker"] for r in rows.values())

    capsys.readouterr()
    from pipeline.cli import main

    assert main(["scan-results", dest, "--flagged"]) == 0
    (printed,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed["key"] == "detected.png" and printed["detector_scores"]["open_nsfw"]["nsfw"] > 0.95

    from tests.integration.review_support import ReviewServer

    with ReviewServer(dest) as review:  # a reviewer sees the detector's probability beside the category scores
        items = {i["key"]: i for i in review.client.get(f"{review.url}/api/items").json()["items"]}
    assert items["detected.png"]["detector_scores"]["open_nsfw"]["nsfw"] > 0.95
    assert items["detected.png"]["real"] == ["open_nsfw"] and items["detected.png"]["categories"]["sexual"] > 0

    rc, out = scan(capsys, str(src), "--output", dest)  # the default policy itself: a new fingerprint, rescored
    assert rc == 0 and out["scanned"] == 3
