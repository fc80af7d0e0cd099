"""Issue 14's adversarial corpus at CI size, through every path in one place (driver:
``tests/reliability/adversarial.py``; ``make reliability-adversarial`` runs the report-sized version into
docs/RELIABILITY.md): ``diffguard check``, ``/v1/moderate``, ``/v1/generate`` and ``diffguard scan --apply`` from a
local directory, from S3 into a local quarantine, and from S3 with ``--tag``. Every readable image is flagged
(``--adjustment 1``), so every image object must end withheld: scored (truncated ones say so) or unscorable, never
released, never left in place untagged; and nothing is overwritten or lost."""

from __future__ import annotations

import pytest

from tests.hidden import CASES as HIDDEN
from tests.integration.conftest import free_port
from tests.reliability.adversarial import ODD_KEYS, PATHS, adversarial_scenario

pytestmark = pytest.mark.slow  # deselected by `make test-fast`

# What the issue's "Done when" names, each with the paths it must have been driven through.
ISSUE_CASES = {
    "truncated jpeg (last 2% cut)": PATHS,
    "truncated png (last 2% cut)": PATHS,
    "truncated progressive jpeg (last 2% cut)": PATHS,
    "truncated gif (last 2% cut)": PATHS,
    "PNG named upload.bin": PATHS,
    "JPEG named photo.png.txt": PATHS,
    "GIF without a name suffix": PATHS,
    "oversized PNG without a suffix": PATHS,
    "same-size rewrite, old mtime restored (os.utime)": ("scan local",),
    "symlinks out of the source (file and dir)": ("scan local",),
    **{group: ("scan S3 → local quarantine", "scan S3 --tag") for group in ODD_KEYS},
    "64 files in one request": ("/v1/moderate",),
    "65 files in one request": ("/v1/moderate",),
    "1,024 files in one request": ("/v1/moderate",),
    "7 × 1-bit 6320² PNG (280 MP) in one request": ("/v1/moderate",),
    "2 × 1-bit 6320² PNG in one request": ("/v1/moderate",),
    "JSON nested 100,000 deep": ("/v1/generate",),
    "`prompt` nested 100,000 deep": ("/v1/generate",),
    "JSON nested 2,000 deep": ("/v1/generate",),
    "`prompt` nested 2,000 deep": ("/v1/generate",),
    "a valid prompt, 2 images, strict checker": ("/v1/generate",),
    **{f"hidden: {name}": PATHS for name in HIDDEN},  # issue 24: frames, pages, alpha, profiles, SVG, HEIC, video
}


@pytest.mark.usefixtures("ray_cluster")
def test_adversarial_corpus_through_every_path(s3_endpoint):
    result = adversarial_scenario(free_port(), s3_endpoint, size="ci")
    f = result["figures"]
    cells = f["table"]["cells"]
    print({k: v for k, v in f.items() if k != "table"})
    assert f["mismatches"] == []  # every (case, path) got its documented outcome
    assert f["unchecked_images_out"] == 0 and f["left_in_place_untagged"] == 0
    assert f["violations"] == {"lost_objects": 0, "duplicated_objects": 0}
    assert all(result["invariants"].values()), result["invariants"]
    for case, paths in ISSUE_CASES.items():
        assert set(paths) <= set(cells.get(case, {})), (case, cells.get(case))
    bombs = next(row for case, row in cells.items() if case.startswith("2 × 1-bit") and "scan local" in row)
    assert set(PATHS) - {"/v1/moderate"} <= set(bombs)  # huge-dimension PNGs × many files (moderate: in one request)
    assert f["check"]["exit_code"] == 3 and f["scan local"]["apply"]["skipped_symlinks"] == 2
    generated = f["generate"]
    assert generated["images_out"] == 0 and generated["images_withheld"] == 2  # strict: every image withheld
