"""Compact string lists for a loaded index's items and captions.

A Python list of 10M short strings holds ~60 bytes per string besides its text, and 10M empty
caption lists ~64 bytes each: a 10M-item index read from its JSON took 1.4 GB for these alone,
more than its 4-bit PQ codes. ``Strings`` keeps the text in one UTF-8 buffer and an offsets
array (8 bytes per string); ``StringLists`` keeps a list of strings per item the same way. Both
read like lists (index, slice, iterate, ``in``, ``index``) and grow with ``extend``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, overload

import numpy as np

ENCODING, ERRORS = "utf-8", "surrogatepass"  # paths may hold undecodable bytes as surrogates


class Strings(Sequence[str]):
    """Strings in one UTF-8 buffer: string i is ``buffer[offsets[i]:offsets[i + 1]]``."""

    def __init__(self, strings: Iterable[str] = ()):
        self._buffer = b""
        self._offsets = np.zeros(1, np.int64)  # (N + 1,)
        self.extend(strings)

    def extend(self, strings: Iterable[str]) -> None:
        encoded = [s.encode(ENCODING, ERRORS) for s in strings]
        if not encoded:
            return
        lengths = np.fromiter(map(len, encoded), np.int64, count=len(encoded))
        self._offsets = np.concatenate([self._offsets, self._offsets[-1] + np.cumsum(lengths)])
        self._buffer += b"".join(encoded)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]  # negative ids, and IndexError past the end
        start, end = self._offsets[i], self._offsets[i + 1]
        return self._buffer[start:end].decode(ENCODING, ERRORS)

    def __setitem__(self, i: int, value: str) -> None:
        """Replace string ``i`` (the buffer after it moves: for the occasional rename)."""
        i = range(len(self))[i]
        start, end = int(self._offsets[i]), int(self._offsets[i + 1])
        encoded = value.encode(ENCODING, ERRORS)
        self._buffer = self._buffer[:start] + encoded + self._buffer[end:]
        self._offsets[i + 1 :] += len(encoded) - (end - start)

    def __iter__(self) -> Iterator[str]:
        buffer, offsets = self._buffer, self._offsets.tolist()
        for start, end in zip(offsets, offsets[1:]):
            yield buffer[start:end].decode(ENCODING, ERRORS)

    def index(self, value: Any, start: int = 0, stop: int | None = None) -> int:
        """The first id holding ``value``: found in the buffer, not by decoding every string."""
        if not isinstance(value, str):
            raise ValueError(f"{value!r} is not in the list")
        wanted = value.encode(ENCODING, ERRORS)
        start, stop, _ = slice(start, stop).indices(len(self))
        if not wanted:
            empty = np.flatnonzero(np.diff(self._offsets[start : stop + 1]) == 0)
            if len(empty):
                return start + int(empty[0])
            raise ValueError(f"{value!r} is not in the list")
        at = int(self._offsets[start])
        while (at := self._buffer.find(wanted, at)) >= 0:
            # the string holding byte ``at`` (empty strings before it share its offset)
            i = int(np.searchsorted(self._offsets, at, "right")) - 1
            if i >= stop:
                break
            if self._offsets[i] == at and self._offsets[i + 1] - at == len(wanted) and i >= start:
                return i
            at = int(self._offsets[i + 1])  # a match starts a string: go on from the next
        raise ValueError(f"{value!r} is not in the list")

    def __contains__(self, value: object) -> bool:
        try:
            self.index(value)
        except ValueError:
            return False
        return True

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]  # mutable, as a list

    def __repr__(self) -> str:
        return f"Strings({len(self)} strings)"


class StringLists(Sequence[list[str]]):
    """A list of strings per item (captions), all strings in one ``Strings``."""

    def __init__(self, lists: Iterable[Sequence[str]] = ()):
        self._strings = Strings()
        self._starts = np.zeros(1, np.int64)  # (N + 1,): item i's strings start..end
        self.extend(lists)

    def extend(self, lists: Iterable[Sequence[str]]) -> None:
        lists = list(lists)
        if not lists:
            return
        counts = np.fromiter(map(len, lists), np.int64, count=len(lists))
        self._strings.extend(s for strings in lists for s in strings)
        self._starts = np.concatenate([self._starts, self._starts[-1] + np.cumsum(counts)])

    def __len__(self) -> int:
        return len(self._starts) - 1

    @overload
    def __getitem__(self, i: int) -> list[str]: ...
    @overload
    def __getitem__(self, i: slice) -> list[list[str]]: ...
    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]
        return self._strings[int(self._starts[i]) : int(self._starts[i + 1])]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == list(b) for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"StringLists({len(self)} lists)"
