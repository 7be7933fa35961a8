"""Writers that must not lose or mix data: concurrent writers, outputs that overlap inputs, exports
committed as a whole, a full disk and termination signals.

Concurrency is tested with real processes: the first writer runs under a small wrapper that
stops it at its first rename into the output (``GATED``), holding its lock, until the test opens
the gate; the second writer runs meanwhile and must be refused with one line naming the first.
A full disk is a small tmpfs (mounting needs root; those tests are skipped otherwise), filled
to the last byte where a test needs it full at an exact moment. Around every case the files are
snapshotted (``tests.helpers.tree_snapshot``) and compared.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import (
    ENV,
    assert_one_line_error,
    kill_at_event,
    ok,
    run_cli,
    run_cli_batch,
    small_openclip,
    start,
    tiny_clip_model,
    tiny_config,
    tiny_dataset,
    train_args,
    tree_changes,
    tree_snapshot,
)

# Runs `coembed ARGS...` (as sys.argv[0] "coembed") with os.replace waiting at the first rename
# into WATCH whose target contains MATCH, until the file GATE exists; "@@ waiting" announces it.
GATED = r"""
import os, sys, time
watch, match, gate = os.path.abspath(sys.argv[1]), sys.argv[2], sys.argv[3]
real_replace = os.replace

def replace(src, dst, *args, **kwargs):
    target = os.path.abspath(dst)
    if target.startswith(watch) and match in target and not os.path.exists(gate):
        sys.__stderr__.write("@@ waiting\n"); sys.__stderr__.flush()
        while not os.path.exists(gate):
            time.sleep(0.05)
    return real_replace(src, dst, *args, **kwargs)

os.replace = replace
sys.argv = ["coembed", *sys.argv[4:]]
from coembed.cli import main
sys.exit(main(sys.argv[1:]))
"""

# Runs `coembed ARGS...` with the image cache's pool workers announcing "@@ decoding" and
# decoding slowly, so that a signal can be sent while they work.
SLOW_DECODE = r"""
import sys, time
import coembed.data.cache as cache
real = cache._decode_into

def slow(indices):
    sys.__stderr__.write("@@ decoding\n"); sys.__stderr__.flush()
    time.sleep(1.0)
    return real(indices)

cache._decode_into = slow
sys.argv = ["coembed", *sys.argv[1:]]
from coembed.cli import main
sys.exit(main(sys.argv[1:]))
"""


class Gated:
    """A ``coembed`` process stopped at its first rename into ``watch`` (matching ``match``)."""

    def __init__(self, args: list[str], watch: Path, gate: Path, match: str = "") -> None:
        self.gate = gate
        self.proc = subprocess.Popen(
            [sys.executable, "-c", GATED, str(watch), match, str(gate), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        self.pid = self.proc.pid

    def wait_at_gate(self) -> None:
        """Block until the process waits at the gate (it holds its lock then)."""
        for line in self.proc.stderr:
            if line.startswith("@@ waiting"):
                return
        raise AssertionError(
            f"never reached the gate: {self.proc.wait()} {self.proc.stdout.read()}"
        )

    def open(self, timeout: float = 600) -> subprocess.CompletedProcess:
        """Let it go on; returns its outcome."""
        self.gate.touch()
        out, err = self.proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)


def noise_images(folder: Path, n: int, seed: int) -> list[Path]:
    """``n`` small random PNGs named by ``seed``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"s{seed}-{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), np.uint8)).save(path)
        paths.append(path)
    return paths


def lock_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".lock"))


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """A tiny model directory, three sets of six images and an index of the first set."""
    from coembed.checkpoint import save_model_dir
    from coembed.embedder import load
    from coembed.index import Index
    from coembed.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("gallery")
    model = save_model_dir(tiny_clip_model(), Tokenizer.clip(context_length=16), root / "model")
    sets = {name: root / name for name in ("base", "a", "b")}
    for seed, folder in enumerate(sets.values()):
        noise_images(folder, 6, seed)
    Index.build(load(model, device="cpu"), images=sets["base"], progress=False).save(root / "idx")
    return root


def items_of(index_dir: Path) -> set[str]:
    from coembed.index import Index

    return {Path(item).name for item in Index.load(index_dir, device="cpu").items}


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# --- 1. concurrent writers -----------------------------------------------------------------------


