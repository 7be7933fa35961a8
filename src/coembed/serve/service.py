"""The search service over one loaded Index: the model thread, the text batcher, the caches.

How requests share the machine: the model and index are loaded once, when the service is made.
All model work runs on one dedicated thread, so concurrent requests never fight over the CPU
cores torch uses, and the tokenizer's cache is only touched from one thread. Concurrent text
queries are micro-batched: while one batch is in the model, new texts queue and go together in
the next forward pass. Image decoding (up to ``max_pixels``) runs on a small separate pool, so a
big upload never holds up text queries, and FAISS searches on another.

Over HTTP an image term of a compositional query names an indexed item, by id (``image:17``) or
by its name in results, never an arbitrary file on the server.

Results name an image by its path relative to the indexed folder (the common parent of the
items' folders), so a client learns nothing of the server's file system; the operator may opt
in to absolute paths (``show_paths``, ``coembed serve --show-paths``).

Which files are served: an item's file is sent (or read, for a thumbnail or a re-embedding) only
if its real path (every symlink resolved) still lies inside the index's roots, the folders the
indexed files really were in when they were read (``Index.roots``; an index saved before it
recorded them: its items' folders as recorded). The file is then opened from ``/`` one path
component at a time without following any symlink, so a folder or file swapped for a symlink
between the check and the open fails the open, and it must be a regular file (no FIFO, device or
folder). Anything else is a 404 in the error shape, and nothing is read.
"""

from __future__ import annotations

import asyncio
import io
import os
import stat
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, Generic, TypeVar

import numpy as np
import torch
from fastapi import HTTPException

from coembed.errors import ImageError, UsageError
from coembed.index import Index
from coembed.index.query import combine_terms, parse_query
from coembed.serve.schemas import MAX_TEXT_CHARS

MAX_PIXELS = 25_000_000  # decoding 25 MP costs ~75 MB and ~0.3 s; more is a client's mistake
MAX_TEXT_BATCH = 64  # texts per forward pass when queries pile up
QUERY_CACHE_SIZE = 4096  # text -> vector, for repeated queries (popular searches, paging)
THUMBNAIL_SIZE = 256
THUMBNAIL_CACHE_SIZE = 1024  # ~10 KB each
DECODE_THREADS = 2  # concurrent image decodes: bounds the memory big images can take
SEARCH_THREADS = 2

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

TextJob = tuple[str, int]  # (text, k): k = 0 wants the vector only
TextAnswer = tuple[np.ndarray, list[int], list[float]]  # (vector (D,), ids, scores)


def check_text(text: str) -> None:
    """Raise UsageError for a text the model should not be given: blank or over the limit."""
    if not text.strip():
        raise UsageError("empty query: give some text")
    if len(text) > MAX_TEXT_CHARS:
        raise UsageError(
            f"a text of {len(text):,} characters is over the limit of {MAX_TEXT_CHARS:,}"
        )


class LruCache(Generic[K, V]):
    """At most ``size`` entries; a hit makes an entry the newest, the oldest goes first."""

    def __init__(self, size: int):
        self._size = size
        self._entries: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        """The value stored for ``key``, or None."""
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        """Store ``value``, dropping the least recently used entry when full."""
        self._entries[key] = value
        self._entries.move_to_end(key)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)


