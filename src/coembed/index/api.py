"""Indexing and search as whole operations: what ``coembed index`` and ``coembed search`` do,
taking typed values and returning reports that the command line prints."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import coembed.index.store as store
from coembed.errors import IndexError_, UsageError
from coembed.index.index import Index
from coembed.index.kinds import KINDS
from coembed.index.query import Query, parse_query
from coembed.index.store import SKIPPED_FILE
from coembed.index.tune import DEFAULT_TARGET, check_target
from coembed.locks import writer_lock

if TYPE_CHECKING:
    from coembed.embedder import Embedder
    from coembed.index.inputs import ImagesInput, TextsInput


@dataclass
class IndexReport:
    """What ``build_index`` did: counts, the index's kind and shape, and the skipped images."""

    output: Path
    added: bool  # True when added to an existing index, False when built anew
    count_new: int  # items added by this call
    total: int  # items in the index now
    kind: str
    dim: int
    modality: str  # "image" or "text"
    already_indexed: int  # inputs left out because the index held them (or they repeated)
    skipped_new: int  # images of this call that could not be decoded
    skipped_file: Path  # where every skipped image is listed, with the reason
    tuning: dict[str, Any] | None = None  # what the recall tuning chose (coembed.index.tune)


@dataclass
class SearchResult:
    """The best items for one query, best first."""

    index: str
    kind: str
    modality: str
    query: str
    hits: list[dict[str, Any]]  # {"rank", "score", "item", optional "captions"}


def _new_index(
    out: Path, embedder: Embedder | None, kind: str, inputs: dict[str, Any]
) -> IndexReport:
    """Build an index into a new (or empty) ``out`` and save it (holding its lock throughout)."""
    if embedder is None:
        raise UsageError(
            "coembed index: --model is required to build an index "
            "(only --add can reuse the index's own model)"
        )
    _check_new_output(out)
    with writer_lock(out):
        _check_new_output(out)  # as it is now that no one else writes it
        index = Index.build(embedder, kind=kind, **inputs)
        index.save(out)
    return IndexReport(
        output=out,
        added=False,
        count_new=len(index),
        total=len(index),
        kind=index.kind,
        dim=index.dim,
        modality=index.modality,
        already_indexed=0,
        skipped_new=len(index.skipped),
        skipped_file=out / SKIPPED_FILE,
        tuning=index.tuning,
    )


def _add_to_index(
    out: Path, embedder: Embedder | None, kind: str, device: str, inputs: dict[str, Any]
) -> IndexReport:
    """Add to the index in ``out`` (with its own model when ``embedder`` is None) and save it.

    The index is loaded and checked first, so a mistake touches nothing; then, holding its lock,
    reloaded if another writer committed meanwhile, added to and saved.
    """
    files = store.read_manifest(out).get("files")
    if "ivfdata" in files:
        raise UsageError(
            f"--add: {out} keeps its lists on disk (built from embedding parts); build it again "
            "from all the inputs (torchrun ... -m coembed index, or --resumable)"
        )
    index = Index.load(out, embedder=embedder, device=device)
    if kind not in ("auto", index.kind):
        raise UsageError(
            f"--kind {kind} with --add: this index is {index.kind}; rebuild to change it"
        )
    if (inputs["images"] is None) != (index.modality == "text"):
        other = "--images" if index.modality == "image" else "--texts"
        raise UsageError(f"this is {index.modality} index: add to it with {other}")
    with writer_lock(out):
        if store.read_manifest(out).get("files") != files:
            index = Index.load(out, embedder=embedder, device=device)
        counts = index.add(**inputs)
        index.save(out)
    return IndexReport(
        output=out,
        added=True,
        count_new=counts["added"],
        total=len(index),
        kind=index.kind,
        dim=index.dim,
        modality=index.modality,
        already_indexed=counts["already_indexed"],
        skipped_new=counts["skipped"],
        skipped_file=out / SKIPPED_FILE,
        tuning=index.tuning,
    )


def _check_new_output(out: Path) -> None:
    """Refuse to build into a folder holding anything but an index (or a killed build's files)."""
    if out.exists() and not out.is_dir():
        raise IndexError_(f"--output {out}: is a file, not an index folder; choose another")
    foreign = store.foreign_entries(out)
    if foreign and not (out / store.MANIFEST).is_file():
        raise UsageError(
            f"--output {out}: exists and is not an index (it holds {foreign[0]}); "
            "choose an empty or new folder"
        )


def build_index(
    output: str | os.PathLike,
    *,
    model: str | os.PathLike | Embedder | None = None,
    images: ImagesInput | None = None,
    texts: TextsInput | None = None,
    add: bool = False,
    kind: str = "auto",
    batch_size: int = 64,
    image_key: str | None = None,
    caption_key: str | None = None,
    device: str = "auto",
    progress: bool = True,
    target_recall: float | None = DEFAULT_TARGET,
) -> IndexReport:
    """Build an index of images or texts in ``output`` (or ``add`` to it) and save it.

    An approximate index (HNSW, IVF-PQ) gets the search setting that reaches ``target_recall``
    recall@10 on a held-out sample of its own vectors (None: the fixed defaults); see
    ``coembed.index.tune``."""
    from coembed.embedder import as_embedder

    if kind not in KINDS:
        raise UsageError(f"--kind {kind!r}: use one of {', '.join(KINDS)}")
    if batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {batch_size}")
    inputs = {
        "images": images,
        "texts": texts,
        "batch_size": batch_size,
        "image_key": image_key or "filepath",
        "caption_key": caption_key or "caption",
        "progress": progress,
    }
    if target_recall is not None:
        check_target(target_recall)
    embedder = as_embedder(model, device) if model is not None else None
    if add:
        return _add_to_index(Path(output), embedder, kind, device, inputs)
    return _new_index(Path(output), embedder, kind, {**inputs, "target_recall": target_recall})


def search_index(
    index_dir: str | os.PathLike, query: str | Query, k: int = 10, *, device: str = "auto"
) -> SearchResult:
    """The ``k`` best items of the index in ``index_dir`` for a text, image or compositional query."""
    if k <= 0:
        raise UsageError(f"--k must be positive, got {k}")
    index = Index.load(index_dir, device=device)
    if isinstance(query, str):
        query = parse_query(query)
    ids, scores = index.search_ids(query, k)
    hits = []
    for rank, (i, score) in enumerate(zip(ids, scores), start=1):
        hit = {"rank": rank, "score": round(float(score), 6), "item": index.items[i]}
        if index.captions[i]:
            hit["captions"] = index.captions[i]
        hits.append(hit)
    return SearchResult(str(index_dir), index.kind, index.modality, str(query), hits)
