"""Choosing the device and the numeric precision."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

from coembed.errors import UsageError

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda was asked for but no CUDA device is available (use cpu or auto)"
        )
    if name != "cpu" and not name.startswith("cuda"):
        raise UsageError(f"unknown device {name!r} (cpu, cuda or auto)")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting; None means plain fp32."""
    if precision == "fp32" or device.type != "cuda":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


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
