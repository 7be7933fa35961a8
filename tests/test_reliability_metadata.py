"""Damaged metadata, values out of range, and data silently lost in parsing, kind by kind,
through the command line, the Python API and the server.

Every row of the tables is one bad input and what coembed must do with it: one clear line and
exit code 1 or 2 on the command line, one ``CoembedError`` in Python, a server that refuses to
start on what it cannot serve correctly; or, for output, names printed on one visible line and
counts where they were missing. The inputs (models, indexes, run folders, datasets) are
snapshotted (kind, size, mtime, inode) around every case and must not change.

The command-line cases run the real ``coembed`` entry point, several cases per interpreter (the
torch import dominates), two interpreters at a time.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import (
    REPO,
    TINY_SET,
    assert_one_line_error,
    make_images,
    run_cli_cases,
    shipped_rows,
    tiny_clip_model,
    write_csv,
)


@dataclass
class Case:
    kind: str  # the kind of bad input
    name: str
    run: object  # argv (CLI) or a function of the world (API, HTTP)
    expect: object = None  # exit code / exception type / None for "must succeed"
    contains: str = ""
    check: Callable | None = None  # more assertions: (stdout, world) for the CLI, result for API
    surface: str = ""
    id: str = field(init=False, default="")


def cli(kind, name, argv, code, contains="", check=None) -> Case:
    return Case(kind, name, argv, code, contains, check, surface="cli")


def api(kind, name, fn, error=None, contains="", check=None) -> Case:
    return Case(kind, name, fn, error, contains, check, surface="api")


def http(kind, name, fn, error, contains="") -> Case:
    return Case(kind, name, fn, error, contains, surface="http")


# --- the world: a model, an index, a run folder, datasets, and damaged copies of each ------------

PROTECTED = ("model", "models", "images", "named", "idx", "runs", "data")
LONG_CAPTION = "a very long caption " * 80  # 1,600 characters: cut to 1,000


def edit_json(path: Path, change: Callable) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def with_key(key: str, value) -> Callable:
    return lambda v: {**v, key: value}


def without(key: str) -> Callable:
    return lambda v: {k: x for k, x in v.items() if k != key}


def nested(key: str, change: Callable) -> Callable:
    return lambda v: {**v, key: change(v[key])}


def set_tensor(folder: Path, name: str, value: float) -> None:
    """Fill tensor ``name`` of folder/model.safetensors with ``value``, metadata kept."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    tensors[name] = torch.full_like(tensors[name], value)
    save_file(tensors, str(path), metadata=metadata)


def damaged_models(root: Path, model: Path) -> None:
    models = root / "models"
    damage = {
        "layers_not_a_list": lambda d: edit_json(
            d / "config.json",
            nested("model", nested("image", with_key("layers", "[1, 1"))),
        ),
        "config_not_utf8": lambda d: (d / "config.json").write_bytes(b'{"model": "\xff"}'),
        "version_true": lambda d: edit_json(d / "config.json", with_key("format_version", True)),
        "embed_dim_20_digits": lambda d: edit_json(
            d / "config.json", nested("model", with_key("embed_dim", 12345678901234567890))
        ),
        "preprocess_list": lambda d: (d / "preprocess.json").write_text("[224]"),
        "preprocess_null": lambda d: (d / "preprocess.json").write_text("null"),
        "preprocess_not_utf8": lambda d: (d / "preprocess.json").write_bytes(b"\xff\xfe{}"),
        "nan_weights": lambda d: set_tensor(d, "text.token_embedding.weight", float("nan")),
        "inf_scale": lambda d: set_tensor(d, "logit_scale", float("inf")),
    }
    for name, change in damage.items():
        shutil.copytree(model, models / name)
        change(models / name)


def rewrite_faiss(folder: Path, make: Callable) -> None:
    from coembed.index.kinds import import_faiss

    faiss = import_faiss()
    path = next(folder.glob("index-*.faiss"))
    index = make(faiss)
    index.add(np.random.default_rng(0).standard_normal((12, index.d)).astype(np.float32))
    faiss.write_index(index, str(path))


