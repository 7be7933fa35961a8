"""A run killed with SIGKILL at random moments and resumed each time ends with exactly the weights
of a run that was never interrupted, and no kill ever leaves a half-written model or checkpoint."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    CLIP_TOKENIZER,
    assert_nothing_half_written,
    metrics,
    ok,
    tiny_dataset,
    train_args,
    weights,
)

STEPS = 40  # 32 pairs in batches of 8: 4 per epoch, so resumes land mid-epoch and on boundaries


def command(data: Path, out: Path, *extra: str) -> list[str]:
    settings = ["train.checkpoint_every=3", "train.log_every=1", "train.deterministic=true"]
    settings = [a for s in settings for a in ("--set", s)]
    args = train_args(data, out, *settings, *CLIP_TOKENIZER, steps=STEPS)
    return [sys.executable, "-m", "coembed", *args, *extra]


def start(cmd: list[str]) -> subprocess.Popen:
    env = {**os.environ, "COEMBED_NO_PROGRESS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def last_step(out: Path) -> int:
    """The highest step in metrics.jsonl (a line being written may be cut off: skipped)."""
    path, best = out / "metrics.jsonl", 0
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if "loss" in row:
                best = max(best, row["step"])
    return best


def wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while last_step(out) < step:
        assert proc.poll() is None, f"run ended before step {step}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"no step {step} within {timeout} s"
        time.sleep(0.02)


@pytest.mark.slow
def test_killed_and_resumed_run_ends_with_the_same_weights(tmp_path):
    data = tiny_dataset(tmp_path / "data", n=32)
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    uninterrupted = start(command(data, reference))
    rng = random.Random(4)
    # One kill during start-up, then at four random steps, each after a random extra delay so
    # that some land inside a checkpoint write.
    kill_steps = [0, *sorted(rng.sample(range(2, STEPS - 2), 4))]
    kills = []
    for step in kill_steps:
        # A run killed before it saved run_config.json has nothing to resume (--resume says so).
        started = (resumed / "run_config.json").exists()
        proc = start(command(data, resumed, *(["--resume"] if started else [])))
        if step == 0:
            time.sleep(rng.uniform(0.5, 3.0))
        else:
            wait_for_step(proc, resumed, max(step, last_step(resumed) + 1))
            time.sleep(rng.uniform(0.0, 0.2))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills.append(last_step(resumed))
        assert_nothing_half_written(resumed)
    final = start(command(data, resumed, "--resume"))
    for proc in (final, uninterrupted):
        stdout, stderr = proc.communicate(timeout=300)
        ok(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    assert len(set(kills)) >= 4, kills  # the kills really happened at different points

    # Bitwise: the same data order, augmentation, optimizer state and RNG after every resume
    # (CPU, one thread, deterministic algorithms).
    want, got = weights(reference), weights(resumed)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    # The log of the resumed run holds each step once, with the uninterrupted run's losses.
    losses = [(m["step"], m["loss"]) for m in metrics(resumed) if "loss" in m]
    assert losses == [(m["step"], m["loss"]) for m in metrics(reference) if "loss" in m]
    assert [s for s, _ in losses] == list(range(1, STEPS + 1))
    assert json.loads((resumed / "summary.json").read_text())["steps"] == STEPS
