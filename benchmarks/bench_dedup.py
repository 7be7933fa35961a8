"""Near-duplicate search at 100k vectors: ``coembed.curate.find_duplicates`` vs brute-force numpy.

What is measured, on N clustered unit vectors (default 100,000 x 128) of which 2% have a planted
near-copy (cosine ~0.97):

- brute force: numpy, blocks of 1,024 rows times all N, every pair at or above the threshold
  (exact; the reference for the other two);
- coembed on a flat index (``Index.from_vectors(..., "flat")``): FAISS range search, exact;
- coembed on an HNSW index (what ``auto`` builds at this size): the 16 nearest neighbours of
  every item, pairs at or above the threshold kept, groups joined through shared members.

Each side is timed from the vectors to the pairs (coembed: to its groups, ``exact=False`` as the
items are not files); the index build is timed apart. Pair recall is against brute force. The
data: a mixture of 1,000 overlapping Gaussians in a 24-d latent space mapped linearly into D
dimensions (as bench_search.py), so chance pairs above the threshold exist, as in real
collections.

    .venv/bin/python benchmarks/bench_dedup.py                    # 100k x 128
    .venv/bin/python benchmarks/bench_dedup.py --quick            # 20k, for `make bench`
    .venv/bin/python benchmarks/bench_dedup.py --write-results    # also into RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from machine import machine
from results import write_section

TITLE = "## Near-duplicates (`coembed dedup`) at 100k vectors"


def clustered(n: int, dim: int, seed: int, clusters: int = 1000, latent: int = 24) -> np.ndarray:
    """(n, dim) unit rows: overlapping Gaussians in a ``latent``-d space, mapped into ``dim``."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(clusters, latent)).astype(np.float32)
    z = means[rng.integers(0, clusters, n)] + rng.normal(size=(n, latent)).astype(np.float32)
    x = z @ rng.normal(size=(latent, dim)).astype(np.float32)
    x += rng.normal(size=(n, dim)).astype(np.float32) * 0.5
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def with_planted(base: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, int]:
    """``base`` plus a noisy copy (cosine ~0.97) of its first ``share`` of rows; returns the
    vectors and how many copies were planted."""
    rng = np.random.default_rng(seed + 1)
    n_copies = int(len(base) * share)
    noise = rng.normal(size=(n_copies, base.shape[1])).astype(np.float32)
    copies = base[:n_copies] + noise * (0.25 / np.sqrt(base.shape[1]))
    copies /= np.linalg.norm(copies, axis=1, keepdims=True)
    return np.concatenate([base, copies]), n_copies


def brute_force_pairs(vectors: np.ndarray, threshold: float, block: int = 1024) -> set:
    """Every pair (i < j) with cosine >= ``threshold``: blocks of rows against all of them."""
    pairs = set()
    for start in range(0, len(vectors), block):
        sims = vectors[start : start + block] @ vectors.T  # (b, N)
        rows, cols = np.nonzero(sims >= threshold)
        rows += start
        keep = cols > rows
        pairs.update(zip(rows[keep].tolist(), cols[keep].tolist()))
    return pairs


def grouped_pairs(found, truth: set) -> int:
    """How many pairs of ``truth`` ended up in one group of ``found``."""
    group = {}
    for g, members in enumerate(found.groups):
        for i, _, _ in members:
            group[i] = g
    return sum(1 for i, j in truth if i in group and group.get(j) == group[i])


