"""HTTP API and web page over one index directory: ``create_app`` and ``coembed serve``.

Endpoints (the OpenAPI schema is at ``/openapi.json``)::

    GET  /                     the search page (static/index.html, style.css, app.js)
    GET  /health               {"status": "ok", "items": N, "modality", "kind", "dim"}
    POST /search               JSON: one of text | query | image (base64) | id, and k (1..1000)
    POST /search/image         multipart: file (an image) and k
    POST /embed                JSON: texts (<= 256) or images (base64, <= 16) -> unit vectors
    GET  /images/{id}          the indexed file with that id (ids come from search results)
    GET  /thumbnails/{id}      a JPEG of at most 256 px a side, for the result grid

``text`` is taken verbatim; ``query`` is parsed as a compositional query (see coembed.query):
``"a red circle" - "red" + "blue"``. Over HTTP an image term names an indexed item, by id
(``image:17``) or by its indexed path, never an arbitrary file on the server.

Every client mistake (bad JSON, a missing or extra field, k out of range, an empty query, a body
over the limit, a non-image or corrupt upload, too many pixels) is a 4xx with one JSON object
``{"error": "..."}``; only a bug in the server is a 500.

How requests share the machine: the model and index are loaded once, when the app is created.
All model work runs on one dedicated thread, so concurrent requests never fight over the CPU
cores torch uses, and the tokenizer's cache is only touched from one thread. Concurrent text
queries are micro-batched: while one batch is in the model, new texts queue and go together in
the next forward pass. Image decoding (up to ``max_pixels``) runs on a small separate pool, so a
big upload never holds up text queries, and FAISS searches on another.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coembed.errors import CoembedError, ImageError, UsageError

log = logging.getLogger("coembed.serve")

STATIC = Path(__file__).parent / "static"
MAX_K = 1000
DEFAULT_K = 10
MAX_BODY_BYTES = 16 * 1024 * 1024  # a 12 MB image in base64, or a multipart upload of 16 MB
MAX_PIXELS = 25_000_000  # decoding 25 MP costs ~75 MB and ~0.3 s; more is a client's mistake
MAX_TEXT_CHARS = 2_000  # the model reads ~77 tokens at most; longer only costs cleaning time
MAX_EMBED_TEXTS = 256
MAX_EMBED_IMAGES = 16
MAX_TEXT_BATCH = 64  # texts per forward pass when queries pile up
QUERY_CACHE_SIZE = 4096  # text -> vector, for repeated queries (popular searches, paging)
THUMBNAIL_SIZE = 256
THUMBNAIL_CACHE_SIZE = 1024  # ~10 KB each
DECODE_THREADS = 2  # concurrent image decodes: bounds the memory big images can take

T = TypeVar("T")


# --- request and response bodies (they are the OpenAPI schema) -----------------------------------


class SearchRequest(BaseModel):
    """Exactly one of ``text``, ``query``, ``image`` or ``id``, and ``k``."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, max_length=MAX_TEXT_CHARS, description="a text, verbatim")
    query: str | None = Field(
        None,
        max_length=MAX_TEXT_CHARS,
        description='a compositional query, e.g. "a red circle" - "red" + "blue" or image:17 - "cat"',
    )
    image: str | None = Field(None, description="an image file, base64 (a data: URL is fine)")
    id: int | None = Field(None, ge=0, description="an indexed item: more like this one")
    k: int = Field(DEFAULT_K, ge=1, le=MAX_K, description="how many results")


class SearchResult(BaseModel):
    rank: int
    id: int
    score: float
    item: str
    name: str
    url: str | None = None
    thumbnail: str | None = None
    captions: list[str] | None = None


class SearchResponse(BaseModel):
    query: str
    k: int
    took_ms: float
    results: list[SearchResult]


class EmbedRequest(BaseModel):
    """Exactly one of ``texts`` or ``images`` (base64)."""

    model_config = ConfigDict(extra="forbid")

    texts: list[str] | None = Field(None, min_length=1, max_length=MAX_EMBED_TEXTS)
    images: list[str] | None = Field(None, min_length=1, max_length=MAX_EMBED_IMAGES)


