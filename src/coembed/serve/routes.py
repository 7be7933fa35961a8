"""The HTTP routes: thin functions that check a request, call the SearchService, shape the answer.

Endpoints (the OpenAPI schema is at ``/openapi.json``)::

    GET  /                     the search page (static/index.html, style.css, app.js)
    GET  /health               {"status": "ok", "items": N, "modality", "kind", "dim"}
    POST /search               JSON: one of text | query | image (base64) | id, and k (1..1000)
    POST /search/image         multipart: file (an image) and k
    POST /filter               JSON: one of text | query | image | id, and min_score and/or k:
                               every item scoring >= min_score (at most k, at most 1000)
    POST /classify             JSON: image (base64) or id, and k -> the k likeliest classes of
                               the linear probe the server was started with (--classifier)
    POST /embed                JSON: texts (<= 256) or images (base64, <= 16) -> unit vectors
    GET  /images/{id}          the indexed file with that id (ids come from search results)
    GET  /thumbnails/{id}      a JPEG of at most 256 px a side, for the result grid
    HEAD /images/{id}, /thumbnails/{id}: their headers only

``text`` is taken verbatim; ``query`` is parsed as a compositional query (see
coembed.index.query): ``"a red circle" - "red" + "blue"``.

Each route finds the service (and the page) on ``request.app.state``, where ``create_app`` puts
them, so the routes are plain module functions that ``add_routes`` registers on any app or router.
"""

from __future__ import annotations

import json
import mimetypes
import time
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, Response
from starlette.concurrency import run_in_threadpool

from coembed.errors import UsageError
from coembed.serve.http import OpenedFileResponse
from coembed.serve.schemas import (
    DEFAULT_K,
    MAX_K,
    ClassifyRequest,
    ClassifyResponse,
    EmbedRequest,
    EmbedResponse,
    FilterRequest,
    FilterResponse,
    Health,
    SearchRequest,
    SearchResponse,
    decode_base64,
)
from coembed.serve.service import SearchService, check_text

# Ids map to files that change only with a new index generation, which the URLs carry (?v=).
FILE_HEADERS = {"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"}


async def _service(request: Request) -> SearchService:
    # async: a plain function dependency would cost every request a trip through a thread pool.
    return request.app.state.service


Service = Annotated[SearchService, Depends(_service)]


def _json(payload: Any) -> Response:
    # Rows are plain dicts of str/int/float: dumping them directly skips FastAPI's validation
    # of the response model (the schemas still document it in the OpenAPI schema).
    return Response(json.dumps(payload, ensure_ascii=False), media_type="application/json")


def _search_answer(shown: str, k: int, start: float, results: list[dict[str, Any]]) -> Response:
    took = (time.perf_counter() - start) * 1000
    return _json({"query": shown, "k": k, "took_ms": round(took, 2), "results": results})


async def index_page(request: Request) -> HTMLResponse:
    """The search page."""
    return HTMLResponse(request.app.state.page)


async def health(service: Service) -> Response:
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


def check_one_input(body: SearchRequest) -> None:
    """A request names exactly one of a text, a query, an image or an indexed item."""
    given = [name for name in ("text", "query", "image", "id") if getattr(body, name) is not None]
    if len(given) != 1:
        raise UsageError(
            "give exactly one of text, query, image or id"
            + (f" (got {', '.join(given)})" if given else "")
        )


async def search(body: SearchRequest, service: Service) -> Response:
    """The k nearest items to a text, a compositional query, an image or an indexed item."""
    start = time.perf_counter()
    check_one_input(body)
    if body.text is not None:
        check_text(body.text)
        results, shown = await service.search_text(body.text.strip(), body.k), body.text
    elif body.query is not None:
        results, shown = await service.search_query(body.query, body.k), body.query
    elif body.image is not None:
        vector = (await service.embed_images([decode_base64(body.image, "image")]))[0]
        results, shown = await service.search(vector, body.k), "<image>"
    else:
        vector = await service.item_vector(body.id)
        results, shown = await service.search(vector, body.k), f"image:{body.id}"
    return _search_answer(shown, body.k, start, results)


async def _query_vector(body: SearchRequest, service: SearchService) -> tuple[Any, str]:
    """The (D,) unit vector of a request's one text, query, image or id, and how to show it."""
    check_one_input(body)
    if body.text is not None:
        check_text(body.text)
        return await service.embed_text(body.text.strip()), body.text
    if body.query is not None:
        return await service.query_vector(body.query), body.query
    if body.image is not None:
        return (await service.embed_images([decode_base64(body.image, "image")]))[0], "<image>"
    return await service.item_vector(body.id), f"image:{body.id}"


