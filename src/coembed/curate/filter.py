"""Filter a collection by a query: every indexed item whose cosine similarity to a text, image or
compositional query reaches a score, or the ``k`` best (clip-retrieval's filter-by-text).

FAISS answers "the k nearest" for every index kind, but "everything above a score" only for some,
so ``ids_above`` asks for k nearest with k growing fourfold until the k-th score falls below the
threshold (or the index is exhausted): exact for a flat index, as good as the index's own search
for HNSW and IVF-PQ.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from coembed.errors import UsageError
from coembed.files import atomic_write_text

if TYPE_CHECKING:
    from coembed.index import Index
    from coembed.index.query import Query

FIRST_K = 64  # the first request; most filters over a collection want tens to hundreds of items


@dataclass
class FilterResult:
    """The items matching one query, best first."""

    index: str
    query: str
    min_score: float | None
    k: int | None
    hits: list[dict[str, Any]]  # {"rank", "id", "score", "item", optional "captions"}


def check_filter_options(min_score: float | None, k: int | None) -> None:
    """Raise UsageError unless at least one of ``min_score`` (-1..1) and ``k`` (>= 1) is given."""
    if min_score is None and k is None:
        raise UsageError("give --min-score S (a cosine similarity, -1..1) or --k N")
    if min_score is not None and not -1.0 <= min_score <= 1.0:
        raise UsageError(f"--min-score {min_score}: a cosine similarity is between -1 and 1")
    if k is not None and k < 1:
        raise UsageError(f"--k must be at least 1, got {k}")


def ids_above(
    index: Index, vector: np.ndarray, min_score: float | None, k: int | None = None
) -> tuple[list[int], list[float]]:
    """Ids and scores of the items scoring >= ``min_score`` against the unit ``vector`` (1, D),
    at most ``k`` of them (all when None), best first."""
    limit = len(index) if k is None else min(k, len(index))
    if min_score is None:
        return index.search_ids(vector, limit)
    ask = min(FIRST_K, limit)
    while True:
        ids, scores = index.search_ids(vector, ask)
        # Stop when the last answer falls below the threshold, or nothing more can be asked.
        if ask >= limit or len(ids) < ask or (scores and scores[-1] < min_score):
            break
        ask = min(ask * 4, limit)
    n = sum(1 for s in scores if s >= min_score)
    return ids[:n], scores[:n]


def filter_index(
    index: str | os.PathLike | Index,
    query: str | Query,
    *,
    min_score: float | None = None,
    k: int | None = None,
    device: str = "auto",
) -> FilterResult:
    """The indexed items scoring >= ``min_score`` against ``query`` (text, compositional query or
    a Query with an image term), at most ``k`` of them, best first."""
    from coembed.index import Index

    check_filter_options(min_score, k)
    source = index if isinstance(index, Index) else Index.load(index, device=device)
    shown = str(index) if not isinstance(index, Index) else "<index>"
    ids, scores = ids_above(source, source.query_vector(query), min_score, k)
    hits = []
    for rank, (i, score) in enumerate(zip(ids, scores), start=1):
        hit: dict[str, Any] = {"rank": rank, "id": i, "score": round(float(score), 6)}
        hit["item"] = source.items[i]
        if source.captions[i]:
            hit["captions"] = source.captions[i]
        hits.append(hit)
    return FilterResult(shown, str(query), min_score, k, hits)


def filter_csv_text(result: FilterResult) -> str:
    """The hits as CSV: ``rank,score,item,caption`` (the item's first caption, if any)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["rank", "score", "item", "caption"])
    for hit in result.hits:
        caption = hit["captions"][0] if hit.get("captions") else ""
        writer.writerow([hit["rank"], f"{hit['score']:.6f}", hit["item"], caption])
    return out.getvalue()


def write_filter_csv(result: FilterResult, path: str | os.PathLike) -> Path:
    """Write ``filter_csv_text(result)`` to ``path`` atomically; returns the path."""
    return atomic_write_text(path, filter_csv_text(result))
