"""Device and process settings: the allocator setting that training applies."""

from __future__ import annotations

import subprocess
import sys

import pytest

# A child process allocates and frees a 64 MB tensor again and again, as a training step does
# with its activations, and prints the page faults of 20 rounds after 10 of warm-up.
FAULTS = """
import resource, sys, torch
from coembed.device import keep_freed_memory
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
