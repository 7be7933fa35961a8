"""`coembed train` through the command line: splits that do not leak, a clean stop on Ctrl-C and
SIGTERM, a quiet profile, parameter counts and file modes, and the options of larger runs
(resampled webdataset shards, learning-rate schedules, gradient checkpointing, zero-shot
evaluation during training)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import signal
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    CLIP_TOKENIZER,
    SHIPPED,
    assert_nothing_half_written,
    assert_one_line_error,
    copy_images,
    metrics,
    ok,
    run_cli,
    run_cli_batch,
    shipped_rows,
    tiny_clip_model,
    tiny_config,
    tiny_dataset,
    train_args,
    weights,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("data"), n=24)


def loss_lines(output: Path) -> list[dict]:
    return [m for m in metrics(output) if "loss" in m]


# ---------------------------------------------------------------------------------- 3: splits


@pytest.fixture(scope="module")
def karpathy(tmp_path_factory) -> Path:
    """A Karpathy split JSON: 10 train, 2 restval, 4 val and 4 test images, two captions each."""
    root = tmp_path_factory.mktemp("karpathy")
    rows = shipped_rows(20)
    copy_images(rows, root / "images")
    splits = ["train"] * 10 + ["restval"] * 2 + ["val"] * 4 + ["test"] * 4
    images = [
        {
            "filename": name,
            "filepath": "images",
            "imgid": i,
            "split": split,
            "sentences": [{"raw": caption}, {"raw": f"another view: {caption}"}],
        }
        for i, ((name, caption), split) in enumerate(zip(rows, splits))
    ]
    path = root / "dataset.json"
    path.write_text(json.dumps({"images": images}))
    return path


def test_karpathy_splits_train_on_train_and_validate_on_val(karpathy, tmp_path):
    import coembed

    default, api = tmp_path / "default", tmp_path / "api"
    proc = ok(run_cli(*train_args(karpathy, default, "--val-data", str(karpathy), steps=1)))
    # train + restval: 12 images, 24 pairs (the whole file would be 40).
    assert "on 24 pairs" in proc.stdout, proc.stdout
    assert "training on the 'train' split" in proc.stdout, proc.stdout
    assert "validating on the 'val' split" in proc.stdout, proc.stdout
    saved = json.loads((default / "run_config.json").read_text())
    assert (saved["split"], saved["val_split"]) == ("train", "val")
    # The Python API takes the validation split too.
    cfg = tiny_config(
        "train.steps=1", "train.batch_size=8", "train.device=cpu", "data.workers=0",
        "train.reuse_memory=false",
    )  # fmt: skip
    coembed.train(cfg, karpathy, api, val_data=str(karpathy), split="train", val_split="test")
    saved = json.loads((api / "run_config.json").read_text())
    assert (saved["split"], saved["val_split"]) == ("train", "test")


def test_bad_options_are_one_line_errors(data, karpathy, tmp_path):
    """Item 3: one split for training and validation; item 4: --resume with nothing to resume;
    item 12: resampling data that are not shards, a cooldown of no steps, no class folder."""
    val = ("--val-data", str(karpathy))
    cases = [
        (karpathy, ("--split", "val", "--val-split", "val", *val), 2, "same file"),
        (karpathy, ("--split", "train", "--val-split", "restval", *val), 2, "same file"),
        (data, ("--resume",), 2, "no run to resume"),
        (data, ("--train-num-samples", "16"), 2, "webdataset"),
        (data, ("--lr-schedule", "const-cooldown"), 2, "train.cooldown_steps"),
        (data, ("--zeroshot-data", str(tmp_path / "none")), 1, "no such folder"),
    ]
    outputs = [tmp_path / f"run{i}" for i in range(len(cases))]
    procs = run_cli_batch(
        [train_args(path, out, *extra, steps=1) for (path, extra, _, _), out in zip(cases, outputs)]
    )
    for proc, (_, extra, code, message), out in zip(procs, cases, outputs):
        assert_one_line_error(proc, code=code, contains=message)
        assert not out.exists(), extra


# ---------------------------------------------------------------------------------- 4: signals

STEPS = 24  # 16 pairs drawn into epochs of 24 in batches of 8: 3 steps an epoch, 8 epochs


def write_shards(folder: Path) -> str:
    """Two webdataset shards of unequal size (10 and 6 pairs); returns their brace pattern."""
    rows = shipped_rows(16)
    folder.mkdir(parents=True)
    for shard, part in enumerate((rows[:10], rows[10:])):
        with tarfile.open(folder / f"shard-{shard}.tar", "w") as tar:
            for i, (name, caption) in enumerate(part):
                for member, payload in (
                    (f"{shard}{i:04d}.png", (SHIPPED / "images" / name).read_bytes()),
                    (f"{shard}{i:04d}.txt", caption.encode()),
                ):
                    info = tarfile.TarInfo(member)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(folder / "shard-{0..1}.tar")


def resampled_command(shards: str, out: Path) -> list[str]:
    settings = ["train.checkpoint_every=1000", "train.log_every=1", "train.deterministic=true"]
    settings = [a for s in settings for a in ("--set", s)]
    args = train_args(shards, out, *settings, *CLIP_TOKENIZER, steps=STEPS)
    return [sys.executable, "-m", "coembed", *args, "--train-num-samples", "24"]


def stop_at(cmd: list[str], out: Path, step: int, signum: int) -> subprocess.CompletedProcess:
    """Run ``cmd`` and send it ``signum`` once metrics.jsonl shows ``step``."""
    env = {**os.environ, "COEMBED_NO_PROGRESS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while not (out / "metrics.jsonl").exists() or all(m["step"] < step for m in loss_lines(out)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.mark.slow
def test_sigterm_and_ctrl_c_save_the_step_and_resume_bitwise(tmp_path):
    """Also item 12's resampled shards: the epochs drawn again after each resume are the same."""
    shards = write_shards(tmp_path / "shards")
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    uninterrupted = subprocess.Popen(
        resampled_command(shards, reference),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COEMBED_NO_PROGRESS": "1"},
    )
    resume = [sys.executable, "-m", "coembed", "train", "--output", str(stopped), "--resume"]
    saved_steps = []
    for i, (signum, code) in enumerate(((signal.SIGTERM, 143), (signal.SIGINT, 130))):
        cmd = resume if i else resampled_command(shards, stopped)
        proc = stop_at(cmd, stopped, 4 + 8 * i, signum)
        assert proc.returncode == code, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
        # The exact command that continues the run, and the checkpoint of the step it stopped at.
        assert f"continue with: coembed train --output {stopped} --resume" in proc.stderr
        step = int(re.search(r"stopped after step (\d+)", proc.stderr).group(1))
        assert 4 + 8 * i <= step < STEPS
        assert (stopped / "checkpoints" / f"step-{step:07d}").is_dir()
        assert_nothing_half_written(stopped)
        saved_steps.append(step)
    final = run_cli("train", "--output", str(stopped), "--resume")
    ok(final)
    assert f"resuming at step {saved_steps[-1]}" in final.stdout
    stdout, stderr = uninterrupted.communicate(timeout=300)
    ok(subprocess.CompletedProcess(uninterrupted.args, uninterrupted.returncode, stdout, stderr))
    assert "24 steps of 8" in stdout  # 3 batches an epoch: 24 pairs drawn from 16
    want, got = weights(reference), weights(stopped)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    losses = [(m["step"], m["loss"]) for m in loss_lines(stopped)]
    assert losses == [(m["step"], m["loss"]) for m in loss_lines(reference)]
    assert [s for s, _ in losses] == list(range(1, STEPS + 1))


