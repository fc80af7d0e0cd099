"""``make screenshots``: the README's and docs' page images, from a real run with the tiny demo models.

1. ``diffguard serve`` (deployments/configs/local.yaml: the tiny CPU generator and checker) on a free loopback port;
   Debian's Chromium, through Playwright, generates four images from the page (docs/page-generate.png), then uploads
   two of examples/ and a corrupt file in the Moderate view (docs/page-moderate.png); the service is stopped.
2. ``diffguard scan`` of examples/, a few noise images and a corrupt file into a temporary DEST (the tiny checker);
   ``diffguard review`` on it; the review page with its queue (docs/review.png); the app is stopped.

Nothing is scripted: the images, verdicts and margins are what a user of ``make serve`` sees, meaningless as the
tiny weights make them (the captions under the images say so). Run from the repository root:

    python -m tools.screenshots [--out docs]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("DIFFGUARD_CHROMIUM", "/usr/bin/chromium")  # Debian's: Playwright's download is not needed
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
VIEWPORT = {"width": 1100, "height": 900}
CORRUPT = b"\x89PNG\r\n\x1a\n" + b"\0" * 24  # a PNG signature, then a corrupt header
UPLOADS = ("shapes.jpg", "gradient.png")  # the Moderate view's files from examples/, with corrupt.png


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Started:
    """A ``diffguard`` command in a subprocess, its output in ``log``; ``wait(pattern)`` returns the pattern's match
    once printed. Stopped with SIGINT (Ctrl-C: ``serve`` shuts Serve and Ray down), killed if that takes too long."""

    def __init__(self, *args: str, log: Path):
        env = {k: v for k, v in os.environ.items() if k not in ("DIFFGUARD_API_KEY", "RAY_ADDRESS")}  # local, keyless
        self.log = log
        self._out = log.open("w")
        cmd = [sys.executable, "-m", "pipeline", *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._out, stderr=subprocess.STDOUT)

    def wait(self, pattern: str, timeout: float = 600) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while not (found := re.search(pattern, self.log.read_text())):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.proc.args} exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                tail = self.log.read_text()[-3000:]
                raise TimeoutError(f"{self.proc.args}: no {pattern!r} after {timeout} s:\n{tail}")
            time.sleep(0.5)
        return found

    def answering(self, url: str, timeout: float = 120) -> str:
        """``url`` once a GET of it answers (the review app prints its URL just before it listens)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(url.split("#")[0], timeout=5):
                    return url
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{url} does not answer:\n{self.log.read_text()[-3000:]}") from None
                time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


def page_shots(browser, base: str, out: Path, tmp: Path) -> None:
    """Generate four images, then moderate two examples and a corrupt file, each view shot whole."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    try:
        page.goto(base + "/")
        page.wait_for_selector("#demo-warning:not([hidden])", timeout=60_000)
        page.fill("#num_images", "4")
        page.fill("#seed", "7")
        page.click("#generate-button")
        expect(page.locator("#generate-results .card")).to_have_count(4, timeout=300_000)
        page.screenshot(path=str(out / "page-generate.png"), full_page=True)

        corrupt = tmp / "corrupt.png"
        corrupt.write_bytes(CORRUPT)
        page.click("#tab-moderate")
        page.set_input_files("#files", [str(ROOT / "examples" / f) for f in UPLOADS] + [str(corrupt)])
        expect(page.locator("#moderate-results .card")).to_have_count(3, timeout=300_000)
        page.screenshot(path=str(out / "page-moderate.png"), full_page=True)
    finally:
        context.close()


def scan_source(folder: Path) -> None:
    """examples/'s images, six seeded 64x64 noise images (what the tiny generator draws) and a corrupt file."""
    folder.mkdir(parents=True)
    for path in sorted((ROOT / "examples").iterdir()):
        if path.suffix in (".png", ".jpg"):
            shutil.copy(path, folder / path.name)
    rng = np.random.default_rng(7)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"generated-{i}.png")
    (folder / "corrupt.png").write_bytes(CORRUPT)


def review_shot(browser, url: str, out: Path) -> None:
    """The review queue with its blurred thumbnails, once every thumbnail has loaded (or shows its placeholder)."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    try:
        page.goto(url)
        page.wait_for_selector("#queue li.item.current", timeout=60_000)
        items = page.locator("#queue li.item").count()
        expect(page.locator('#queue img.thumb[src^="blob:"], #queue .thumb.placeholder')).to_have_count(items)
        page.screenshot(path=str(out / "review.png"), full_page=False)
    finally:
        context.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.screenshots", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="folder for the PNGs (default: docs/)")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="diffguard-shots-") as name, sync_playwright() as pw:
        tmp = Path(name)
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        port = free_port()
        serve = Started("serve", "--port", str(port), log=tmp / "serve.log")
        try:
            base = serve.wait(r"serving on (http://\S+)").group(1).rstrip("/")
            page_shots(browser, base, args.out, tmp)
        finally:
            serve.stop()
        scan_source(tmp / "src")
        scanned = subprocess.run(
            [sys.executable, "-m", "pipeline", "scan", str(tmp / "src"), "--output", str(tmp / "dest")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if scanned.returncode != 0:
            raise RuntimeError(f"diffguard scan exited {scanned.returncode}:\n{scanned.stderr[-3000:]}")
        review = Started("review", str(tmp / "dest"), "--port", str(free_port()), "--reviewer", "demo", log=tmp / "log")
        try:
            url = review.wait(r"http://127\.0\.0\.1:\d+/#token=[A-Za-z0-9_-]+").group(0)
            review_shot(browser, review.answering(url), args.out)
        finally:
            review.stop()
        browser.close()
    for name in ("page-generate.png", "page-moderate.png", "review.png"):
        print(args.out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