def damaged_indexes(idx: Path) -> None:
    def manifest(change: Callable) -> Callable:
        return lambda d: edit_json(d / "index.json", change)

    def items(change: Callable) -> Callable:
        return lambda d: edit_json(next(d.glob("items-*.json")), change)

    damage = {
        "no_files": manifest(without("files")),
        "faiss_name_int": manifest(nested("files", with_key("faiss", 7))),
        "faiss_outside": manifest(nested("files", with_key("faiss", "../good/index.faiss"))),
        "kind_unknown": manifest(with_key("kind", "annoy")),
        "params_list": manifest(with_key("params", [32])),
        "model_list": manifest(with_key("model", ["model"])),
        "copy_outside": manifest(nested("model", with_key("copy", "../../model"))),
        "no_modality": manifest(without("modality")),
        "count_string": manifest(with_key("count", "12")),
        "dim_disagrees": manifest(with_key("dim", 16)),
        "items_list": items(lambda v: v["items"]),
        "items_numbers": items(with_key("items", list(range(12)))),
        "captions_short": items(with_key("captions", [])),
        "skipped_number": items(with_key("skipped", 3)),
        "faiss_16_dim": lambda d: rewrite_faiss(d, lambda f: f.IndexFlatIP(16)),
        "faiss_hnsw": lambda d: rewrite_faiss(
            d, lambda f: f.IndexHNSWFlat(32, 8, f.METRIC_INNER_PRODUCT)
        ),
        "faiss_l2": lambda d: rewrite_faiss(d, lambda f: f.IndexFlatL2(32)),
        "copy_nan_weights": lambda d: set_tensor(
            next(d.glob("model-*")), "text.token_embedding.weight", float("nan")
        ),
    }
    for name, change in damage.items():
        shutil.copytree(idx / "good", idx / name)
        change(idx / name)


def damaged_runs(runs: Path) -> None:
    from safetensors.torch import load_file, save_file

    step = "checkpoints/step-0000001"

    def run_config(change: Callable) -> Callable:
        return lambda d: edit_json(d / "run_config.json", change)

    def state(change: Callable) -> Callable:
        return lambda d: edit_json(d / step / "state.json", change)

    def rng_without_cpu(d: Path) -> None:
        save_file({"other": torch.zeros(3)}, str(d / step / "rng.safetensors"))

    def optimizer_renamed(d: Path) -> None:
        path = d / step / "optimizer.safetensors"
        save_file({f"x{k}": v for k, v in load_file(str(path)).items()}, str(path))

    damage = {
        "config_cut": lambda d: (d / "run_config.json").write_text(
            (d / "run_config.json").read_text()[:200]
        ),
        "config_list": run_config(lambda v: [v]),
        "config_missing": run_config(without("config")),
        "train_data_number": run_config(with_key("train_data", 5)),
        "requested_string": run_config(with_key("requested_config", "tiny")),
        "state_list": state(lambda v: [v]),
        "step_string": state(with_key("step", "one")),
        "step_not_folder": state(with_key("step", 1000)),
        "no_optimizer": state(without("optimizer")),
        "param_groups_number": state(nested("optimizer", with_key("param_groups", 2))),
        "rng_without_cpu": rng_without_cpu,
        "optimizer_renamed": optimizer_renamed,
    }
    for name, change in damage.items():
        shutil.copytree(runs / "good", runs / name)
        change(runs / name)


def datasets(data: Path, rows: list[tuple[str, str]]) -> None:
    """Dataset files, each with one problem; images are in data/images."""
    good = [f"images/{a},{b}" for a, b in rows]
    header = "filepath,caption"

    def table(name: str, lines: list[str]) -> None:
        (data / name).write_text("\n".join(lines) + "\n")

    table("open_quote.csv", [header, good[0].replace(",", ',"', 1), *good[1:]])
    stray = [good[0].replace(",", ',"', 1), *good[1:3], good[3].replace(",", ',"', 1) + ' tall"']
    table("open_quote_closed_later.csv", [header, *stray, *good[4:]])
    tsv = [line.replace(",", "\t", 1) for line in good]
    table("open_quote.tsv", ["filepath\tcaption", tsv[0].replace("\t", '\t"', 1), *tsv[1:]])
    table("two_line_caption.csv", [header, good[0].replace(",", ',"two\nlines, ', 1) + '"'])
    table("semicolon.csv", ["filepath;caption", *[line.replace(",", ";", 1) for line in good]])
    table("semicolon_image.csv", ["image;text", *[line.replace(",", ";", 1) for line in good]])
    table("nul_path.csv", [header, "images/a\0b.png,a caption", *good])
    table("long_caption.csv", [header, f"{good[0].split(',')[0]},{LONG_CAPTION}", *good[1:]])
    coco = {
        "images": [{"id": i, "file_name": f"images/{a}"} for i, (a, _) in enumerate(rows)],
        "annotations": [{"image_id": i, "caption": b} for i, (_, b) in enumerate(rows)],
    }
    wrong_coco = {
        "coco_image_string": {**coco, "images": ["images/a.png"]},
        "coco_file_name_number": {**coco, "images": [{"id": 0, "file_name": 7}]},
        "coco_id_list": {**coco, "images": [{"id": [0], "file_name": "images/a.png"}]},
        "coco_caption_number": {**coco, "annotations": [{"image_id": 0, "caption": 5}]},
        "coco_annotation_string": {**coco, "annotations": ["a red circle"]},
    }
    entry = {"filename": rows[0][0], "filepath": "images", "split": "test", "imgid": 0}
    entry["sentences"] = [{"raw": rows[0][1]}]
    wrong_karpathy = {
        "karpathy_image_string": [entry, "images/a.png"],
        "karpathy_filename_number": [{**entry, "filename": 3}],
        "karpathy_sentences_string": [{**entry, "sentences": "a caption"}],
        "karpathy_raw_number": [{**entry, "sentences": [{"raw": 4}]}],
        "karpathy_split_list": [{**entry, "split": ["test"]}],
    }
    for name, value in wrong_coco.items():
        (data / f"{name}.json").write_text(json.dumps(value))
    for name, images in wrong_karpathy.items():
        (data / f"{name}.json").write_text(json.dumps({"images": images}))
    jsonl = {"jsonl_caption_object": {"caption": {"en": "x"}}, "jsonl_path_number": {"filepath": 5}}
    for name, change in jsonl.items():
        row = {"filepath": f"images/{rows[0][0]}", "caption": "fine", **change}
        (data / f"{name}.jsonl").write_text(json.dumps(row) + "\n")
    templates = {
        "two_slots": "a photo of a {} next to a {}.",
        "format_code": "a photo of a {:d}.",
        "named_slot": "a photo of a {name}.",
        "lone_brace": "a photo of a { thing}.",
    }
    for name, text in templates.items():
        (data / f"templates_{name}.txt").write_text(f"a {{}}.\n{text}\n")


