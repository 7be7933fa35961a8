"""The HTTP API and web page over one index directory: ``create_app`` and ``coembed serve``.

The pieces: the request and response bodies in schemas.py, the SearchService (model, index,
batching, caches) in service.py, the body limit and the error shape in http.py, the routes in
routes.py. This module puts them together and runs them under uvicorn.
"""

from __future__ import annotations

import errno
import functools
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from coembed.errors import CoembedError, UsageError
from coembed.serve.http import (
    ERROR_RESPONSES,
    MAX_BODY_BYTES,
    BodyLimit,
    ConnectionLimits,
    GuardedH11Protocol,
    HeadWithoutBody,
    install_error_handlers,
)
from coembed.serve.routes import add_routes
from coembed.serve.service import MAX_PIXELS, SearchService

STATIC = Path(__file__).parent / "static"

# How `coembed serve --workers N` hands its options to the N worker processes.
_ENV_INDEX = "COEMBED_SERVE_INDEX"
_ENV_DEVICE = "COEMBED_SERVE_DEVICE"
_ENV_WORKERS = "COEMBED_SERVE_WORKERS"
_ENV_SHOW_PATHS = "COEMBED_SERVE_SHOW_PATHS"
_ENV_CLASSIFIER = "COEMBED_SERVE_CLASSIFIER"


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
    limits: ConnectionLimits = ConnectionLimits(),
    show_paths: bool = False,
    classifier: str | os.PathLike | None = None,
) -> FastAPI:
    """The FastAPI app serving ``index_dir``; loads the index and its model now.

    ``classifier``, a linear probe of the index's model (``coembed probe``), answers
    ``POST /classify``.

    Results name image files relative to the indexed folder; ``show_paths`` shows the server's
    absolute paths instead. Raises ``IndexError_`` (a CoembedError) if the directory is not a
    loadable index.
    """
    from coembed import __version__

    service = SearchService.load(
        index_dir, device=device, max_pixels=max_pixels, show_paths=show_paths
    )
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
    app.state.classifier = None
    if classifier is not None:
        from coembed.curate.probe import probe_for_index

        app.state.classifier = probe_for_index(classifier, service.index)
    app.state.page = (STATIC / "index.html").read_text(encoding="utf-8")
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, limits=limits)
    app.add_middleware(HeadWithoutBody)
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
    return create_app(
        os.environ[_ENV_INDEX],
        device=os.environ.get(_ENV_DEVICE, "cpu"),
        show_paths=os.environ.get(_ENV_SHOW_PATHS) == "1",
        classifier=os.environ.get(_ENV_CLASSIFIER) or None,
    )


def check_can_listen(host: str, port: int) -> None:
    """CoembedError unless a server could listen on ``host:port`` now, tried as uvicorn binds
    (every address the host resolves to, SO_REUSEADDR): a port in use is one clear line rather
    than a banner followed by uvicorn's error."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CoembedError(f"--host {host}: cannot listen there ({exc.strerror})") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise CoembedError(_bind_error(host, port, exc)) from None


def _bind_error(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is in use (another server?); choose another --port"
    if exc.errno == errno.EACCES:
        return f"not allowed to listen on {host}:{port} (a port below 1024?); choose another --port"
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}"


def _run_uvicorn(app: Any, options: dict[str, Any]) -> None:
    import uvicorn

    try:
        uvicorn.run(app, **options)
    except SystemExit as exc:
        # uvicorn exits (code 3) when it cannot start, having logged why: say it once more as
        # our one error line (exit code 1) rather than leave a bare exit code.
        if exc.code:
            raise CoembedError(
                f"the server could not start on {options['host']}:{options['port']} "
                "(uvicorn's message above says why)"
            ) from None


def serve(
    index_dir: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    device: str = "auto",
    limits: ConnectionLimits = ConnectionLimits(),
    show_paths: bool = False,
    classifier: str | os.PathLike | None = None,
) -> None:
    """``coembed serve``: the API and page for ``index_dir`` on ``host:port`` until stopped.

    ``limits`` bound slow clients and connections (see coembed.serve.http); with several
    workers each process holds its own ``max_connections``, and bodies get the default timeouts.
    """
    from coembed.index.store import read_manifest

    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be 0..65535, got {port}")
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "access_log": False,
        # uvicorn's HTTP/1.1 with the slow-client limits; a partial pickles for the workers.
        "http": functools.partial(GuardedH11Protocol, limits=limits),
        "backlog": limits.backlog,
    }
    if workers == 1:
        _limit_threads(1)
        # Errors show before the port opens.
        app: Any = create_app(
            index_dir, device=device, limits=limits, show_paths=show_paths, classifier=classifier
        )
        items = len(app.state.service.index)
    else:
        # Each worker process builds its own app from an import string; check the index here so
        # a bad path is one clear error rather than N crashing workers.
        items = read_manifest(Path(index_dir))["count"]
        os.environ[_ENV_INDEX] = str(Path(index_dir).resolve())
        os.environ[_ENV_DEVICE] = device
        os.environ[_ENV_WORKERS] = str(workers)
        os.environ[_ENV_SHOW_PATHS] = "1" if show_paths else "0"
        if classifier is not None:
            from coembed.curate.probe import LinearProbe

            LinearProbe.load(classifier)  # a bad path: one clear error, not N crashing workers
        os.environ[_ENV_CLASSIFIER] = str(Path(classifier).resolve()) if classifier else ""
        app = "coembed.serve.app:app_from_environment"
        options.update(factory=True, workers=workers)
    check_can_listen(host, port)
    shown = f"[{host}]" if ":" in host else host
    print(
        f"coembed: serving {items:,} items from {index_dir} at http://{shown}:{port}/", flush=True
    )
    _run_uvicorn(app, options)
