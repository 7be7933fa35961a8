"""The index directory on disk: manifest, generations of data files, model copy and identity.

The index directory::

    index.json            the manifest: kind, count, dim, model identity, and the data files
                          of the current generation; replacing it is the commit point
    index-000007.faiss    the FAISS index of generation 7
    items-000007.json     per vector: the item (image path or text) and its captions
    vectors-000007.npy    IVF-PQ only: the vectors its candidates are re-scored with, and
    codes-000007.npy      one byte per value of them, to shortlist with (coembed.index.rerank)
    model-<digest>/       a copy (hard link when possible) of the model directory that built it,
                          so ``coembed search --index DIR`` needs nothing else
    skipped.txt           images that could not be decoded, with the reason

Saving writes the new generation's files (each to a temporary name, then renamed), then
replaces ``index.json``, then deletes the older generation. A save killed at any point leaves
``index.json`` naming a complete generation, so the previous index stays loadable. A save that
fails (a full disk, Ctrl-C) removes the files of its generation again, and a folder holding only
such leftovers (a first build killed before its commit) is taken as an empty one. Every save
holds the index's writer lock (``coembed.locks``).

The manifest records the model's config digest, a sampled digest of its weights and its
embedding size; adding to or searching an index with another model is one clear error.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from coembed.errors import CoembedError, IndexError_
from coembed.files import (
    atomic_write,
    atomic_write_text,
    disk_full,
    fsync_dir,
    is_disk_full,
    umask_mode,
)
from coembed.index.kinds import (
    FAISS_CLASSES,
    FAISS_CLASSES_ALSO,
    KINDS,
    faiss_quiet,
    import_faiss,
)
from coembed.index.rerank import RERANK_DTYPE, Codes, RerankVectors, VectorFile
from coembed.index.tune import array_blocks
from coembed.locks import writer_lock
from coembed.schema import Range, check_shape, read_json

if TYPE_CHECKING:
    from coembed.embedder import Embedder

FORMAT_VERSION = 1
MANIFEST = "index.json"
SKIPPED_FILE = "skipped.txt"
GENERATION = re.compile(r"^(index|items|vectors|codes)-(\d{6,})\.(faiss|json|ivfdata|npy)$")
PARTS = "parts"  # a sharded build's embedding shards (coembed.index.shards)


# --- model identity ------------------------------------------------------------------------------


def weights_digest(path: Path) -> str:
    """A digest of 64 evenly spaced 64 KiB slices and the size: two trainings never share it.

    Hashing a whole 400 MB checkpoint on every search would cost a second; slices cost ~ms.
    """
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    slice_size = 1 << 16
    with open(path, "rb") as f:
        for i in range(64):
            f.seek(max(0, (size - slice_size) * i // 63))
            h.update(f.read(slice_size))
    return h.hexdigest()[:16]


def model_dir_identity(directory: str | os.PathLike) -> dict[str, Any]:
    """What the manifest records about a model directory: dir, config and weights digests, dim."""
    from coembed.checkpoint import WEIGHTS_FILE, read_model_config

    source = Path(directory)
    cfg, text = read_model_config(source)
    return {
        "dir": str(source.resolve()),
        "config_digest": hashlib.sha256(text.encode()).hexdigest()[:16],
        "weights_digest": weights_digest(source / WEIGHTS_FILE),
        "embed_dim": cfg.embed_dim,
    }


def model_identity(embedder: Embedder) -> dict[str, Any]:
    """The identity of the model directory an embedder was loaded from. An embedder that was
    not loaded from one (a test double) is known by its dimension only."""
    source = getattr(embedder, "source", "") or ""
    if source and (Path(source) / "config.json").is_file():
        return model_dir_identity(source)
    return {"dir": None, "config_digest": None, "weights_digest": None, "embed_dim": embedder.dim}


def same_model(built: dict[str, Any], given: dict[str, Any]) -> bool:
    """Whether two identities may be the same model (a digest one side lacks is not compared)."""
    if built.get("embed_dim") != given.get("embed_dim"):
        return False
    return all(
        built.get(key) is None or given.get(key) is None or built[key] == given[key]
        for key in ("config_digest", "weights_digest")
    )


def describe_model(identity: dict[str, Any]) -> str:
    """A model identity for an error message: where it is, its digests and its dimension."""
    where = identity.get("dir") or "an in-memory model"
    digest = identity.get("config_digest") or "-"
    weights = identity.get("weights_digest") or "-"
    return f"{where} (config {digest}, weights {weights}, dim {identity.get('embed_dim')})"


def model_dir_if_same(model: dict[str, Any]) -> Path | None:
    """The original model directory, when the index has no copy and the directory is unchanged."""
    if not model.get("dir") or not (Path(model["dir"]) / "config.json").is_file():
        return None
    try:
        same = same_model(model, model_dir_identity(model["dir"]))
    except (CoembedError, OSError):
        return None
    return Path(model["dir"]) if same else None


def copy_model(model_files: Path | None, root: Path, identity: dict[str, Any]) -> str | None:
    """Hard-link (or copy) the model's files into ``root/model-<digest>``; returns the name."""
    from coembed.checkpoint import MODEL_FILES

    if model_files is None:
        return None
    digest = identity.get("weights_digest") or identity.get("config_digest") or "model"
    name = f"model-{digest}"
    target = root / name
    if target.is_dir():
        return name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
    os.chmod(tmp, umask_mode(0o777))  # mkdtemp makes it private (0700)
    try:
        for file in MODEL_FILES:
            src = model_files / file
            if src.is_file():
                try:
                    os.link(src, tmp / file)
                except OSError:  # another file system, or links not allowed
                    shutil.copy2(src, tmp / file)
        os.rename(tmp, target)  # a directory appears whole or not at all
    except BaseException as exc:
        full = is_disk_full(exc, root)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise disk_full(target, exc) from None
        raise
    return name