def named_images(root: Path) -> None:
    """Images whose file names hold a newline and a terminal escape, a class folder likewise,
    and their index."""
    from coembed.embedder import load
    from coembed.index import Index

    named = root / "named"
    make_images(named / "plain")
    folder = named / "odd"
    folder.mkdir()
    for i, odd in enumerate(["line\nbreak", "esc\x1b[2Jape", "tab\there"]):
        shutil.copyfile(sorted((named / "plain").iterdir())[i], folder / f"{odd}.png")
    classes = named / "classes"
    for name in ("red\x1b[31m", "blue"):
        make_images(classes / name)
    Index.build(load(root / "model", device="cpu"), images=folder, progress=False).save(
        named / "index"
    )


@dataclass
class World:
    root: Path
    paths: dict[str, str]

    def __getitem__(self, key: str) -> Path:
        return Path(self.paths[key])


def build_world(root: Path) -> World:
    import coembed
    from coembed.checkpoint import save_model_dir
    from coembed.config import load_config
    from coembed.index import Index
    from coembed.tokenizer import Tokenizer

    model = save_model_dir(tiny_clip_model(), Tokenizer.clip(context_length=16), root / "model")
    damaged_models(root, model)
    make_images(root / "images")
    idx = root / "idx"
    embedder = coembed.load(model, device="cpu")
    Index.build(embedder, images=root / "images", progress=False).save(idx / "good")
    damaged_indexes(idx)
    data = root / "data"
    rows = shipped_rows(8)
    (data / "images").mkdir(parents=True)
    for name, _ in rows:
        shutil.copyfile(REPO / "data" / "synthetic" / "images" / name, data / "images" / name)
    write_csv(data / "train.csv", [(f"images/{a}", b) for a, b in rows])
    datasets(data, rows)
    named_images(root)
    settings = [*TINY_SET, "train.steps=1", "train.checkpoint_every=1", "train.batch_size=4"]
    coembed.train(
        load_config("tiny", settings),
        str(data / "long_caption.csv"),
        root / "runs" / "good",
        device="cpu",
    )
    damaged_runs(root / "runs")
    (root / "scratch").mkdir()
    paths = {p.name: str(p) for p in root.iterdir()}
    paths.update({"data": str(data), "named": str(root / "named")})
    return World(root, paths)


def snapshot(root: Path) -> dict[str, tuple]:
    """Kind, size, mtime and inode of every input under the protected parts of ``root``: each
    model, index, run folder and dataset, whole. (Not the folders holding them: a writer's lock
    file, ``.<name>.lock``, comes and goes beside what it locks.)"""
    out = {}
    for top in PROTECTED:
        for item in (root / top).iterdir():
            if item.name.endswith(".lock"):
                continue
            for path in sorted([item, *item.rglob("*")]):
                st = path.lstat()
                key = str(path.relative_to(root))
                out[key] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def changed(before: dict, after: dict) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return build_world(tmp_path_factory.mktemp("metadata"))


@pytest.fixture
def unchanged(world):
    """Fails the test if it changed anything protected."""
    before = snapshot(world.root)
    yield
    assert changed(before, snapshot(world.root)) == []


# --- the command line -----------------------------------------------------------------------------

