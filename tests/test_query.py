"""Compositional queries: the parser, its errors, and arithmetic that provably finds the target."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from coembed.errors import ImageError, UsageError
from coembed.index import Index
from coembed.index.query import (
    Query,
    Term,
    combine_terms,
    command_line_query,
    embed_query,
    parse_query,
)

COLOURS = ("red", "blue", "green")
SHAPES = ("circle", "square", "star")


def axis(name: str) -> np.ndarray:
    """One orthogonal direction per colour and per shape word."""
    vec = np.zeros(len(COLOURS) + len(SHAPES), np.float32)
    vec[(COLOURS + SHAPES).index(name)] = 1
    return vec


def picture(colour: str, shape: str) -> np.ndarray:
    vec = axis(colour) + axis(shape)
    return vec / np.linalg.norm(vec)


class AttributeEmbedder:
    """A stand-in model whose space is built so that word arithmetic must work: a picture of a
    red circle is (red + circle)/sqrt(2), the caption "a red circle" likewise, the word "red" is
    the red axis. Image files are named ``<colour>_<shape>.png``."""

    dim = len(COLOURS) + len(SHAPES)
    source = ""

    def embed_texts(self, texts):
        rows = []
        for text in texts:
            words = [w for w in text.split() if w in COLOURS + SHAPES]
            vec = sum(axis(w) for w in words)
            rows.append(vec / np.linalg.norm(vec))
        return np.stack(rows)

    def embed_images(self, paths):
        return np.stack([picture(*Path(p).stem.split("_")) for p in paths])


@pytest.fixture
def gallery(tmp_path):
    """An image index over all 9 colour x shape pictures (tiny real PNG files)."""
    items = []
    for colour in COLOURS:
        for shape in SHAPES:
            path = tmp_path / f"{colour}_{shape}.png"
            Image.new("RGB", (4, 4)).save(path)
            items.append(str(path))
    emb = AttributeEmbedder()
    vectors = emb.embed_images(items)
    return Index.from_vectors(vectors, items, embedder=emb)


def top(index: Index, query) -> str:
    return Path(index.search(query, k=1)[0][0]).stem


def test_attribute_swap_finds_the_target(gallery):
    assert top(gallery, "a red circle") == "red_circle"
    assert top(gallery, '"a red circle" - "red" + "blue"') == "blue_circle"
    assert top(gallery, '"a green star" - "star" + "square"') == "green_square"


def test_image_term_edited_by_words(gallery, tmp_path):
    query = f'image:"{tmp_path / "red_square.png"}" - "red" + "green"'
    assert top(gallery, query) == "green_square"
    # The command-line form: --image first, then the rest of the query.
    query = command_line_query('- "red" + "green"', tmp_path / "red_square.png")
    assert top(gallery, query) == "green_square"


def test_weights_blend_two_descriptions(gallery):
    # Equal weights of "red" and "circle" land on red circle; tilting towards "blue"
    # (with "circle" kept) moves the result to the blue circle.
    assert top(gallery, '"red" + "circle"') == "red_circle"
    assert top(gallery, '0.4*"red" + 0.6*"blue" + "circle"') == "blue_circle"


def test_vector_is_weighted_sum_of_unit_terms_renormalized():
    emb = AttributeEmbedder()
    got = embed_query('2*"red circle" - "red"', emb)
    want = 2 * picture("red", "circle") - axis("red")
    np.testing.assert_allclose(got, want / np.linalg.norm(want), atol=1e-6)
    assert np.linalg.norm(got) == pytest.approx(1.0)


def test_terms_that_cancel_are_an_error():
    with pytest.raises(UsageError, match="cancel"):
        embed_query('"red" - "red"', AttributeEmbedder())


def test_combine_terms_normalizes_each_term_then_the_sum():
    query = parse_query('2*"x" - "y"')
    got = combine_terms(query, [3 * axis("red"), np.array([0, 0, 0, 4, 0, 0], np.float32)])
    want = 2 * axis("red") - axis("circle")
    np.testing.assert_allclose(got, want / np.linalg.norm(want), atol=1e-6)
    assert got.dtype == np.float32
    with pytest.raises(UsageError, match="cancel"):
        combine_terms(parse_query('"x" - "y"'), [axis("red"), 2 * axis("red")])


@pytest.mark.parametrize(
    "text, terms",
    [
        ("a red car", [(1, "text", "a red car")]),
        ("a t-shirt - blue", [(1, "text", "a t-shirt - blue")]),  # no quotes: plain text
        ('"a" - "b" + "c"', [(1, "text", "a"), (-1, "text", "b"), (1, "text", "c")]),
        ('0.5*"red square"', [(0.5, "text", "red square")]),
        ('"x" * 2 - .5*"y"', [(2, "text", "x"), (-0.5, "text", "y")]),
        ('-"red"', [(-1, "text", "red")]),
        ('image:"my pics/a.png" + "dog"', [(1, "image", "my pics/a.png"), (1, "text", "dog")]),
        ('image:a.png - "cat"', [(1, "image", "a.png"), (-1, "text", "cat")]),
        (r'"say \"hi\""', [(1, "text", 'say "hi"')]),
    ],
)
def test_parse(text, terms):
    assert parse_query(text).terms == tuple(Term(float(w), k, v) for w, k, v in terms)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty query"),
        ("   ", "empty query"),
        ('"a red circle', "unbalanced quote"),
        ('"a" - "b', "unbalanced quote"),
        ('"a" -', "ends with '-'"),
        ('"a" + - "b"', "two operators"),
        ('"a" "b"', "expected + or -"),
        ('"a" + red', "put text terms in double quotes"),
        ('0.5 "a"', "a weight needs"),
        ('"a" *', "followed by a number"),
        ('""', "empty text term"),
        ("image:", "image: needs a path"),
    ],
)
def test_parse_errors(text, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        parse_query(text)


def test_round_trip_through_str():
    query = parse_query('image:"a b.png" - 0.5*"red" + "x \\" y"')
    assert parse_query(str(query)) == query


def test_cli_query_from_shell_words():
    # `coembed search "a red circle" - red + 0.5*blue` arrives as separate words.
    got = command_line_query(["a red circle", "-", "red", "+", "0.5*blue"])
    assert got == Query(
        (Term(1.0, "text", "a red circle"), Term(-1.0, "text", "red"), Term(0.5, "text", "blue"))
    )
    assert command_line_query(None, "a.png") == Query((Term(1.0, "image", "a.png"),))
    with pytest.raises(UsageError, match="give a text query"):
        command_line_query(None, None)


def test_missing_or_broken_query_image(tmp_path):
    with pytest.raises(ImageError, match="no such image"):
        embed_query(f'image:"{tmp_path / "nope.png"}"', AttributeEmbedder())
    (tmp_path / "red_circle.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageError):
        embed_query(f'image:"{tmp_path / "red_circle.png"}"', AttributeEmbedder())