# --- reading -------------------------------------------------------------------------------------

REBUILD = "rebuild the index"
MODEL_COPY = re.compile(r"^model-[A-Za-z0-9_]+$")
# What index.json holds; more keys are allowed (a newer coembed may write some).
MANIFEST_SHAPE = {
    "format_version": int,
    "kind": str,
    "requested_kind?": str,
    "modality": str,
    "count": Range(int, 0),
    "dim": Range(int, 1),
    "params?": {"efSearch?": Range(int, 1), "nprobe?": Range(int, 1)},
    "model": {
        "dir": (str, None),
        "config_digest": (str, None),
        "weights_digest": (str, None),
        "embed_dim": Range(int, 1),
        "copy?": (str, None),
    },
    "files": {"faiss": str, "items": str, "ivfdata?": str, "vectors?": str, "codes?": str},
    "codes_range?": {"low": [float], "step": [float]},
    "skipped?": Range(int, 0),
    "roots?": ([str], None),
    "target_recall?": (Range(float, 0, 1), None),
}
# What an items file holds: per vector its item (image path or text) and captions; the skipped.
ITEMS_SHAPE = {"items": [str], "captions?": ([[str]], None), "skipped?": [[str, str]]}


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of an index directory, checked; or one IndexError_ saying what is wrong."""
    if not root.is_dir():
        raise IndexError_(
            f"{root}: no such index directory; build one with "
            f"`coembed index --model MODEL_DIR --images PATH --output {root}`"
        )
    path = root / MANIFEST
    if not path.is_file():
        raise IndexError_(
            f"{root}: not a coembed index (no {MANIFEST}); build one with `coembed index`"
        )
    manifest = check_shape(read_json(path, IndexError_, REBUILD), dict, str(path), IndexError_)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise IndexError_(
            f"{path}: index format {version!r}, "
            f"this coembed reads version {FORMAT_VERSION}; {REBUILD}"
        )
    check_shape(manifest, MANIFEST_SHAPE, str(path), IndexError_, REBUILD)
    problem = manifest_problem(manifest)
    if problem:
        raise IndexError_(f"{path}: {problem}; {REBUILD}")
    return manifest


def manifest_problem(manifest: dict[str, Any]) -> str | None:
    """What in a manifest of the right shape cannot be (None when nothing): an unknown kind or
    modality, a data file that is not a plain name of this folder, a dimension two ways."""
    files, model = manifest["files"], manifest["model"]
    if manifest["kind"] not in FAISS_CLASSES:
        return f"kind: {manifest['kind']!r} is not one of {', '.join(FAISS_CLASSES)}"
    if manifest.get("requested_kind", "auto") not in KINDS:
        return f"requested_kind: {manifest['requested_kind']!r} is not one of {', '.join(KINDS)}"
    if manifest["modality"] not in ("image", "text"):
        return f"modality: {manifest['modality']!r} is not image or text"
    names = [("faiss", "index", "faiss"), ("items", "items", "json")]
    if "ivfdata" in files:
        names.append(("ivfdata", "index", "ivfdata"))
    for key in ("vectors", "codes"):
        if key in files:
            names.append((key, key, "npy"))
    for key, stem, suffix in names:
        found = GENERATION.match(files[key])
        if not found or found.group(1) != stem or found.group(3) != suffix:
            return f"files.{key}: {files[key]!r} is not a {stem}-NNNNNN.{suffix} file of the index"
    value_range = manifest.get("codes_range")
    if ("codes" in files) != (value_range is not None):
        return "files.codes and codes_range come together: one is missing"
    if value_range and {len(value_range["low"]), len(value_range["step"])} != {manifest["dim"]}:
        return f"codes_range: not {manifest['dim']} values per dimension"
    if model.get("copy") is not None and not MODEL_COPY.match(model["copy"]):
        return f"model.copy: {model['copy']!r} is not a model-<digest> folder of the index"
    if manifest["dim"] != model["embed_dim"]:
        return f"dim {manifest['dim']} but model.embed_dim {model['embed_dim']}"
    return None


def read_faiss(path: Path, on_disk: bool = False) -> Any:
    """The FAISS index in ``path``; IndexError_ when FAISS cannot read it. ``on_disk``: its
    inverted lists are in a ``.ivfdata`` file beside it, memory-mapped, not read into memory."""
    faiss = import_faiss()
    try:
        if on_disk:
            with faiss_quiet():
                return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)
        return faiss.read_index(str(path))
    except (RuntimeError, MemoryError, ValueError):
        raise IndexError_(f"{path}: unreadable (truncated or corrupt); {REBUILD}") from None


def disagreement(index: Any, meta: dict[str, Any], manifest: dict[str, Any]) -> str | None:
    """How a FAISS index, its items and its manifest disagree (None when they agree): another
    kind or metric of index, another dimension, another number of vectors."""
    faiss = import_faiss()
    kind, files = manifest["kind"], manifest["files"]
    found = type(index).__name__
    if found != FAISS_CLASSES[kind] and found not in FAISS_CLASSES_ALSO.get(kind, ()):
        wanted = FAISS_CLASSES[kind]
        return f"{files['faiss']} is an {found}, but {MANIFEST} says kind {kind} ({wanted})"
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        return f"{files['faiss']} does not rank by inner product (cosine), as coembed builds it"
    if index.d != manifest["dim"]:
        return f"{files['faiss']} holds {index.d}-dim vectors, {MANIFEST} says {manifest['dim']}"
    counts = (index.ntotal, len(meta["items"]), manifest["count"])
    if len(set(counts)) > 1:
        return (
            f"{files['faiss']} holds {counts[0]} vectors, {files['items']} lists {counts[1]} "
            f"items and {MANIFEST} counts {counts[2]}"
        )
    captions = meta.get("captions")
    if captions is not None and len(captions) != len(meta["items"]):
        return f"{files['items']} has {len(captions)} caption lists for {len(meta['items'])} items"
    return None


def read_index_files(root: Path) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(FAISS index, items metadata, manifest) of the generation the manifest names, checked
    to agree with each other; one IndexError_ for anything missing, damaged or inconsistent.
    An index with re-ranking vectors has them in ``meta["rerank"]`` (``RerankVectors``)."""
    manifest = read_manifest(root)
    files = manifest["files"]
    faiss_path, items_path = root / files["faiss"], root / files["items"]
    needed = [faiss_path, items_path] + [
        root / files[k] for k in ("ivfdata", "vectors", "codes") if k in files
    ]
    for path in needed:
        if not path.is_file():
            raise IndexError_(f"{path}: missing; the index directory is damaged, {REBUILD}")
    index = read_faiss(faiss_path, on_disk="ivfdata" in files)
    meta = read_json(items_path, IndexError_, REBUILD)
    check_shape(meta, ITEMS_SHAPE, str(items_path), IndexError_, REBUILD)
    problem = disagreement(index, meta, manifest)
    if problem:
        raise IndexError_(f"{root}: {problem}; {REBUILD}")
    if "vectors" in files:
        meta["rerank"] = read_rerank(root, manifest)
    return index, meta, manifest


