"""``coembed serve``: the HTTP API and web page over one index directory."""

from __future__ import annotations

import argparse

from coembed.cli.common import Command, add_device
from coembed.errors import CoembedError

# What ``pip install coembed[serve]`` adds, by the top-level name each is imported as.
SERVER_PACKAGES = ("fastapi", "starlette", "pydantic", "uvicorn", "multipart", "python_multipart")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``coembed serve``."""
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    p.add_argument(
        "--show-paths",
        action="store_true",
        help="results name the server's absolute file paths (default: relative to the indexed folder)",
    )
    p.add_argument(
        "--classifier",
        default=None,
        help="a linear probe of the index's model (`coembed probe`'s output) for POST /classify",
    )
    add_device(p)


def run_serve(args: argparse.Namespace) -> int:
    """Serve the index until stopped."""
    try:
        import uvicorn  # noqa: F401

        from coembed.serve.app import serve
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in SERVER_PACKAGES:
            raise
        raise CoembedError(
            f"coembed serve needs the server packages ({exc.name} is missing): "
            "pip install coembed[serve]"
        ) from None
    serve(
        args.index,
        host=args.host,
        port=args.port,
        workers=args.workers,
        device=args.device,
        show_paths=args.show_paths,
        classifier=args.classifier,
    )
    return 0


COMMANDS = (
    Command(
        "serve", "HTTP API and web page for searching an index", add_serve_arguments, run_serve
    ),
)
