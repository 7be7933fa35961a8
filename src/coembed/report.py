"""Pictures of a run that people would rather look at than read.

``write_report`` makes, in a report folder: the training loss curve (with validation recall per
epoch), recall@K bars for both directions, a text x image similarity heat map, and a contact
sheet of text queries next to their top-5 images.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from coembed.checkpoint import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    _pyplot().close(fig)
    return path


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_training(metrics: list[dict], path: Path) -> Path:
    """Loss against step, and validation R@1 both ways against step on a second axis."""
    plt = _pyplot()
    steps = [m["step"] for m in metrics if "loss" in m]
    losses = [m["loss"] for m in metrics if "loss" in m]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, color="#2a6f97", label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss")
    ax.grid(alpha=0.3)
    val = [m for m in metrics if "val/image_to_text_R@1" in m]
    if val:
        ax2 = ax.twinx()
        vs = [m["step"] for m in val]
        ax2.plot(
            vs,
            [m["val/image_to_text_R@1"] for m in val],
            "o-",
            color="#c8553d",
            label="val image→text R@1",
        )
        ax2.plot(
            vs,
            [m["val/text_to_image_R@1"] for m in val],
            "s-",
            color="#588b8b",
            label="val text→image R@1",
        )
        ax2.set_ylabel("validation recall@1")
        ax2.set_ylim(0, 1)
        lines = ax.get_lines() + ax2.get_lines()
        ax.legend(lines, [line.get_label() for line in lines], loc="center right")
    ax.set_title("training")
    return _save(fig, path)


def plot_recall(metrics: dict, path: Path) -> Path:
    """Grouped bars: R@1/5/10 for image→text and text→image."""
    plt = _pyplot()
    ks = [1, 5, 10]
    i2t = [metrics[f"image_to_text_R@{k}"] for k in ks]
    t2i = [metrics[f"text_to_image_R@{k}"] for k in ks]
    x = np.arange(len(ks))
    fig, ax = plt.subplots(figsize=(6, 4))
    for offset, values, label, colour in (
        (-0.2, i2t, "image → text", "#c8553d"),
        (0.2, t2i, "text → image", "#2a6f97"),
    ):
        bars = ax.bar(x + offset, values, width=0.4, label=label, color=colour)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(x, [f"R@{k}" for k in ks])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("recall")
    ax.legend()
    ax.set_title("retrieval on the validation set")
    return _save(fig, path)


def plot_similarity(similarity: np.ndarray, captions: Sequence[str], path: Path) -> Path:
    """Heat map of cosine similarity, rows = captions, columns = their images (diagonal = match)."""
    plt = _pyplot()
    n = similarity.shape[0]
    fig, ax = plt.subplots(figsize=(2 + 0.45 * n, 1 + 0.4 * n))
    im = ax.imshow(similarity, cmap="viridis")
    ax.set_yticks(range(n), [c if len(c) < 48 else c[:45] + "..." for c in captions], fontsize=7)
    ax.set_xticks(range(n), [str(i) for i in range(n)], fontsize=7)
    ax.set_xlabel("image (same order as the captions)")
    fig.colorbar(im, ax=ax, fraction=0.03, label="cosine similarity")
    ax.set_title("text × image similarity (matches on the diagonal)")
    return _save(fig, path)


def contact_sheet(
    rows: Sequence[tuple[str, Sequence[tuple[str, float]]]], path: Path, thumb: int = 96
) -> Path:
    """One row per query: the query text, then its top results as thumbnails with scores."""
    label_w, pad = 260, 6
    cols = max((len(results) for _, results in rows), default=0)
    width = label_w + cols * (thumb + pad) + pad
    height = len(rows) * (thumb + 22 + pad) + pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (query, results) in enumerate(rows):
        y = pad + r * (thumb + 22 + pad)
        words, line, lines = query.split(), "", []
        for word in words:  # wrap the query text into the label column
            if len(line) + len(word) > 34:
                lines.append(line)
                line = ""
            line = f"{line} {word}".strip()
        lines.append(line)
        draw.multiline_text((pad, y + 4), "\n".join(lines[:5]), fill="black")
        for c, (item, score) in enumerate(results):
            x = label_w + c * (thumb + pad)
            with Image.open(item) as img:
                sheet.paste(img.convert("RGB").resize((thumb, thumb)), (x, y))
            draw.text((x, y + thumb + 3), f"{score:.3f}", fill="#333333")
    atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
    return path
