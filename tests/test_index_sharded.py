"""Sharded, resumable indexing (`torchrun ... -m coembed index`, `--resumable`, `--merge`), the
on-disk IVF-PQ build and recall tuned to a target.

Two gloo processes on the CPU embed disjoint parts; the index they build must hold the same
items, vectors (to 1e-6) and search results as a one-process build, also after one rank is
SIGKILLed mid-run and the same command is run again (which must embed only the parts left).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coembed.index import Index
from coembed.index.rerank import VectorFile
from coembed.index.tune import K, array_blocks, exact_neighbours, recall_at_k
from tests.helpers import REPO, assert_one_line_error, ok, run_cli, write_csv

TOLERANCE = 1e-6  # vectors and scores: one process vs two (the same batches, the same kernels)

# torchrun runs this script in each rank: `coembed` itself, but every rename into WATCH is
# announced on stderr with the rank's pid and followed by a pause, so the test can SIGKILL a
# rank after it finished some parts and before it finished all.
RANK_SCRIPT = r"""
import os, sys, time
watch, pause = os.path.abspath(sys.argv[1]), float(sys.argv[2])
real = os.replace

def replace(src, dst, *args, **kwargs):
    real(src, dst, *args, **kwargs)
    dst = os.fspath(dst)
    if os.path.abspath(dst).startswith(watch) and dst.endswith(".json"):
        sys.__stderr__.write(f"@@ {os.getpid()} {os.path.basename(dst)}\n")
        sys.__stderr__.flush()
        time.sleep(pause)

