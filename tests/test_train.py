"""End-to-end `coembed train` in a subprocess on tiny data: bad input, divergence, logs and
progress, validation, fine-tuning with locked towers, gradient accumulation.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    CLIP_TOKENIZER,
    TINY_SET,
    assert_one_line_error,
    metrics,
    ok,
    run_cli,
    run_cli_batch,
    tiny_dataset,
    tiny_train_run,
    train_args,
    weights,
    write_csv,
)

RETRIEVAL_KEYS = [f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)]


def run_many(
    arg_lists: list[list[str]], cwd: Path | None = None, env: dict | None = None
) -> list[subprocess.CompletedProcess]:
    """Run several CLI calls, two at a time (the imports dominate and the machine has 2 cores)."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda a: run_cli(*a, cwd=cwd, env=env), arg_lists))


def initial_weights(output: Path) -> dict[str, torch.Tensor]:
    """A run's weights before its first step: the model of its config built after seeding."""
    from coembed.checkpoint import read_model_config
    from coembed.model import CoEmbed

    cfg, _ = read_model_config(output)
    torch.manual_seed(0)
    return CoEmbed(cfg).state_dict()


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ---------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("data"), n=24)


def test_bad_input_is_one_line_and_loses_nothing(data, logged_run, tmp_path):
    done, _ = logged_run  # a finished run: a second `train` into it must not touch a file
    before = tree_digest(done)
    no_caption = write_csv(
        tmp_path / "cols.csv", [("images/x.png", "a")], header=("filepath", "text")
    )
    nothing = write_csv(tmp_path / "gone.csv", [(f"nope/{i}.png", f"c {i}") for i in range(8)])
    model_dir = tmp_path / "model_only"
    model_dir.mkdir()
    model_files = ["config.json", "model.safetensors", "preprocess.json", "tokenizer.json"]
    for name in model_files:
        shutil.copyfile(done / name, model_dir / name)
    out = str(tmp_path / "out")
    # The first cases run as their own `python -m coembed` process, the rest in one batch.
    alone = [
        (train_args(no_caption, out), 1, "the file has columns 'filepath', 'text'"),
        (train_args(data, done, steps=1), 2, "already holds a training run"),
    ]
    batched = [
        (train_args(data.parent / "missing.csv", out), 1, "no such file or folder"),
        (train_args(nothing, out), 1, "none of the 8 images could be read"),
        (train_args(data, out, "--set", "train.nope=1"), 2, "unknown config key 'train.nope'"),
        (train_args(data, out, "--set", "train.lr=fast"), 2, "train.lr: expected a number"),
        (train_args(data, out, "--set", "model.text.heads=5"), 2, "divisible"),
        (train_args(data, out, "--set", "train.accum_steps=3"), 2, "divisible"),
        (train_args(data, out, batch=32), 1, "lower the batch size"),
        (train_args(data, done, "--set", "train.lr=1", "--resume"), 2, "train.lr=1.0"),
        (train_args(data, model_dir), 2, "holds a model directory"),
        (["train", "--train-data", str(data)], 2, "--output"),
    ]
    procs = run_many([c[0] for c in alone]) + run_cli_batch([c[0] for c in batched])
    for proc, (_, code, text) in zip(procs, alone + batched):
        assert_one_line_error(proc, code, text)
    assert tree_digest(done) == before
    assert sorted(p.name for p in model_dir.iterdir()) == model_files
    # A failed start (batch too big) leaves nothing that refuses the corrected command.
    assert not (Path(out) / "run_config.json").exists()


