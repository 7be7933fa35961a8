"""Scale: an index built through the sharded path from N x D vectors that are never all in memory.

What it does, each phase in a process of its own (so that each one's peak RSS is its own):

1. ``generate``: N unit vectors (default 10M x 256) drawn in parts of ``--part`` rows from the
   mixture of ``bench_search.py`` (1,000 overlapping Gaussians in a 24-d latent space mapped into
   D dimensions), written as the embedding parts a ``torchrun ... -m coembed index`` run writes
   (``coembed.index.shards``), with a plan naming a random model of embedding size D; plus
   ``--queries`` held-out draws of the same mixture and their exact top-10 (a scan of every
   part, block by block).
2. ``build``: ``coembed.index.sharded.merge_parts(kind="ivfpq")``, what rank 0 runs after the
   ranks have embedded: IVF-PQ trained on a sample of the parts, filled part by part (4-bit
   codes in memory while they fit in 2 GB, as at 10M x 256; past that, 8-bit codes whose lists
   are merged into one ``.ivfdata`` file on disk), the re-ranking vectors streamed to one file,
   nprobe tuned to ``--target-recall`` on a held-out sample of the collection's own vectors.
3. ``faiss-build``: raw FAISS with the same parameters (nlist, PQ m and bits, the same training
   sample size), trained and filled in memory from the same parts, for the build time.
4. ``query``: ``Index.load`` and every query once, alone, for the peak RSS while searching
   (the 8-bit codes memory-mapped, the float32 rows read one by one); then single queries one at
   a time: p50/p99 latency, recall@10 against the exact top-10; beside it raw FAISS on the same
   index file and nprobe without re-ranking, alternating query by query.

    .venv/bin/python benchmarks/bench_scale.py                     # 10M x 256: hours on 2 cores
    .venv/bin/python benchmarks/bench_scale.py --n 1000000         # ~10 min
    .venv/bin/python benchmarks/bench_scale.py --n 200000 --quick  # a minute, for a smoke test

Disk: N x D x 4 bytes for the parts, as much again for the re-ranking vectors, and N x (D/4 + 8)
for the PQ codes and ids (10M x 256: ~21 GB). ``--work`` chooses where (default a temporary
folder, removed at the end unless ``--keep``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from machine import machine
from results import write_section

SECTION = "## Scale: a sharded IVF-PQ index"
TARGET_P50_MS = 2.0
TARGET_RECALL = 0.95
TARGET_QUERY_RSS_GB = 4.0
LATENT = 24
CLUSTERS = 1000


def peak_rss_mb() -> float:
    """Peak resident memory, the pages of memory-mapped files it read or wrote included."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class AnonymousPeak:
    """The peak of the process's own (anonymous) resident memory, sampled every 50 ms: what it
    holds, without the pages of the files it maps, which the kernel can drop at will."""

    def __init__(self) -> None:
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.peak_kb = max(self.peak_kb, int(line.split()[1]))

    def mb(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_kb / 1024


def memory_now() -> dict:
    """This process's resident memory now, MB: its own (anonymous) and mapped file pages."""
    fields = {"RssAnon": "anon_mb", "RssFile": "file_mb"}
    found = {}
    with open("/proc/self/status") as status:
        for line in status:
            key = line.split(":")[0]
            if key in fields:
                found[fields[key]] = int(line.split()[1]) / 1024
    return found


def mixture_part(n: int, dim: int, seed: int, part_seed: int) -> np.ndarray:
    """(n, dim) unit rows of the mixture fixed by ``seed``; ``part_seed`` draws this part."""
    shared = np.random.default_rng(seed)
    means = shared.normal(size=(CLUSTERS, LATENT)).astype(np.float32)
    mapping = shared.normal(size=(LATENT, dim)).astype(np.float32)
    rng = np.random.default_rng([seed, part_seed])
    z = means[rng.integers(0, CLUSTERS, n)] + rng.normal(size=(n, LATENT)).astype(np.float32)
    out = z @ mapping
    out += 0.05 * np.sqrt(LATENT) * rng.normal(size=(n, dim)).astype(np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def random_model(folder: Path, dim: int) -> Path:
    """A random tiny model whose embeddings have ``dim`` values: the parts' plan names it."""
    import torch

    from coembed.checkpoint import save_model_dir
    from coembed.config import load_config
    from coembed.model import CoEmbed
    from coembed.tokenizer import Tokenizer

    cfg = load_config("tiny", [f"model.embed_dim={dim}", "model.tokenizer=clip",
                               "model.text.vocab_size=49408", "model.text.eot_id=49407"])  # fmt: skip
    torch.manual_seed(0)
    return save_model_dir(CoEmbed(cfg.model), Tokenizer.clip(context_length=32), folder)


def generate(args: argparse.Namespace) -> dict:
    import coembed.index.shards as shards
    from coembed.index.store import model_dir_identity
    from coembed.index.tune import K, exact_neighbours
    from coembed.progress import progress_bar

    work = Path(args.work)
    model = random_model(work / "model", args.dim)
    index_dir = work / "index"
    count = -(-args.n // args.part)
    plan = shards.Plan("text", names=[], part_size=args.part)
    record = shards.plan_record(plan, model_dir_identity(model))
    record["parts"], record["digest"] = count, f"bench-scale-{args.n}-{args.dim}"
    (index_dir / "parts").mkdir(parents=True, exist_ok=True)
    (index_dir / "parts" / "plan.json").write_text(json.dumps(record))
    queries = mixture_part(args.queries, args.dim, 0, part_seed=10**9)
    started = time.perf_counter()
    blocks = []
    with progress_bar(total=count, unit="part", desc="generating parts") as bar:
        for number in range(count):
            n = min(args.part, args.n - number * args.part)
            vectors = mixture_part(n, args.dim, 0, part_seed=number)
            names = [f"v{number * args.part + i:09d}" for i in range(n)]
            meta = {"items": names, "captions": [[] for _ in names], "skipped": [], "roots": []}
            shards.write_part(index_dir, number, vectors, meta)
            bar.update(1)
    generate_s = time.perf_counter() - started

    def part_blocks():
        for number in range(count):
            vectors, _ = shards.read_part(index_dir, number, mmap=True)
            start = number * args.part
            yield np.asarray(vectors), np.arange(start, start + len(vectors), dtype=np.int64)

    started = time.perf_counter()
    exact = exact_neighbours(queries, np.full(len(queries), -1), part_blocks())
    np.save(work / "queries.npy", queries)
    np.save(work / "exact.npy", exact)
    del blocks
    return {"generate_s": generate_s, "exact_s": time.perf_counter() - started,
            "k": K, "model": str(model), "peak_rss_mb": peak_rss_mb()}  # fmt: skip


def build(args: argparse.Namespace) -> dict:
    from coembed.embedder import load
    from coembed.index.sharded import merge_parts

    work = Path(args.work)
    embedder = load(work / "model", device="cpu")
    started = time.perf_counter()
    index = merge_parts(work / "index", embedder, kind="ivfpq", target_recall=args.target_recall)
    seconds = time.perf_counter() - started
    files = json.loads((work / "index" / "index.json").read_text())["files"]
    sizes = {k: (work / "index" / v).stat().st_size for k, v in files.items()}
    return {"build_s": seconds, "params": index.params, "tuning": {k: v for k, v in
            index.tuning.items() if k != "trials"}, "trials": index.tuning["trials"],
            "sizes": sizes, "peak_rss_mb": peak_rss_mb()}  # fmt: skip


def faiss_build(args: argparse.Namespace) -> dict:
    """Raw FAISS, the same parameters, in memory: train on a same-size sample, add every part."""
    import coembed.index.shards as shards
    from coembed.index.kinds import (
        HNSW_EF_CONSTRUCTION,
        HNSW_M,
        QUANTIZER_EF_BUILD,
        import_faiss,
        ivfpq_shape,
        training_sample_size,
    )

    faiss = import_faiss()
    work = Path(args.work)
    count = -(-args.n // args.part)
    shape = ivfpq_shape(args.n, args.dim)
    started = time.perf_counter()
    rng = np.random.default_rng(1)
    wanted = np.sort(rng.choice(args.n, training_sample_size(args.n, shape), replace=False))
    sample = []
    for number in range(count):
        vectors, _ = shards.read_part(work / "index", number, mmap=True)
        lo, hi = number * args.part, number * args.part + len(vectors)
        rows = wanted[(wanted >= lo) & (wanted < hi)] - lo
        sample.append(np.asarray(vectors[rows]))
    # Built by hand rather than by index_factory("IVF..._HNSW32,PQ..."): the factory's index
    # runs k-means with an exhaustive scan of the centroids and only then fills the graph
    # (quantizer_trains_alone 2), measured here still training after 17 min. Like coembed's,
    # this one assigns through the graph during k-means too.
    if shape["quantizer"] == "hnsw":
        quantizer = faiss.IndexHNSWFlat(args.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        quantizer.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        quantizer.hnsw.efSearch = QUANTIZER_EF_BUILD
    else:
        quantizer = faiss.IndexFlatIP(args.dim)
    # The same layout as coembed's: 4-bit codes for the fast scan in memory, or 8-bit codes.
    kind = faiss.IndexIVFPQFastScan if shape["layout"] == "fastscan" else faiss.IndexIVFPQ
    spec = f"{kind.__name__}: IVF{shape['nlist']}_{type(quantizer).__name__},PQ{shape['m']}x{shape['bits']}"
    index = kind(quantizer, args.dim, shape["nlist"], shape["m"], shape["bits"],
                 faiss.METRIC_INNER_PRODUCT)  # fmt: skip
    index.train(np.concatenate(sample))
    del sample
    for number in range(count):
        vectors, _ = shards.read_part(work / "index", number, mmap=True)
        index.add(np.ascontiguousarray(vectors))
    return {"build_s": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb(), "spec": spec}


def query(args: argparse.Namespace) -> dict:
    from coembed.index import Index
    from coembed.index.kinds import faiss_quiet, import_faiss

    faiss = import_faiss()
    # single queries: by default one thread each, as a server worker under load runs them;
    # --query-threads 2 lets FAISS split one query's lists over both cores of an idle machine
    faiss.omp_set_num_threads(args.query_threads)
    work = Path(args.work)
    queries = np.load(work / "queries.npy")
    exact = np.load(work / "exact.npy")
    rss_before = peak_rss_mb()
    started = time.perf_counter()
    index = Index.load(work / "index")
    load_s = time.perf_counter() - started
    for q in queries:  # alone first: the memory a process searching this index comes to hold
        index.search_ids(q, 10)
    alone = {"peak_rss_mb": peak_rss_mb(), **memory_now()}
    files = json.loads((work / "index" / "index.json").read_text())["files"]
    with faiss_quiet():
        raw = faiss.read_index(str(work / "index" / files["faiss"]), faiss.IO_FLAG_ONDISK_SAME_DIR)
    raw.nprobe = index.faiss.nprobe
    for q in queries[:100]:  # warm up: page in the quantizer and some lists
        index.search_ids(q, 10)
        raw.search(q[None], 10)
    ours, theirs, ours_found, raw_found = [], [], [], []
    clock = time.perf_counter
    for j, q in enumerate(queries):
        sides = [
            ("ours", lambda q=q: index.search_ids(q, 10)[0]),
            ("raw", lambda q=q: raw.search(q[None], 10)[1][0]),
        ]
        for name, run in sides if j % 2 else sides[::-1]:
            t0 = clock()
            found = run()
            (ours if name == "ours" else theirs).append(clock() - t0)
            (ours_found if name == "ours" else raw_found).append(list(found))

    def recall(found):
        return float(np.mean([len(set(f) & set(e.tolist())) / 10 for f, e in zip(found, exact)]))

    ms = lambda xs, p: float(np.percentile(np.asarray(xs) * 1e3, p))  # noqa: E731
    return {"load_s": load_s, "rss_before_load_mb": rss_before, "alone": alone,
            "peak_rss_mb": peak_rss_mb(),
            "ours": {"p50_ms": ms(ours, 50), "p99_ms": ms(ours, 99), "recall": recall(ours_found)},
            "raw": {"p50_ms": ms(theirs, 50), "p99_ms": ms(theirs, 99), "recall": recall(raw_found)},
            "nprobe": int(raw.nprobe)}  # fmt: skip


PHASES = {"generate": generate, "build": build, "faiss-build": faiss_build, "query": query}


def run_phase(phase: str, args: argparse.Namespace) -> dict:
    """Run one phase in a process of its own; its result is kept in the work folder, so that
    a run given the same ``--work`` and ``--resume`` goes on from the first phase not done."""
    done_file = Path(args.work) / f"{phase}.json"
    if args.resume and done_file.is_file():
        print(f"== {phase}: done before ({done_file})", flush=True)
        return json.loads(done_file.read_text())
    cmd = [sys.executable, __file__, "--phase", phase, "--work", args.work, "--n", str(args.n),
           "--dim", str(args.dim), "--part", str(args.part), "--queries", str(args.queries),
           "--target-recall", str(args.target_recall), "--layout", args.layout,
           "--query-threads", str(args.query_threads)]  # fmt: skip
    print(f"== {phase}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - started
    done_file.write_text(json.dumps(result))
    print(f"   {json.dumps({k: v for k, v in result.items() if k != 'trials'})}", flush=True)
    return result


def anon(result: dict) -> str:
    """A phase's peak anonymous memory in GB ("-" for a result kept from before it was taken)."""
    return f"{result['peak_anon_mb'] / 1024:.2f}" if "peak_anon_mb" in result else "-"


def query_rss_gb(q: dict) -> float:
    return q["alone"]["peak_rss_mb"] / 1024


def report(args: argparse.Namespace, r: dict, minutes: float) -> list[str]:
    b, f, q = r["build"], r["faiss-build"], r["query"]
    gib = 1 << 30
    size = sum(b["sizes"].values())
    lines = [
        f"| {args.n:,} x {args.dim} | coembed (sharded path) | raw FAISS | ratio |",
        "|---|--:|--:|--:|",
        f"| build s | {b['build_s']:.0f} | {f['build_s']:.0f} | {b['build_s'] / f['build_s']:.2f}x |",
        f"| peak RSS at build, mapped file pages included (GB) | {b['peak_rss_mb'] / 1024:.2f} | {f['peak_rss_mb'] / 1024:.2f} | |",
        f"| single query p50 (ms, {args.query_threads} FAISS thread(s)) | {q['ours']['p50_ms']:.3f} | {q['raw']['p50_ms']:.3f} | {q['ours']['p50_ms'] / q['raw']['p50_ms']:.2f}x |",
        f"| single query p99 (ms) | {q['ours']['p99_ms']:.3f} | {q['raw']['p99_ms']:.3f} | |",
        f"| recall@10 vs exact ({args.queries} held-out queries) | {q['ours']['recall']:.3f} | {q['raw']['recall']:.3f} | |",
        f"| peak RSS while searching (GB; {args.queries} queries, coembed alone) | {query_rss_gb(q):.2f} | | |",
        f"| of which mapped file pages / the process's own, after them (GB) | "
        f"{q['alone']['file_mb'] / 1024:.2f} / {q['alone']['anon_mb'] / 1024:.2f} | | |",
        f"| peak anonymous memory at build (GB) | {anon(b)} | {anon(f)} | |",
        f"| index on disk (GB) | {size / gib:.2f} | | |",
    ]  # fmt: skip
    t = b["tuning"]
    notes = [
        f"parameters: {b['params']}; nprobe tuned at build to {t['value']} (recall@10 "
        f"{t['recall']:.3f} on {t['sample']} of the collection's own vectors, target "
        f"{t['target']}, {t['p50_ms']:.2f} ms per query in the tuning); raw FAISS searches the "
        "same index file at the same nprobe without re-ranking",
        "on disk: " + ", ".join(f"{k} {v / gib:.2f} GB" for k, v in b["sizes"].items())
        + f"; the parts (the embeddings) {args.n * args.dim * 4 / gib:.2f} GB besides",
        f"generating the parts: {r['generate']['generate_s']:.0f} s; exact top-10 of the queries: "
        f"{r['generate']['exact_s']:.0f} s; index load {q['load_s']:.1f} s",
        f"targets (p50 <= {TARGET_P50_MS} ms at recall@10 >= {TARGET_RECALL}, query RSS <= "
        f"{TARGET_QUERY_RSS_GB} GB): "
        + ("met" if q["ours"]["p50_ms"] <= TARGET_P50_MS and q["ours"]["recall"] >= TARGET_RECALL
           and query_rss_gb(q) <= TARGET_QUERY_RSS_GB else "not met"),
        f"{minutes:.0f} min in all (the phases' wall clock)",
    ]  # fmt: skip
    return lines + [""] + [f"- {n}" for n in notes]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--part", type=int, default=1_000_000, help="vectors per part")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--target-recall", type=float, default=TARGET_RECALL)
    parser.add_argument("--work", help="folder for the parts and the index (default: temporary)")
    parser.add_argument("--keep", action="store_true", help="keep --work afterwards")
    parser.add_argument(
        "--resume", action="store_true", help="skip the phases --work holds results of"
    )
    parser.add_argument("--quick", action="store_true", help="200k vectors, 300 queries")
    parser.add_argument(
        "--layout",
        choices=["auto", "ondisk"],
        default="auto",
        help="ondisk: 8-bit codes in lists on disk, as coembed builds past 2 GB of codes "
        "(auto: 4-bit codes in memory up to that)",
    )
    parser.add_argument(
        "--query-threads", type=int, default=1, help="FAISS threads for the single queries"
    )
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    if args.phase:
        if args.layout == "ondisk":  # as past 2 GB of codes: 8-bit codes, lists on disk
            import coembed.index.kinds as kinds

            kinds.IN_MEMORY_CODES_MAX = 0
        anonymous = AnonymousPeak()
        result = PHASES[args.phase](args)
        print(json.dumps({**result, "peak_anon_mb": anonymous.mb()}))
        return 0
    if args.quick:
        args.n, args.part, args.queries = 200_000, 50_000, 300
    os.environ.setdefault("COEMBED_NO_PROGRESS", "0")
    temporary = args.work is None
    args.work = args.work or tempfile.mkdtemp(prefix="bench-scale-")
    load = [os.getloadavg()[0]]
    try:
        results = {}
        for phase in PHASES:
            results[phase] = run_phase(phase, args)
            load.append(os.getloadavg()[0])
    finally:
        if temporary and not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    minutes = sum(r["wall_s"] for r in results.values()) / 60  # phases kept by --resume too
    lines = report(args, results, minutes)
    head = (f"{machine()}, load average {min(load):.1f}-{max(load):.1f}; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")  # fmt: skip
    print(head)
    print("\n".join(lines))
    if args.write_results:
        command = " ".join(["benchmarks/bench_scale.py", *sys.argv[1:]])
        section = SECTION + (" (lists on disk)" if args.layout == "ondisk" else "")
        text = (f"{section}\n\n- Command: `.venv/bin/python {command}`\n- Machine and date: {head}\n\n"
                + "\n".join(lines) + "\n")  # fmt: skip
        write_section(section, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
