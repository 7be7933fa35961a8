"""The search page in Debian's headless chromium, driven by Playwright: type a query, see the
thumbnails load, search by an uploaded and by a dropped image, "more like this", and errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import (
    build_served_index,
    make_images,
    running_server,
    tiny_clip_model,
    write_csv,
)

pytestmark = pytest.mark.browser

# Every result thumbnail has arrived and decoded.
ALL_IMAGES_LOADED = """(n) => {
  const imgs = [...document.querySelectorAll('#results img')];
  return imgs.length === n && imgs.every((img) => img.complete && img.naturalWidth > 0);
}"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A tiny index served on a loopback port; yields (url, index)."""
    from coembed.index import Index

    index_dir = build_served_index(tmp_path_factory.mktemp("browser"))
    with running_server(index_dir) as url:
        yield url, Index.load(index_dir, device="cpu")


@pytest.fixture(scope="module")
def captioned_server(tmp_path_factory):
    """An index of images with long names in two sub-folders of val/ and long captions, read
    from a CSV; yields (url, index, root of the files)."""
    from coembed.checkpoint import save_model_dir
    from coembed.embedder import load
    from coembed.index import Index
    from coembed.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("captioned")
    rows = []
    for i, path in enumerate(make_images(root / "made")):
        shape = path.stem.split("_")[1]
        name = f"val/{shape}s/val_{i:05d}_{path.stem}_photographed_from_above_at_noon.png"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        path.rename(root / name)
        caption = f"a {path.stem.replace('_', ' ')} on a grey background, drawn by hand, item {i}"
        rows.append((name, caption))
    write_csv(root / "val.csv", rows)
    model_dir = save_model_dir(tiny_clip_model(), Tokenizer.clip(context_length=16), root / "model")
    index = Index.build(load(model_dir, device="cpu"), images=root / "val.csv", progress=False)
    index.save(root / "index")
    with running_server(root / "index") as url:
        yield url, index, root


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


def test_an_error_clears_the_previous_results(page):
    page.fill("#k", "4")
    page.fill("#q", "a red circle")
    page.press("#q", "Enter")
    page.wait_for_function(ALL_IMAGES_LOADED, arg=4)
    page.fill("#q", '"a red circle" -')
    page.press("#q", "Enter")
    page.locator("#error").wait_for(state="visible")
    # The old answer must not stand under the new query's error as if it were its answer.
    assert page.locator("#results .result").count() == 0
    assert page.inner_text("#status") == ""


def test_whole_names_and_captions_show(browser, captioned_server, tmp_path):
    url, index, root = captioned_server
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    page.goto(url + "/")
    page.fill("#k", "5")
    page.fill("#q", "a blue square")
    page.press("#q", "Enter")
    page.wait_for_function(ALL_IMAGES_LOADED, arg=5)
    ids, _ = index.search_ids("a blue square", k=5)
    names = page.locator("#results .name")
    # Each name whole, relative to the indexed folder (no server path), wrapped, not cut.
    expected = [str(Path(index.items[i]).relative_to(root / "val")) for i in ids]
    assert names.all_inner_texts() == expected
    assert all(name.split("/")[0] in ("circles", "squares") and len(name) > 60 for name in expected)
    clipped = names.evaluate_all("els => els.filter(e => e.scrollWidth > e.clientWidth).length")
    assert clipped == 0
    # A visible caption line under each result, every caption in its tooltip.
    captions = page.locator("#results .caption")
    assert captions.count() == 5 and all(captions.nth(i).is_visible() for i in range(5))
    assert captions.all_inner_texts() == [index.captions[i][0] for i in ids]
    assert captions.first.get_attribute("title") == "\n".join(index.captions[ids[0]])
    assert str(root) not in page.content()
    page.screenshot(path=str(tmp_path / "captions.png"), full_page=True)
    page.close()


def test_query_syntax_link_opens_its_section(page):
    details = page.locator("#syntax")
    assert not details.evaluate("d => d.open")
    page.get_by_role("link", name="query syntax").click()
    assert details.evaluate("d => d.open")
    assert page.locator("#syntax table").is_visible()
    assert page.url.endswith("#syntax")
    # Closed by hand and linked again, it opens again; a page loaded at #syntax opens it too.
    page.locator("#syntax summary").click()
    assert not details.evaluate("d => d.open")
    page.get_by_role("link", name="query syntax").click()
    assert details.evaluate("d => d.open")
    page.reload()
    assert page.locator("#syntax table").is_visible()