os.replace = replace
from coembed.cli import main
sys.exit(main(sys.argv[3:]))
"""


def torchrun_command(*args: str, script: Path | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return [*cmd, str(script)] if script else [*cmd, "-m", "coembed"]


def env() -> dict:
    return {
        **os.environ,
        "COEMBED_NO_PROGRESS": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO / "src"),
    }


def torchrun(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*torchrun_command(), *args], capture_output=True, text=True, env=env(), timeout=600
    )


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> dict[str, Path]:
    """A tiny model, 37 images in a CSV (one given twice, one corrupt) and its one-process
    index (flat: exact)."""
    from PIL import Image

    from coembed.checkpoint import save_model_dir
    from coembed.tokenizer import Tokenizer
    from tests.helpers import tiny_clip_model

    root = tmp_path_factory.mktemp("sharded")
    model = save_model_dir(tiny_clip_model(), Tokenizer.clip(context_length=16), root / "model")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(35):
        pixels = rng.integers(0, 255, (24 + i % 5, 32, 3), dtype=np.uint8)
        path = root / "images" / f"img{i:03d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(path)
        rows.append((str(path), f"picture number {i}"))
    (root / "images" / "broken.png").write_bytes(b"not a png")
    rows.insert(9, (str(root / "images" / "broken.png"), "a broken file"))
    rows.append(rows[3])  # given twice: indexed once
    data = write_csv(root / "data.csv", rows)
    one = root / "one"
    ok(run_cli("index", "--model", str(model), "--images", str(data), "--output", str(one),
               "--kind", "flat", "--device", "cpu"))  # fmt: skip
    return {"root": root, "model": model, "data": data, "one": one}


def assert_same_index(a: Path, b: Path) -> None:
    """Same items, captions and skipped images; vectors and search results within TOLERANCE."""
    x, y = Index.load(a, device="cpu"), Index.load(b, device="cpu")
    assert x.items == y.items and x.captions == y.captions
    assert sorted(map(tuple, x.skipped)) == sorted(map(tuple, y.skipped))
    vx, vy = x.faiss.reconstruct_n(0, len(x)), y.faiss.reconstruct_n(0, len(y))
    assert np.abs(vx - vy).max() <= TOLERANCE
    # Every item's score for a query, by item: ranks may swap only between ties (a random tiny
    # model embeds random images alike, so scores differ in the 7th digit).
    for q in vx[::5]:
        scores = []
        for index in (x, y):
            ids, found = index.search_ids(q, len(index))
            by_item = np.empty(len(index))
            by_item[ids] = found
            scores.append(by_item)
        assert np.abs(scores[0] - scores[1]).max() <= TOLERANCE


def test_two_ranks_build_what_one_process_builds(collection):
    out = collection["root"] / "two"
    done = torchrun(
        "index", "--model", str(collection["model"]), "--images", str(collection["data"]),
        "--output", str(out), "--kind", "flat", "--part-size", "8", "--device", "cpu",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0 of 2: embedded 3 part(s) of 5" in done.stdout
    assert "rank 1 of 2: embedded 2 part(s) of 5" in done.stdout
    assert "indexed 35 images" in done.stdout
    assert_same_index(collection["one"], out)
    assert len(list((out / "parts").glob("part-*.npy"))) == 5
    # --merge builds it again from the parts alone, with the model the parts recorded.
    again = run_cli("index", "--merge", "--output", str(out), "--kind", "flat", "--device", "cpu")
    assert again.returncode == 0, again.stderr
    assert_same_index(collection["one"], out)


def test_a_killed_rank_and_the_restart_redo_only_unfinished_parts(collection, tmp_path):
    out = tmp_path / "killed"
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    args = [
        "index", "--model", str(collection["model"]), "--images", str(collection["data"]),
        "--output", str(out), "--kind", "flat", "--part-size", "4", "--device", "cpu",
    ]  # fmt: skip
    cmd = [*torchrun_command(script=script), str(out / "parts"), "0.5", *args]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env()
    )
    killed = None
    for line in proc.stderr:
        if line.startswith("@@ ") and "part-000003" in line:  # rank 1's second part
            killed = int(line.split()[1])
            os.kill(killed, signal.SIGKILL)
            break
    proc.communicate(timeout=300)
    assert killed is not None and proc.returncode != 0
    assert not (out / "index.json").exists()
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "parts").glob("part-*.json")}
    assert "part-000001.json" in finished and "part-000003.json" in finished
    parts = json.loads((out / "parts" / "plan.json").read_text())["parts"]
    assert parts == 9  # 36 distinct images in parts of 4
    assert len(finished) < parts  # something was left to do

    done = torchrun(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "finished before" in done.stdout
    for name, mtime in finished.items():  # not embedded again
        assert (out / "parts" / name).stat().st_mtime_ns == mtime
    assert len(list((out / "parts").glob("part-*.json"))) == parts
    assert not list((out / "parts").glob(".*.tmp"))
    assert_same_index(collection["one"], out)


def test_a_restart_with_other_inputs_or_model_is_refused(collection, tmp_path):
    out = tmp_path / "resumable"
    base = ["index", "--model", str(collection["model"]), "--output", str(out),
            "--resumable", "--part-size", "8", "--device", "cpu"]  # fmt: skip
    ok(run_cli(*base, "--images", str(collection["data"]), "--kind", "flat"))
    assert_same_index(collection["one"], out)
    other = write_csv(tmp_path / "other.csv", [(str(p), "x") for p in
                                                sorted((collection["root"] / "images").glob("img00*.png"))])  # fmt: skip
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    refused = run_cli(*base, "--images", str(other))
    assert_one_line_error(refused, 2, "other inputs")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    # The parts are not a place to put other files: --merge of a folder without parts is refused.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(
        run_cli("index", "--merge", "--output", str(empty)), None, "no embedding parts"
    )


def test_sharded_text_index(collection, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(f"caption {i}" for i in range(30)) + "\ncaption 3\n")
    one, parts = tmp_path / "one", tmp_path / "parts"
    common = ["--model", str(collection["model"]), "--texts", str(texts), "--kind", "flat",
              "--device", "cpu"]  # fmt: skip
    ok(run_cli("index", *common, "--output", str(one)))
    ok(run_cli("index", *common, "--output", str(parts), "--resumable", "--part-size", "7"))
    assert_same_index(one, parts)
    assert len(Index.load(parts, device="cpu")) == 30


def islands(n: int, dim: int, seed: int, clusters: int = 200, rank: int = 4) -> np.ndarray:
    """Unit rows in well-separated clusters, each spread along a few directions of its own: a
    hard case for HNSW's graph and for IVF's lists."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    bases = rng.normal(size=(clusters, rank, dim)).astype(np.float32) / np.sqrt(rank)
    which = rng.integers(0, clusters, n)
    z = rng.normal(size=(n, rank)).astype(np.float32)
    out = centres[which] + np.einsum("nr,nrd->nd", z, bases[which])
    out += 0.05 * rng.normal(size=(n, dim)).astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def fresh_recall(index, vectors: np.ndarray, seed: int = 7) -> float:
    """recall@10 on 300 stored vectors other than those the tuning held out."""
    ids = np.random.default_rng(seed).choice(len(vectors), 300, replace=False)
    ids = np.sort(ids)
    exact = exact_neighbours(vectors[ids], ids, array_blocks(vectors))
    _, found = index.search(vectors[ids], K + 1)
    return recall_at_k(found, exact, ids)


