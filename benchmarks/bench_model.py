"""Model-only training step: coembed's two-tower model vs open_clip's ``CLIP``, same architecture.

Both sides train the ``tiny`` recipe's architecture as ``configs/tiny.yaml`` holds it
(ModifiedResNet [1,1,1,1] width 32, attention pooling with 8 heads; a width-128 causal text
transformer, context 32; embedding 128; benchmarks/RESULTS.md gives each measurement's image size
and text depth: 64 px and 4 layers until Nov 30 2026) with CLIP's tokenizer (vocabulary 49,408)
on the same synthetic batch: random images and the shipped captions tokenized by open_clip.
Before timing, open_clip's model is loaded with coembed's weights and must give the same
features, so both compute one function.

Each side runs its own trainer's step: coembed as ``coembed.train`` does it (channels_last model
and images, fused AdamW, gradient clipping at 1.0), open_clip as ``open_clip_train`` does it
(NCHW, ``torch.optim.AdamW`` with default settings, no clipping). A third column runs open_clip's
model in channels_last for reference. The sides alternate round by round, so a busy machine slows
them alike; each figure is the median over rounds.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (forward + backward) and
compared with the fp32 matmul rate of the same threads (2048^2 square matmul), measured between
rounds in the same run; the fractions pair the best step with the best matmul (the two least
disturbed by other work on a shared machine). coembed's attention pool computes CLIP's function with fewer FLOPs, so its
"model FLOP/s" uses open_clip's count (the work the function is usually charged), as MFU does.

    .venv/bin/python benchmarks/bench_model.py            # ~2 minutes on 2 cores
    .venv/bin/python benchmarks/bench_model.py --quick    # for `make bench`
"""

from __future__ import annotations

import os

# As `coembed train` does (coembed.process): OpenMP's idle threads spin briefly when the machine
# is idle as the benchmark starts and sleep otherwise. Set before torch is imported, for both
# sides alike; so is the allocator setting below.
from coembed import process  # no torch in it

os.environ.update(process.openmp_waiting_settings("train")[0])

import argparse
import csv
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ROOT / "data" / "synthetic" / "train.csv"

