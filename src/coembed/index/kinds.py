"""FAISS index kinds: which structure for how many vectors, how each is built, and its settings.

=================  ==========================  ==============================================
N                  kind                        why
=================  ==========================  ==============================================
N < 50,000         ``flat``  (IndexFlatIP)     exact; a full scan of 50k x 256 floats is ~2 ms
50,000 <= N < 5M   ``hnsw``  (HNSW32, IP)      ~0.3 ms per query at recall@10 ~0.99 for 1M;
                                               efConstruction 40, efSearch 128
N >= 5,000,000     ``ivfpq`` (IVF + PQ, IP)    HNSW keeps every float (5M x 256 = 5 GB plus
                                               links); PQ of D/4 sub-vectors: 4-bit codes
                                               in memory (fast scan) up to 2 GB of codes,
                                               8-bit codes in lists on disk past that.
                                               nlist ~ 4 sqrt(N), nprobe 32, trained on a sample;
                                               from 8,192 lists an HNSW graph finds the lists
=================  ==========================  ==============================================

``ivfflat`` (IVF over the float vectors) is not chosen by size: ``auto`` builds it beside HNSW
when HNSW cannot reach the target recall, or only at an efSearch above 512 (a collection of
well-separated clusters, which HNSW's graph barely links), and keeps whichever reaches it
faster (``coembed.index.tune``). The search setting of every approximate kind is tuned at build
time; the efSearch and nprobe above are what an untuned index uses.

Vectors are unit rows, so inner product is cosine similarity.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from coembed.errors import UsageError
from coembed.progress import progress_bar

KINDS = ("auto", "flat", "hnsw", "ivfflat", "ivfpq")
IVF_KINDS = ("ivfflat", "ivfpq")  # searched with nprobe
# The FAISS class each built kind is (``new_faiss_index``), to check a file read back.
FAISS_CLASSES = {
    "flat": "IndexFlatIP",
    "hnsw": "IndexHNSWFlat",
    "ivfflat": "IndexIVFFlat",
    "ivfpq": "IndexIVFPQ",
}
# An IVF-PQ index in memory is scanned 4 bits at a time (``ivfpq_shape``'s layouts).
FAISS_CLASSES_ALSO = {"ivfpq": ("IndexIVFPQFastScan",)}
FLAT_MAX = 50_000  # below this, exact search
HNSW_MAX = 5_000_000  # below this, HNSW; above, IVF-PQ
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40
HNSW_EF_SEARCH = 128
IVF_NPROBE = 32
# From this many lists, an IVF-PQ index finds a vector's lists through an HNSW graph over the
# centroids instead of scanning them all: measured here with 12,649 centroids of 256-d, an exact
# scan costs 0.21 ms per vector (35 min to add 10M, as much again for k-means on the training
# sample), the graph 0.029 ms at efSearch 16 (98% the same list) and 0.05 ms at 32 (99.8%).
HNSW_QUANTIZER_NLIST = 8192
QUANTIZER_EF_BUILD = 16  # k-means and adds: a vector in a neighbouring list costs little
QUANTIZER_EF_SEARCH = 64  # queries: at least nprobe (HNSW searches max(efSearch, k))
# IVF-PQ keeps its codes in memory while they take at most this, as 4-bit codes that FAISS's
# fast scan compares 32 at a time with SIMD; past it, as 8-bit codes in lists on disk, which a
# query reads code by code (coembed.index.ondisk). Measured at 10M x 256, nlist 12,649, nprobe
# 96, re-ranked: 1.9 ms per query at recall@10 0.954 in memory, 6.5 ms at 0.958 on disk.
IN_MEMORY_CODES_MAX = 2 << 30
ADD_CHUNK = 65_536  # vectors per FAISS add call: big enough for its threads, small for a bar


def import_faiss() -> Any:
    """Import FAISS with its OpenMP threads sleeping, not spinning, while they wait for work.

    By default libgomp's idle threads busy-wait. On a machine with more runnable threads than
    cores (two shared cores, a server next to a model) the spinning threads steal the CPU from
    the ones doing work: measured here, an HNSW build ran 3x slower and single-query p99 went
    from 0.4 ms to 4 ms. FAISS bundles its own libgomp, which reads OMP_WAIT_POLICY once, when
    it is loaded; the variable is set only for that moment so torch's OpenMP keeps its default,
    and a value the user set is left alone.
    """
    if "faiss" in sys.modules:
        return sys.modules["faiss"]
    unset = "OMP_WAIT_POLICY" not in os.environ
    if unset:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        import faiss
    finally:
        if unset:
            del os.environ["OMP_WAIT_POLICY"]
    return faiss


@contextlib.contextmanager
def faiss_quiet() -> Iterator[None]:
    """Silence what FAISS prints on C's stdout while it works with on-disk inverted lists
    ("resizing ...", "updating ondisk filename ..."): it would mix into a command's own output
    (``coembed search --json``). Its buffer is flushed before stdout comes back."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            try:
                yield
            finally:
                ctypes.CDLL(None).fflush(None)
                os.dup2(saved, 1)
    finally:
        os.close(saved)


def check_kind(kind: str) -> None:
    """Raise UsageError unless ``kind`` is one of ``KINDS``."""
    if kind not in KINDS:
        raise UsageError(f"unknown index kind {kind!r} (one of {', '.join(KINDS)})")


def choose_kind(n: int) -> str:
    """The index kind ``auto`` uses for ``n`` vectors (see the module docstring)."""
    if n < FLAT_MAX:
        return "flat"
    return "hnsw" if n < HNSW_MAX else "ivfpq"


