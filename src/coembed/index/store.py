"""The index directory on disk: manifest, generations of data files, model copy and identity.

The index directory::

    index.json            the manifest: kind, count, dim, model identity, and the data files
                          of the current generation; replacing it is the commit point
    index-000007.faiss    the FAISS index of generation 7
    items-000007.json     per vector: the item (image path or text) and its captions
    model-<digest>/       a copy (hard link when possible) of the model directory that built it,
                          so ``coembed search --index DIR`` needs nothing else
    skipped.txt           images that could not be decoded, with the reason

Saving writes the new generation's files (each to a temporary name, then renamed), then
replaces ``index.json``, then deletes the older generation. A save killed at any point leaves
``index.json`` naming a complete generation, so the previous index stays loadable.

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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coembed.errors import CoembedError, IndexError_
from coembed.files import atomic_write, atomic_write_text
from coembed.index.kinds import import_faiss

if TYPE_CHECKING:
    from coembed.embedder import Embedder

FORMAT_VERSION = 1
MANIFEST = "index.json"
SKIPPED_FILE = "skipped.txt"
GENERATION = re.compile(r"^(index|items)-(\d{6,})\.(faiss|json)$")


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
    for file in MODEL_FILES:
        src = model_files / file
        if src.is_file():
            try:
                os.link(src, tmp / file)
            except OSError:  # another file system, or links not allowed
                shutil.copy2(src, tmp / file)
    os.rename(tmp, target)  # a directory appears whole or not at all
    return name


# --- reading -------------------------------------------------------------------------------------


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of an index directory, or one IndexError_ saying what is wrong."""
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
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise IndexError_(f"{path}: not valid JSON; rebuild the index") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        found = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise IndexError_(
            f"{path}: index format {found!r}, "
            f"this coembed reads version {FORMAT_VERSION}; rebuild the index"
        )
    return manifest


def read_index_files(root: Path) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(FAISS index, items metadata, manifest) of the generation the manifest names, checked
    to agree with each other; one IndexError_ for anything missing, damaged or inconsistent."""
    faiss = import_faiss()
    manifest = read_manifest(root)
    files = manifest["files"]
    faiss_path, items_path = root / files["faiss"], root / files["items"]
    for path in (faiss_path, items_path):
        if not path.is_file():
            raise IndexError_(f"{path}: missing; the index directory is damaged, rebuild it")
    try:
        index = faiss.read_index(str(faiss_path))
    except RuntimeError:
        raise IndexError_(
            f"{faiss_path}: unreadable (truncated or corrupt); rebuild the index"
        ) from None
    try:
        meta = json.loads(items_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise IndexError_(f"{items_path}: not valid JSON; rebuild the index") from None
    if index.ntotal != len(meta["items"]) or index.ntotal != manifest["count"]:
        raise IndexError_(
            f"{root}: {faiss_path.name} holds {index.ntotal} vectors but the metadata "
            f"{len(meta['items'])}; rebuild the index"
        )
    return index, meta, manifest


# --- writing -------------------------------------------------------------------------------------


def write_index_files(
    root: Path,
    faiss_index: Any,
    meta: dict[str, Any],
    manifest: dict[str, Any],
    model_files: Path | None,
) -> dict[str, Any]:
    """Save one generation into ``root`` and commit it (see the module docstring).

    ``meta`` holds items, captions and skipped; ``manifest`` the index's description (kind,
    count, model identity...). Returns the manifest as written, its model with ``copy`` set.
    """
    faiss = import_faiss()
    root.mkdir(parents=True, exist_ok=True)
    generation = 1 + max(
        (int(m.group(2)) for p in root.iterdir() if (m := GENERATION.match(p.name))), default=0
    )
    faiss_name, items_name = f"index-{generation:06d}.faiss", f"items-{generation:06d}.json"
    atomic_write(root / faiss_name, lambda tmp: faiss.write_index(faiss_index, tmp))
    atomic_write_text(root / items_name, json.dumps(meta, ensure_ascii=False))
    model = {**manifest["model"], "copy": copy_model(model_files, root, manifest["model"])}
    manifest = {
        **manifest,
        "format_version": FORMAT_VERSION,
        "model": model,
        "files": {"faiss": faiss_name, "items": items_name},
    }
    atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))  # commit
    fsync_dir(root)
    skipped = "".join(f"{source}\t{reason}\n" for source, reason in meta["skipped"])
    atomic_write_text(root / SKIPPED_FILE, skipped)
    remove_old_files(root, keep={faiss_name, items_name, model["copy"]})
    return manifest


def fsync_dir(root: Path) -> None:
    """Make the renames in ``root`` durable before the old generation is deleted."""
    try:
        fd = os.open(root, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_old_files(root: Path, keep: set[str | None]) -> None:
    """Delete older generations, unused model copies and temp files left by killed saves."""
    temp_of = (".index-", ".items-", ".model-", f".{MANIFEST}.", f".{SKIPPED_FILE}.")
    for path in root.iterdir():
        name = path.name
        if name in keep:
            continue
        stale_tmp = name.startswith(temp_of) and name.endswith(".tmp")
        if GENERATION.match(name) or stale_tmp or (name.startswith("model-") and path.is_dir()):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
