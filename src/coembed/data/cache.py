"""Decode every image once into a uint8 memory-mapped array, and reuse it on the next run.

The cache for a list of images at a given size is one ``.npy`` file of shape (N, C, C, 3), each
row the image resized (shortest side C, bicubic) and center-cropped square, plus a ``.json``
sidecar saying which rows failed and why. The file *name* is a hash of (the source list, C), so
one dataset at one size has one cache file; the sidecar holds a fingerprint of every source's
size and mtime, and a changed fingerprint rebuilds the file in place. Both files are written
under temporary names and renamed (the sidecar last, marking the cache complete), and a lock
file makes concurrent processes (DDP ranks) build it once and share it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing as mp
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coembed.data.formats import TarMember
from coembed.data.images import ImageReadError, describe, open_image
from coembed.data.transforms import center_crop, resize_shortest
from coembed.files import disk_full, is_disk_full
from coembed.process import worker_signals
from coembed.progress import progress_bar

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when decode_square changes, so old caches are rebuilt
PARALLEL_MIN_IMAGES = 64  # below this a process pool costs more than it saves

Source = str | TarMember


CACHE_SCALE = 8 / 7  # the cached squares' default side per model side (224 -> 256)


def cache_size_for(image_size: int, scale: float = CACHE_SCALE) -> int:
    """Side of the cached squares: image_size * scale (224 -> 256 at 8/7), room for random crops."""
    return int(round(image_size * scale))


# Training sees other pixels than evaluation, which decodes fully and resizes once to the model's
# size (open_clip's transform, kept exact for imported weights): JPEGs decode here at a reduced
# scale (draft mode), every image is resized twice (bicubic to the cached square, then the crop
# bilinear to the model's size), and random crops zoom in. Measured on the icons, kept as it is
# (benchmarks/RESULTS.md, "Train/eval pixels", benchmarks/bench_pixels.py):
# - the decode and the two resizes cost no recall: two 5-epoch models, their test theme embedded
#   from eval's pixels and from the cached square resized whole, mean R@1/5/10 0.0417 vs 0.0421
#   and 0.0425 vs 0.0461; validation 0.0458 vs 0.0441 and 0.0435 vs 0.0440. The icons are PNGs,
#   so draft decoding is not in these numbers.
# - the zoom of random crops (0.8-1 of the area) is the train/test discrepancy every
#   random-resized-crop recipe has (open_clip's too): shown the centre crop of training's mean
#   area, the same models scored 0.0454 and 0.0480 on the test theme.
# - at 32 px from 64 px icons, a square of twice the model's side (``data.cache_scale=2``, crops
#   resized from the source's pixels, sharper) read more on the thin line-art of one unseen theme
#   (breeze, 14 epochs, two seeds: test R@10 0.13 against 0.10-0.11) and tied on the theme that
#   chooses (validation mean R 0.105 / 0.103 against 0.109 / 0.106), so 8/7 stays the default.
def decode_square(source: Source, size: int, max_pixels: int = 64_000_000) -> np.ndarray:
    """Decode, resize the shortest side to ``size`` and center crop: uint8 (size, size, 3)."""
    im = open_image(source, max_pixels=max_pixels, min_size=size)
    return np.asarray(center_crop(resize_shortest(im, size), size), dtype=np.uint8)


def _stat_key(source: Source, tar_stats: dict[str, str]) -> str:
    """'size:mtime' of a file (the shard's for a tar member); '-' if it does not exist."""
    path = source.tar_path if isinstance(source, TarMember) else source
    if path not in tar_stats:
        try:
            st = os.stat(path)
            key = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            key = "-"
        if isinstance(source, TarMember):
            tar_stats[path] = key  # many members share one shard: stat it once
        return key
    return tar_stats[path]


def _names_hash(sources: Sequence[Source], size: int, max_pixels: int) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}|{size}|{max_pixels}|{len(sources)}".encode())
    for s in sources:
        h.update(describe(s).encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()[:20]


def fingerprint(sources: Sequence[Source]) -> str:
    """A hash of every source's size and mtime: changes when any image is edited or appears."""
    h = hashlib.sha256()
    tar_stats: dict[str, str] = {}
    for s in sources:
        h.update(_stat_key(s, tar_stats).encode() + b"\0")
    return h.hexdigest()


@dataclass
class DecodedImages:
    """The decoded squares (N, C, C, 3) uint8, and the rows that failed: index -> reason."""

    array: np.ndarray
    failures: dict[int, str]
    path: str | None  # the cache file, or None when held in memory only
    reused: bool


# ---------------------------------------------------------------------------------- decoding

_worker_state: dict = {}


def _worker_init(npy_path: str, sources: Sequence[Source], size: int, max_pixels: int) -> None:
    # Rows are written with plain file writes, not through a memmap: the file is sparse, and a
    # memmap writing into a hole of a full disk gets SIGBUS, where a write raises ENOSPC.
    offset = np.load(npy_path, mmap_mode="r").offset
    _worker_state.update(
        file=open(npy_path, "r+b"),  # closed by _close_worker_file
        offset=offset,
        row_bytes=size * size * 3,
        sources=sources,
        size=size,
        max_pixels=max_pixels,
    )


def _close_worker_file() -> None:
    f = _worker_state.get("file")
    if f is not None:
        f.close()


def _pool_worker_init(*args) -> None:
    worker_signals()
    _worker_init(*args)


def _decode_into(indices: list[int]) -> list[tuple[int, str | None]]:
    """Decode rows into the shared .npy file; return (index, failure reason or None) per row."""
    s = _worker_state
    results = []
    for i in indices:
        try:
            square = decode_square(s["sources"][i], s["size"], s["max_pixels"])
        except ImageReadError as e:
            results.append((i, e.reason))
            continue
        s["file"].seek(s["offset"] + i * s["row_bytes"])
        s["file"].write(np.ascontiguousarray(square, dtype=np.uint8).tobytes())
        results.append((i, None))
    s["file"].flush()
    return results


def _chunks(n: int, chunk: int) -> Iterator[list[int]]:
    for start in range(0, n, chunk):
        yield list(range(start, min(n, start + chunk)))


def _decode_all(
    npy_path: str, sources: Sequence[Source], size: int, max_pixels: int, num_workers: int
) -> dict[int, str]:
    """Fill the (already created) .npy at npy_path; returns failures: index -> reason."""
    failures: dict[int, str] = {}
    bar = progress_bar(
        total=len(sources),
        desc=f"decoding images ({size}px cache)",
        unit="img",
        leave=False,
        on_pipes=True,
    )
    chunk = 16
    if num_workers <= 1 or len(sources) < PARALLEL_MIN_IMAGES:
        _worker_init(npy_path, sources, size, max_pixels)
        results: Iterator = map(_decode_into, _chunks(len(sources), chunk))
        pool = None
    else:
        # fork: the workers inherit the source list instead of pickling it, and only use PIL
        # and numpy, so the usual fork-after-threads hazards of torch do not apply.
        methods = mp.get_all_start_methods()
        ctx = mp.get_context("fork" if "fork" in methods else "spawn")
        pool = ctx.Pool(num_workers, _pool_worker_init, (npy_path, sources, size, max_pixels))
        results = pool.imap_unordered(_decode_into, _chunks(len(sources), chunk))
    try:
        for part in results:
            for i, reason in part:
                if reason is not None:
                    failures[i] = reason
            bar.update(len(part))
    except BaseException:
        if pool is not None:
            pool.terminate()  # an interrupt or error: do not wait for the remaining images
        raise
    finally:
        bar.close()
        _close_worker_file()
        _worker_state.clear()
        if pool is not None:
            pool.close()
            pool.join()
    return failures


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive lock across processes (DDP ranks) while one of them builds the cache."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; atomic renames still keep the cache consistent
        yield
        return
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load_if_valid(npy: Path, meta: Path, n: int, size: int, fp: str) -> DecodedImages | None:
    try:
        info = json.loads(meta.read_text())
        if info.get("fingerprint") != fp or info.get("n") != n or info.get("size") != size:
            return None
        array = np.load(npy, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if array.shape != (n, size, size, 3) or array.dtype != np.uint8:
        return None
    failures = {int(k): v for k, v in info["failures"].items()}
    return DecodedImages(array, failures, str(npy), reused=True)


def _build(
    npy_tmp: str, sources: Sequence[Source], size: int, max_pixels: int, workers: int
) -> dict:
    """Create the .npy at ``npy_tmp`` (sized, sparse) and decode every source into it; a full
    disk is DiskFull (the caller removes the file)."""
    try:
        out = np.lib.format.open_memmap(
            npy_tmp, mode="w+", dtype=np.uint8, shape=(len(sources), size, size, 3)
        )
        del out
        return _decode_all(npy_tmp, sources, size, max_pixels, workers)
    except OSError as exc:
        if is_disk_full(exc, Path(npy_tmp).parent):
            raise disk_full(npy_tmp, exc) from None
        raise


def decode_images(
    sources: Sequence[Source],
    size: int,
    cache_dir: str | os.PathLike | None,
    num_workers: int = 2,
    max_pixels: int = 64_000_000,
) -> DecodedImages:
    """Every source decoded to a (size, size, 3) square, from the cache when it is still valid.

    With ``cache_dir=None`` the array is decoded for this run only and held in memory.
    """
    n = len(sources)
    if cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="coembed-decode-") as tmp:
            npy_tmp = os.path.join(tmp, "images.npy")
            failures = _build(npy_tmp, sources, size, max_pixels, num_workers)
            array = np.array(np.load(npy_tmp, mmap_mode="r"))  # copy into RAM before cleanup
        return DecodedImages(array, failures, None, reused=False)

    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    stem = f"images-{size}px-{_names_hash(sources, size, max_pixels)}"
    npy, meta = root / f"{stem}.npy", root / f"{stem}.json"
    fp = fingerprint(sources)
    with _locked(root / f"{stem}.lock"):
        found = _load_if_valid(npy, meta, n, size, fp)
        if found is not None:
            log.info("reusing image cache %s (%d images)", npy, n)
            return found
        log.info("building image cache %s (%d images, %.1f MB)", npy, n, n * size * size * 3 / 1e6)
        meta.unlink(missing_ok=True)  # an old sidecar must not vouch for the new array
        npy_tmp = str(npy) + f".tmp{os.getpid()}"
        try:
            failures = _build(npy_tmp, sources, size, max_pixels, num_workers)
            os.replace(npy_tmp, npy)
        finally:
            Path(npy_tmp).unlink(missing_ok=True)
        info = {
            "version": CACHE_VERSION,
            "n": n,
            "size": size,
            "fingerprint": fp,
            "failures": failures,
        }
        meta_tmp = meta.with_name(meta.name + f".tmp{os.getpid()}")
        meta_tmp.write_text(json.dumps(info))
        os.replace(meta_tmp, meta)
    return DecodedImages(np.load(npy, mmap_mode="r"), failures, str(npy), reused=False)
