"""The HTTP routes: thin functions that check a request, call the SearchService, shape the answer.

Endpoints (the OpenAPI schema is at ``/openapi.json``)::

    GET  /                     the search page (static/index.html, style.css, app.js)
    GET  /health               {"status": "ok", "items": N, "modality", "kind", "dim"}
    POST /search               JSON: one of text | query | image (base64) | id, and k (1..1000)
    POST /search/image         multipart: file (an image) and k
    POST /embed                JSON: texts (<= 256) or images (base64, <= 16) -> unit vectors
    GET  /images/{id}          the indexed file with that id (ids come from search results)
    GET  /thumbnails/{id}      a JPEG of at most 256 px a side, for the result grid

``text`` is taken verbatim; ``query`` is parsed as a compositional query (see
coembed.index.query): ``"a red circle" - "red" + "blue"``.

Each route finds the service (and the page) on ``request.app.state``, where ``create_app`` puts
them, so the routes are plain module functions that ``add_routes`` registers on any app or router.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, Response

from coembed.errors import UsageError
from coembed.serve.schemas import (
    DEFAULT_K,
    MAX_K,
    EmbedRequest,
    EmbedResponse,
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


async def search(body: SearchRequest, service: Service) -> Response:
    """The k nearest items to a text, a compositional query, an image or an indexed item."""
    start = time.perf_counter()
    given = [name for name in ("text", "query", "image", "id") if getattr(body, name) is not None]
    if len(given) != 1:
        raise UsageError(
            "give exactly one of text, query, image or id"
            + (f" (got {', '.join(given)})" if given else "")
        )
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


async def image(item_id: int, service: Service) -> FileResponse:
    """The indexed image file with this id (ids are those of search results)."""
    return FileResponse(service.image_path(item_id), headers=FILE_HEADERS)


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
    app.add_api_route("/embed", embed, methods=["POST"], response_model=EmbedResponse)
    app.add_api_route("/images/{item_id}", image, response_class=FileResponse)
    app.add_api_route("/thumbnails/{item_id}", thumbnail, response_class=Response)