def test_resampled_epochs_draw_with_replacement_seeded(tmp_path):
    from coembed.data.formats import read_records
    from coembed.training.inputs import ResampledShards

    records, _ = read_records(write_shards(tmp_path / "shards"))
    data = ResampledShards.from_records(records, 32, cache_dir=None, num_workers=0)
    data.draw_per_epoch(40)
    first = data.epoch_pairs(seed=3, epoch=0)
    assert len(first) == 40 and len(set(first.tolist())) < 40  # more than the 16 pairs: repeats
    assert torch.equal(first, data.epoch_pairs(seed=3, epoch=0))
    assert not torch.equal(first, data.epoch_pairs(seed=3, epoch=1))
    assert not torch.equal(first, data.epoch_pairs(seed=4, epoch=0))
    # A resumed epoch (from batch 2 on) gives the batches of the uninterrupted one.
    whole = list(data.epoch_batches(0, 3, 8, augment=False))
    tail = list(data.epoch_batches(0, 3, 8, start_batch=2, augment=False))
    assert len(whole) == 5 and len(tail) == 3
    for (a, ca), (b, cb) in zip(whole[2:], tail):
        assert torch.equal(a, b) and ca == cb


# ---------------------------------------------------------------------------------- 9: profile


@pytest.mark.slow
def test_profile_is_quiet_and_leaves_a_folder_the_real_run_takes(data, tmp_path):
    out = tmp_path / "run"
    proc = ok(run_cli(*train_args(data, out, "--profile", steps=4)))
    assert "MFU" in proc.stdout
    assert "ERROR" not in proc.stderr and "USDT" not in proc.stderr, proc.stderr
    assert (out / "profile.json").exists() and not (out / "run_config.json").exists()
    ok(run_cli(*train_args(data, out, steps=1)))
    assert [m["step"] for m in loss_lines(out)] == [1]


