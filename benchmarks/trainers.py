"""coembed's and open_clip's trainers as timed subprocesses, for the side-by-side benchmarks.

``bench_train.py`` (samples/s end to end) and ``bench_icons.py`` (recall at equal wall time)
share these pieces: open_clip's model config for coembed's tiny architecture and the launcher
that registers it, a CSV with absolute image paths for open_clip, each trainer's command line,
a subprocess whose output lines are timestamped as they arrive, and the steady-state rate read
from each trainer's own log.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "coembed-tiny-bench"
# coembed overrides that give the tiny recipe CLIP's tokenizer, as open_clip has.
CLIP_TOKENIZER = ("model.tokenizer=clip", "model.text.vocab_size=49408", "model.text.eot_id=49407")

LAUNCHER = """\
import sys
import open_clip
from open_clip_train.main import main
open_clip.add_model_config(sys.argv[1])
main(sys.argv[2:])
"""

OPENCLIP_LINE = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/")


def openclip_trainer_missing() -> str | None:
    """Why open_clip's trainer cannot run in this environment (one line), or None if it can."""
    try:
        import open_clip_train.main  # noqa: F401
    except ImportError as exc:
        return (
            f"open_clip's trainer cannot be imported ({exc}); install open_clip_torch's "
            "training extras: pip install braceexpand pandas webdataset"
        )
    return None


def openclip_config(overrides: Sequence[str] = ()) -> dict:
    """open_clip's model config for coembed's tiny recipe with CLIP's tokenizer (and the model
    ``overrides``, coembed ``--set`` values such as ``model.image.image_size=32``)."""
    from coembed.config import load_config
    from coembed.interop.openclip import openclip_model_config

    return openclip_model_config(load_config("tiny", [*CLIP_TOKENIZER, *overrides]).model)


def write_openclip_launcher(work: Path, overrides: Sequence[str] = ()) -> tuple[Path, Path]:
    """The launcher script and the model config JSON it registers, in ``work``."""
    launcher = work / "launch_open_clip.py"
    launcher.write_text(LAUNCHER)
    config = work / f"{MODEL_NAME}.json"
    config.write_text(json.dumps(openclip_config(overrides), indent=2))
    return launcher, config


def absolute_csv(source: Path, out: Path) -> Path:
    """A copy of ``source`` with absolute image paths (open_clip reads paths relative to its cwd)."""
    with open(source, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields, rows = list(reader.fieldnames or []), list(reader)
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "filepath": str((source.parent / row["filepath"]).resolve())})
    return out


def openclip_command(
    launcher: Path,
    config: Path,
    train_csv: Path,
    logs: Path,
    *,
    epochs: int,
    lr: float,
    wd: float,
    warmup: int,
    batch_size: int = 128,
    log_every: int = 2,
    val_csv: Path | None = None,
    extra: Sequence[str] = (),
    seed: int = 0,
) -> list[str]:
    """``open_clip_train.main`` on the CPU in fp32 with two decode workers, on a CSV."""
    cmd = [
        sys.executable, str(launcher), str(config),
        "--train-data", str(train_csv),
        "--dataset-type", "csv",
        "--csv-img-key", "filepath",
        "--csv-caption-key", "caption",
        "--csv-separator", ",",
        "--model", MODEL_NAME,
        "--batch-size", str(batch_size),
        "--epochs", str(epochs),
        "--lr", str(lr),
        "--wd", str(wd),
        "--warmup", str(warmup),
        "--workers", "2",
        "--precision", "fp32",
        "--device", "cpu",
        "--log-every-n-steps", str(log_every),
        "--logs", str(logs),
        "--name", "run",
        "--seed", str(seed),
    ]  # fmt: skip
    if val_csv is not None:
        cmd += ["--val-data", str(val_csv)]
    return cmd + list(extra)


def coembed_command(
    train_csv: Path,
    output: Path,
    overrides: Sequence[str] = (),
    *,
    steps: int | None = None,
    epochs: int | None = None,
    val_csv: Path | None = None,
) -> list[str]:
    """``coembed train --config tiny`` with ``--set`` overrides, on the CPU in fp32."""
    cmd = [
        sys.executable, "-m", "coembed", "train",
        "--config", "tiny",
        "--train-data", str(train_csv),
        "--output", str(output),
        "--set", "train.precision=fp32",
        "--set", "train.device=cpu",
    ]  # fmt: skip
    if val_csv is not None:
        cmd += ["--val-data", str(val_csv)]
    if steps is not None:
        cmd += ["--steps", str(steps)]
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