EVAL = ["eval", "--device", "cpu", "--data", "{data}/train.csv", "--model"]
EVAL_DATA = ["eval", "--device", "cpu", "--model", "{model}", "--data"]
SEARCH = ["search", "--device", "cpu", "red", "--index"]
RESUME = ["train", "--resume", "--train-data", "{data}/long_caption.csv", "--device", "cpu"]
TRAIN = ["train", "--train-data", "{data}/train.csv", "--device", "cpu", "--steps", "1"]
TRAIN += ["--output", "{scratch}/{case}"]
ZEROSHOT = ["zeroshot", "--device", "cpu", "--model", "{model}", "--data", "{named}/classes"]


def resume(run: str) -> list[str]:
    return [*RESUME, "--output", f"{{runs}}/{run}"]


def json_count(key: str, value) -> Callable:
    def check(stdout: str, world: World) -> None:
        assert json.loads(stdout)[key] == value, stdout

    return check


def one_line_per_hit(count: int, *escaped: str) -> Callable:
    def check(stdout: str, world: World) -> None:
        lines = stdout.splitlines()
        assert len(lines) == count, stdout
        for text in escaped:
            assert text in stdout, stdout
        assert "\x1b" not in stdout and "\t" not in stdout

    return check


def summary_on_one_line(stdout: str, world: World) -> None:
    assert len(stdout.splitlines()) == 1 and "out\\nput" in stdout, stdout


def class_escaped(stdout: str, world: World) -> None:
    assert "red\\x1b[31m" in stdout and "\x1b" not in stdout, stdout


