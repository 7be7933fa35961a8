"""Embedding indexes: unit vectors in FAISS with their items and the model that made them.

``kinds`` (which FAISS structure, its parameters), ``tune`` (search settings tuned to a target
recall), ``rerank`` (IVF-PQ's candidates re-scored), ``store`` (the directory on disk, model
identity), ``inputs`` (what to index, embedded), ``index`` (the Index), ``query`` (compositional
queries and their arithmetic), ``api`` (``build_index`` and ``search_index``, as the command
line runs them); for collections embedded across processes, ``shards`` (the embedding parts on
disk), ``sharded`` (the torchrun run and the build from parts) and ``ondisk`` (IVF-PQ with its
lists merged on disk).
"""

from coembed.index.api import IndexReport, SearchResult, build_index, search_index
from coembed.index.index import Index

__all__ = ["Index", "IndexReport", "SearchResult", "build_index", "search_index"]
