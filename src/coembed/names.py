"""Names users give us (file names, paths, class folders): checked on the way in, escaped on
the way out.

In: no file name can hold a NUL byte, and the OS calls that would see one fail with a bare
``ValueError``; ``check_path`` turns that into one ``UsageError`` where a path enters.

Out: a file name may hold any byte but ``/`` and NUL, newlines and terminal escape sequences
included. Printed as it is, ``evil\\nfake line`` adds a line to a results list and ``ESC[2J``
clears the screen. ``escape_name`` shows every character that does not print (control and
format characters, line separators, undecodable bytes) as a Python-style escape, so a name
always prints as one visible line. Machine-readable output (``--json``) needs none of this.
"""

from __future__ import annotations

import os

from coembed.errors import UsageError

_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(char: str) -> str:
    if char in _SHORT:
        return _SHORT[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escape_name(name: object) -> str:
    """``name`` as text in which every non-printing character is a visible escape (``\\n``,
    ``\\x1b``, ``\\u202e``...); printable text, spaces and accents included, is unchanged."""
    text = os.fspath(name) if isinstance(name, os.PathLike) else str(name)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escaped(c) for c in text)


def check_path(path: str | os.PathLike, what: str) -> str | os.PathLike:
    """``path``, after checking it can name a file (no NUL byte); else UsageError naming
    ``what`` (an option such as ``--output``, or a parameter)."""
    text = os.fspath(path)
    if ("\0" if isinstance(text, str) else b"\0") in text:
        raise UsageError(
            f"{what}: {escape_name(text)!s} holds a NUL byte (\\x00), which no file name can; "
            "check how the path was typed or generated"
        )
    return path
