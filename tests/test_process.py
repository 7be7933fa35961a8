"""Device and process settings: the allocator setting that training applies, workers' signals."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from coembed import process
from coembed.cli import sigterm_as_interrupt
from coembed.datasets import icons

# A child process allocates and frees a 64 MB tensor again and again, as a training step does
# with its activations, and prints the page faults of 20 rounds after 10 of warm-up.
FAULTS = """
import resource, sys, torch
from coembed.process import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
for _ in range(10):
    torch.zeros(16 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.zeros(16 << 20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    default, kept = page_faults("default"), page_faults("keep")
    # By default glibc maps a 64 MB block afresh each time (above its largest automatic
    # threshold, 32 MB): 20 x 16,384 pages of 4 KB. Kept, the same memory serves every round
    # (0 faults in most runs; a rare growth of the heap by 64 MB is 16,384).
    assert default >= 20 * 16384 * 0.9
    assert kept <= default / 4


@pytest.mark.parametrize(
    "command, environ, idle, expected",
    [
        # training alone on an idle machine: a short spin
        ("train", {}, 2.0, {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "10000"}),
        ("demo", {}, 2.0, {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "10000"}),
        # training beside other work (1 of 2 cores busy): threads sleep
        ("train", {}, 1.0, {"OMP_WAIT_POLICY": "PASSIVE"}),
        # several training processes (torchrun): sleep, without looking
        ("train", {"WORLD_SIZE": "2"}, 2.0, {"OMP_WAIT_POLICY": "PASSIVE"}),
        # a server or a search runs beside other work: sleep
        ("serve", {}, 2.0, {"OMP_WAIT_POLICY": "PASSIVE"}),
        # the user's own setting wins, whichever it is
        ("train", {"OMP_WAIT_POLICY": "PASSIVE"}, 2.0, {}),
        ("train", {"GOMP_SPINCOUNT": "0"}, 2.0, {}),
    ],
)
def test_openmp_waiting_follows_the_command_and_the_idle_cores(
    monkeypatch, command, environ, idle, expected
):
    monkeypatch.setattr(process.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(process, "idle_cores", lambda seconds=0.1: idle)
    settings, description = process.openmp_waiting_settings(command, environ)
    assert settings == expected
    assert description.startswith(
        "as set" if not expected else "spin" if "GOMP_SPINCOUNT" in expected else "sleep"
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")
def test_idle_cores_reads_the_machine():
    idle = process.idle_cores(0.05)
    assert idle is not None  # /proc/stat is there on Linux
    assert 0.0 <= idle <= (os.cpu_count() or 1) + 0.01


def test_idle_cores_counts_idle_and_iowait_of_all_cores(monkeypatch):
    # Two samples of /proc/stat's first line: user nice system idle iowait irq softirq steal
    # guest guest_nice. Between them 900 ticks passed, 800 of them idle (700) or iowait (100);
    # guest time (already inside user) is not counted twice.
    samples = iter(
        [
            "cpu  100 0 100 700 100 0 0 0 50 0\n",
            "cpu  150 0 150 1400 200 0 0 0 80 0\n",
        ]
    )
    monkeypatch.setattr(process, "open", lambda *_: io.StringIO(next(samples)), raising=False)
    monkeypatch.setattr(process.time, "sleep", lambda _: None)
    monkeypatch.setattr(process.os, "cpu_count", lambda: 4)
    assert process.idle_cores() == pytest.approx(800 / 900 * 4)
    # No time passed between the samples: unknown, not a division by zero.
    samples = iter(["cpu  1 0 1 7 1 0 0 0 0 0\n"] * 2)
    assert process.idle_cores() is None


def test_openmp_waiting_is_read_back_from_the_environment(monkeypatch):
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", process.CHOICE_VARIABLE):
        monkeypatch.setenv(name, "")  # recorded, so the test's own choice is undone after it
        monkeypatch.delenv(name)
    assert process.openmp_waiting() == "not chosen by coembed"
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert process.openmp_waiting() == "as set in the environment"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setattr(process, "idle_cores", lambda seconds=0.1: 0.2)
    chosen = process.choose_openmp_waiting("train")
    assert chosen.startswith("sleep") and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert process.openmp_waiting() == chosen


def _signal_handlers(*_: object) -> str:
    """What a process does on SIGTERM and Ctrl-C: 'default' or 'ignore' for each, else 'handler'."""

    def name(handler: object) -> str:
        return {signal.SIG_DFL: "default", signal.SIG_IGN: "ignore"}.get(handler, "handler")

    return f"{name(signal.getsignal(signal.SIGTERM))}/{name(signal.getsignal(signal.SIGINT))}"


class _Handlers(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> str:
        return _signal_handlers()


def test_worker_processes_die_on_sigterm_and_ignore_ctrl_c(monkeypatch, tmp_path):
    # The CLI turns SIGTERM into an exception (sigterm_as_interrupt); a forked worker keeping that
    # handler raised instead of dying when its pool was terminated, and `coembed data icons` hung
    # waiting for it. Every pool and DataLoader of ours resets the handlers in its workers.
    with sigterm_as_interrupt():
        assert _signal_handlers() == "handler/handler"  # what a worker would inherit
        monkeypatch.setattr(icons, "_render_task", _signal_handlers)
        tasks = [("src", str(tmp_path / f"{i}.png"), 8) for i in range(256)]
        rendered = icons._render_all(tasks, workers=2, desc="icons")
        loaded = DataLoader(
            _Handlers(), batch_size=2, num_workers=2, worker_init_fn=process.worker_signals
        )
        in_loader = [h for batch in loaded for h in batch]
    assert len(rendered) == 256 and set(rendered) == {"default/ignore"}
    assert set(in_loader) == {"default/ignore"}
    # The project's own DataLoaders pass it.
    for source in ("src/coembed/data/loader.py",):
        text = (Path(__file__).parents[1] / source).read_text()
        assert text.count("DataLoader(") == text.count("worker_init_fn=worker_signals")
