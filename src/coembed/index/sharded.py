"""The sharded build as a whole: join torchrun's group, embed this rank's parts, wait for every
rank, and on rank 0 build the index from the parts (``coembed.index.shards`` has the files)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import coembed.index.shards as shards
import coembed.index.store as store
from coembed.errors import IndexError_, UsageError
from coembed.index.index import Index
from coembed.index.kinds import HNSW_MAX, apply_search_params, check_kind, choose_kind
from coembed.index.rerank import Reranked, RerankVectors
from coembed.index.tune import DEFAULT_TARGET, exact_neighbours, sample_ids, tune_recall

if TYPE_CHECKING:
    from coembed.index.inputs import ImagesInput, TextsInput

# A rank that finishes its parts waits at the barrier for the slowest one (hours at scale).
BARRIER_TIMEOUT = timedelta(hours=72)


@dataclass
class ShardedReport:
    """What one rank did; rank 0 also built the index (``index`` is None on the others)."""

    output: Path
    rank: int
    world: int
    parts: int
    embedded: int  # parts this rank embedded now
    finished_before: int  # parts of this rank a previous run had finished
    index: Index | None = None


def rank_and_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) in one process."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    return rank, world, int(os.environ.get("LOCAL_RANK", "0") or 0)


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def join_group(world: int) -> Any:
    """torch.distributed joined with gloo (a barrier is all the ranks share), or None alone."""
    if world <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo", timeout=BARRIER_TIMEOUT)
    return dist


def rank_device(device: str, local_rank: int) -> str:
    """Each rank's own GPU (by LOCAL_RANK) when the device is auto or cuda; else as given."""
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return device


def check_output(root: Path) -> None:
    """Refuse an output that holds anything but an index, parts, or a killed build's files."""
    if root.exists() and not root.is_dir():
        raise IndexError_(f"--output {root}: is a file, not an index folder; choose another")
    foreign = store.foreign_entries(root)
    if foreign:
        raise UsageError(
            f"--output {root}: holds {foreign[0]}, which is not part of an index; choose an "
            "empty or new folder"
        )


def build_sharded(
    output: str | os.PathLike,
    *,
    model: str | os.PathLike,
    images: ImagesInput | None = None,
    texts: TextsInput | None = None,
    kind: str = "auto",
    batch_size: int = 64,
    image_key: str = "filepath",
    caption_key: str = "caption",
    part_size: int = shards.DEFAULT_PART_SIZE,
    target_recall: float | None = DEFAULT_TARGET,
    device: str = "auto",
    progress: bool = True,
) -> ShardedReport:
    """Embed the inputs in parts across torchrun's ranks (or alone), resumably, then build the
    index on rank 0. Every rank returns its report."""
    from coembed.embedder import as_embedder

    check_kind(kind)
    if (images is None) == (texts is None):
        raise UsageError("give exactly one of --images or --texts")
    root = Path(output)
    rank, world, local_rank = rank_and_world()
    check_output(root)
    plan = shards.make_plan(images, texts, image_key, caption_key, part_size)
    embedder = as_embedder(model, rank_device(device, local_rank))
    record = shards.plan_record(plan, store.model_identity(embedder))
    dist = join_group(world)
    shards.settle_plan(root, record, rank)
    if dist is not None:
        dist.barrier()  # rank 0 has written the plan
        shards.settle_plan(root, record, rank)
    embedded, before = shards.embed_parts(
        root, plan, embedder, rank, world,
        batch_size=batch_size, image_key=image_key, caption_key=caption_key,
        progress=progress and rank == 0,
    )  # fmt: skip
    if dist is not None:
        dist.barrier()  # every part is written
    report = ShardedReport(root, rank, world, plan.count, embedded, before)
    if rank == 0:
        report.index = merge_parts(
            root, embedder, kind=kind, target_recall=target_recall, progress=progress
        )
    if dist is not None:
        dist.destroy_process_group()
    return report