# fmt: off
CLI_CASES = [
    # 5. metadata validated, not trusted
    cli("damaged config.json", "layers not a list", [*EVAL, "{models}/layers_not_a_list"], 1, "model.image.layers"),
    cli("damaged config.json", "not UTF-8", [*EVAL, "{models}/config_not_utf8"], 1, "utf-8"),
    cli("damaged config.json", "format version true", [*EVAL, "{models}/version_true"], 1, "format version"),
    cli("damaged preprocess.json", "a list", [*EVAL, "{models}/preprocess_list"], 1, "expected an object"),
    cli("damaged preprocess.json", "null", [*EVAL, "{models}/preprocess_null"], 1, "preprocess.json"),
    cli("damaged preprocess.json", "not UTF-8", [*EVAL, "{models}/preprocess_not_utf8"], 1, "utf-8"),
    cli("non-finite weights", "NaN tensor", [*EVAL, "{models}/nan_weights"], 1, "text.token_embedding.weight"),
    cli("non-finite weights", "infinite scale", [*EVAL, "{models}/inf_scale"], 1, "logit_scale"),
    cli("non-finite weights", "index's model copy", [*SEARCH, "{idx}/copy_nan_weights"], 1, "NaN"),
    cli("damaged run_config.json", "cut short before --resume", resume("config_cut"), 1, "run_config.json: not valid JSON"),
    cli("damaged run_config.json", "a list", resume("config_list"), 1, "expected an object"),
    cli("damaged run_config.json", "no config", resume("config_missing"), 1, "config: missing"),
    cli("damaged run_config.json", "train_data a number", resume("train_data_number"), 1, "train_data"),
    cli("damaged run_config.json", "requested_config a string", resume("requested_string"), 1, "requested_config"),
    cli("damaged training state", "state.json a list", resume("state_list"), 1, "state.json"),
    cli("damaged training state", "step a string", resume("step_string"), 1, "step"),
    cli("damaged training state", "step of another folder", resume("step_not_folder"), 1, "not the step of its folder"),
    cli("damaged training state", "no optimizer", resume("no_optimizer"), 1, "optimizer: missing"),
    cli("damaged training state", "param_groups a number", resume("param_groups_number"), 1, "param_groups"),
    cli("damaged training state", "RNG without the CPU state", resume("rng_without_cpu"), 1, "rng.safetensors"),
    cli("damaged training state", "optimizer tensors renamed", resume("optimizer_renamed"), 1, "optimizer"),
    cli("damaged index.json", "no files", [*SEARCH, "{idx}/no_files"], 1, "files: missing"),
    cli("damaged index.json", "faiss name a number", [*SEARCH, "{idx}/faiss_name_int"], 1, "files.faiss"),
    cli("damaged index.json", "faiss file outside", [*SEARCH, "{idx}/faiss_outside"], 1, "files.faiss"),
    cli("damaged index.json", "unknown kind", [*SEARCH, "{idx}/kind_unknown"], 1, "annoy"),
    cli("damaged index.json", "params a list", [*SEARCH, "{idx}/params_list"], 1, "params"),
    cli("damaged index.json", "model a list", [*SEARCH, "{idx}/model_list"], 1, "model"),
    cli("damaged index.json", "model copy outside", [*SEARCH, "{idx}/copy_outside"], 1, "model.copy"),
    cli("damaged index.json", "no modality", [*SEARCH, "{idx}/no_modality"], 1, "modality"),
    cli("damaged index.json", "count a string", [*SEARCH, "{idx}/count_string"], 1, "count: expected an integer"),
    cli("damaged index.json", "dim disagrees", [*SEARCH, "{idx}/dim_disagrees"], 1, "dim"),
    cli("damaged items file", "a list", [*SEARCH, "{idx}/items_list"], 1, "items-"),
    cli("damaged items file", "items are numbers", [*SEARCH, "{idx}/items_numbers"], 1, "items[0]"),
    cli("damaged items file", "captions short", [*SEARCH, "{idx}/captions_short"], 1, "caption lists"),
    cli("damaged items file", "skipped a number", [*SEARCH, "{idx}/skipped_number"], 1, "skipped"),
    cli("FAISS file of another kind or dimension", "16-dim", [*SEARCH, "{idx}/faiss_16_dim"], 1, "16-dim"),
    cli("FAISS file of another kind or dimension", "HNSW for flat", [*SEARCH, "{idx}/faiss_hnsw"], 1, "IndexHNSWFlat"),
    cli("FAISS file of another kind or dimension", "L2 metric", [*SEARCH, "{idx}/faiss_l2"], 1, "IndexFlatL2"),
    # 6. values validated at the edge
    cli("optimizer values out of range", "beta1 = 1", [*TRAIN, "--set", "train.beta1=1"], 2, "train.beta1"),
    cli("optimizer values out of range", "beta2 negative", [*TRAIN, "--set", "train.beta2=-0.1"], 2, "train.beta2"),
    cli("optimizer values out of range", "negative weight decay", [*TRAIN, "--set", "train.weight_decay=-0.1"], 2, "weight_decay"),
    cli("optimizer values out of range", "negative warmup", [*TRAIN, "--set", "train.warmup_steps=-10"], 2, "warmup_steps"),
    cli("optimizer values out of range", "eps zero", [*TRAIN, "--set", "train.eps=0"], 2, "train.eps"),
    cli("absurd sizes", "20-digit embed_dim", [*TRAIN, "--set", "model.embed_dim=12345678901234567890"], 2, "65536"),
    cli("absurd sizes", "a context of 10**8 tokens", [*TRAIN, "--set", "model.text.context_length=100000000"], 2, "8192"),
    cli("absurd sizes", "a million layers", [*TRAIN, "--set", "model.text.layers=1000000"], 2, "model.text.layers"),
    cli("absurd sizes", "image stage of 5000 blocks", [*TRAIN, "--set", "model.image.layers=[1,1,1,5000]"], 2, "model.image.layers"),
    cli("absurd sizes", "in a model's config.json", [*EVAL, "{models}/embed_dim_20_digits"], 1, "model.embed_dim"),
    cli("logit scale out of range", "negative max", [*TRAIN, "--set", "model.max_logit_scale=-5"], 2, "max_logit_scale"),
    cli("logit scale out of range", "max below 1", [*TRAIN, "--set", "model.max_logit_scale=0.5"], 2, "max_logit_scale"),
    cli("bad zero-shot template", "two {}", [*ZEROSHOT, "--templates", "{data}/templates_two_slots.txt"], 2, "exactly one"),
    cli("bad zero-shot template", "a number format", [*ZEROSHOT, "--templates", "{data}/templates_format_code.txt"], 2, "cannot take a class name"),
    cli("bad zero-shot template", "a named field", [*ZEROSHOT, "--templates", "{data}/templates_named_slot.txt"], 2, "names a field {name}"),
    cli("bad zero-shot template", "a lone brace", [*ZEROSHOT, "--templates", "{data}/templates_lone_brace.txt"], 2, "template 2"),
    cli("NUL byte in a path", "--output", ["index", "--model", "{model}", "--images", "{images}", "--output", "{scratch}/o\0ut"], 2, "--output"),
    cli("NUL byte in a path", "--data", [*EVAL_DATA, "{data}/train\0.csv"], 2, "--data"),
    cli("NUL byte in a path", "--templates", [*ZEROSHOT, "--templates", "{data}/t\0.txt"], 2, "--templates"),
    cli("NUL byte in a path", "--set data.cache_dir", [*TRAIN, "--set", "data.cache_dir=/tmp/c\0"], 2, "NUL"),
    cli("NUL byte in a path", "in a CSV row", [*EVAL_DATA, "{data}/nul_path.csv"], 1, "NUL byte"),
    cli("COCO entries of the wrong types", "image a string", [*EVAL_DATA, "{data}/coco_image_string.json"], 1, "images[0]"),
    cli("COCO entries of the wrong types", "file_name a number", [*EVAL_DATA, "{data}/coco_file_name_number.json"], 1, "images[0].file_name"),
    cli("COCO entries of the wrong types", "id a list", [*EVAL_DATA, "{data}/coco_id_list.json"], 1, "images[0].id"),
    cli("COCO entries of the wrong types", "caption a number", [*EVAL_DATA, "{data}/coco_caption_number.json"], 1, "annotations[0].caption"),
    cli("COCO entries of the wrong types", "annotation a string", [*EVAL_DATA, "{data}/coco_annotation_string.json"], 1, "annotations[0]"),
    cli("Karpathy entries of the wrong types", "image a string", [*EVAL_DATA, "{data}/karpathy_image_string.json"], 1, "images[1]"),
    cli("Karpathy entries of the wrong types", "filename a number", [*EVAL_DATA, "{data}/karpathy_filename_number.json"], 1, "filename"),
    cli("Karpathy entries of the wrong types", "sentences a string", [*EVAL_DATA, "{data}/karpathy_sentences_string.json"], 1, "images[0].sentences"),
    cli("Karpathy entries of the wrong types", "raw a number", [*EVAL_DATA, "{data}/karpathy_raw_number.json"], 1, "raw"),
    cli("Karpathy entries of the wrong types", "split a list", [*EVAL_DATA, "{data}/karpathy_split_list.json", "--split", "test"], 1, "split"),
    cli("JSONL values of the wrong types", "caption an object", [*EVAL_DATA, "{data}/jsonl_caption_object.jsonl"], 1, "line 1: caption"),
    cli("JSONL values of the wrong types", "filepath a number", [*EVAL_DATA, "{data}/jsonl_path_number.jsonl"], 1, "line 1: filepath"),
    # 8. no silent data loss in parsing
    cli("quote left open in a table", "to the end of the file", [*EVAL_DATA, "{data}/open_quote.csv"], 1, "line 2"),
    cli("quote left open in a table", "closed rows later", [*EVAL_DATA, "{data}/open_quote_closed_later.csv"], 1, "line 2"),
    cli("quote left open in a table", "TSV", [*EVAL_DATA, "{data}/open_quote.tsv"], 1, "line 2"),
    cli("quote left open in a table", "training data", [*TRAIN[:-2], "--output", "{scratch}/{case}", "--train-data", "{data}/open_quote.csv"], 1, "never closed"),
    cli("semicolon-separated table", "filepath;caption", [*EVAL_DATA, "{data}/semicolon.csv"], 1, "separated by ';'"),
    cli("semicolon-separated table", "image;text", [*EVAL_DATA, "{data}/semicolon_image.csv"], 1, "commas or tabs"),
    cli("cut caption counted", "eval --json", [*EVAL_DATA, "{data}/long_caption.csv", "--json"], 0, check=json_count("long_captions_truncated", 1)),
    cli("control characters in printed names", "search results", ["search", "--device", "cpu", "--index", "{named}/index", "--k", "3", "red"], 0, check=one_line_per_hit(3, "line\\nbreak", "esc\\x1b[2Jape", "tab\\there")),
    cli("control characters in printed names", "index summary", ["index", "--model", "{model}", "--images", "{images}", "--device", "cpu", "--output", "{scratch}/out\nput"], 0, check=summary_on_one_line),
    cli("control characters in printed names", "zero-shot classes", ZEROSHOT, 0, check=class_escaped),
    cli("control characters in printed names", "error naming a path", [*EVAL_DATA, "{scratch}/no\nsuch.csv"], 1, "no\\nsuch.csv"),
]
# fmt: on


