"""Bad input, kind by kind, through the command line, the Python API and the HTTP server.

Each row of the tables below is one bad input (or one unusual-but-valid one that must be accepted)
and what coembed must do with it: one clear line and exit code 1 or 2 on the command line, one
``CoembedError`` in Python, one JSON 4xx from the server, or: skip and count it where the design
says so. No case may print a traceback, crash, or change or lose a file: the inputs, a model, an
index and a folder that is not an index are snapshotted (size, mtime, inode; and sha256 around
the whole module) and compared after every case.

The command-line cases run the real ``coembed`` entry point in subprocesses, several cases per
process (the torch import dominates) and two processes at a time. At the end of the session pytest
prints ``bad-input kinds tried: N, passed: M``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import SHIPPED, assert_one_line_error, run_cli_cases, tiny_clip_model

# --- the tally printed at the end of the session -------------------------------------------------


class Tally:
    """Kinds tried and kinds whose every case passed; a pytest plugin for the terminal summary."""

    def __init__(self) -> None:
        self.cases: dict[str, set[str]] = {}
        self.passed: set[str] = set()

    def tried(self, case: Case) -> None:
        self.cases.setdefault(case.kind, set()).add(case.id)

    def ok(self, case: Case) -> None:
        self.passed.add(case.id)

    def kinds_passed(self) -> int:
        return sum(ids <= self.passed for ids in self.cases.values())

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.cases:
            terminalreporter.write_line(
                f"bad-input kinds tried: {len(self.cases)}, passed: {self.kinds_passed()} "
                f"({len(self.passed)} of {sum(map(len, self.cases.values()))} cases)"
            )


TALLY = Tally()


@pytest.fixture(scope="module", autouse=True)
def report_kinds(request):
    manager = request.config.pluginmanager
    if not manager.has_plugin("coembed-bad-inputs"):
        manager.register(TALLY, "coembed-bad-inputs")
    yield


@dataclass
class Case:
    kind: str  # the kind of bad input: what the session summary counts
    name: str
    run: object  # argv (CLI), a function of the world (API), a function of (client, world) (HTTP)
    expect: object = None  # exit code / exception type / HTTP status
    contains: str = ""
    check: Callable | None = None  # more assertions on the result
    surface: str = ""
    id: str = field(init=False, default="")


def cli(kind, name, argv, code, contains="", check=None) -> Case:
    return Case(kind, name, argv, code, contains, check, surface="cli")


def api(kind, name, fn, error=None, contains="") -> Case:
    return Case(kind, name, fn, error, contains, surface="api")


def http(kind, name, fn, status, contains="", check=None) -> Case:
    return Case(kind, name, fn, status, contains, check, surface="http")


# --- files: good, bad and unusual -----------------------------------------------------------------


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def bomb_png(side: int = 100_000) -> bytes:
    """A ~100-byte PNG whose header claims side x side pixels (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 4096))
        + png_chunk(b"IEND", b"")
    )


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def noise_png(seed: int = 0, size: int = 48) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), np.uint8)
    return encoded(Image.fromarray(pixels))


def unusual_images() -> dict[str, tuple[bytes, Image.Image]]:
    """Valid images in the modes decode must convert: the file's bytes and the RGB it must give."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (40, 48, 3), np.uint8)
    out = {}
    cmyk = encoded(Image.fromarray(rgb).convert("CMYK"), "JPEG")
    out["cmyk.jpg"] = cmyk, Image.open(io.BytesIO(cmyk)).convert("RGB")
    grey16 = rng.integers(0, 65535, (40, 48)).astype(np.uint16)
    scaled = np.round(grey16 * (255.0 / 65535.0)).astype(np.uint8)
    out["grey16.png"] = (
        encoded(Image.fromarray(grey16)),
        Image.fromarray(scaled).convert("RGB"),
    )
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    out["palette.png"] = encoded(palette), palette.convert("RGB")
    alpha = rng.integers(0, 255, (40, 48, 1), np.uint8)
    on_white = (rgb * (alpha / 255.0) + 255 * (1 - alpha / 255.0)).round().astype(np.uint8)
    out["alpha.png"] = (
        encoded(Image.fromarray(np.concatenate([rgb, alpha], 2))),
        Image.fromarray(on_white),
    )
    return out


def tar_of(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


class Pwn:
    """A pickle that would run a shell command when loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@dataclass
class World:
    root: Path
    paths: dict[str, str]
    embedder: object = None

    def __getitem__(self, key: str) -> Path:
        return Path(self.paths[key])


PROTECTED = (
    "model",
    "other_model",
    "images",
    "mixed",
    "bad",
    "modes",
    "data",
    "ckpt",
    "idx",
    "notindex",
)