class Run:
    """A trainer subprocess whose output lines are timestamped as they arrive."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict) -> None:
        self.started = time.perf_counter()
        self.ended: float | None = None
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.perf_counter(), line.rstrip("\n")))

    def finished(self) -> bool:
        if self.ended is None and self.proc.poll() is not None:
            self.ended = time.perf_counter()
        return self.ended is not None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.finished()
        self.reader.join(5)

    def tail(self, n: int = 15) -> str:
        return "\n".join(line for _, line in self.lines[-n:])


def wait_then_stop(
    run: Run, first_step: Callable[[], float | None], budget: float | None, timeout: float = 900
) -> float:
    """Wait for the first logged step, then for ``budget`` s (and stop the run) or, with no
    budget, for the run to end by itself. Returns the start-up time (process start to first
    logged step); raises RuntimeError if the run ends before its first step or fails."""
    deadline = time.perf_counter() + timeout
    while (t0 := first_step()) is None:
        if run.finished() or time.perf_counter() > deadline:
            run.stop()
            raise RuntimeError(f"trainer ended before its first step:\n{run.tail()}")
        time.sleep(0.2)
    while (budget is None or time.perf_counter() < t0 + budget) and not run.finished():
        time.sleep(0.2)
    run.stop()
    if budget is None and run.proc.returncode != 0:
        raise RuntimeError(f"trainer failed (exit {run.proc.returncode}):\n{run.tail()}")
    return t0 - run.started


def openclip_steps(run: Run, steps_per_epoch: int, batch_size: int) -> list[tuple[float, int]]:
    """(arrival time, global step) of every training line open_clip logged so far."""
    out = []
    for t, line in list(run.lines):
        m = OPENCLIP_LINE.search(line)
        if m:
            epoch, seen = int(m.group(1)), int(m.group(2))
            out.append((t, epoch * steps_per_epoch + seen // batch_size))
    return out


def coembed_logged(metrics: Path) -> list[dict]:
    """The training rows (those with ``samples_per_s``) of a coembed run's metrics.jsonl."""
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


def time_openclip(
    cmd: list[str],
    env: dict,
    budget: float | None,
    steps_per_epoch: int,
    batch_size: int = 128,
    cwd: Path = ROOT,
) -> dict:
    """Run open_clip's trainer (for ``budget`` s after its first step, or to its end).

    Returns ``samples_per_s`` (steady state: between its second and last logged step; NaN for a
    run to the end that logged too few steps, an error for a timed one), the median of the
    rates between consecutive logged steps after the first (``median_samples_per_s``: less
    moved by other jobs' bursts), ``steps`` (the last logged), ``startup_s`` and ``wall_s``
    (process start to end)."""
    run = Run(cmd, cwd, env)

    def first_step() -> float | None:
        s = openclip_steps(run, steps_per_epoch, batch_size)
        return s[0][0] if s else None

    startup = wait_then_stop(run, first_step, budget)
    s = openclip_steps(run, steps_per_epoch, batch_size)
    rate = median = math.nan
    if len(s) >= 3:
        (t0, k0), (t1, k1) = s[1], s[-1]  # skip the first window (warm-up)
        rate = (k1 - k0) * batch_size / (t1 - t0)
        median = statistics.median(
            (k - kp) * batch_size / (t - tp) for (tp, kp), (t, k) in zip(s[1:], s[2:])
        )
    elif budget is not None:
        raise RuntimeError(f"open_clip logged too few steps in {budget:.0f} s:\n{run.tail()}")
    return {
        "samples_per_s": rate,
        "median_samples_per_s": median,
        "steps": s[-1][1],
        "startup_s": startup,
        "wall_s": run.ended - run.started,
    }


def time_coembed(
    cmd: list[str],
    output: Path,
    env: dict,
    budget: float | None,
    log_every: int,
    batch_size: int = 128,
    cwd: Path = ROOT,
) -> dict:
    """Run ``coembed train`` (for ``budget`` s after its first logged step, or to its end).

    ``cmd`` must log every ``log_every`` steps to ``output``/metrics.jsonl. Returns
    ``samples_per_s`` (steady state: its own windows after the first; NaN for a run to the end
    that logged too few, an error for a timed one), ``median_samples_per_s`` (the median of
    those windows), ``steps``, ``startup_s`` and ``wall_s`` (process start to end)."""
    run = Run(cmd, cwd, {**env, "COEMBED_NO_PROGRESS": "1"})
    metrics = output / "metrics.jsonl"
    seen: dict[str, float] = {}

    def first_step() -> float | None:
        if "t" not in seen and coembed_logged(metrics):
            seen["t"] = time.perf_counter()
        return seen.get("t")

    startup = wait_then_stop(run, first_step, budget)
    rows = coembed_logged(metrics)[1:]  # skip the first window (warm-up)
    # Windows of whole log intervals only: the last one may be shorter (the run's end).
    windows = [r for r in rows if r["step"] % log_every == 0]
    rate = median = math.nan
    if len(windows) >= 2:
        samples = log_every * batch_size * len(windows)
        rate = samples / sum(log_every * batch_size / r["samples_per_s"] for r in windows)
        median = statistics.median(r["samples_per_s"] for r in windows)
    elif budget is not None:
        raise RuntimeError(f"coembed logged too few steps in {budget:.0f} s:\n{run.tail()}")
    return {
        "samples_per_s": rate,
        "median_samples_per_s": median,
        "steps": coembed_logged(metrics)[-1]["step"],
        "startup_s": startup,
        "wall_s": run.ended - run.started,
    }