def case_argv(case: Case, world: World) -> list[str]:
    values = {**world.paths, "case": case.id.replace("/", "_").replace(":", "_")}
    return [arg.format(**values) for arg in case.run]


def run_batch(argvs: list[list[str]], world: World) -> list[tuple]:
    return run_cli_cases(argvs, cwd=world.root, root=world.root, protected=PROTECTED, timeout=900)


@pytest.fixture(scope="module")
def cli_results(world) -> dict[str, tuple]:
    """Every command-line case, run: {case id: (exit code, stdout, stderr, changed paths)}."""
    halves = [CLI_CASES[0::2], CLI_CASES[1::2]]
    with ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(run_batch, [case_argv(c, world) for c in h], world) for h in halves]
        return {c.id: r for h, job in zip(halves, jobs) for c, r in zip(h, job.result())}


@pytest.mark.parametrize("case", CLI_CASES, ids=lambda c: c.id)
def test_command_line(case, cli_results, world):
    code, stdout, stderr, diff = cli_results[case.id]
    assert "Traceback" not in stderr, stderr
    assert diff == [], f"changed: {diff}"
    if case.expect == 0:
        assert code == 0, stderr
    else:
        proc = subprocess.CompletedProcess(case.run, code, stdout, stderr)
        assert_one_line_error(proc, case.expect, case.contains)
    if case.check:
        case.check(stdout, world)


