"""The HTTP API and web page over one index directory: ``create_app`` and ``coembed serve``.

The pieces: the request and response bodies in schemas.py, the SearchService (model, index,
batching, caches) in service.py, the body limit and the error shape in http.py, the routes in
routes.py. This module puts them together and runs them under uvicorn.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from coembed.errors import UsageError
from coembed.serve.http import (
    ERROR_RESPONSES,
    MAX_BODY_BYTES,
    BodyLimit,
    install_error_handlers,
)
from coembed.serve.routes import add_routes
from coembed.serve.service import MAX_PIXELS, SearchService

STATIC = Path(__file__).parent / "static"

# How `coembed serve --workers N` hands its options to the N worker processes.
_ENV_INDEX = "COEMBED_SERVE_INDEX"
_ENV_DEVICE = "COEMBED_SERVE_DEVICE"
_ENV_WORKERS = "COEMBED_SERVE_WORKERS"


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    app.state.service.close()


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

    service = SearchService.load(index_dir, device=device, max_pixels=max_pixels)
    app = FastAPI(
        title="coembed",
        version=__version__,
        summary="Search an image or text index by text, image or compositional query.",
        # The interactive docs pages load their scripts from a CDN; the schema is enough.
        docs_url=None,
        redoc_url=None,
        lifespan=_lifespan,
        responses=ERROR_RESPONSES,
    )
    app.state.service = service
    app.state.page = (STATIC / "index.html").read_text(encoding="utf-8")
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    install_error_handlers(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    add_routes(app)
    return app


def _limit_threads(workers: int) -> None:
    """Share the cores among worker processes, keeping one for the event loops (HTTP, JSON)."""
    from coembed.index.kinds import import_faiss

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
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    device: str = "auto",
) -> None:
    """``coembed serve``: the API and page for ``index_dir`` on ``host:port`` until stopped."""
    import uvicorn

    from coembed.index.store import read_manifest

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