def add_args(images: Path, index: Path) -> list[str]:
    return ["index", "--images", str(images), "--output", str(index), "--add", "--device", "cpu"]


def test_second_index_add_is_refused_while_the_first_writes(gallery, tmp_path):
    from coembed.errors import LockHeld
    from coembed.index import Index

    idx = tmp_path / "idx"
    shutil.copytree(gallery / "idx", idx)
    first = Gated(add_args(gallery / "a", idx), idx, tmp_path / "gate")
    first.wait_at_gate()
    before = tree_snapshot(tmp_path, deep=True)
    second = run_cli(*add_args(gallery / "b", idx))
    assert_one_line_error(second, 1, f"pid {first.pid}")
    assert "coembed index --images" in second.stderr and "--add" in second.stderr
    with pytest.raises(LockHeld, match=f"pid {first.pid}"):  # the Python API: the same lock
        Index.load(idx, device="cpu").save(idx)
    assert tree_changes(before, tree_snapshot(tmp_path, deep=True)) == []
    ok(first.open())
    # The first run's items were added, none of the refused run's, and nothing else was.
    assert items_of(idx) == names(gallery / "base") | names(gallery / "a")
    assert lock_files(tmp_path) == []


def test_stale_lock_of_a_killed_writer_is_taken_over(gallery, tmp_path):
    from coembed.locks import lock_path

    idx = tmp_path / "idx"
    shutil.copytree(gallery / "idx", idx)
    first = Gated(add_args(gallery / "a", idx), idx, tmp_path / "gate")
    first.wait_at_gate()
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    left = json.loads(lock_path(idx).read_text())  # the dead holder's note stays behind
    assert left["pid"] == first.pid
    ok(run_cli(*add_args(gallery / "b", idx)))
    assert items_of(idx) == names(gallery / "base") | names(gallery / "b")
    assert lock_files(tmp_path) == []
    assert not [n for n in names(idx) if n.startswith(".")]  # the killed save's temporary is gone


@pytest.mark.slow
def test_second_train_on_one_output_is_refused_while_the_first_trains(tmp_path):
    import coembed
    from coembed.errors import LockHeld

    data = tiny_dataset(tmp_path / "data", n=16)
    out = tmp_path / "run"
    first = Gated(train_args(data, out, "--lr", "0.001"), out, tmp_path / "gate")
    first.wait_at_gate()
    before = tree_snapshot(tmp_path, deep=True)
    second = run_cli(*train_args(data, out, "--lr", "0.5"))
    assert_one_line_error(second, 1, f"pid {first.pid}")
    assert "coembed train" in second.stderr
    with pytest.raises(LockHeld, match=f"pid {first.pid}"):
        coembed.train(tiny_config("train.steps=2"), data, out, device="cpu")
    assert tree_changes(before, tree_snapshot(tmp_path, deep=True)) == []
    ok(first.open())
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["config"]["train"]["lr"] == 0.001  # the first run's, whole
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    from coembed.checkpoint import load_model_dir

    load_model_dir(out)  # config and weights of one run
    assert lock_files(tmp_path) == []


def test_lock_names_its_holder_and_is_released_on_any_exit(tmp_path):
    from coembed.errors import LockHeld
    from coembed.locks import lock_path, writer_lock

    target = tmp_path / "new" / "deeper" / "index"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from coembed.locks import writer_lock\n"
            f"with writer_lock({str(target)!r}):\n    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert lock_path(target) == tmp_path / "new" / "deeper" / ".index.lock"
        with pytest.raises(LockHeld, match=rf"pid {holder.pid} \(`python -c \.\.\.`"):
            with writer_lock(target):
                pass
    finally:
        holder.kill()
        holder.wait()
    (tmp_path / "alias").symlink_to(tmp_path / "new")
    with writer_lock(target) as path:  # the kernel released the dead holder's lock
        with writer_lock(tmp_path / "alias" / "deeper" / "index"):  # one lock, taken again
            assert json.loads(path.read_text())["pid"] == os.getpid()
        assert path.exists()
    assert not path.exists()
    with pytest.raises(RuntimeError), writer_lock(tmp_path / "other" / "run"):
        raise RuntimeError("a failing writer")
    assert not (tmp_path / "other").exists()  # folders made for the lock are gone again


# --- 2. outputs apart from inputs, overwrite, commit as a whole ---------------------------------


