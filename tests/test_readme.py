"""Every command README.md shows, run as written on the shipped data.

The ``coembed ...`` and ``torchrun ... -m coembed ...`` lines of the README's fenced blocks
(continuation lines joined, comments dropped) run in README order through the real command line,
in a scratch folder, with small settings. What the README names but a fresh clone does not have
gets a stand-in of the same name in the scratch folder (STAND_INS); the few arguments that
cannot run here as written are replaced (SUBSTITUTIONS); every training run takes two steps at
the tiny test shapes (``extra_arguments``). A command that needs what cannot exist here is
listed in ``skipped`` with its reason and printed, never left out silently.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    HEADS_64,
    REPO,
    SHIPPED,
    TINY,
    assert_one_line_error,
    free_port,
    heads_64_openclip,
    ok,
    run_cli_batch,
    shipped_rows,
    write_csv,
)

README = REPO / "README.md"

# What the README names that a fresh clone lacks: the stand-in put under that name in the
# scratch folder (commands run there, so what they write lands there too).
STAND_INS = {
    "pairs.csv": "the first 48 pairs of data/synthetic/train.csv",
    "val.csv": "the first 16 pairs of data/synthetic/val.csv",
    "photos/": "16 shipped validation pictures",
    "more-photos/": "8 other shipped validation pictures",
    "query.jpg": "a shipped validation picture (a PNG, under this name)",
    "RN50.pt": "a small random open_clip CLIP ResNet (tests/helpers.py HEADS_64 shapes, GELU)",
    "shards/{000..099}.tar": "100 webdataset shards of 2 shipped pairs each",
    "data/shapes": "the shipped data/shapes (a link)",
}
# README arguments that cannot run here as written: (README words, what runs instead, why).
SUBSTITUTIONS = [
    (
        ["--openclip-model", "RN50"],
        ["--set", "model.text.act=gelu"],
        "RN50.pt is a small stand-in, so its shapes are read from the file; open_clip's names "
        "are tested at the full RN50 size in tests/test_openclip_models.py",
    ),
    (["--nproc_per_node=4"], ["--nproc_per_node=2", "--master_port={port}"], "two cores"),
    (["--port", "8000"], ["--port", "{port}"], "a port nothing else uses"),
    (["--train-data", "..."], ["--train-data", "pairs.csv"], "the README's '...'"),
    (["train", "..."], ["train"], "--resume continues the run as saved, with no other options"),
]
TINY_SETS = [
    arg for pair in [*TINY, "train.threads=1", "data.workers=0"] for arg in ("--set", pair)
]
TRAIN_TINY = ["--steps", "2", "--batch-size", "8", "--device", "cpu"]
ICON_THEMES = ("Adwaita", "Papirus", "Numix")  # three of the themes the README installs


def readme_commands(text: str | None = None) -> list[str]:
    """The coembed command lines of the README's fenced blocks, in order."""
    commands, fenced, shell, pending = [], False, False, ""
    for line in (text if text is not None else README.read_text()).splitlines():
        if line.startswith("```"):
            # A bare fence opens a block of commands; ```python opens code, not commands.
            fenced, shell = not fenced, not fenced and line.strip() == "```"
            continue
        if not shell:
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.split()[:1] in (["coembed"], ["torchrun"]):
            commands.append(pending.strip())
        pending = ""
    return commands


def substitute(words: list[str], port: int) -> list[str]:
    """``words`` with every SUBSTITUTIONS entry applied (the port filled in)."""
    for old, new, _ in SUBSTITUTIONS:
        for i in range(len(words) - len(old) + 1):
            if words[i : i + len(old)] == old:
                words = words[:i] + [w.format(port=port) for w in new] + words[i + len(old) :]
                break
    return words


