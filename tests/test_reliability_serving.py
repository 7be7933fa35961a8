"""What the server sends and what coembed reads, against a hostile user.

Kinds of bad input, each through the command line, the Python API and HTTP where it applies:

- an indexed image swapped after indexing: for a symlink out of the indexed folders (direct,
  relative, through a chain, to /dev/zero), its folder for a symlink, the file for a FIFO or a
  folder: never served or read, a 404 in the error shape (a symlink that stays inside is served);
- an image with an extreme aspect ratio (1 x 1,000,000, under the pixel limit), an image file over
  the byte limit, /dev/zero and a FIFO named as images or as a dataset: a counted skip when
  indexing or evaluating, one clear error for a query, 413 over HTTP, within seconds;
- a YAML of nested aliases (billion laughs), or one whose alias is inside its own anchor: one
  clear error line while parsing;
- slow clients (slowloris) and more connections than a process can hold: a normal request is
  still answered, slow heads and bodies get a 408, a full server a 503;
- HTTP protocol errors (no Host, a negative or non-numeric Content-Length, a malformed request
  line or header, a bad Range): the JSON error shape; HEAD on /images and /thumbnails works.

The world's files (index, model, images, datasets, configs) are snapshotted around every test:
kind, size, mtime and inode, and their sha256 around the module.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import (
    REPO,
    assert_one_line_error,
    build_served_index,
    free_port,
    run_cli_batch,
)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="FIFOs, /dev/zero and rlimits")

# --- the world ------------------------------------------------------------------------------------


def png(size: tuple[int, int], colour=(200, 10, 10)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


def alias_bomb(levels: int = 7, width: int = 9) -> str:
    """A flow-YAML list of ~30 bytes a level that stands for ``width ** (levels + 1)`` numbers:
    each level anchors the one below and repeats it by alias."""
    value = "[" + ",".join(["1"] * width) + "]"
    for level in range(levels):
        value = f"[&a{level} {value}" + f",*a{level}" * (width - 1) + "]"
    return value


BIG_FILE = 300 * 1024 * 1024  # bytes: more than any image under the pixel limit needs


@dataclass
class World:
    root: Path
    index: Path  # the served index of the twelve images in images/
    images: Path
    model: Path
    bombs: Path  # strip.png, wide.png, ok50.png, big.png, pipe.png, pipe.csv, data.csv, *.yaml
    items: list[str]

    def item(self, name: str) -> int:
        """The id of the indexed image images/<name>."""
        return self.items.index(str(self.images / name))


def build_world(root: Path) -> World:
    from coembed.index import Index

    index = build_served_index(root)
    bombs = root / "bombs"
    bombs.mkdir()
    (bombs / "strip.png").write_bytes(png((1, 1_000_000)))  # 1 MP: far under the pixel limit
    (bombs / "wide.png").write_bytes(png((102, 2)))  # 51:1
    (bombs / "ok50.png").write_bytes(png((100, 2)))  # 50:1, the most accepted
    with open(bombs / "big.png", "wb") as f:
        f.truncate(BIG_FILE)  # sparse: no disk, but its size
    os.mkfifo(bombs / "pipe.png")
    os.mkfifo(bombs / "pipe.csv")
    os.mkfifo(bombs / "pipe.yaml")
    good = sorted((root / "images").glob("*.png"))
    rows = [(str(p), p.stem.replace("_", " ")) for p in good]
    rows += [(str(bombs / n), n) for n in ("strip.png", "big.png", "pipe.png")]
    rows += [("/dev/zero", "zeros")]
    lines = ["filepath,caption", *(f"{a},{b}" for a, b in rows)]
    (bombs / "data.csv").write_text("\n".join(lines) + "\n")
    (bombs / "laughs.yaml").write_text(f"model:\n  image:\n    layers: {alias_bomb()}\n")
    (bombs / "loop.yaml").write_text("model: &m\n  image: *m\n")
    (bombs / "aliases.yaml").write_text("model:\n  embed_dim: &d 48\n  text: {width: *d}\n")
    (root / "secret.txt").write_text("top secret\n")
    (root / "evil").mkdir()
    (root / "evil" / "black_circle.png").write_text("top secret\n")
    items = Index.load(index, device="cpu").items
    return World(root, index, root / "images", root / "model", bombs, items)


def snapshot(root: Path, deep: bool = False) -> dict[str, tuple]:
    """Every file under ``root``: kind, size, mtime, inode (and sha256 of small ones if deep)."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if os.path.isdir(path) and not path.is_symlink():
            continue  # a folder's mtime changes when a test swaps an entry and puts it back
        key = str(path.relative_to(root))
        out[key] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino)
        if deep and path.is_file() and not path.is_symlink() and st.st_size < 1 << 20:
            out[key] += (hashlib.sha256(path.read_bytes()).hexdigest(),)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("world").resolve()  # indexed paths are real paths
    w = build_world(root)
    deep = snapshot(root, deep=True)
    yield w
    assert snapshot(root, deep=True) == deep


