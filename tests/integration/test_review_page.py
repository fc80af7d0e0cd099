"""The review page in a real browser (Playwright driving Debian's Chromium) over the review app on real HTTP: the
queue renders with blurred thumbnails, the keyboard (j/k/c/o) records decisions, a click reveals one image, relabel
takes a category from the scan, filters page server-side, and the key is asked for when the app needs one."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.decisions import DecisionLog
from tests.integration.browser import new_page
from tests.integration.review_support import ReviewServer, manifest, results

pytestmark = pytest.mark.integration


def open_page(browser, url: str):
    context, page = new_page(browser)  # a self-contained page: nothing but 127.0.0.1
    page.goto(url)
    return context, page


def wait_thumbs(page, n: int) -> None:
    # selectors and expect(), never wait_for_function: the page's CSP (no 'unsafe-eval') refuses its string predicates
    page.locator('#queue img.thumb[src^="blob:"]').nth(n - 1).wait_for(timeout=30_000)


def wait_count(page, selector: str, n: int) -> None:
    from playwright.sync_api import expect  # here: collecting the module must not need playwright

    expect(page.locator(selector)).to_have_count(n, timeout=30_000)


def test_keyboard_review_reveal_relabel_and_filters(browser, tmp_path):
    keys = [f"uploads/{i:03d}.png" for i in range(40)]
    results(tmp_path / "dest", tmp_path / "src", keys, seed=21)
    with ReviewServer(tmp_path / "dest", "--reviewer", "ana") as app:
        queue = app.client.get(app.url + "/api/items", params={"state": "undecided", "limit": 200}).json()["items"]
        context, page = open_page(browser, app.page_url)  # the start-up URL, with this start's token
        try:
            page.wait_for_selector("#queue li.item.current")
            wait_thumbs(page, 3)
            shown = page.locator("#queue li.item").evaluate_all("els => els.map(e => e.dataset.key)")
            assert shown == [i["key"] for i in queue][:50]
            assert page.locator("#queue img.thumb").first.get_attribute("alt").startswith("blurred")
            assert page.is_hidden("#demo-warning")  # no manifest says the scan ran demo weights: no banner

            # j moves down twice, k back once: the second item; o overturns it, then c confirms the next
            page.keyboard.press("j")
            page.keyboard.press("j")
            page.keyboard.press("k")
            assert page.locator("#queue li.item.current").get_attribute("data-key") == queue[1]["key"]
            page.keyboard.press("o")
            page.wait_for_selector("#queue li.item[data-index='1'] .state.overturn")
            page.keyboard.press("c")
            page.wait_for_selector("#queue li.item[data-index='2'] .state.confirm")
            assert page.locator("#queue li.item.current").get_attribute("data-key") == queue[3]["key"]

            # relabel through the dialog, with a note typed first (n)
            page.once("dialog", lambda d: d.accept("a cartoon"))
            page.keyboard.press("n")
            page.keyboard.press("r")
            page.select_option("#relabel-category", "hate")
            page.click("#relabel button[value=ok]")
            page.wait_for_selector("#queue li.item[data-index='3'] .state.relabel")

            # reveal one thumbnail: the unblurred pixels come only now, for that image only (an unscorable one has none)
            at = next(i for i in range(4, len(queue)) if not queue[i]["unscorable"])
            page.locator(f"#queue li.item[data-index='{at}'] img.thumb").click()
            page.wait_for_selector(f"#queue li.item[data-index='{at}'] img.thumb[data-revealed='1']")
            assert page.locator("#queue img.thumb[data-revealed='1']").count() == 1

            decided = {d.key: d for d in DecisionLog.open(str(tmp_path / "dest")).all()}
            assert {k: (d.decision, d.category, d.note, d.reviewer) for k, d in decided.items()} == {
                queue[1]["key"]: ("overturn", None, None, "ana"),
                queue[2]["key"]: ("confirm", decided[queue[2]["key"]].category, None, "ana"),
                queue[3]["key"]: ("relabel", "hate", "a cartoon", "ana"),
            }
            assert decided[queue[2]["key"]].category in (queue[2]["flagged_categories"] or [None])

            # filters are applied by the server: only overturned objects, then only "flag" actions
            page.select_option("#f-state", "overturn")
            wait_count(page, "#queue li.item", 1)
            assert page.locator("#queue li.item").get_attribute("data-key") == queue[1]["key"]
            page.select_option("#f-state", "all")
            page.select_option("#f-action", "flag")
            page.wait_for_selector("#queue li.item")
            actions = page.locator("#queue .badge").all_inner_texts()
            assert actions and set(actions) == {"flag"}
            assert page.console_errors == []
            page.goto(app.url + "/docs")  # the API's docs render with every other host refused
            page.wait_for_selector(".opblock-summary-path", timeout=30_000)
            paths = page.locator(".opblock-summary-path").all_inner_texts()
            assert "/api/items/{key}/decision" in " ".join(paths)
        finally:
            context.close()


def test_the_page_asks_for_the_key_off_loopback(browser, tmp_path):
    results(tmp_path / "dest", tmp_path / "src", [f"k/{i}.png" for i in range(12)], seed=4)
    env = {"DIFFGUARD_API_KEY": "review-key-1"}
    with ReviewServer(tmp_path / "dest", host="0.0.0.0", env=env) as app:
        context, page = open_page(browser, app.url + "/")
        try:
            page.wait_for_selector("#auth:not([hidden])")
            assert "401" in page.locator("#status").inner_text()
            page.fill("#api-key", "review-key-1")
            page.press("#api-key", "Enter")
            page.wait_for_selector("#queue li.item")
            wait_thumbs(page, 1)
            # the decoded pixels, through a canvas (the page's CSP lets nothing fetch a blob: URL, its img may show one)
            read = """async img => {
                await img.decode();
                const [w, h] = [img.naturalWidth, img.naturalHeight];
                const ctx = Object.assign(document.createElement("canvas"), {width: w, height: h}).getContext("2d");
                ctx.drawImage(img, 0, 0);
                return [h, w, Array.from(ctx.getImageData(0, 0, w, h).data)];
            }"""
            h, w, rgba = page.locator('#queue img.thumb[src^="blob:"]').first.evaluate(read)  # one that has loaded
            pixels = np.asarray(rgba, dtype=np.uint8).reshape(h, w, 4)
            assert h > 0 and w > 0 and (pixels[..., 3] == 255).all()
        finally:
            context.close()


def test_demo_banner_unscorable_placeholder_and_favicon(browser, tmp_path):
    """A scan on demo weights says so above the queue; an unscorable object shows a labelled placeholder inside its
    box (no thumbnail request, no broken image, no "full image" link); the icon is served: no 404 in the console."""
    table = results(tmp_path / "dest", tmp_path / "src", [f"up/{i:02d}.png" for i in range(12)], seed=21)
    manifest(tmp_path / "dest", tmp_path / "src", demo=True)
    unscorable = sorted(r["key"] for r in table.to_pylist() if r["unscorable"])
    assert unscorable  # the seed gives some
    with ReviewServer(tmp_path / "dest") as app:
        assert app.client.get(app.url + "/api/info").json()["demo_weights"] is True
        queue = app.client.get(app.url + "/api/items", params={"state": "undecided", "limit": 200}).json()["items"]
        context, page = open_page(browser, app.page_url)
        failed: list[str] = []
        page.on("response", lambda r: r.status >= 400 and failed.append(f"{r.status} {r.url}"))
        try:
            page.wait_for_selector("#demo-warning:not([hidden])")
            banner = " ".join(page.text_content("#demo-warning").split())
            assert banner == "Demo weights: this scan ran tiny demo models, so its verdicts are meaningless."
            wait_count(page, "#queue li.item", len(queue))
            wait_thumbs(page, len(queue) - len(unscorable))
            for key in unscorable:
                item = page.locator(f'#queue li.item[data-key="{key}"]')
                box = item.locator(".thumb")
                assert box.get_attribute("class") == "thumb placeholder" and item.locator("img").count() == 0
                assert box.inner_text() == "Unscorable: not shown"
                assert box.get_attribute("title") == "corrupt or truncated image"  # the row's error, on hover
                assert box.evaluate("e => e.scrollWidth <= e.clientWidth && e.scrollHeight <= e.clientHeight")
                assert item.get_by_text("full image").count() == 0
            icon = page.locator("link[rel=icon]").get_attribute("href")
            served = app.client.get(app.url + icon)
            assert served.status_code == 200 and served.headers["content-type"].startswith("image/svg+xml")
            assert page.console_errors == [] and failed == []
        finally:
            context.close()