# Files of an earlier ONNX export (some of coembed.interop.onnx.EXPORT_FILES).
OLD_EXPORT = ("image_encoder.onnx", "text_encoder.onnx", "onnx.json")


@pytest.fixture
def workspace(tmp_path, tiny_model_dir):
    """A model, a second model, a fake ONNX export, an open_clip file, a dataset and a file."""
    shutil.copytree(tiny_model_dir, tmp_path / "other_model")
    export = tmp_path / "export"
    export.mkdir()
    for name in OLD_EXPORT:
        (export / name).write_text(f"old {name}")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "oc.pt").write_bytes(b"an open_clip checkpoint")
    (tmp_path / "exported.pt").write_bytes(b"an earlier export")
    tiny_dataset(tmp_path / "data", n=8)
    return tmp_path


def overlap_cases(w: Path) -> list[tuple[list[str], str]]:
    """(argv, what the one error line says) for outputs that would change an input."""
    m, data = w / "model", w / "data"
    oc = ["convert", "--from-openclip", str(w / "ckpt" / "oc.pt"), "--config", "rn50"]
    return [
        (["convert", "--to-openclip", str(m), "--output", str(m / "model.safetensors")], "inside"),
        (["convert", "--to-openclip", str(m), "--output", str(m / "sub" / "x.pt")], "inside"),
        (["convert", "--to-openclip", str(m), "--output", str(w / "exported.pt")], "--overwrite"),
        ([*oc, "--output", str(w / "ckpt")], "contains --from-openclip"),
        ([*oc, "--output", str(w / "ckpt" / "oc.pt")], "same as --from-openclip"),
        ([*oc, "--output", str(w / "other_model")], "add --overwrite"),
        ([*oc, "--output", str(w / "data"), "--overwrite"], "not part of a model directory"),
        (["export", "--onnx", str(m), "--output", str(m)], "same as --onnx"),
        (["export", "--onnx", str(m), "--output", str(m / "onnx")], "inside --onnx"),
        (["export", "--onnx", str(m), "--output", str(w)], "contains --onnx"),
        (["export", "--onnx", str(m), "--output", str(w / "other_model")], "config.json"),
        (["export", "--onnx", str(m), "--output", str(w / "export")], "add --overwrite"),
        (["train", "--train-data", str(data / "train.csv"), "--output", str(data)], "contains"),
        (["train", "--train-data", str(data), "--output", str(data / "run")], "inside"),
        (["train", "--train-data", str(data / "train.csv"), "--init", str(m), "--output",
          str(m / "ft")], "inside --init"),
    ]  # fmt: skip


def test_outputs_that_would_change_an_input_are_refused(workspace):
    cases = overlap_cases(workspace)
    before = tree_snapshot(workspace, deep=True)
    results = run_cli_batch([argv for argv, _ in cases], cwd=workspace)
    for (_, says), proc in zip(cases, results):
        assert_one_line_error(proc, 2, says)
    assert tree_changes(before, tree_snapshot(workspace, deep=True)) == []


def test_api_refuses_overlap_and_keeps_what_exists(workspace, gallery):
    import coembed
    from coembed.errors import UsageError
    from coembed.index import build_index
    from coembed.interop.onnx import export_onnx
    from coembed.interop.openclip import export_openclip, import_openclip

    w, m = workspace, workspace / "model"
    before = tree_snapshot(w, deep=True)
    with pytest.raises(UsageError, match="inside --to-openclip"):
        export_openclip(str(m), str(m / "model.safetensors"))
    with pytest.raises(UsageError, match="--overwrite"):
        export_openclip(str(m), str(w / "exported.pt"))
    with pytest.raises(UsageError, match="contains --from-openclip"):
        import_openclip(str(w / "ckpt" / "oc.pt"), "rn50", str(w / "ckpt"))
    with pytest.raises(UsageError, match="add --overwrite"):
        import_openclip(str(w / "ckpt" / "oc.pt"), "rn50", str(w / "other_model"))
    with pytest.raises(UsageError, match="inside --onnx"):
        export_onnx(str(m), str(m / "onnx"))
    with pytest.raises(UsageError, match="add --overwrite"):
        export_onnx(str(m), str(w / "export"))
    with pytest.raises(UsageError, match="contains --train-data"):
        coembed.train(tiny_config(), w / "data" / "train.csv", w / "data", device="cpu")
    assert tree_changes(before, tree_snapshot(w, deep=True)) == []
    # Decided: an index may live inside the folder it indexes: none of its files is an image,
    # so adding the folder again adds nothing (the index does not index itself).
    photos = w / "photos"
    shutil.copytree(gallery / "a", photos)
    model = gallery / "model"
    build_index(photos / "index", model=model, images=photos, device="cpu", progress=False)
    again = build_index(photos / "index", images=photos, add=True, device="cpu", progress=False)
    assert (again.count_new, again.already_indexed, again.total) == (0, 6, 6)