@pytest.fixture(autouse=True)
def unchanged(world):
    """Fails a test that changed, added or removed any file of the world."""
    before = snapshot(world.root)
    yield
    assert snapshot(world.root) == before


@contextlib.contextmanager
def swapped(path: Path, make: Callable[[Path], object]) -> Iterator[None]:
    """``path`` replaced by what ``make(path)`` puts there, then the original put back by rename
    (the same inode and mtime, so the snapshot sees nothing changed)."""
    aside = path.with_name(f".aside-{path.name}")
    os.rename(path, aside)
    try:
        make(path)
        yield
    finally:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()
        os.rename(aside, path)


# --- the command line -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_results(world, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    out = tmp_path_factory.mktemp("cli")
    b, cpu = world.bombs, ["--device", "cpu"]
    train = ["train", "--train-data", str(b / "data.csv"), "--output", str(out / "run"), *cpu]
    cases = {
        "index skips": ["index", "--model", str(world.model), "--images", str(b / "data.csv")],
        "eval skips": ["eval", "--model", str(world.model), "--data", str(b / "data.csv")],
        "search strip": ["search", "--index", str(world.index), "--image", str(b / "strip.png")],
        "search big": ["search", "--index", str(world.index), "--image", str(b / "big.png")],
        "eval fifo data": ["eval", "--model", str(world.model), "--data", str(b / "pipe.csv")],
        "config laughs": [*train, "--config", str(b / "laughs.yaml")],
        "config loop": [*train, "--config", str(b / "loop.yaml")],
        "config zero": [*train, "--config", "/dev/zero"],
        "config fifo": [*train, "--config", str(b / "pipe.yaml")],
        "set laughs": [*train, "--set", f"model.image.layers={alias_bomb()}"],
    }
    argvs = [[*argv, *cpu] for argv in cases.values()]
    argvs[0] += ["--output", str(out / "index")]
    results = run_cli_batch(argvs, timeout=240)
    return {name: (proc, out) for name, proc in zip(cases, results)}


def test_cli_index_skips_and_counts_bombs_and_special_files(world, cli_results):
    proc, out = cli_results["index skips"]
    assert proc.returncode == 0, proc.stderr
    assert "indexed 12 images" in proc.stdout
    assert "skipped 4 image" in proc.stderr
    listed = (out / "index" / "skipped.txt").read_text()
    assert "strip.png" in listed and "aspect ratio of 1,000,000:1" in listed
    assert "big.png" in listed and "over the limit" in listed
    assert "pipe.png" in listed and "named pipe (FIFO)" in listed
    assert "/dev/zero" in listed and "character device" in listed
    manifest = json.loads((out / "index" / "index.json").read_text())
    assert manifest["roots"] == [str(world.images)]


def test_cli_eval_skips_and_counts_bombs_and_special_files(cli_results):
    proc, _ = cli_results["eval skips"]
    assert proc.returncode == 0, proc.stderr
    assert "skipped 4 image" in proc.stderr
    assert "skipped_images  4" in proc.stdout