@pytest.mark.parametrize("target", [0.9, 0.97])
def test_hnsw_is_tuned_to_the_target_recall(target):
    vectors = islands(30_000, 32, seed=1)
    index = Index.from_vectors(vectors, [str(i) for i in range(len(vectors))], "hnsw",
                               target_recall=target)  # fmt: skip
    tuning = index.tuning
    assert tuning["parameter"] == "efSearch" and tuning["reached"]
    assert tuning["recall"] >= target and index.params["efSearch"] == tuning["value"]
    assert index.faiss.hnsw.efSearch == tuning["value"]
    # the cheapest setting that reaches it by a standard error: the ones before it did not
    trials = tuning["trials"]
    assert tuning["recall"] - trials[-1]["stderr"] >= target > 0
    assert all(t["recall"] - t["stderr"] < target for t in trials[:-1])
    assert 0 < trials[-1]["stderr"] < 0.02
    # measured again on other queries, it holds within the sample's error (~0.01)
    assert fresh_recall(index.faiss, vectors) >= target - 0.02


def test_an_unreachable_target_keeps_the_largest_setting_and_says_so(monkeypatch):
    import coembed.index.tune as tune

    monkeypatch.setattr(tune, "EF_SEARCH", (16, 24))
    vectors = islands(30_000, 128, seed=2, clusters=300, rank=8)
    index = Index.from_vectors(vectors, [str(i) for i in range(len(vectors))], "hnsw",
                               target_recall=1.0)  # fmt: skip
    tuning = index.tuning
    assert tuning["parameter"] == "efSearch" and tuning["value"] == 24 == index.params["efSearch"]
    assert not tuning["reached"] and tuning["recall"] < 1.0
    assert "not reached" in tune.Tuning(**{**tuning, "trials": []}).summary()


def test_ivfpq_reranks_its_candidates_with_the_stored_vectors(tmp_path):
    """PQ codes alone rank neighbours roughly (recall@10 ~0.8 here with every list probed);
    re-scored with the vectors kept beside them, the tuned index reaches the target."""
    from coembed.index.kinds import import_faiss

    vectors = islands(20_000, 32, seed=6)
    index = Index.from_vectors(vectors, [str(i) for i in range(len(vectors))], "ivfpq",
                               target_recall=0.95)  # fmt: skip
    assert index.tuning["reached"] and index.rerank.vectors.dtype == np.float32
    assert fresh_recall(index.searcher, vectors) >= 0.93
    codes_only = import_faiss().clone_index(index.faiss)
    codes_only.nprobe = codes_only.nlist
    assert fresh_recall(codes_only, vectors) < 0.9  # what re-ranking buys
    index.save(tmp_path / "idx")
    loaded = Index.load(tmp_path / "idx")
    assert isinstance(loaded.rerank.vectors, VectorFile)
    assert loaded.rerank.vectors.shape == loaded.rerank.codes.codes.shape == (20_000, 32)
    # shortlisted by the 8-bit codes, then scored exactly: as good as scoring every candidate
    assert fresh_recall(loaded.searcher, vectors) >= fresh_recall(index.searcher, vectors) - 0.01
    ids, scores = loaded.search_ids(vectors[11], 3)
    assert ids[0] == 11 and abs(scores[0] - 1.0) < 1e-5
    from coembed.curate.dedup import index_vectors
    from coembed.index.index import _item_vector

    exact = vectors.astype(np.float32)
    assert np.array_equal(index_vectors(loaded), exact)  # dedup reads the exact vectors
    assert np.array_equal(_item_vector(loaded, 11), exact[11])  # as image:11 does


