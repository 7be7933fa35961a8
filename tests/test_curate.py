"""The curation tools through the real command line: probe, merge, score, dedup and filter.

Fast tests use a tiny random model or hand-made vectors, where the right answer is known
exactly. The slow ones train a tiny model for a few hundred steps (about a minute on two
cores) and measure what the closing figures report: probe accuracy beside zero-shot's, the
planted near-duplicates found, and a merge sweep between a model and its fine-tuned copy.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from tests.helpers import (
    CONTRASTIVE_ONLY,
    TINY_SET,
    assert_one_line_error,
    ok,
    run_cli_batch,
    tiny_clip_model,
    tiny_config,
    tiny_dataset,
    tree_changes,
    tree_snapshot,
    weights,
)

COMMANDS = ("probe", "merge", "score", "dedup", "filter")


# --- shared data -----------------------------------------------------------------------------------


def save_model(model, folder: Path, tokenizer) -> Path:
    from coembed.checkpoint import save_model_dir

    return save_model_dir(model, tokenizer, folder)


@pytest.fixture(scope="module")
def work(tmp_path_factory, clip_tokenizer) -> Path:
    """A random tiny model A, a perturbed copy B, another architecture, class folders, pairs."""
    import torch

    from coembed.datasets.synthetic import generate_shapes

    root = tmp_path_factory.mktemp("curate")
    model = tiny_clip_model()
    save_model(model, root / "a", clip_tokenizer)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.05)
            else:
                tensor.add_(3)  # the batch counters: B's must come from B
    save_model(model, root / "b", clip_tokenizer)
    save_model(tiny_clip_model("model.embed_dim=16"), root / "other", clip_tokenizer)
    generate_shapes(root / "classes_train", n_per_class=6, image_size=32, seed=0)
    generate_shapes(root / "classes_val", n_per_class=4, image_size=32, seed=1)
    tiny_dataset(root / "pairs", n=16)
    return root


# --- every command -------------------------------------------------------------------------------


def test_every_command_has_help():
    procs = run_cli_batch([[command, "--help"] for command in COMMANDS])
    for command, proc in zip(COMMANDS, procs):
        assert ok(proc).stdout.startswith(f"usage: coembed {command}"), proc.stdout
        assert "--json" in proc.stdout


# --- probe ---------------------------------------------------------------------------------------


def test_logistic_regression_separates_blobs_and_folds_its_scaling():
    from coembed.curate.probe import fit_logistic, logits_of, standardizer, unstandardized

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 8)) * 3
    y = np.repeat(np.arange(4), 30)
    x = (centres[y] + rng.normal(size=(120, 8))).astype(np.float32) * 1e-3 + 5  # badly scaled
    mean, scale = standardizer(x)
    weight, bias = fit_logistic((x - mean) / scale, y, 4, l2=1e-3)
    raw_weight, raw_bias = unstandardized(weight, bias, mean, scale)
    standardized = logits_of((x - mean) / scale, weight, bias)
    assert np.allclose(logits_of(x, raw_weight, raw_bias), standardized, atol=1e-2)
    assert (standardized.argmax(axis=1) == y).mean() > 0.95
    # A strong penalty shrinks the weights: the L2 strength is live.
    strong, _ = fit_logistic((x - mean) / scale, y, 4, l2=10.0)
    assert np.linalg.norm(strong) < np.linalg.norm(weight) / 5


def test_labelled_images_from_a_table(tmp_path):
    from coembed.curate.probe import read_labelled
    from coembed.errors import DataError

    rows = [("a.png", "cat"), ("b.png", "dog"), ("c.png", "cat"), ("d.png", "bird")]
    for name, table in (("train.csv", rows), ("val.csv", [("e.png", "dog"), ("f.png", "fish")])):
        text = "image,label\n" + "".join(f"{image},{label}\n" for image, label in table)
        (tmp_path / name).write_text(text)
    found = read_labelled(tmp_path / "train.csv", image_key="image")
    assert found.classnames == ["bird", "cat", "dog"]
    assert found.labels.tolist() == [1, 2, 1, 0]
    assert found.sources == [str(tmp_path / name) for name, _ in rows]
    with pytest.raises(DataError, match="'fish' is not one of the 3 training classes"):
        read_labelled(tmp_path / "val.csv", classnames=found.classnames, image_key="image")


def test_probe_classifier_serves_zeroshot_and_beats_prompts(work, tmp_path):
    out = tmp_path / "probe"
    data = ["--train-data", str(work / "classes_train"), "--val-data", str(work / "classes_val")]
    probe, by_copy, by_original, text = run_cli_batch(
        [
            ["probe", "--model", str(work / "a"), *data, "--output", str(out), "--json"],
            ["zeroshot", "--model", str(out), "--data", str(work / "classes_val")]
            + ["--classifier", str(out), "--json"],
            ["zeroshot", "--model", str(work / "a"), "--data", str(work / "classes_val")]
            + ["--classifier", str(out / "classifier.safetensors"), "--json"],
            ["zeroshot", "--model", str(work / "a"), "--data", str(work / "classes_val")]
            + ["--classifier", str(out)],
        ]
    )
    result = json.loads(ok(probe).stdout)
    assert {p.name for p in out.iterdir()} == {
        "config.json", "model.safetensors", "tokenizer.json", "preprocess.json",
        "classifier.safetensors", "probe.json", "confusion.png",
    }  # fmt: skip
    assert json.loads((out / "probe.json").read_text())["top1"] == result["top1"]
    assert Image.open(out / "confusion.png").size[0] > 300
    assert result["classes"] == 16 and result["images"]["evaluated"] == 64
    assert result["l2"] in [row["l2"] for row in result["sweep"]]
    # Frozen random features still separate colours linearly; prompts cannot read them.
    assert result["top1"] >= 2 / 16 and result["top1"] > result["zeroshot_top1"]
    for proc in (by_copy, by_original):  # the same classifier on the same images
        assert json.loads(ok(proc).stdout)["top1"] == pytest.approx(result["top1"])
    assert ok(text).stdout.startswith(f"linear probe {out}: 64 images, 16 classes")


def test_probe_refuses_bad_input_and_writes_nothing(work, tmp_path):
    out = tmp_path / "probe"
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("keep me")
    (tmp_path / "empty").mkdir()
    (tmp_path / "one_class" / "cat").mkdir(parents=True)
    first = next((work / "classes_val" / "red circle").iterdir())
    shutil.copy(first, tmp_path / "one_class" / "cat")
    shutil.copytree(tmp_path / "one_class", tmp_path / "strange")
    (tmp_path / "strange" / "red circle").mkdir()
    shutil.copy(first, tmp_path / "strange" / "red circle")
    train = ["--train-data", str(work / "classes_train")]
    before = tree_snapshot(tmp_path, deep=True)
    model = ["probe", "--model", str(work / "a")]
    procs = run_cli_batch(
        [
            ["probe", "--model", str(tmp_path / "nope"), *train, "--output", str(out)],
            [*model, "--train-data", str(tmp_path / "empty"), "--output", str(out)],
            [*model, "--train-data", str(tmp_path / "one_class"), "--output", str(out)],
            [*model, *train, "--output", str(tmp_path / "junk")],
            [*model, *train, "--val-data", str(tmp_path / "strange"), "--output", str(out)],
            [*model, *train, "--output", str(work / "a")],
        ]
    )
    for proc, (code, words) in zip(
        procs,
        [
            (1, "not a model directory"),
            (1, "class sub-folder"),
            (1, "at least two"),
            (2, "notes.txt"),
            (1, "'cat' is not one of the 16 training classes"),
            (2, "--model"),
        ],
    ):
        assert_one_line_error(proc, code, words)
    assert tree_changes(before, tree_snapshot(tmp_path, deep=True)) == []


# --- merge ---------------------------------------------------------------------------------------


def test_merge_interpolates_every_tensor(work, tmp_path):
    procs = run_cli_batch(
        [
            ["merge", str(work / "a"), str(work / "b"), "--alpha", str(alpha)]
            + ["--output", str(tmp_path / f"m{alpha}"), "--json"]
            for alpha in (0, 0.25, 1)
        ]
    )
    for proc in procs:
        ok(proc)
    a, b = weights(work / "a"), weights(work / "b")
    for alpha, expected_int in ((0, a), (0.25, a), (1, b)):
        merged = weights(tmp_path / f"m{alpha}")
        assert merged.keys() == a.keys()
        for name, tensor in merged.items():
            if tensor.is_floating_point():
                want = (1 - alpha) * a[name] + alpha * b[name]
                assert np.allclose(tensor.numpy(), want.numpy(), atol=1e-6), name
            else:
                assert tensor.equal(expected_int[name]), name
    from coembed.embedder import load

    assert load(tmp_path / "m0.25", device="cpu").embed_texts(["a red circle"]).shape == (1, 32)


def test_merge_refuses_what_cannot_be_mixed(work, tmp_path):
    from coembed.checkpoint import save_model_dir
    from coembed.tokenizer import Tokenizer

    save_model_dir(tiny_clip_model(), Tokenizer.clip(context_length=12), tmp_path / "other_tok")
    out = tmp_path / "merged"
    a, b = str(work / "a"), str(work / "b")
    before = tree_snapshot(tmp_path, deep=True)
    procs = run_cli_batch(
        [
            ["merge", a, str(work / "other"), "--alpha", "0.5", "--output", str(out)],
            ["merge", a, str(tmp_path / "other_tok"), "--alpha", "0.5", "--output", str(out)],
            ["merge", a, str(tmp_path / "missing"), "--alpha", "0.5", "--output", str(out)],
            ["merge", a, b, "--alpha", "1.5", "--output", str(out)],
            ["merge", a, b, "--alpha", "0.5", "--output", a],
            ["merge", a, b, "--sweep", "0,0.5", "--output", str(out)],
            ["merge", a, b, "--sweep", "0,x", "--eval-data", a, "--reference-data", a]
            + ["--output", str(out)],
            ["merge", a, b, "--output", str(out)],
        ]
    )
    expected = [
        (1, "different architectures (embed_dim: 32 vs 16)"),
        (1, "different tokenizers"),
        (1, "not a model directory"),
        (2, "between 0 (model A) and 1"),
        (2, "is the same as model A"),
        (2, "--eval-data"),
        (2, "separated by commas"),
        (2, "one of the arguments --alpha --sweep is required"),
    ]
    for proc, (code, words) in zip(procs, expected):
        assert_one_line_error(proc, code, words)
    assert tree_changes(before, tree_snapshot(tmp_path, deep=True)) == []


def test_merge_sweep_ends_at_each_model(work, tmp_path):
    pairs, classes = str(work / "pairs" / "train.csv"), str(work / "classes_val")
    out = tmp_path / "sweep"
    sweep, eval_a, eval_b, zero_b = run_cli_batch(
        [
            ["merge", str(work / "a"), str(work / "b"), "--sweep", "0,0.5,1"]
            + ["--eval-data", pairs, "--reference-data", classes, "--output", str(out), "--json"],
            ["eval", "--model", str(work / "a"), "--data", pairs, "--json"],
            ["eval", "--model", str(work / "b"), "--data", pairs, "--json"],
            ["zeroshot", "--model", str(work / "b"), "--data", classes, "--json"],
        ]
    )
    rows = json.loads(ok(sweep).stdout)["rows"]
    assert [row["alpha"] for row in rows] == [0, 0.5, 1]
    for row, proc in ((rows[0], eval_a), (rows[2], eval_b)):
        metrics = json.loads(ok(proc).stdout)
        mean = (metrics["image_to_text_R@1"] + metrics["text_to_image_R@1"]) / 2
        assert row["eval"] == {"metric": "mean R@1", "score": mean, "metrics": metrics}
    assert rows[2]["reference"]["score"] == json.loads(ok(zero_b).stdout)["top1"]
    assert rows[0]["reference"]["metric"] == "zero-shot top-1"
    assert {p.name for p in out.iterdir()} == {"sweep.json", "sweep.csv", "sweep.png"}
    lines = (out / "sweep.csv").read_text().splitlines()
    assert lines[0] == "alpha,eval_metric,eval_score,reference_metric,reference_score"
    assert len(lines) == 4


# --- score ---------------------------------------------------------------------------------------


def scored_datasets(folder: Path) -> dict[str, Path]:
    """The same 16 pairs plus one broken image as CSV, TSV (with an extra column, images in
    a sub-folder) and JSONL (one caption list); returns {format: path}."""
    rows = list(csv.DictReader(open(folder / "pairs" / "train.csv", newline="")))
    (folder / "pairs" / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows.append({"filepath": "images/broken.png", "caption": "a broken picture"})
    sets = {"csv": folder / "pairs" / "all.csv", "tsv": folder / "pairs" / "all.tsv"}
    with open(sets["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "caption"])
        writer.writerows([(r["filepath"], r["caption"]) for r in rows])
    with open(sets["tsv"], "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["id", "filepath", "caption"])
        writer.writerows([(f"row{i}", r["filepath"], r["caption"]) for i, r in enumerate(rows)])
    sets["jsonl"] = folder / "pairs" / "all.jsonl"
    lines = [
        {"filepath": r["filepath"], "caption": r["caption"], "n": i} for i, r in enumerate(rows)
    ]
    lines[0]["caption"] = [lines[0]["caption"], "a second caption of the first picture"]
    sets["jsonl"].write_text("".join(json.dumps(line) + "\n" for line in lines))
    return sets


def test_score_writes_scores_histogram_and_filtered_copies(work, tmp_path):
    from coembed.data.formats import read_records
    from coembed.embedder import load

    sets = scored_datasets(work)
    out = tmp_path / "out"
    procs = run_cli_batch(
        [
            ["score", "--model", str(work / "a"), "--data", str(path), "--scores"]
            + [str(out / f"{kind}.scores.csv"), "--histogram", str(out / f"{kind}.png")]
            + ["--min-score", "0.0", "--output", str(out / f"filtered.{kind}"), "--json"]
            for kind, path in sets.items()
        ]
        + [["score", "--model", str(work / "a"), "--data", str(sets["csv"])]]
    )
    embedder = load(work / "a", device="cpu")
    for kind, proc in zip(sets, procs):
        summary = json.loads(ok(proc).stdout)
        assert summary["skipped_images"] == 1 and summary["format"] == kind
        scored = list(csv.DictReader(open(out / f"{kind}.scores.csv", newline="")))
        assert len(scored) == summary["pairs"] == (17 if kind == "jsonl" else 16)
        row = scored[3]
        want = embedder.embed_images([row["path"]]) @ embedder.embed_texts([row["caption"]]).T
        assert float(row["score"]) == pytest.approx(float(want[0, 0]), abs=1e-5)
        passing = {(r["path"], r["caption"]) for r in scored if float(r["score"]) >= 0.0}
        assert 0 < len(passing) < len(scored), "the threshold must split the pairs"
        records, report = read_records(str(out / f"filtered.{kind}"))
        assert report.format == kind and summary["kept"] == len(passing)
        # The filtered copy names the same image files from its own folder, and only passing pairs.
        assert {(r.image, c) for r in records for c in r.captions} == passing
        assert Image.open(out / f"{kind}.png").format == "PNG"
    header = (out / "filtered.tsv").read_text().splitlines()[0]
    assert header == "id\tfilepath\tcaption"
    assert ok(procs[-1]).stdout.startswith("path,caption,score\n")
    assert "skipped 1 unreadable images" in procs[-1].stderr


def test_score_refuses_bad_input_and_writes_nothing(work, tmp_path):
    header_only = tmp_path / "empty.csv"
    header_only.write_text("filepath,caption\n")
    (tmp_path / "kept.csv").write_text("already here\n")
    data = str(work / "pairs" / "train.csv")
    model = ["score", "--model", str(work / "a")]
    before = tree_snapshot(tmp_path, deep=True)
    procs = run_cli_batch(
        [
            [*model, "--data", data, "--min-score", "1.5", "--output", str(tmp_path / "f.csv")],
            [*model, "--data", data, "--min-score", "0.5"],
            [*model, "--data", str(header_only), "--scores", str(tmp_path / "s.csv")],
            ["score", "--model", str(tmp_path / "nope"), "--data", data],
            [*model, "--data", str(work / "pairs" / "images"), "--min-score", "0"]
            + ["--output", str(tmp_path / "f.csv")],
            [*model, "--data", data, "--scores", str(tmp_path / "kept.csv")],
            [*model, "--data", data, "--min-score", "0", "--output", data],
        ]
    )
    expected = [
        (2, "between -1 and 1"),
        (2, "--min-score and --output go together"),
        (1, "no usable image-caption pairs"),
        (1, "not a model directory"),
        (1, "no same-named .txt captions"),
        (2, "add --overwrite"),
        (2, "is the same as --data"),
    ]
    for proc, (code, words) in zip(procs, expected):
        assert_one_line_error(proc, code, words)
    assert tree_changes(before, tree_snapshot(tmp_path, deep=True)) == []


# --- dedup ---------------------------------------------------------------------------------------


def planted_vectors(folder: Path, kind: str, n: int = 60, seed: int = 0) -> tuple[Path, dict]:
    """An index (of ``kind``) over ``n`` random unit vectors plus planted near-copies of the
    first ten and an exact file copy of item 0 (with a different vector); returns the index
    and what was planted."""
    from coembed.index import Index

    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, 16)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    near = base[:10] + rng.normal(size=(10, 16)).astype(np.float32) * 0.03
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    lone = rng.normal(size=(1, 16)).astype(np.float32)
    vectors = np.concatenate([base, near, lone / np.linalg.norm(lone)])
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(len(vectors)):
        path = images / f"{i:03d}.png"
        Image.new("RGB", (8, 8), (i, 255 - i, (7 * i) % 256)).save(path)
        items.append(str(path))
    shutil.copyfile(items[0], items[-1])  # the same bytes, whatever its vector says
    Index.from_vectors(vectors, items, kind).save(folder / f"index-{kind}")
    planted = {"near": [(i, n + i) for i in range(10)], "exact": (0, len(vectors) - 1)}
    return folder / f"index-{kind}", {**planted, "vectors": vectors, "items": items}


def groups_of(path: Path) -> dict[str, int]:
    return {row["path"]: int(row["group"]) for row in csv.DictReader(open(path, newline=""))}


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_dedup_matches_brute_force_and_writes_its_folder(tmp_path, kind):
    index, planted = planted_vectors(tmp_path, kind)
    out = tmp_path / "dedup"
    (proc,) = run_cli_batch(
        [["dedup", "--index", str(index), "--threshold", "0.9", "--output", str(out), "--json"]]
    )
    summary = json.loads(ok(proc).stdout)
    vectors, items = planted["vectors"], planted["items"]
    sims = vectors @ vectors.T
    brute = {(i, j) for i, j in zip(*np.nonzero(np.triu(sims >= 0.9, k=1)))}
    assert set(planted["near"]) <= brute  # the planted copies are close, the rest far apart
    assert summary["near_pairs"] == len(brute) and summary["exact_pairs"] == 1
    group = groups_of(out / "groups.csv")
    found = {(i, j) for i, j in brute if group.get(items[i], -1) == group.get(items[j], -2)}
    assert found == brute
    a, b = planted["exact"]
    assert group[items[a]] == group[items[b]]
    rows = list(csv.DictReader(open(out / "groups.csv", newline="")))
    assert {r["match"] for r in rows if r["path"] == items[b]} == {"exact"}
    keep = (out / "keep.txt").read_text().splitlines()
    drop = (out / "drop.txt").read_text().splitlines()
    assert sorted(keep + drop) == sorted(items) and len(drop) == summary["duplicates"]
    assert items[0] in keep and items[b] in drop and items[60] in drop
    assert Image.open(out / "groups.png").size[1] > 100
    assert summary["search"] == ("range" if kind == "flat" else "knn@16")


def test_dedup_refuses_bad_input_and_writes_nothing(tmp_path):
    index, _ = planted_vectors(tmp_path, "flat", n=20)
    before = tree_snapshot(tmp_path, deep=True)
    procs = run_cli_batch(
        [
            ["dedup", "--index", str(index), "--threshold", "1.5"],
            ["dedup", "--index", str(index), "--threshold", "0"],
            ["dedup", "--index", str(tmp_path / "nope")],
            ["dedup", "--index", str(index), "--output", str(index / "dups")],
            ["dedup", "--index", str(index), "--output", str(tmp_path / "images")],
            ["dedup", "--index", str(index), "--k", "0"],
        ]
    )
    expected = [
        (2, "at most 1"),
        (2, "above 0"),
        (1, "no such index directory"),
        (2, "inside --index"),
        (2, "not part of a dedup output"),
        (2, "--k must be at least 1"),
    ]
    for proc, (code, words) in zip(procs, expected):
        assert_one_line_error(proc, code, words)
    assert tree_changes(before, tree_snapshot(tmp_path, deep=True)) == []


# --- filter --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_index(tmp_path_factory) -> Path:
    from tests.helpers import build_served_index

    return build_served_index(tmp_path_factory.mktemp("filter"))


def test_filter_equals_brute_force(image_index, tmp_path):
    from coembed.curate.dedup import index_vectors
    from coembed.index import Index

    index = Index.load(image_index, device="cpu")
    query = index.query_vector("a red circle")[0]
    scores = index_vectors(index) @ query
    threshold = float(np.sort(scores)[-5])  # five items reach it
    base = ["filter", "--index", str(image_index), "--query", "a red circle"]
    above, best, written = run_cli_batch(
        [
            [*base, "--min-score", str(threshold - 1e-6), "--json"],
            [*base, "--k", "3", "--json"],
            [*base, "--min-score", "-1", "--output", str(tmp_path / "all.csv")],
        ]
    )
    hits = json.loads(ok(above).stdout)["results"]
    assert [h["id"] for h in hits] == list(np.argsort(-scores, kind="stable")[:5])
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert [h["item"] for h in json.loads(ok(best).stdout)["results"]] == [
        item for item, _ in index.search("a red circle", k=3)
    ]
    rows = list(csv.DictReader(open(tmp_path / "all.csv", newline="")))
    assert len(rows) == 12 and list(rows[0]) == ["rank", "score", "item", "caption"]
    assert "12 items match" in ok(written).stdout


def test_filter_refuses_bad_input_and_writes_nothing(image_index, tmp_path):
    (tmp_path / "taken.csv").write_text("mine\n")
    before = tree_snapshot(tmp_path, deep=True)
    base = ["filter", "--index", str(image_index)]
    procs = run_cli_batch(
        [
            [*base, "--query", "a red circle", "--min-score", "1.5"],
            [*base, "--query", "a red circle"],
            [*base, "--query", "a red circle", "--k", "0"],
            [*base, "--min-score", "0.5"],
            [*base, "--query", "x", "--k", "2", "--min-score", "0.1"],
            ["filter", "--index", str(tmp_path / "nope"), "--query", "x", "--k", "2"],
            [*base, "--query", "x", "--k", "2", "--output", str(tmp_path / "taken.csv")],
            [*base, "--image", str(tmp_path / "missing.png"), "--k", "2"],
        ]
    )
    expected = [
        (2, "between -1 and 1"),
        (2, "--min-score --k is required"),
        (2, "at least 1"),
        (2, "give a text query or --image"),
        (2, "not allowed with argument"),
        (1, "no such index directory"),
        (2, "add --overwrite"),
        (None, "missing.png"),
    ]
    for proc, (code, words) in zip(procs, expected):
        assert_one_line_error(proc, code, words)
    assert tree_changes(before, tree_snapshot(tmp_path, deep=True)) == []


def test_filter_endpoint_equals_the_library(image_index):
    from fastapi.testclient import TestClient

    from coembed.curate.filter import filter_index
    from coembed.serve.app import create_app

    library = filter_index(image_index, "a red circle", min_score=-1.0, k=4).hits
    with TestClient(create_app(image_index)) as client:
        answer = client.post("/filter", json={"text": "a red circle", "min_score": -1, "k": 4})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert [r["id"] for r in body["results"]] == [h["id"] for h in library]
        assert body["count"] == 4 and body["truncated"] is True
        everything = client.post("/filter", json={"query": "a red circle", "min_score": -1}).json()
        assert everything["count"] == 12 and everything["truncated"] is False
        like = client.post("/filter", json={"id": 3, "min_score": 0.99, "k": 1}).json()
        assert like["results"][0]["id"] == 3 and like["results"][0]["score"] >= 0.99
        for body, status, words in (
            ({"text": "x"}, 400, "min_score"),
            ({"text": "x", "min_score": 1.5}, 422, "min_score"),
            ({"text": "x", "k": 0}, 422, "k"),
            ({"text": "x", "id": 1, "k": 2}, 400, "exactly one"),
            ({"text": "x", "k": 2, "path": "/etc"}, 422, "path"),
        ):
            answer = client.post("/filter", json=body)
            assert answer.status_code == status and words in answer.json()["error"], answer.text
        assert client.get("/health").status_code == 200  # still serving


def test_classify_endpoint_serves_a_probe_of_the_index_model(work, image_index, tmp_path):
    import base64

    from fastapi.testclient import TestClient

    from coembed.curate.dedup import index_vectors
    from coembed.curate.probe import LinearProbe
    from coembed.errors import ModelDirError
    from coembed.index import Index
    from coembed.serve.app import create_app

    data = ["--train-data", str(work / "classes_train"), "--val-data", str(work / "classes_val")]
    procs = run_cli_batch(
        [
            ["probe", "--model", str(model), *data, "--output", str(tmp_path / name)]
            for model, name in ((image_index.parent / "model", "mine"), (work / "b", "theirs"))
        ]
    )
    for proc in procs:
        ok(proc)
    probe = LinearProbe.load(tmp_path / "mine")
    index = Index.load(image_index, device="cpu")
    expected = probe.probabilities(index_vectors(index)[3:4])[0]
    with TestClient(create_app(image_index, classifier=tmp_path / "mine")) as client:
        answer = client.post("/classify", json={"id": 3, "k": 3})
        assert answer.status_code == 200, answer.text
        classes = answer.json()["classes"]
        order = np.argsort(-expected, kind="stable")[:3]
        assert [c["label"] for c in classes] == [probe.classnames[i] for i in order]
        assert [c["probability"] for c in classes] == pytest.approx(expected[order], abs=1e-5)
        image = base64.b64encode(Path(index.items[3]).read_bytes()).decode()
        by_image = client.post("/classify", json={"image": image, "k": 3}).json()["classes"]
        assert [c["label"] for c in by_image] == [c["label"] for c in classes]
        for body, status in (({"id": 3, "image": image}, 400), ({"id": 3, "k": 0}, 422)):
            assert client.post("/classify", json=body).status_code == status
    with TestClient(create_app(image_index)) as client:
        answer = client.post("/classify", json={"id": 3})
        assert answer.status_code == 404 and "--classifier" in answer.json()["error"]
    with pytest.raises(ModelDirError, match="another model"):
        create_app(image_index, classifier=tmp_path / "theirs")


# --- with a trained tiny model (slow) ------------------------------------------------------------

ROWS, COLUMNS = ("top", "middle", "bottom"), ("left", "centre", "right")


def scene(seed: int, i: int, objects: int | None = None):
    """A 64 px picture of 2-4 objects on a 3x3 grid, and its caption naming every one."""
    from coembed.datasets.synthetic import COLOURS, SHAPES, TEXTURES, Thing, render

    rng = np.random.default_rng([seed, i])
    n = objects or int(rng.integers(2, 5))
    things, words = [], []
    for cell in rng.choice(9, n, replace=False):
        row, column = divmod(int(cell), 3)
        shape, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
        texture = str(rng.choice(TEXTURES))
        x = (column + 0.5) / 3 + rng.uniform(-0.05, 0.05)
        y = (row + 0.5) / 3 + rng.uniform(-0.05, 0.05)
        things.append(Thing(shape, colour, texture, x, y, rng.uniform(0.09, 0.14)))
        words.append(f"{colour} {texture} {shape} {ROWS[row]} {COLUMNS[column]}")
    return render(things, 64, rng), ", ".join(words)


def near_copy(image: Image.Image, kind: str, rng: np.random.Generator | None = None):
    """A near-duplicate: resized, re-encoded as JPEG, slightly cropped or colour-shifted (the
    fixed amounts of the test, or random ones with ``rng``, for training)."""
    r = (
        (lambda lo, hi, fixed: fixed)
        if rng is None
        else (lambda lo, hi, fixed: rng.uniform(lo, hi))
    )
    if kind == "resize":
        side = int(64 * r(0.75, 1.5, 1.5))
        return image.resize((side, side), Image.BICUBIC)
    if kind == "jpeg":
        out = io.BytesIO()
        image.save(out, "JPEG", quality=int(r(60, 90, 75)))
        return Image.open(io.BytesIO(out.getvalue())).convert("RGB")
    if kind == "crop":
        m = [int(round(r(0.5, 4, 2))) for _ in range(4)]  # 2 px of 64: 3% a side
        return image.crop((m[0], m[1], 64 - m[2], 64 - m[3]))
    # Saturation and brightness: a hue shift would change the colour words the model reads.
    saturated = ImageEnhance.Color(image).enhance(r(0.8, 1.2, 0.9))
    return ImageEnhance.Brightness(saturated).enhance(r(0.9, 1.1, 1.05))


KINDS = ("resize", "jpeg", "crop", "colour")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny model trained for 300 steps on 1,024 scenes described in full, each with a
    near-copy (random amounts) under the same caption; about a minute on two cores."""
    import coembed

    root = tmp_path_factory.mktemp("trained")
    (root / "images").mkdir()
    rows = []
    for i in range(1024):
        image, caption = scene(1, i)
        image.save(root / "images" / f"{i:04d}.png")
        copy = near_copy(image, KINDS[i % 4], np.random.default_rng([9, i]))
        copy.save(root / "images" / f"{i:04d}-copy.png")
        rows += [(f"images/{i:04d}.png", caption), (f"images/{i:04d}-copy.png", caption)]
    with open(root / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([("filepath", "caption"), *rows])
    config = tiny_config(
        *TINY_SET,
        "model.embed_dim=128",
        "model.text.context_length=32",
        "train.batch_size=64",
        "train.steps=300",
        "train.lr=2e-3",
        "train.warmup_steps=20",
        *CONTRASTIVE_ONLY,  # the contrastive pair alone, which the thresholds here were set on
    )
    coembed.train(config, root / "train.csv", root / "model", device="cpu")
    return root / "model"


@pytest.mark.slow
def test_dedup_finds_planted_near_duplicates(trained, tmp_path):
    """240 distinct scenes the model never saw, 60 planted near-copies (15 of each kind) and
    5 exact file copies: at least 95% of planted pairs found, at most 1% false pairs."""
    folder = tmp_path / "images"
    folder.mkdir()
    planted = []
    for i in range(240):
        image, _ = scene(2, i, objects=3 + i % 2)
        image.save(folder / f"{i:03d}.png")
        if i < 60:
            kind = KINDS[i % 4]
            suffix = "jpg" if kind == "jpeg" else "png"
            near_copy(image, kind).save(folder / f"{i:03d}-{kind}.{suffix}", quality=95)
            planted.append((f"{i:03d}.png", f"{i:03d}-{kind}.{suffix}", kind))
        elif i < 65:
            shutil.copyfile(folder / f"{i:03d}.png", folder / f"{i:03d}-exact.png")
            planted.append((f"{i:03d}.png", f"{i:03d}-exact.png", "exact"))
    index, out = tmp_path / "index", tmp_path / "dedup"
    build, dedup = run_cli_batch(
        [
            ["index", "--model", str(trained), "--images", str(folder), "--output", str(index)],
            ["dedup", "--index", str(index), "--threshold", "0.92", "--output", str(out), "--json"],
        ]
    )
    ok(build)
    ok(dedup)
    group = {Path(p).name: g for p, g in groups_of(out / "groups.csv").items()}
    found = [group.get(a, -1) == group.get(b, -2) for a, b, _ in planted]
    recall = float(np.mean(found))
    partner = {a: b for a, b, _ in planted} | {b: a for a, b, _ in planted}
    members: dict[int, list[str]] = {}
    for name, g in group.items():
        members.setdefault(g, []).append(name)
    false_pairs = sum(
        1
        for names in members.values()
        for x in range(len(names))
        for y in range(x + 1, len(names))
        if partner.get(names[x]) != names[y]
    )
    n = 240 + len(planted)
    distinct_pairs = n * (n - 1) // 2 - len(planted)
    falsely_grouped = sum(
        1
        for names in members.values()
        for name in names
        if len(names) > 2 or partner.get(name) not in names
    )
    from coembed.curate.dedup import index_vectors
    from coembed.index import Index

    loaded = Index.load(index, device="cpu")
    row = {Path(item).name: i for i, item in enumerate(loaded.items)}
    sims = index_vectors(loaded) @ index_vectors(loaded).T
    pair_sims = [sims[row[a], row[b]] for a, b, kind in planted if kind != "exact"]
    strangers = np.ones_like(sims, bool)
    for a, b, _ in planted:
        strangers[row[a], row[b]] = strangers[row[b], row[a]] = False
    np.fill_diagonal(strangers, False)
    print(
        f"dedup: planted near-copies score {min(pair_sims):.3f} and up, distinct pictures up to "
        f"{sims[strangers].max():.3f} (99.9th percentile {np.quantile(sims[strangers], 0.999):.3f})"
    )
    print(
        f"dedup: planted pairs found {sum(found)}/{len(planted)} ({recall:.1%}); "
        f"false pairs {false_pairs}/{distinct_pairs} ({false_pairs / distinct_pairs:.3%}); "
        f"images grouped with a stranger {falsely_grouped}/{n}; "
        f"by kind: {dict((k, sum(f for f, p in zip(found, planted) if p[2] == k)) for k in KINDS + ('exact',))}"
    )
    assert recall >= 0.95
    assert false_pairs / distinct_pairs <= 0.01
    assert all(f for f, p in zip(found, planted) if p[2] == "exact")


@pytest.mark.slow
def test_probe_beside_zeroshot_on_a_trained_model(trained, tmp_path):
    """The figure of the closing note: probe accuracy beside zero-shot's on the same images."""
    from coembed.datasets.synthetic import generate_shapes

    generate_shapes(tmp_path / "train", n_per_class=12, seed=0)
    generate_shapes(tmp_path / "val", n_per_class=8, seed=1)
    (proc,) = run_cli_batch(
        [
            ["probe", "--model", str(trained), "--train-data", str(tmp_path / "train")]
            + ["--val-data", str(tmp_path / "val"), "--output", str(tmp_path / "probe"), "--json"]
        ]
    )
    result = json.loads(ok(proc).stdout)
    print(
        f"probe: {result['classes']} classes, {result['images']['train']} training images, "
        f"L2 {result['l2']:g}; on {result['images']['evaluated']} validation images: "
        f"probe top-1 {result['top1']:.3f} top-5 {result['top5']:.3f}, "
        f"zero-shot top-1 {result['zeroshot_top1']:.3f} top-5 {result['zeroshot_top5']:.3f}"
    )
    assert result["top1"] > max(result["zeroshot_top1"], 3 / 16)


@pytest.mark.slow
def test_merge_sweep_between_a_model_and_its_fine_tuned_copy(trained, tmp_path):
    """The figure of the closing note: A (trained on scenes) fine-tuned on the shipped pictures
    into B; each alpha measured on the shipped pictures (new) and on unseen scenes (old)."""
    import coembed
    from tests.helpers import SHIPPED, shipped_rows, write_csv

    new_train = write_csv(
        tmp_path / "new_train.csv",
        [(str(SHIPPED / "images" / name), text) for name, text in shipped_rows(1000)],
    )
    new_val = write_csv(
        tmp_path / "new_val.csv",
        [(str(SHIPPED / "images" / name), text) for name, text in shipped_rows(200, "val")],
    )
    (tmp_path / "old").mkdir()
    old_rows = []
    for i in range(200):
        image, caption = scene(3, i)
        image.save(tmp_path / "old" / f"{i:03d}.png")
        old_rows.append((f"old/{i:03d}.png", caption))
    old_val = write_csv(tmp_path / "old_val.csv", old_rows)
    config = tiny_config(*TINY_SET, "train.batch_size=64", "train.steps=120", "train.lr=1e-3")
    coembed.train(config, new_train, tmp_path / "b", device="cpu", init=str(trained))
    (proc,) = run_cli_batch(
        [
            ["merge", str(trained), str(tmp_path / "b"), "--sweep", "0,0.25,0.5,0.75,1"]
            + ["--eval-data", str(new_val), "--reference-data", str(old_val)]
            + ["--output", str(tmp_path / "sweep"), "--json"]
        ]
    )
    sweep = json.loads(ok(proc).stdout)
    table = ", ".join(
        f"{row['alpha']:g}: new {row['eval']['score']:.3f} / old {row['reference']['score']:.3f}"
        for row in sweep["rows"]
    )
    print(f"merge sweep (mean R@1; alpha: new / old): {table}; best alpha {sweep['best_alpha']:g}")
    first, last = sweep["rows"][0], sweep["rows"][-1]
    assert last["eval"]["score"] > first["eval"]["score"]  # fine-tuning learnt the new data
    assert first["reference"]["score"] > last["reference"]["score"]  # and forgot some old
    assert Image.open(tmp_path / "sweep" / "sweep.png").size[0] > 500
