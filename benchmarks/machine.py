"""The machine a benchmark ran on, for the tables in RESULTS.md."""

from __future__ import annotations

import os
import platform
import subprocess


def machine() -> str:
    """CPU model (from lscpu) and core count, e.g. ``AMD EPYC, 2 cores``."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line
        )
    except (OSError, StopIteration):
        model = platform.processor() or "unknown"
    return f"{model}, {os.cpu_count()} cores"
