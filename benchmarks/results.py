"""RESULTS.md, the file every benchmark reports into: one ``## `` section per benchmark."""

from __future__ import annotations

import os
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(title: str, text: str, path: Path = RESULTS) -> None:
    """Replace the section headed ``title`` (e.g. ``## Server load``) with ``text``, which starts
    with that heading, or append it; the other sections stay as they are."""
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if found := pattern.search(old):
        rest = old[found.end() :]
        # A blank line between this section and the next one, as in the rest of the file.
        new = old[: found.start()] + (text.rstrip("\n") + "\n\n" + rest if rest else text)
    else:
        new = old.rstrip("\n") + "\n\n" + text
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, path)