@pytest.mark.parametrize(
    "case, code, contains",
    [
        ("search strip", 1, "aspect ratio of 1,000,000:1"),
        ("search big", 1, "over the limit"),
        ("eval fifo data", 1, "named pipe"),
        ("config laughs", 2, "aliases"),
        ("config loop", 2, "inside its own anchor"),
        ("config zero", 2, "character device"),
        ("config fifo", 2, "named pipe"),
        ("set laughs", 2, "aliases"),
    ],
)
def test_cli_one_clear_error(cli_results, case, code, contains):
    proc, out = cli_results[case]
    assert_one_line_error(proc, code, contains)
    assert len(proc.stderr) < 500, proc.stderr[:500]
    assert not (out / "run").exists()


# --- the Python API: reading ----------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "name, reason, contains",
    [
        ("strip.png", "too large", "aspect ratio of 1,000,000:1"),
        ("big.png", "too large", "over the limit"),
        ("pipe.png", "not a file", "named pipe"),
        ("/dev/zero", "not a file", "character device"),
    ],
)
def test_open_image_refuses_before_it_allocates(world, name, reason, contains):
    from coembed.data.images import ImageReadError, open_image

    start = time.monotonic()
    with pytest.raises(ImageReadError, match=contains) as caught:
        open_image(world.bombs / name)
    assert caught.value.reason == reason
    assert time.monotonic() - start < 5


def test_the_aspect_ratio_bound_is_fifty_to_one(world):
    from coembed.data.images import MAX_IMAGE_BYTES, ImageReadError, open_image

    assert open_image(world.bombs / "ok50.png").size == (100, 2)
    with pytest.raises(ImageReadError, match="aspect ratio of 51:1"):
        open_image(world.bombs / "wide.png")
    assert MAX_IMAGE_BYTES < BIG_FILE


def test_a_strip_in_memory_is_refused_by_the_transform_too(world):
    from coembed.data.images import ImageReadError
    from coembed.data.transforms import resize_shortest
    from coembed.embedder import load
    from coembed.errors import ImageError

    strip = Image.new("RGB", (1, 1_000_000))
    with pytest.raises(ImageReadError, match="aspect ratio") as caught:
        resize_shortest(strip, 224)
    assert caught.value.reason == "too large"
    with pytest.raises(ImageError, match="aspect ratio"):
        load(world.model, device="cpu").embed_images([strip])


@pytest.mark.timeout(120)
def test_index_build_skips_and_counts(world):
    from coembed.embedder import load
    from coembed.index import Index

    index = Index.build(
        load(world.model, device="cpu"), images=world.bombs / "data.csv", progress=False
    )
    assert len(index) == 12
    skipped = {Path(source).name: reason for source, reason in index.skipped}
    assert set(skipped) == {"strip.png", "big.png", "pipe.png", "zero"}
    assert "aspect ratio" in skipped["strip.png"] and "named pipe" in skipped["pipe.png"]
    assert index.roots == [str(world.images.resolve())]


@pytest.mark.timeout(60)
def test_a_fifo_dataset_is_one_data_error(world):
    from coembed.data.formats import read_records
    from coembed.errors import DataError

    with pytest.raises(DataError, match="named pipe"):
        read_records(str(world.bombs / "pipe.csv"))


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "source, contains",
    [
        ("laughs.yaml", "expand to over 10,000 values"),
        ("loop.yaml", "inside its own anchor"),
        ("/dev/zero", "character device"),
        ("pipe.yaml", "named pipe"),
    ],
)
def test_load_config_refuses_bombs_quickly(world, source, contains):
    from coembed.config import load_config
    from coembed.errors import ConfigError

    start = time.monotonic()
    with pytest.raises(ConfigError, match=contains) as caught:
        load_config(str(world.bombs / source))
    assert len(str(caught.value)) < 300
    assert time.monotonic() - start < 5


def test_overrides_refuse_alias_bombs_and_configs_keep_small_aliases(world):
    from coembed.config import load_config
    from coembed.errors import ConfigError

    with pytest.raises(ConfigError, match="--set model.image.layers: .*aliases"):
        load_config("tiny", [f"model.image.layers={alias_bomb()}"])
    cfg = load_config(str(world.bombs / "aliases.yaml"))
    assert cfg.model.embed_dim == cfg.model.text.width == 48


# --- the serving rule: which files are sent -------------------------------------------------------