@pytest.mark.slow
def test_export_killed_after_its_first_tower_leaves_the_old_export(workspace):
    """SIGKILL right after the new image tower is written: the old export is whole, and the next
    run clears what the killed one left."""
    w, export = workspace, workspace / "export"
    before = tree_snapshot(export, deep=True)
    args = ["export", "--onnx", str(w / "model"), "--output", str(export), "--overwrite"]
    proc = start(w, args, pause=0.2)
    seen = kill_at_event(proc, 2)
    assert seen[-1].startswith("after") and seen[-1].endswith(OLD_EXPORT[0]), seen
    assert proc.returncode == -signal.SIGKILL
    assert tree_changes(before, tree_snapshot(export, deep=True)) == []
    left = [p for p in w.iterdir() if p.name.startswith(".export.") and p.suffix == ".tmp"]
    assert len(left) == 1 and names(left[0]) == {OLD_EXPORT[0]}  # the new tower, set aside
    assert lock_files(w) == [".export.lock"]  # the killed holder's, stale
    ok(run_cli(*args))
    from coembed.interop.onnx import EXPORT_FILES

    assert names(export) == set(EXPORT_FILES)
    assert json.loads((export / "onnx.json").read_text())["embed_dim"] == 32
    assert not [p for p in w.iterdir() if p.name.startswith(".export.")]


def test_failed_conversion_leaves_the_old_model(workspace, monkeypatch):
    """A conversion that fails half-way (here: after its first file) replaces nothing."""
    import coembed.checkpoint as checkpoint
    from coembed.checkpoint import load_model_dir
    from coembed.interop import openclip

    w = workspace
    model, overrides = small_openclip("quickgelu")
    torch.save(model.state_dict(), w / "oc_real.pt")
    target = w / "other_model"
    before = tree_snapshot(target, deep=True)

    def fail_after_tokenizer(model, tokenizer, directory, preprocess=None):
        tokenizer.save(Path(directory) / "tokenizer.json")
        raise KeyboardInterrupt  # as a Ctrl-C half-way would

    monkeypatch.setattr(checkpoint, "save_model_dir", fail_after_tokenizer)
    with pytest.raises(KeyboardInterrupt):
        openclip.import_openclip(str(w / "oc_real.pt"), "rn50", str(target), overrides, True)
    assert tree_changes(before, tree_snapshot(target, deep=True)) == []
    assert not [p for p in w.iterdir() if p.name.startswith(".other_model.")]
    monkeypatch.undo()
    openclip.import_openclip(str(w / "oc_real.pt"), "rn50", str(target), overrides, True)
    converted, _, _ = load_model_dir(target)  # the converted model replaced the old one whole
    got = converted.state_dict()["text.token_embedding.weight"]
    assert torch.equal(got, model.token_embedding.weight.float())


def test_a_swap_interrupted_between_its_renames_is_put_back(tmp_path, monkeypatch):
    """Where the system cannot swap two folders in one step, the old folder is moved aside first;
    a kill between the two renames leaves it at ``.<name>.<8 chars>.old``, which the next run
    (under the same lock) puts back before anything else."""
    from coembed import files

    target = tmp_path / "export"
    target.mkdir()
    (target / "a.onnx").write_text("old")
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    real_rename, calls = os.rename, []

    def killed_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill between the renames
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", killed_on_second)
    with pytest.raises(KeyboardInterrupt), files.staged_folder(target) as stage:
        (stage / "a.onnx").write_text("new")
    monkeypatch.setattr(os, "rename", real_rename)
    assert not target.exists()
    files.clean_leftovers(target)
    assert (target / "a.onnx").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    with files.staged_folder(target) as stage:  # and a whole commit still works this way
        (stage / "a.onnx").write_text("new")
    assert (target / "a.onnx").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


