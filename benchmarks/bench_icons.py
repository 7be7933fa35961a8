"""Cross-theme icon retrieval: coembed's tiny recipe vs open_clip's trainer, same wall-clock budget.

The data is ``coembed data icons`` (built into a temporary folder unless ``--data`` names one):
64 px icons of the themes installed here, trained on nine themes, validated on one (Numix) and
tested on one never seen in training (Papirus), whose icon names all occur in training.

What is compared, in one run, one training at a time:

- **coembed, tiny recipe as shipped**: ``coembed train --config tiny --train-data train.csv
  --val-data val.csv --epochs N`` (its trained BPE tokenizer and every setting of
  ``configs/tiny.yaml`` but the epoch count);
- **coembed, CLIP tokenizer**: the same with CLIP's 49,408-token BPE, as open_clip has, so the
  tokenizer's share of the difference shows;
- **open_clip**: ``python -m open_clip_train.main`` (through a launcher that registers the same
  architecture as an open_clip model config: ModifiedResNet [1,1,1,1] width 32 at 32 px with
  attention pooling, 1-layer width-128 causal text transformer, context 32, embedding 128) with
  ``--dataset-type csv`` on copies of the CSVs with absolute paths, CLIP's tokenizer, fp32, CPU,
  ``--workers 2``, ``--val-data`` the validation CSV. Three times: with open_clip's own defaults for a
  ResNet (lr 5e-4, wd 0.2, Adam beta2 0.999, eps 1e-8, no clipping; warmup cut from its default
  10,000 steps, longer than the whole run, to 50) and with the tiny recipe's optimizer settings
  (lr, wd, warmup, betas, eps, gradient clipping), and with those and the recipe's augmentation
  as ``--aug-cfg`` gives it (crop area, colour jitter, greyscale). The one with the best
  validation recall is "open_clip at its best", the column coembed is compared with.

Fairness:

- the same batch (the tiny recipe's), data, architecture and per-epoch validation on both
  sides; the same OpenMP waiting on both, the one ``coembed train`` picks for itself on this
  machine as the benchmark starts (``coembed.process.openmp_waiting_settings``): a short spin
  when the cores are idle, sleep beside other work (spinning threads cost open_clip most on a
  shared machine), unless the environment sets it. On idle cores open_clip's trainer ran as
  fast with the short spin as asleep, the faster two of the four waits measured
  (``bench_openmp_wait.py``, RESULTS.md);
- the same budget of training time: a probe first runs each trainer configuration for
  ``--probe`` seconds after its first step and measures its own samples/s (the median over its
  logged windows of 2 steps, so that a burst of other jobs' load moves it less); each run then
  gets ``N = floor(budget x steps/s / steps per epoch)`` epochs (at least 1), so its warmup and
  cosine schedule end inside the budget at the pace it showed. Start-up (coembed decodes the
  images once into its cache; open_clip builds its loaders) comes on top of the budget on both
  sides; "training s" (start-up to exit: steps, per-epoch validation, the final save) shows
  how each run really fared against the budget;
- the same evaluation code: open_clip's final checkpoint is converted with ``coembed convert
  --from-openclip`` and every model is measured by ``coembed eval --json`` on the validation and
  test CSVs (recall@1/5/10 both ways). A check on a few test images and captions prints the largest
  difference between the converted model's embeddings and open_clip's own (tolerance 1e-5).

It prints one table (recall, samples/s of the probe, epochs, steps, start-up and training time;
the ratio coembed / open_clip) and draws a contact sheet: text queries -> the top-5 test icons by
coembed's and open_clip's models, the right icon framed in green
(``benchmarks/icons_contact_sheet.png``).
The machine is shared: one seed, one run per side, and rates vary with other jobs' load.

    .venv/bin/python benchmarks/bench_icons.py                   # ~25 min, builds the data
    .venv/bin/python benchmarks/bench_icons.py --data data/icon-themes --write-results
    .venv/bin/python benchmarks/bench_icons.py --quick           # ~5 min, for `make bench`

Recipe choices (coembed only, each a ``--set`` override of the tiny recipe). With the budget,
a variant gets its own probe unless it differs from another side only by its seed; with
``--epochs N`` every side trains the same steps, and "training s" shows what each costs (probes
are noisy on a shared machine, and a few epochs more or less move recall more than most choices):

    .venv/bin/python benchmarks/bench_icons.py --data data/icon-themes --coembed-only \\
        --epochs 14 --variant "lr 5e-4" train.lr=5e-4 --variant "seed 1" train.seed=1

open_clip's sides at another seed, the same epochs as a saved run (``--rates``):

    .venv/bin/python benchmarks/bench_icons.py --data data/icon-themes --no-recipe \\
        --no-clip-tokenizer --rates run.jsonl --openclip-seed 1 --save run-seed1.jsonl
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from machine import machine
from results import write_section
from trainers import (
    CLIP_TOKENIZER,
    MODEL_NAME,
    absolute_csv,
    coembed_command,
    openclip_command,
    openclip_trainer_missing,
    time_coembed,
    time_openclip,
    write_openclip_launcher,
)

SECTION = "## Cross-theme icon retrieval: coembed vs open_clip"
SHEET = Path(__file__).resolve().parent / "icons_contact_sheet.png"
PROBE_LOG_EVERY = 2
OPENMP_WAITING = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # the variables that say how threads wait
PARITY_TOLERANCE = 1e-5
SEED = "train.seed="
KEYS = [f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)]
# Captions exactly as `coembed data icons` writes them; names the test theme (Papirus) has.
QUERIES = (
    "folder music, place icon",
    "audio volume high, status icon",
    "edit copy, action icon",
    "user trash, place icon",
    "printer, device icon",
    "weather storm, status icon",
    "python file, file type icon",
    "camera photo, device icon",
)


@dataclass
class Side:
    """One column of the comparison: a trainer and its settings, then what it measured."""

    name: str
    trainer: str  # "coembed" or "open_clip"
    overrides: tuple[str, ...] = ()  # coembed --set (open_clip sides: only train.seed=N)
    optimizer: dict = field(default_factory=dict)  # open_clip: lr, wd, warmup, extra flags, seed
    rate: float = math.nan  # samples/s, the median of the probe's windows
    epochs: int = 0
    run: dict = field(default_factory=dict)
    model_dir: Path | None = None
    val: dict = field(default_factory=dict)
    test: dict = field(default_factory=dict)

    def probe_key(self) -> tuple:
        """Sides that differ only by their seed (or open_clip's optimizer settings) train at the
        same cost and share one probe; any other override (the model, an objective, an
        augmentation, open_clip's ``--aug-cfg``) can change the cost."""
        extra = self.optimizer.get("extra", [])
        augmentation = tuple(extra[extra.index("--aug-cfg") :]) if "--aug-cfg" in extra else ()
        overrides = tuple(sorted(o for o in self.overrides if not o.startswith(SEED)))
        return (self.trainer, overrides, augmentation)


def openclip_augmentation(d) -> list[str]:
    """open_clip_train's ``--aug-cfg`` for the tiny recipe's crops and colour changes (``d``, its
    data config): the crop's area range, torchvision's ColorJitter at the recipe's strength (hue
    by s/4 of a turn, as coembed turns it) on every crop, greyscale at its probability. open_clip
    spares no caption its colour changes; on the icons 1% of the captions name a colour. Its
    augmentation has no random convolutions, so the recipe's RandConv stays coembed's alone."""
    aug = [f"scale=({d.crop_scale_min},1.0)"]
    if d.color_jitter:
        s = d.color_jitter
        aug += [f"color_jitter=({s},{s},{s},{s / 4})", "color_jitter_prob=1.0"]
    if d.grayscale_p:
        aug.append(f"gray_scale_prob={d.grayscale_p}")
    return ["--aug-cfg", *aug]


def openclip_settings() -> dict[str, dict]:
    """open_clip's own defaults for a ResNet; the tiny recipe's optimizer settings; and those
    with the recipe's augmentation (crop range, colour jitter, greyscale) as open_clip has it."""
    from coembed.config import load_config

    tiny_config = load_config("tiny")
    t = tiny_config.train
    tiny = [
        "--beta1", str(t.beta1), "--beta2", str(t.beta2), "--eps", str(t.eps),
        "--grad-clip-norm", str(t.grad_clip),
    ]  # fmt: skip
    optimizer = {"lr": t.lr, "wd": t.weight_decay, "warmup": t.warmup_steps}
    return {
        "open_clip, its defaults": {"lr": 5e-4, "wd": 0.2, "warmup": 50, "extra": []},
        "open_clip, tiny's optimizer": {**optimizer, "extra": tiny},
        "open_clip, tiny's optimizer and augmentation": {
            **optimizer,
            "extra": [*tiny, *openclip_augmentation(tiny_config.data)],
        },
    }


def build_data(out: Path) -> Path:
    from coembed.datasets.icons import build_icon_dataset

    print(f"building the icon data set in {out} (coembed data icons)", flush=True)
    report = build_icon_dataset(out)
    print("  rows: " + ", ".join(f"{s} {len(r)}" for s, r in report.rows.items()), flush=True)
    return out


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


class Bench:
    """The work folder, data and environment shared by every side's probe, run and evaluation."""

    def __init__(self, work: Path, data: Path, env: dict, model_sets: Sequence[str] = ()) -> None:
        self.work, self.data, self.env = work, data, env
        self.model_sets = tuple(model_sets)  # the architecture of every side, open_clip's too
        self.train, self.val, self.test = (data / f"{s}.csv" for s in ("train", "val", "test"))
        from coembed.config import load_config

        # Both trainers take the tiny recipe's batch (or the one --model-set gives every side).
        self.batch = load_config("tiny", list(model_sets)).train.batch_size
        self.steps_per_epoch = len(read_rows(self.train)) // self.batch
        self.launcher: Path | None = None
        self.config: Path | None = None
        self.abs_csv: dict[str, Path] = {}
        self.probe_cache = work / "probe-cache"

    def openclip_files(self) -> tuple[Path, Path, Path, Path]:
        if self.launcher is None:
            self.launcher, self.config = write_openclip_launcher(self.work, self.model_sets)
            for split, path in (("train", self.train), ("val", self.val)):
                self.abs_csv[split] = absolute_csv(path, self.work / f"{split}_abs.csv")
        return self.launcher, self.config, self.abs_csv["train"], self.abs_csv["val"]

    def folder(self, prefix: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.work))

    def probe(self, side: Side, seconds: float) -> dict:
        """Steady samples/s of the side's trainer over ``seconds`` after its first step."""
        if side.trainer == "open_clip":
            launcher, config, train, _ = self.openclip_files()
            o = side.optimizer
            cmd = openclip_command(
                launcher, config, train, self.folder("probe-oc-"),
                epochs=1000, lr=o["lr"], wd=o["wd"], warmup=o["warmup"], batch_size=self.batch,
                log_every=PROBE_LOG_EVERY, extra=[*o["extra"], "--save-frequency", "0"],
                seed=o.get("seed", 0),
            )  # fmt: skip
            return time_openclip(cmd, self.env, seconds, self.steps_per_epoch, self.batch)
        out = self.folder("probe-ce-") / "run"
        extra = [
            f"train.log_every={PROBE_LOG_EVERY}",
            "train.checkpoint_every=1000000",
            f"data.cache_dir={self.probe_cache}",
        ]
        cmd = coembed_command(self.train, out, [*side.overrides, *extra], steps=1000000)
        return time_coembed(cmd, out, self.env, seconds, PROBE_LOG_EVERY, self.batch)

    def train_side(self, side: Side) -> None:
        """Train ``side`` for its epochs; sets ``side.run`` and ``side.model_dir``."""
        if side.trainer == "open_clip":
            launcher, config, train, val = self.openclip_files()
            logs, o = self.folder("oc-"), side.optimizer
            cmd = openclip_command(
                launcher, config, train, logs,
                epochs=side.epochs, lr=o["lr"], wd=o["wd"], warmup=o["warmup"],
                batch_size=self.batch, val_csv=val, extra=[*o["extra"], "--save-frequency", "0"],
                seed=o.get("seed", 0),
            )  # fmt: skip
            side.run = time_openclip(cmd, self.env, None, self.steps_per_epoch, self.batch)
            checkpoint = logs / "run" / "checkpoints" / f"epoch_{side.epochs}.pt"
            side.model_dir = logs / "model"
            convert = [
                sys.executable, "-m", "coembed", "convert", "--from-openclip", str(checkpoint),
                "--config", "tiny", "--output", str(side.model_dir),
            ]  # fmt: skip
            for item in (*CLIP_TOKENIZER, *self.model_sets):
                convert += ["--set", item]
            subprocess.run(convert, check=True, env=self.env, stdout=subprocess.DEVNULL)
            return
        from coembed.config import load_config

        out = self.folder("ce-") / "run"
        cmd = coembed_command(self.train, out, side.overrides, epochs=side.epochs, val_csv=self.val)
        log_every = load_config("tiny", list(side.overrides)).train.log_every
        side.run = time_coembed(cmd, out, self.env, None, log_every, self.batch)
        side.model_dir = out

    def evaluate(self, model_dir: Path, data: Path) -> dict:
        cmd = [
            sys.executable, "-m", "coembed", "eval", "--model", str(model_dir),
            "--data", str(data), "--json",
        ]  # fmt: skip
        done = subprocess.run(cmd, check=True, env=self.env, capture_output=True, text=True)
        return json.loads(done.stdout)


def mean_recall(metrics: dict) -> float:
    return sum(metrics[k] for k in KEYS) / len(KEYS)


def parity(side: Side, bench: Bench, n: int = 8) -> float:
    """Largest |difference| between open_clip's own embeddings of a few test images and captions
    and those of the model converted from its checkpoint (loaded by ``coembed.load``)."""
    import logging

    import numpy as np
    import open_clip
    import torch
    from PIL import Image

    import coembed

    _, config, _, _ = bench.openclip_files()
    open_clip.add_model_config(str(config))
    logging.disable(logging.WARNING)  # "no pretrained weights loaded": they come next
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL_NAME)
    logging.disable(logging.NOTSET)
    checkpoint = next((side.model_dir.parent / "run" / "checkpoints").glob("epoch_*.pt"))
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    model.eval()
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    rows = read_rows(bench.test)[:: max(1, len(read_rows(bench.test)) // n)][:n]
    paths = [str(bench.data / r["filepath"]) for r in rows]
    captions = [r["caption"] for r in rows]
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(p)) for p in paths])
        oc_img = model.encode_image(pixels, normalize=True).numpy()
        oc_txt = model.encode_text(tokenizer(captions), normalize=True).numpy()
    converted = coembed.load(str(side.model_dir), device="cpu")
    diff_img = np.abs(converted.embed_images(paths) - oc_img).max()
    diff_txt = np.abs(converted.embed_texts(captions) - oc_txt).max()
    return float(max(diff_img, diff_txt))


