"""Recall tuned to a target: choose HNSW's efSearch or IVF's nprobe at build time.

A sample of the collection's own vectors is held out as queries. Their exact 10 nearest
neighbours (the query itself left out, since an index finds a stored vector trivially) come
from a scan over every vector, block by block, so the collection need not be in memory. Then
the candidate settings are tried from the cheapest up: each one's recall@10 against the exact
neighbours and its single-query latency are measured, and the first that reaches the target by
a standard error of its mean is kept (recall and latency both grow with the setting, so the
first is the fastest that reaches it). The margin is for queries that are not in the sample: a
setting that only just reaches the target on it falls short as often as not on others (at 10M
vectors nprobe 96 gave 0.950 on the sample and 0.948 on 1,000 new queries). When none does, the
largest is kept and the report says by how much it falls short.

The choice is stored in the manifest (``params`` and ``tuning``) and printed by
``coembed index``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from coembed.errors import UsageError
from coembed.progress import progress_bar

DEFAULT_TARGET = 0.95
SAMPLE = 1000  # held-out query vectors (recall is their average: ~0.003 standard error at 0.95)
TIMED = 200  # of those, timed one at a time for the latency
K = 10
EF_SEARCH = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
NPROBE = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048)
BLOCK = 65_536  # vectors per block of the exact scan
ROUTING_EF = 512  # above this efSearch, `auto` also tries IVF-Flat and keeps the faster


@dataclass
class Trial:
    """One setting tried: its value, recall@10 on the sample (and the standard error of that
    mean) and median single-query ms."""

    value: int
    recall: float
    p50_ms: float
    stderr: float = 0.0

    def sure_to_reach(self, target: float) -> bool:
        return self.recall - self.stderr >= target


@dataclass
class Tuning:
    """What ``tune_recall`` chose and saw; stored in the manifest as ``tuning``."""

    parameter: str  # "efSearch" or "nprobe"
    value: int
    target: float
    recall: float
    p50_ms: float
    sample: int
    reached: bool
    trials: list[Trial] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    def needs_routing(self) -> bool:
        """An HNSW graph that reaches the target only at a high efSearch, or not at all: the
        collection's clusters are far apart, and an IVF index may serve it better."""
        return self.parameter == "efSearch" and (not self.reached or self.value > ROUTING_EF)

    def beats(self, other: Tuning) -> bool:
        """Reaches the target faster than ``other``, or comes closer when neither does."""
        if self.reached != other.reached:
            return self.reached
        return self.p50_ms < other.p50_ms if self.reached else self.recall > other.recall

    def summary(self) -> str:
        """One line for the command's output."""
        line = (
            f"{self.parameter} {self.value}: recall@{K} {self.recall:.3f} on {self.sample} "
            f"held-out vectors (target {self.target:.2f}), {self.p50_ms:.2f} ms per query"
        )
        if not self.reached:
            line += f"; the target was not reached at the largest {self.parameter} tried"
        return line


def check_target(target: float) -> None:
    if not 0 < target <= 1:
        raise UsageError(f"--target-recall must be in (0, 1], got {target}")


def sample_ids(n: int, size: int = SAMPLE, seed: int = 0) -> np.ndarray:
    """Sorted ids of the held-out queries: ``size`` of ``n`` drawn without replacement."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, min(size, n), replace=False))


def exact_neighbours(
    queries: np.ndarray, query_ids: np.ndarray, blocks: Iterable[tuple[np.ndarray, np.ndarray]]
) -> np.ndarray:
    """(S, K) ids of each query's K nearest stored vectors by inner product, itself left out.

    ``blocks`` yields (vectors (B, D), their ids (B,), ascending) covering the collection once;
    each is scanned ``BLOCK`` rows at a time, so memory holds S x BLOCK scores at most.
    """
    s = len(queries)
    best_scores = np.full((s, K), -np.inf, np.float32)
    best_ids = np.full((s, K), -1, np.int64)
    rows = np.arange(s)
    for vectors, ids in blocks:
        for start in range(0, len(ids), BLOCK):
            chunk_ids = np.asarray(ids[start : start + BLOCK], np.int64)
            chunk = np.asarray(vectors[start : start + BLOCK], np.float32)
            scores = queries @ chunk.T  # (S, b)
            at = np.minimum(np.searchsorted(chunk_ids, query_ids), len(chunk_ids) - 1)
            own = chunk_ids[at] == query_ids  # the query is in this chunk: not its own neighbour
            scores[rows[own], at[own]] = -np.inf
            scores = np.concatenate([best_scores, scores], axis=1)
            all_ids = np.concatenate([best_ids, np.broadcast_to(chunk_ids, (s, len(chunk_ids)))], 1)
            top = np.argpartition(-scores, K - 1, axis=1)[:, :K]
            best_scores = np.take_along_axis(scores, top, axis=1)
            best_ids = np.take_along_axis(all_ids, top, axis=1)
    return best_ids


def array_blocks(vectors: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The blocks of an in-memory (N, D) array for ``exact_neighbours``."""
    for start in range(0, len(vectors), BLOCK):
        chunk = vectors[start : start + BLOCK]
        yield chunk, np.arange(start, start + len(chunk), dtype=np.int64)


