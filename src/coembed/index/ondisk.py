"""IVF-PQ bigger than memory: trained on a sample, filled part by part, its lists merged on disk.

(While its codes fit ``kinds.IN_MEMORY_CODES_MAX``, IVF-PQ keeps them in memory instead, 4 bits
each for FAISS's fast scan: ``fill_in_memory``.)

The build never holds more than one part's vectors and the training sample: IVF-PQ is trained
on a sample drawn from every part, each part's vectors are added to a copy of the trained index
(its inverted lists small: the PQ codes and ids of one part) written to a block file, and the
blocks' lists are merged into one ``.ivfdata`` file (FAISS's on-disk inverted lists). The index
file then holds the coarse quantizer and the PQ codebooks only (a few MB); a search maps the
``.ivfdata`` file and reads the lists it probes, so memory holds what queries touch.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from coembed.index.kinds import (
    faiss_quiet,
    import_faiss,
    ivfpq_shape,
    trained_ivfpq,
    training_sample_size,
)
from coembed.progress import progress_bar

Blocks = Callable[[], Iterator[tuple[int, np.ndarray, np.ndarray]]]  # (part, vectors, ids)


def rows_of(blocks: Blocks, wanted: np.ndarray, dim: int) -> np.ndarray:
    """The (len(wanted), D) vectors of the sorted ids ``wanted``, gathered part by part."""
    out = np.empty((len(wanted), dim), np.float32)
    for _, vectors, ids in blocks():
        if not len(ids):
            continue
        lo, hi = np.searchsorted(wanted, [ids[0], ids[-1] + 1])
        out[lo:hi] = vectors[wanted[lo:hi] - ids[0]]
    return out


def train_on_parts(blocks: Blocks, n: int, dim: int) -> tuple[Any, dict[str, int]]:
    """An empty IVF-PQ index for ``n`` vectors, trained on a sample drawn from every part."""
    shape = ivfpq_shape(n, dim)
    rng = np.random.default_rng(0)
    sample_ids = np.sort(rng.choice(n, training_sample_size(n, shape), replace=False))
    sample = rows_of(blocks, sample_ids, dim)
    return trained_ivfpq(import_faiss(), sample, shape), shape


def fill_in_memory(
    trained: Any, blocks: Iterable[tuple[int, np.ndarray, np.ndarray]], total: int
) -> Any:
    """Add every part's vectors to ``trained`` itself, lists in memory (ids: the parts' ids,
    which run on from 0 as FAISS numbers what it is given)."""
    with progress_bar(total=total, unit="vec", desc="adding to IVF-PQ", leave=False) as bar:
        for _, vectors, ids in blocks:
            if len(ids) and ids[0] != trained.ntotal:
                raise ValueError(f"part ids start at {ids[0]}, the index holds {trained.ntotal}")
            trained.add(vectors)
            bar.update(len(ids))
    return trained


def fill_on_disk(
    trained: Any, blocks: Iterable[tuple[int, np.ndarray, np.ndarray]], ivfdata: Path, total: int
) -> Any:
    """Add every part's vectors (with their ids) to ``trained``'s lists, stored in ``ivfdata``."""
    from faiss.contrib.ondisk import merge_ondisk

    faiss = import_faiss()
    work = Path(tempfile.mkdtemp(prefix=".blocks-", suffix=".tmp", dir=ivfdata.parent))
    try:
        names = []
        with progress_bar(total=total, unit="vec", desc="adding to IVF-PQ", leave=False) as bar:
            for number, vectors, ids in blocks:
                block = faiss.clone_index(trained)
                block.add_with_ids(vectors, ids)
                names.append(str(work / f"block-{number:06d}.faiss"))
                faiss.write_index(block, names[-1])
                bar.update(len(ids))
        index = faiss.clone_index(trained)
        with faiss_quiet():
            merge_ondisk(index, names, str(ivfdata))
        return index
    except BaseException:
        ivfdata.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