def build_world(root: Path) -> World:
    import coembed
    from coembed.checkpoint import save_model_dir
    from coembed.index import Index
    from coembed.tokenizer import Tokenizer

    tok = Tokenizer.clip(context_length=16)
    model = save_model_dir(tiny_clip_model(), tok, root / "model")
    save_model_dir(tiny_clip_model(seed=1), tok, root / "other_model")
    images = root / "images"
    images.mkdir()
    rows = []
    for i in range(6):
        name = f"val_{i:05d}.png"
        shutil.copyfile(SHIPPED / "images" / name, images / name)
        rows.append((f"../images/{name}", f"caption number {i}"))

    bad = root / "bad"
    bad.mkdir()
    png = noise_png()
    (bad / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    (bad / "truncated.png").write_bytes(png[: len(png) // 2])
    (bad / "zero.png").write_bytes(b"")
    (bad / "bomb.png").write_bytes(bomb_png())
    (bad / "text.jpg").write_text("I am a text file posing as a JPEG\n")
    (bad / "folder.png").mkdir()
    (bad / "dangling.png").symlink_to(root / "nowhere.png")

    mixed = root / "mixed"
    shutil.copytree(images, mixed)
    for name in ("corrupt.png", "truncated.png", "zero.png", "bomb.png", "text.jpg"):
        shutil.copyfile(bad / name, mixed / name)

    modes = root / "modes"
    modes.mkdir()
    for name, (data, _) in unusual_images().items():
        (modes / name).write_bytes(data)

    data = root / "data"
    data.mkdir()

    def table(name: str, header: str, lines: list[str], encoding: str = "utf-8") -> None:
        (data / name).write_text("\n".join([header, *lines]) + "\n", encoding=encoding)

    good = [f"{a},{b}" for a, b in rows]
    table("good.csv", "filepath,caption", good)
    table("no_caption_col.csv", "filepath,text", good)
    table("no_image_col.csv", "image,caption", good)
    table("header_only.csv", "filepath,caption", [])
    table("latin1.csv", "filepath,caption", [f"{rows[0][0]},caf\xe9 au lait"], "latin-1")
    table("blank_captions.csv", "filepath,caption", [f"{a},   " for a, _ in rows])
    table("all_broken.csv", "filepath,caption", ["../bad/zero.png,zero", "../bad/text.jpg,text"])
    (data / "empty.csv").write_bytes(b"")
    jsonl = [json.dumps({"filepath": a, "caption": b}) for a, b in rows]
    (data / "bad_line.jsonl").write_text("\n".join([jsonl[0], "{not json", *jsonl[1:]]) + "\n")
    (data / "no_key.jsonl").write_text(
        "\n".join(json.dumps({"filepath": a, "title": b}) for a, b in rows) + "\n"
    )
    (data / "not_objects.jsonl").write_text("[1, 2]\n[3]\n")
    shard = {}
    for i, (a, b) in enumerate(rows):
        shard[f"{i:04d}.png"] = (images / Path(a).name).read_bytes()
        shard[f"{i:04d}.txt"] = b.encode()
    whole = tar_of(data / "whole.tar", shard).read_bytes()
    (data / "cut.tar").write_bytes(whole[: len(whole) // 2 + 100])
    (data / "text.tar").write_text("not a tar archive\n" * 50)
    tar_of(data / "no_captions.tar", {k: v for k, v in shard.items() if k.endswith(".png")})
    (data / "texts_latin1.txt").write_bytes("caf\xe9\nna\xefve\n".encode("latin-1"))
    (data / "texts_blank.txt").write_text("\n   \n\t\n\n")
    (data / "texts_long.txt").write_text("a very long caption " * 5000 + "\n")
    (data / "broken.yaml").write_text("model: {embed_dim: 32\n  text: [\n")
    (data / "list.yaml").write_text("- just\n- a list\n")
    (data / "unknown_key.yaml").write_text("model:\n  colour: red\n")
    (data / "templates_empty.txt").write_text("\n\n")
    classes = data / "classes"
    (classes / "red").mkdir(parents=True)
    (classes / "red" / "broken.png").write_bytes(b"")
    (classes / "blue").mkdir()
    (classes / "blue" / "text.png").write_text("not a picture")

    ckpt = root / "ckpt"
    ckpt.mkdir()
    for name in ("truncated", "foreign_config", "future", "swapped"):
        shutil.copytree(model, ckpt / name)
    weights = (model / "model.safetensors").read_bytes()
    (ckpt / "truncated" / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    (ckpt / "foreign_config" / "config.json").write_text('{"architectures": ["BertModel"]}')
    config = json.loads((model / "config.json").read_text())
    (ckpt / "future" / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    wide = save_model_dir(tiny_clip_model("model.embed_dim=16"), tok, root / "wide_model")
    shutil.copyfile(wide / "model.safetensors", ckpt / "swapped" / "model.safetensors")
    (ckpt / "random.pt").write_bytes(os.urandom(4096))
    # A pickle's mark and a protocol no Python writes: torch would warn before failing.
    (ckpt / "pickle_mark.pt").write_bytes(b"\x80\x9b" + os.urandom(4094))
    (ckpt / "notes.bin").write_text("these are my notes, not a checkpoint\n")
    (ckpt / "empty.pt").write_bytes(b"")
    with open(ckpt / "pwn.pt", "wb") as f:
        pickle.dump({"visual.conv1.weight": Pwn(root / "scratch" / "pwned")}, f, protocol=2)
    (ckpt / "cut.safetensors").write_bytes(weights[:1000])

    idx = root / "idx"
    embedder = coembed.load(model, device="cpu")
    Index.build(embedder, images=images, progress=False).save(idx / "good")
    for name in ("cut_faiss", "cut_items", "future", "not_json", "no_manifest"):
        shutil.copytree(idx / "good", idx / name)
    faiss_file = next((idx / "cut_faiss").glob("index-*.faiss"))
    faiss_file.write_bytes(faiss_file.read_bytes()[:100])
    items_file = next((idx / "cut_items").glob("items-*.json"))
    items_file.write_text(items_file.read_text()[:50])
    manifest = json.loads((idx / "future" / "index.json").read_text())
    (idx / "future" / "index.json").write_text(json.dumps({**manifest, "format_version": 99}))
    (idx / "not_json" / "index.json").write_text("{ this is not")
    (idx / "no_manifest" / "index.json").unlink()
    (root / "notindex").mkdir()
    (root / "notindex" / "precious.txt").write_text("do not touch\n")
    (root / "afile").write_text("a file where a folder is wanted\n")
    (root / "scratch").mkdir()
    (root / "cwd").mkdir()
    paths = {p.name: str(p) for p in root.iterdir()}
    paths.update({"good_idx": str(idx / "good"), "data": str(data), "ckpt": str(ckpt)})
    return World(root, paths, embedder)


def snapshot(root: Path, deep: bool = False) -> dict[str, tuple]:
    """Every file and folder under the protected parts of ``root``: kind, size, mtime, inode
    (and the content's sha256 when ``deep``)."""
    out = {}
    for top in PROTECTED:
        for path in sorted([root / top, *(root / top).rglob("*")]):
            st = path.lstat()
            key = str(path.relative_to(root))
            out[key] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino)
            if deep and path.is_file() and not path.is_symlink():
                out[key] += (hashlib.sha256(path.read_bytes()).hexdigest(),)
    return out


def changed(before: dict, after: dict) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("world")
    w = build_world(root)
    deep = snapshot(root, deep=True)
    yield w
    # Around the whole module, content too: nothing anywhere changed a protected byte.
    assert changed(deep, snapshot(root, deep=True)) == []
    assert not (root / "scratch" / "pwned").exists()


@pytest.fixture
def unchanged(world):
    """Fails the test if it changed anything protected."""
    before = snapshot(world.root)
    yield
    assert changed(before, snapshot(world.root)) == []


# --- the command line -----------------------------------------------------------------------------


def skipped_listed(count: int, *reasons: str) -> Callable:
    def check(proc, world, out: Path) -> None:
        assert f"skipped {count} image" in proc.stderr, proc.stderr
        listed = (out / "skipped.txt").read_text()
        for reason in reasons:
            assert reason in listed, listed

    return check


def found(count: int) -> Callable:
    def check(proc, world, out: Path) -> None:
        assert len(json.loads(proc.stdout)["results"]) == count, proc.stdout

    return check


def indexed(count: int) -> Callable:
    def check(proc, world, out: Path) -> None:
        assert f"indexed {count} " in proc.stdout, proc.stdout

    return check


IDX = ["--device", "cpu"]
TRAIN = ["train", "--output", "{scratch}/run", "--device", "cpu", "--steps", "1"]
SEARCH = ["search", "--index", "{good_idx}", "--device", "cpu"]
EVAL = ["eval", "--model", "{model}", "--device", "cpu", "--data"]
INDEX = ["index", "--model", "{model}", "--device", "cpu", "--output", "{out}", "--images"]

# fmt: off
CLI_CASES = [
    # images posing as images, or too big: skipped and counted when indexing a folder,
    # one error when the image is the query
    cli("corrupt image", "index", [*INDEX, "{bad}"], 1, "nothing to index"),
    cli("corrupt image", "search", [*SEARCH, "--image", "{bad}/corrupt.png"], 1, "corrupt.png"),
    cli("truncated image", "search", [*SEARCH, "--image", "{bad}/truncated.png"], 1, "truncated"),
    cli("zero-byte image", "search", [*SEARCH, "--image", "{bad}/zero.png"], 1, "empty"),
    cli("decompression bomb", "search", [*SEARCH, "--image", "{bad}/bomb.png"], 1, "pixels"),
    cli("non-image posing as image", "search", [*SEARCH, "--image", "{bad}/text.jpg"], 1, "text.jpg"),
    cli("folder posing as image", "search", [*SEARCH, "--image", "{bad}/folder.png"], 1, "folder"),
    cli("dangling symlink", "search", [*SEARCH, "--image", "{bad}/dangling.png"], 1, "dangling"),
    cli("broken images among good ones", "index skips and counts", [*INDEX, "{mixed}"], 0, check=skipped_listed(5, "not an image", "truncated", "empty", "decompression bomb")),
    cli("broken images among good ones", "eval: all broken", [*EVAL, "{data}/all_broken.csv"], 1, "none of the 2 images"),
    cli("missing file", "search image", [*SEARCH, "--image", "{root}/nope.png"], 1, "nope.png"),
    cli("missing file", "eval data", [*EVAL, "{root}/nope.csv"], 1, "no such file"),
    cli("missing file", "index images", [*INDEX, "{root}/nope"], 1, "nope"),
    # unusual images that are fine
    cli("CMYK/16-bit/palette/alpha image", "index", [*INDEX, "{modes}"], 0, check=indexed(4)),
    # captions
    cli("empty caption", "search", [*SEARCH, ""], 2, "empty query"),
    cli("whitespace-only caption", "search", [*SEARCH, "  \t "], 2, "empty query"),
    cli("whitespace-only caption", "texts file", [*INDEX[:-1], "--texts", "{data}/texts_blank.txt"], 1, "nothing to index"),
    cli("whitespace-only caption", "eval", [*EVAL, "{data}/blank_captions.csv"], 1, "caption"),
    cli("non-UTF-8 caption", "csv", [*EVAL, "{data}/latin1.csv"], 1, "utf-8"),
    cli("non-UTF-8 caption", "texts file", [*INDEX[:-1], "--texts", "{data}/texts_latin1.txt"], 1, "utf-8"),
    cli("very long caption", "search", [*SEARCH, "--k", "2", "a red circle " * 3000], 0),
    cli("very long caption", "texts file", [*INDEX[:-1], "--texts", "{data}/texts_long.txt"], 0, check=indexed(1)),
    # dataset files
    cli("wrong CSV columns", "no caption column", [*EVAL, "{data}/no_caption_col.csv"], 1, "caption"),
    cli("wrong CSV columns", "no image column", [*EVAL, "{data}/no_image_col.csv"], 1, "filepath"),
    cli("wrong CSV columns", "--caption-key typo", [*EVAL, "{data}/good.csv", "--caption-key", "captoin"], 1, "captoin"),
    cli("empty dataset", "header only", [*EVAL, "{data}/header_only.csv"], 1, ""),
    cli("empty dataset", "zero-byte csv", [*EVAL, "{data}/empty.csv"], 1, ""),
    cli("malformed JSONL", "bad line", [*EVAL, "{data}/bad_line.jsonl"], 1, "line 2"),
    cli("malformed JSONL", "not objects", [*EVAL, "{data}/not_objects.jsonl"], 1, "object"),
    cli("missing JSONL key", "title not caption", [*EVAL, "{data}/no_key.jsonl"], 1, "caption"),
    cli("malformed webdataset shard", "truncated tar", [*EVAL, "{data}/cut.tar"], 1, "cut.tar"),
    cli("malformed webdataset shard", "not a tar", [*EVAL, "{data}/text.tar"], 1, "text.tar"),
    cli("malformed webdataset shard", "no captions", [*EVAL, "{data}/no_captions.tar"], 1, ""),
    cli("malformed webdataset shard", "missing shard", [*EVAL, "{data}/shard-{{0..3}}.tar"], 1, "not found"),
    cli("zero-shot folder", "no classes", ["zeroshot", "--model", "{model}", "--data", "{images}", "--device", "cpu"], 1, ""),
    cli("zero-shot folder", "nothing readable", ["zeroshot", "--model", "{model}", "--data", "{data}/classes", "--device", "cpu"], 1, "could be read"),
    cli("bad templates file", "empty", ["zeroshot", "--model", "{model}", "--data", "{data}/classes", "--templates", "{data}/templates_empty.txt"], 2, "templates"),
    # models and checkpoints
    cli("truncated checkpoint", "model dir", [*EVAL[:2], "{ckpt}/truncated", "--data", "{data}/good.csv"], 1, "truncated"),
    cli("truncated checkpoint", "--init", [*TRAIN, "--train-data", "{data}/good.csv", "--init", "{ckpt}/cut.safetensors"], 1, ""),
    cli("truncated checkpoint", "convert", ["convert", "--from-openclip", "{ckpt}/cut.safetensors", "--config", "rn50", "--output", "{scratch}/conv"], 1, "cut.safetensors"),
    cli("foreign checkpoint", "random bytes", ["convert", "--from-openclip", "{ckpt}/random.pt", "--config", "rn50", "--output", "{scratch}/conv"], 1, "random.pt"),
    cli("foreign checkpoint", "random bytes after a pickle mark", ["convert", "--from-openclip", "{ckpt}/pickle_mark.pt", "--config", "rn50", "--output", "{scratch}/conv"], 1, "not a pytorch checkpoint"),
    cli("foreign checkpoint", "text file", ["convert", "--from-openclip", "{ckpt}/notes.bin", "--config", "rn50", "--output", "{scratch}/conv"], 1, "not a pytorch checkpoint"),
    cli("foreign checkpoint", "zero bytes", ["convert", "--from-openclip", "{ckpt}/empty.pt", "--config", "rn50", "--output", "{scratch}/conv"], 1, "empty"),
    cli("foreign checkpoint", "pickle that runs code", ["convert", "--from-openclip", "{ckpt}/pwn.pt", "--config", "rn50", "--output", "{scratch}/conv"], 1, "pwn.pt"),
    cli("foreign checkpoint", "foreign config.json", [*EVAL[:2], "{ckpt}/foreign_config", "--data", "{data}/good.csv"], 1, "not a coembed model"),
    cli("foreign checkpoint", "future format", [*EVAL[:2], "{ckpt}/future", "--data", "{data}/good.csv"], 1, "format version"),
    cli("foreign checkpoint", "weights of another config", [*EVAL[:2], "{ckpt}/swapped", "--data", "{data}/good.csv"], 1, "another config"),
    cli("missing model", "eval", [*EVAL[:2], "{root}/nomodel", "--data", "{data}/good.csv"], 1, "does not exist"),
    cli("missing model", "export", ["export", "--onnx", "{root}/nomodel", "--output", "{scratch}/onnx"], 1, "nomodel"),
    # indexes
    cli("truncated index", "faiss file", [*SEARCH[:2], "{idx}/cut_faiss", "red"], 1, "unreadable"),
    cli("truncated index", "items file", [*SEARCH[:2], "{idx}/cut_items", "red"], 1, "not valid json"),
    cli("foreign index", "future format", [*SEARCH[:2], "{idx}/future", "red"], 1, "format"),
    cli("foreign index", "manifest not JSON", [*SEARCH[:2], "{idx}/not_json", "red"], 1, "not valid json"),
    cli("foreign index", "no manifest", [*SEARCH[:2], "{idx}/no_manifest", "red"], 1, "not a coembed index"),
    cli("foreign index", "a model dir", [*SEARCH[:2], "{model}", "red"], 1, "not a coembed index"),
    cli("index of another model", "--add", ["index", "--model", "{other_model}", "--images", "{images}", "--output", "{good_idx}", "--add"], 1, "another model"),
    cli("index of another model", "--add texts to images", ["index", "--texts", "{data}/texts_long.txt", "--output", "{good_idx}", "--add"], 2, "image index"),
    cli("output in the way", "index into a non-index folder", [*INDEX[:-3], "--output", "{notindex}", "--images", "{images}"], 2, "not an index"),
    cli("output in the way", "index into a file", [*INDEX[:-3], "--output", "{afile}", "--images", "{images}"], 1, "afile"),
    cli("output in the way", "train into a model dir", [*TRAIN[:1], "--output", "{model}", "--train-data", "{data}/good.csv", "--device", "cpu"], 2, "model directory"),
    cli("output in the way", "train into a file", [*TRAIN[:1], "--output", "{afile}", "--train-data", "{data}/good.csv", "--device", "cpu"], 2, "is a file"),
    # configs and overrides
    cli("bad config", "broken YAML", [*TRAIN, "--train-data", "{data}/good.csv", "--config", "{data}/broken.yaml"], 2, "broken.yaml"),
    cli("bad config", "YAML list", [*TRAIN, "--train-data", "{data}/good.csv", "--config", "{data}/list.yaml"], 2, "mapping"),
    cli("bad config", "unknown key in YAML", [*TRAIN, "--train-data", "{data}/good.csv", "--config", "{data}/unknown_key.yaml"], 2, "colour"),
    cli("bad config", "unknown recipe", [*TRAIN, "--train-data", "{data}/good.csv", "--config", "giant"], 2, "giant"),
    cli("bad override", "unknown key", [*TRAIN, "--train-data", "{data}/good.csv", "--set", "train.nope=1"], 2, "train.nope"),
    cli("bad override", "not a number", [*TRAIN, "--train-data", "{data}/good.csv", "--set", "train.lr=fast"], 2, "train.lr"),
    cli("bad override", "no equals sign", [*TRAIN, "--train-data", "{data}/good.csv", "--set", "train.lr"], 2, "train.lr"),
    cli("bad override", "NaN learning rate", [*TRAIN, "--train-data", "{data}/good.csv", "--set", "train.lr=nan"], 2, "train.lr"),
    cli("bad override", "impossible shape", [*TRAIN, "--train-data", "{data}/good.csv", "--set", "model.text.heads=5"], 2, "divisible"),
    cli("bad override", "unknown enum", [*TRAIN, "--train-data", "{data}/good.csv", "--set", "model.text.pool=median"], 2, "median"),
    # icon themes (`coembed data icons`; broken and unrenderable icons: tests/test_icons_data.py)
    cli("icon themes", "--root that does not exist", ["data", "icons", "--output", "{out}", "--root", "{root}/nope"], 1, "no such folder"),
    cli("icon themes", "theme not installed", ["data", "icons", "--output", "{out}", "--themes", "NoSuchTheme", "Other", "Third"], 1, "not installed"),
    # command-line values
    cli("bad option value", "--k 0", [*SEARCH, "--k", "0", "red"], 2, "--k"),
    cli("bad option value", "--k 10**12", [*SEARCH, "--k", "1000000000000", "--json", "red"], 0, check=found(6)),
    cli("bad option value", "--n-train -5", ["data", "synthetic", "--output", "{out}", "--n-train", "-5"], 2, "n-train"),
    cli("bad option value", "--k not a number", [*SEARCH, "--k", "ten", "red"], 2, "--k"),
    cli("bad option value", "--batch-size 0", [*INDEX, "{images}", "--batch-size", "0"], 2, "batch-size"),
    cli("bad option value", "--kind", [*INDEX, "{images}", "--kind", "annoy"], 2, "annoy"),
    cli("bad option value", "--device", [*SEARCH[:-2], "--device", "tpu", "red"], 2, "tpu"),
    cli("bad option value", "--steps -3", [*TRAIN[:-2], "--steps", "-3", "--train-data", "{data}/good.csv"], 2, "steps"),
    cli("bad option value", "--port", ["serve", "--index", "{good_idx}", "--port", "99999"], 2, "port"),
    cli("bad command line", "unknown command", ["fly"], 2, "fly"),
    cli("bad command line", "missing required", ["search", "red"], 2, "--index"),
    cli("bad command line", "unknown flag", [*SEARCH, "--colour", "red", "x"], 2, "--colour"),
    cli("bad compositional query", "unbalanced quote", [*SEARCH, '"red - "blue"'], 2, "quote"),
    cli("bad compositional query", "dangling operator", [*SEARCH, '"red" -'], 2, "term must follow"),
    cli("bad compositional query", "infinite weight", [*SEARCH, '1e999*"red"'], 2, "out of range"),
    cli("bad compositional query", "missing query image", [*SEARCH, 'image:"{root}/nope.png" + "red"'], 1, "nope.png"),
]
# fmt: on

# Through `python -m coembed` itself, one process each (the rest run several to a process).
ALONE = {"unknown command", "missing required", "--k 0", "broken YAML"}


def case_argv(case: Case, world: World) -> list[str]:
    values = {**world.paths, "root": str(world.root), "out": f"{world.root}/scratch/{case.id}"}
    return [arg.format(**values) for arg in case.run]


def run_batch(argvs: list[list[str]], world: World) -> list[tuple]:
    return run_cli_cases(argvs, cwd=world["cwd"], root=world.root, protected=PROTECTED)


def run_alone(argv: list[str], world: World) -> tuple:
    before = snapshot(world.root)
    env = {**os.environ, "COEMBED_NO_PROGRESS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "coembed", *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=world["cwd"],
        timeout=600,
    )
    return proc.returncode, proc.stdout, proc.stderr, changed(before, snapshot(world.root))


@pytest.fixture(scope="module")
def cli_results(world) -> dict[str, tuple]:
    """Every command-line case, run: {case id: (exit code, stdout, stderr, changed paths)}."""
    alone = [c for c in CLI_CASES if c.name in ALONE]
    batched = [c for c in CLI_CASES if c.name not in ALONE]
    halves = [batched[0::2], batched[1::2]]
    with ThreadPoolExecutor(2) as pool:
        jobs = [
            pool.submit(run_batch, [case_argv(c, world) for c in half], world) for half in halves
        ]
        singles = [(c, pool.submit(run_alone, case_argv(c, world), world)) for c in alone]
        results = {}
        for half, job in zip(halves, jobs):
            results.update({c.id: r for c, r in zip(half, job.result())})
        results.update({c.id: job.result() for c, job in singles})
    return results


@pytest.mark.parametrize("case", CLI_CASES, ids=lambda c: c.id)
def test_command_line(case, cli_results, world):
    TALLY.tried(case)
    code, stdout, stderr, diff = cli_results[case.id]
    proc = subprocess.CompletedProcess(case.run, code, stdout, stderr)
    assert "Traceback" not in stderr, stderr
    assert diff == [], f"changed: {diff}"
    if case.expect == 0:
        assert code == 0, stderr
    else:
        assert_one_line_error(proc, case.expect, case.contains)
    if case.check:
        case.check(proc, world, Path(f"{world.root}/scratch/{case.id}"))
    TALLY.ok(case)


# --- the Python API -------------------------------------------------------------------------------


def embed_path(name: str):
    def fn(world):
        return world.embedder.embed_images([world["bad"] / name])

    return fn


def embeds_as_expected(world) -> None:
    """Every unusual-but-valid image embeds exactly as the RGB image it stands for."""
    for name, (_, want) in unusual_images().items():
        got = world.embedder.embed_images([world["modes"] / name])
        np.testing.assert_allclose(got, world.embedder.embed_images([want]), atol=1e-6)
        assert np.isfinite(got).all() and abs(np.linalg.norm(got) - 1) < 1e-4


def read(name: str, **kw):
    from coembed.data.formats import read_records

    return lambda world: read_records(str(world["data"] / name), **kw)


def counted_long_and_blank(world) -> None:
    from coembed.data.formats import read_records

    long = world["data"] / "long.jsonl"
    lines = [
        {"filepath": "../images/val_00000.png", "caption": "word " * 2000},
        {"filepath": "../images/val_00001.png", "caption": " \t "},
        {"filepath": "../images/val_00002.png", "caption": "fine"},
    ]
    scratch = world["scratch"] / "long.jsonl"
    scratch.write_text("\n".join(json.dumps(x) for x in lines))
    records, report = read_records(str(scratch), "filepath", "caption")
    assert len(records) == 2, records
    assert report.long_captions_truncated == 1 and report.empty_captions == 1, report
    assert not long.exists()


def counted_non_utf8_shard_caption(world) -> None:
    from coembed.data.formats import read_records

    png = (world["images"] / "val_00000.png").read_bytes()
    shard = tar_of(
        world["scratch"] / "latin.tar", {"a.png": png, "a.txt": "caf\xe9".encode("latin-1")}
    )
    records, report = read_records(str(shard), "filepath", "caption")
    assert len(records) == 1 and report.non_utf8_captions == 1


def long_text_embeds(world) -> None:
    vector = world.embedder.embed_texts(["a red circle " * 10_000])
    assert vector.shape == (1, 32) and abs(np.linalg.norm(vector) - 1) < 1e-4


def load(name: str):
    import coembed

    return lambda world: coembed.load(world["ckpt"] / name, device="cpu")


def load_index(name: str):
    from coembed.index import Index

    return lambda world: Index.load(world["idx"] / name, device="cpu")


def app_on(name: str):
    from coembed.serve.app import create_app

    return lambda world: create_app(world["idx"] / name)


def search_missing_image(world):
    from coembed.index import Index

    return Index.load(world["good_idx"], device="cpu").search(world.root / "nope.png")


def openclip_file(name: str):
    from coembed.interop.openclip import read_checkpoint

    return lambda world: read_checkpoint(world["ckpt"] / name)


def bad_override(*overrides: str):
    from coembed.config import load_config

    return lambda world: load_config("tiny", list(overrides))


def _errors():
    from coembed import errors

    return errors


E = _errors()
# fmt: off
API_CASES = [
    api("corrupt image", "embed_images", embed_path("corrupt.png"), E.ImageError, "corrupt"),
    api("truncated image", "embed_images", embed_path("truncated.png"), E.ImageError, "truncated"),
    api("zero-byte image", "embed_images", embed_path("zero.png"), E.ImageError, "empty"),
    api("decompression bomb", "embed_images", embed_path("bomb.png"), E.ImageError, "pixels"),
    api("non-image posing as image", "embed_images", embed_path("text.jpg"), E.ImageError, "not an image"),
    api("missing file", "embed_images", embed_path("nope.png"), E.ImageError, "not found"),
    api("missing file", "Index.search by image path", search_missing_image, E.ImageError, "nope.png"),
    api("CMYK/16-bit/palette/alpha image", "embed_images", embeds_as_expected),
    api("very long caption", "embed_texts", long_text_embeds),
    api("very long caption", "dataset: truncated and counted", counted_long_and_blank),
    api("non-UTF-8 caption", "shard caption counted", counted_non_utf8_shard_caption),
    api("non-UTF-8 caption", "csv", read("latin1.csv"), E.DataError, "utf-8"),
    api("wrong CSV columns", "read_records", read("no_caption_col.csv"), E.DataError, "--caption-key"),
    api("missing JSONL key", "read_records", read("no_key.jsonl"), E.DataError, "title"),
    api("malformed webdataset shard", "read_records", read("cut.tar"), E.DataError, "tar"),
    api("truncated checkpoint", "load", load("truncated"), E.ModelDirError, "truncated"),
    api("foreign checkpoint", "load", load("foreign_config"), E.ModelDirError, "not a coembed"),
    api("foreign checkpoint", "read_checkpoint pickle", openclip_file("pwn.pt"), E.ModelDirError, "python objects"),
    api("truncated index", "Index.load", load_index("cut_faiss"), E.IndexError_, "unreadable"),
    api("truncated index", "create_app", app_on("cut_items"), E.IndexError_, "json"),
    api("foreign index", "Index.load", load_index("future"), E.IndexError_, "format"),
    api("bad override", "load_config", bad_override("model.embed_dim=-4"), E.ConfigError, "embed_dim"),
    api("bad override", "load_config list", bad_override("model.image.layers=[1,x]"), E.ConfigError, "layers"),
]
# fmt: on


@pytest.mark.parametrize("case", API_CASES, ids=lambda c: c.id)
def test_python_api(case, world, unchanged):
    TALLY.tried(case)
    if case.expect is None:
        case.run(world)
    else:
        with pytest.raises(case.expect) as info:
            case.run(world)
        assert case.contains.lower() in str(info.value).lower(), str(info.value)
        assert "\n" not in str(info.value).strip(), str(info.value)
    TALLY.ok(case)


# --- the server -----------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def bad_bytes(name: str) -> Callable[[World], bytes]:
    return lambda world: (world["bad"] / name).read_bytes()


def post_json(payload) -> Callable:
    return lambda client, world: client.post("/search", json=payload)


def post_raw(body: bytes, content_type: str = "application/json", path: str = "/search"):
    return lambda client, world: client.post(
        path, content=body, headers={"content-type": content_type}
    )


def search_image(name: str) -> Callable:
    return lambda client, world: client.post(
        "/search", json={"image": b64((world["bad"] / name).read_bytes())}
    )


def upload(name: str, folder: str = "bad") -> Callable:
    return lambda client, world: client.post(
        "/search/image", files={"file": (name, (world[folder] / name).read_bytes(), "image/png")}
    )


def get(path: str) -> Callable:
    return lambda client, world: client.get(path)


def embed_unusual(client, world):
    images = unusual_images()
    return client.post("/embed", json={"images": [b64(data) for data, _ in images.values()]})


def same_as_api(response, world) -> None:
    got = np.array(response.json()["vectors"], np.float32)
    want = world.embedder.embed_images([rgb for _, rgb in unusual_images().values()])
    np.testing.assert_allclose(got, want, atol=1e-5)


def chunked_body(client, world):
    def chunks():
        yield b'{"text": "'
        for _ in range(40):
            yield b"x" * 1000
        yield b'"}'

    return client.post("/search", content=chunks(), headers={"content-type": "application/json"})


def oversize_upload(client, world):
    return client.post("/search/image", files={"file": ("big.png", noise_png(size=120))})


def oversize_declared(client, world):
    return client.post(
        "/search",
        content=b"{}",
        headers={"content-type": "application/json", "content-length": "999999999"},
    )


def results_ok(response, world) -> None:
    assert len(response.json()["results"]) == 3


# fmt: off
HTTP_CASES = [
    http("corrupt image", "search image", search_image("corrupt.png"), 400, "not an image"),
    http("truncated image", "upload", upload("truncated.png"), 400, "truncated"),
    http("zero-byte image", "upload", upload("zero.png"), 400, "empty"),
    http("zero-byte image", "search image", post_json({"image": ""}), 400, "empty"),
    http("decompression bomb", "search image", search_image("bomb.png"), 413, "pixels"),
    http("decompression bomb", "upload", upload("bomb.png"), 413, "pixels"),
    http("non-image posing as image", "upload", upload("text.jpg"), 400, "not an image"),
    http("CMYK/16-bit/palette/alpha image", "embed", embed_unusual, 200, check=same_as_api),
    http("CMYK/16-bit/palette/alpha image", "upload cmyk", upload("cmyk.jpg", "modes"), 200),
    http("empty caption", "text", post_json({"text": ""}), 400, "empty"),
    http("empty caption", "embed texts", lambda c, w: c.post("/embed", json={"texts": ["ok", ""]}), 400, "empty"),
    http("whitespace-only caption", "query", post_json({"query": " \n\t "}), 400, "empty"),
    http("very long caption", "text", post_json({"text": "x" * 5000}), 422, "text"),
    http("non-UTF-8 caption", "body", post_raw(b'{"text": "caf\xe9"}'), 400, "body"),
    http("malformed HTTP body", "cut-off JSON", post_raw(b'{"text": "red",'), 400, "json"),
    http("malformed HTTP body", "JSON array", post_json(["red"]), 422, ""),
    http("malformed HTTP body", "wrong type", post_json({"text": 5}), 422, "text"),
    http("malformed HTTP body", "unknown field", post_json({"text": "red", "colour": "blue"}), 422, "colour"),
    http("malformed HTTP body", "two queries", post_json({"text": "red", "id": 1}), 400, "exactly one"),
    http("malformed HTTP body", "k out of range", post_json({"text": "red", "k": 100_000}), 422, "k"),
    http("malformed HTTP body", "not base64", post_json({"image": "%%%"}), 400, "base64"),
    http("malformed HTTP body", "form instead of JSON", post_raw(b"text=red", "application/x-www-form-urlencoded"), 4, ""),
    http("malformed HTTP body", "broken multipart", post_raw(b"--x\r\nbroken", "multipart/form-data; boundary=x", "/search/image"), 422, "file"),
    http("malformed HTTP body", "Content-Length not a number", lambda c, w: c.post("/search", content=b"{}", headers={"content-length": "ten"}), 400, "content-length"),
    http("malformed HTTP body", "too many texts", lambda c, w: c.post("/embed", json={"texts": ["a"] * 257}), 422, "texts"),
    http("oversize upload", "declared length", oversize_declared, 413, "limit"),
    http("oversize upload", "chunked body", chunked_body, 413, "limit"),
    http("oversize upload", "multipart upload", oversize_upload, 413, "limit"),
    http("path traversal", "dot-dot in /images", get("/images/../../etc/passwd"), 404, ""),
    http("path traversal", "encoded dot-dot", get("/images/..%2F..%2Fetc%2Fpasswd"), 404, ""),
    http("path traversal", "static dot-dot", get("/static/..%2F..%2F..%2F..%2Fetc%2Fpasswd"), 404, ""),
    http("path traversal", "query image path", post_json({"query": 'image:"/etc/passwd" + "red"'}), 400, "indexed"),
    http("path traversal", "id out of range", get("/images/99999"), 404, "no item"),
    http("path traversal", "negative id", get("/thumbnails/-1"), 404, "no item"),
    http("bad compositional query", "infinite weight", post_json({"query": '1e999*"red" - "blue"'}), 400, "out of range"),
    http("bad compositional query", "cancel out", post_json({"query": '"red" - "red"'}), 400, "cancel"),
]
# fmt: on


@pytest.fixture(scope="module")
def client(world):
    from fastapi.testclient import TestClient

    from coembed.serve.app import create_app

    # Limits small enough for small test bodies; the defaults are 16 MB and 25 MP.
    app = create_app(world["good_idx"], device="cpu", max_body_bytes=30_000)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize("case", HTTP_CASES, ids=lambda c: c.id)
def test_server(case, client, world, unchanged):
    TALLY.tried(case)
    response = case.run(client, world)
    if case.expect < 10:  # any status of that class
        assert response.status_code // 100 == case.expect, (response.status_code, response.text)
    else:
        assert response.status_code == case.expect, (response.status_code, response.text)
    assert "root:" not in response.text and "Traceback" not in response.text
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"}, body
        assert case.contains.lower() in body["error"].lower(), body
    if case.check:
        case.check(response, world)
    # ... and the server keeps serving.
    after = client.post("/search", json={"text": "a red circle", "k": 3})
    assert after.status_code == 200 and len(after.json()["results"]) == 3
    TALLY.ok(case)


# --- the count ------------------------------------------------------------------------------------

ALL_CASES = CLI_CASES + API_CASES + HTTP_CASES
for _case in ALL_CASES:
    _case.id = f"{_case.surface}:{_case.kind}:{_case.name}".replace(" ", "_")
del _case
assert len({c.id for c in ALL_CASES}) == len(ALL_CASES), "case ids must be unique"


def test_at_least_30_kinds_on_every_surface():
    kinds = {c.kind for c in ALL_CASES}
    assert len(kinds) >= 30, sorted(kinds)
    assert {c.surface for c in ALL_CASES} == {"cli", "api", "http"}
    # Each family of bad input has a case.
    wanted = {
        "corrupt image", "truncated image", "zero-byte image", "decompression bomb",
        "non-image posing as image", "CMYK/16-bit/palette/alpha image", "missing file",
        "empty caption", "whitespace-only caption", "non-UTF-8 caption", "very long caption",
        "wrong CSV columns", "missing JSONL key", "malformed webdataset shard",
        "truncated checkpoint", "foreign checkpoint", "truncated index", "foreign index",
        "bad config", "bad override", "malformed HTTP body", "oversize upload", "path traversal",
    }  # fmt: skip
    assert wanted <= kinds, wanted - kinds
