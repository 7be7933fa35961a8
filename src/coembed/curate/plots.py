"""The curation tools' pictures: a probe's confusion matrix, the histogram of pair scores, the
trade-off of a weight-interpolation sweep, and a contact sheet of duplicate groups.

Each plot function returns PNG bytes (``coembed.report.figure_png``: the look of every coembed
plot) so that a command can write all its files together or none of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from coembed.report import contact_sheet, figure_png, pyplot


def confusion_png(confusion: np.ndarray, classnames: Sequence[str], title: str) -> bytes:
    """Rows: true class, columns: predicted class, each row normalized to sum to 1."""
    plt = pyplot()
    n = len(classnames)
    totals = confusion.sum(axis=1, keepdims=True)
    rates = confusion / np.maximum(totals, 1)  # (C, C)
    side = min(14.0, 2.5 + 0.38 * n)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    names = [c if len(c) < 24 else c[:21] + "..." for c in classnames]
    fontsize = 8 if n <= 30 else 5
    if n <= 60:  # beyond that the labels are a grey smear; the colours still show the pattern
        ax.set_xticks(range(n), names, rotation=90, fontsize=fontsize)
        ax.set_yticks(range(n), names, fontsize=fontsize)
    if n <= 20:
        for (i, j), count in np.ndenumerate(confusion):
            if count:
                colour = "white" if rates[i, j] > 0.5 else "#333333"
                ax.text(j, i, str(int(count)), ha="center", va="center", fontsize=7, color=colour)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(im, ax=ax, fraction=0.04, label="share of the true class")
    ax.set_title(title)
    return figure_png(fig)


def score_histogram_png(scores: np.ndarray, min_score: float | None, title: str) -> bytes:
    """The distribution of pair scores, with the threshold (and how many pass it) marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(scores, bins=min(60, max(10, len(scores) // 5)), color="#2a6f97", alpha=0.85)
    ax.set_xlabel("cosine similarity of image and caption")
    ax.set_ylabel("pairs")
    ax.grid(alpha=0.3)
    if min_score is not None:
        kept = int((scores >= min_score).sum())
        ax.axvline(min_score, color="#c8553d", linestyle="--")
        ax.text(
            min_score,
            ax.get_ylim()[1] * 0.95,
            f"  >= {min_score:g}: {kept} of {len(scores)} kept",
            color="#c8553d",
            va="top",
        )
    ax.set_title(title)
    return figure_png(fig)


def sweep_png(rows: Sequence[dict[str, Any]], eval_name: str, reference_name: str) -> bytes:
    """Left: both scores against alpha. Right: the trade-off, reference score against the new
    data's score, one point per alpha (WiSE-FT's picture)."""
    plt = pyplot()
    alphas = [row["alpha"] for row in rows]
    new = [row["eval"]["score"] for row in rows]
    old = [row["reference"]["score"] for row in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    new_metric, old_metric = rows[0]["eval"]["metric"], rows[0]["reference"]["metric"]
    left.plot(alphas, new, "o-", color="#c8553d", label=f"new data: {eval_name} ({new_metric})")
    left.plot(
        alphas, old, "s-", color="#2a6f97", label=f"reference: {reference_name} ({old_metric})"
    )
    left.set_xlabel("alpha (0: model A, 1: model B)")
    left.set_ylabel("score")
    left.grid(alpha=0.3)
    left.legend()
    left.set_title("score against alpha")
    right.plot(old, new, "-", color="#888888", zorder=1)
    right.scatter(old, new, c=alphas, cmap="viridis", zorder=2)
    for alpha, x, y in zip(alphas, old, new):
        right.annotate(f"{alpha:g}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    right.set_xlabel(f"reference: {reference_name} ({old_metric})")
    right.set_ylabel(f"new data: {eval_name} ({new_metric})")
    right.grid(alpha=0.3)
    right.set_title("trade-off (labels: alpha)")
    return figure_png(fig)


def groups_sheet(
    groups: Sequence[tuple[int, Sequence[tuple[str, float]]]], path: Path, per_group: int = 8
) -> Path:
    """A contact sheet, one row per (group id, members): its size, then its images with their
    similarity to the group's first (the one kept). Returns ``path`` (a PNG)."""
    rows = [
        (f"group {g}: {len(members)} images", list(members)[:per_group]) for g, members in groups
    ]
    return contact_sheet(rows, path)
