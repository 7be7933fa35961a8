"""End-to-end training throughput from image files: ``coembed train`` vs open_clip's trainer.

Both trainers train the same architecture (the ``tiny`` recipe: ModifiedResNet [1,1,1,1] width 32
at 64 px with 8-head attention pooling, 4-layer width-128 text transformer, context 32, embedding
128) with CLIP's tokenizer, batch 128, fp32, on the CPU, from the shipped PNGs
(data/synthetic/train.csv, 3000 pairs), without validation:

- coembed: ``python -m coembed train --config tiny --set model.tokenizer=clip ...``; it decodes
  the images once into its uint8 cache (start-up), then crops and normalizes whole batches;
- open_clip: ``python -m open_clip_train.main`` through a three-line launcher that registers the
  equivalent model config JSON (``open_clip.add_model_config``), with ``--dataset-type csv`` on
  a copy of the CSV with absolute paths, ``--workers 2``, ``--precision fp32 --device cpu``; its
  DataLoader workers decode and augment every image of every step.

Each run gets a fixed wall budget once its first step is logged, then is stopped; the runs
alternate (open_clip, coembed, open_clip, coembed, ...). The steady-state rate of a run counts
the samples between its first and its last logged step over the time between those log lines
(start-up, the first window and the end are excluded): open_clip's lines are timestamped as
they arrive; coembed's windows come from its own ``samples_per_s`` in metrics.jsonl. The table
reports the median over a side's runs; start-up (process start to first logged step) is shown
apart, since coembed's includes building its image cache once.

    .venv/bin/python benchmarks/bench_train.py             # 2 rounds x 120 s per side, ~10 min
    .venv/bin/python benchmarks/bench_train.py --quick     # 1 round x 60 s, for `make bench`
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "synthetic" / "train.csv"
MODEL_NAME = "coembed-tiny-bench"
TARGET_RATIO = 2.0
PASSIVE = "open_clip, OMP_WAIT_POLICY=PASSIVE"
LOG_EVERY = 2

LAUNCHER = """\
import sys
import open_clip
from open_clip_train.main import main
open_clip.add_model_config(sys.argv[1])
main(sys.argv[2:])
"""

OPENCLIP_LINE = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/")


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def openclip_config() -> dict:
    """open_clip's model config for coembed's tiny recipe with CLIP's tokenizer."""
    from coembed.config import load_config
    from coembed.interop.openclip import openclip_model_config

    cfg = load_config(
        "tiny", ["model.tokenizer=clip", "model.text.vocab_size=49408", "model.text.eot_id=49407"]
    )
    return openclip_model_config(cfg.model)


def absolute_csv(out: Path) -> Path:
    """open_clip reads paths relative to its cwd: write the CSV with absolute image paths."""
    with open(DATA, newline="") as f:
        rows = list(csv.DictReader(f))
    path = out / "train_abs.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["filepath", "caption"])
        writer.writeheader()
        for r in rows:
            writer.writerow({"filepath": str(DATA.parent / r["filepath"]), "caption": r["caption"]})
    return path


