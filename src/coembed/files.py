"""The small file rules every writer shares: write to a temporary name, then rename into place.

A reader (or a crash) sees the old file or the new one, never half of one. Temporaries are
named ``.<name>.<8 chars>.tmp`` beside their target, so a restarted job can find and remove
exactly those a kill left behind. A folder that must change as a whole (an export, a converted
model) is built in such a hidden folder and swapped into place (``staged_folder``). A write that
fails for lack of space raises ``DiskFull`` instead of each library's own error. An output must
not be, contain, or lie inside one of the command's inputs (``refuse_overlap``). A file a user
names is read only if it is a regular file, within a size bound (``read_regular_file``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path

from coembed.errors import CoembedError, DiskFull, UsageError

# Below this many free bytes, a write that failed without saying why failed for lack of space:
# torch.save reports a full disk only as "unexpected pos" (the failed file holds the rest).
_NEARLY_FULL = 256 * 1024
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How safetensors (Rust), FAISS (C++) and tokenizers word ENOSPC / EDQUOT in their own errors.
_NO_SPACE_WORDS = ("no space left", "os error 28", "disk quota exceeded", "os error 122")


def is_atomic_temporary(name: str) -> bool:
    """Whether ``name`` is one of ``atomic_write``'s temporaries (``.<name>.<8 chars>.tmp``)."""
    return re.fullmatch(r"\..+\.[A-Za-z0-9_]{8}\.tmp", name) is not None


def umask_mode(mode: int) -> int:
    """``mode`` under the process's umask: what a plain open() (0o666) or mkdir() (0o777) gives."""
    umask = os.umask(0)  # the only way to read it is to set it: put it straight back
    os.umask(umask)
    return mode & ~umask


def write_temporary(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Write a file via ``write(tmp_path)`` to a temporary beside ``path`` and fsync it; returns
    the temporary, for the caller to rename into place. On failure nothing is left behind, and
    a lack of space raises DiskFull."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file private (0600), and a writer may make the file anew (safetensors
        # does, 0600 again): give the result the mode a plain open() would under the umask.
        os.chmod(tmp, umask_mode(0o666))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except BaseException as exc:
        full = is_disk_full(exc, path.parent)  # before the temporary frees its space
        Path(tmp).unlink(missing_ok=True)
        if full:
            raise disk_full(path, exc) from None
        raise
    return Path(tmp)


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Write a file via ``write(tmp_path)`` then rename over ``path``; returns ``path``."""
    tmp = write_temporary(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Path(path)


def atomic_write_all(writes: Mapping[Path, Callable[[str], object]]) -> None:
    """Write several files, each as ``atomic_write`` does, renaming them into place only once
    every one is written in full (so a failure replaces none of them)."""
    done: list[tuple[Path, Path]] = []
    try:
        for path, write in writes.items():
            done.append((write_temporary(path, write), Path(path)))
    except BaseException:
        for tmp, _ in done:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, path in done:
        os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


# --- a full disk ---------------------------------------------------------------------------------


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Bytes an unprivileged writer may still use on ``folder``'s file system (None if unknown)."""
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def is_disk_full(exc: BaseException, folder: str | os.PathLike) -> bool:
    """Whether a write into ``folder`` failed with ``exc`` for lack of space: its errno or message
    says so, or (for writers that say neither) the file system has no room left."""
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE_ERRNOS:
        return True
    if not isinstance(exc, Exception) or isinstance(exc, CoembedError):
        return False
    if any(words in str(exc).lower() for words in _NO_SPACE_WORDS):
        return True
    free = free_bytes(folder)
    return free is not None and free < _NEARLY_FULL


def disk_full(path: str | os.PathLike, exc: BaseException) -> DiskFull:
    """The one error for a write of ``path`` that ran out of space."""
    free = free_bytes(Path(path).parent)
    left = f" ({free / 1e6:.1f} MB free)" if free is not None else ""
    quota = isinstance(exc, OSError) and exc.errno == errno.EDQUOT
    what = "Disk quota exceeded" if quota else "No space left on device"
    return DiskFull(
        f"{path}: {what}{left}; nothing was replaced: free some space (or write elsewhere) "
        "and run again"
    )


# --- folders committed as a whole ---------------------------------------------------------------


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make the renames in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the C library or the file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def commit_folder(stage: Path, target: Path) -> None:
    """Put the complete folder ``stage`` in ``target``'s place; an old ``target`` is moved aside
    (swapped with ``stage`` in one step where the system can) and deleted after."""
    fsync_dir(stage)
    if not target.exists():
        os.rename(stage, target)
        fsync_dir(target.parent)
        return
    if not _exchange(stage, target):
        # Two renames: a kill between them leaves the old folder at .<name>.<8 chars>.old,
        # which clean_leftovers puts back.
        aside = stage.with_name(stage.name[: -len(".tmp")] + ".old")
        os.rename(target, aside)
        os.rename(stage, target)
        stage = aside
    fsync_dir(target.parent)
    shutil.rmtree(stage, ignore_errors=True)  # the old folder


def _leftover_pattern(target: Path) -> re.Pattern:
    return re.compile(rf"\.{re.escape(target.name)}\.[A-Za-z0-9_]{{8}}\.(tmp|old)")


def clean_leftovers(target: str | os.PathLike) -> None:
    """Delete what a killed write of ``target`` left beside it: staged folders and temporaries
    named ``.<name>.<8 chars>.tmp``, and an old copy moved aside (``.old``), which is put back
    first if the kill came before the new one was in place. Call it holding the target's lock."""
    target = Path(target).resolve()
    if not target.parent.is_dir():
        return
    pattern = _leftover_pattern(target)
    for path in sorted(target.parent.iterdir()):
        found = pattern.fullmatch(path.name)
        if not found:
            continue
        if found.group(1) == "old" and not target.exists():
            os.rename(path, target)
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike) -> Iterator[Path]:
    """A hidden empty folder beside ``target`` to build it in: when the block ends normally it
    replaces ``target`` as a whole; when it fails (or is interrupted) it is deleted.

    A failure for lack of space becomes one DiskFull. Hold the target's lock around it. A
    symlink to a folder is followed: the folder it names is replaced.
    """
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(stage, umask_mode(0o777))  # mkdtemp makes it private (0700)
    try:
        yield stage
        commit_folder(stage, target)
    except BaseException as exc:
        full = is_disk_full(exc, target.parent)
        shutil.rmtree(stage, ignore_errors=True)
        if full:
            raise disk_full(target, exc) from None
        raise