def test_broken_images_and_empty_captions_are_skipped_and_counted(data, tmp_path):
    rows = list(csv.reader(open(data)))[1:]
    images = data.parent / "images"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "zero.png").write_bytes(b"")
    (broken / "corrupt.png").write_bytes(b"this is not a png at all" * 10)
    png = (images / Path(rows[0][0]).name).read_bytes()
    (broken / "cut.png").write_bytes(png[: len(png) // 2])
    bad = [
        (str(broken / "zero.png"), "zero bytes"),
        (str(broken / "corrupt.png"), "corrupt"),
        (str(broken / "cut.png"), "truncated"),
        (str(broken / "missing.png"), "missing"),
    ]
    empty = [(str(images / Path(r[0]).name), "  ") for r in rows[:3]]
    good = [(str(images / Path(r[0]).name), r[1]) for r in rows]
    csv_path = write_csv(tmp_path / "mixed.csv", good + bad + empty)
    out = tmp_path / "run"
    proc = ok(run_cli(*train_args(csv_path, out, steps=2)))
    end = proc.stdout.strip().splitlines()
    assert "3 empty captions skipped" in end[-1], proc.stdout
    assert "images skipped: 1 corrupt, 1 empty, 1 missing, 1 truncated" in end[-1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["empty_captions"] == 3
    assert summary["skipped_images"] == {"corrupt": 1, "empty": 1, "missing": 1, "truncated": 1}
    logged = metrics(out)
    assert logged[0]["empty_captions"] == 3 and "3 empty captions" in logged[0]["data"]
    assert logged[-1]["skipped_images"] == summary["skipped_images"]


# ---------------------------------------------------------------------------------- divergence


def test_divergence_stops_with_the_last_good_checkpoint(data, tmp_path):
    """A huge learning rate without clipping blows the weights up within two steps."""
    out = tmp_path / "run"
    proc = run_cli(
        *train_args(data, out, steps=10),
        *("--set", "train.lr=1e12", "--set", "train.grad_clip=0"),
        *("--set", "train.warmup_steps=0", "--set", "train.checkpoint_every=1"),
        *("--set", "train.log_every=1"),
    )
    assert_one_line_error(proc, 1, "loss became nan")
    step = int(re.search(r"at step (\d+)", proc.stderr).group(1))
    kept = sorted((out / "checkpoints").iterdir())
    assert kept and kept[-1].name == f"step-{step - 1:07d}", (kept, proc.stderr)
    assert str(kept[-1]) in proc.stderr
    import coembed

    model = coembed.load(out)  # the top-level model is the last good one
    top = weights(out)
    for name, tensor in weights(kept[-1]).items():
        assert torch.isfinite(tensor).all(), name
        assert torch.equal(tensor, top[name]), name
    assert model.embed_texts(["a red circle"]).shape == (1, 32)
    assert "loss became nan" in metrics(out)[-1]["diverged"]


# ---------------------------------------------------------------------------------- logs


@pytest.fixture(scope="module")
def logged_run(data, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Two epochs of 3 steps with validation after each, the progress bar on."""
    out = tmp_path_factory.mktemp("logged") / "run"
    val = tiny_dataset(data.parent.parent / "val", n=16, split="val")
    proc = run_cli(
        *train_args(data, out, "--epochs", "2", "--val-data", str(val), steps=None),
        *("--set", "train.log_every=1", "--set", "train.checkpoint_every=2"),
        env={"COEMBED_NO_PROGRESS": "0"},
    )
    return out, ok(proc)


def test_progress_bar_shows_loss_lr_rate_and_eta(logged_run):
    _, proc = logged_run
    final = proc.stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert re.search(r"6/6 \[\d\d:\d\d<\d\d:\d\d, ", final), final  # elapsed<ETA
    assert re.search(r"loss=\d+\.\d{3}, lr=\d\.\d\de-\d\d, samples_s=\d+\]", final), final


def test_metrics_and_tensorboard_hold_the_step_losses(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = logged_run
    logged = metrics(out)
    losses = {m["step"]: m["loss"] for m in logged if "loss" in m}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert all(0 < v < 10 for v in losses.values())
    for m in logged:
        if "loss" in m:
            assert {"epoch", "lr", "grad_norm", "samples_per_s", "logit_scale"} <= set(m)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("loss")
    assert [s.step for s in scalars] == [1, 2, 3, 4, 5, 6]
    assert [s.value for s in scalars] == pytest.approx([losses[s] for s in range(1, 7)])
    assert len(events.Scalars("val/image_to_text_R_at_1")) == 2


def test_validation_recall_both_ways_after_each_epoch(logged_run):
    out, proc = logged_run
    val = [m for m in metrics(out) if "val/image_to_text_R@1" in m]
    assert [(m["step"], m["epoch"]) for m in val] == [(3, 0), (6, 1)]
    for m in val:
        for key in RETRIEVAL_KEYS:
            assert 0.0 <= m[f"val/{key}"] <= 1.0, key
        assert m["val/image_to_text_R@1"] <= m["val/image_to_text_R@5"]
        assert m["val/image_to_text_R@5"] <= m["val/image_to_text_R@10"]
        for key in ("image_to_text", "text_to_image"):
            assert 1 <= m[f"val/{key}_median_rank"] <= m["val/captions"], key
            assert 1 <= m[f"val/{key}_mean_rank"] <= m["val/captions"], key
    # The per-validation line shows R@1 and the median and mean rank both ways.
    line = r"step {} val: i2t R@1 [\d.]+ rank median \d+ mean [\d.]+  t2i R@1 [\d.]+ rank median"
    assert re.search(line.format(3), proc.stdout) and re.search(line.format(6), proc.stdout)
    summary = json.loads((out / "summary.json").read_text())
    assert {k: summary[k] for k in RETRIEVAL_KEYS} == {
        k: val[-1][f"val/{k}"] for k in RETRIEVAL_KEYS
    }
    assert "val recall@1/5/10  image->text" in proc.stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-0000004",
        "step-0000006",
    ]


# ---------------------------------------------------------------------------------- fine-tuning


def test_init_with_locked_towers(data, logged_run, tmp_path):
    base, _ = logged_run
    lock_image, lock_text = tmp_path / "lock_image", tmp_path / "lock_text"
    extra = ("--init", str(base), "--set", "train.lr=1e-2", "--set", "train.warmup_steps=0")
    procs = run_many(
        [
            train_args(data, lock_image, *extra, "--lock-image", steps=3),
            train_args(data, lock_text, *extra, "--lock-text", steps=3),
        ]
    )
    for proc in procs:
        ok(proc)
    start = weights(base)
    for out, frozen, trained in ((lock_image, "visual.", "text."), (lock_text, "text.", "visual.")):
        after = weights(out)
        assert after.keys() == start.keys()
        # Frozen means every tensor, BatchNorm running statistics included.
        same = [k for k in start if k.startswith(frozen) and not torch.equal(start[k], after[k])]
        assert not same, (out.name, same[:3])
        moved = [k for k in start if k.startswith(trained) and not torch.equal(start[k], after[k])]
        assert len(moved) > 0.5 * sum(k.startswith(trained) for k in start), out.name
        # Fine-tuning keeps the model's tokenizer.
        assert (out / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()


# ---------------------------------------------------------------------------------- accumulation


def test_accumulation_matches_one_full_batch_through_the_cli(data, tmp_path):
    """One step of batch 16 with accum_steps 2 equals one step without accumulation.

    BatchNorm in train mode normalizes each micro-batch with its own statistics, so the trunk is
    frozen here (its BatchNorm in eval mode, per-sample) while the attention pool and projection
    of the image tower, the whole text tower and the temperature train. The in-process test below
    covers every parameter, the convolutions included.
    """
    runs = {n: tmp_path / f"accum{n}" for n in (1, 2)}
    common = ("--lock-image", "--set", "train.lock_image_unlocked_groups=1", *CLIP_TOKENIZER)
    common += ("--set", "train.log_every=1", "--set", "data.augment=false")
    procs = run_many(
        [
            train_args(data, out, *common, "--set", f"train.accum_steps={n}", steps=1, batch=16)
            for n, out in runs.items()
        ]
    )
    for proc in procs:
        ok(proc)
    one, two = (next(m for m in metrics(out) if "loss" in m) for out in runs.values())
    # float32 sums in another order: the loss to 1e-6, the gradient norm to 1e-5 (relative).
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    w1, w2, w0 = weights(runs[1]), weights(runs[2]), initial_weights(runs[1])
    for name in w1:
        # Adam's first step moves a weight by lr * g / (|g| + eps). Where the true gradient is
        # exactly zero (attention's key bias: softmax ignores a shift) g is float32 noise of
        # ~1e-9, which that step scales by lr / eps = 1e3: differences up to ~1e-6 are noise.
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=2e-6, msg=name)
    moved = [k for k in w1 if not torch.equal(w1[k], w0[k])]
    assert any(k.startswith("visual.pool") for k in moved) and any(
        k.startswith("text.") for k in moved
    ), moved


@pytest.fixture
def tiny_run():
    """A TrainRun on a tiny model, built in memory, with BatchNorm switched to eval mode."""
    captions = [f"caption number {i} of {i % 3} things" for i in range(16)] + ["a caption"]
    return tiny_train_run(captions, TINY_SET, batchnorm_eval=True)


@pytest.mark.parametrize("n", [2, 4])
def test_accumulated_gradients_equal_full_batch_gradients(tiny_run, n):
    """Every parameter's gradient (convolutions and temperature included) with BatchNorm in eval
    mode, where each sample's features do not depend on the rest of its micro-batch."""
    from coembed.training.step import accumulated_backward, forward_loss

    run = tiny_run
    g = torch.Generator().manual_seed(1)
    images = torch.randn(16, 3, 32, 32, generator=g)
    tokens = run.tokenizer([f"caption number {i} of {i % 3} things" for i in range(16)])
    full = forward_loss(run, images, tokens)
    full.backward()
    expected = {k: p.grad.clone() for k, p in run.model.named_parameters() if p.grad is not None}
    buffers = {k: b.clone() for k, b in run.model.named_buffers()}
    run.model.zero_grad(set_to_none=True)
    run.cfg.train.accum_steps = n
    loss = accumulated_backward(run, images, tokens)
    got = {k: p.grad for k, p in run.model.named_parameters() if p.grad is not None}
    assert loss.item() == pytest.approx(full.item(), rel=1e-6)
    assert got.keys() == expected.keys() and "logit_scale" in got
    for name, grad in expected.items():
        # float32 sums in another order; the largest gradients here are ~1e-1.
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    for name, b in run.model.named_buffers():
        assert torch.equal(b, buffers[name]), name


def test_caching_pass_leaves_batchnorm_statistics_alone(tiny_run):
    """In train mode, accumulation updates BatchNorm running statistics once per micro-batch."""
    from coembed.training.step import accumulated_backward, forward_loss

    run = tiny_run
    run.model.train()
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    tokens = run.tokenizer(["a caption"] * 8)
    reference = {k: b.clone() for k, b in run.model.named_buffers()}
    for chunk_i, chunk_t in zip(images.chunk(2), tokens.chunk(2)):
        forward_loss(run, chunk_i, chunk_t)
    expected = {k: b.clone() for k, b in run.model.named_buffers()}
    with torch.no_grad():
        for k, b in run.model.named_buffers():
            b.copy_(reference[k])
    run.cfg.train.accum_steps = 2
    accumulated_backward(run, images, tokens)
    for name, b in run.model.named_buffers():
        assert torch.equal(b, expected[name]), name


def test_streamed_batches_stay_full_when_images_fail(data, tmp_path):
    """Streaming mode (data too big for the cache): a failed image is replaced by the next pair
    that decodes, so every batch keeps its size (DDP all-gathers equal shapes; step b is batch b)."""
    from coembed.data.formats import read_records
    from coembed.data.loader import PairData
    from coembed.errors import DataError

    records, _ = read_records(str(data))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    records[1].image = records[5].image = str(broken)
    stream = PairData.from_records(records, 32, cache_dir=None, max_cache_bytes=0, num_workers=0)
    batches = list(stream.epoch_batches(0, 0, 8, augment=False, fill_failed=True))
    assert [len(c) for _, c in batches] == [8, 8, 8]
    assert [x.shape[0] for x, _ in batches] == [8, 8, 8]
    assert stream.skipped == {"corrupt": 1}
    for _, captions in batches:
        assert len(set(captions)) == 8  # no pair twice (tests/test_training_correctness.py)
    # Resuming at batch 2 gives batch 2 of the uninterrupted epoch.
    (x2, c2), *_ = stream.epoch_batches(0, 0, 8, start_batch=2, augment=False, fill_failed=True)
    assert c2 == batches[2][1] and torch.equal(x2, batches[2][0])
    for record in records:
        record.image = str(broken)
    nothing = PairData.from_records(records, 32, cache_dir=None, max_cache_bytes=0, num_workers=0)
    with pytest.raises(DataError, match="batch 0 has 8 images that could not be read"):
        next(nothing.epoch_batches(0, 0, 8, fill_failed=True))