def test_codes_score_within_half_a_step_per_value():
    from coembed.index.rerank import Codes

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(500, 24)).astype(np.float32)
    vectors[:, 3] = 0.25  # a constant dimension: a zero range must not divide by zero
    codes = Codes.of(vectors)
    assert codes.codes.dtype == np.uint8 and codes.codes.shape == (500, 24)
    decoded = codes.low + codes.codes.astype(np.float32) * codes.step  # (N, D)
    assert np.all(np.abs(decoded - vectors) <= codes.step / 2 + 1e-6)
    query = rng.normal(size=24).astype(np.float32)
    ids = np.array([0, 7, 499])
    bound = float(np.abs(query) @ (codes.step / 2)) + 1e-5
    assert np.all(np.abs(codes.scores(ids, query) - vectors[ids] @ query) <= bound)
    assert np.abs(codes.scores(ids, query) - vectors[ids] @ query).max() > 0  # codes, not rows
    outside = codes.encode(vectors[:2] * 10)  # beyond the range seen: clipped, not wrapped
    assert set(np.unique(outside)) <= set(range(256)) and {0, 255} & set(outside.ravel())


def test_a_vector_file_reads_only_the_rows_asked_for(tmp_path):
    from coembed.index.store import write_rerank
    from coembed.index.tune import BLOCK as BLOCK_ROWS

    vectors = np.random.default_rng(1).normal(size=(BLOCK_ROWS + 10, 8)).astype(np.float32)
    value_range = write_rerank(
        tmp_path / "v.npy", tmp_path / "c.npy", lambda: iter([vectors[:5], vectors[5:]]),
        vectors.shape,
    )  # fmt: skip
    mapped = np.load(tmp_path / "v.npy", mmap_mode="r")
    rows = VectorFile(tmp_path / "v.npy", vectors.shape, mapped.offset)
    assert np.array_equal(rows[np.array([3, 0, BLOCK_ROWS + 9])], vectors[[3, 0, BLOCK_ROWS + 9]])
    assert np.array_equal(rows[7], vectors[7]) and np.array_equal(rows[-1], vectors[-1])
    assert np.array_equal(np.asarray(rows), vectors) and rows[np.array([], int)].shape == (0, 8)
    with pytest.raises(IndexError):
        rows[np.array([len(vectors)])]
    codes = np.load(tmp_path / "c.npy")
    low, step = np.asarray(value_range["low"]), np.asarray(value_range["step"])
    assert np.allclose(low, vectors.min(0)) and np.allclose(low + 255 * step, vectors.max(0))
    assert np.all(np.abs(low + codes * step - vectors) <= step / 2 + 1e-6)


def test_a_loaded_ivfpq_index_searches_without_mapping_its_vectors(tmp_path):
    """The exact rows are read one by one: the float32 file is never mapped, so what a
    long-running search process holds of it does not grow with the queries it answers."""
    vectors = islands(6_000, 16, seed=4)
    index = Index.from_vectors(vectors, [str(i) for i in range(len(vectors))], "ivfpq")
    index.save(tmp_path / "idx")
    loaded = Index.load(tmp_path / "idx")
    for q in vectors[:50]:
        assert loaded.search_ids(q, 5)[0][0] in set(range(len(vectors)))
    maps = Path(f"/proc/{os.getpid()}/maps")
    if maps.exists():
        mapped = maps.read_text()
        name = json.loads((tmp_path / "idx" / "index.json").read_text())["files"]["vectors"]
        assert name not in mapped and "codes-" in mapped  # the codes are memory-mapped


