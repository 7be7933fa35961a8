"""Duplicates in an index: exact copies by content hash, then near-duplicates by embedding
similarity (SemDeDup-style), joined into groups of which one item is kept.

Two items are near-duplicates when the cosine similarity of their vectors reaches a threshold.
The pairs come from FAISS: a range search over a flat index (exact: every pair at or above the
threshold), or the ``k`` nearest neighbours of every item over HNSW and IVF-PQ indexes (a
member more than ``k`` neighbours away is still found through the others, since groups are the
connected components of all pairs). Exact copies (the same bytes) are joined whatever their
vectors say. In each group the item indexed first is kept; the others are listed to drop.

Output folder::

    groups.csv    group,path,similarity,match: one row per member, group 1 the largest;
                  similarity to the group's first item, match "first", "exact" or "near"
    keep.txt      every item to keep: the ungrouped ones and the first of each group
    drop.txt      every other member of a group
    groups.png    a contact sheet of the largest groups (image indexes)
    dedup.json    the counts and settings
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from coembed.errors import UsageError
from coembed.progress import progress_bar

if TYPE_CHECKING:
    from coembed.index import Index

DEFAULT_THRESHOLD = 0.95
DEFAULT_K = 16
QUERY_CHUNK = 4096  # vectors searched per FAISS call, under the progress bar
HASH_BLOCK = 1 << 20
OUTPUT_FILES = ("groups.csv", "keep.txt", "drop.txt", "groups.png", "dedup.json")
SHEET_GROUPS = 8


@dataclass
class Duplicates:
    """Groups of duplicates among an index's items."""

    items: list[str]
    # Per group, largest first: (item id, similarity to the group's first, "first"|"exact"|"near")
    groups: list[list[tuple[int, float, str]]]
    threshold: float
    exact_pairs: int  # pairs of items with the same content hash
    near_pairs: int  # pairs at or above the threshold
    unhashed: int  # items whose file could not be read for hashing
    search: str  # "range" or "knn@K"

    def dropped(self) -> list[int]:
        """Ids of every group member but the first, in id order."""
        return sorted(i for group in self.groups for i, _, how in group if how != "first")

    def summary(self) -> dict[str, Any]:
        """Counts and settings, JSON-ready."""
        return {
            "items": len(self.items),
            "groups": len(self.groups),
            "duplicates": len(self.dropped()),
            "largest_group": max((len(g) for g in self.groups), default=0),
            "exact_pairs": self.exact_pairs,
            "near_pairs": self.near_pairs,
            "unhashed": self.unhashed,
            "threshold": self.threshold,
            "search": self.search,
        }


def check_threshold(threshold: float) -> None:
    """Raise UsageError unless ``threshold`` is a cosine similarity in (0, 1]."""
    if not 0.0 < threshold <= 1.0:
        raise UsageError(
            f"--threshold {threshold}: give a cosine similarity above 0 and at most 1 "
            f"(near-duplicates are usually >= 0.9; default {DEFAULT_THRESHOLD})"
        )


def content_hash(path: str) -> str | None:
    """The SHA-256 of a file's bytes, or None when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(HASH_BLOCK):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def exact_pairs(keys: list[str | None]) -> list[tuple[int, int]]:
    """(first id, other id) for every item whose key equals an earlier item's (None never)."""
    first: dict[str, int] = {}
    pairs = []
    for i, key in enumerate(keys):
        if key is None:
            continue
        if key in first:
            pairs.append((first[key], i))
        else:
            first[key] = i
    return pairs


def index_vectors(index: Index) -> np.ndarray:
    """The (N, D) vectors an index holds (those IVF-PQ re-ranks with, else FAISS's own)."""
    from coembed.index.kinds import import_faiss

    if index.rerank is not None:
        return np.asarray(index.rerank.vectors, np.float32)
    try:
        return index.faiss.reconstruct_n(0, len(index))
    except RuntimeError:
        # IVF lists keep no id -> list map until asked for one.
        import_faiss().extract_index_ivf(index.faiss).make_direct_map()
        return index.faiss.reconstruct_n(0, len(index))


def near_pairs(
    index: Index, vectors: np.ndarray, threshold: float, k: int, progress: bool = True
) -> tuple[np.ndarray, np.ndarray, str]:
    """(pairs (M, 2) with i < j, their similarities (M,), how they were searched) for every
    pair of items at or above ``threshold``: range search on a flat index, else k-NN."""
    found_i, found_j, found_s = [], [], []
    flat = index.kind == "flat"
    with progress_bar(
        total=len(vectors), unit="vec", desc="near-duplicates", leave=False, enabled=progress
    ) as bar:
        for start in range(0, len(vectors), QUERY_CHUNK):
            chunk = np.ascontiguousarray(vectors[start : start + QUERY_CHUNK])  # (b, D)
            if flat:
                # FAISS keeps inner products strictly above the radius; the mask below applies >=.
                lims, scores, ids = index.faiss.range_search(chunk, float(threshold) - 1e-6)
                rows = np.repeat(np.arange(len(chunk)), np.diff(lims).astype(np.int64)) + start
            else:
                scores, ids = index.searcher.search(chunk, min(k + 1, len(vectors)))  # (b, k+1)
                rows = np.repeat(np.arange(len(chunk)) + start, ids.shape[1])
                scores, ids = scores.ravel(), ids.ravel()
            keep = (ids > rows) & (scores >= threshold)  # each pair once, never an item itself
            found_i.append(rows[keep])
            found_j.append(ids[keep])
            found_s.append(scores[keep])
            bar.update(len(chunk))
    pairs = np.stack([np.concatenate(found_i), np.concatenate(found_j)], axis=1).astype(np.int64)
    return pairs.reshape(-1, 2), np.concatenate(found_s), "range" if flat else f"knn@{k}"