def draw_sheet(sides: list[Side], bench: Bench, path: Path) -> Path:
    """Each query -> the top-5 test icons by each side's model, the right icon framed."""
    import numpy as np

    import coembed
    from coembed.report import comparison_sheet

    rows = read_rows(bench.test)
    by_caption = {r["caption"]: str(bench.data / r["filepath"]) for r in rows}
    queries = [q for q in QUERIES if q in by_caption]
    missing = [q for q in QUERIES if q not in by_caption]
    if missing:
        print(f"contact sheet: not in this test set, left out: {'; '.join(missing)}")
    paths = [str(bench.data / r["filepath"]) for r in rows]
    names = [r["name"] for r in rows]
    results = {}
    for side in sides:
        model = coembed.load(str(side.model_dir), device="cpu")
        scores = model.embed_texts(queries) @ model.embed_images(paths).T  # (queries, images)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :5]
        results[side.name] = [
            [(paths[j], float(scores[i, j]), names[j]) for j in top[i]] for i in range(len(queries))
        ]
    title = (
        f"Text query -> top-5 of the {len(paths):,} icons of the unseen test theme "
        f"({rows[0]['theme']}); cosine score and icon name under each; green frame: the icon "
        "the query names"
    )
    correct = [{by_caption[q]} for q in queries]
    return comparison_sheet(queries, results, path, correct=correct, title=title)