def run_coembed(vectors: np.ndarray, kind: str, threshold: float, k: int):
    """(build seconds, search seconds, Duplicates) for one index kind."""
    from coembed.curate.dedup import find_duplicates
    from coembed.index import Index

    items = [f"images/{i:07d}.jpg" for i in range(len(vectors))]
    t = time.perf_counter()
    index = Index.from_vectors(vectors, items, kind)
    build = time.perf_counter() - t
    t = time.perf_counter()
    found = find_duplicates(index, threshold=threshold, k=k, exact=False, progress=False)
    return build, time.perf_counter() - t, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="vectors before the planted copies")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--k", type=int, default=16, help="neighbours per item on HNSW")
    parser.add_argument("--threads", type=int, default=2, help="FAISS and BLAS threads")
    parser.add_argument("--quick", action="store_true", help="20k vectors, for `make bench`")
    parser.add_argument("--write-results", action="store_true", help="write RESULTS.md's section")
    args = parser.parse_args()
    if args.quick:
        args.n = 20_000

    import torch

    from coembed.index.kinds import import_faiss

    faiss = import_faiss()
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    base = clustered(int(args.n / 1.02), args.dim, seed=0)
    vectors, planted = with_planted(base, 0.02, seed=0)
    load = os.getloadavg()[0]
    print(
        f"dedup benchmark: {len(vectors):,} x {args.dim} unit vectors ({planted:,} planted copies)"
    )
    print(f"machine: {machine()}, load average {load:.1f}; faiss {faiss.__version__}")

    t = time.perf_counter()
    truth = brute_force_pairs(vectors, args.threshold)
    brute_s = time.perf_counter() - t
    planted_pairs = {(i, len(base) + i) for i in range(planted)}
    rows = [("brute force (numpy)", "-", brute_s, len(truth), 1.0)]
    for kind in ("flat", "hnsw"):
        build, search, found = run_coembed(vectors, kind, args.threshold, args.k)
        recall = grouped_pairs(found, truth) / max(1, len(truth))
        name = f"coembed, {kind} ({found.search})"
        rows.append((name, f"{build:.1f}", search, found.near_pairs, recall))
        if kind == "hnsw":
            planted_found = grouped_pairs(found, planted_pairs) / planted
            hnsw_total = build + search
    table = [
        f"| {'threshold ' + str(args.threshold):<28} | build (s) | search (s) | vs brute force | pairs found | pair recall |",
        f"|{'-' * 30}|----------:|-----------:|---------------:|------------:|------------:|",
    ]
    for name, build, search, pairs, recall in rows:
        table.append(
            f"| {name:<28} | {build:>9} | {search:>10.1f} | {brute_s / search:>13.1f}x "
            f"| {pairs:>11,} | {recall:>11.4f} |"
        )
    summary = (
        f"{len(truth):,} pairs at or above {args.threshold} by brute force "
        f"({len(planted_pairs & truth):,} of the {planted:,} planted); HNSW grouped "
        f"{planted_found:.1%} of the planted pairs, and with its build took "
        f"{hnsw_total:.1f} s ({brute_s / hnsw_total:.1f}x faster than brute force)"
    )
    print("\n".join(table))
    print(summary)
    if args.write_results:
        command = "benchmarks/bench_dedup.py" + (" --quick" if args.quick else "")
        text = "\n".join(
            [
                TITLE,
                "",
                "`coembed.curate.find_duplicates` (what `coembed dedup` runs) from an index's vectors",
                "to its groups, against brute-force numpy (blocks of 1,024 rows times all N, every",
                "pair at or above the threshold). Pair recall: the brute-force pairs that ended up in",
                "one group. Index builds are timed apart.",
                "",
                f"- Command: `.venv/bin/python {command}`",
                f"- Date: {time.strftime('%a %b %d %H:%M UTC %Y', time.gmtime())}",
                f"- Machine: {machine()}, load average {load:.1f} at the start (cores shared "
                f"with other jobs; run at nice 10), faiss-cpu {faiss.__version__}, "
                f"{args.threads} threads",
                f"- Data: {len(vectors):,} x {args.dim} clustered unit vectors, {planted:,} of them "
                "planted noisy copies (cosine ~0.97)",
                "",
                *table,
                "",
                summary + ".",
                "",
            ]
        )
        write_section(TITLE, text)


if __name__ == "__main__":
    main()