def pq_subquantizers(dim: int) -> int:
    """The most PQ sub-vectors of >= 4 dims each that divide ``dim`` (64 bytes for 256-d)."""
    for m in range(max(1, dim // 4), 0, -1):
        if dim % m == 0:
            return m
    return 1


def ivfpq_shape(n: int, dim: int) -> dict[str, int]:
    """nlist, PQ sub-vectors and bits for ``n`` vectors of ``dim`` (see the module docstring)."""
    if n < 64:
        raise UsageError(f"an IVF index needs at least 64 vectors to train on, got {n}")
    # k-means wants ~39+ points per centroid; a codebook of 2^bits centroids likewise.
    nlist = max(1, min(int(4 * np.sqrt(n)), n // 39))
    m = pq_subquantizers(dim)
    in_memory = n * (m // 2 + 8) <= IN_MEMORY_CODES_MAX  # 4-bit codes and 8-byte ids
    bits = 8 if n >= 256 * 39 and not in_memory else 4
    quantizer = "hnsw" if nlist >= HNSW_QUANTIZER_NLIST else "flat"
    layout = "fastscan" if in_memory else "ondisk"
    return {"nlist": nlist, "m": m, "bits": bits, "quantizer": quantizer, "layout": layout}


def training_sample_size(n: int, shape: dict[str, int]) -> int:
    """How many of ``n`` vectors IVF-PQ is trained on: 50 per list, 40 per PQ centroid."""
    return min(n, max(50 * shape["nlist"], 40 * (1 << shape["bits"])))


def trained_ivfpq(faiss: Any, sample: np.ndarray, shape: dict[str, int]) -> Any:
    """An empty IVF-PQ index of ``shape`` trained on ``sample`` (S, D), nprobe set; an HNSW
    quantizer searches at QUANTIZER_EF_BUILD until ``apply_search_params``."""
    dim = sample.shape[1]
    if shape.get("quantizer") == "hnsw":
        quantizer = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        quantizer.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        quantizer.hnsw.efSearch = QUANTIZER_EF_BUILD
    else:
        quantizer = faiss.IndexFlatIP(dim)
    kind = faiss.IndexIVFPQFastScan if shape.get("layout") == "fastscan" else faiss.IndexIVFPQ
    index = kind(
        quantizer, dim, shape["nlist"], shape["m"], shape["bits"], faiss.METRIC_INNER_PRODUCT
    )
    index.train(np.ascontiguousarray(sample, np.float32))
    index.nprobe = min(IVF_NPROBE, shape["nlist"])
    return index


def _training_sample(vectors: np.ndarray, size: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return vectors[np.sort(rng.choice(len(vectors), size, replace=False))]  # (size, D)


def _new_ivfflat(faiss: Any, vectors: np.ndarray) -> tuple[Any, dict[str, Any]]:
    """IVF over the float vectors themselves (no compression), trained on a sample: routed to
    its nearest lists first, a query reaches well-separated clusters that HNSW's graph may not
    link. Ids map back to vectors, so items can be read back as HNSW's can."""
    n, dim = vectors.shape
    nlist = ivfpq_shape(n, dim)["nlist"]
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(np.ascontiguousarray(_training_sample(vectors, min(n, 50 * nlist)), np.float32))
    index.make_direct_map()
    index.nprobe = min(IVF_NPROBE, nlist)
    return index, {"nlist": nlist, "nprobe": index.nprobe}


def _new_ivfpq(faiss: Any, vectors: np.ndarray) -> tuple[Any, dict[str, Any]]:
    """An IVF-PQ index trained on a sample of ``vectors`` (N, D)."""
    n, dim = vectors.shape
    shape = ivfpq_shape(n, dim)
    index = trained_ivfpq(faiss, _training_sample(vectors, training_sample_size(n, shape)), shape)
    return index, {**shape, "nprobe": index.nprobe}


def new_faiss_index(kind: str, vectors: np.ndarray) -> tuple[Any, dict[str, Any]]:
    """An empty (trained, for IVF-PQ) FAISS index of ``kind`` for vectors like ``vectors``
    (N, D), and its parameters as the manifest records them."""
    faiss = import_faiss()
    dim = vectors.shape[1]
    if kind == "flat":
        return faiss.IndexFlatIP(dim), {}
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = HNSW_EF_SEARCH
        params = {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": HNSW_EF_SEARCH}
        return index, params
    if kind == "ivfpq":
        return _new_ivfpq(faiss, vectors)
    if kind == "ivfflat":
        return _new_ivfflat(faiss, vectors)
    raise UsageError(f"unknown index kind {kind!r} (one of {', '.join(KINDS)})")


def apply_search_params(index: Any, kind: str, params: dict[str, Any]) -> None:
    """Search-time settings are not all stored by FAISS itself; restore them after loading."""
    if kind == "hnsw":
        index.hnsw.efSearch = int(params.get("efSearch", HNSW_EF_SEARCH))
    elif kind in IVF_KINDS:
        index.nprobe = int(params.get("nprobe", IVF_NPROBE))
        faiss = import_faiss()
        quantizer = faiss.downcast_index(index.quantizer)
        if isinstance(quantizer, faiss.IndexHNSWFlat):
            quantizer.hnsw.efSearch = QUANTIZER_EF_SEARCH


def add_in_chunks(index: Any, vectors: np.ndarray, progress: bool) -> None:
    """Add (N, D) ``vectors`` to a FAISS index in chunks, with a bar when there are many."""
    enabled = progress and len(vectors) > ADD_CHUNK
    with progress_bar(
        total=len(vectors), unit="vec", desc="indexing", leave=False, enabled=enabled
    ) as bar:
        for start in range(0, len(vectors), ADD_CHUNK):
            index.add(np.ascontiguousarray(vectors[start : start + ADD_CHUNK], np.float32))
            bar.update(min(ADD_CHUNK, len(vectors) - start))