def fmt(x: float) -> str:
    return f"{x:.3f}"


def table(sides: list[Side], best: Side | None, coembed_side: Side) -> list[str]:
    header = (
        "| side | i→t R@1 | i→t R@5 | i→t R@10 | t→i R@1 | t→i R@5 | t→i R@10 "
        "| val mean R | probe samples/s | epochs | steps | start-up s | training s |"
    )
    lines = [header, "|---|" + "--:|" * 12]
    for s in sides:
        mark = " (best on val)" if s is best else ""
        lines.append(
            f"| {s.name}{mark} | "
            + " | ".join(fmt(s.test[k]) for k in KEYS)
            + f" | {fmt(mean_recall(s.val))} | {'' if math.isnan(s.rate) else f'{s.rate:.0f}'} | {s.epochs} | {s.run['steps']} "
            f"| {s.run['startup_s']:.0f} | {s.run['wall_s'] - s.run['startup_s']:.0f} |"
        )
    if best is not None:
        cells = []
        for k in KEYS:
            oc = best.test[k]
            cells.append(f"{coembed_side.test[k] / oc:.2f}x" if oc else "n/a")
        rate = coembed_side.rate / best.rate
        lines.append(
            f"| ratio {coembed_side.name} / open_clip | "
            + " | ".join(cells)
            + f" | | {rate:.2f}x | | | | |"
        )
    return lines


