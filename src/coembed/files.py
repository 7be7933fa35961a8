"""The small file rules every writer shares: write to a temporary name, then rename into place.

A reader (or a crash) sees the old file or the new one, never half of one. Temporaries are
named ``.<name>.<8 chars>.tmp`` beside their target, so a restarted job can find and remove
exactly those a kill left behind.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path


def is_atomic_temporary(name: str) -> bool:
    """Whether ``name`` is one of ``atomic_write``'s temporaries (``.<name>.<8 chars>.tmp``)."""
    return re.fullmatch(r"\..+\.[A-Za-z0-9_]{8}\.tmp", name) is not None


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Write a file via ``write(tmp_path)`` then rename over ``path``; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp makes the file private (0600); give it the mode a plain open() would under the umask.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