# --- the Python API -------------------------------------------------------------------------------


def load_model(name: str) -> Callable:
    import coembed

    return lambda world: coembed.load(world["models"] / name, device="cpu")


def load_index(name: str) -> Callable:
    from coembed.index import Index

    return lambda world: Index.load(world["idx"] / name, device="cpu")


def resume_run(name: str) -> Callable:
    import coembed

    return lambda world: coembed.train(None, None, world["runs"] / name, resume=True, device="cpu")


def config_with(*overrides: str) -> Callable:
    from coembed.config import load_config

    return lambda world: load_config("tiny", list(overrides))


def read(name: str, **kw) -> Callable:
    from coembed.data.formats import read_records

    return lambda world: read_records(str(world["data"] / name), **kw)


def templates(name: str) -> Callable:
    from coembed.evaluate import read_templates

    return lambda world: read_templates(world["data"] / f"templates_{name}.txt")


def search_vector_of_another_size(world):
    from coembed.index import Index

    index = Index.load(world["idx"] / "good", device="cpu")
    return index.search(np.ones(16, np.float32))


def swapped_model_copy(world):
    """An index whose model copy was replaced by another model's files."""
    from coembed.checkpoint import save_model_dir
    from coembed.index import Index
    from coembed.tokenizer import Tokenizer

    folder = world["scratch"] / "swapped_copy"
    if not folder.exists():
        shutil.copytree(world["idx"] / "good", folder)
        copy = next(folder.glob("model-*"))
        shutil.rmtree(copy)
        save_model_dir(tiny_clip_model(seed=3), Tokenizer.clip(context_length=16), copy)
    return Index.load(folder, device="cpu").search("red")


def eval_counts_cut_captions(world):
    from coembed.evaluate import evaluate_retrieval

    return evaluate_retrieval(world["model"], world["data"] / "long_caption.csv", device="cpu")


def training_summary(world):
    return json.loads((world["runs"] / "good" / "summary.json").read_text())


def zeroshot_report(world):
    from coembed.evaluate import format_zeroshot, zeroshot

    return format_zeroshot(zeroshot(world["model"], world["named"] / "classes", device="cpu"))


def two_lines_kept_open_quote_refused(world):
    """A quoted caption over two lines is read as it is; a quote left open is refused."""
    from coembed.data.formats import read_records
    from coembed.errors import DataError

    records, _ = read_records(str(world["data"] / "two_line_caption.csv"))
    with pytest.raises(DataError, match="never closed"):
        read_records(str(world["data"] / "open_quote.csv"))
    return records[0].captions[0]


def _errors():
    from coembed import errors

    return errors