def read_rerank(root: Path, manifest: dict[str, Any]) -> RerankVectors:
    """The re-ranking vectors the manifest names, checked: the float32 rows read on demand,
    the codes (when the index has them) memory-mapped."""
    shape, files = (manifest["count"], manifest["dim"]), manifest["files"]
    vectors = _mapped_npy(root / files["vectors"], shape, RERANK_DTYPE)
    rows = VectorFile(root / files["vectors"], shape, vectors.offset)
    if "codes" not in files:  # saved before the codes were
        return RerankVectors(rows)
    codes = _mapped_npy(root / files["codes"], shape, np.uint8)
    value_range = manifest["codes_range"]
    return RerankVectors(rows, Codes(codes, value_range["low"], value_range["step"]))


def _mapped_npy(path: Path, shape: tuple[int, int], dtype: Any) -> np.memmap:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        raise IndexError_(f"{path}: unreadable (truncated or corrupt); {REBUILD}") from None
    if array.shape != shape or array.dtype != dtype:
        raise IndexError_(
            f"{path}: {array.dtype} {array.shape}, expected {np.dtype(dtype)} {shape}; {REBUILD}"
        )
    return array


VectorBlocks = Callable[[], Iterable[np.ndarray]]  # the (B, D) vectors, block after block
MakeFaiss = Callable[[Path, "RerankVectors | None"], tuple[Any, dict[str, Any]]]