# --- outputs apart from inputs --------------------------------------------------------------------


def _is_local(path: str | os.PathLike) -> bool:
    text = os.fspath(path)
    return "://" not in text and not text.startswith("pipe:")


def refuse_overlap(
    output: str | os.PathLike,
    inputs: Mapping[str, str | os.PathLike | None],
    flag: str = "--output",
) -> None:
    """UsageError when ``output`` is one of ``inputs`` (named by their option), lies inside one,
    or contains one: writing it could replace or delete that input."""
    out = Path(output).resolve()
    for name, given in inputs.items():
        if given is None or not _is_local(given):
            continue
        source = Path(given).resolve()
        if out == source:
            problem = f"is the same as {name} {given}"
        elif source in out.parents:
            problem = f"is inside {name} {given}"
        elif out in source.parents:
            problem = f"contains {name} {given}"
        else:
            continue
        raise UsageError(
            f"{flag} {output} {problem}: writing it would change that input; "
            f"choose an {flag} apart from the inputs"
        )


def check_replaceable(
    output: str | os.PathLike, expected: Collection[str], what: str, overwrite: bool
) -> None:
    """UsageError unless ``output`` is new, an empty folder, or (with ``overwrite``) a folder
    holding nothing but the files ``expected`` of ``what`` (such as "an ONNX export")."""
    output = Path(output)
    if not output.exists():
        return
    if not output.is_dir():
        raise UsageError(f"--output {output} is not a directory; give a folder for {what}")
    names = sorted(p.name for p in output.iterdir())
    foreign = [name for name in names if name not in expected]
    if foreign:
        raise UsageError(
            f"--output {output} holds {foreign[0]}, which is not part of {what}; "
            "choose a new or empty folder"
        )
    if names and not overwrite:
        raise UsageError(f"--output {output} already holds {what}; add --overwrite to replace it")


# --- reading a file a user named -----------------------------------------------------------------


class NotRegularFile(OSError):
    """A path that names a FIFO, a device or a socket: reading it could block or never end."""


class FileTooLarge(OSError):
    """A regular file over the size a reader accepts."""


_SPECIAL_FILES = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _check_regular(mode: int) -> None:
    if stat.S_ISDIR(mode):
        raise IsADirectoryError("is a folder, not a file")
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _SPECIAL_FILES if test(mode)), "not a regular file")
        raise NotRegularFile(f"is {kind}, not a regular file")


def read_regular_file(path: str | os.PathLike, max_bytes: int | None = None) -> bytes:
    """The bytes of the regular file at ``path`` (a symlink to one is fine), at most ``max_bytes``.

    A folder raises IsADirectoryError; a FIFO, device or socket raises NotRegularFile, checked
    before the open (/dev/zero would never end, a FIFO blocks until a writer comes); a file over
    ``max_bytes`` raises FileTooLarge, by its size and again while reading, so a file that grows
    meanwhile is still bounded. Other OSErrors (missing, permission) pass through.
    """
    _check_regular(os.stat(path).st_mode)
    # Non-blocking, so a FIFO swapped in after the check cannot hang the open; fstat then
    # checks what was actually opened.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        _check_regular(st.st_mode)
        if max_bytes is None:
            return f.read()
        if st.st_size > max_bytes:
            raise FileTooLarge(f"{st.st_size:,} bytes is over the limit of {max_bytes:,}")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FileTooLarge(f"over {max_bytes:,} bytes, the limit")
    return data