E = _errors()
# fmt: off
API_CASES = [
    api("damaged config.json", "load", load_model("layers_not_a_list"), E.ModelDirError, "model.image.layers"),
    api("damaged config.json", "load not UTF-8", load_model("config_not_utf8"), E.ModelDirError, "utf-8"),
    api("damaged preprocess.json", "load", load_model("preprocess_list"), E.ModelDirError, "preprocess.json"),
    api("non-finite weights", "load NaN", load_model("nan_weights"), E.ModelDirError, "text.token_embedding.weight"),
    api("non-finite weights", "load inf", load_model("inf_scale"), E.ModelDirError, "logit_scale"),
    api("damaged run_config.json", "train(resume=True) cut short", resume_run("config_cut"), E.ModelDirError, "not valid JSON"),
    api("damaged run_config.json", "train(resume=True) a list", resume_run("config_list"), E.ModelDirError, "expected an object"),
    api("damaged training state", "train(resume=True) step", resume_run("step_string"), E.ModelDirError, "step"),
    api("damaged training state", "train(resume=True) RNG", resume_run("rng_without_cpu"), E.ModelDirError, "rng"),
    api("damaged index.json", "Index.load", load_index("faiss_name_int"), E.IndexError_, "files.faiss"),
    api("damaged index.json", "Index.load copy outside", load_index("copy_outside"), E.IndexError_, "model.copy"),
    api("damaged items file", "Index.load", load_index("items_numbers"), E.IndexError_, "items[0]"),
    api("FAISS file of another kind or dimension", "Index.load", load_index("faiss_16_dim"), E.IndexError_, "16-dim"),
    api("FAISS file of another kind or dimension", "a query vector of another size", search_vector_of_another_size, E.UsageError, "32"),
    api("FAISS file of another kind or dimension", "a model copy of another model", swapped_model_copy, E.IndexError_, "not the model that built"),
    api("optimizer values out of range", "load_config beta1", config_with("train.beta1=1.5"), E.ConfigError, "[0, 1)"),
    api("optimizer values out of range", "load_config weight decay", config_with("train.weight_decay=-1"), E.ConfigError, "weight_decay"),
    api("absurd sizes", "load_config embed_dim", config_with("model.embed_dim=100000000000000000000"), E.ConfigError, "65536"),
    api("absurd sizes", "load_config heads", config_with("model.image.heads=1000000"), E.ConfigError, "65536"),
    api("logit scale out of range", "load_config", config_with("model.max_logit_scale=-1"), E.ConfigError, "max_logit_scale"),
    api("bad zero-shot template", "two {}", templates("two_slots"), E.UsageError, "exactly one"),
    api("bad zero-shot template", "named field", templates("named_slot"), E.UsageError, "names a field"),
    api("NUL byte in a path", "read_records", read("train\0.csv"), E.UsageError, "NUL"),
    api("NUL byte in a path", "load_config override", config_with("data.cache_dir=/tmp/a\0b"), E.ConfigError, "NUL"),
    api("NUL byte in a path", "a CSV row", read("nul_path.csv"), E.DataError, "NUL"),
    api("COCO entries of the wrong types", "read_records", read("coco_caption_number.json"), E.DataError, "annotations[0].caption"),
    api("Karpathy entries of the wrong types", "read_records", read("karpathy_split_list.json", split="test"), E.DataError, "images[0].split"),
    api("JSONL values of the wrong types", "read_records", read("jsonl_caption_object.jsonl"), E.DataError, "caption"),
    api("quote left open in a table", "read_records", read("open_quote.csv"), E.DataError, "line 2"),
    api("quote left open in a table", "read_records, closed later", read("open_quote_closed_later.csv"), E.DataError, "over line 3"),
    api("quote left open in a table", "two-line caption kept, open quote refused", two_lines_kept_open_quote_refused, check=lambda caption: caption.startswith("two\nlines, ")),
    api("semicolon-separated table", "read_records", read("semicolon.csv"), E.DataError, "separated by ';'"),
    api("cut caption counted", "evaluate_retrieval", eval_counts_cut_captions, check=lambda m: m["long_captions_truncated"] == 1),
    api("cut caption counted", "training summary.json", training_summary, check=lambda s: s["long_captions_truncated"] == 1),
    api("control characters in printed names", "format_zeroshot", zeroshot_report, check=lambda text: "red\\x1b[31m" in text and "\x1b" not in text),
]
# fmt: on


@pytest.mark.parametrize("case", API_CASES, ids=lambda c: c.id)
def test_python_api(case, world, unchanged):
    if case.expect is None:
        result = case.run(world)
        assert case.check(result), result
        return
    with pytest.raises(case.expect) as info:
        case.run(world)
    message = str(info.value)
    assert case.contains.lower() in message.lower(), message
    assert "\n" not in message.strip(), message


# --- the server -----------------------------------------------------------------------------------


def serve(name: str) -> Callable:
    from coembed.serve.app import create_app

    return lambda world: create_app(world["idx"] / name, device="cpu")


# The server loads its index and model when it starts: what it cannot serve correctly (every
# score NaN, which JSON cannot carry; a search that would fail on every request) stops it there,
# with one error, before the port opens.
# fmt: off
HTTP_CASES = [
    http("non-finite weights", "model copy with NaN", serve("copy_nan_weights"), E.ModelDirError, "NaN"),
    http("FAISS file of another kind or dimension", "16-dim", serve("faiss_16_dim"), E.IndexError_, "16-dim"),
    http("damaged items file", "captions short", serve("captions_short"), E.IndexError_, "caption lists"),
    http("damaged index.json", "params a list", serve("params_list"), E.IndexError_, "params"),
]
# fmt: on


@pytest.mark.parametrize("case", HTTP_CASES, ids=lambda c: c.id)
def test_server_refuses_to_start(case, world, unchanged):
    with pytest.raises(case.expect) as info:
        case.run(world)
    assert case.contains.lower() in str(info.value).lower(), str(info.value)


# --- the count ------------------------------------------------------------------------------------

ALL_CASES = CLI_CASES + API_CASES + HTTP_CASES
for _case in ALL_CASES:
    _case.id = f"{_case.surface}:{_case.kind}:{_case.name}".replace(" ", "_")
del _case
assert len({c.id for c in ALL_CASES}) == len(ALL_CASES), "case ids must be unique"


def test_every_kind_on_the_command_line_and_in_python():
    kinds = {c.kind for c in ALL_CASES}
    assert {c.kind for c in CLI_CASES} == kinds
    assert {c.kind for c in API_CASES} == kinds
    assert len(kinds) == 20, sorted(kinds)
