"""Sharded, resumable indexing: torchrun's ranks embed disjoint parts, then one builds the index.

``torchrun --nproc_per_node=N -m coembed index --model M --images 'shards/{00000..09999}.tar'
--output IDX`` (or ``coembed index --resumable ...`` in one process) cuts the inputs into parts:
one part per webdataset shard, or runs of ``--part-size`` rows of a folder, a dataset file or a
text file. Part ``i`` belongs to rank ``i mod world``. Each rank embeds its parts and writes
them under ``IDX/parts``::

    plan.json           what is being built: the modality, the model's identity, the parts and
                        a digest of the inputs; a restart with other inputs or another model is
                        refused instead of mixing two builds
    part-000012.npy     the part's vectors (n, D) float32
    part-000012.json    its items, captions, skipped images and folders; written last, so a part
                        is finished exactly when its .json exists

Both files are written to a temporary name and renamed, so a killed run leaves finished parts
and temporaries only; the same command again embeds just the unfinished parts. When every rank
is done, rank 0 builds the index from the parts (``coembed index --merge IDX`` does the same
alone): items in input order, repeats after the first left out, as one process builds it. Up to
``HNSW_MAX`` vectors the index is built in memory (flat or HNSW); past it, IVF-PQ with its
inverted lists merged on disk (``coembed.index.ondisk``). The parts stay, so the index can be
rebuilt (another ``--kind`` or ``--target-recall``) with ``--merge`` without embedding again.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import coembed.index.store as store
from coembed.errors import IndexError_, UsageError
from coembed.files import atomic_write, atomic_write_text
from coembed.index.inputs import image_inputs, image_roots, merge_roots, text_inputs
from coembed.progress import progress_bar
from coembed.schema import Range, check_shape, read_json

if TYPE_CHECKING:
    from coembed.embedder import Embedder
    from coembed.index.inputs import ImagesInput, TextsInput

PLAN = "plan.json"
PLAN_VERSION = 1
DEFAULT_PART_SIZE = 8192  # rows per part (a multiple of the batch sizes people use)
PLAN_SHAPE = {
    "format_version": int,
    "model_dir": (str, None),
    "modality": str,
    "model": {"config_digest": (str, None), "weights_digest": (str, None), "embed_dim": int},
    "parts": Range(int, 1),
    "digest": str,
}
PART_SHAPE = {
    "items": [str],
    "captions": [[str]],
    "skipped": [[str, str]],
    "roots": [str],
}


@dataclass
class Plan:
    """The inputs cut into parts: either webdataset shards (one part each) or rows."""

    modality: str  # "image" or "text"
    tars: list[str] | None = None  # one part per shard
    sources: list[Any] = field(default_factory=list)  # rows: what to decode (or the texts)
    names: list[str] = field(default_factory=list)
    captions: list[list[str]] = field(default_factory=list)
    part_size: int = DEFAULT_PART_SIZE

    @property
    def count(self) -> int:
        """The number of parts."""
        if self.tars is not None:
            return len(self.tars)
        return max(1, -(-len(self.names) // self.part_size))

    def digest(self) -> str:
        """What identifies the inputs: the shards (path and size) or every row's name, and the
        cut into parts."""
        h = hashlib.sha256(f"{self.modality}\n{self.part_size}\n".encode())
        if self.tars is not None:
            for tar in self.tars:
                h.update(f"{tar}\t{os.path.getsize(tar)}\n".encode())
        else:
            for name in self.names:
                h.update(name.encode("utf-8", "surrogateescape") + b"\n")
        return h.hexdigest()[:32]


def is_shard_pattern(images: Any) -> bool:
    """Whether ``images`` names webdataset shards (a .tar, a {a..b} range, or a::b lists)."""
    if not isinstance(images, (str, os.PathLike)):
        return False
    text = os.fspath(images)
    if Path(text).exists() and not text.lower().endswith(".tar"):
        return False
    return text.lower().endswith(".tar") or "{" in text or "::" in text


def make_plan(
    images: ImagesInput | None,
    texts: TextsInput | None,
    image_key: str,
    caption_key: str,
    part_size: int,
) -> Plan:
    """List the inputs (every rank lists the same) and cut them into parts."""
    from coembed.data.formats import DataError, expand_braces

    if part_size <= 0:
        raise UsageError(f"--part-size must be positive, got {part_size}")
    if texts is not None:
        lines = text_inputs(texts)
        return Plan("text", None, lines, lines, [[] for _ in lines], part_size)
    if is_shard_pattern(images):
        text = os.path.expanduser(os.fspath(images))
        tars = [os.path.abspath(s) for part in text.split("::") for s in expand_braces(part)]
        missing = [t for t in tars if not os.path.isfile(t)]
        if missing:
            raise DataError(
                f"{images}: {len(missing)} of {len(tars)} shards not found (first: "
                f"{missing[0]}); check the path and the {{000..NNN}} range"
            )
        return Plan("image", tars, part_size=part_size)
    sources, names, captions = image_inputs(images, image_key, caption_key)
    return Plan("image", None, sources, names, captions, part_size)


# --- the plan and the parts on disk ----------------------------------------------------------


def parts_dir(root: Path) -> Path:
    return root / store.PARTS


def part_paths(root: Path, number: int) -> tuple[Path, Path]:
    """(vectors .npy, items .json) of part ``number``."""
    base = parts_dir(root) / f"part-{number:06d}"
    return base.with_suffix(".npy"), base.with_suffix(".json")


def plan_record(plan: Plan, identity: dict[str, Any]) -> dict[str, Any]:
    model = {k: identity.get(k) for k in ("config_digest", "weights_digest", "embed_dim")}
    return {
        "format_version": PLAN_VERSION,
        "model_dir": identity.get("dir"),  # where --merge finds the model when none is given
        "modality": plan.modality,
        "model": model,
        "parts": plan.count,
        "digest": plan.digest(),
    }


def read_plan(root: Path) -> dict[str, Any]:
    """The plan of the sharded build in ``root``, checked; one IndexError_ if there is none."""
    path = parts_dir(root) / PLAN
    if not path.is_file():
        raise IndexError_(
            f"{root}: no embedding parts to merge ({store.PARTS}/{PLAN} is missing); embed them "
            "with `torchrun ... -m coembed index` or `coembed index --resumable`"
        )
    record = read_json(path, IndexError_, "remove the parts folder and embed again")
    return check_shape(record, PLAN_SHAPE, str(path), IndexError_, "remove it and embed again")


def settle_plan(root: Path, record: dict[str, Any], rank: int) -> None:
    """Write the plan (rank 0, first run) or check that it is the one a restart continues."""
    path = parts_dir(root) / PLAN
    if rank == 0 and not path.exists():
        parts_dir(root).mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True))
        return
    if not path.exists():
        return  # another rank: rank 0 writes it (checked again before the merge)
    found = read_plan(root)
    for key, what in (("modality", "modality"), ("digest", "inputs"), ("model", "model")):
        if found.get(key) != record[key]:
            raise UsageError(
                f"--output {root}: its {store.PARTS} folder holds a build of other {what} "
                f"(plan {found.get(key)!r}, now {record[key]!r}); run the same command as "
                "before to finish it, or choose a new --output"
            )


def finished(root: Path, number: int) -> bool:
    vectors, items = part_paths(root, number)
    return items.is_file() and vectors.is_file()


def write_part(root: Path, number: int, vectors: np.ndarray, meta: dict[str, Any]) -> None:
    """Write one part: its vectors, then its items (the part is finished when they exist)."""
    vectors_path, items_path = part_paths(root, number)

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(vectors, np.float32))

    atomic_write(vectors_path, save)
    atomic_write_text(items_path, json.dumps(meta, ensure_ascii=False))


def read_part(root: Path, number: int, mmap: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    """(vectors (n, D), items) of a finished part, checked to agree."""
    vectors_path, items_path = part_paths(root, number)
    again = "delete it and run the index command again to embed it anew"
    meta = read_json(items_path, IndexError_, again)
    check_shape(meta, PART_SHAPE, str(items_path), IndexError_, again)
    try:
        vectors = np.load(vectors_path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise IndexError_(f"{vectors_path}: unreadable ({exc}); {again}") from None
    if vectors.ndim != 2 or len(vectors) != len(meta["items"]):
        raise IndexError_(
            f"{vectors_path}: {vectors.shape} vectors for {len(meta['items'])} items; {again}"
        )
    return vectors, meta


# --- embedding this rank's parts ---------------------------------------------------------------


def embed_part(
    plan: Plan,
    number: int,
    embedder: Embedder,
    batch_size: int,
    image_key: str,
    caption_key: str,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Embed part ``number``: (vectors, items metadata)."""
    from coembed.data.formats import read_records
    from coembed.data.images import describe
    from coembed.index.inputs import embed_texts

    if plan.tars is not None:
        records, _ = read_records(plan.tars[number], image_key, caption_key, require_captions=False)
        sources = [r.image for r in records]
        names = [describe(r.image) for r in records]
        captions = [list(r.captions) for r in records]
    else:
        rows = slice(number * plan.part_size, (number + 1) * plan.part_size)
        sources, names, captions = plan.sources[rows], plan.names[rows], plan.captions[rows]
    if plan.modality == "text":
        vectors = embed_texts(embedder, list(sources), batch_size, progress=False)
        meta = {"items": names, "captions": captions, "skipped": [], "roots": []}
        return vectors, meta
    found = embedder.embed_images_skipping(sources, batch_size, progress=False)
    kept = [sources[i] for i in found.kept]
    meta = {
        "items": [names[i] for i in found.kept],
        "captions": [captions[i] for i in found.kept],
        "skipped": [[names[i], reason] for i, reason in found.skipped],
        "roots": image_roots(s for s in kept if isinstance(s, str)),
    }
    return found.vectors, meta