def to_outside(target: str) -> Callable[[Path], object]:
    return lambda path: path.symlink_to(target)


def through_a_hop(path: Path) -> None:
    hop = path.with_name(f".hop-{path.name}")
    hop.symlink_to("/etc/passwd")
    path.symlink_to(hop.name)  # a link inside the folder, to a link out of it


@contextlib.contextmanager
def chained(world: World, name: str) -> Iterator[None]:
    path = world.images / name
    try:
        with swapped(path, through_a_hop):
            yield
    finally:
        (world.images / f".hop-{name}").unlink(missing_ok=True)


SWAPS: dict[str, Callable[[World, str], contextlib.AbstractContextManager]] = {
    "symlink to /etc/passwd": lambda w, n: swapped(w.images / n, to_outside("/etc/passwd")),
    "relative symlink out": lambda w, n: swapped(w.images / n, to_outside("../secret.txt")),
    "symlink to /dev/zero": lambda w, n: swapped(w.images / n, to_outside("/dev/zero")),
    "symlink chain out": chained,
    "folder swapped for a symlink": lambda w, n: swapped(
        w.images, lambda p: p.symlink_to(w.root / "evil")
    ),
    "FIFO": lambda w, n: swapped(w.images / n, os.mkfifo),
    "folder": lambda w, n: swapped(w.images / n, Path.mkdir),
}


@pytest.fixture(scope="module")
def client(world):
    from fastapi.testclient import TestClient

    from coembed.serve.app import create_app

    with TestClient(create_app(world.index, device="cpu")) as c:
        yield c


def assert_error(response, status: int, contains: str = "") -> None:
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["content-type"] == "application/json"
    assert contains in response.json()["error"]
    assert "secret" not in response.text


@pytest.mark.timeout(60)
@pytest.mark.parametrize("swap", SWAPS)
def test_http_never_serves_a_swapped_file(world, client, swap):
    name = "black_circle.png"
    i = world.item(name)
    assert client.get(f"/thumbnails/{i}").status_code == 200  # now in the thumbnail cache
    with SWAPS[swap](world, name):
        assert_error(client.get(f"/images/{i}"), 404, f"item {i}")
        assert_error(client.get(f"/thumbnails/{i}"), 404, f"item {i}")
        head = client.head(f"/images/{i}")
        assert head.status_code == 404 and head.content == b""
        assert client.get("/health").status_code == 200
    assert client.get(f"/images/{i}").content == (world.images / name).read_bytes()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("swap", SWAPS)
def test_service_never_opens_a_swapped_file(world, client, swap):
    from fastapi import HTTPException

    service = client.app.state.service
    name = "blue_square.png"
    with SWAPS[swap](world, name), pytest.raises(HTTPException) as caught:
        service.open_item(world.item(name)).close()
    assert caught.value.status_code == 404
    with service.open_item(world.item(name)) as file:
        assert file.read() == (world.images / name).read_bytes()


def test_a_symlink_inside_is_served_one_out_is_not(world, client):
    i, other = world.item("red_circle.png"), world.images / "green_square.png"
    with swapped(world.images / "red_circle.png", to_outside(other.name)):
        assert client.get(f"/images/{i}").content == other.read_bytes()
    with swapped(world.images / "red_circle.png", to_outside(str(world.root / "secret.txt"))):
        assert_error(client.get(f"/images/{i}"), 404, "outside the indexed folders")


def test_open_without_symlinks_refuses_a_symlinked_folder(world, tmp_path):
    from coembed.serve.service import open_without_symlinks

    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.png").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    os.close(open_without_symlinks(str(tmp_path.resolve() / "real" / "a.png")))
    with pytest.raises(OSError):
        open_without_symlinks(str(tmp_path.resolve() / "link" / "a.png"))