def saved_rates(path: Path) -> dict[tuple, float]:
    """The probe rates an earlier ``--save`` recorded, by cost class (``Side.probe_key``)."""
    rates = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r["probe_samples_per_s"] is not None:
            flags = {"extra": r.get("openclip_flags", [])}
            side = Side(r["name"], r["trainer"], tuple(r["overrides"]), flags)
            rates[side.probe_key()] = r["probe_samples_per_s"]
    return rates


def save_side(path: Path, side: Side, args: argparse.Namespace, env: dict[str, str]) -> None:
    """One line per trained side, so that several runs of the benchmark make one table."""
    record = {
        "name": side.name,
        "trainer": side.trainer,
        "overrides": list(side.overrides),
        "openclip_flags": list(side.optimizer.get("extra", [])),  # open_clip sides' own flags
        "model_sets": list(args.model_set),  # every side's architecture, open_clip's too
        "budget_s": None if args.epochs else args.budget,
        "probe_samples_per_s": None if math.isnan(side.rate) else side.rate,
        "epochs": side.epochs,
        "steps": side.run["steps"],
        "startup_s": side.run["startup_s"],
        "training_s": side.run["wall_s"] - side.run["startup_s"],
        "load": os.getloadavg()[0],
        "openmp": {k: env.get(k) for k in OPENMP_WAITING},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "val": side.val,
        "test": side.test,
    }
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def choices_table(paths: list[Path]) -> list[str]:
    """The sides saved by ``--save`` (one or more files), one row each: samples/s of the probe,
    epochs in the budget, then validation and test recall both ways."""
    records = [json.loads(line) for p in paths for line in p.read_text().splitlines() if line]
    short = [k.replace("image_to_text_", "i→t ").replace("text_to_image_", "t→i ") for k in KEYS]
    header = "| choice | seed | samples/s | epochs | " + " | ".join(
        [f"val {k}" for k in short] + ["val mean R"] + [f"test {k}" for k in short]
    )
    lines = [header + " |", "|---|--:|--:|--:|" + "--:|" * 13]
    for r in records:
        seed = next((o[len(SEED) :] for o in r["overrides"] if o.startswith(SEED)), "0")
        name = r["name"].removesuffix(f", seed {seed}")
        rate = "" if r["probe_samples_per_s"] is None else f"{r['probe_samples_per_s']:.0f}"
        cells = [fmt(r["val"][k]) for k in KEYS] + [f"**{fmt(mean_recall(r['val']))}**"]
        cells += [fmt(r["test"][k]) for k in KEYS]
        lines.append(f"| {name} | {seed} | {rate} | {r['epochs']} | " + " | ".join(cells) + " |")
    return lines


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a `coembed data icons` folder (default: build)")
    parser.add_argument("--budget", type=float, default=300, help="training seconds per side")
    parser.add_argument("--probe", type=float, default=40, help="probe seconds per trainer")
    parser.add_argument(
        "--epochs", type=int, help="train every side this many epochs (no probes, no budget)"
    )
    parser.add_argument("--quick", action="store_true", help="45 s budgets, two sides (~5 min)")
    parser.add_argument("--coembed-only", action="store_true", help="no open_clip sides")
    parser.add_argument("--no-clip-tokenizer", action="store_true", help="skip that coembed side")
    parser.add_argument(
        "--variant",
        nargs="+",
        action="append",
        default=[],
        metavar=("LABEL", "KEY=VALUE"),
        help="another coembed side: a label, then --set overrides of the tiny recipe",
    )
    parser.add_argument("--sheet", type=Path, default=SHEET, help="contact sheet PNG")
    parser.add_argument("--write-results", action="store_true", help="update RESULTS.md")
    parser.add_argument(
        "--save", type=Path, help="append each side's settings and recall to this JSON-lines file"
    )
    parser.add_argument(
        "--table", type=Path, nargs="+", help="print the table of sides saved by --save, and stop"
    )
    parser.add_argument(
        "--rates",
        type=Path,
        help="take each side's samples/s from the probes of an earlier --save file (sides of the "
        "same cost, seeds aside) instead of probing again, so that seeds train the same epochs",
    )
    parser.add_argument(
        "--no-recipe", action="store_true", help="leave out the tiny recipe's own side"
    )
    parser.add_argument(
        "--openclip-seed",
        type=int,
        default=0,
        help="open_clip_train's --seed for its sides (with --rates: a second seed at the same epochs)",
    )
    parser.add_argument(
        "--model-set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="settings of every side, open_clip's architecture and batch too (e.g. "
        "model.image.image_size=32 or train.batch_size=128): the comparison at another size",
    )
    args = parser.parse_args()
    if args.quick:
        args.budget, args.probe, args.no_clip_tokenizer = 45.0, 20.0, True
    return args


