"""``train(..., profile=True)``: how close a training step comes to the hardware's matmul rate.

Model FLOP utilization (MFU) here is the FLOPs of one training step (forward + backward, counted
by torch's FlopCounterMode on the real batch) divided by the step's wall time, as a fraction of
the fp32 (or autocast dtype) matrix-multiply rate measured on the same device in the same run.
Measuring the peak rather than quoting a datasheet keeps the figure honest on shared machines,
throttled laptops and partitioned GPUs alike.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

import torch

from coembed.device import autocast_dtype
from coembed.files import atomic_write_text
from coembed.training.loop import epoch_batches
from coembed.training.run import TrainRun
from coembed.training.step import forward_loss, train_step


def measured_matmul_flops(
    device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048
) -> float:
    """FLOP/s of an n x n matmul on ``device`` (best of a few repeats)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(3):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / 3)
    return 2 * n**3 / best


def step_flops(run: TrainRun, images: torch.Tensor, captions: list[str]) -> int:
    """FLOPs of one forward + backward of the model and loss on this batch."""
    from torch.utils.flop_counter import FlopCounterMode

    tokens = run.tokenizer(captions).to(run.device)
    images = images.to(run.device)
    counter = FlopCounterMode(display=False)
    memory = None if run.memory is None else run.memory.columns(tokens)
    ids = None if run.proxies is None else run.proxies.ids(captions)
    with counter:
        forward_loss(run, images, tokens, memory=memory, caption_ids=ids).backward()
    run.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def endless_batches(run: TrainRun) -> Iterator[tuple]:
    """This rank's batches, epoch after epoch: small data runs out of batches within a profile."""
    epoch = 0
    while True:
        yield from epoch_batches(run, epoch)
        epoch += 1


def profile_run(run: TrainRun, steps: int = 10) -> dict:
    """Time ``steps`` real training steps after two warm-up steps; write profile.json and a
    torch.profiler table (profile.txt) into the run folder; return the figures."""
    per_rank = run.per_rank_batch
    batches = endless_batches(run)
    first_images, first_captions, *_ = next(batches)
    flops = step_flops(run, first_images, first_captions)
    for _ in range(2):
        train_step(run, *next(batches))
    sync = torch.cuda.synchronize if run.device.type == "cuda" else (lambda: None)
    sync()
    start, done = time.perf_counter(), 0
    for _ in range(steps):
        train_step(run, *next(batches))
        done += 1
    sync()
    seconds = (time.perf_counter() - start) / max(done, 1)
    dtype = autocast_dtype(run.cfg.train.precision, run.device) or torch.float32
    peak = measured_matmul_flops(run.device, dtype)
    with torch.profiler.profile(activities=profiler_activities(run.device)) as prof:
        train_step(run, *next(batches))
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    result = {
        "device": str(run.device),
        "dtype": str(dtype).replace("torch.", ""),
        "batch_per_process": per_rank,
        "step_seconds": seconds,
        "samples_per_second": per_rank / seconds,
        "step_gflop": flops / 1e9,
        "achieved_gflops": flops / seconds / 1e9,
        "matmul_peak_gflops": peak / 1e9,
        "mfu": flops / seconds / peak,
    }
    atomic_write_text(run.output / "profile.json", json.dumps(result, indent=2))
    atomic_write_text(run.output / "profile.txt", table)
    return result


def profiler_activities(device: torch.device) -> list[torch.profiler.ProfilerActivity]:
    """What torch.profiler records on ``device``: the CPU, and CUDA kernels on a GPU."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        return [*activities, torch.profiler.ProfilerActivity.CUDA]
    # The profiler's tracing library logs its start and stop on stderr, and on a machine
    # without a GPU an "ERROR" that it found none. Level 6 keeps it quiet; it reads the
    # setting when the profiler starts (a level the user set wins).
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    return activities


def format_profile(result: dict) -> str:
    """One line: samples/s, ms and GFLOP per step, achieved and measured peak rate, MFU."""
    return (
        f"{result['samples_per_second']:.1f} samples/s per process on {result['device']} "
        f"({result['step_seconds'] * 1000:.0f} ms/step, {result['step_gflop']:.1f} GFLOP/step): "
        f"{result['achieved_gflops']:.1f} GFLOP/s of a measured {result['matmul_peak_gflops']:.1f} GFLOP/s "
        f"{result['dtype']} matmul rate = MFU {result['mfu']:.0%}"
    )