def extra_arguments(args: list[str]) -> list[str]:
    """The small settings appended to a coembed command (its arguments after ``coembed``)."""
    if args[0] == "demo":
        return ["--steps", "2", "--device", "cpu", "--set", "train.batch_size=16", *TINY_SETS]
    if args[0] == "train" and "--resume" not in args:
        if "--init" in args:  # the stand-in RN50.pt's shapes on the recipe
            return [*TRAIN_TINY, *[a for pair in HEADS_64 for a in ("--set", pair)]]
        return [*TRAIN_TINY, *TINY_SETS]
    if args[:2] == ["data", "icons"]:
        return ["--themes", *ICON_THEMES, "--max-per-theme", "30"]
    return []


def installed_icon_themes() -> set[str]:
    """The freedesktop icon themes installed on this machine."""
    from coembed.datasets.icons import discover_themes

    return set(discover_themes()[0])


def plan(commands: list[str], port: int) -> tuple[list[tuple[str, list[str]]], dict[str, str]]:
    """(README line, argv to run) for each command to run, and {README line: why} for the rest."""
    runs, skipped = [], {}
    icons = ICON_THEMES if set(ICON_THEMES) <= installed_icon_themes() else ()
    for line in commands:
        words = substitute(shlex.split(line, comments=True), port)
        if any(
            shlex.split(seen, comments=True) == shlex.split(line, comments=True) for seen, _ in runs
        ):
            skipped[line] = "the same command already ran above"
            continue
        if "icon-themes" in line and not icons:
            skipped[line] = f"needs the icon themes {', '.join(ICON_THEMES)} installed (apt-get)"
            continue
        if words[0] == "torchrun":
            at = words.index("coembed") + 1
            argv = [*words[1:], *extra_arguments(words[at:])]
        else:
            argv = [*words[1:], *extra_arguments(words[1:])]
        runs.append((line, argv))
    return runs, skipped


# --- the stand-ins --------------------------------------------------------------------------------


def absolute_rows(n: int, split: str) -> list[tuple[str, str]]:
    return [(str(SHIPPED / "images" / name), caption) for name, caption in shipped_rows(n, split)]