def recall_at_k(found: np.ndarray, exact: np.ndarray, query_ids: np.ndarray) -> float:
    """Mean share of each query's exact neighbours among the ones found (itself left out)."""
    return float(np.mean(recalls_at_k(found, exact, query_ids)))


def recalls_at_k(found: np.ndarray, exact: np.ndarray, query_ids: np.ndarray) -> np.ndarray:
    """(S,) each query's share of its exact neighbours among the ones found (itself left out)."""
    shares = np.empty(len(exact))
    for j, (row, truth, own) in enumerate(zip(found, exact, query_ids)):
        kept = [i for i in row.tolist() if i != own and i >= 0][:K]
        shares[j] = len(set(kept) & set(truth.tolist())) / K
    return shares


def _measure(searcher: Any, queries: np.ndarray, exact: np.ndarray, ids: np.ndarray) -> Trial:
    _, found = searcher.search(queries, K + 1)  # one more: the query itself is stored
    times = []
    for q in queries[:TIMED]:
        start = time.perf_counter()
        searcher.search(q[None, :], K + 1)
        times.append(time.perf_counter() - start)
    shares = recalls_at_k(found, exact, ids)
    stderr = float(shares.std(ddof=1) / np.sqrt(len(shares))) if len(shares) > 1 else 0.0
    return Trial(0, float(shares.mean()), float(np.median(times) * 1e3), round(stderr, 4))


def tune_recall(
    faiss_index: Any,
    kind: str,
    queries: np.ndarray,
    query_ids: np.ndarray,
    exact: np.ndarray,
    target: float = DEFAULT_TARGET,
    progress: bool = True,
    searcher: Any = None,
) -> Tuning | None:
    """Set ``faiss_index``'s efSearch (HNSW) or nprobe (IVF) to the cheapest candidate whose
    recall@10 on ``queries`` reaches ``target``; None for an exact (flat) index. ``searcher``:
    what searches (``coembed.index.rerank.Reranked``), when not ``faiss_index`` itself."""
    check_target(target)
    if kind == "hnsw":
        name, candidates = "efSearch", EF_SEARCH

        def setter(v: int) -> None:
            faiss_index.hnsw.efSearch = v
    elif kind in ("ivfflat", "ivfpq"):
        name = "nprobe"
        candidates = tuple(v for v in NPROBE if v < faiss_index.nlist) + (faiss_index.nlist,)

        def setter(v: int) -> None:
            faiss_index.nprobe = v
    else:
        return None
    searcher = faiss_index if searcher is None else searcher
    return _sweep(name, candidates, setter, searcher, queries, query_ids, exact, target, progress)


def _sweep(
    name: str,
    candidates: tuple[int, ...],
    setter: Callable[[int], None],
    searcher: Any,
    queries: np.ndarray,
    query_ids: np.ndarray,
    exact: np.ndarray,
    target: float,
    progress: bool,
) -> Tuning:
    queries = np.ascontiguousarray(queries, np.float32)
    trials: list[Trial] = []
    with progress_bar(
        total=len(candidates), desc=f"tuning {name}", leave=False, enabled=progress
    ) as bar:
        for value in candidates:
            setter(value)
            trial = _measure(searcher, queries, exact, query_ids)
            trial.value = value
            trials.append(trial)
            bar.update(1)
            if trial.sure_to_reach(target):
                break
    chosen = trials[-1]
    setter(chosen.value)
    return Tuning(
        parameter=name,
        value=chosen.value,
        target=target,
        recall=round(chosen.recall, 4),
        p50_ms=round(chosen.p50_ms, 4),
        sample=len(queries),
        reached=chosen.recall >= target,
        trials=trials,
    )