class EmbedResponse(BaseModel):
    dim: int
    vectors: list[list[float]]


class Health(BaseModel):
    status: str
    items: int
    modality: str
    kind: str
    dim: int


class ErrorBody(BaseModel):
    error: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in (
        (400, "a bad request: invalid JSON, an empty query, an undecodable image"),
        (413, "the body or the image is over the limit"),
        (422, "a field is missing, of the wrong type or out of range"),
    )
}


# --- the work: model, index, batching ------------------------------------------------------------


TextJob = tuple[str, int]  # (text, k): k = 0 wants the vector only
TextAnswer = tuple[np.ndarray, list[int], list[float]]  # (vector (D,), ids, scores)


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

    async def _run_one(self, loop, job: TextJob, future: asyncio.Future) -> None:
        try:
            (answer,) = await loop.run_in_executor(self._executor, self._run, [job])
        except Exception as e:  # noqa: BLE001 - handed to the one request that sent it
            if not future.done():
                future.set_exception(e)
        else:
            if not future.done():
                future.set_result(answer)


class SearchService:
    """The index, its model and the threads that run them; the HTTP layer calls this."""

    def __init__(
        self, index_dir: str | os.PathLike, device: str = "cpu", max_pixels: int = MAX_PIXELS
    ):
        from coembed.index import Index, read_manifest

        root = Path(index_dir)
        self.index = Index.load(root, device=device)
        self.embedder = self.index.embedder  # load the model now, not on the first request
        self.embedder.model.eval()
        self.max_pixels = max_pixels
        # The index generation names the files; it goes into image URLs so browsers may cache
        # them for long and still never show a stale image after the index is rebuilt.
        self.version = Path(read_manifest(root)["files"]["faiss"]).stem.split("-")[-1]
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="coembed-model")
        self._decode_pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="coembed-decode")
        self._search_pool = ThreadPoolExecutor(2, thread_name_prefix="coembed-search")
        self._texts = TextBatcher(self._answer_texts, self._model_thread)
        self._query_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._thumbnails: OrderedDict[int, bytes] = OrderedDict()
        self._item_ids: dict[str, int] | None = None

    def close(self) -> None:
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
        vectors = self._embed_texts(texts)
        row = {text: i for i, text in enumerate(texts)}
        searching = [i for i, (_, k) in enumerate(jobs) if k > 0]
        hits: dict[int, tuple[list[int], list[float]]] = {}
        if searching:
            queries = vectors[[row[jobs[i][0]] for i in searching]]  # (S, D)
            scores, ids = self.index.faiss.search(queries, max(jobs[i][1] for i in searching))
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
        cached = self._cached(text)
        return cached if cached is not None else (await self._answer_text(text, 0))[0]

    async def search_text(self, text: str, k: int) -> list[dict[str, Any]]:
        """The k best results for a plain text, embedded and searched in the next batch."""
        cached = self._cached(text)
        if cached is not None:
            return await self.search(cached, k)
        _, ids, scores = await self._answer_text(text, k)
        return self.rows(ids, scores)

    def _cached(self, text: str) -> np.ndarray | None:
        vector = self._query_cache.get(text)
        if vector is not None:
            self._query_cache.move_to_end(text)
        return vector

    async def _answer_text(self, text: str, k: int) -> TextAnswer:
        answer = await self._texts.submit(text, k)
        # A copy: the row is a view that would keep its whole batch alive in the cache.
        self._query_cache[text] = answer[0].copy()
        if len(self._query_cache) > QUERY_CACHE_SIZE:
            self._query_cache.popitem(last=False)
        return answer

    async def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) unit rows for a list of texts (one model call, not through the batcher)."""
        for text in texts:
            _check_text(text)
        return await self._run(self._model_thread, self._embed_texts, list(texts))

    async def embed_images(self, images: Sequence[bytes]) -> np.ndarray:
        """(N, D) unit rows for encoded image files."""
        pixels = [await self._run(self._decode_pool, self._decode, data) for data in images]
        return await self._run(self._model_thread, self.embedder.embed_pixels, torch.stack(pixels))

    async def item_vector(self, item_id: int) -> np.ndarray:
        """The (D,) stored vector of an indexed item (re-embedded if FAISS keeps none)."""
        self._check_id(item_id)
        try:
            return self.index.faiss.reconstruct(item_id)
        except RuntimeError:
            # IVF-PQ keeps codes without an id map; the indexed file itself is the way back.
            if self.index.modality == "text":
                return await self.embed_text(self.index.items[item_id])
            data = await self._run(self._decode_pool, Path(self.index.items[item_id]).read_bytes)
            return (await self.embed_images([data]))[0]

    # -- queries --

    async def search_query(self, text: str, k: int) -> list[dict[str, Any]]:
        """The k best results for a query string: plain text or compositional."""
        from coembed.query import parse_query

        query = parse_query(text)
        if query.is_plain_text:
            return await self.search_text(query.terms[0].value, k)
        return await self.search(await self.query_vector(text), k)

    async def query_vector(self, text: str) -> np.ndarray:
        """The (D,) unit vector of a compositional query (see coembed.query)."""
        from coembed.query import parse_query

        query = parse_query(text)
        if query.is_plain_text:
            return await self.embed_text(query.terms[0].value)
        # Image terms name indexed items: an HTTP client must never make us open its paths.
        parts = []
        for term in query.terms:
            if term.kind == "text":
                parts.append(self.embed_text(term.value))
            else:
                parts.append(self.item_vector(self._resolve_item(term.value)))
        vectors = await asyncio.gather(*parts)
        # The same arithmetic as coembed.query.embed_query: unit terms, weighted, renormalized.
        total = np.zeros(self.index.dim, np.float64)
        for term, vector in zip(query.terms, vectors):
            vector = np.asarray(vector, np.float64)
            total += term.weight * vector / max(np.linalg.norm(vector), 1e-12)
        norm = np.linalg.norm(total)
        if norm < 1e-6:
            raise UsageError(f"query {text!r}: the terms cancel out (the sum is zero)")
        return (total / norm).astype(np.float32)

    def _resolve_item(self, value: str) -> int:
        if value.isascii() and value.isdigit() and int(value) < len(self.index):
            return int(value)
        if self._item_ids is None:
            self._item_ids = {item: i for i, item in enumerate(self.index.items)}
        if value in self._item_ids:
            return self._item_ids[value]
        raise UsageError(
            f"image:{value}: not an indexed item; over HTTP an image term names an indexed "
            "image by its id (as in image:17, the id of a search result) or its indexed path"
        )

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
        items, captions = self.index.items, self.index.captions
        images = self.index.modality == "image"
        rows = []
        for rank, (i, score) in enumerate(zip(ids, scores), start=1):
            item = items[i]
            row: dict[str, Any] = {
                "rank": rank,
                "id": i,
                "score": round(float(score), 6),
                "item": item,
                "name": os.path.basename(item) if images else item,
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

    def _make_thumbnail(self, path: Path) -> bytes:
        from coembed.data.images import open_image

        # min_size lets a JPEG decode at a reduced scale: far less work than the full photo.
        image = open_image(path, min_size=THUMBNAIL_SIZE)
        image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        out = io.BytesIO()
        image.save(out, "JPEG", quality=85)
        return out.getvalue()

    async def thumbnail(self, item_id: int) -> bytes:
        """A JPEG of at most THUMBNAIL_SIZE px a side of an indexed image (cached)."""
        path = self.image_path(item_id)
        cached = self._thumbnails.get(item_id)
        if cached is None:
            try:
                cached = await self._run(self._decode_pool, self._make_thumbnail, path)
            except ImageError:
                raise HTTPException(404, f"item {item_id}: its file no longer decodes") from None
            self._thumbnails[item_id] = cached
            if len(self._thumbnails) > THUMBNAIL_CACHE_SIZE:
                self._thumbnails.popitem(last=False)
        return cached


def _check_text(text: str) -> None:
    if not text.strip():
        raise UsageError("empty query: give some text")
    if len(text) > MAX_TEXT_CHARS:
        raise UsageError(
            f"a text of {len(text):,} characters is over the limit of {MAX_TEXT_CHARS:,}"
        )


def decode_base64(data: str, field: str) -> bytes:
    """Bytes of a base64 string or a ``data:...;base64,`` URL; UsageError if it is neither."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(
            f"{field}: not valid base64; send the image file's bytes base64-encoded"
        ) from None
    if not raw:
        raise UsageError(f"{field}: empty image")
    return raw


