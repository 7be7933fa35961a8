"""Reading a synthetic caption, or a query in the same words, back into what it describes.

The generator in ``synthetic.py`` phrases every picture from a fixed vocabulary (its templates,
synonyms and plurals), so a caption says exactly which objects a picture holds: shape, colour,
texture and size of each, how many copies, where a lone object sits, and how a pair is
arranged. ``describe`` parses that back; ``differences`` says what a picture's description lacks
of what a query asks for, so a search can be judged by the attributes, not by eye.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from coembed.datasets.synthetic import (
    COLOUR_WORDS,
    COUNTS,
    PLURALS,
    POSITION_WORDS,
    RELATION_WORDS,
    SHAPE_WORDS,
    SIZE_WORDS,
    TEXTURE_ADJ,
    TEXTURE_WITH,
)


def _vocabulary() -> dict[str, tuple[str, str]]:
    """Every word of a noun phrase -> (attribute, value); synonyms and plurals share a value."""
    words = {}
    for shape, names in SHAPE_WORDS.items():
        words.update({name: ("shape", shape) for name in names})
        words.update({PLURALS[name]: ("shape", shape) for name in names})
    for attribute, table in (
        ("colour", COLOUR_WORDS),
        ("size", SIZE_WORDS),
        ("texture", TEXTURE_ADJ),
        ("texture", TEXTURE_WITH),
    ):
        for value, names in table.items():
            words.update({name: (attribute, value) for name in names if name})
    return words


_WORDS = _vocabulary()
# "the middle" and "the centre" name one position; the canonical names are the generator's.
_POSITIONS = {phrase: where for where, phrases in POSITION_WORDS.items() for phrase in phrases}
_RELATIONS = {phrase: rel for rel, phrases in RELATION_WORDS.items() for phrase in phrases}
_COUNTS = {word: n for n, words in COUNTS.items() for word in words}
# Pairs are kept in one order: "A right of B" is "B left of A", "A below B" is "B above A".
_MIRRORED = {"right of": "left of", "below": "above"}
_OPENINGS = ("a picture of ", "there is ", "there are ")


def _alternatives(phrases) -> str:
    """A regex alternation of ``phrases``, longest first so "to the left of" beats "left of"."""
    return "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True))


_RELATION_RE = re.compile(rf" ({_alternatives(_RELATIONS)}) (?=an? )")
_POSITION_RE = re.compile(rf"(?:^| )({_alternatives(_POSITIONS)})(?: |$)")
_COUNT_RE = re.compile(rf"^({_alternatives(_COUNTS)}) ")


@dataclass(frozen=True)
class Thing:
    """One described object; None where the words do not say."""

    shape: str | None = None
    colour: str | None = None
    texture: str | None = None
    size: str | None = None


@dataclass(frozen=True)
class Description:
    """What a caption or query says a picture holds.

    One object (``count`` copies of it, a lone one at ``position``), or two different objects in
    a ``relation`` ("left of" or "above": ``things[0]`` is left of / above ``things[1]``).
    """

    things: tuple[Thing, ...]
    count: int = 1
    position: str | None = None
    relation: str | None = None

    @property
    def kind(self) -> str:
        """'one object', 'two alike', 'three alike' or 'two different objects'."""
        if len(self.things) == 2:
            return "two different objects"
        return "one object" if self.count == 1 else f"{COUNTS[self.count][0]} alike"

    def as_picture(self) -> Description:
        """The description of a picture its caption gives: an unnamed texture is solid (the
        generator leaves "solid" out of some captions)."""
        things = tuple(replace(t, texture=t.texture or "solid") for t in self.things)
        return replace(self, things=things)


def _thing(phrase: str) -> Thing | None:
    """The object a noun phrase ('big red striped circle', 'red disc with dots') names."""
    for joined in ("plus signs", "plus sign", *TEXTURE_WITH["striped"], *TEXTURE_WITH["dotted"]):
        phrase = phrase.replace(joined, joined.replace(" ", "_"))
    found: dict[str, str] = {}
    for word in phrase.split():
        attribute, value = _WORDS.get(word.replace("_", " "), (None, None))
        if attribute is None or attribute in found:
            return None  # a word outside the generator's vocabulary, or one attribute twice
        found[attribute] = value
    return Thing(**found) if "shape" in found else None


def _article_phrase(phrase: str) -> Thing | None:
    """A noun phrase after its article ('a', 'an')."""
    first, _, rest = phrase.partition(" ")
    return _thing(rest) if first in ("a", "an") else None


def describe(text: str) -> Description | None:
    """The description a caption or query in the generator's words gives; None for other text."""
    text = " ".join(text.lower().replace(",", " ").split())
    text = next((text[len(o) :] for o in _OPENINGS if text.startswith(o)), text)
    relation = _RELATION_RE.search(text)
    if relation:
        first = _article_phrase(text[: relation.start()])
        second = _article_phrase(text[relation.end() :])
        if first is None or second is None:
            return None
        rel = _RELATIONS[relation.group(1)]
        if rel in _MIRRORED:
            return Description((second, first), relation=_MIRRORED[rel])
        return Description((first, second), relation=rel)
    position = _POSITION_RE.search(text)
    if position:
        text = (text[: position.start()] + " " + text[position.end() :]).strip()
    text = " ".join(w for w in text.split() if w != "placed")
    count = _COUNT_RE.match(text)
    if count:
        thing = _thing(text[count.end() :])
    else:
        thing = _article_phrase(text)
    if thing is None:
        return None
    where = _POSITIONS[position.group(1)] if position else None
    return Description((thing,), _COUNTS[count.group(1)] if count else 1, where)


def differences(wanted: Description, found: Description) -> list[str]:
    """What ``found`` (a picture's description) shows instead of what ``wanted`` (a query) asks
    for, one entry per attribute, e.g. ``["square, not star"]``; empty when it matches."""
    if wanted.kind != found.kind:
        return [f"{found.kind}, not {wanted.kind}"]
    out = []
    for attribute in ("position", "relation"):
        want, got = getattr(wanted, attribute), getattr(found, attribute)
        if want is not None and want != got:
            out.append(f"{got or 'no ' + attribute}, not {want}")
    for want_thing, got_thing in zip(wanted.things, found.things):
        for attribute in ("size", "colour", "texture", "shape"):
            want, got = getattr(want_thing, attribute), getattr(got_thing, attribute)
            if want is not None and want != got:
                out.append(f"{got or 'no ' + attribute}, not {want}")
    return out