async def filter_items(body: FilterRequest, service: Service) -> Response:
    """Every item scoring at least min_score (at most k, at most MAX_K), best first."""
    from coembed.curate.filter import ids_above

    start = time.perf_counter()
    if body.min_score is None and body.k is None:
        raise UsageError("give min_score (a cosine similarity, -1..1), k, or both")
    vector, shown = await _query_vector(body, service)
    limit = body.k or MAX_K
    # One more than is returned, to tell a full answer from a cut one.
    ids, scores = await run_in_threadpool(
        ids_above, service.index, vector.reshape(1, -1), body.min_score, limit + 1
    )
    took = (time.perf_counter() - start) * 1000
    payload = {"query": shown, "min_score": body.min_score, "k": body.k, "count": len(ids[:limit])}
    payload.update(truncated=len(ids) > limit, took_ms=round(took, 2))
    return _json({**payload, "results": service.rows(ids[:limit], scores[:limit])})


async def classify(body: ClassifyRequest, request: Request, service: Service) -> Response:
    """The k likeliest classes of an image or indexed item under the server's linear probe."""
    start = time.perf_counter()
    probe = request.app.state.classifier
    if probe is None:
        raise HTTPException(404, "this server has no classifier: start it with --classifier")
    if (body.image is None) == (body.id is None):
        raise UsageError("give exactly one of image or id")
    if body.image is not None:
        vector = (await service.embed_images([decode_base64(body.image, "image")]))[0]
    else:
        vector = await service.item_vector(body.id)
    probabilities = probe.probabilities(vector.reshape(1, -1))[0]  # (C,)
    order = np.argsort(-probabilities, kind="stable")[: body.k]
    classes = [
        {"rank": rank, "label": probe.classnames[c], "probability": float(probabilities[c])}
        for rank, c in enumerate(order.tolist(), start=1)
    ]
    took = (time.perf_counter() - start) * 1000
    return _json({"took_ms": round(took, 2), "classes": classes})


async def search_image(
    service: Service,
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
    return _search_answer(f"<image {file.filename or 'upload'}>", k, start, results)


async def embed(body: EmbedRequest, service: Service) -> Response:
    """Unit vectors for texts or base64 images, in the index's embedding space."""
    if (body.texts is None) == (body.images is None):
        raise UsageError("give exactly one of texts or images")
    if body.texts is not None:
        vectors = await service.embed_texts(body.texts)
    else:
        images = [decode_base64(data, f"images[{i}]") for i, data in enumerate(body.images)]
        vectors = await service.embed_images(images)
    return _json({"dim": int(vectors.shape[1]), "vectors": vectors.tolist()})


async def image(item_id: int, service: Service) -> OpenedFileResponse:
    """The indexed image file with this id (ids are those of search results)."""
    file = await run_in_threadpool(service.open_item, item_id)
    kind = mimetypes.guess_type(service.index.items[item_id])[0] or "application/octet-stream"
    return OpenedFileResponse(file, kind, headers=FILE_HEADERS)


async def thumbnail(item_id: int, service: Service) -> Response:
    """A small JPEG of the indexed image with this id."""
    jpeg = await service.thumbnail(item_id)
    return Response(jpeg, media_type="image/jpeg", headers=FILE_HEADERS)


def add_routes(app: FastAPI | APIRouter) -> None:
    """Register every route on ``app``; the serving app's state holds ``service`` and ``page``."""
    app.add_api_route("/", index_page, response_class=HTMLResponse, include_in_schema=False)
    app.add_api_route("/health", health, response_model=Health)
    app.add_api_route("/search", search, methods=["POST"], response_model=SearchResponse)
    app.add_api_route(
        "/search/image", search_image, methods=["POST"], response_model=SearchResponse
    )
    app.add_api_route("/filter", filter_items, methods=["POST"], response_model=FilterResponse)
    app.add_api_route("/classify", classify, methods=["POST"], response_model=ClassifyResponse)
    app.add_api_route("/embed", embed, methods=["POST"], response_model=EmbedResponse)
    app.add_api_route("/images/{item_id}", image, response_class=FileResponse)
    app.add_api_route("/thumbnails/{item_id}", thumbnail, response_class=Response)
    # HEAD (the headers a GET would give, no body), kept out of the schema's operations.
    for path, route in (("/images/{item_id}", image), ("/thumbnails/{item_id}", thumbnail)):
        app.add_api_route(path, route, methods=["HEAD"], include_in_schema=False)