class TextBatcher:
    """Collects text queries from concurrent requests and answers them in as few forward passes
    (and FAISS calls) as it can.

    The first job starts a drain task; jobs that arrive while a batch is on the model thread wait
    for the next batch. A batch that fails is retried one job at a time, so one bad text fails
    only its own request.
    """

    def __init__(
        self,
        run: Callable[[list[TextJob]], list[TextAnswer]],
        executor: ThreadPoolExecutor,
        max_batch: int = MAX_TEXT_BATCH,
    ):
        self._run = run
        self._executor = executor
        self._max_batch = max_batch
        self._pending: list[tuple[TextJob, asyncio.Future]] = []
        self._draining = False

    async def submit(self, text: str, k: int) -> TextAnswer:
        """The text's (D,) unit vector and, when k > 0, the ids and scores of its k nearest."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append(((text, k), future))
        if not self._draining:
            self._draining = True
            loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: len(batch)]
                try:
                    answers = await loop.run_in_executor(
                        self._executor, self._run, [job for job, _ in batch]
                    )
                except Exception:  # noqa: BLE001 - isolate the failing job, see the class doc
                    for job, future in batch:
                        await self._run_one(loop, job, future)
                else:
                    for (_, future), answer in zip(batch, answers):
                        if not future.done():
                            future.set_result(answer)
        finally:
            self._draining = False

    async def _run_one(
        self, loop: asyncio.AbstractEventLoop, job: TextJob, future: asyncio.Future
    ) -> None:
        try:
            (answer,) = await loop.run_in_executor(self._executor, self._run, [job])
        except Exception as e:  # noqa: BLE001 - handed to the one request that sent it
            if not future.done():
                future.set_exception(e)
        else:
            if not future.done():
                future.set_result(answer)


class SearchService:
    """An Index, its model and the threads that run them; the HTTP routes call this."""

    def __init__(
        self, index: Index, version: str, max_pixels: int = MAX_PIXELS, show_paths: bool = False
    ):
        self.index = index
        self.show_paths = show_paths
        self._name_root = name_root(index)
        self.embedder = index.embedder  # load the model now, not on the first request
        self.embedder.model.eval()
        self.max_pixels = max_pixels
        self.version = version
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="coembed-model")
        self._decode_pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="coembed-decode")
        self._search_pool = ThreadPoolExecutor(SEARCH_THREADS, thread_name_prefix="coembed-search")
        self._texts = TextBatcher(self._answer_texts, self._model_thread)
        self._query_cache: LruCache[str, np.ndarray] = LruCache(QUERY_CACHE_SIZE)
        self._thumbnails: LruCache[int, bytes] = LruCache(THUMBNAIL_CACHE_SIZE)
        self._item_ids: dict[str, int] | None = None
        self._roots: frozenset[str] | None = None  # see served_roots

    @classmethod
    def load(
        cls,
        index_dir: str | os.PathLike,
        device: str = "cpu",
        max_pixels: int = MAX_PIXELS,
        show_paths: bool = False,
    ) -> SearchService:
        """The service over the index saved in ``index_dir``, its model loaded on ``device``."""
        from coembed.index.store import read_manifest

        root = Path(index_dir)
        index = Index.load(root, device=device)
        # The index generation names the files; it goes into image URLs so browsers may cache
        # them for long and still never show a stale image after the index is rebuilt.
        version = Path(read_manifest(root)["files"]["faiss"]).stem.split("-")[-1]
        return cls(index, version, max_pixels=max_pixels, show_paths=show_paths)

    def close(self) -> None:
        """Stop the service's threads; queued work is dropped."""
        for pool in (self._model_thread, self._decode_pool, self._search_pool):
            pool.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    async def _run(pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    # -- embedding (on the model thread) --

    @torch.inference_mode()
    def _embed_texts(self, texts: list[str]) -> np.ndarray:
        """(N, D) unit rows, as ``Embedder.embed_texts`` gives them (the text tower itself skips
        the padding after the batch's last end token, so a short query costs its length)."""
        embedder = self.embedder
        tokens = embedder.tokenizer(texts)
        features = embedder.model.encode_text(tokens.to(embedder.device))
        return features.float().cpu().numpy()

    def _answer_texts(self, jobs: list[TextJob]) -> list[TextAnswer]:
        """Embed a batch of texts and search for those that ask, in one trip to this thread."""
        texts = list(dict.fromkeys(text for text, _ in jobs))  # a repeated text embeds once
        vectors = self._embed_texts(texts)  # (T, D)
        row = {text: i for i, text in enumerate(texts)}
        searching = [i for i, (_, k) in enumerate(jobs) if k > 0]
        hits: dict[int, tuple[list[int], list[float]]] = {}
        if searching:
            queries = vectors[[row[jobs[i][0]] for i in searching]]  # (S, D)
            scores, ids = self.index.searcher.search(queries, max(jobs[i][1] for i in searching))
            for j, i in enumerate(searching):
                k = jobs[i][1]
                found = ids[j, :k]
                n = int((found >= 0).sum())  # FAISS pads with -1 when fewer than k exist
                hits[i] = found[:n].tolist(), scores[j, :n].tolist()
        return [(vectors[row[text]], *hits.get(i, ([], []))) for i, (text, _) in enumerate(jobs)]

    def _decode(self, data: bytes) -> torch.Tensor:
        """Encoded image bytes -> (3, S, S) model input; ImageError if they are no image."""
        from coembed.data.images import open_image

        return self.embedder.transform(open_image(data, max_pixels=self.max_pixels))

    async def embed_text(self, text: str) -> np.ndarray:
        """The (D,) unit vector of one text, from the cache or the next batch."""
        cached = self._query_cache.get(text)
        return cached if cached is not None else (await self._answer_text(text, 0))[0]

    async def search_text(self, text: str, k: int) -> list[dict[str, Any]]:
        """The k best results for a plain text, embedded and searched in the next batch."""
        cached = self._query_cache.get(text)
        if cached is not None:
            return await self.search(cached, k)
        _, ids, scores = await self._answer_text(text, k)
        return self.rows(ids, scores)

    async def _answer_text(self, text: str, k: int) -> TextAnswer:
        answer = await self._texts.submit(text, k)
        # A copy: the row is a view that would keep its whole batch alive in the cache.
        self._query_cache.put(text, answer[0].copy())
        return answer

    async def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) unit rows for a list of texts (one model call, not through the batcher)."""
        for text in texts:
            check_text(text)
        return await self._run(self._model_thread, self._embed_texts, list(texts))

    async def embed_images(self, images: Sequence[bytes]) -> np.ndarray:
        """(N, D) unit rows for encoded image files."""
        pixels = [await self._run(self._decode_pool, self._decode, data) for data in images]
        return await self._run(self._model_thread, self.embedder.embed_pixels, torch.stack(pixels))

    async def item_vector(self, item_id: int) -> np.ndarray:
        """The (D,) stored vector of an indexed item (re-embedded if FAISS keeps none)."""
        self._check_id(item_id)
        if self.index.rerank is not None:  # IVF-PQ keeps the vectors it re-ranks with
            return np.array(self.index.rerank.vectors[item_id], np.float32)
        try:
            return self.index.faiss.reconstruct(item_id)
        except RuntimeError:
            # IVF-PQ keeps codes without an id map; the indexed file itself is the way back.
            if self.index.modality == "text":
                return await self.embed_text(self.index.items[item_id])
            data = await self._run(self._decode_pool, self._read_item, item_id)
            return (await self.embed_images([data]))[0]

    # -- queries --

    async def search_query(self, text: str, k: int) -> list[dict[str, Any]]:
        """The k best results for a query string: plain text or compositional."""
        query = parse_query(text)
        if query.is_plain_text:
            return await self.search_text(query.terms[0].value, k)
        return await self.search(await self.query_vector(text), k)

    async def query_vector(self, text: str) -> np.ndarray:
        """The (D,) unit vector of a compositional query (see coembed.index.query)."""
        query = parse_query(text)
        if query.is_plain_text:
            return await self.embed_text(query.terms[0].value)
        # Image terms name indexed items: an HTTP client must never make us open its paths.
        vectors = await asyncio.gather(
            *(
                self.embed_text(term.value)
                if term.kind == "text"
                else self.item_vector(self._resolve_item(term.value))
                for term in query.terms
            )
        )
        return combine_terms(query, vectors)

    def _resolve_item(self, value: str) -> int:
        if value.isascii() and value.isdigit() and int(value) < len(self.index):
            return int(value)
        if self._item_ids is None:
            # By the names results show: a client cannot probe for the server's own paths.
            self._item_ids = {self.shown_item(i): i for i in range(len(self.index.items))}
            self._item_ids.update({self.item_name(i): i for i in range(len(self.index.items))})
        if value in self._item_ids:
            return self._item_ids[value]
        raise UsageError(
            f"image:{value}: not an indexed item; over HTTP an image term names an indexed "
            "image by its id (as in image:17, the id of a search result) or its name in results"
        )

    def item_name(self, item_id: int) -> str:
        """How results name an item: a text itself, an image by its path relative to the
        indexed folder (its file name when it lies elsewhere)."""
        item = self.index.items[item_id]
        if self.index.modality != "image":
            return item
        if self._name_root is not None and item.startswith(self._name_root):
            return item[len(self._name_root) :]
        return os.path.basename(item)

    def shown_item(self, item_id: int) -> str:
        """A result's ``item``: its name, or with ``show_paths`` the indexed path itself."""
        return self.index.items[item_id] if self.show_paths else self.item_name(item_id)

    def _check_id(self, item_id: int) -> None:
        if not 0 <= item_id < len(self.index):
            raise HTTPException(404, f"no item {item_id}: ids run from 0 to {len(self.index) - 1}")

    async def search(self, vector: np.ndarray, k: int) -> list[dict[str, Any]]:
        """The k best results for a unit vector, as JSON-ready rows, best first."""
        ids, scores = await self._run(
            self._search_pool, self.index.search_ids, vector.reshape(1, -1), k
        )
        return self.rows(ids, scores)

    def rows(self, ids: Sequence[int], scores: Sequence[float]) -> list[dict[str, Any]]:
        """One JSON-ready row per hit (the ``SearchResult`` schema), in the order given."""
        captions = self.index.captions
        images = self.index.modality == "image"
        rows = []
        for rank, (i, score) in enumerate(zip(ids, scores), start=1):
            row: dict[str, Any] = {
                "rank": rank,
                "id": i,
                "score": round(float(score), 6),
                "item": self.shown_item(i),
                "name": self.item_name(i),
            }
            if images:
                row["url"] = f"/images/{i}?v={self.version}"
                row["thumbnail"] = f"/thumbnails/{i}?v={self.version}"
            if captions[i]:
                row["captions"] = captions[i]
            rows.append(row)
        return rows

    # -- files --

    def image_path(self, item_id: int) -> Path:
        """The indexed file of an item: ids map to the index's own metadata, never to user paths."""
        self._check_id(item_id)
        if self.index.modality != "image":
            raise HTTPException(404, "this index holds texts, not images")
        path = Path(self.index.items[item_id])
        if not path.is_file():
            raise HTTPException(404, f"item {item_id}: its file is no longer on this server")
        return path

    def served_roots(self) -> frozenset[str]:
        """The folders whose files may be served: the index's roots (see the module docstring)."""
        if self._roots is None:
            from coembed.index.inputs import image_roots

            roots = self.index.roots
            if roots is None:
                roots = image_roots(self.index.items, resolve=False)
            self._roots = frozenset(roots)
        return self._roots

    def open_item(self, item_id: int) -> BinaryIO:
        """The indexed file of an item, opened for reading, if it may be served (see the module
        docstring); HTTPException 404 if not."""
        real = os.path.realpath(self.image_path(item_id))
        roots = self.served_roots()
        if not any(str(folder) in roots for folder in Path(real).parents):
            raise HTTPException(
                404, f"item {item_id}: its file now leads outside the indexed folders; not served"
            )
        try:
            file = os.fdopen(open_without_symlinks(real), "rb")
        except OSError:
            raise HTTPException(404, f"item {item_id}: its file changed as it was opened") from None
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            file.close()
            raise HTTPException(404, f"item {item_id}: its file is no longer a regular file")
        return file

    def _read_item(self, item_id: int) -> bytes:
        """The bytes of an item's file (see ``open_item``), at most MAX_IMAGE_BYTES of them."""
        from coembed.data.images import MAX_IMAGE_BYTES

        with self.open_item(item_id) as file:
            data = file.read(MAX_IMAGE_BYTES + 1)
        if len(data) > MAX_IMAGE_BYTES:
            raise HTTPException(404, f"item {item_id}: its file is now over {MAX_IMAGE_BYTES:,} B")
        return data

    def _make_thumbnail(self, item_id: int) -> bytes:
        from coembed.data.images import open_image

        # min_size lets a JPEG decode at a reduced scale: far less work than the full photo.
        image = open_image(self._read_item(item_id), min_size=THUMBNAIL_SIZE)
        image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        out = io.BytesIO()
        image.save(out, "JPEG", quality=85)
        return out.getvalue()

    async def thumbnail(self, item_id: int) -> bytes:
        """A JPEG of at most THUMBNAIL_SIZE px a side of an indexed image (cached)."""
        self.open_item(item_id).close()  # a cached thumbnail too is only for a servable file
        cached = self._thumbnails.get(item_id)
        if cached is None:
            try:
                cached = await self._run(self._decode_pool, self._make_thumbnail, item_id)
            except ImageError:
                raise HTTPException(404, f"item {item_id}: its file no longer decodes") from None
            self._thumbnails.put(item_id, cached)
        return cached