# --- HTTP plumbing: limits and errors ------------------------------------------------------------


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with a 413, declared or streamed (chunked).

    A declared Content-Length over the limit is refused before reading anything; a streamed
    body is counted as the endpoint reads it. (Plain ASGI, so it works with every FastAPI.)
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await _send_error(send, 400, "Content-Length is not a number")
                return
            if int(declared) > self.max_bytes:
                await _send_error(send, 413, self._message(int(declared)))
                return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, self._message(seen, at_least=True))
            return message

        await self.app(scope, counted, send)

    def _message(self, size: int, at_least: bool = False) -> str:
        return (
            f"request body of {'over ' if at_least else ''}{size:,} bytes is over the limit of "
            f"{self.max_bytes:,}; send a smaller image"
        )


async def _send_error(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    errors = exc.errors()
    for error in errors:
        if error.get("type") == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", "")
            return 400, f"the request body is not valid JSON ({reason})"
    parts = []
    for error in errors[:5]:
        loc = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {error.get('msg', 'invalid')}")
    return 422, "; ".join(parts)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(*_validation_message(exc))

    @app.exception_handler(CoembedError)
    async def user_error(request: Request, exc: CoembedError) -> JSONResponse:
        too_large = getattr(exc, "reason", None) == "too large"
        return _error(413 if too_large else 400, str(exc))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("error serving %s %s", request.method, request.url.path)
        return _error(500, "internal server error (a bug: the server log has the details)")


# --- the app -------------------------------------------------------------------------------------


def _json(payload: Any) -> Response:
    # Rows are plain dicts of str/int/float: dumping them directly skips FastAPI's validation
    # of the response model (the models above still document it in the OpenAPI schema).
    return Response(json.dumps(payload, ensure_ascii=False), media_type="application/json")


def create_app(
    index_dir: str | os.PathLike,
    device: str = "cpu",
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_pixels: int = MAX_PIXELS,
) -> FastAPI:
    """The FastAPI app serving ``index_dir``; loads the index and its model now.

    Raises ``IndexError_`` (a CoembedError) if the directory is not a loadable index.
    """
    from coembed import __version__

    service = SearchService(index_dir, device=device, max_pixels=max_pixels)
    page = (STATIC / "index.html").read_text(encoding="utf-8")

    async def lifespan(app: FastAPI):
        yield
        service.close()

    app = FastAPI(
        title="coembed",
        version=__version__,
        summary="Search an image or text index by text, image or compositional query.",
        # The interactive docs pages load their scripts from a CDN; the schema is enough.
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
        responses=ERRORS,
    )
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    _install_error_handlers(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index_page() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health", response_model=Health)
    async def health() -> Response:
        """Whether the server is up, and what it serves."""
        index = service.index
        return _json(
            {
                "status": "ok",
                "items": len(index),
                "modality": index.modality,
                "kind": index.kind,
                "dim": index.dim,
            }
        )

    @app.post("/search", response_model=SearchResponse)
    async def search(body: SearchRequest) -> Response:
        """The k nearest items to a text, a compositional query, an image or an indexed item."""
        start = time.perf_counter()
        given = [
            name for name in ("text", "query", "image", "id") if getattr(body, name) is not None
        ]
        if len(given) != 1:
            raise UsageError(
                "give exactly one of text, query, image or id"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if body.text is not None:
            _check_text(body.text)
            results = await service.search_text(body.text.strip(), body.k)
            shown = body.text
        elif body.query is not None:
            results, shown = await service.search_query(body.query, body.k), body.query
        elif body.image is not None:
            vector = (await service.embed_images([decode_base64(body.image, "image")]))[0]
            results, shown = await service.search(vector, body.k), "<image>"
        else:
            vector = await service.item_vector(body.id)
            results, shown = await service.search(vector, body.k), f"image:{body.id}"
        took = (time.perf_counter() - start) * 1000
        return _json({"query": shown, "k": body.k, "took_ms": round(took, 2), "results": results})

    @app.post("/search/image", response_model=SearchResponse)
    async def search_image(
        file: UploadFile = File(..., description="an image file"),
        k: int = Form(DEFAULT_K, ge=1, le=MAX_K),
    ) -> Response:
        """The k nearest items to an uploaded image (multipart/form-data)."""
        start = time.perf_counter()
        data = await file.read()
        if not data:
            raise UsageError("file: empty upload")
        vector = (await service.embed_images([data]))[0]
        results = await service.search(vector, k)
        took = (time.perf_counter() - start) * 1000
        shown = f"<image {file.filename or 'upload'}>"
        return _json({"query": shown, "k": k, "took_ms": round(took, 2), "results": results})

    @app.post("/embed", response_model=EmbedResponse)
    async def embed(body: EmbedRequest) -> Response:
        """Unit vectors for texts or base64 images, in the index's embedding space."""
        if (body.texts is None) == (body.images is None):
            raise UsageError("give exactly one of texts or images")
        if body.texts is not None:
            vectors = await service.embed_texts(body.texts)
        else:
            images = [decode_base64(data, f"images[{i}]") for i, data in enumerate(body.images)]
            vectors = await service.embed_images(images)
        return _json({"dim": int(vectors.shape[1]), "vectors": vectors.tolist()})

    cache = {"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"}

    @app.get("/images/{item_id}", response_class=FileResponse)
    async def image(item_id: int) -> FileResponse:
        """The indexed image file with this id (ids are those of search results)."""
        return FileResponse(service.image_path(item_id), headers=cache)

    @app.get("/thumbnails/{item_id}", response_class=Response)
    async def thumbnail(item_id: int) -> Response:
        """A small JPEG of the indexed image with this id."""
        return Response(await service.thumbnail(item_id), media_type="image/jpeg", headers=cache)

    return app


# --- coembed serve -------------------------------------------------------------------------------

_ENV_INDEX = "COEMBED_SERVE_INDEX"
_ENV_DEVICE = "COEMBED_SERVE_DEVICE"
_ENV_WORKERS = "COEMBED_SERVE_WORKERS"


def _limit_threads(workers: int) -> None:
    """Share the cores among worker processes, keeping one for the event loops (HTTP, JSON)."""
    from coembed.index import import_faiss

    faiss = import_faiss()  # with its idle OpenMP threads sleeping (see there)
    per_worker = max(1, (os.cpu_count() or 1) // max(1, workers) - 1)
    torch.set_num_threads(per_worker)
    faiss.omp_set_num_threads(per_worker)


def app_from_environment() -> FastAPI:
    """The app factory each uvicorn worker process calls when ``--workers`` > 1."""
    _limit_threads(int(os.environ.get(_ENV_WORKERS, "1")))
    return create_app(os.environ[_ENV_INDEX], device=os.environ.get(_ENV_DEVICE, "cpu"))


def serve(
    index_dir: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    device: str = "cpu",
) -> None:
    """``coembed serve``: the API and page for ``index_dir`` on ``host:port`` until stopped."""
    import uvicorn

    from coembed.index import read_manifest

    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be 0..65535, got {port}")
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    options: dict[str, Any] = {"host": host, "port": port, "access_log": False}
    if workers == 1:
        _limit_threads(1)
        app: Any = create_app(index_dir, device=device)  # errors show before the port opens
        items = len(app.state.service.index)
    else:
        # Each worker process builds its own app from an import string; check the index here so
        # a bad path is one clear error rather than N crashing workers.
        items = read_manifest(Path(index_dir))["count"]
        os.environ[_ENV_INDEX] = str(Path(index_dir).resolve())
        os.environ[_ENV_DEVICE] = device
        os.environ[_ENV_WORKERS] = str(workers)
        app = "coembed.serve.app:app_from_environment"
        options.update(factory=True, workers=workers)
    shown = f"[{host}]" if ":" in host else host
    print(
        f"coembed: serving {items:,} items from {index_dir} at http://{shown}:{port}/", flush=True
    )
    uvicorn.run(app, **options)