class Run:
    """A trainer subprocess whose output lines are timestamped as they arrive."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict) -> None:
        self.started = time.perf_counter()
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.perf_counter(), line.rstrip("\n")))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(5)

    def tail(self, n: int = 15) -> str:
        return "\n".join(line for _, line in self.lines[-n:])


def wait_then_stop(run: Run, first_step, budget: float, timeout: float = 900) -> float:
    """Wait for the first logged step, let the run go on for ``budget`` s, stop it.
    Returns the start-up time (process start to first logged step)."""
    deadline = time.perf_counter() + timeout
    while (t0 := first_step()) is None:
        if run.proc.poll() is not None or time.perf_counter() > deadline:
            run.stop()
            raise RuntimeError(f"trainer ended before its first step:\n{run.tail()}")
        time.sleep(0.2)
    while time.perf_counter() < t0 + budget and run.proc.poll() is None:
        time.sleep(0.2)
    run.stop()
    return t0 - run.started


def run_openclip(work: Path, csv_path: Path, config: Path, budget: float, env: dict) -> dict:
    launcher = work / "launch_open_clip.py"
    launcher.write_text(LAUNCHER)
    logs = Path(tempfile.mkdtemp(prefix="oc-", dir=work))
    cmd = [
        sys.executable,
        str(launcher),
        str(config),
        "--train-data", str(csv_path),
        "--dataset-type", "csv",
        "--csv-img-key", "filepath",
        "--csv-caption-key", "caption",
        "--csv-separator", ",",
        "--model", MODEL_NAME,
        "--batch-size", "128",
        "--epochs", "1000",
        "--lr", "1e-3",
        "--wd", "0.1",
        "--warmup", "50",
        "--workers", "2",
        "--precision", "fp32",
        "--device", "cpu",
        "--log-every-n-steps", str(LOG_EVERY),
        "--save-frequency", "0",
        "--logs", str(logs),
        "--name", "bench",
        "--seed", "0",
    ]  # fmt: skip
    run = Run(cmd, work, env)

    def steps() -> list[tuple[float, int]]:
        out = []
        for t, line in run.lines:
            m = OPENCLIP_LINE.search(line)
            if m:
                out.append((t, int(m.group(1)), int(m.group(2))))
        # Global step from (epoch, samples into the epoch): 3000 // 128 = 23 steps per epoch.
        per_epoch = 3000 // 128
        return [(t, e * per_epoch + n // 128) for t, e, n in out]

    def first_step():
        s = steps()
        return s[0][0] if s else None

    startup = wait_then_stop(run, first_step, budget)
    s = steps()
    if len(s) < 3:
        raise RuntimeError(f"open_clip logged too few steps in the budget:\n{run.tail()}")
    (t0, k0), (t1, k1) = s[1], s[-1]  # skip the first window (warm-up)
    return {"samples_per_s": (k1 - k0) * 128 / (t1 - t0), "steps": k1, "startup_s": startup}


def run_coembed(work: Path, budget: float, env: dict, cache: Path) -> dict:
    out = Path(tempfile.mkdtemp(prefix="ce-", dir=work)) / "run"
    cmd = [
        sys.executable, "-m", "coembed", "train",
        "--config", "tiny",
        "--train-data", str(DATA),
        "--output", str(out),
        "--steps", "100000",
        "--set", "model.tokenizer=clip",
        "--set", "model.text.vocab_size=49408",
        "--set", f"train.log_every={LOG_EVERY}",
        "--set", "train.checkpoint_every=100000",
        "--set", "train.precision=fp32",
        "--set", "train.device=cpu",
        "--set", f"data.cache_dir={cache}",
    ]  # fmt: skip
    run = Run(cmd, ROOT, {**env, "COEMBED_NO_PROGRESS": "1"})
    metrics = out / "metrics.jsonl"

    def logged() -> list[dict]:
        try:
            lines = metrics.read_text().splitlines()
        except OSError:
            return []
        rows = []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:  # a line being written
                continue
            if "samples_per_s" in row:
                rows.append(row)
        return rows

    seen: dict[str, float] = {}

    def first_step():
        if "t" not in seen and logged():
            seen["t"] = time.perf_counter()
        return seen.get("t")

    startup = wait_then_stop(run, first_step, budget)
    rows = logged()[1:]  # skip the first window (warm-up)
    if len(rows) < 2:
        raise RuntimeError(f"coembed logged too few steps in the budget:\n{run.tail()}")
    samples = LOG_EVERY * 128 * len(rows)
    seconds = sum(LOG_EVERY * 128 / r["samples_per_s"] for r in rows)
    return {"samples_per_s": samples / seconds, "steps": rows[-1]["step"], "startup_s": startup}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=120, help="wall budget per run")
    parser.add_argument("--quick", action="store_true", help="1 round of 60 s per side")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds = 1, 60.0
    try:
        import open_clip_train.main  # noqa: F401
    except ImportError as exc:
        print(
            f"bench_train: skipped, open_clip's trainer cannot be imported ({exc}); "
            "install open_clip_torch's training extras: pip install braceexpand pandas webdataset"
        )
        return

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    sides = ["open_clip", "coembed"] + ([] if args.quick else [PASSIVE])
    results: dict[str, list[dict]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        config = work / f"{MODEL_NAME}.json"
        config.write_text(json.dumps(openclip_config(), indent=2))
        csv_path = absolute_csv(work)
        cache = work / "cache"
        load = [os.getloadavg()[0]]
        for r in range(args.rounds):
            for side in sides:
                if side == "open_clip":
                    res = run_openclip(work, csv_path, config, args.seconds, env)
                elif side == PASSIVE:
                    # What coembed sets for itself, given to open_clip too (a value set by the
                    # user for the whole benchmark wins, as in coembed).
                    passive = {"OMP_WAIT_POLICY": "PASSIVE", **env}
                    res = run_openclip(work, csv_path, config, args.seconds, passive)
                else:
                    res = run_coembed(work, args.seconds, env, cache)
                results[side].append(res)
                load.append(os.getloadavg()[0])
                print(
                    f"round {r + 1} {side}: {res['samples_per_s']:6.1f} samples/s "
                    f"(to step {res['steps']}, start-up {res['startup_s']:.0f} s)",
                    flush=True,
                )

    rate = {k: statistics.median(r["samples_per_s"] for r in v) for k, v in results.items()}
    startup = {k: statistics.median(r["startup_s"] for r in v) for k, v in results.items()}
    ratio = rate["coembed"] / rate["open_clip"]
    print(
        f"\nend-to-end training from PNG files, tiny architecture, batch 128, fp32, CPU; "
        f"{args.rounds} round(s) x {args.seconds:.0f} s per side, alternating"
    )
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} CPUs, load average "
        f"{min(load):.1f}-{max(load):.1f} during the run; "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')} in the environment\n"
    )
    rows = [
        ("steady-state samples/s (median of runs)", rate, "{:,.1f}", True),
        ("start-up to first logged step, s", startup, "{:,.0f}", False),
    ]
    widths = (40, 19, 17, 7)
    header = ("what", "open_clip samples/s", "coembed samples/s", "ratio")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for label, values, fmt, show_ratio in rows:
        oc, ce = values["open_clip"], values["coembed"]
        ratio_cell = f"{ce / oc:.2f}x" if show_ratio else ""
        cells = (fmt.format(oc), fmt.format(ce), ratio_cell)
        print(
            "| "
            + label.ljust(widths[0])
            + " | "
            + " | ".join(c.rjust(w) for c, w in zip(cells, widths[1:]))
            + " |"
        )
    if PASSIVE in rate:
        print(
            f"open_clip with OMP_WAIT_POLICY=PASSIVE (as coembed sets for itself): "
            f"{rate[PASSIVE]:,.1f} samples/s; coembed / that: {rate['coembed'] / rate[PASSIVE]:.2f}x"
        )
    print(
        f"\ncoembed / open_clip end to end: {ratio:.2f}x "
        f"(target {TARGET_RATIO}x: {'met' if ratio >= TARGET_RATIO else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
