"""The Index: unit vectors in FAISS plus, per vector, an item (image path or text) and captions.

An index built with ``auto`` moves up a kind when ``add`` grows it past a threshold (see
``coembed.index.kinds``), reusing the stored vectors (flat and HNSW keep them), so nothing is
embedded again. An explicit kind is kept. Files on disk: ``coembed.index.store``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import coembed.index.store as store
from coembed.errors import CoembedError, IndexError_, UsageError
from coembed.index.inputs import (
    ImagesInput,
    TextsInput,
    embed_inputs,
    image_roots,
    merge_roots,
)
from coembed.index.kinds import (
    IVF_KINDS,
    KINDS,
    add_in_chunks,
    apply_search_params,
    check_kind,
    choose_kind,
    new_faiss_index,
)
from coembed.index.query import Query, Term, check_images, embed_query, parse_query
from coembed.index.rerank import Reranked, RerankVectors
from coembed.index.strings import StringLists, Strings
from coembed.index.tune import (
    DEFAULT_TARGET,
    Tuning,
    array_blocks,
    exact_neighbours,
    sample_ids,
    tune_recall,
)

if TYPE_CHECKING:
    from coembed.embedder import Embedder

__all__ = ["KINDS", "Index"]


class Index:
    """Unit vectors in FAISS plus, per vector, an item (image path or text) and its captions."""

    def __init__(
        self,
        faiss_index: Any,
        items: Sequence[str],
        *,
        kind: str,
        requested_kind: str = "auto",
        modality: str = "image",
        model: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        captions: Sequence[Sequence[str]] | None = None,
        skipped: list[list[str]] | None = None,
        roots: list[str] | None = None,
        tuning: dict[str, Any] | None = None,
        target_recall: float | None = None,
        rerank: RerankVectors | None = None,
        embedder: Embedder | None = None,
        model_files: Path | None = None,
        device: str = "auto",
    ):
        self.faiss = faiss_index
        # compact (coembed.index.strings): at 10M items, 1.4 GB as Python lists, 0.3 GB so
        self.items = items if isinstance(items, Strings) else Strings(items)
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
        if not isinstance(captions, StringLists):
            captions = StringLists(captions if captions is not None else [[]] * len(self.items))
        self.captions = captions
        self.skipped = skipped or []
        # The folders the indexed image files were in (see inputs.image_roots); None for an
        # index saved before they were recorded, or built from vectors.
        self.roots = roots
        # What the build's recall tuning chose and measured (coembed.index.tune); None: untuned.
        self.tuning = tuning
        self.target_recall = target_recall  # what the build tuned to, and an add tunes to again
        # IVF-PQ: the vectors its candidates are re-scored with (coembed.index.rerank)
        self.rerank = rerank
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
        embedder: Embedder | None = None,
        progress: bool = False,
        target_recall: float | None = DEFAULT_TARGET,
    ) -> Index:
        """An index over given unit rows ``vectors`` (N, D) naming ``items``; no embedding.

        An approximate kind gets the efSearch or nprobe that reaches ``target_recall`` (recall@10
        on a held-out sample of ``vectors``, see ``coembed.index.tune``); None keeps the
        defaults of ``coembed.index.kinds``."""
        vectors = np.ascontiguousarray(vectors, np.float32)
        if vectors.ndim != 2 or len(vectors) != len(items):
            raise ValueError(f"expected (N, D) vectors for {len(items)} items, got {vectors.shape}")
        check_kind(kind)
        actual = choose_kind(len(vectors)) if kind == "auto" else kind
        built = built_and_tuned(actual, vectors, target_recall, progress)
        if kind == "auto" and built.tuning is not None and built.tuning.needs_routing():
            # HNSW's graph may not link well-separated clusters: IVF routes to them first.
            other = built_and_tuned("ivfflat", vectors, target_recall, progress)
            if other.tuning.beats(built.tuning):
                actual, built = "ivfflat", other
        index, params, tuning = built.faiss, built.params, built.tuning
        identity = store.model_identity(embedder) if embedder is not None else None
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
            tuning=None if tuning is None else tuning.as_json(),
            target_recall=target_recall,
            rerank=built.rerank,
            embedder=embedder,
            model_files=files,
        )

    @classmethod
    def build(
        cls,
        embedder: Embedder,
        images: ImagesInput | None = None,
        texts: TextsInput | None = None,
        kind: str = "auto",
        *,
        batch_size: int = 64,
        image_key: str = "filepath",
        caption_key: str = "caption",
        progress: bool = True,
        target_recall: float | None = DEFAULT_TARGET,
    ) -> Index:
        """Embed images (a folder, a dataset file or a list of paths) or texts (a file with one
        per line, or a list) and index them (``target_recall``: see ``from_vectors``).
        Undecodable images are skipped and listed in ``index.skipped``; raises CoembedError when
        nothing is left to index.
        """
        if (images is None) == (texts is None):
            raise UsageError("give exactly one of images= or texts=")
        check_kind(kind)
        new = embed_inputs(
            embedder,
            images,
            texts,
            batch_size=batch_size,
            image_key=image_key,
            caption_key=caption_key,
            progress=progress,
        )
        if not new.items:
            raise CoembedError("nothing to index: no readable images or non-empty texts")
        index = cls.from_vectors(
            new.vectors,
            new.items,
            kind,
            modality="image" if images is not None else "text",
            captions=new.captions,
            embedder=embedder,
            progress=progress,
            target_recall=target_recall,
        )
        index.skipped = new.skipped
        index.roots = new.roots if index.modality == "image" else None
        return index

    # -- the basics --

    def __len__(self) -> int:
        return int(self.faiss.ntotal)

    @property
    def dim(self) -> int:
        """The vectors' dimension D."""
        return int(self.faiss.d)

    @property
    def embedder(self) -> Embedder:
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

            embedder = load(self._model_files, device=self._device)
            if not store.same_model(self.model, store.model_identity(embedder)):
                raise IndexError_(
                    f"{self._model_files} is not the model that built this index (it is "
                    f"{store.describe_model(store.model_identity(embedder))}, the index was "
                    f"built with {store.describe_model(self.model)}); rebuild the index"
                )
            self._embedder = embedder
        return self._embedder

    # -- adding --

    def add(
        self,
        images: ImagesInput | None = None,
        texts: TextsInput | None = None,
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
        new = embed_inputs(
            self.embedder,
            images,
            texts,
            batch_size=batch_size,
            image_key=image_key,
            caption_key=caption_key,
            progress=progress,
            skip=set(self.items),
        )
        if self.modality == "image":
            known = self.roots if self.roots is not None else image_roots(self.items, False)
            self.roots = merge_roots(known + new.roots)
        before = len(self)
        self.add_vectors(new.vectors, new.items, new.captions, progress=progress)
        self.skipped.extend(new.skipped)
        return {
            "added": len(self) - before,
            "already_indexed": new.repeats,
            "skipped": len(new.skipped),
        }

    def add_vectors(
        self,
        vectors: np.ndarray,
        items: Sequence[str],
        captions: list[list[str]] | None = None,
        progress: bool = False,
    ) -> None:
        """Append unit rows and their items; an ``auto`` index moves up a kind when it outgrows it."""
        vectors = np.ascontiguousarray(vectors, np.float32).reshape(-1, self.dim)  # (N, D)
        if len(vectors) != len(items):
            raise ValueError(f"{len(vectors)} vectors for {len(items)} items")
        if not len(vectors):
            return
        wanted = choose_kind(len(self) + len(vectors))
        if self.requested_kind == "auto" and wanted != self.kind and self.kind in ("flat", "hnsw"):
            # Flat and HNSW keep the raw vectors, so moving up is a re-add, not a re-embed.
            old = self.faiss.reconstruct_n(0, len(self))  # (len(self), D)
            self.faiss, self.params = new_faiss_index(wanted, np.concatenate([old, vectors]))
            self.kind = wanted
            add_in_chunks(self.faiss, old, progress)
            if wanted == "ivfpq":  # from now on re-ranked with the vectors (coembed.index.rerank)
                self.rerank = RerankVectors(old)  # its codes made below, over every vector
        add_in_chunks(self.faiss, vectors, progress)
        if self.rerank is not None:
            old = np.asarray(self.rerank.vectors)
            self.rerank = RerankVectors.in_memory(np.concatenate([old, vectors]))
        self.items.extend(items)
        self.captions.extend(captions if captions is not None else [[] for _ in items])
        self._retune(progress)

    def _retune(self, progress: bool) -> None:
        """After an add, tune again to the build's target (an index tuned at build time, whose
        vectors FAISS keeps: HNSW; an IVF-PQ index keeps its setting)."""
        if self.target_recall is None or self.kind != "hnsw":
            return
        vectors = self.faiss.reconstruct_n(0, len(self))  # (N, D)
        tuning = tune_in_memory(self.faiss, self.kind, vectors, self.target_recall, progress)
        if tuning is not None:
            self.params[tuning.parameter] = tuning.value
            self.tuning = tuning.as_json()

    # -- searching --

    def query_vector(self, query: Any) -> np.ndarray:
        """(1, D) float32 for a vector, a query string (plain or compositional), a Query, or an
        image (path or PIL image)."""
        if isinstance(query, np.ndarray):
            # Vectors are searched as given (unit rows, as embed_* returns them): no copy when
            # they are already contiguous float32, which keeps the per-query cost at FAISS's.
            if query.dtype != np.float32 or not query.flags.c_contiguous:
                query = np.ascontiguousarray(query, np.float32)
            if query.size != self.dim:
                raise UsageError(
                    f"a query vector needs the index's {self.dim} values, got shape {query.shape}"
                )
            return query.reshape(1, -1)
        if isinstance(query, str):
            query = parse_query(query)
        if isinstance(query, Query):
            known = item_vectors(query, self)  # image:17 is item 17, as on the web page
            check_images(query, known)  # before loading the model: a bad path fails fast
            return embed_query(query, self.embedder, known)[None, :]
        return self.embedder.embed_images([query])[:1]

    def set_search_params(self, ef_search: int | None = None, nprobe: int | None = None) -> None:
        """Trade speed for recall by hand: HNSW's ``efSearch`` or an IVF index's ``nprobe`` (a
        build tunes them to its target recall); saved with the index. Flat search is exact and
        has neither."""
        if ef_search is not None and self.kind == "hnsw":
            self.params["efSearch"] = int(ef_search)
        if nprobe is not None and self.kind in IVF_KINDS:
            self.params["nprobe"] = int(nprobe)
        if ef_search is not None or nprobe is not None:
            self.tuning = None  # set by hand: no longer what the tuning measured
        apply_search_params(self.faiss, self.kind, self.params)

    @property
    def searcher(self) -> Any:
        """What answers a search: FAISS, or FAISS re-ranked with the stored vectors (IVF-PQ)."""
        return self.faiss if self.rerank is None else Reranked(self.faiss, self.rerank)

    def search_ids(self, query: Any, k: int = 10) -> tuple[list[int], list[float]]:
        """Ids and scores of the ``k`` nearest items, best first."""
        # FAISS allocates (1, k) results up front: --k 10**12 must not ask for terabytes.
        k = max(1, min(int(k), len(self)))
        scores, ids = self.searcher.search(self.query_vector(query), k)  # (1, k) each
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
    def load(
        cls, directory: str | os.PathLike, embedder: Embedder | None = None, device: str = "auto"
    ) -> Index:
        """Load an index directory. With ``embedder``, check that it is the model that built the
        index (IndexError_ if not); without, the index's own model copy is loaded on first use."""
        root = Path(directory)
        index, meta, manifest = store.read_index_files(root)
        apply_search_params(index, manifest["kind"], manifest.get("params", {}))
        model = manifest["model"]
        if embedder is not None:
            given = store.model_identity(embedder)
            if not store.same_model(model, given):
                raise IndexError_(
                    f"{root}: this index was built with another model: "
                    f"{store.describe_model(model)}; the model given is "
                    f"{store.describe_model(given)}. Use the index's own model, "
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
            roots=manifest.get("roots"),
            tuning=manifest.get("tuning"),
            target_recall=manifest.get("target_recall"),
            rerank=meta.get("rerank"),
            embedder=embedder,
            model_files=copy if copy and copy.is_dir() else store.model_dir_if_same(model),
            device=device,
        )

    def save(
        self,
        directory: str | os.PathLike,
        make_faiss: store.MakeFaiss | None = None,
        rerank: store.VectorBlocks | None = None,
    ) -> Path:
        """Write the index into ``directory`` atomically (see ``coembed.index.store``); returns
        it. ``make_faiss`` and ``rerank``: an index built as it is saved, and its re-ranking
        vectors block by block (``store.write_index_files``)."""
        root = Path(directory)
        meta = {"items": self.items, "captions": self.captions, "skipped": self.skipped}
        description = {
            "kind": self.kind,
            "requested_kind": self.requested_kind,
            "modality": self.modality,
            "count": len(self),
            "dim": self.dim,
            "params": self.params,
            "model": self.model,
            "skipped": len(self.skipped),
            **({"roots": self.roots} if self.roots is not None else {}),
            **({"tuning": self.tuning} if self.tuning is not None else {}),
            "target_recall": self.target_recall,
        }
        written = store.write_index_files(
            root,
            self.faiss,
            meta,
            description,
            self._model_files,
            make_faiss,
            rerank or (self.rerank.vectors if self.rerank is not None else None),
        )
        self.model = written["model"]
        if self._model_files is not None and self.model["copy"]:
            self._model_files = root / self.model["copy"]
        return root


@dataclass
class Built:
    """A FAISS index just built: its parameters, tuning and re-ranking vectors (IVF-PQ)."""

    faiss: Any
    params: dict[str, Any]
    tuning: Tuning | None
    rerank: RerankVectors | None


def built_and_tuned(kind: str, vectors: np.ndarray, target: float | None, progress: bool) -> Built:
    """A FAISS index of ``kind`` over ``vectors`` (N, D), tuned to ``target`` recall@10 (None:
    untuned, for an exact index or no target); IVF-PQ keeps the vectors to re-rank with."""
    index, params = new_faiss_index(kind, vectors)
    add_in_chunks(index, vectors, progress)
    apply_search_params(index, kind, params)
    rerank = RerankVectors.in_memory(vectors) if kind == "ivfpq" else None
    tuning = None
    if target is not None:
        tuning = tune_in_memory(index, kind, vectors, target, progress, rerank)
        if tuning is not None:
            params[tuning.parameter] = tuning.value
    return Built(index, params, tuning, rerank)


def tune_in_memory(
    faiss_index: Any,
    kind: str,
    vectors: np.ndarray,
    target: float,
    progress: bool,
    rerank: RerankVectors | None = None,
) -> Tuning | None:
    """Tune an approximate index over in-memory ``vectors`` (N, D) to ``target`` recall@10
    (searched as the index is: re-ranked with ``rerank`` when it has them)."""
    if kind not in ("hnsw", *IVF_KINDS) or len(vectors) <= 11:
        return None
    ids = sample_ids(len(vectors))
    queries = vectors[ids]
    exact = exact_neighbours(queries, ids, array_blocks(vectors))
    searcher = None if rerank is None else Reranked(faiss_index, rerank)
    return tune_recall(faiss_index, kind, queries, ids, exact, target, progress, searcher)


def item_vectors(query: Query, index: Index) -> dict[str, np.ndarray]:
    """The (D,) vectors of the image terms that name an item of ``index``, by term value.

    ``image:17`` is item 17, as on the web page (UsageError past the last id); a path that is no
    file but an indexed item's is that item. Other image terms are files, left to embed. The
    vector is the one stored (re-embedded from the item when the index keeps none, as IVF-PQ).
    """
    ids: dict[str, int] = {}
    for term in query.terms:
        value = term.value
        if term.kind != "image" or value in ids:
            continue
        if value.isascii() and value.isdigit():
            if int(value) >= len(index):
                raise UsageError(
                    f"image:{value}: the index has items 0 to {len(index) - 1} "
                    f"(for a file named {value}, write image:./{value})"
                )
            ids[value] = int(value)
        elif not Path(value).is_file() and value in index.items:
            ids[value] = index.items.index(value)
    return {value: _item_vector(index, i) for value, i in ids.items()}


def _item_vector(index: Index, item_id: int) -> np.ndarray:
    if index.rerank is not None:  # IVF-PQ keeps the vectors it re-ranks with
        return np.array(index.rerank.vectors[item_id], np.float32)
    try:
        return index.faiss.reconstruct(item_id)
    except RuntimeError:  # IVF-PQ keeps codes without an id map: embed the item again
        item = index.items[item_id]
        if index.modality == "text":
            return index.embedder.embed_texts([item])[0]
        check_images(Query((Term(1.0, "image", item),)))
        return index.embedder.embed_images([item])[0]
