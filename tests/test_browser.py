"""The search page in Debian's headless chromium, driven by Playwright: type a query, see the
thumbnails load, search by an uploaded and by a dropped image, "more like this", and errors."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tests.helpers import build_served_index, free_port

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.browser

# Every result thumbnail has arrived and decoded.
ALL_IMAGES_LOADED = """(n) => {
  const imgs = [...document.querySelectorAll('#results img')];
  return imgs.length === n && imgs.every((img) => img.complete && img.naturalWidth > 0);
}"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real uvicorn on a free loopback port, serving a tiny index; yields (url, index)."""
    import uvicorn

    from coembed.index import Index
    from coembed.serve.app import create_app

    index_dir = build_served_index(tmp_path_factory.mktemp("browser"))
    port = free_port()
    config = uvicorn.Config(create_app(index_dir), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", Index.load(index_dir, device="cpu")
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server[0] + "/")
    yield page
    context.close()
    assert not errors, errors  # no uncaught JavaScript errors


def result_names(page) -> list[str]:
    return page.locator("#results .name").all_inner_texts()


def test_type_a_query_and_see_thumbnails(page, server, tmp_path):
    url, index = server
    page.fill("#k", "6")
    page.fill("#q", "a red circle")
    page.press("#q", "Enter")
    page.wait_for_function(ALL_IMAGES_LOADED, arg=6)
    expected = [Path(item).name for item, _ in index.search("a red circle", k=6)]
    assert result_names(page) == expected
    scores = [float(s) for s in page.locator("#results .score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True)
    alts = page.locator("#results img").evaluate_all("imgs => imgs.map(i => i.alt)")
    assert all(alt.startswith("Result ") and alt.endswith(".png") for alt in alts), alts
    assert "6 results" in page.inner_text("#status")
    assert "q=a+red+circle" in page.url  # the query is in the address, for back and sharing
    page.screenshot(path=str(tmp_path / "search.png"), full_page=True)
    assert (tmp_path / "search.png").stat().st_size > 1000


def test_compositional_query_and_a_mistake(page, server):
    url, index = server
    page.fill("#k", "4")
    page.fill("#q", '"a red circle" - "red" + "blue"')
    page.press("#q", "Enter")
    page.wait_for_function(ALL_IMAGES_LOADED, arg=4)
    expected = index.search('"a red circle" - "red" + "blue"', k=4)
    assert result_names(page) == [Path(item).name for item, _ in expected]
    page.fill("#q", '"a red circle" -')
    page.press("#q", "Enter")
    alert = page.locator("#error")
    alert.wait_for(state="visible")
    assert "a term must follow" in alert.inner_text()
    # The page still searches after an error.
    page.fill("#q", "a green square")
    page.press("#q", "Enter")
    page.wait_for_function(ALL_IMAGES_LOADED, arg=4)
    assert alert.is_hidden()


def test_upload_drop_and_more_like_this(page, server, tmp_path):
    url, index = server
    page.fill("#k", "5")
    path = Path(index.items[2])
    page.set_input_files("#file", str(path))
    page.wait_for_function(ALL_IMAGES_LOADED, arg=5)
    assert result_names(page)[0] == path.name
    assert page.locator("#query-preview").is_visible()

    # A real drop: a File built in the page from an indexed image, in a DataTransfer.
    dropped = Path(index.items[9])
    page.evaluate(
        """async ([src, name]) => {
            const blob = await (await fetch(src)).blob();
            const data = new DataTransfer();
            data.items.add(new File([blob], name, { type: blob.type }));
            const zone = document.getElementById('drop-zone');
            for (const type of ['dragenter', 'dragover', 'drop']) {
                zone.dispatchEvent(new DragEvent(type, { dataTransfer: data, bubbles: true, cancelable: true }));
            }
        }""",
        ["/images/9", dropped.name],
    )
    page.wait_for_function(
        "(name) => document.querySelector('#results .name')?.textContent === name", arg=dropped.name
    )
    page.wait_for_function(ALL_IMAGES_LOADED, arg=5)

    # "More like this" on the third result: it comes first, and the box shows its image term.
    third = page.locator("#results .result").nth(2)
    third_id = third.get_attribute("data-id")
    third_name = third.locator(".name").inner_text()
    third.get_by_role("button", name=f"More like this: {third_name}").click()
    page.wait_for_function(
        "(name) => document.querySelector('#results .name')?.textContent === name", arg=third_name
    )
    page.wait_for_function(ALL_IMAGES_LOADED, arg=5)
    assert page.input_value("#q") == f"image:{third_id}"
    assert page.locator("#results .score").first.inner_text() == "1.000"
    # Focus went to the new results, so keyboard users carry on from there.
    assert page.evaluate("document.activeElement.id") == "results"
    page.screenshot(path=str(tmp_path / "more-like-this.png"), full_page=True)
    assert (tmp_path / "more-like-this.png").stat().st_size > 1000


def test_keyboard_only(page, server):
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.id") == "q"
    page.keyboard.type("a yellow square")
    page.keyboard.press("Enter")
    page.wait_for_function(ALL_IMAGES_LOADED, arg=24 if len(server[1]) >= 24 else len(server[1]))
    # Tab reaches a "More like this" button, which shows a visible focus ring and works with Enter.
    page.locator("#results .more").first.focus()
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Tab")
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline == "solid"
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.getElementById('q').value.startsWith('image:')")
