"""The page's "Filter the collection" control in Debian's headless chromium, driven by Playwright:
a text and a minimum score list exactly the items that reach it, as a table and a CSV download,
and a mistake shows one error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers import build_served_index, running_server

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real uvicorn on a free loopback port, serving a tiny index; yields (url, index)."""
    from coembed.index import Index

    index_dir = build_served_index(tmp_path_factory.mktemp("browser-filter"))
    with running_server(index_dir) as url:
        yield url, Index.load(index_dir, device="cpu")


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server[0] + "/")
    page.click("#filter-panel summary")
    yield page
    context.close()
    assert not errors, errors  # no uncaught JavaScript errors


def test_filter_lists_exactly_the_items_above_the_score(page, server):
    from coembed.curate.dedup import index_vectors

    _, index = server
    scores = index_vectors(index) @ index.query_vector("a red circle")[0]
    order = np.argsort(-scores, kind="stable")
    # Halfway between the 5th and 6th best: exactly five items reach it, whatever the model.
    threshold = round(float(scores[order[4]] + scores[order[5]]) / 2, 7)
    assert scores[order[4]] > threshold > scores[order[5]]
    page.fill("#filter-q", "a red circle")
    page.fill("#filter-min", str(threshold))
    page.fill("#filter-k", "100")
    page.press("#filter-q", "Enter")
    page.wait_for_function("() => document.querySelectorAll('#filter-results tr').length === 5")
    names = page.locator("#filter-results .filter-name").all_inner_texts()
    assert names == [Path(index.items[i]).name for i in order[:5]]
    shown = [float(s) for s in page.locator("#filter-results .score").all_inner_texts()]
    assert shown == sorted(shown, reverse=True) and min(shown) >= round(threshold, 3) - 1e-3
    assert page.inner_text("#filter-status").startswith("5 items score at least")
    csv_text = page.evaluate(
        "() => fetch(document.getElementById('filter-csv').href).then(r => r.text())"
    )
    lines = csv_text.strip().splitlines()
    assert lines[0] == '"rank","score","item","caption"' and len(lines) == 6
    assert page.locator("#filter-csv").is_visible()
    # The search above the panel is untouched.
    assert page.locator("#results li").count() == 0


def test_filter_shows_one_error_and_recovers(page, server):
    page.fill("#filter-q", '"a red circle" -')
    page.fill("#filter-min", "0")
    page.press("#filter-q", "Enter")
    alert = page.locator("#filter-error")
    alert.wait_for(state="visible")
    assert "a term must follow" in alert.inner_text()
    assert page.locator("#filter-results tr").count() == 0
    page.fill("#filter-q", "")
    page.press("#filter-q", "Enter")
    assert "Type a text" in alert.inner_text()
    page.fill("#filter-q", "a green square")
    page.fill("#filter-min", "-1")
    page.fill("#filter-k", "3")
    page.press("#filter-q", "Enter")
    page.wait_for_function("() => document.querySelectorAll('#filter-results tr').length === 3")
    assert alert.is_hidden()
    assert "more match" in page.inner_text("#filter-status")