# --- 7. a full disk -------------------------------------------------------------------------------


class SmallDisk:
    """A tmpfs of a given size at ``path`` that can grow and be filled to the last byte."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / "filler"

    def mount(self, size: str, remount: bool = False) -> None:
        options = f"remount,size={size}" if remount else f"size={size}"
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(self.path)],
            check=True,
            capture_output=True,
            text=True,
        )

    def fill(self) -> None:
        """Write a file until the disk has no byte left."""
        self.filler = self.path / "filler"
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            for size in (1 << 20, 1 << 16, 1 << 12, 1):
                try:
                    while os.write(fd, b"\0" * size):
                        pass
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)

    def unfill(self) -> None:
        self.filler.unlink(missing_ok=True)

    def entries(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir() if p.name != "filler")


@pytest.fixture
def small_disk(tmp_path):
    disk = SmallDisk(tmp_path / "disk")
    disk.path.mkdir()
    try:
        disk.mount("1m")
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        reason = getattr(exc, "stderr", "") or exc
        pytest.skip(f"cannot mount a tmpfs (it needs root): {str(reason).strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk.path)], check=False)


def test_index_on_a_full_disk_fails_cleanly_and_the_retry_works(gallery, small_disk):
    out = small_disk.path / "idx"
    args = ["index", "--model", str(gallery / "model"), "--images", str(gallery / "a")]
    args += ["--output", str(out), "--device", "cpu"]
    # 1 MB cannot hold the index's copy of the model (6 MB): the first build fails.
    assert_one_line_error(run_cli(*args), 1, "No space left on device")
    assert small_disk.entries() == []  # no half-built index, no lock, nothing in the way
    small_disk.mount("32m", remount=True)
    ok(run_cli(*args))
    assert items_of(out) == names(gallery / "a")


def test_index_add_on_a_full_disk_keeps_the_old_index(gallery, small_disk):
    small_disk.mount("32m", remount=True)
    idx = small_disk.path / "idx"
    shutil.copytree(gallery / "idx", idx)
    small_disk.fill()
    before = tree_snapshot(idx, deep=True)
    assert_one_line_error(run_cli(*add_args(gallery / "a", idx)), 1, "No space left on device")
    # Every file as it was (the folder itself changed: a temporary came and went).
    assert tree_changes(before, tree_snapshot(idx, deep=True)) == ["."]
    assert small_disk.entries() == ["idx"]
    assert items_of(idx) == names(gallery / "base")
    small_disk.unfill()
    ok(run_cli(*add_args(gallery / "a", idx)))
    assert items_of(idx) == names(gallery / "base") | names(gallery / "a")


def test_conversions_on_a_full_disk_leave_nothing(workspace, small_disk):
    model, overrides = small_openclip("quickgelu")
    torch.save(model.state_dict(), workspace / "oc_real.pt")
    sets = [a for o in overrides for a in ("--set", o)]
    d = small_disk.path
    results = run_cli_batch(
        [
            # torch.save says only "unexpected pos" when the disk is full
            ["convert", "--to-openclip", str(workspace / "model"), "--output", str(d / "m.pt")],
            ["convert", "--to-openclip", str(workspace / "model"), "--output", str(d / "m.safetensors")],
            ["convert", "--from-openclip", str(workspace / "oc_real.pt"), "--config", "rn50", *sets,
             "--output", str(d / "converted")],
        ]
    )  # fmt: skip
    for proc in results:
        assert_one_line_error(proc, 1, "No space left on device")
    assert small_disk.entries() == []


def test_api_writes_on_a_full_disk_raise_disk_full(tmp_path, monkeypatch):
    import faiss
    import safetensors

    import coembed.checkpoint as checkpoint
    from coembed.checkpoint import save_weights
    from coembed.errors import DiskFull
    from coembed.index import Index

    idx = tmp_path / "idx"
    Index.from_vectors(np.eye(4, dtype=np.float32), list("abcd")).save(idx)
    before = tree_snapshot(idx, deep=True)

    def faiss_full(index, path):
        raise RuntimeError(f"write error in {path}: 4051 != 4096000 (No space left on device)")

    def safetensors_full(*args, **kwargs):
        raise safetensors.SafetensorError("I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(faiss, "write_index", faiss_full)
    monkeypatch.setattr(checkpoint, "save_file", safetensors_full)
    other = Index.from_vectors(np.eye(4, dtype=np.float32)[::-1].copy(), list("wxyz"))
    with pytest.raises(DiskFull, match="No space left on device"):
        other.save(idx)
    with pytest.raises(DiskFull, match="No space left on device"):
        save_weights(tmp_path / "w.safetensors", {"x": torch.zeros(3)}, {})
    assert tree_changes(before, tree_snapshot(idx, deep=True)) == ["."]  # files as they were
    assert names(tmp_path) == {"idx"}  # no temporary, no lock file left
    assert Index.load(idx).items == list("abcd")


@pytest.mark.slow
def test_train_on_a_full_disk_removes_the_run_folder_it_created(small_disk, tmp_path):
    small_disk.mount("3m", remount=True)
    data = tiny_dataset(tmp_path / "data", n=16)
    out = small_disk.path / "run"
    # Its first checkpoint (1.5 MB of weights, 3 MB of optimizer state) does not fit.
    proc = run_cli(*train_args(data, out, "--set", "train.checkpoint_every=2", steps=2))
    assert_one_line_error(proc, 1, "No space left on device")
    assert small_disk.entries() == []


@pytest.mark.slow
def test_train_disk_full_at_a_checkpoint_keeps_the_previous_one(small_disk, tmp_path):
    from coembed.checkpoint import load_model_dir

    small_disk.mount("64m", remount=True)
    data = tiny_dataset(tmp_path / "data", n=16)
    out = small_disk.path / "run"
    settings = ["train.checkpoint_every=2", "train.keep_checkpoints=1", "train.deterministic=true"]
    args = train_args(data, out, *[a for s in settings for a in ("--set", s)], steps=4)
    run = Gated(args, out, tmp_path / "gate", match="step-0000004")
    run.wait_at_gate()  # step 2 is saved; step 4's checkpoint is being written
    kept = ["checkpoints/step-0000002", "model.safetensors", "config.json", "tokenizer.json"]
    before = {k: tree_snapshot(out / k, deep=True) for k in kept}
    small_disk.fill()
    proc = run.open()
    assert_one_line_error(proc, 1, "No space left on device")
    assert {k: tree_snapshot(out / k, deep=True) for k in kept} == before
    assert names(out / "checkpoints") == {"step-0000002"}  # no half-written step 4
    load_model_dir(out)
    small_disk.unfill()
    ok(run_cli(*args, "--resume"))
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


# --- 7. signals -----------------------------------------------------------------------------------


def test_sigterm_during_an_index_build_leaves_nothing(gallery, tmp_path):
    out = tmp_path / "idx"
    args = ["index", "--model", str(gallery / "model"), "--images", str(gallery / "a")]
    build = Gated([*args, "--output", str(out), "--device", "cpu"], out, tmp_path / "gate")
    build.wait_at_gate()  # the new FAISS file is written, not yet renamed
    build.proc.send_signal(signal.SIGTERM)
    out_text, err = build.proc.communicate(timeout=120)
    assert build.proc.returncode == 143, err
    assert [line for line in err.splitlines() if line.strip()] == ["coembed: terminated"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "code", "message"),
    [(signal.SIGTERM, 143, "coembed: terminated"), (signal.SIGINT, 130, "coembed: interrupted")],
)
def test_signal_to_the_process_group_while_workers_decode(tmp_path, signum, code, message):
    """SIGTERM acts as Ctrl-C does, also when the whole process group gets it (a terminal's
    Ctrl-C, a batch system ending the job): one line, its exit code, no worker traceback, no
    process left, and the run folder this run created is gone."""
    data = tiny_dataset(tmp_path / "data", n=80)
    out = tmp_path / "run"
    args = train_args(data, out, "--set", "data.workers=2", steps=2)
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_DECODE, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        start_new_session=True,
    )
    for line in proc.stderr:
        if line.startswith("@@ decoding"):
            break
    time.sleep(0.2)  # the other worker has started too
    os.killpg(proc.pid, signum)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("@@")]
    assert proc.returncode == code, err
    assert lines == [message], err
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):  # no worker outlived the run
        os.killpg(proc.pid, 0)
    assert not out.exists()


# --- 7. a failed train and a failed first index build leave nothing in the way -----------------


def test_failed_train_removes_only_a_run_folder_it_created(tmp_path):
    from coembed.training.run import remove_failed_output

    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(4):
        (broken / f"{i}.png").write_bytes(b"")
    (broken / "pairs.csv").write_text(
        "filepath,caption\n" + "".join(f"{i}.png,a picture {i}\n" for i in range(4))
    )
    (tmp_path / "empty").mkdir()
    runs = [tmp_path / "new" / "run", tmp_path / "empty"]
    results = run_cli_batch([train_args(broken / "pairs.csv", out) for out in runs])
    for proc in results:
        assert_one_line_error(proc, 1)
    assert not (tmp_path / "new").exists()  # created for this run: removed with its parents
    assert (tmp_path / "empty").is_dir()  # given: kept
    # A folder holding something training does not write, or a checkpoint, is never removed.
    foreign = tmp_path / "with-notes"
    foreign.mkdir()
    (foreign / "run_config.json").write_text("{}")
    (foreign / "notes.txt").write_text("mine")
    resumable = tmp_path / "with-checkpoint"
    (resumable / "checkpoints" / "step-0000002").mkdir(parents=True)
    for folder in (foreign, resumable):
        remove_failed_output(folder)
        assert folder.is_dir()


def test_a_killed_first_index_build_does_not_block_the_next(gallery, tmp_path):
    from coembed.index import build_index

    out = tmp_path / "idx"
    out.mkdir()
    (out / "index-000001.faiss").write_bytes(b"half")
    (out / "model-0123456789abcdef").mkdir()
    (out / "model-0123456789abcdef" / "config.json").write_text("{}")
    fd, _ = tempfile.mkstemp(prefix=".items-000001.json.", suffix=".tmp", dir=out)
    os.close(fd)
    report = build_index(out, model=gallery / "model", images=gallery / "a", device="cpu")
    assert report.total == 6
    assert items_of(out) == names(gallery / "a")
    copies = [n for n in names(out) if n.startswith("model-")]
    assert len(copies) == 1 and copies[0] != "model-0123456789abcdef"
    assert names(out) - set(copies) == {
        "index-000002.faiss",
        "index.json",
        "items-000002.json",
        "skipped.txt",
    }


def test_image_cache_on_a_full_disk_is_a_clean_error(small_disk, tmp_path, monkeypatch):
    """The cache file is sparse: written through a memmap, a worker writing into a hole of a full
    disk died of SIGBUS. Written with plain writes, a full disk is DiskFull, whether the cache
    folder or the temporary folder of an in-memory decode fills, and no half-written array
    stays."""
    import tempfile

    from coembed.data import cache
    from coembed.data.formats import read_records
    from coembed.errors import DiskFull

    records, _ = read_records(str(tiny_dataset(tmp_path / "data", n=8)), "filepath", "caption")
    sources = [r.image for r in records]
    folder = small_disk.path / "cache"
    monkeypatch.setattr(cache, "PARALLEL_MIN_IMAGES", 1)
    for workers in (0, 2):  # in this process, and in a pool of decoders
        with pytest.raises(DiskFull, match="No space left on device"):
            cache.decode_images(sources, 256, folder, num_workers=workers)  # 1.6 MB > 1 MB
        assert [p.name for p in folder.iterdir() if p.suffix != ".lock"] == []
    monkeypatch.setattr(tempfile, "tempdir", str(small_disk.path))
    with pytest.raises(DiskFull, match="No space left on device"):
        cache.decode_images(sources, 256, None, num_workers=0)
    assert small_disk.entries() == ["cache"]
    small_disk.mount("8m", remount=True)
    decoded = cache.decode_images(sources, 256, folder, num_workers=0)
    assert decoded.array.shape == (8, 256, 256, 3) and decoded.failures == {}


@pytest.mark.slow
def test_train_with_its_image_cache_on_a_full_disk_says_so(small_disk, tmp_path):
    data = tiny_dataset(tmp_path / "data", n=16)
    # 16 images cached at 256 px take 3 MB: more than the 1 MB disk holds.
    settings = ["model.image.image_size=224", f"data.cache_dir={small_disk.path / 'cache'}"]
    args = train_args(data, tmp_path / "run", *[a for s in settings for a in ("--set", s)])
    assert_one_line_error(run_cli(*args), 1, "No space left on device")
    assert [p.name for p in (small_disk.path / "cache").iterdir() if p.suffix != ".lock"] == []
