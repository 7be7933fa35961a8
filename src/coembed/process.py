"""Settings of the whole process that must be made early: OpenMP waiting and the allocator.

Nothing here imports torch: the OpenMP setting has to be in the environment before torch loads
its OpenMP runtime.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import time
from collections.abc import Mapping

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Where choose_openmp_waiting records what it decided, for the run's log. The environment is
# where the choice itself lives too, so the two cannot disagree, and it holds in every module.
CHOICE_VARIABLE = "COEMBED_OPENMP_WAITING"


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed memory for reuse instead of handing it back to the system.

    A training step allocates and frees the same large activations (several MB each) every step.
    By default glibc maps each block above its threshold fresh from the kernel and unmaps it when
    freed, so every step faults in its activations again page by page: on the tiny recipe that
    was ~50,000 page faults and a sixth of the step's CPU time. Above 1 GiB blocks are still
    mapped; the process's resident memory stays at its peak (freed memory is reused, not
    returned). A no-op returning False where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mapped = mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    trimmed = mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)
    return bool(mapped and trimmed)


# How long libgomp's idle threads spin before they sleep, when coembed picks it: 10,000 spins,
# about 0.1 ms (libgomp counts ~100,000 spins per ms). Its own default is 300,000 (~3 ms).
SHORT_SPIN = "10000"

# The commands that train a model in this process (the demo trains the tiny recipe).
TRAINING_COMMANDS = ("train", "demo")


def idle_cores(seconds: float = 0.1) -> float | None:
    """How many cores sat idle over the next ``seconds`` (from /proc/stat); None if unknown."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields[:8])  # idle + iowait, all but guest time

    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (idle1 - idle0) / (total1 - total0) * (os.cpu_count() or 1)


def openmp_waiting_settings(
    command: str | None, environ: Mapping[str, str] = os.environ
) -> tuple[dict[str, str], str]:
    """How OpenMP's idle threads should wait in a process about to run ``command``.

    Between two parallel regions of a training step the worker threads either spin or sleep.
    Sleeping threads take ~10-50 us to wake, and a CPU step runs ~1,500 regions: on 2 idle
    cores a short spin trains the tiny recipe ~10% faster (442-451 vs 394-405 samples/s).
    Spinning threads take the cores from everything else, though: with the machine's cores
    busy (two other CPU-bound jobs on 2 cores) sleeping was ~15% faster, and libgomp's own
    default (3 ms of spinning) stretched steps from 0.9 s to 2-12 s. So ``coembed train`` and
    ``coembed demo`` in a single process look at the machine for 0.1 s as they start and spin
    briefly (~0.1 ms) only when all but half a core sat idle; every other case (other commands,
    which serve requests beside other work, or several training processes on one machine)
    sleeps. A setting of
    OMP_WAIT_POLICY or GOMP_SPINCOUNT in ``environ`` is left alone.

    Returns the variables to set (none when the environment decides) and a description.
    """
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return {}, "as set in the environment"
    idle = None
    if command in TRAINING_COMMANDS and int(environ.get("WORLD_SIZE", "1") or 1) <= 1:
        idle = idle_cores()
    cores = os.cpu_count() or 1
    seen = "" if idle is None else f" ({idle:.1f} of {cores} cores idle at start)"
    if idle is not None and idle >= cores - 0.5:
        return {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": SHORT_SPIN}, (
            "spin ~0.1 ms, then sleep" + seen
        )
    return {"OMP_WAIT_POLICY": "PASSIVE"}, "sleep" + seen


def choose_openmp_waiting(command: str | None) -> str:
    """Apply :func:`openmp_waiting_settings` to this process (before torch is imported).

    Returns the description, which :func:`openmp_waiting` reads back later.
    """
    settings, description = openmp_waiting_settings(command)
    os.environ.update(settings)
    os.environ[CHOICE_VARIABLE] = description
    return description


def openmp_waiting(environ: Mapping[str, str] = os.environ) -> str:
    """How OpenMP's idle threads wait in this process, as chosen for it (for the run's log)."""
    if CHOICE_VARIABLE in environ:
        return environ[CHOICE_VARIABLE]
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return "as set in the environment"
    return "not chosen by coembed"


def worker_signals(*_: object) -> None:
    """The signal handling of a worker process (a pool's initializer, a DataLoader's
    ``worker_init_fn``): Ctrl-C is ignored and SIGTERM kills.

    Ctrl-C and SIGTERM reach the whole process group, and the parent stops its workers itself. A
    forked worker would otherwise inherit the parent's handlers: a KeyboardInterrupt traceback per
    worker on Ctrl-C, and with ``coembed.cli.sigterm_as_interrupt`` a SIGTERM that raises inside the
    worker instead of ending it, which can leave a pool's ``terminate`` waiting on a worker forever.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
