"""Embedding indexes: unit vectors in FAISS with their items and the model that made them.

``kinds`` (which FAISS structure, its parameters), ``store`` (the directory on disk, model
identity), ``inputs`` (what to index, embedded), ``index`` (the Index), ``query`` (compositional
queries and their arithmetic), ``api`` (``build_index`` and ``search_index``, as the command
line runs them).
"""

from coembed.index.api import IndexReport, SearchResult, build_index, search_index
from coembed.index.index import Index

__all__ = ["Index", "IndexReport", "SearchResult", "build_index", "search_index"]
