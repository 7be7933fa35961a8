"""Compositional queries: word-vector arithmetic over text and image embeddings.

A query is a plain text (``a red car``: no double quotes anywhere, taken verbatim) or a sum of
weighted terms::

    "a red circle" - "red" + "blue"          # swap an attribute
    0.5*"red square" + 0.5*"blue circle"     # blend two descriptions
    image:"photos/cat.png" - "cat" + "dog"   # edit an image query with words
    "a beach" * 2 + image:beach.jpg          # a weight may follow its term as well

Text terms are in double quotes (``\\"`` is a literal quote inside); image terms are
``image:"path"`` or ``image:path`` (no spaces). Searching an index, an image term may also name
one of its items, as on the web page: ``image:17`` is item 17 (write ``image:./17`` for a file
named 17), and the path of an indexed item whose file is gone is that item
(``coembed.index.index.item_vectors``).
Each term is embedded and L2-normalized, the weighted sum is renormalized, and that unit vector
is what the index searches. ``combine_terms`` is the arithmetic itself, shared by
``embed_query`` and the server.

On the command line the shell splits the query into words (``command_line_query``): words with
no operator among them are one plain text (``search --index I a blue circle``), otherwise each
run of bare words between operators is one text term (``a red circle - red + blue``), and
``--image a.png - red + blue`` puts the image in front as the first term.

Mistakes (an unbalanced quote, an empty query, an operator with nothing after it, two terms
with no operator between them, a bare word outside quotes) raise one ``UsageError`` naming the
column.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from coembed.errors import ImageError, UsageError

if TYPE_CHECKING:
    from coembed.embedder import Embedder

_NUMBER = re.compile(r"\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?")
# Larger weights overflow the weighted sum of unit vectors (and say nothing a smaller one cannot).
MAX_WEIGHT = 1e6
_WEIGHTED_WORDS = re.compile(r"^\s*(\d+\.?\d*|\.\d+)\s*\*\s*(.+)$", re.S)


@dataclass(frozen=True)
class Term:
    """One weighted term of a query: a text or an image path."""

    weight: float
    kind: Literal["text", "image"]
    value: str

    def __str__(self) -> str:
        quoted = '"' + self.value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        atom = f"image:{quoted}" if self.kind == "image" else quoted
        return atom if self.weight == 1 else f"{self.weight:g}*{atom}"


@dataclass(frozen=True)
class Query:
    """A compositional query: a sum of weighted terms (one unweighted text term: plain text)."""

    terms: tuple[Term, ...]

    def __str__(self) -> str:
        out = ""
        for i, term in enumerate(self.terms):
            sign = "-" if term.weight < 0 else "+"
            shown = str(Term(abs(term.weight), term.kind, term.value))
            out += (f" {sign} " if i else ("-" if sign == "-" else "")) + shown
        return out

    @property
    def is_plain_text(self) -> bool:
        """Whether the query is one unweighted text, searched as the text itself."""
        return len(self.terms) == 1 and self.terms[0].kind == "text" and self.terms[0].weight == 1


def _error(text: str, column: int, message: str) -> UsageError:
    return UsageError(f"query {text!r}: {message} (column {column})")


def _read_string(text: str, start: int) -> tuple[str, int]:
    """The string literal opening at ``text[start] == '"'``: (value, index after the close)."""
    out, i = [], start + 1
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text) and text[i + 1] in '"\\':
            out.append(text[i + 1])
            i += 2
        elif char == '"':
            return "".join(out), i + 1
        else:
            out.append(char)
            i += 1
    raise _error(text, start + 1, 'unbalanced quote: this " is never closed')


def _tokens(text: str) -> list[tuple[str, object, int]]:
    """(kind, value, column) for op (+/-), star, number, text and image tokens."""
    tokens: list[tuple[str, object, int]] = []
    i = 0
    while i < len(text):
        char, column = text[i], i + 1
        if char.isspace():
            i += 1
        elif char in "+-":
            tokens.append(("op", char, column))
            i += 1
        elif char == "*":
            tokens.append(("star", "*", column))
            i += 1
        elif char == '"':
            value, i = _read_string(text, i)
            if not value.strip():
                raise _error(text, column, 'empty text term ""')
            tokens.append(("text", value, column))
        elif text.startswith("image:", i):
            i += len("image:")
            if i < len(text) and text[i] == '"':
                value, i = _read_string(text, i)
            else:
                end = i
                while end < len(text) and not text[end].isspace():
                    end += 1
                value, i = text[i:end], end
            if not value.strip():
                raise _error(text, column, 'image: needs a path, as in image:"photo.png"')
            tokens.append(("image", value, column))
        elif match := _NUMBER.match(text, i):
            tokens.append(("number", float(match.group()), column))
            i = match.end()
        else:
            word = re.match(r"\S+", text[i:]).group()
            raise _error(
                text, column, f'unexpected {word!r}: put text terms in double quotes, as in "red"'
            )
    return tokens


def _parse_term(text: str, tokens: list, pos: int) -> tuple[float, str, str, int]:
    """One ``[number '*'] atom ['*' number]`` starting at ``tokens[pos]``: (weight, kind, value, next)."""
    weight = 1.0
    kind, value, column = tokens[pos]
    if kind == "number":
        if pos + 1 >= len(tokens) or tokens[pos + 1][0] != "star":
            raise _error(text, column, f'a weight needs "*" and a term, as in {value:g}*"red"')
        if pos + 2 >= len(tokens) or tokens[pos + 2][0] not in ("text", "image"):
            raise _error(text, tokens[pos + 1][2], '"*" must be followed by a term in quotes')
        weight = float(value)  # type: ignore[arg-type]
        pos += 2
        kind, value, column = tokens[pos]
    if kind not in ("text", "image"):
        raise _error(text, column, f"expected a term in quotes, found {value!r}")
    pos += 1
    if pos < len(tokens) and tokens[pos][0] == "star":
        if pos + 1 >= len(tokens) or tokens[pos + 1][0] != "number":
            raise _error(text, tokens[pos][2], '"*" after a term must be followed by a number')
        weight *= float(tokens[pos + 1][1])  # type: ignore[arg-type]
        pos += 2
    if not abs(weight) <= MAX_WEIGHT:  # also catches 1e999 (inf) and inf * 0 (nan)
        raise _error(text, column, f"weight {weight:g} is out of range (at most {MAX_WEIGHT:g})")
    return weight, kind, str(value), pos


def parse_query(text: str) -> Query:
    """Parse a query string (see the module docstring) into weighted terms.

    Raises UsageError for an empty query, an unbalanced quote, an operator with no term after
    it, two terms without an operator between them, or a bare word outside quotes.
    """
    if not text or not text.strip():
        raise UsageError("empty query: give some text, a quoted compositional query, or --image")
    if '"' not in text and "image:" not in text:
        return Query((Term(1.0, "text", text.strip()),))
    quotes = text.count('"') - text.count('\\"')
    if quotes % 2:
        # Checked up front: otherwise a missing quote shows up later as a confusing bare word.
        raise _error(
            text,
            text.rindex('"') + 1,
            f"unbalanced quotes: an odd number ({quotes}) of double quotes; each text term needs two",
        )
    tokens = _tokens(text)
    terms: list[Term] = []
    pos, sign = 0, 1.0
    while pos < len(tokens):
        kind, value, column = tokens[pos]
        if kind == "op":
            if pos + 1 >= len(tokens):
                raise _error(text, column, f"the query ends with {value!r}: a term must follow it")
            if tokens[pos + 1][0] == "op":
                raise _error(
                    text,
                    tokens[pos + 1][2],
                    f"two operators in a row ({value!r} then {tokens[pos + 1][1]!r})",
                )
            sign = -1.0 if value == "-" else 1.0
            pos += 1
        elif terms and sign == 0:
            raise _error(text, column, "expected + or - between two terms")
        weight, kind, value, pos = _parse_term(text, tokens, pos)
        terms.append(Term(sign * weight, kind, value))  # type: ignore[arg-type]
        sign = 0.0  # the next term must be introduced by an operator
    return Query(tuple(terms))


def _quote_word(word: str) -> str:
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _is_query_syntax(word: str) -> bool:
    """Whether a shell word is an operator, a weight, a quoted term or an image term."""
    return (
        word in ("+", "-", "*")
        or '"' in word
        or word.startswith("image:")
        or _WEIGHTED_WORDS.match(word) is not None
    )


def _join_shell_words(words: Sequence[str]) -> str:
    """One query string from the shell's words (see the module docstring)."""
    if not any(_is_query_syntax(word) for word in words):
        return " ".join(words)  # a plain text, taken as it is
    parts: list[str] = []
    run: list[str] = []  # bare words of the text term being collected
    weight = ""  # the weight written before the run ("0.5*red square")

    def close_run() -> None:
        nonlocal weight
        if run:
            parts.append(weight + _quote_word(" ".join(run)))
            run.clear()
        weight = ""

    for i, word in enumerate(words):
        weighted = _WEIGHTED_WORDS.match(word)
        after_star = i > 0 and words[i - 1] == "*" and _NUMBER.fullmatch(word)
        if weighted and '"' not in word and not word.startswith("image:"):
            close_run()
            weight = f"{weighted.group(1)}*"
            run.append(weighted.group(2))
        elif _is_query_syntax(word) or after_star:
            close_run()
            parts.append(word)
        else:
            run.append(word)
    close_run()
    return " ".join(parts)