def _blocks_of(vectors: Any) -> VectorBlocks:
    """``vectors`` as blocks: a blocks function as it is, (N, D) array-like a block at a time."""
    if callable(vectors):
        return vectors
    array = np.asarray(vectors)
    return lambda: (block for block, _ in array_blocks(array))


def write_rerank(
    vectors_path: Path, codes_path: Path, blocks: VectorBlocks, shape: tuple[int, int]
) -> dict[str, Any]:
    """Write the re-ranking vectors (float32) and their codes (``rerank.Codes``, over the range
    seen while writing the vectors), each to a temporary name, then renamed; ``blocks`` is read
    twice. Returns the codes' range, for the manifest. Rows are appended, not written through a
    memory map, whose written pages would count in the process's memory until flushed."""
    seen: list[np.ndarray] = []  # each block's per-dimension (min, max), (2, D)

    def fill(path: str, dtype: Any, convert: Callable[[np.ndarray], np.ndarray]) -> None:
        header = {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape}
        with open(path, "wb") as out:
            np.lib.format.write_array_header_2_0(out, header)
            for block in blocks():
                out.write(np.ascontiguousarray(convert(block), dtype).tobytes())

    def vectors_seen(block: np.ndarray) -> np.ndarray:
        if len(block):
            seen.append(np.stack([block.min(axis=0), block.max(axis=0)]))
        return block

    atomic_write(vectors_path, lambda tmp: fill(tmp, RERANK_DTYPE, vectors_seen))
    low, step = Codes.value_range(seen)
    codes = Codes(np.empty((0, shape[1]), np.uint8), low, step)
    atomic_write(codes_path, lambda tmp: fill(tmp, np.uint8, codes.encode))
    return {"low": low.tolist(), "step": step.tolist()}