def name_root(index: Index) -> str | None:
    """The prefix (ending in a separator) that results leave out of image paths: the common
    parent of the items' folders, as the items spell them. None for a text index."""
    if index.modality != "image" or not index.items:
        return None
    try:
        root = os.path.commonpath({os.path.dirname(item) for item in index.items})
    except ValueError:  # relative and absolute paths mixed: no common parent
        return None
    return root if root.endswith(os.sep) else root + os.sep


def open_without_symlinks(real: str) -> int:
    """A read-only descriptor of the file at the absolute path ``real``, opened from ``/`` one
    component at a time, following no symlink: OSError if any component is one (or is gone)."""
    if os.open not in os.supports_dir_fd:  # no openat (Windows): the realpath check must do
        return os.open(real, os.O_RDONLY)
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    *folders, name = Path(real).parts
    fd = os.open(folders[0], os.O_RDONLY | os.O_DIRECTORY)
    try:
        for folder in folders[1:]:
            inner = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | nofollow, dir_fd=fd)
            os.close(fd)
            fd = inner
        # Non-blocking: a FIFO swapped in cannot hold the open (fstat then refuses it).
        return os.open(name, os.O_RDONLY | nofollow | os.O_NONBLOCK, dir_fd=fd)
    finally:
        os.close(fd)
