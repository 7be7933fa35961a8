"""An embedding index: unit vectors in FAISS (inner product = cosine) with their items and model.

Which FAISS structure (``kind="auto"``, chosen from the number of vectors N):

=================  ==========================  ==============================================
N                  kind                        why
=================  ==========================  ==============================================
N < 50,000         ``flat``  (IndexFlatIP)     exact; a full scan of 50k x 256 floats is ~2 ms
50,000 <= N < 5M   ``hnsw``  (HNSW32, IP)      ~0.3 ms per query at recall@10 ~0.99 for 1M;
                                               efConstruction 40, efSearch 128
N >= 5,000,000     ``ivfpq`` (IVF + PQ, IP)    HNSW keeps every float (5M x 256 = 5 GB plus
                                               links); PQ stores D/4 bytes per vector.
                                               nlist ~ 4 sqrt(N), nprobe 32, trained on a sample
=================  ==========================  ==============================================

An index built with ``auto`` moves up a kind when ``add`` grows it past a threshold, reusing the
stored vectors (flat and HNSW keep them), so nothing is embedded again. ``--kind`` forces one.

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
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from coembed.errors import CoembedError, IndexError_, UsageError

FORMAT_VERSION = 1
MANIFEST = "index.json"
SKIPPED_FILE = "skipped.txt"
KINDS = ("auto", "flat", "hnsw", "ivfpq")
FLAT_MAX = 50_000  # below this, exact search
HNSW_MAX = 5_000_000  # below this, HNSW; above, IVF-PQ
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40
HNSW_EF_SEARCH = 128
IVF_NPROBE = 32
_ADD_CHUNK = 65_536  # vectors per FAISS add call: big enough for its threads, small for a bar
_GENERATION = re.compile(r"^(index|items)-(\d{6,})\.(faiss|json)$")


def import_faiss():
    """Import FAISS with its OpenMP threads sleeping, not spinning, while they wait for work.

    By default libgomp's idle threads busy-wait. On a machine with more runnable threads than
    cores (two shared cores, a server next to a model) the spinning threads steal the CPU from
    the ones doing work: measured here, an HNSW build ran 3x slower and single-query p99 went
    from 0.4 ms to 4 ms. FAISS bundles its own libgomp, which reads OMP_WAIT_POLICY once, when
    it is loaded; the variable is set only for that moment so torch's OpenMP keeps its default,
    and a value the user set is left alone.
    """
    if "faiss" in sys.modules:
        return sys.modules["faiss"]
    unset = "OMP_WAIT_POLICY" not in os.environ
    if unset:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        import faiss
    finally:
        if unset:
            del os.environ["OMP_WAIT_POLICY"]
    return faiss


def choose_kind(n: int) -> str:
    """The index kind ``auto`` uses for ``n`` vectors (see the module docstring)."""
    if n < FLAT_MAX:
        return "flat"
    return "hnsw" if n < HNSW_MAX else "ivfpq"


def _progress(total: int, unit: str, desc: str, progress: bool):
    from tqdm import tqdm

    # disable=None: a bar on a terminal, silence when stderr is a file or a pipe.
    quiet = not progress or os.environ.get("COEMBED_NO_PROGRESS") == "1"
    return tqdm(total=total, unit=unit, desc=desc, disable=True if quiet else None, leave=False)


def embed_image_sources(
    embedder, sources: Sequence[Any], batch_size: int = 64, progress: bool = True
) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
    """Embed images, skipping the ones that fail to decode.

    Returns ``(embeddings (n_ok, D) float32, ok indices into sources, [(index, reason)])``.
    """
    from coembed.data.loader import iter_image_batches

    chunks = [np.zeros((0, embedder.dim), np.float32)]
    ok: list[int] = []
    failures: list[tuple[int, str]] = []
    with _progress(len(sources), "img", "embedding images", progress) as bar:
        for pixels, ok_ids, failed in iter_image_batches(
            list(sources), embedder.image_size, batch_size
        ):
            if len(ok_ids):
                chunks.append(embedder.embed_pixels(pixels))
            ok.extend(ok_ids)
            failures.extend(failed)
            bar.update(len(ok_ids) + len(failed))
    return np.concatenate(chunks), ok, failures


def _embed_texts(embedder, texts: list[str], batch_size: int, progress: bool) -> np.ndarray:
    chunks = [np.zeros((0, embedder.dim), np.float32)]
    step = max(batch_size, 256)
    with _progress(len(texts), "text", "embedding texts", progress) as bar:
        for start in range(0, len(texts), step):
            chunks.append(embedder.embed_texts(texts[start : start + step]))
            bar.update(len(texts[start : start + step]))
    return np.concatenate(chunks)


# --- model identity ------------------------------------------------------------------------------


def _weights_digest(path: Path) -> str:
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
        "weights_digest": _weights_digest(source / WEIGHTS_FILE),
        "embed_dim": cfg.embed_dim,
    }


def model_identity(embedder) -> dict[str, Any]:
    """The identity of the model directory an embedder was loaded from. An embedder that was
    not loaded from one (a test double) is known by its dimension only."""
    source = getattr(embedder, "source", "") or ""
    if source and (Path(source) / "config.json").is_file():
        return model_dir_identity(source)
    return {"dir": None, "config_digest": None, "weights_digest": None, "embed_dim": embedder.dim}


def _same_model(built: dict[str, Any], given: dict[str, Any]) -> bool:
    if built.get("embed_dim") != given.get("embed_dim"):
        return False
    return all(
        built.get(key) is None or given.get(key) is None or built[key] == given[key]
        for key in ("config_digest", "weights_digest")
    )


def _describe_model(identity: dict[str, Any]) -> str:
    where = identity.get("dir") or "an in-memory model"
    digest = identity.get("config_digest") or "-"
    return f"{where} (config {digest}, weights {identity.get('weights_digest') or '-'}, dim {identity.get('embed_dim')})"


# --- FAISS structures ----------------------------------------------------------------------------


def _pq_subquantizers(dim: int) -> int:
    """The most PQ sub-vectors of >= 4 dims each that divide ``dim`` (64 bytes for 256-d)."""
    for m in range(max(1, dim // 4), 0, -1):
        if dim % m == 0:
            return m
    return 1


def _new_faiss(kind: str, vectors: np.ndarray) -> tuple[Any, dict[str, Any]]:
    """An empty (trained, for IVF-PQ) FAISS index of ``kind`` for vectors like ``vectors``."""
    faiss = import_faiss()

    n, dim = vectors.shape
    if kind == "flat":
        return faiss.IndexFlatIP(dim), {}
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = HNSW_EF_SEARCH
        return index, {
            "M": HNSW_M,
            "efConstruction": HNSW_EF_CONSTRUCTION,
            "efSearch": HNSW_EF_SEARCH,
        }
    if kind == "ivfpq":
        if n < 64:
            raise UsageError(f"--kind ivfpq needs at least 64 vectors to train on, got {n}")
        # k-means wants ~39+ points per centroid; a codebook of 2^bits centroids likewise.
        nlist = max(1, min(int(4 * np.sqrt(n)), n // 39))
        bits = 8 if n >= 256 * 39 else 4
        m = _pq_subquantizers(dim)
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, bits, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        size = min(n, max(50 * nlist, 40 * (1 << bits)))
        sample = vectors[np.sort(rng.choice(n, size, replace=False))]
        index.train(np.ascontiguousarray(sample))
        index.nprobe = min(IVF_NPROBE, nlist)
        return index, {"nlist": nlist, "m": m, "bits": bits, "nprobe": index.nprobe}
    raise UsageError(f"unknown index kind {kind!r} (one of {', '.join(KINDS)})")


def _apply_params(index: Any, kind: str, params: dict[str, Any]) -> None:
    """Search-time settings are not all stored by FAISS itself; restore them after loading."""
    if kind == "hnsw":
        index.hnsw.efSearch = int(params.get("efSearch", HNSW_EF_SEARCH))
    elif kind == "ivfpq":
        index.nprobe = int(params.get("nprobe", IVF_NPROBE))


def _add_in_chunks(index: Any, vectors: np.ndarray, progress: bool) -> None:
    with _progress(len(vectors), "vec", "indexing", progress and len(vectors) > _ADD_CHUNK) as bar:
        for start in range(0, len(vectors), _ADD_CHUNK):
            index.add(np.ascontiguousarray(vectors[start : start + _ADD_CHUNK], np.float32))
            bar.update(min(_ADD_CHUNK, len(vectors) - start))


# --- reading what to index -----------------------------------------------------------------------


def _image_inputs(
    images: str | os.PathLike | Sequence[str | os.PathLike], image_key: str, caption_key: str
) -> tuple[list[Any], list[str], list[list[str]]]:
    """(sources to decode, item names, captions per item) from a folder, a dataset or a list."""
    from coembed.data.formats import read_records
    from coembed.data.images import describe
    from coembed.embedder import IMAGE_SUFFIXES, list_images

    if isinstance(images, (str, os.PathLike)):
        path = Path(images)
        found = list_images(path) if path.is_dir() else []
        if found:
            paths = [str(p.resolve()) for p in found]
            return paths, paths, [[] for _ in paths]
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            return [str(path.resolve())], [str(path.resolve())], [[]]
        records, _ = read_records(os.fspath(images), image_key, caption_key)
        return (
            [r.image for r in records],
            [describe(r.image) for r in records],
            [list(r.captions) for r in records],
        )
    paths = [str(Path(p).resolve()) for p in images]
    return paths, paths, [[] for _ in paths]


def _text_inputs(texts: str | os.PathLike | Sequence[str]) -> list[str]:
    """Texts from a file (one per line, blank lines skipped) or a list."""
    if isinstance(texts, (str, os.PathLike)):
        path = Path(texts)
        if not path.is_file():
            raise CoembedError(f"{path}: no such text file (--texts wants one caption per line)")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise CoembedError(f"{path}: not UTF-8 text; convert it to UTF-8") from None
        texts = [line.strip() for line in lines]
    return [t for t in texts if t.strip()]


# --- the index -----------------------------------------------------------------------------------


class Index:
    """Unit vectors in FAISS plus, per vector, an item (image path or text) and its captions."""

    def __init__(
        self,
        faiss_index: Any,
        items: list[str],
        *,
        kind: str,
        requested_kind: str = "auto",
        modality: str = "image",
        model: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        captions: list[list[str]] | None = None,
        skipped: list[list[str]] | None = None,
        embedder=None,
        model_files: Path | None = None,
        device: str = "auto",
    ):
        self.faiss = faiss_index
        self.items = items
        self.kind = kind
        self.requested_kind = requested_kind
        self.modality = modality
        self.model = model or {
            "dir": None,
            "config_digest": None,
            "weights_digest": None,
            "embed_dim": faiss_index.d,
        }
        self.params = params or {}
        self.captions = captions if captions is not None else [[] for _ in items]
        self.skipped = skipped or []
        self._embedder = embedder
        self._model_files = model_files  # where the model's files are, to copy them on save
        self._device = device

    # -- construction --

    @classmethod
    def from_vectors(
        cls,
        vectors: np.ndarray,
        items: Sequence[str],
        kind: str = "auto",
        *,
        modality: str = "image",
        captions: list[list[str]] | None = None,
        embedder=None,
        progress: bool = False,
    ) -> Index:
        """An index over given unit rows ``vectors`` (N, D) naming ``items``; no embedding."""
        vectors = np.ascontiguousarray(vectors, np.float32)
        if vectors.ndim != 2 or len(vectors) != len(items):
            raise ValueError(f"expected (N, D) vectors for {len(items)} items, got {vectors.shape}")
        if kind not in KINDS:
            raise UsageError(f"unknown index kind {kind!r} (one of {', '.join(KINDS)})")
        actual = choose_kind(len(vectors)) if kind == "auto" else kind
        index, params = _new_faiss(actual, vectors)
        _add_in_chunks(index, vectors, progress)
        identity = model_identity(embedder) if embedder is not None else None
        files = Path(identity["dir"]) if identity and identity["dir"] else None
        return cls(
            index,
            list(items),
            kind=actual,
            requested_kind=kind,
            modality=modality,
            model=identity,
            params=params,
            captions=captions,
            embedder=embedder,
            model_files=files,
        )

    @classmethod
    def build(
        cls,
        embedder,
        images: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        texts: str | os.PathLike | Sequence[str] | None = None,
        kind: str = "auto",
        *,
        batch_size: int = 64,
        image_key: str = "filepath",
        caption_key: str = "caption",
        progress: bool = True,
    ) -> Index:
        """Embed images (a folder, a dataset file or a list of paths) or texts (a file with one
        per line, or a list) and index them. Undecodable images are skipped and listed in
        ``index.skipped``; raises CoembedError when nothing is left to index.
        """
        if (images is None) == (texts is None):
            raise UsageError("give exactly one of images= or texts=")
        if kind not in KINDS:
            raise UsageError(f"unknown index kind {kind!r} (one of {', '.join(KINDS)})")
        vectors, items, captions, skipped, _ = _embed_inputs(
            embedder, images, texts, batch_size, image_key, caption_key, progress
        )
        if not items:
            raise CoembedError("nothing to index: no readable images or non-empty texts")
        index = cls.from_vectors(
            vectors,
            items,
            kind,
            modality="image" if images is not None else "text",
            captions=captions,
            embedder=embedder,
            progress=progress,
        )
        index.skipped = skipped
        return index

    # -- the basics --

    def __len__(self) -> int:
        return int(self.faiss.ntotal)

    @property
    def dim(self) -> int:
        return int(self.faiss.d)

    @property
    def embedder(self):
        """The model that built the index, loaded from the index's own copy on first use."""
        if self._embedder is None:
            if self._model_files is None and self.model.get("dir"):
                raise IndexError_(
                    f"the index's copy of its model is missing and {self.model['dir']} is gone "
                    "or now holds another model; rebuild the index"
                )
            if self._model_files is None:
                raise IndexError_(
                    "this index stores no model (it was built from vectors); "
                    "pass embedder= to Index.load to embed queries"
                )
            from coembed.embedder import load

            self._embedder = load(self._model_files, device=self._device)
        return self._embedder

    # -- adding --

    def add(
        self,
        images: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        texts: str | os.PathLike | Sequence[str] | None = None,
        *,
        batch_size: int = 64,
        image_key: str = "filepath",
        caption_key: str = "caption",
        progress: bool = True,
    ) -> dict[str, int]:
        """Embed and append new items (ones already indexed are left alone); no rebuild.

        Returns ``{"added", "already_indexed", "skipped"}``.
        """
        if (images is None) == (texts is None):
            raise UsageError("give exactly one of images= or texts=")
        wanted = "image" if images is not None else "text"
        if wanted != self.modality:
            other = "--images" if self.modality == "image" else "--texts"
            raise UsageError(f"this is {self.modality} index: add to it with {other}")
        known = set(self.items)
        vectors, items, captions, skipped, repeats = _embed_inputs(
            self.embedder, images, texts, batch_size, image_key, caption_key, progress, skip=known
        )
        before = len(self)
        self.add_vectors(vectors, items, captions, progress=progress)
        self.skipped.extend(skipped)
        return {
            "added": len(self) - before,
            "already_indexed": repeats,
            "skipped": len(skipped),
        }

    def add_vectors(
        self,
        vectors: np.ndarray,
        items: Sequence[str],
        captions: list[list[str]] | None = None,
        progress: bool = False,
    ) -> None:
        """Append unit rows and their items; an ``auto`` index moves up a kind when it outgrows it."""
        vectors = np.ascontiguousarray(vectors, np.float32).reshape(-1, self.dim)
        if len(vectors) != len(items):
            raise ValueError(f"{len(vectors)} vectors for {len(items)} items")
        if not len(vectors):
            return
        wanted = choose_kind(len(self) + len(vectors))
        if self.requested_kind == "auto" and wanted != self.kind and self.kind != "ivfpq":
            # Flat and HNSW keep the raw vectors, so moving up is a re-add, not a re-embed.
            old = self.faiss.reconstruct_n(0, len(self))
            self.faiss, self.params = _new_faiss(wanted, np.concatenate([old, vectors]))
            self.kind = wanted
            _add_in_chunks(self.faiss, old, progress)
        _add_in_chunks(self.faiss, vectors, progress)
        self.items.extend(items)
        self.captions.extend(captions if captions is not None else [[] for _ in items])

    # -- searching --

    def query_vector(self, query: Any) -> np.ndarray:
        """(1, D) float32 for a vector, a query string (plain or compositional), a Query, or an
        image (path or PIL image)."""
        if isinstance(query, np.ndarray):
            # Vectors are searched as given (unit rows, as embed_* returns them): no copy when
            # they are already contiguous float32, which keeps the per-query cost at FAISS's.
            if query.dtype != np.float32 or not query.flags.c_contiguous:
                query = np.ascontiguousarray(query, np.float32)
            return query.reshape(1, -1)
        from coembed.query import Query, check_images, embed_query, parse_query

        if isinstance(query, str):
            query = parse_query(query)
        if isinstance(query, Query):
            check_images(query)  # before loading the model: a bad path fails fast
            return embed_query(query, self.embedder)[None, :]
        return self.embedder.embed_images([query])[:1]

    def set_search_params(self, ef_search: int | None = None, nprobe: int | None = None) -> None:
        """Trade speed for recall: HNSW's ``efSearch`` (default 128) or IVF-PQ's ``nprobe``
        (default 32); saved with the index. Flat search is exact and has neither."""
        if ef_search is not None and self.kind == "hnsw":
            self.params["efSearch"] = int(ef_search)
        if nprobe is not None and self.kind == "ivfpq":
            self.params["nprobe"] = int(nprobe)
        _apply_params(self.faiss, self.kind, self.params)

    def search_ids(self, query: Any, k: int = 10) -> tuple[list[int], list[float]]:
        """Ids and scores of the ``k`` nearest items, best first."""
        # FAISS allocates (1, k) results up front: --k 10**12 must not ask for terabytes.
        k = max(1, min(int(k), len(self)))
        scores, ids = self.faiss.search(self.query_vector(query), k)
        ids_list = ids[0].tolist()
        # FAISS pads with -1 when fewer than k results exist.
        n = ids_list.index(-1) if -1 in ids_list else len(ids_list)
        return ids_list[:n], scores[0].tolist()[:n]

    def search(self, query: Any, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` best ``(item, score)`` pairs, best first; score is the cosine similarity
        (approximate for ivfpq). ``query``: text, compositional query, image path, PIL image or
        a unit vector."""
        ids, scores = self.search_ids(query, k)
        items = self.items
        return [(items[i], s) for i, s in zip(ids, scores)]

    # -- files --

    @classmethod
    def load(cls, directory: str | os.PathLike, embedder=None, device: str = "auto") -> Index:
        """Load an index directory. With ``embedder``, check that it is the model that built the
        index (IndexError_ if not); without, the index's own model copy is loaded on first use."""
        faiss = import_faiss()

        root = Path(directory)
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
        _apply_params(index, manifest["kind"], manifest.get("params", {}))
        model = manifest["model"]
        if embedder is not None:
            given = model_identity(embedder)
            if not _same_model(model, given):
                raise IndexError_(
                    f"{root}: this index was built with another model: {_describe_model(model)}; "
                    f"the model given is {_describe_model(given)}. Use the index's own model, "
                    "or build a new index with this one"
                )
        copy = root / model["copy"] if model.get("copy") else None
        return cls(
            index,
            meta["items"],
            kind=manifest["kind"],
            requested_kind=manifest.get("requested_kind", manifest["kind"]),
            modality=manifest["modality"],
            model=model,
            params=manifest.get("params", {}),
            captions=meta.get("captions"),
            skipped=meta.get("skipped", []),
            embedder=embedder,
            model_files=copy if copy and copy.is_dir() else _model_dir_if_same(model),
            device=device,
        )

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the index into ``directory`` atomically (see the module docstring); returns it."""
        faiss = import_faiss()

        from coembed.checkpoint import atomic_write, atomic_write_text

        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        generation = 1 + max(
            (int(m.group(2)) for p in root.iterdir() if (m := _GENERATION.match(p.name))), default=0
        )
        faiss_name, items_name = f"index-{generation:06d}.faiss", f"items-{generation:06d}.json"
        atomic_write(root / faiss_name, lambda tmp: faiss.write_index(self.faiss, tmp))
        meta = {"items": self.items, "captions": self.captions, "skipped": self.skipped}
        atomic_write_text(root / items_name, json.dumps(meta, ensure_ascii=False))
        model = dict(self.model)
        model["copy"] = self._copy_model(root)
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "requested_kind": self.requested_kind,
            "modality": self.modality,
            "count": len(self),
            "dim": self.dim,
            "params": self.params,
            "model": model,
            "files": {"faiss": faiss_name, "items": items_name},
            "skipped": len(self.skipped),
        }
        atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))  # commit
        _fsync_dir(root)
        self.model = model
        if self._model_files is not None and model["copy"]:
            self._model_files = root / model["copy"]
        atomic_write_text(
            root / SKIPPED_FILE, "".join(f"{source}\t{reason}\n" for source, reason in self.skipped)
        )
        _remove_old_files(root, keep={faiss_name, items_name, model["copy"]})
        return root

    def _copy_model(self, root: Path) -> str | None:
        """Hard-link (or copy) the model's files into ``root/model-<digest>``; returns the name."""
        from coembed.checkpoint import MODEL_FILES

        if self._model_files is None:
            return None
        digest = self.model.get("weights_digest") or self.model.get("config_digest") or "model"
        name = f"model-{digest}"
        target = root / name
        if target.is_dir():
            return name
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
        for file in MODEL_FILES:
            src = self._model_files / file
            if src.is_file():
                try:
                    os.link(src, tmp / file)
                except OSError:  # another file system, or links not allowed
                    shutil.copy2(src, tmp / file)
        os.rename(tmp, target)  # a directory appears whole or not at all
        return name


def _model_dir_if_same(model: dict[str, Any]) -> Path | None:
    """The original model directory, when the index has no copy and the directory is unchanged."""
    if not model.get("dir") or not (Path(model["dir"]) / "config.json").is_file():
        return None
    try:
        same = _same_model(model, model_dir_identity(model["dir"]))
    except (CoembedError, OSError):
        return None
    return Path(model["dir"]) if same else None


def _fsync_dir(root: Path) -> None:
    # Make the renames durable before the old generation is deleted.
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


def _remove_old_files(root: Path, keep: set[str | None]) -> None:
    """Delete older generations, unused model copies and temp files left by killed saves."""
    for path in root.iterdir():
        name = path.name
        if name in keep:
            continue
        temp_of = (".index-", ".items-", ".model-", f".{MANIFEST}.", f".{SKIPPED_FILE}.")
        stale_tmp = name.startswith(temp_of) and name.endswith(".tmp")
        if _GENERATION.match(name) or stale_tmp or (name.startswith("model-") and path.is_dir()):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


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
        raise IndexError_(
            f"{path}: index format {manifest.get('format_version') if isinstance(manifest, dict) else None!r}, "
            f"this coembed reads version {FORMAT_VERSION}; rebuild the index"
        )
    return manifest


def _embed_inputs(
    embedder,
    images,
    texts,
    batch_size: int,
    image_key: str,
    caption_key: str,
    progress: bool,
    skip: set[str] | None = None,
) -> tuple[np.ndarray, list[str], list[list[str]], list[list[str]], int]:
    """(vectors, items, captions, skipped [source, reason], repeats) for images or texts,
    leaving out (and counting as repeats) items in ``skip`` and items given twice."""
    skip = set(skip or ())
    if texts is not None:
        all_texts = _text_inputs(texts)
        fresh = list(dict.fromkeys(t for t in all_texts if t not in skip))
        vectors = _embed_texts(embedder, fresh, batch_size, progress)
        return vectors, fresh, [[] for _ in fresh], [], len(all_texts) - len(fresh)
    sources, names, captions = _image_inputs(images, image_key, caption_key)
    keep = []
    seen = set(skip)
    for i, name in enumerate(names):
        if name not in seen:
            seen.add(name)
            keep.append(i)
    vectors, ok, failures = embed_image_sources(
        embedder, [sources[i] for i in keep], batch_size, progress
    )
    skipped = [[names[keep[i]], reason] for i, reason in failures]
    items = [names[keep[i]] for i in ok]
    return vectors, items, [captions[keep[i]] for i in ok], skipped, len(names) - len(keep)


# --- command line --------------------------------------------------------------------------------


def index_cli(args) -> Path:
    """``coembed index``: build (or ``--add`` to) an index directory and print a summary."""
    from coembed.embedder import load

    if args.kind not in KINDS:
        raise UsageError(f"--kind {args.kind!r}: use one of {', '.join(KINDS)}")
    if args.batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    out = Path(args.output)
    keys = {"image_key": args.image_key or "filepath", "caption_key": args.caption_key or "caption"}
    embedder = load(args.model, device=args.device) if args.model else None
    if args.add:
        index = Index.load(out, embedder=embedder, device=args.device)
        if args.kind not in ("auto", index.kind):
            raise UsageError(
                f"--kind {args.kind} with --add: this index is {index.kind}; rebuild to change it"
            )
        report = index.add(images=args.images, texts=args.texts, batch_size=args.batch_size, **keys)
        index.save(out)
        print(
            f"added {report['added']} {index.modality}s to {out} ({len(index)} in all, "
            f"{index.kind}); {report['already_indexed']} were already indexed"
        )
        new_skips = report["skipped"]
    else:
        if embedder is None:
            raise UsageError(
                "coembed index: --model is required to build an index (only --add can reuse the index's own model)"
            )
        if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
            raise UsageError(
                f"--output {out}: exists and is not an index; choose an empty or new folder"
            )
        index = Index.build(
            embedder,
            images=args.images,
            texts=args.texts,
            kind=args.kind,
            batch_size=args.batch_size,
            **keys,
        )
        index.save(out)
        print(f"indexed {len(index)} {index.modality}s into {out} ({index.kind}, dim {index.dim})")
        new_skips = len(index.skipped)
    if new_skips:
        print(
            f"skipped {new_skips} image(s) that could not be decoded (listed in {out / SKIPPED_FILE})",
            file=sys.stderr,
        )
    return out


def search_cli(args) -> list[dict[str, Any]]:
    """``coembed search``: print the ``--k`` best items for a text, image or compositional query."""
    from coembed.query import cli_query

    if args.k <= 0:
        raise UsageError(f"--k must be positive, got {args.k}")
    index = Index.load(args.index, device=args.device)
    query = cli_query(args.query, args.image)
    ids, scores = index.search_ids(query, args.k)
    results = []
    for rank, (i, score) in enumerate(zip(ids, scores), start=1):
        row = {"rank": rank, "score": round(float(score), 6), "item": index.items[i]}
        if index.captions[i]:
            row["captions"] = index.captions[i]
        results.append(row)
    if args.json:
        payload = {
            "index": str(args.index),
            "kind": index.kind,
            "modality": index.modality,
            "query": str(query),
            "results": results,
        }
        sys.stdout.write(json.dumps(payload, ensure_ascii=False) + "\n")
    else:
        for row in results:
            extra = f"  ({row['captions'][0]})" if row.get("captions") else ""
            print(f"{row['rank']:>3}  {row['score']:.4f}  {row['item']}{extra}")
    return results