# --- writing -------------------------------------------------------------------------------------


def write_index_files(
    root: Path,
    faiss_index: Any,
    meta: dict[str, Any],
    manifest: dict[str, Any],
    model_files: Path | None,
    make_faiss: MakeFaiss | None = None,
    vectors: Any = None,
) -> dict[str, Any]:
    """Save one generation into ``root`` and commit it (see the module docstring).

    ``meta`` holds items, captions and skipped; ``manifest`` the index's description (kind,
    count, model identity...). Returns the manifest as written, its model with ``copy`` set.
    ``vectors``: the re-ranking vectors (``coembed.index.rerank``), (N, D) array-like or a
    function giving them block by block (``VectorBlocks``); written first, with their codes. An
    index built as it is saved comes as ``make_faiss(ivfdata_path, rerank)`` instead of
    ``faiss_index``: it writes the generation's ``.ivfdata`` file (or none, for lists it keeps
    in memory), may search re-ranked with the files just written (``rerank``), and returns the
    index and what the manifest learns from building it (count, params, tuning).
    """
    with writer_lock(root):
        created = not root.exists()
        root.mkdir(parents=True, exist_ok=True)
        generation = 1 + max(
            (int(m.group(2)) for p in root.iterdir() if (m := GENERATION.match(p.name))), default=0
        )
        copies_before = {p.name for p in root.iterdir() if p.name.startswith("model-")}
        try:
            if vectors is not None or make_faiss is not None:
                faiss_index, manifest = _write_data_files(
                    root, generation, faiss_index, meta, manifest, make_faiss, vectors
                )
            manifest = _commit_generation(
                root, generation, faiss_index, meta, manifest, model_files
            )
        except BaseException:
            _remove_uncommitted(root, generation, copies_before, created)
            raise
        fsync_dir(root)
        skipped = "".join(f"{source}\t{reason}\n" for source, reason in meta["skipped"])
        atomic_write_text(root / SKIPPED_FILE, skipped)
        remove_old_files(root, keep={*manifest["files"].values(), manifest["model"]["copy"]})
    return manifest


def _write_data_files(
    root: Path,
    generation: int,
    faiss_index: Any,
    meta: dict[str, Any],
    manifest: dict[str, Any],
    make_faiss: MakeFaiss | None,
    vectors: Any,
) -> tuple[Any, dict[str, Any]]:
    """The re-ranking files (first: building may search with them), then the index built as it
    is saved; returns the FAISS index and the manifest with what they add."""
    count = len(meta["items"])  # one item per vector
    rerank = None
    if vectors is not None:
        names = {key: f"{key}-{generation:06d}.npy" for key in ("vectors", "codes")}
        value_range = write_rerank(
            root / names["vectors"], root / names["codes"], _blocks_of(vectors),
            (count, manifest["dim"]),
        )  # fmt: skip
        manifest = {**manifest, **names, "codes_range": value_range}
        rerank = read_rerank(root, {**manifest, "count": count, "files": names})
    if make_faiss is not None:
        ivfdata = f"index-{generation:06d}.ivfdata"
        faiss_index, learned = make_faiss(root / ivfdata, rerank)
        manifest = {**manifest, **learned}
        if (root / ivfdata).is_file():  # its lists on disk, not in memory
            manifest["ivfdata"] = ivfdata
    return faiss_index, manifest


def _commit_generation(
    root: Path,
    generation: int,
    faiss_index: Any,
    meta: dict[str, Any],
    manifest: dict[str, Any],
    model_files: Path | None,
) -> dict[str, Any]:
    """Write generation ``generation``'s files and the model copy, then replace index.json."""
    faiss = import_faiss()
    faiss_name, items_name = f"index-{generation:06d}.faiss", f"items-{generation:06d}.json"
    atomic_write(root / faiss_name, lambda tmp: write_faiss(faiss, faiss_index, tmp))
    atomic_write(root / items_name, lambda tmp: write_items(tmp, meta))
    model = {**manifest["model"], "copy": copy_model(model_files, root, manifest["model"])}
    files = {"faiss": faiss_name, "items": items_name}
    for key in ("ivfdata", "vectors", "codes"):
        if key in manifest:
            files[key] = manifest.pop(key)
    manifest = {**manifest, "format_version": FORMAT_VERSION, "model": model, "files": files}
    atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))  # commit
    return manifest