# The project's speed targets; a run prints whether each was met.
TARGET_RATIO = 1.2
TARGET_MATMUL_FRACTION = 0.9


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def matmul_gflops(n: int = 2048, reps: int = 3) -> float:
    """Best fp32 GFLOP/s of an n x n matmul over ``reps`` calls."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def captions(n: int) -> list[str]:
    with open(CAPTIONS, newline="") as f:
        rows = [r["caption"] for r in csv.DictReader(f)]
    return (rows * (n // len(rows) + 1))[:n]


class Side:
    """One model + optimizer + loss, and its training step as its trainer runs it."""

    def __init__(self, name, model, optimizer, loss, channels_last, clip):
        self.name, self.model, self.optimizer, self.loss = name, model, optimizer, loss
        self.channels_last, self.clip = channels_last, clip
        self.times: list[float] = []

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return images.contiguous(memory_format=fmt)

    def forward_backward(self, images: torch.Tensor, tokens: torch.Tensor) -> None:
        out = self.model(images, tokens)
        if isinstance(out, dict):
            loss = self.loss(
                **{k: out[k] for k in ("image_features", "text_features", "logit_scale")}
            )
        else:
            loss = self.loss(*out[:3])
        loss.backward()

    def step(self, images: torch.Tensor, tokens: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.forward_backward(images, tokens)
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()

    def flops(self, images: torch.Tensor, tokens: torch.Tensor) -> int:
        self.optimizer.zero_grad(set_to_none=True)
        with FlopCounterMode(display=False) as counter:
            self.forward_backward(images, tokens)
        self.optimizer.zero_grad(set_to_none=True)
        return counter.get_total_flops()


def build_sides(batch: int):
    import open_clip
    from open_clip.loss import ClipLoss as OpenClipLoss

    from coembed.config import load_config
    from coembed.interop.openclip import openclip_model_config, to_openclip_state
    from coembed.loss import ClipLoss
    from coembed.model import CoEmbed
    from coembed.training.optim import make_optimizer

    torch.manual_seed(0)
    cfg = load_config(
        "tiny", ["model.tokenizer=clip", "model.text.vocab_size=49408", "model.text.eot_id=49407"]
    )
    ours = CoEmbed(cfg.model)
    oc_cfg = openclip_model_config(cfg.model)
    theirs = [open_clip.CLIP(**oc_cfg, output_dict=True) for _ in range(2)]
    for m in theirs:
        m.load_state_dict(to_openclip_state(ours.state_dict()))

    images = torch.randn(batch, 3, 64, 64)
    tokens = open_clip.tokenize(captions(batch), context_length=cfg.model.text.context_length)
    with torch.no_grad():  # the same function (BatchNorm in eval mode: no running-stat updates)
        a = ours.eval()(images, tokens)
        b = theirs[0].eval()(images, tokens)
        for key in ("image_features", "text_features"):
            torch.testing.assert_close(a[key], b[key], atol=2e-4, rtol=0)
    ours.train()

    ours = ours.to(memory_format=torch.channels_last)
    sides = [
        Side(
            "open_clip", theirs[0].train(), openclip_optimizer(theirs[0]), OpenClipLoss(), False, 0
        ),
        Side("coembed", ours, make_optimizer(ours, cfg), ClipLoss(), True, 1.0),
        Side(
            "open_clip, channels_last",
            theirs[1].train().to(memory_format=torch.channels_last),
            openclip_optimizer(theirs[1]),
            OpenClipLoss(),
            True,
            0,
        ),
    ]
    return sides, images, tokens


def openclip_optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    """As open_clip_train/main.py builds it (gains, biases and the temperature not decayed)."""

    def exclude(n, p):
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [
            {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.1},
        ],
        lr=1e-3,
        betas=(0.9, 0.98),
        eps=1e-6,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds per side")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 2 steps")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps = 2, 2
    torch.set_num_threads(args.threads)
    # `coembed train` keeps freed memory for reuse (coembed.process.keep_freed_memory); in one
    # process this holds for every side, so the step's page faults are off open_clip's bill too.
    reused = process.keep_freed_memory()

    sides, images, tokens = build_sides(args.batch_size)
    inputs = {s.name: s.inputs(images) for s in sides}
    flops = {s.name: s.flops(inputs[s.name], tokens) for s in sides}
    for s in sides:  # warm-up: allocator, oneDNN primitive caches, optimizer state
        s.step(inputs[s.name], tokens)
    matmul = [matmul_gflops()]
    for _ in range(args.rounds):
        for s in sides:
            t = time.perf_counter()
            for _ in range(args.steps):
                s.step(inputs[s.name], tokens)
            s.times.append((time.perf_counter() - t) / args.steps)
        matmul.append(matmul_gflops())

    # The pairing for FLOP/s fractions: the best step against the best matmul, both the least
    # disturbed by other work on the machine (medians mix in load spikes on a shared machine).
    peak = max(matmul)
    B = args.batch_size
    step_s = {s.name: statistics.median(s.times) for s in sides}
    best_s = {s.name: min(s.times) for s in sides}
    rate = {n: B / t for n, t in step_s.items()}
    model_flops = flops["open_clip"]
    rows = [
        (
            "step time, median (best), ms",
            None,
            lambda n: f"{step_s[n] * 1e3:,.0f} ({best_s[n] * 1e3:,.0f})",
        ),
        ("samples/s (median step)", "{:,.1f}", lambda n: rate[n]),
        ("counted GFLOP per step (fwd+bwd)", "{:,.1f}", lambda n: flops[n] / 1e9),
        ("GFLOP/s at best step, own count", "{:,.1f}", lambda n: flops[n] / best_s[n] / 1e9),
        (
            "fraction of best matmul rate, own count",
            "{:.0%}",
            lambda n: flops[n] / best_s[n] / 1e9 / peak,
        ),
        ("model GFLOP/s (open_clip's count)", "{:,.1f}", lambda n: model_flops / best_s[n] / 1e9),
        (
            "MFU vs best matmul (open_clip's count)",
            "{:.0%}",
            lambda n: model_flops / best_s[n] / 1e9 / peak,
        ),
    ]
    print(
        f"model-only training step, tiny architecture, batch {B}, fp32, {args.threads} threads, "
        f"{args.rounds} rounds x {args.steps} steps per side, alternating"
    )
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}; torch {torch.__version__}; "
        f"OpenMP waiting: {os.environ.get('OMP_WAIT_POLICY')}, "
        f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', 'unset')}; freed memory kept for reuse: "
        f"{'yes' if reused else 'no'} (both sides)"
    )
    print(
        f"fp32 matmul 2048^2: best {peak:.1f} GFLOP/s (median {statistics.median(matmul):.1f}, "
        f"min {min(matmul):.1f}; {len(matmul)} measurements between rounds)\n"
    )
    names = [s.name for s in sides]
    widths = (40, 15, 15, 7, 24)
    header = ("what", "open_clip", "coembed", "ratio", "open_clip channels_last")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for label, fmt, value in rows:
        oc, ce, ocl = (value(n) for n in names)
        ratio = f"{ce / oc:.2f}x" if label.startswith("samples/s") else ""
        show = fmt.format if fmt else str
        cells = (label, show(oc), show(ce), ratio, show(ocl))
        print(
            "| "
            + cells[0].ljust(widths[0])
            + " | "
            + " | ".join(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))
            + " |"
        )
    ratio = rate["coembed"] / rate["open_clip"]
    mfu = model_flops / best_s["coembed"] / 1e9 / peak
    own = flops["coembed"] / best_s["coembed"] / 1e9 / peak
    print(
        f"\ncoembed / open_clip: {ratio:.2f}x (target {TARGET_RATIO}x: "
        f"{'met' if ratio >= TARGET_RATIO else 'NOT met'}); coembed at {mfu:.0%} of the matmul "
        f"rate in model FLOPs, {own:.0%} in its own (target {TARGET_MATMUL_FRACTION:.0%}: "
        f"{'met' if mfu >= TARGET_MATMUL_FRACTION else 'NOT met'})"
    )
    print(
        "per-round step times (ms): "
        + "; ".join(f"{s.name} " + " ".join(f"{t * 1e3:.0f}" for t in s.times) for s in sides)
    )


if __name__ == "__main__":
    main()
