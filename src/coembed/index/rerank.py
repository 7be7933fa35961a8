"""Exact re-ranking for IVF-PQ: its candidates re-scored with the stored vectors.

PQ codes rank neighbours only roughly: with D/4 bytes per vector, recall@10 against exact
search stays near 0.4-0.8 even when every list is probed. So an IVF-PQ index keeps each vector
once more, takes ``RERANK_FACTOR`` x k candidates from the PQ codes (more from 4-bit codes) and
returns the k best by their exact inner products, which are then the scores.

A saved index keeps them twice, in two files, so that a search touches little of either:

- ``codes-NNNNNN.npy``: one byte per value (``Codes``: value = low + code x step per dimension,
  a quarter of the float32 size; memory-mapped). The candidates are scored with these first and
  the ``SHORTLIST`` x k best kept. At 10M x 256 and 300 candidates, the shortlist of 40 still
  held every one of the true 10 that the candidates held (recall@10 0.948 both ways).
- ``vectors-NNNNNN.npy``: float32, read row by row (``VectorFile``) for the shortlist only,
  whose exact inner products order the results and are their scores.

Reading rows through a memory map instead costs the same per query, but the kernel maps the
file's neighbouring pages at each fault (fault-around): after 1,000 queries of 300 rows at 10M,
8.6 of the 10.2 GB file counted in the searching process's memory.

Half precision would halve the vectors file, but its rounding (~5e-4 near a cosine of 1)
reorders neighbours that close: on tight clusters recall@10 stopped at 0.84 with float16, as
with the codes alone; so the codes only shortlist, and the exact scores come from float32.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

RERANK_FACTOR = 10  # candidates per result taken from 8-bit PQ codes
# 4-bit codes (fast scan) rank more roughly: at 10M x 256 and nprobe 96, recall@10 was 0.881
# with 10 x k candidates, 0.945 with 30 x k, 0.954 with 100 x k (1.3, 1.5, 1.9 ms per query).
RERANK_FACTOR_4BIT = 30
SHORTLIST = 4  # x k candidates kept by the 8-bit codes, then read and scored exactly
RERANK_DTYPE = np.float32


class Codes:
    """(N, D) vectors stored as one byte per value: value ~ low + code * step, per dimension."""

    def __init__(self, codes: np.ndarray, low: np.ndarray, step: np.ndarray):
        self.codes = codes  # (N, D) uint8, usually memory-mapped
        self.low = np.asarray(low, np.float32)  # (D,)
        self.step = np.asarray(step, np.float32)  # (D,)

    @staticmethod
    def value_range(blocks: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(low, step), each (D,): the per-dimension minimum over ``blocks`` of (B, D) vectors
        and the step that spreads minimum to maximum over the 256 codes."""
        low = high = None
        for block in blocks:
            if not len(block):
                continue
            lo, hi = block.min(axis=0), block.max(axis=0)
            low = lo if low is None else np.minimum(low, lo)
            high = hi if high is None else np.maximum(high, hi)
        if low is None:
            raise ValueError("no vectors to take the range of")
        step = np.maximum((high - low) / 255, np.finfo(np.float32).tiny)  # a constant dimension
        return low.astype(np.float32), step.astype(np.float32)

    def encode(self, vectors: np.ndarray) -> np.ndarray:
        """(B, D) uint8 codes of (B, D) vectors (outside the range: clipped to it)."""
        scaled = np.rint((np.asarray(vectors, np.float32) - self.low) / self.step)
        return np.clip(scaled, 0, 255).astype(np.uint8)

    @classmethod
    def of(cls, vectors: np.ndarray) -> Codes:
        """The codes of in-memory (N, D) vectors, over their own range."""
        low, step = cls.value_range([vectors])
        codes = cls(np.empty((0, vectors.shape[1]), np.uint8), low, step)
        codes.codes = codes.encode(vectors)
        return codes

    def scores(self, ids: np.ndarray, query: np.ndarray) -> np.ndarray:
        """(len(ids),) approximate inner products of rows ``ids`` with ``query`` (D,)."""
        # sum_d (low_d + c_d step_d) q_d = c . (step * q) + low . q
        return self.codes[ids].astype(np.float32) @ (self.step * query) + self.low @ query