def shard(path: Path, rows: list[tuple[str, str]]) -> None:
    """A webdataset shard: <key>.png + <key>.txt per row."""
    with tarfile.open(path, "w") as tar:
        for image, caption in rows:
            key = Path(image).stem
            tar.add(image, arcname=f"{key}.png")
            data = caption.encode()
            info = tarfile.TarInfo(f"{key}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def make_stand_ins(work: Path) -> None:
    """Everything STAND_INS lists, under its README name in ``work``."""
    write_csv(work / "pairs.csv", absolute_rows(48, "train"))
    write_csv(work / "val.csv", absolute_rows(16, "val"))
    val = absolute_rows(24, "val")
    for folder, rows in (("photos", val[:16]), ("more-photos", val[16:])):
        (work / folder).mkdir()
        for image, _ in rows:
            shutil.copyfile(image, work / folder / Path(image).name)
    shutil.copyfile(val[0][0], work / "query.jpg")
    torch.save(heads_64_openclip(quick_gelu=False, seed=0).state_dict(), work / "RN50.pt")
    (work / "shards").mkdir()
    train = absolute_rows(200, "train")
    for i in range(100):
        shard(work / "shards" / f"{i:03d}.tar", train[2 * i : 2 * i + 2])
    (work / "data").mkdir()
    (work / "data" / "shapes").symlink_to(REPO / "data" / "shapes")


# --- running them ---------------------------------------------------------------------------------

ENV = {**os.environ, "COEMBED_NO_PROGRESS": "1", "PYTHONPATH": str(REPO / "src")}


def serve_until_it_answers(argv: list[str], port: int, work: Path) -> subprocess.CompletedProcess:
    """Start ``coembed serve``, wait for /health to answer, stop it with Ctrl-C."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "coembed", *argv],
        cwd=work,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    answered, deadline = None, time.monotonic() + 120
    while answered is None and proc.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as reply:
                answered = json.loads(reply.read())
        except OSError:
            time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    code = 0 if answered is not None else (proc.returncode or 1)
    return subprocess.CompletedProcess(argv, code, out, err + f"\n/health: {answered}")


def run_all(runs: list[tuple[str, list[str]]], port: int, work: Path) -> list:
    """Run every planned command in order; returns (README line, CompletedProcess) pairs.
    Consecutive coembed commands share one interpreter (run_cli_batch)."""
    done, batch = [], []

    def flush() -> None:
        if batch:
            done.extend(zip([b[0] for b in batch], run_cli_batch([b[1] for b in batch], work)))
            batch.clear()

    for line, argv in runs:
        if line.startswith("torchrun"):
            flush()
            command = [sys.executable, "-m", "torch.distributed.run", *argv]
            proc = subprocess.run(command, cwd=work, env=ENV, capture_output=True, text=True)
            done.append((line, proc))
        elif argv[0] == "serve":
            flush()
            done.append((line, serve_until_it_answers(argv, port, work)))
        else:
            batch.append((line, argv))
    flush()
    return done


# --- the tests ------------------------------------------------------------------------------------


def test_every_readme_command_parses_and_every_table_entry_is_used():
    """Fast: each README command, as it will run, parses with the real parser; no stand-in or
    substitution is left over from a README line that is gone."""
    from coembed.cli import build_parser

    commands = readme_commands()
    assert len(commands) >= 15, commands
    runs, _ = plan(commands, port=8123)
    parser = build_parser()
    for line, argv in runs:
        args = argv[argv.index("coembed") + 1 :] if line.startswith("torchrun") else argv
        parser.parse_args(args)  # a UsageError names the README line's bad option
    text = " ".join(commands)
    for name in STAND_INS:
        assert name in text, f"stand-in {name} is no longer in the README"
    for old, _, _ in SUBSTITUTIONS:
        assert " ".join(old) in text, f"substitution {old} is no longer in the README"


def test_readme_flag_for_open_clip_style_csv(tmp_path, tiny_model_dir):
    """The flag the README gives for open_clip-style CSVs (filepath, title) reads them."""
    flag = re.search(r"`([^`]+)` for\s+open_clip-style files", README.read_text()).group(1)
    rows = shipped_rows(8, "val")
    data = write_csv(
        tmp_path / "open_clip.csv",
        [(str(SHIPPED / "images" / name), caption) for name, caption in rows],
        header=("filepath", "title"),
    )
    (proc,) = run_cli_batch(
        [["eval", "--model", str(tiny_model_dir), "--data", str(data), *flag.split(), "--json"]]
    )
    assert json.loads(ok(proc).stdout)["captions"] == 8
    (wrong,) = run_cli_batch(
        [["eval", "--model", str(tiny_model_dir), "--data", str(data), "--image-key", "title"]]
    )
    assert_one_line_error(wrong, 1, "no caption column 'caption'")


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path):
    """Every README command, in order, on the shipped data (about a minute of CPU time)."""
    work = tmp_path / "work"
    work.mkdir()
    make_stand_ins(work)
    port = free_port()
    runs, skipped = plan(readme_commands(), port)
    for line, why in skipped.items():
        print(f"skipped: {line}\n    because {why}")
    results = run_all(runs, port, work)
    failed = [
        f"{line}\n  ran: {shlex.join(proc.args)}\n  exit {proc.returncode}\n{proc.stderr[-2000:]}"
        for line, proc in results
        if proc.returncode != 0 or "Traceback" in proc.stderr
    ]
    print(f"ran {len(results)} README commands, skipped {len(skipped)}")
    assert not failed, "\n\n".join(failed)
    assert len(results) == len(runs)
    # A few outputs the README promises, to see the commands did their work.
    assert json.loads((work / "runs" / "demo" / "demo.json").read_text())["finished"] is True
    assert (work / "models" / "rn50" / "model.safetensors").is_file()
    assert (work / "rn50-openclip.pt").is_file()
    with open(work / "pairs.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 48