ITEMS_CHUNK = 65_536  # list entries encoded at a time


def write_items(path: str, meta: dict[str, Any]) -> None:
    """``meta`` as one JSON object, its lists encoded a chunk of entries at a time: a 10M-item
    index never holds its items as one JSON string, nor as Python lists (``Index.items`` is
    ``coembed.index.strings.Strings``)."""
    with open(path, "w", encoding="utf-8") as out:
        out.write("{")
        for n, (key, value) in enumerate(meta.items()):
            out.write(("," if n else "") + json.dumps(key) + ":")
            if value is None or isinstance(value, (str, dict)):
                out.write(json.dumps(value, ensure_ascii=False))
                continue
            out.write("[")
            for start in range(0, len(value), ITEMS_CHUNK):
                chunk = (
                    json.dumps(v, ensure_ascii=False) for v in value[start : start + ITEMS_CHUNK]
                )
                out.write(("," if start else "") + ",".join(chunk))
            out.write("]")
        out.write("}")


def write_faiss(faiss: Any, faiss_index: Any, path: str) -> None:
    """Write a FAISS index through a Python file: FAISS's own file writer reports a failed final
    flush (a full disk) only on stderr and leaves a truncated file, while Python raises."""
    with open(path, "wb") as f:
        faiss.write_index(faiss_index, faiss.PyCallbackIOWriter(f.write))


def _remove_uncommitted(
    root: Path, generation: int, copies_before: set[str], created: bool
) -> None:
    """Undo a save that failed before its commit: its generation's files, a model copy it made,
    and ``root`` itself when the save created it and nothing else is left in it."""
    faiss_name = f"index-{generation:06d}.faiss"
    try:
        committed = json.loads((root / MANIFEST).read_text())["files"]["faiss"] == faiss_name
    except (OSError, ValueError, KeyError, TypeError):
        committed = False
    if committed:  # interrupted just after the commit: the new generation is the index now
        return
    for stem, suffix in (
        ("items", "json"),
        ("index", "ivfdata"),
        ("vectors", "npy"),
        ("codes", "npy"),
    ):
        (root / f"{stem}-{generation:06d}.{suffix}").unlink(missing_ok=True)
    (root / faiss_name).unlink(missing_ok=True)
    for path in root.iterdir():
        if path.name.startswith("model-") and path.name not in copies_before:
            shutil.rmtree(path, ignore_errors=True)
    if created and not any(root.iterdir()):
        root.rmdir()


def _is_temporary(name: str) -> bool:
    temp_of = (".index-", ".items-", ".vectors-", ".codes-", ".blocks-", ".model-", f".{MANIFEST}.")
    temp_of += (f".{SKIPPED_FILE}.",)
    return name.startswith(temp_of) and name.endswith(".tmp")


def remove_old_files(root: Path, keep: set[str | None]) -> None:
    """Delete older generations, unused model copies and temp files left by killed saves."""
    for path in root.iterdir():
        name = path.name
        if name in keep:
            continue
        if (
            GENERATION.match(name)
            or _is_temporary(name)
            or (name.startswith("model-") and path.is_dir())
        ):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def foreign_entries(root: Path) -> list[str]:
    """What in ``root`` an index save would never write: empty for a new folder, an index, or
    the leftovers of a first build killed before its commit."""
    if not root.is_dir():
        return []
    own = (MANIFEST, SKIPPED_FILE, PARTS)
    return sorted(
        p.name
        for p in root.iterdir()
        if not (
            p.name in own
            or GENERATION.match(p.name)
            or _is_temporary(p.name)
            or (p.name.startswith("model-") and p.is_dir())
        )
    )
