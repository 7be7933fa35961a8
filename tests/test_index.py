"""The index: FAISS vs brute force, kinds by size, incremental add, atomic save, model identity,
and the real ``coembed index`` / ``coembed search`` commands (errors in a subprocess)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import coembed.index.kinds as kinds
import coembed.index.store as store
from coembed.errors import IndexError_, UsageError
from coembed.index import Index
from coembed.index.kinds import choose_kind
from tests.helpers import SHIPPED, assert_one_line_error, tiny_clip_model


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """These indexes are tiny; on shared, busy cores FAISS's OpenMP threads spin-wait on each
    other and a 0.2 s build takes 10 s. One thread keeps the tests fast and steady."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def clustered(n: int, dim: int, seed: int = 0, clusters: int = 50, rank: int = 8) -> np.ndarray:
    """Unit vectors in clusters, each spread along a few directions, as real embeddings are
    (isotropic noise in every dimension makes all neighbours equally far and recall meaningless)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    bases = rng.normal(size=(clusters, rank, dim)) / np.sqrt(rank)
    c = rng.integers(0, clusters, n)
    x = centres[c] + (rng.normal(size=(n, 1, rank)) @ bases[c])[:, 0]
    x += 0.05 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def with_queries(n: int, dim: int, n_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """Indexed vectors and held-out queries from the same clusters."""
    x = clustered(n + n_queries, dim)
    return x[:n], x[n:]


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ vectors.T), axis=1)[:, :k]


def recall(index: Index, vectors: np.ndarray, queries: np.ndarray, k: int = 10) -> float:
    want = exact_top(vectors, queries, k)
    hits = [len(set(index.search_ids(q, k)[0]) & set(w)) for q, w in zip(queries, want)]
    return sum(hits) / (k * len(queries))


def names(n: int) -> list[str]:
    return [f"item{i}" for i in range(n)]


def test_kind_thresholds():
    assert choose_kind(10) == "flat"
    assert choose_kind(kinds.FLAT_MAX - 1) == "flat"
    assert choose_kind(kinds.FLAT_MAX) == "hnsw"
    assert choose_kind(kinds.HNSW_MAX - 1) == "hnsw"
    assert choose_kind(kinds.HNSW_MAX) == "ivfpq"


def test_flat_is_exact_and_maps_ids_to_items():
    vectors, queries = with_queries(3000, 32, 20)
    index = Index.from_vectors(vectors, names(3000))
    assert index.kind == "flat"
    for q, want in zip(queries, exact_top(vectors, queries, 10)):
        got = index.search(q, k=10)
        assert [item for item, _ in got] == [f"item{i}" for i in want]
        scores = [s for _, s in got]
        assert scores == sorted(scores, reverse=True)
        np.testing.assert_allclose(scores[0], float(vectors[want[0]] @ q), atol=1e-5)


def test_hnsw_and_ivfpq_recall_against_brute_force():
    vectors, queries = with_queries(8000, 32, 50)
    hnsw = Index.from_vectors(vectors, names(8000), kind="hnsw")
    assert hnsw.kind == "hnsw" and recall(hnsw, vectors, queries) >= 0.95
    ivfpq = Index.from_vectors(vectors, names(8000), kind="ivfpq")
    # PQ codes are lossy (8 bytes per 32-d vector here); what matters is that it is close.
    assert ivfpq.kind == "ivfpq" and recall(ivfpq, vectors, queries) >= 0.5


def test_search_params_are_saved(tmp_path):
    index = Index.from_vectors(clustered(300, 16), names(300), kind="hnsw")
    index.set_search_params(ef_search=300)
    index.save(tmp_path / "idx")
    assert Index.load(tmp_path / "idx").faiss.hnsw.efSearch == 300


def test_k_larger_than_the_index():
    index = Index.from_vectors(clustered(3, 8), names(3))
    assert len(index.search(clustered(1, 8, seed=2)[0], k=10)) == 3


def test_save_load_add_keeps_one_generation(tmp_path):
    vectors = clustered(500, 16)
    Index.from_vectors(vectors[:300], names(300)).save(tmp_path / "idx")
    index = Index.load(tmp_path / "idx")
    index.add_vectors(vectors[300:], [f"item{i}" for i in range(300, 500)])
    index.save(tmp_path / "idx")
    again = Index.load(tmp_path / "idx")
    assert len(again) == 500 and again.items == names(500)
    assert again.search(vectors[450], k=1)[0][0] == "item450"
    files = sorted(p.name for p in (tmp_path / "idx").iterdir())
    assert files == ["index-000002.faiss", "index.json", "items-000002.json", "skipped.txt"]


def test_auto_index_moves_up_a_kind_when_it_grows(tmp_path, monkeypatch):
    monkeypatch.setattr(kinds, "FLAT_MAX", 200)
    vectors = clustered(400, 16)
    index = Index.from_vectors(vectors[:150], names(150))
    assert index.kind == "flat"
    index.add_vectors(vectors[150:], [f"item{i}" for i in range(150, 400)])
    assert index.kind == "hnsw" and len(index) == 400
    assert index.search(vectors[10], k=1)[0][0] == "item10"  # the old vectors came along
    forced = Index.from_vectors(vectors[:150], names(150), kind="flat")
    forced.add_vectors(vectors[150:], [f"item{i}" for i in range(150, 400)])
    assert forced.kind == "flat"  # an explicit --kind is kept


@pytest.mark.parametrize("fail_at", ["faiss", "items", "manifest", "copy"])
def test_interrupted_save_leaves_the_old_index(tmp_path, monkeypatch, fail_at):
    vectors = clustered(300, 16)
    Index.from_vectors(vectors[:100], names(100)).save(tmp_path / "idx")
    bigger = Index.from_vectors(vectors, names(300))

    class Crash(Exception):
        pass

    real_write, real_text, calls = (
        store.atomic_write,
        store.atomic_write_text,
        [],
    )

    def write(path, fn):
        calls.append(path)
        if fail_at == "faiss" or (fail_at == "items" and "items-" in str(path)):
            raise Crash
        real_write(path, fn)

    def write_text(path, text):
        if fail_at == "manifest" and str(path).endswith("index.json"):
            raise Crash
        real_text(path, text)

    monkeypatch.setattr(store, "atomic_write", write)
    monkeypatch.setattr(store, "atomic_write_text", write_text)
    if fail_at == "copy":
        monkeypatch.setattr(store, "copy_model", lambda *args: (_ for _ in ()).throw(Crash()))
    with pytest.raises(Crash):
        bigger.save(tmp_path / "idx")
    assert len(Index.load(tmp_path / "idx")) == 100
    monkeypatch.undo()
    bigger.save(tmp_path / "idx")  # the next save succeeds and tidies up
    assert len(Index.load(tmp_path / "idx")) == 300
    assert len(list((tmp_path / "idx").glob("index-*.faiss"))) == 1


def test_killed_save_leaves_a_loadable_index(tmp_path):
    """SIGKILL a process that keeps re-saving a growing index: what is on disk always loads."""
    script = textwrap.dedent(
        f"""
        import sys, numpy as np
        from coembed.index import Index
        rng = np.random.default_rng(0)
        x = rng.normal(size=(60000, 64)).astype(np.float32)
        for n in range(20000, 60001, 1000):
            Index.from_vectors(x[:n], [str(i) for i in range(n)], kind="flat").save({str(tmp_path / "idx")!r})
            print(n, flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    saved = [int(proc.stdout.readline()) for _ in range(3)]
    time.sleep(np.random.default_rng().uniform(0, 0.05))  # somewhere inside a later save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved += [int(line) for line in proc.stdout.read().split()]
    # The kill may land after a save committed but before it printed.
    assert len(Index.load(tmp_path / "idx")) in [*saved, saved[-1] + 1000]


# --- with a real (tiny, random) model ------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny models with the same config and different weights."""
    from coembed.checkpoint import save_model_dir
    from coembed.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("models")
    tok = Tokenizer.clip(context_length=16)
    return [save_model_dir(tiny_clip_model(seed=s), tok, root / f"m{s}") for s in (0, 1)]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Eight shipped pictures and one file that is not an image."""
    import shutil

    root = tmp_path_factory.mktemp("photos")
    for i in range(8):
        shutil.copy(SHIPPED / "images" / f"val_{i:05d}.png", root)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def test_build_skips_broken_images_and_checks_the_model(tmp_path, models, photos):
    import coembed

    model, other = coembed.load(models[0], device="cpu"), coembed.load(models[1], device="cpu")
    index = Index.build(model, images=photos)
    assert len(index) == 8 and [s[0] for s in index.skipped] == [str(photos / "broken.png")]
    index.save(tmp_path / "idx")
    assert "broken.png" in (tmp_path / "idx" / "skipped.txt").read_text()
    target = str(photos / "val_00003.png")
    assert Index.load(tmp_path / "idx").search(target, k=1)[0][0] == target  # its own model copy
    with pytest.raises(IndexError_, match="another model"):
        Index.load(tmp_path / "idx", embedder=other)
    with pytest.raises(UsageError, match="image index"):
        Index.load(tmp_path / "idx", embedder=model).add(texts=["a caption"])


def test_cli_index_search_add(tmp_path, models, photos, capsys):
    from coembed.cli import main

    out = tmp_path / "idx"
    some = tmp_path / "some"
    some.mkdir()
    for i in range(4):
        (some / f"val_{i:05d}.png").write_bytes((photos / f"val_{i:05d}.png").read_bytes())
    cmd = ["--device", "cpu"]
    assert (
        main(
            ["index", "--model", str(models[0]), "--images", str(some), "--output", str(out), *cmd]
        )
        == 0
    )
    assert "indexed 4 images" in capsys.readouterr().out
    # The folder grows; --add needs no --model (the index has its own copy) and leaves the
    # files it already holds alone.
    for path in photos.iterdir():
        (some / path.name).write_bytes(path.read_bytes())
    assert main(["index", "--images", str(some), "--output", str(out), "--add", *cmd]) == 0
    report = capsys.readouterr()
    assert "added 4 images" in report.out and "4 were already indexed" in report.out
    assert "skipped 1 image" in report.err

    target = str(some / "val_00006.png")
    assert main(["search", "--index", str(out), "--k", "3", "--json", "--image", target, *cmd]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["results"]) == 3 and result["results"][0]["item"] == target
    assert result["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    query = '"a red circle" - "red" + 0.5*"blue"'
    assert main(["search", "--index", str(out), "--k", "2", query, *cmd]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2

    # A text index searched with an image: image -> text.
    captions = [
        line.split(",", 1)[1] for line in (SHIPPED / "val.csv").read_text().splitlines()[1:9]
    ]
    (tmp_path / "captions.txt").write_text("\n".join(captions) + "\n\n")
    texts = tmp_path / "tidx"
    assert (
        main(
            [
                "index",
                "--model",
                str(models[0]),
                "--texts",
                str(tmp_path / "captions.txt"),
                "--output",
                str(texts),
                *cmd,
            ]
        )
        == 0
    )
    assert main(["search", "--index", str(texts), "--json", "--image", target, *cmd]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["modality"] == "text" and {r["item"] for r in result["results"]} == set(captions)


@pytest.fixture(scope="module")
def cli_errors(tmp_path_factory, models, photos):
    """Every bad-input case through the real command, run concurrently (each pays for Python)."""
    import coembed

    root = tmp_path_factory.mktemp("cli")
    good = root / "good"
    Index.build(coembed.load(models[0], device="cpu"), images=photos, progress=False).save(good)
    damaged = root / "damaged"
    Index.from_vectors(clustered(10, 32), names(10)).save(damaged)
    next(damaged.glob("index-*.faiss")).unlink()
    cases = {
        "other_model": [
            "index",
            "--model",
            str(models[1]),
            "--images",
            str(photos),
            "--output",
            str(good),
            "--add",
        ],
        "missing_index_file": ["search", "--index", str(damaged), "a red circle"],
        "empty_query": ["search", "--index", str(good), ""],
        "unreadable_image": ["search", "--index", str(good), "--image", str(photos / "broken.png")],
        "missing_index_dir": ["search", "--index", str(root / "nowhere"), "a red circle"],
        "unbalanced_quote": ["search", "--index", str(good), '"a red circle - "red"'],
    }
    env = {**os.environ, "COEMBED_NO_PROGRESS": "1"}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "coembed", *args, "--device", "cpu"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name, args in cases.items()
    }
    return {
        name: subprocess.CompletedProcess(p.args, p.wait(), *p.communicate())
        for name, p in procs.items()
    }


@pytest.mark.parametrize(
    "case, code, contains",
    [
        ("other_model", 1, "built with another model"),
        ("missing_index_file", 1, "missing"),
        ("empty_query", 2, "empty query"),
        ("unreadable_image", 1, "broken.png"),
        ("missing_index_dir", 1, "no such index directory"),
        ("unbalanced_quote", 2, "unbalanced quote"),
    ],
)
def test_cli_errors_are_one_line(cli_errors, case, code, contains):
    assert_one_line_error(cli_errors[case], code=code, contains=contains)