# ---------------------------------------------------------------------------------- 11: counts, modes


def test_locked_fine_tuning_prints_trainable_and_frozen_counts(data, tiny_model_dir, tmp_path):
    proc = ok(
        run_cli(*train_args(data, tmp_path / "run", "--init", str(tiny_model_dir), "--lock-image"))
    )
    model = tiny_clip_model()
    frozen = sum(p.numel() for p in model.visual.parameters())
    trainable = sum(p.numel() for p in model.parameters()) - frozen
    assert f"parameters: {trainable:,} trainable, {frozen:,} frozen" in proc.stdout, proc.stdout


@contextlib.contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def test_files_are_written_with_the_users_umask(data, tmp_path):
    out, index = tmp_path / "run", tmp_path / "index"
    with umask(0o027):
        indexing = ["index", "--model", str(out), "--images", str(data.parent / "images")]
        procs = run_cli_batch(
            [train_args(data, out, steps=1), [*indexing, "--output", str(index), "--device", "cpu"]]
        )
    for proc in procs:
        ok(proc)
    mode = {
        p: stat.S_IMODE(p.stat().st_mode) for p in [out, index, *out.rglob("*"), *index.rglob("*")]
    }
    files = [p for p in mode if p.is_file()]
    folders = [p for p in mode if p.is_dir()]
    assert out / "model.safetensors" in files
    assert any(p.parent.name.startswith("model-") for p in files)  # the index's model copy
    assert {str(p.relative_to(tmp_path)): oct(mode[p]) for p in files if mode[p] != 0o640} == {}
    assert {str(p.relative_to(tmp_path)): oct(mode[p]) for p in folders if mode[p] != 0o750} == {}


# ---------------------------------------------------------------------------------- 12: larger runs


def test_learning_rate_schedules(data, tmp_path):
    runs = {name: tmp_path / name for name in ("cosine", "constant", "cooldown")}
    extra = ("--set", "train.warmup_steps=2", "--set", "train.log_every=1", "--lr", "0.001")
    procs = run_cli_batch(
        [
            train_args(data, runs["cosine"], *extra, steps=8),
            train_args(data, runs["constant"], *extra, "--lr-schedule", "constant", steps=8),
            train_args(
                data,
                runs["cooldown"],
                *extra,
                "--set",
                "train.schedule=const-cooldown",
                "--set",
                "train.cooldown_steps=4",
                steps=8,
            ),  # fmt: skip
        ]
    )
    for proc in procs:
        ok(proc)
    lrs = {name: [m["lr"] for m in loss_lines(out)] for name, out in runs.items()}
    warmup = [0.0005, 0.001]
    assert lrs["constant"] == pytest.approx(warmup + [0.001] * 6)
    assert lrs["cooldown"] == pytest.approx(
        warmup + [0.001] * 2 + [0.001, 0.00075, 0.0005, 0.00025]
    )
    assert lrs["cosine"][:3] == pytest.approx(warmup + [0.001])
    assert all(a > b for a, b in zip(lrs["cosine"][2:], lrs["cosine"][3:]))


