"""Pictures of a run that people would rather look at than read.

``write_report`` makes, in a report folder: the training loss curve (with validation recall per
epoch), recall@K bars for both directions, a text x image similarity heat map, and a contact
sheet of text queries next to their top-5 images. ``comparison_sheet`` sets several models' top
results for the same queries side by side, with the right answers framed.
"""

from __future__ import annotations

import io
import json
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from coembed.files import atomic_write, atomic_write_bytes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def pyplot():
    """matplotlib's pyplot, drawing to files only (the Agg backend)."""
    return _pyplot()


def figure_png(fig) -> bytes:
    """``fig`` as PNG bytes, drawn as every coembed plot is (110 dpi, tight box); closes it."""
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return out.getvalue()


def _save(fig, path: Path) -> Path:
    atomic_write_bytes(path, figure_png(fig))
    return path


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl, in order; empty when the run has none."""
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


# A result in a contact sheet: (image path, score), or (image path, score, label under it).
Result = tuple


def _wrap(text: str, chars: int) -> list[str]:
    """Greedy word wrap to lines of about ``chars`` characters."""
    line, lines = "", []
    for word in text.split():
        if line and len(line) + len(word) > chars:
            lines.append(line)
            line = ""
        line = f"{line} {word}".strip()
    return [*lines, line]


def contact_sheet(
    rows: Sequence[tuple[str, Sequence[Result]]], path: Path, thumb: int = 96
) -> Path:
    """One row per query: the query text, then its top results as thumbnails with scores."""
    return comparison_sheet([q for q, _ in rows], {"": [r for _, r in rows]}, path, thumb=thumb)


def comparison_sheet(
    queries: Sequence[str],
    results: Mapping[str, Sequence[Sequence[Result]]],
    path: Path,
    correct: Sequence[Collection[str]] | None = None,
    thumb: int = 96,
    title: str = "",
) -> Path:
    """One row per query, then one block of thumbnails per model, side by side.

    ``results`` maps a model's name (the heading of its block; "" for none) to its top results
    for each query, in query order. ``correct[i]``, if given, holds the image paths that answer
    query ``i``: those thumbnails get a green frame. Returns ``path`` (a PNG)."""
    label_w, pad, gap, frame = 260, 6, 18, 3
    font = ImageFont.load_default()
    line_h = font.getbbox("Ag")[3] + 3
    labelled = any(len(r) > 2 for block in results.values() for rs in block for r in rs)
    cell_h = thumb + line_h * (2 if labelled else 1) + 4
    row_h = cell_h + pad
    cols = max((len(rs) for block in results.values() for rs in block), default=0)
    block_w = cols * (thumb + pad)
    head_h = (line_h * (len(title.splitlines()) + 1) if title else 0) + (
        line_h + 4 if any(results) else 0
    )
    width = label_w + len(results) * block_w + (len(results) - 1) * gap + pad
    sheet = Image.new("RGB", (width, head_h + len(queries) * row_h + pad), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.multiline_text((pad, pad), title, fill="black", font=font)
    for b, name in enumerate(results):
        draw.text(
            (label_w + b * (block_w + gap), head_h - line_h - 2), name, fill="black", font=font
        )
    for r, query in enumerate(queries):
        y = head_h + pad + r * row_h
        draw.multiline_text((pad, y + 4), "\n".join(_wrap(query, 34)[:5]), fill="black", font=font)
        for b, block in enumerate(results.values()):
            x0 = label_w + b * (block_w + gap)
            if b:  # a rule between the models' blocks
                draw.line([(x0 - gap // 2, y), (x0 - gap // 2, y + cell_h)], fill="#bbbbbb")
            for c, (item, score, *label) in enumerate(block[r]):
                x = x0 + c * (thumb + pad)
                with Image.open(item) as img:
                    sheet.paste(img.convert("RGB").resize((thumb, thumb)), (x, y))
                if correct is not None and item in correct[r]:
                    box = [x - 1, y - 1, x + thumb, y + thumb]
                    draw.rectangle(box, outline="#1a9641", width=frame)
                text = f"{score:.3f}"
                if label:
                    # Cut the label to the thumbnail's width.
                    words = str(label[0])
                    while words and font.getlength(words) > thumb:
                        words = words[:-1]
                    text += "\n" + words
                draw.multiline_text((x, y + thumb + 3), text, fill="#333333", font=font)
    atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
    return path