def test_an_index_records_the_real_folders_of_its_files(world, tmp_path):
    from coembed.embedder import load
    from coembed.index import Index
    from coembed.serve.service import SearchService

    # A dataset whose file is a symlink to a folder beside it: that folder is a root.
    (tmp_path / "blobs").mkdir()
    (tmp_path / "ds").mkdir()
    shutil.copyfile(world.images / "red_square.png", tmp_path / "blobs" / "abc")
    (tmp_path / "ds" / "red.png").symlink_to("../blobs/abc")
    (tmp_path / "ds" / "data.csv").write_text("filepath,caption\nred.png,a red square\n")
    embedder = load(world.model, device="cpu")
    index = Index.build(embedder, images=tmp_path / "ds" / "data.csv", progress=False)
    assert index.roots == [str((tmp_path / "blobs").resolve())]
    index.add(images=[world.images / "red_circle.png"], progress=False)
    assert set(index.roots) == {str((tmp_path / "blobs").resolve()), str(world.images)}
    saved = Index.load(index.save(tmp_path / "idx"), device="cpu")
    assert saved.roots == index.roots
    service = SearchService(saved, "v1")
    with service.open_item(0) as file:
        assert file.read() == (tmp_path / "blobs" / "abc").read_bytes()


def test_an_index_saved_without_roots_serves_from_its_items_folders(world, tmp_path):
    from fastapi import HTTPException

    from coembed.serve.service import SearchService

    old = tmp_path / "old"
    shutil.copytree(world.index, old)
    manifest = json.loads((old / "index.json").read_text())
    del manifest["roots"]
    (old / "index.json").write_text(json.dumps(manifest))
    service = SearchService.load(old, device="cpu")
    assert service.index.roots is None
    assert service.served_roots() == {str(world.images)}
    i = world.item("white_square.png")
    service.open_item(i).close()
    with swapped(world.images / "white_square.png", to_outside("/etc/passwd")):
        with pytest.raises(HTTPException):
            service.open_item(i)


# --- HTTP: bombs, HEAD and Range in process -------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(
    "send",
    [
        lambda c, w: c.post("/search", json={"image": b64((w.bombs / "strip.png").read_bytes())}),
        lambda c, w: c.post("/search/image", files={"file": ("s.png", png((1, 200_000)))}),
        lambda c, w: c.post("/embed", json={"images": [b64(png((60, 1)))]}),
    ],
    ids=["search", "upload", "embed"],
)
def test_http_refuses_an_extreme_aspect_ratio(world, client, send):
    assert_error(send(client, world), 413, "aspect ratio")
    assert client.get("/health").status_code == 200


def test_http_head_on_files(world, client):
    i = world.item("yellow_circle.png")
    image = client.head(f"/images/{i}")
    assert image.status_code == 200 and image.content == b""
    assert image.headers["content-length"] == str(
        (world.images / "yellow_circle.png").stat().st_size
    )
    assert image.headers["content-type"] == "image/png"
    thumbnail = client.head(f"/thumbnails/{i}")
    assert thumbnail.status_code == 200 and thumbnail.content == b""
    assert int(thumbnail.headers["content-length"]) == len(client.get(f"/thumbnails/{i}").content)
    missing = client.head("/images/999")
    assert missing.status_code == 404 and missing.content == b""


RANGES = [
    ("bytes=abc", 400, "malformed"),
    ("bytes=9-2", 400, "ends before it starts"),
    ("bytes=99999999-", 416, "no byte"),
    ("bytes=-0", 416, "no byte"),
    ("nonsense", 400, "malformed"),
]


@pytest.mark.parametrize("header, status, contains", RANGES)
def test_http_bad_range_is_the_error_shape(world, client, header, status, contains):
    i = world.item("yellow_square.png")
    response = client.get(f"/images/{i}", headers={"Range": header})
    assert_error(response, status, contains)
    if status == 416:
        size = (world.images / "yellow_square.png").stat().st_size
        assert response.headers["content-range"] == f"bytes */{size}"


def test_http_good_ranges(world, client):
    i = world.item("yellow_square.png")
    data = (world.images / "yellow_square.png").read_bytes()
    first = client.get(f"/images/{i}", headers={"Range": "bytes=0-9"})
    assert first.status_code == 206 and first.content == data[:10]
    assert first.headers["content-range"] == f"bytes 0-9/{len(data)}"
    assert client.get(f"/images/{i}", headers={"Range": "bytes=-5"}).content == data[-5:]
    whole = client.get(f"/images/{i}", headers={"Range": "pages=1-2"})  # another unit: ignored
    assert whole.status_code == 200 and whole.content == data
    assert_error(client.get(f"/images/{i}", headers={"Range": "bytes=x"}), 400, "malformed")