def make_sides(args: argparse.Namespace) -> list[Side]:
    model = tuple(args.model_set)
    sides = [] if args.no_recipe else [Side("coembed, tiny recipe", "coembed", model)]
    if not args.no_clip_tokenizer:
        sides.append(Side("coembed, CLIP tokenizer", "coembed", (*model, *CLIP_TOKENIZER)))
    sides += [Side(label, "coembed", (*model, *sets)) for label, *sets in args.variant]
    if not args.coembed_only:
        settings = openclip_settings()
        if args.quick:  # one open_clip side: its defaults (best on val in RESULTS.md)
            settings = {k: v for k, v in settings.items() if "defaults" in k}
        seed = args.openclip_seed
        if seed:  # open_clip_train's own --seed; the seed column of the tables reads it
            settings = {f"{name}, seed {seed}": {**o, "seed": seed} for name, o in settings.items()}
        overrides = (f"{SEED}{seed}",) if seed else ()
        sides += [Side(name, "open_clip", overrides, o) for name, o in settings.items()]
    return sides


def openmp_waiting_of_both(env: dict[str, str]) -> str:
    """Set in ``env`` (both trainers') how OpenMP's idle threads wait: as ``coembed train``
    would choose on this machine now, unless ``env`` sets it; returns the description."""
    from coembed.process import openmp_waiting_settings

    settings, description = openmp_waiting_settings("train", env)
    env.update(settings)
    return description