class VectorFile:
    """The (N, D) float32 rows of a .npy file, read with ``os.pread`` only when asked for.

    Indexing with ids returns their rows; ``np.asarray`` gives the whole file memory-mapped,
    for readers that want every row (deduplication) rather than a few per query."""

    def __init__(self, path: Path, shape: tuple[int, int], offset: int):
        self.path, self.shape, self.offset = Path(path), shape, offset
        self.dtype = np.dtype(RERANK_DTYPE)
        self._row_bytes = shape[1] * self.dtype.itemsize
        self._fd: int | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, ids: Any) -> np.ndarray:
        """(D,) for one id, (len(ids), D) for an array of ids."""
        if np.ndim(ids) == 0:
            return self[np.asarray([ids])][0]
        ids = np.asarray(ids, np.int64)
        if len(ids) and (ids.min() < -len(self) or ids.max() >= len(self)):
            raise IndexError(f"row ids out of range for {len(self)} rows")
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        out = np.empty((len(ids), self.shape[1]), self.dtype)  # (n, D)
        rows = out.view(np.uint8).reshape(len(ids), self._row_bytes)
        for j, i in enumerate((ids % len(self)).tolist()):
            rows[j] = np.frombuffer(
                os.pread(self._fd, self._row_bytes, self.offset + i * self._row_bytes), np.uint8
            )
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        mapped = np.load(self.path, mmap_mode="r", allow_pickle=False)
        return mapped if dtype is None else mapped.astype(dtype, copy=False)

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)


@dataclass
class RerankVectors:
    """What IVF-PQ re-scores its candidates with: the exact vectors (in memory, or a file read
    row by row) and, optionally, their 8-bit codes to shortlist with first."""

    vectors: np.ndarray | VectorFile  # (N, D) float32
    codes: Codes | None = None

    @classmethod
    def in_memory(cls, vectors: np.ndarray) -> RerankVectors:
        vectors = np.array(vectors, RERANK_DTYPE)
        return cls(vectors, Codes.of(vectors))

    def __len__(self) -> int:
        return len(self.vectors)


class Reranked:
    """A FAISS index searched for more candidates, re-scored with ``rerank``'s vectors."""

    def __init__(self, faiss_index: Any, rerank: RerankVectors, factor: int | None = None):
        self.faiss = faiss_index
        self.rerank = rerank
        if factor is None:
            fast_scan = type(faiss_index).__name__.endswith("FastScan")
            factor = RERANK_FACTOR_4BIT if fast_scan else RERANK_FACTOR
        self.factor = factor

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (Q, k), best first, as FAISS's ``search`` returns them."""
        wanted = min(len(self.rerank), max(k, k * self.factor))
        _, candidates = self.faiss.search(queries, wanted)  # (Q, wanted), -1 padded
        scores = np.full((len(queries), k), -np.inf, np.float32)
        ids = np.full((len(queries), k), -1, np.int64)
        for row, (query, found) in enumerate(zip(queries, candidates)):
            found = self.shortlist(np.sort(found[found >= 0]), query, k)
            exact = self.rerank.vectors[found].astype(np.float32) @ query  # (len(found),)
            best = np.argsort(-exact, kind="stable")[:k]
            scores[row, : len(best)] = exact[best]
            ids[row, : len(best)] = found[best]
        return scores, ids

    def shortlist(self, found: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
        """The sorted ids among ``found`` (sorted) worth an exact score: the SHORTLIST x k best
        by the 8-bit codes, or all of them when there are no codes or few candidates."""
        codes, keep = self.rerank.codes, SHORTLIST * k
        if codes is None or len(found) <= keep:
            return found
        approx = codes.scores(found, query)  # (len(found),)
        return np.sort(found[np.argpartition(-approx, keep - 1)[:keep]])
