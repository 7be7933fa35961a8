"""coembed: CLIP-style image-text embeddings you can train, fine-tune, index and search."""

from __future__ import annotations

from coembed.errors import CoembedError

__version__ = "0.1.0"

__all__ = ["CoembedError", "Embedder", "Index", "__version__", "load"]


def __getattr__(name: str):
    # Lazy so that `import coembed` (and `coembed --help`) does not pay for torch and faiss.
    if name in ("load", "Embedder"):
        from coembed import embedder

        return getattr(embedder, name)
    if name == "Index":
        from coembed.index import Index

        return Index
    raise AttributeError(name)