def main() -> int:
    args = parse_args()
    if args.table:
        print("\n".join(choices_table(args.table)))
        return 0
    if not args.coembed_only and (missing := openclip_trainer_missing()):
        print(f"bench_icons: skipped, {missing}")
        return 0
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    waiting = openmp_waiting_of_both(env)
    sides = make_sides(args)
    started = time.time()
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="bench-icons-") as tmp:
        work = Path(tmp)
        data = args.data or build_data(work / "icon-themes")
        bench = Bench(work, data.resolve(), env, args.model_set)
        print(
            f"{len(sides)} sides, "
            + (f"{args.epochs} epochs" if args.epochs else f"{args.budget:.0f} s of training")
            + f" each, {bench.steps_per_epoch} steps of {bench.batch} per epoch; "
            + f"OpenMP threads of both trainers: {waiting}",
            flush=True,
        )
        probes = saved_rates(args.rates) if args.rates else {}
        for side in sides:
            if args.epochs:
                side.epochs = args.epochs
                continue
            key = side.probe_key()
            if key not in probes:
                probes[key] = bench.probe(side, args.probe)["median_samples_per_s"]
                load.append(os.getloadavg()[0])
                print(f"probe {side.name}: {probes[key]:.1f} samples/s", flush=True)
            side.rate = probes[key]
            steps = args.budget * side.rate / bench.batch
            side.epochs = max(1, math.floor(steps / bench.steps_per_epoch))
        for side in sides:
            print(f"training {side.name}: {side.epochs} epochs", flush=True)
            bench.train_side(side)
            side.val = bench.evaluate(side.model_dir, bench.val)
            side.test = bench.evaluate(side.model_dir, bench.test)
            load.append(os.getloadavg()[0])
            if args.save:
                save_side(args.save, side, args, env)
            print(
                f"  {side.run['steps']} steps, wall {side.run['wall_s']:.0f} s; test R@1 "
                f"i→t {fmt(side.test[KEYS[0]])} t→i {fmt(side.test[KEYS[3]])}; "
                f"val mean recall {fmt(mean_recall(side.val))}",
                flush=True,
            )
        openclip_sides = [s for s in sides if s.trainer == "open_clip"]
        best = max(openclip_sides, key=lambda s: mean_recall(s.val)) if openclip_sides else None
        notes = [f"OpenMP threads of both trainers: {waiting}"]
        if best is not None:
            diff = parity(best, bench)
            verdict = "ok" if diff <= PARITY_TOLERANCE else "TOO LARGE"
            notes.append(
                f"converted open_clip model vs open_clip's own embeddings (8 test images and "
                f"captions): max abs diff {diff:.2e} (tolerance {PARITY_TOLERANCE:.0e}: {verdict})"
            )
            sheet_path = args.sheet if not args.quick else work / "sheet.png"
            draw_sheet([sides[0], best], bench, sheet_path)
            # RESULTS.md names files relative to the repository, never by a machine's path.
            shown = sheet_path.resolve()
            if shown.is_relative_to(SHEET.parents[1]):
                shown = shown.relative_to(SHEET.parents[1])
            notes.append(f"contact sheet: {shown}")
        test_rows, test_theme = len(read_rows(bench.test)), read_rows(bench.test)[0]["theme"]
    minutes = (time.time() - started) / 60
    lines = table(sides, best, sides[0])
    print()
    print(
        f"cross-theme retrieval on {test_theme} ({test_rows:,} icons, never trained on); "
        + (
            f"{args.epochs} epochs per side"
            if args.epochs
            else f"{args.budget:.0f} s of training per side"
        )
        + f"; {machine()}, load average "
        f"{min(load):.1f}-{max(load):.1f}; {minutes:.0f} min in all"
    )
    print("\n".join(lines))
    for note in notes:
        print(note)
    if args.write_results:
        write_results(args, lines, notes, test_theme, test_rows, load, minutes)
    return 0