# --- real servers on loopback ports ---------------------------------------------------------------


@dataclass
class Server:
    port: int
    proc: subprocess.Popen


def start_server(argv: list[str], port: int, open_files: int | None = None) -> Server:
    def limit_files() -> None:
        import resource

        if open_files:
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

    env = {**os.environ, "COEMBED_NO_PROGRESS": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(
        [sys.executable, *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        preexec_fn=limit_files,
    )
    return Server(port, proc)


def wait_until_up(server: Server, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.proc.poll() is None, server.proc.stderr.read().decode()[-3000:]
        with contextlib.suppress(OSError):
            if exchange(server.port, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")[0] == 200:
                return
        time.sleep(0.2)
    raise AssertionError("the server did not come up")


def stop(server: Server) -> None:
    server.proc.send_signal(signal.SIGINT)
    try:
        server.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


@pytest.fixture(scope="module")
def servers(world) -> Iterator[tuple[Server, Server]]:
    """The real ``coembed serve`` with 512 open files; and ``serve()`` from Python with short
    limits: 1.5 s for a head, 3 s for a body, 4 connections."""
    cli_port, api_port = free_port(), free_port()
    cli = start_server(
        ["-m", "coembed", "serve", "--index", str(world.index), "--port", str(cli_port)]
        + ["--device", "cpu"],
        cli_port,
        open_files=512,
    )
    script = (
        "import sys\n"
        "from coembed.serve.app import serve\n"
        "from coembed.serve.http import ConnectionLimits\n"
        "limits = ConnectionLimits(head_timeout=1.5, body_timeout=3.0, max_connections=4)\n"
        "serve(sys.argv[1], port=int(sys.argv[2]), device='cpu', limits=limits)\n"
    )
    api = start_server(["-c", script, str(world.index), str(api_port)], api_port)
    try:
        wait_until_up(cli)
        wait_until_up(api)
        yield cli, api
    finally:
        stop(cli)
        stop(api)


def read_answer(sock: socket.socket, head_only: bool = False) -> tuple[int, dict, bytes]:
    """The status, headers and body of one answer on ``sock`` (the body by Content-Length, or
    until the server closes; none for a HEAD)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    if head_only:
        return status, headers, body
    length = int(headers.get("content-length", -1))
    while len(body) < length or length < 0:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def exchange(port: int, request: bytes, timeout: float = 10) -> tuple[int, dict, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        return read_answer(sock)


PROTOCOL_ERRORS = {
    "no Host": b"GET /health HTTP/1.1\r\n\r\n",
    "negative Content-Length": b"POST /search HTTP/1.1\r\nHost: t\r\nContent-Length: -5\r\n\r\n",
    "Content-Length not a number": b"POST /search HTTP/1.1\r\nHost: t\r\nContent-Length: x\r\n\r\n",
    "two Content-Lengths": (
        b"POST /search HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n"
    ),
    "no request line": b"\x16\x03\x01 not HTTP at all\r\n\r\n",
    "header without a colon": b"GET /health HTTP/1.1\r\nHost: t\r\nno colon here\r\n\r\n",
}


@pytest.mark.parametrize("case", PROTOCOL_ERRORS)
def test_protocol_errors_are_the_error_shape(servers, case):
    server, _ = servers
    status, headers, body = exchange(server.port, PROTOCOL_ERRORS[case])
    assert status == 400, (status, body)
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"].startswith("malformed HTTP request")
    assert exchange(server.port, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")[0] == 200


@pytest.mark.parametrize("header, status, contains", RANGES)
def test_bad_range_over_a_socket(world, servers, header, status, contains):
    server, _ = servers
    i = world.item("yellow_square.png")
    request = f"GET /images/{i} HTTP/1.1\r\nHost: t\r\nRange: {header}\r\n\r\n".encode()
    got, headers, body = exchange(server.port, request)
    assert got == status and headers["content-type"] == "application/json"
    assert contains in json.loads(body)["error"]


def test_head_over_a_socket_sends_no_body(world, servers):
    server, _ = servers
    i = world.item("yellow_circle.png")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        # Two requests on one connection: the second answer must start right after the first
        # head, so the HEAD's answer carried no body.
        sock.sendall(
            f"HEAD /images/{i} HTTP/1.1\r\nHost: t\r\n\r\n"
            f"HEAD /thumbnails/{i} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
        )
        status, headers, rest = read_answer(sock, head_only=True)
        assert status == 200 and headers["content-type"] == "image/png"
        size = (world.images / "yellow_circle.png").stat().st_size
        assert headers["content-length"] == str(size)
        while b"\r\n\r\n" not in rest:
            rest += sock.recv(65536)
        assert rest.startswith(b"HTTP/1.1 200"), rest[:100]
        assert b"content-type: image/jpeg" in rest


def test_the_served_rule_over_a_socket(world, servers):
    server, _ = servers
    i = world.item("black_square.png")
    with swapped(world.images / "black_square.png", to_outside("/etc/passwd")):
        status, headers, body = exchange(
            server.port, f"GET /images/{i} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
        )
    assert status == 404 and b"root:" not in body and "error" in json.loads(body)


@pytest.mark.timeout(120)
def test_slow_clients_do_not_starve_coembed_serve(servers):
    """600 connections that never finish their request head, against a process with 512 open
    files: a normal request is still answered at once."""
    server, _ = servers
    slow = []
    try:
        for _ in range(600):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n")
            slow.append(sock)
        start = time.monotonic()
        status, _, body = exchange(server.port, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        assert status == 200 and json.loads(body)["status"] == "ok"
        assert time.monotonic() - start < 5
    finally:
        for sock in slow:
            sock.close()


def closed_within(sock: socket.socket, seconds: float) -> tuple[bytes, float]:
    """What the server sent before closing ``sock`` (a reset counts as closing), and how long
    that took; socket.timeout if it stays open."""
    start, data = time.monotonic(), b""
    sock.settimeout(seconds)
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return data, time.monotonic() - start
        data += chunk


def test_a_slow_head_gets_a_408_and_an_idle_connection_is_closed(servers):
    _, server = servers
    with socket.create_connection(("127.0.0.1", server.port)) as slow:
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n")  # and never the blank line
        answer, took = closed_within(slow, 6)
    assert answer.startswith(b"HTTP/1.1 408") and took < 4
    assert "did not arrive" in json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
    with socket.create_connection(("127.0.0.1", server.port)) as idle:
        assert closed_within(idle, 6)[0] == b""


def test_a_slow_body_gets_a_408(servers):
    _, server = servers
    with socket.create_connection(("127.0.0.1", server.port)) as slow:
        slow.sendall(
            b"POST /search HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"text": '
        )
        answer, took = closed_within(slow, 6)
    assert answer.startswith(b"HTTP/1.1 408") and took < 4
    assert "too slowly" in json.loads(answer.partition(b"\r\n\r\n")[2])["error"]


def test_a_full_server_evicts_slow_heads_then_refuses_with_503(servers):
    _, server = servers
    port = server.port
    time.sleep(0.3)  # the connections of earlier tests are gone
    with contextlib.ExitStack() as stack:
        slow = [
            stack.enter_context(socket.create_connection(("127.0.0.1", port))) for _ in range(4)
        ]
        for sock in slow:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n")
        # A fifth connection evicts the slow head that waited longest and is answered.
        assert exchange(port, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")[0] == 200
        assert closed_within(slow[0], 2)[0] == b""
    time.sleep(0.3)
    with contextlib.ExitStack() as stack:
        busy = [
            stack.enter_context(socket.create_connection(("127.0.0.1", port))) for _ in range(4)
        ]
        for sock in busy:  # heads complete, bodies pending: busy with a request, not evictable
            sock.sendall(b"POST /search HTTP/1.1\r\nHost: t\r\nContent-Length: 50\r\n\r\n")
        time.sleep(0.2)
        status, headers, body = exchange(port, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
    assert status == 503 and headers["content-type"] == "application/json"
    assert "busy" in json.loads(body)["error"]
