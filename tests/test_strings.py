"""The compact string lists a loaded index keeps its items and captions in."""

from __future__ import annotations

import pytest

from coembed.index.strings import StringLists, Strings

WORDS = ["a.jpg", "", "ab", "päth/ü.png", "b\udcff.jpg", "ab", "a", "aab"]


def test_strings_read_like_the_list_they_hold():
    strings = Strings(WORDS)
    assert len(strings) == len(WORDS) and list(strings) == WORDS and strings == WORDS
    assert [strings[i] for i in range(-len(WORDS), len(WORDS))] == WORDS + WORDS
    assert strings[2:5] == WORDS[2:5] and strings[::-2] == WORDS[::-2]
    with pytest.raises(IndexError):
        strings[len(WORDS)]
    for word in WORDS:  # the first id holding it, as list.index: "ab" twice, "a" inside others
        assert strings.index(word) == WORDS.index(word) and word in strings
    assert strings.index("ab", 3) == 5 and strings.index("", 1, 2) == 1
    for absent in ("b", "aa", "jpg", "a.jp", "ab\x00", 3):
        assert absent not in strings
    with pytest.raises(ValueError):
        strings.index("ab", 6)
    assert Strings() == [] and not Strings() and Strings(["x"]) != ["y"]


def test_strings_and_string_lists_grow():
    strings = Strings(WORDS[:3])
    strings.extend(WORDS[3:])
    strings.extend([])
    assert strings == WORDS
    strings[2], strings[-1] = "renamed/ä.jpg", ""
    assert strings == WORDS[:2] + ["renamed/ä.jpg"] + WORDS[3:-1] + [""]
    assert strings.index("renamed/ä.jpg") == 2 and strings.index("ab") == 5
    lists = [["a cat"], [], ["two", "captions ü"], []]
    captions = StringLists(lists[:1])
    captions.extend(lists[1:])
    assert captions == lists and captions[2] == ["two", "captions ü"] and captions[-1] == []
    assert captions[1:3] == lists[1:3] and len(captions) == 4
    assert StringLists([[]] * 3) == [[], [], []]


def test_items_are_written_as_json_a_chunk_at_a_time(tmp_path, monkeypatch):
    import json

    import coembed.index.store as store

    monkeypatch.setattr(store, "ITEMS_CHUNK", 3)
    items = [f"img/{i}ü.png" for i in range(10)]
    captions = [[f'a "quoted" caption {i}'] * (i % 3) for i in range(10)]
    meta = {"items": Strings(items), "captions": StringLists(captions),
            "skipped": [["x.png", "not an image"]], "none": None, "empty": []}  # fmt: skip
    store.write_items(str(tmp_path / "items.json"), meta)
    assert json.loads((tmp_path / "items.json").read_text("utf-8")) == {
        "items": items, "captions": captions, "skipped": [["x.png", "not an image"]],
        "none": None, "empty": [],
    }  # fmt: skip