def test_gradient_checkpointing_same_loss_and_weights(data, tmp_path):
    plain, recomputed = tmp_path / "plain", tmp_path / "recomputed"
    extra = ("--set", "train.deterministic=true", "--set", "train.log_every=1", *CLIP_TOKENIZER)
    procs = run_cli_batch(
        [
            train_args(data, plain, *extra, steps=3),
            train_args(data, recomputed, *extra, "--grad-checkpointing", steps=3),
        ]
    )
    for proc in procs:
        ok(proc)
    # Tolerance 1e-6: recomputing runs the same kernels on the same inputs (measured: equal).
    want, got = loss_lines(plain), loss_lines(recomputed)
    assert [m["loss"] for m in got] == pytest.approx([m["loss"] for m in want], abs=1e-6)
    a, b = weights(plain), weights(recomputed)
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) <= 1e-6
    saved = json.loads((recomputed / "run_config.json").read_text())["config"]["train"]
    assert saved["grad_checkpointing"] is True


def saved_bytes(grad_checkpointing: bool) -> tuple[int, dict[str, torch.Tensor], dict]:
    """Bytes the forward keeps for the backward pass; the gradients; the state after."""
    from coembed.loss import make_loss

    torch.manual_seed(0)
    images, tokens = torch.randn(8, 3, 32, 32), torch.randint(1, 49000, (8, 16))
    tokens[:, 9] = 49407
    model = tiny_clip_model().train()
    model.visual.grad_checkpointing = model.text.grad_checkpointing = grad_checkpointing
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        make_loss("clip")(**model(images, tokens)).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return sum(kept.values()), grads, model.state_dict()


def test_gradient_checkpointing_keeps_less_for_the_backward_pass():
    plain, grads, state = saved_bytes(False)
    recomputed, grads_r, state_r = saved_bytes(True)
    print(f"kept for backward: {plain / 1e6:.2f} MB plain, {recomputed / 1e6:.2f} MB recomputed")
    assert recomputed < 0.5 * plain
    for name in grads:
        assert torch.allclose(grads[name], grads_r[name], atol=1e-6), name
    # BatchNorm's running statistics count the batch once, not again in the recomputation.
    for name in state:
        assert torch.equal(state[name], state_r[name]), name


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory) -> Path:
    """Three class sub-folders of shipped images whose caption names one shape."""
    root = tmp_path_factory.mktemp("classes")
    with open(SHIPPED / "val.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for shape in ("star", "hexagon", "triangle"):
        names = [Path(r["filepath"]).name for r in rows if shape in r["caption"].split()][:4]
        copy_images([(n, "") for n in names], root / shape)
    return root


def test_zeroshot_accuracy_at_each_validation(data, class_folder, tmp_path):
    out = tmp_path / "run"
    proc = ok(run_cli(*train_args(data, out, "--zeroshot-data", str(class_folder), steps=None,
                                  batch=8), "--epochs", "2"))  # fmt: skip
    logged = [m for m in metrics(out) if "zeroshot/top1" in m]
    assert [m["step"] for m in logged] == [3, 6]  # each epoch's end: 24 pairs in batches of 8
    for m in logged:
        assert 0 <= m["zeroshot/top1"] <= m["zeroshot/top5"] == 1.0  # three classes: top-5 is all
    assert len(re.findall(r"step \d zero-shot: top-1 \d\.\d{3}  top-5 1\.000", proc.stdout)) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["zeroshot_top1"] == logged[-1]["zeroshot/top1"]