def test_damaged_rerank_files_are_one_clear_error(tmp_path):
    import shutil

    from coembed.errors import IndexError_

    vectors = islands(3_000, 16, seed=5)
    Index.from_vectors(vectors, [str(i) for i in range(3_000)], "ivfpq").save(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / "index.json").read_text())
    for key, damage, expected in [
        ("codes", "truncate", "unreadable"),
        ("vectors", "truncate", "unreadable"),
        ("codes", "drop_range", "codes_range"),
        ("codes", "remove", "missing"),
    ]:
        copy = tmp_path / f"{key}-{damage}"
        shutil.copytree(tmp_path / "idx", copy)
        path = copy / manifest["files"][key]
        if damage == "truncate":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        elif damage == "remove":
            path.unlink()
        else:
            (copy / "index.json").write_text(
                json.dumps({k: v for k, v in manifest.items() if k != "codes_range"})
            )
        with pytest.raises(IndexError_, match=expected):
            Index.load(copy)
    # an index saved before the codes were (no codes file, no range) re-scores every candidate
    old = tmp_path / "before-codes"
    shutil.copytree(tmp_path / "idx", old)
    (old / manifest["files"]["codes"]).unlink()
    files = {k: v for k, v in manifest["files"].items() if k != "codes"}
    before = {k: v for k, v in manifest.items() if k != "codes_range"}
    (old / "index.json").write_text(json.dumps({**before, "files": files}))
    loaded = Index.load(old)
    assert loaded.rerank.codes is None and loaded.search_ids(vectors[5], 1)[0] == [5]