def connected_groups(n: int, pairs: np.ndarray) -> list[list[int]]:
    """The connected components of more than one item, each sorted by id (union-find)."""
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving keeps the trees shallow
            i = parent[i]
        return i

    for a, b in pairs.tolist():
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    members: dict[int, list[int]] = {}
    for i in np.unique(pairs) if len(pairs) else []:
        members.setdefault(root(int(i)), []).append(int(i))
    return [sorted(group) for group in members.values() if len(group) > 1]


def find_duplicates(
    index: str | os.PathLike | Index,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    k: int = DEFAULT_K,
    exact: bool = True,
    progress: bool = True,
) -> Duplicates:
    """Exact and near-duplicate groups among the items of an index (a directory or an Index)."""
    from coembed.index import Index

    check_threshold(threshold)
    if k < 1:
        raise UsageError(f"--k must be at least 1, got {k}")
    source = index if isinstance(index, Index) else Index.load(index, device="cpu")
    vectors = index_vectors(source)  # (N, D)
    keys: list[str | None] = [None] * len(source.items)
    if exact:
        image = source.modality == "image"
        items = progress_bar(
            source.items, unit="file", desc="hashing", leave=False, enabled=progress and image
        )
        keys = [content_hash(item) if image else item for item in items]
    same = exact_pairs(keys)
    near, _, search = near_pairs(source, vectors, threshold, k, progress)
    joined = np.concatenate([np.asarray(same, np.int64).reshape(-1, 2), near])
    groups = []
    for members in connected_groups(len(source.items), joined):
        first = members[0]
        sims = vectors[members] @ vectors[first]  # (m,)
        rows = [(first, 1.0, "first")]
        for i, sim in zip(members[1:], sims[1:].tolist()):
            how = "exact" if keys[i] is not None and keys[i] == keys[first] else "near"
            rows.append((i, round(float(sim), 6), how))
        groups.append(rows)
    groups.sort(key=lambda g: (-len(g), g[0][0]))
    unhashed = sum(key is None for key in keys) if exact and source.modality == "image" else 0
    return Duplicates(source.items, groups, threshold, len(same), len(near), unhashed, search)


# --- files ---------------------------------------------------------------------------------------


def groups_csv_text(found: Duplicates) -> str:
    """``group,path,similarity,match``: one row per group member, groups numbered from 1."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["group", "path", "similarity", "match"])
    for g, group in enumerate(found.groups, start=1):
        for i, sim, how in group:
            writer.writerow([g, found.items[i], f"{sim:.6f}", how])
    return out.getvalue()


def check_dedup_output(
    output: str | os.PathLike, index_dir: str | os.PathLike | None, overwrite: bool
) -> None:
    """UsageError unless ``output`` may take dedup's files: new, empty, or (with ``overwrite``)
    an earlier dedup output, and apart from the index."""
    from coembed.files import check_replaceable, refuse_overlap

    if index_dir is not None:
        refuse_overlap(output, {"--index": index_dir})
    check_replaceable(output, OUTPUT_FILES, "a dedup output", overwrite)


def write_duplicates(
    found: Duplicates, output: str | os.PathLike, *, index_dir: str | None, overwrite: bool
) -> Path:
    """Write the output folder (see the module docstring) as a whole; returns it. It must be
    new, empty, or (with ``overwrite``) an earlier dedup output, and apart from the index."""
    from coembed.curate.plots import groups_sheet
    from coembed.files import check_replaceable, staged_folder
    from coembed.locks import writer_lock

    out = Path(output)
    check_dedup_output(out, index_dir, overwrite)
    dropped = set(found.dropped())
    keep = "".join(f"{item}\n" for i, item in enumerate(found.items) if i not in dropped)
    drop = "".join(f"{found.items[i]}\n" for i in sorted(dropped))
    with writer_lock(out):
        check_replaceable(out, OUTPUT_FILES, "a dedup output", overwrite)  # as it is now
        with staged_folder(out) as stage:
            (stage / "groups.csv").write_text(groups_csv_text(found), encoding="utf-8")
            (stage / "keep.txt").write_text(keep, encoding="utf-8")
            (stage / "drop.txt").write_text(drop, encoding="utf-8")
            (stage / "dedup.json").write_text(json.dumps(found.summary(), indent=2))
            # Image files only: a text index, or shard members, have nothing to show.
            sheet = [
                (g, [(found.items[i], sim) for i, sim, _ in group])
                for g, group in enumerate(found.groups[:SHEET_GROUPS], start=1)
                if all(os.path.isfile(found.items[i]) for i, _, _ in group[:8])
            ]
            if sheet:
                groups_sheet(sheet, stage / "groups.png")
    return out