def merge_parts(
    root: Path,
    embedder: Any,
    *,
    kind: str = "auto",
    target_recall: float | None = DEFAULT_TARGET,
    progress: bool = True,
) -> Index:
    """Build the index in ``root`` from its finished parts and save it; returns it loaded."""
    check_kind(kind)
    plan = shards.read_plan(root)
    identity = store.model_identity(embedder)
    wanted = plan["model"]
    if any(identity.get(k) != v for k, v in wanted.items() if v is not None):
        raise UsageError(
            f"--model: not the model that embedded the parts in {root}; give that model, or "
            "embed again into a new --output"
        )
    merged = shards.gather(root, plan["parts"])
    if not merged.count:
        raise UsageError("nothing to index: no readable images or non-empty texts")
    actual = choose_kind(merged.count) if kind == "auto" else kind
    if actual == "ivfpq" and (kind == "ivfpq" or merged.count >= HNSW_MAX):
        index = _ivfpq_index(root, merged, plan["modality"], embedder, kind, target_recall)
    else:
        vectors = np.concatenate(
            [np.zeros((0, merged.dim), np.float32)]
            + [v for _, v, _ in shards.part_vectors(root, merged)]
        )
        index = Index.from_vectors(
            vectors, merged.items, kind, modality=plan["modality"], captions=merged.captions,
            embedder=embedder, progress=progress, target_recall=target_recall,
        )  # fmt: skip
        _finish(index, merged)
        index.save(root)
    return Index.load(root, embedder=embedder)


def _finish(index: Index, merged: shards.Merged) -> None:
    index.skipped = merged.skipped
    index.roots = merged.roots if index.modality == "image" else None


def _ivfpq_index(
    root: Path,
    merged: shards.Merged,
    modality: str,
    embedder: Any,
    kind: str,
    target_recall: float | None,
) -> Index:
    """IVF-PQ trained on a sample of the parts, filled part by part as it is saved: its lists
    merged on disk, or in memory while its codes fit (``kinds.ivfpq_shape``)."""
    from coembed.index.ondisk import fill_in_memory, fill_on_disk, rows_of, train_on_parts

    def blocks():
        return shards.part_vectors(root, merged)

    trained, shape = train_on_parts(blocks, merged.count, merged.dim)
    identity = store.model_identity(embedder)
    index = Index(
        trained, merged.items, kind="ivfpq", requested_kind=kind, modality=modality,
        model=identity, captions=merged.captions, target_recall=target_recall,
        embedder=embedder, model_files=Path(identity["dir"]) if identity.get("dir") else None,
    )  # fmt: skip
    _finish(index, merged)

    def vectors() -> Iterator[np.ndarray]:
        return (v for _, v, _ in blocks())

    def make(ivfdata: Path, rerank: RerankVectors | None) -> tuple[Any, dict[str, Any]]:
        if shape["layout"] == "ondisk":
            faiss_index = fill_on_disk(trained, blocks(), ivfdata, merged.count)
        else:
            faiss_index = fill_in_memory(trained, blocks(), merged.count)
        params: dict[str, Any] = {**shape, "nprobe": int(faiss_index.nprobe)}
        apply_search_params(faiss_index, "ivfpq", params)
        learned: dict[str, Any] = {"count": int(faiss_index.ntotal), "params": params}
        if target_recall is not None:
            ids = sample_ids(merged.count)
            queries = rows_of(blocks, ids, merged.dim)
            exact = exact_neighbours(queries, ids, ((v, i) for _, v, i in blocks()))
            searcher = Reranked(faiss_index, rerank)
            tuning = tune_recall(
                faiss_index, "ivfpq", queries, ids, exact, target_recall, searcher=searcher
            )
            params["nprobe"] = tuning.value
            learned["tuning"] = tuning.as_json()
        return faiss_index, learned

    index.save(root, make_faiss=make, rerank=vectors)
    return index


def merge_model(root: Path, model: str | os.PathLike | None, device: str) -> Any:
    """The embedder ``--merge`` builds with: ``model``, else the one the parts recorded."""
    from coembed.embedder import as_embedder

    if model is None:
        model = shards.read_plan(root).get("model_dir")
        if model is None or not Path(model).is_dir():
            raise UsageError(
                f"--merge: the model that embedded the parts in {root} is not where it was "
                f"({model}); give it with --model"
            )
    return as_embedder(model, device)