def test_tuning_is_saved_and_an_add_tunes_again(tmp_path):
    vectors = islands(12_000, 32, seed=3)
    index = Index.from_vectors(vectors[:10_000], [str(i) for i in range(10_000)], "hnsw",
                               target_recall=0.95)  # fmt: skip
    index.save(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert manifest["tuning"]["value"] == manifest["params"]["efSearch"] == index.tuning["value"]
    assert manifest["target_recall"] == 0.95
    loaded = Index.load(tmp_path / "idx")
    assert loaded.faiss.hnsw.efSearch == index.tuning["value"]
    loaded.add_vectors(vectors[10_000:], [str(i) for i in range(10_000, 12_000)])
    assert loaded.tuning["recall"] >= 0.95 and loaded.tuning["sample"] == 1000
    # set by hand, the setting is no longer the tuning's
    loaded.set_search_params(ef_search=500)
    assert loaded.tuning is None


@pytest.mark.parametrize(
    "layout, quantizer", [("ondisk", "flat"), ("ondisk", "hnsw"), ("fastscan", "flat")]
)
def test_ivfpq_merged_from_parts(collection, tmp_path, monkeypatch, layout, quantizer):
    """Parts of random vectors (as ranks would write them) -> IVF-PQ trained on a sample and
    filled part by part; searched through the command line. "ondisk" (past 2 GB of codes): its
    lists in an .ivfdata file, memory-mapped when loaded. "fastscan": 4-bit codes in memory.
    "hnsw": the lists found through an HNSW graph over the centroids (as past 8,192 lists)."""
    import coembed.index.kinds as kinds
    import coembed.index.shards as shards
    from coembed.embedder import load
    from coembed.index.sharded import merge_parts
    from coembed.index.store import model_identity

    if quantizer == "hnsw":
        monkeypatch.setattr(kinds, "HNSW_QUANTIZER_NLIST", 64)
    if layout == "ondisk":
        monkeypatch.setattr(kinds, "IN_MEMORY_CODES_MAX", 0)
    embedder = load(collection["model"], device="cpu")
    vectors = islands(24_000, embedder.dim, seed=4)
    out = tmp_path / "built"
    plan = shards.Plan("text", sources=[], names=[f"t{i}" for i in range(24_000)], part_size=5_000)
    (out / "parts").mkdir(parents=True)
    (out / "parts" / "plan.json").write_text(
        json.dumps(shards.plan_record(plan, model_identity(embedder)))
    )
    for number in range(plan.count):
        rows = slice(number * 5_000, (number + 1) * 5_000)
        names = plan.names[rows]
        shards.write_part(
            out,
            number,
            vectors[rows],
            {"items": names, "captions": [[] for _ in names], "skipped": [], "roots": []},
        )
    index = merge_parts(out, embedder, kind="ivfpq", target_recall=0.9, progress=False)
    manifest = json.loads((out / "index.json").read_text())
    assert manifest["count"] == 24_000 and manifest["params"]["layout"] == layout
    faiss = kinds.import_faiss()
    reloaded = Index.load(out)  # held: the quantizer and lists below are its FAISS index's
    ivf = faiss.extract_index_ivf(reloaded.faiss)
    lists = type(faiss.downcast_InvertedLists(ivf.invlists)).__name__
    if layout == "ondisk":
        ivfdata = out / manifest["files"]["ivfdata"]
        assert ivfdata.name.endswith(".ivfdata") and ivfdata.stat().st_size > 24_000 * 8
        assert (out / manifest["files"]["faiss"]).stat().st_size < ivfdata.stat().st_size
        assert "OnDisk" in lists and type(reloaded.faiss).__name__ == "IndexIVFPQ"
    else:
        assert "ivfdata" not in manifest["files"] and not list(out.glob("*.ivfdata"))
        assert type(reloaded.faiss).__name__ == "IndexIVFPQFastScan" and "OnDisk" not in lists
        assert manifest["params"]["bits"] == 4 and reloaded.searcher.factor == 30
    assert index.tuning["reached"] and index.params["nprobe"] == index.tuning["value"]
    assert (out / manifest["files"]["vectors"]).is_file()
    assert fresh_recall(index.searcher, vectors) >= 0.88
    assert fresh_recall(reloaded.searcher, vectors) >= 0.88
    assert index.items[:3] == ["t0", "t1", "t2"]
    assert manifest["params"]["quantizer"] == quantizer
    loaded = faiss.downcast_index(ivf.quantizer)
    assert type(loaded).__name__ == {"flat": "IndexFlatIP", "hnsw": "IndexHNSWFlat"}[quantizer]
    if quantizer == "hnsw":  # searched wider than it was built (k-means and adds at 16)
        assert loaded.hnsw.efSearch == kinds.QUANTIZER_EF_SEARCH
    found = run_cli("search", "--index", str(out), "--json", "--device", "cpu", "a query")
    assert found.returncode == 0, found.stderr
    assert len(json.loads(found.stdout)["results"]) == 10


def test_auto_routes_through_ivf_when_hnsw_falls_short(monkeypatch):
    """When HNSW's tuning cannot reach the target (here its efSearch is capped at 24 so that it
    cannot, as on the islands data at 1M), auto builds IVF-Flat too, tunes its nprobe and keeps
    it for reaching the target; items read back as from HNSW."""
    import coembed.index.tune as tune

    monkeypatch.setattr(tune, "EF_SEARCH", (16,))  # recall@10 ~0.92 on these vectors
    vectors = islands(60_000, 128, seed=5, clusters=300, rank=8)  # auto: HNSW at this size
    index = Index.from_vectors(vectors, [str(i) for i in range(len(vectors))], "auto",
                               target_recall=0.99)  # fmt: skip
    assert index.kind == "ivfflat" and index.tuning["parameter"] == "nprobe"
    assert index.tuning["reached"] and index.params["nprobe"] == index.tuning["value"]
    assert fresh_recall(index.faiss, vectors) >= 0.97
    assert np.allclose(index.faiss.reconstruct(5), vectors[5], atol=1e-6)
    # and when HNSW reaches it at a modest efSearch, HNSW stays
    monkeypatch.setattr(tune, "EF_SEARCH", (16, 32, 64, 128, 256, 512, 1024, 2048))
    kept = Index.from_vectors(vectors, [str(i) for i in range(len(vectors))], "auto",
                              target_recall=0.95)  # fmt: skip
    assert kept.kind == "hnsw" and kept.tuning["value"] <= tune.ROUTING_EF


def test_an_index_grown_into_ivfpq_keeps_its_vectors_to_rerank(monkeypatch):
    """An auto index that --add grows past HNSW's range becomes IVF-PQ, re-ranked with every
    vector it holds (the old ones read back from HNSW, the new ones as given)."""
    import coembed.index.kinds as kinds

    monkeypatch.setattr(kinds, "FLAT_MAX", 200)
    monkeypatch.setattr(kinds, "HNSW_MAX", 600)
    vectors = islands(3_000, 16, seed=8)
    index = Index.from_vectors(vectors[:500], [f"item{i}" for i in range(500)])
    assert index.kind == "hnsw" and index.rerank is None
    index.add_vectors(vectors[500:], [f"item{i}" for i in range(500, 3_000)])
    assert index.kind == "ivfpq" and index.rerank.vectors.shape == (3_000, 16)
    assert np.allclose(index.rerank.vectors, vectors, atol=1e-6)
    assert index.rerank.codes.codes.shape == (3_000, 16)
    assert index.search(vectors[10], k=1)[0][0] == "item10"
    assert index.search(vectors[2_500], k=1)[0][0] == "item2500"
