"""One writer at a time: an exclusive advisory lock on every model, run folder, index and export
a command writes.

The lock is ``flock`` on a hidden file beside the target, ``.<name>.lock``: beside rather than
inside, because an export is committed by swapping the whole folder, and a lock inside it would
be swapped away with it. The kernel releases an ``flock`` when its holder exits, however it
exits, so a lock file left by a killed process is stale by construction: the next writer locks
it and goes on. The holder writes its pid, host and command into the file, only so that a
second writer's error can name it.

A process may take the same lock again while it holds it (``coembed demo`` holds its run folder
while ``train`` inside it takes the same lock); the lock is released when the outermost holder
leaves. Locks are advisory and POSIX-only: without ``fcntl`` (Windows) writers are not locked.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from coembed.errors import LockHeld

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

# Locks this process holds: lock file -> [fd, depth]. A second flock on a new descriptor of the
# same file would conflict with our own, so a nested take only counts.
_HELD: dict[Path, list[int]] = {}


def lock_path(target: str | os.PathLike) -> Path:
    """The lock file of ``target``: ``.<name>.lock`` beside it (symlinks resolved, so two
    spellings of one folder share one lock)."""
    target = Path(target).resolve()
    return target.parent / f".{target.name}.lock"


def _command() -> str:
    """How this process was started, as a user would type it."""
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if program in ("__main__.py", "coembed", "-c"):
        words = ["coembed", *sys.argv[1:]] if program != "-c" else ["python", "-c", "..."]
    else:
        words = ["python", *sys.argv]
    text = shlex.join(words)
    return text if len(text) <= 200 else text[:197] + "..."


def _describe_holder(fd: int) -> str:
    """Who holds the lock, from what it wrote into the file (it may not have written yet)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        pid, host, command = int(info["pid"]), str(info["host"]), str(info["command"])
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not recorded which yet)"
    since = time.strftime("%H:%M:%S", time.localtime(float(info.get("since", 0))))
    where = "" if host == socket.gethostname() else f" on {host}"
    return f"pid {pid}{where} (`{command}`, since {since})"


def _open_locked(path: Path, target: Path) -> int:
    """Open and lock ``path``; LockHeld when another process holds it."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except PermissionError:  # another user's lock file: flock works read-only too
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise LockHeld(
                f"{target} is being written by {holder}; wait for it to finish (or stop it) "
                "and run again"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # The previous holder removes the file as it leaves: if it did so after we opened it,
        # we hold a lock on a name nobody else sees. Lock what is there now instead.
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _record_holder(fd: int) -> None:
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": _command(),
        "since": time.time(),
    }
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
    except OSError:
        pass  # only the error message of a second writer needs it; a full disk must not stop us


def _missing_parents(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


@contextlib.contextmanager
def writer_lock(target: str | os.PathLike) -> Iterator[Path]:
    """Hold the exclusive lock on ``target`` (a file or folder, existing or not) for the block;
    yields the lock file.

    Raises LockHeld, naming the holder's pid and command, when another process holds it.
    Folders created to hold the lock file are removed again if they are left empty.
    """
    path = lock_path(target)
    held = _HELD.get(path)
    if fcntl is None or held is not None:
        if held is not None:
            held[1] += 1
        try:
            yield path
        finally:
            if held is not None:
                held[1] -= 1
        return
    created = _missing_parents(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = _open_locked(path, Path(target))
    except BaseException:
        _remove_empty(created)
        raise
    _record_holder(fd)
    _HELD[path] = [fd, 1]
    try:
        yield path
    finally:
        del _HELD[path]
        # Unlink while still holding it: a writer that opened the old file finds it gone.
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
        _remove_empty(created)


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (the writer left its output there), or gone already


def holds_lock(target: str | os.PathLike) -> bool:
    """Whether this process holds the lock on ``target``."""
    return lock_path(target) in _HELD