def command_line_query(
    words: str | Sequence[str] | None, image: str | os.PathLike | None = None
) -> Query:
    """The query of ``coembed search``: the positional text and ``--image``, as one Query.

    ``words`` may be the shell's word list (``"a red circle" - "red"`` typed without outer
    quotes arrives as ``['a red circle', '-', 'red']``; ``a blue circle`` as three words): see
    the module docstring. With ``--image`` the image is the first term and the text, if any,
    follows it.
    """
    query: str | None
    if isinstance(words, (list, tuple)):
        query = words[0] if len(words) == 1 else (_join_shell_words(words) if words else None)
    else:
        query = words  # type: ignore[assignment]
    if image is None:
        if query is None:
            raise UsageError("give a text query or --image PATH")
        return parse_query(query)
    first = Term(1.0, "image", os.fspath(image))
    if query is None or not str(query).strip():
        return Query((first,))
    rest = parse_query(str(query)).terms
    return Query((first, *rest))


def check_images(query: Query, known: Collection[str] = ()) -> None:
    """Raise ImageError unless every image term (but those in ``known``) is a file that decodes.

    Checked before any embedding so that a typo in a path costs nothing; a folder would
    otherwise be expanded into every image in it.
    """
    from coembed.data.images import open_image

    for term in query.terms:
        if term.kind == "image" and term.value not in known:
            if not Path(term.value).is_file():
                raise ImageError(f"{term.value}: no such image file (a query image must be a file)")
            open_image(term.value)