def write_results(
    args: argparse.Namespace,
    lines: list[str],
    notes: list[str],
    test_theme: str,
    test_rows: int,
    load: list[float],
    minutes: float,
) -> None:
    import open_clip
    import torch

    command = shlex.join(["benchmarks/bench_icons.py", *sys.argv[1:]])
    text = f"""{SECTION}

coembed's tiny recipe as shipped vs open_clip's trainer on the same architecture, data, batch
and training-time budget ({args.budget:.0f} s per side, each side's epochs sized by its own
measured speed), all measured by `coembed eval` on the unseen test theme ({test_theme},
{test_rows:,} icons and captions). How it is made fair: the docstring of
`benchmarks/bench_icons.py`.

- Command: `.venv/bin/python {command}` ({minutes:.0f} min in all)
- Date: {time.strftime("%a %b %d %H:%M UTC %Y", time.gmtime())}
- Machine: {machine()}, shared with other jobs (load average {min(load):.1f}-{max(load):.1f}
  during the run); torch {torch.__version__}, open_clip_torch {open_clip.__version__}

{chr(10).join(lines)}

{chr(10).join(f"- {n}" for n in notes)}

![text queries -> top-5 test icons](icons_contact_sheet.png)
"""
    write_section(SECTION, text)
    print(f"wrote the {SECTION!r} section of RESULTS.md")


if __name__ == "__main__":
    sys.exit(main())
