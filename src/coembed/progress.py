"""When long work shows a progress bar: one policy for every bar coembed draws.

A bar is drawn on a terminal and left out when stderr is a file or a pipe (tqdm's
``disable=None``), except for the long jobs whose log people read afterwards (training, the
image cache), which pass ``on_pipes=True``. ``COEMBED_NO_PROGRESS=1`` (tests, quiet scripts) or
``enabled=False`` (a caller that has its own output, a non-main process) turns it off entirely.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

QUIET_VARIABLE = "COEMBED_NO_PROGRESS"


def progress_wanted(enabled: bool = True) -> bool:
    """Whether a bar may be drawn at all (the caller's wish and the environment's)."""
    return enabled and os.environ.get(QUIET_VARIABLE) != "1"


def progress_bar(
    iterable: Iterable | None = None,
    *,
    enabled: bool = True,
    on_pipes: bool = False,
    **options: Any,
):
    """A tqdm bar under the shared policy; ``options`` go to tqdm (total, desc, unit, leave...)."""
    from tqdm import tqdm

    if not progress_wanted(enabled):
        disable: bool | None = True
    else:
        disable = False if on_pipes else None
    return tqdm(iterable, disable=disable, dynamic_ncols=True, **options)