def combine_terms(query: Query, vectors: Sequence[np.ndarray]) -> np.ndarray:
    """The query's (D,) float32 unit vector from one (D,) vector per term, in the query's order.

    THE query arithmetic: each term's vector is L2-normalized, weighted, summed, and the sum
    renormalized. Raises UsageError when the terms cancel out (the sum is zero).
    """
    if len(vectors) != len(query.terms):
        raise ValueError(f"{len(vectors)} vectors for the {len(query.terms)} terms of {query}")
    total = np.zeros(np.shape(vectors[0])[-1], np.float64)  # (D,)
    for term, vector in zip(query.terms, vectors):
        vector = np.asarray(vector, np.float64).reshape(-1)  # (D,)
        total += term.weight * vector / max(np.linalg.norm(vector), 1e-12)
    norm = np.linalg.norm(total)
    if norm < 1e-6:
        raise UsageError(f"query {str(query)!r}: the terms cancel out (the sum is zero)")
    return (total / norm).astype(np.float32)


def embed_query(
    query: Query | str, embedder: Embedder, known: Mapping[str, np.ndarray] | None = None
) -> np.ndarray:
    """The query's unit vector, (D,) float32: sum of weight * normalized term, renormalized.

    Image terms whose value is in ``known`` (as ``item_vectors`` gives) take that vector; the
    others are image files.
    """
    if isinstance(query, str):
        query = parse_query(query)
    known = known or {}
    check_images(query, known)
    texts = [t.value for t in query.terms if t.kind == "text"]
    images = [t.value for t in query.terms if t.kind == "image" and t.value not in known]
    text_emb = iter(embedder.embed_texts(texts)) if texts else iter(())
    image_emb = iter(embedder.embed_images(images)) if images else iter(())
    vectors = [
        next(text_emb)
        if term.kind == "text"
        else (known[term.value] if term.value in known else next(image_emb))
        for term in query.terms
    ]
    return combine_terms(query, vectors)
