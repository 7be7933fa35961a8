"""coembed: CLIP-style image-text embeddings you can train, fine-tune, index and search."""

from __future__ import annotations

from importlib import import_module
from typing import Any

from coembed.errors import CoembedError

__version__ = "0.1.0"

__all__ = [
    "CoembedError",
    "Embedder",
    "Index",
    "__version__",
    "evaluate_retrieval",
    "load",
    "train",
    "zeroshot",
]

# The public API and the module each name lives in. Loaded on first use so that `import coembed`
# (and `coembed --help`) does not pay for torch and faiss.
_LAZY = {
    "load": "coembed.embedder",
    "Embedder": "coembed.embedder",
    "Index": "coembed.index",
    "train": "coembed.training",
    "evaluate_retrieval": "coembed.evaluate",
    "zeroshot": "coembed.evaluate",
}


def __getattr__(name: str) -> Any:
    """The lazily loaded public names (``coembed.train``, ``coembed.Index``, ...)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'coembed' has no attribute {name!r}")
    return getattr(import_module(_LAZY[name]), name)


def __dir__() -> list[str]:
    """The module's names, the lazy ones included."""
    return sorted({*globals(), *_LAZY})