def embed_parts(
    root: Path,
    plan: Plan,
    embedder: Embedder,
    rank: int,
    world: int,
    *,
    batch_size: int,
    image_key: str,
    caption_key: str,
    progress: bool,
) -> tuple[int, int]:
    """Embed this rank's unfinished parts; returns (embedded now, finished before)."""
    mine = range(rank, plan.count, world)
    todo = [n for n in mine if not finished(root, n)]
    with progress_bar(
        total=len(todo), unit="part", desc=f"embedding (rank {rank})", enabled=progress
    ) as bar:
        for number in todo:
            vectors, meta = embed_part(plan, number, embedder, batch_size, image_key, caption_key)
            write_part(root, number, vectors, meta)
            bar.update(1)
    return len(todo), len(mine) - len(todo)


# --- building the index from the parts ----------------------------------------------------------


@dataclass
class Merged:
    """Which rows of every part the index takes (repeats after the first left out)."""

    keep: list[np.ndarray]  # per part: bool (n_part,)
    items: list[str]
    captions: list[list[str]]
    skipped: list[list[str]]
    roots: list[str]
    dim: int

    @property
    def count(self) -> int:
        return len(self.items)


def gather(root: Path, parts: int) -> Merged:
    """Read every part's items (not its vectors) in order, leaving out repeats."""
    missing = [n for n in range(parts) if not finished(root, n)]
    if missing:
        raise UsageError(
            f"{root}: {len(missing)} of {parts} parts are not embedded yet (first: "
            f"part-{missing[0]:06d}); run the same index command again to embed them"
        )
    seen: set[str] = set()
    merged = Merged([], [], [], [], [], 0)
    roots: list[str] = []
    skipped_seen: set[str] = set()
    with progress_bar(total=parts, unit="part", desc="reading parts", leave=False) as bar:
        for number in range(parts):
            vectors, meta = read_part(root, number, mmap=True)
            merged.dim = merged.dim or int(vectors.shape[1])
            keep = np.zeros(len(meta["items"]), bool)
            for i, name in enumerate(meta["items"]):
                if name not in seen:
                    seen.add(name)
                    keep[i] = True
                    merged.items.append(name)
                    merged.captions.append(meta["captions"][i])
            merged.keep.append(keep)
            for name, reason in meta["skipped"]:
                if name not in seen and name not in skipped_seen:
                    skipped_seen.add(name)
                    merged.skipped.append([name, reason])
            roots.extend(meta["roots"])
            bar.update(1)
    merged.roots = merge_roots(roots)
    return merged


def part_vectors(root: Path, merged: Merged):
    """Yield (number, kept vectors (n, D), their ids in the index) part by part."""
    start = 0
    for number, keep in enumerate(merged.keep):
        vectors, _ = read_part(root, number, mmap=True)
        kept = np.ascontiguousarray(vectors[keep], np.float32)
        yield number, kept, np.arange(start, start + len(kept), dtype=np.int64)
        start += len(kept)
