"""Evaluation: retrieval recall@K and ranks in both directions, and zero-shot classification.

Retrieval (``retrieval_metrics``) handles several captions per image, as in COCO and Flickr30k:

- image -> text: an image scores a hit at K when *any* of its captions is among the K best texts;
- text -> image: each caption has one target, the image it describes.

Captions of the same text are one caption: no model can tell them apart (they embed to one
point). Where several pictures share a caption ("a cat", an icon's name), an image ranks each
caption text once and finds its caption when that text comes first, and a caption's targets are
all images that have it. Without repeated captions this is the rule above; with them it is the
one under which a perfect model scores 1 (open_clip's index-based metric counts a repeated
caption's other rows as misses, and 40 rows of "a dog" as 40 competitors).

Ties count against the model: an item is ranked behind every non-target item with an equal or
higher score, so a model that maps everything to one point scores zero, not one.

Zero-shot classification (``zeroshot``) reads a folder with one sub-folder of images per
class, embeds every class name through a list of prompt templates, averages the normalized
template embeddings (renormalized: CLIP's "prompt ensembling") and classifies each image by the
nearest class embedding.
"""

from __future__ import annotations

import os
import string
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from coembed.data.formats import caption_ids_of
from coembed.errors import DataError, UsageError
from coembed.files import read_regular_file
from coembed.names import check_path, escape_name

if TYPE_CHECKING:
    from coembed.embedder import Embedder

# Prompt templates for zero-shot classification. A few phrasings in the style of CLIP's ImageNet
# list; averaging over them makes the class embedding less sensitive to one caption style.
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a {}.",
    "there is a {}.",
    "a drawing of a {}.",
    "a rendering of a {}.",
    "a close-up photo of a {}.",
    "a photo of the {}.",
    "a good photo of a {}.",
)

MAX_TEMPLATES_BYTES = 1 << 20  # a template file holds tens of lines

# Similarity rows are computed in blocks so that 25k captions x 5k images never needs one
# (25k, 5k) matrix in memory at once.
_BLOCK = 1024


def _check_shapes(image_emb: np.ndarray, text_emb: np.ndarray, text_to_image: np.ndarray) -> None:
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(
            f"expected (N_img, D) and (N_txt, D) embeddings, got {image_emb.shape} and {text_emb.shape}"
        )
    if text_to_image.shape != (len(text_emb),):
        raise ValueError(
            f"text_to_image must have one entry per text ({len(text_emb)}), got {text_to_image.shape}"
        )
    if len(text_to_image) and (text_to_image.min() < 0 or text_to_image.max() >= len(image_emb)):
        raise ValueError("text_to_image holds an index outside [0, N_img)")


def _dense_ids(caption_ids: np.ndarray | None, n_texts: int) -> np.ndarray:
    if caption_ids is None:
        return np.arange(n_texts, dtype=np.int64)
    caption_ids = np.asarray(caption_ids)
    if caption_ids.shape != (n_texts,):
        raise ValueError(
            f"caption_ids must have one entry per text ({n_texts}), got {caption_ids.shape}"
        )
    return np.unique(caption_ids, return_inverse=True)[1].astype(np.int64)


def image_to_text_ranks(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    text_to_image: np.ndarray,
    caption_ids: np.ndarray | None = None,
) -> np.ndarray:
    """For each image with captions, the 0-based rank of its best caption among all captions,
    a caption being all texts of one ``caption_ids`` (scored by its best row).

    Returns an (N_img_with_captions,) int array; images without captions are left out.
    """
    ids_of_text = _dense_ids(caption_ids, len(text_emb))
    n_ids = int(ids_of_text.max()) + 1 if len(ids_of_text) else 0
    # Texts sorted by caption, and where each caption's rows start: one column per caption.
    order = np.argsort(ids_of_text, kind="stable")
    starts = np.searchsorted(ids_of_text[order], np.arange(n_ids))
    texts_by_caption = text_emb[order].T  # (D, N_txt): the texts in caption-id order
    has_caption = np.zeros(len(image_emb), bool)
    has_caption[text_to_image] = True
    ranks = []
    for start in range(0, len(image_emb), _BLOCK):
        stop = min(start + _BLOCK, len(image_emb))
        scores = image_emb[start:stop] @ texts_by_caption  # (b, N_txt), columns by caption
        if n_ids < len(text_emb):
            scores = np.maximum.reduceat(scores, starts, axis=1)  # (b, n_ids)
        own = np.zeros((stop - start, n_ids), bool)  # (b, n_ids): the image's captions
        mine = (text_to_image >= start) & (text_to_image < stop)
        own[text_to_image[mine] - start, ids_of_text[mine]] = True
        best_own = np.where(own, scores, -np.inf).max(axis=1)  # (b,)
        # Other captions scoring at least as well as the best own caption rank ahead.
        ranks.append(((scores >= best_own[:, None]) & ~own).sum(axis=1))
    return np.concatenate(ranks)[has_caption] if ranks else np.zeros(0, np.int64)


def text_to_image_ranks(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    text_to_image: np.ndarray,
    caption_ids: np.ndarray | None = None,
) -> np.ndarray:
    """For each text, the 0-based rank of its best image among all images (every image with a
    caption of the text's ``caption_ids`` is its image): an (N_txt,) int array."""
    ids_of_text = _dense_ids(caption_ids, len(text_emb))
    column = np.full(int(ids_of_text.max()) + 1 if len(ids_of_text) else 0, -1, np.int64)
    ranks = []
    for start in range(0, len(text_emb), _BLOCK):
        ids = np.arange(start, min(start + _BLOCK, len(text_emb)))
        scores = text_emb[ids] @ image_emb.T  # (b, N_img)
        # The images of each caption text in the block, one row per distinct text.
        block_ids = np.unique(ids_of_text[ids])
        column[block_ids] = np.arange(len(block_ids))
        of_block = column[ids_of_text] >= 0  # (N_txt,): texts of a caption in the block
        images_of = np.zeros((len(block_ids), len(image_emb)), bool)
        images_of[column[ids_of_text[of_block]], text_to_image[of_block]] = True
        target = images_of[column[ids_of_text[ids]]]  # (b, N_img)
        column[block_ids] = -1
        best = np.where(target, scores, -np.inf).max(axis=1)  # (b,)
        # Every other image scoring at least as well as the best target ranks ahead.
        ranks.append(((scores >= best[:, None]) & ~target).sum(axis=1))
    return np.concatenate(ranks) if ranks else np.zeros(0, np.int64)


def rank_summary(direction: str, ranks: np.ndarray) -> dict[str, float]:
    """Median and mean 1-based rank of the true match from 0-based ``ranks``, as open_clip
    reports them (the median of an even count rounds down to a whole rank):
    ``{"<direction>_median_rank": float, "<direction>_mean_rank": float}``."""
    return {
        f"{direction}_median_rank": float(np.floor(np.median(ranks)) + 1),
        f"{direction}_mean_rank": float(np.mean(ranks) + 1),
    }


def retrieval_metrics(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    text_to_image: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    caption_ids: np.ndarray | None = None,
) -> dict[str, float | int]:
    """Recall@K both ways for unit-row embeddings; ``text_to_image[t]`` is caption t's image
    and ``caption_ids[t]`` (``caption_ids_of(captions)``) says which texts are the same caption
    (by default none are).

    Returns ``{"image_to_text_R@K": float, "image_to_text_median_rank": float,
    "image_to_text_mean_rank": float, the same for "text_to_image", "images": int,
    "captions": int}``: ranks are 1-based, and ``images`` counts the images that have at least
    one caption.
    """
    image_emb = np.asarray(image_emb, np.float32)
    text_emb = np.asarray(text_emb, np.float32)
    text_to_image = np.asarray(text_to_image, np.int64)
    _check_shapes(image_emb, text_emb, text_to_image)
    if len(text_emb) == 0:
        raise DataError("nothing to evaluate: no captions with a readable image")
    i2t = image_to_text_ranks(image_emb, text_emb, text_to_image, caption_ids)
    t2i = text_to_image_ranks(image_emb, text_emb, text_to_image, caption_ids)
    metrics: dict[str, float | int] = {}
    for direction, ranks in (("image_to_text", i2t), ("text_to_image", t2i)):
        for k in ks:
            metrics[f"{direction}_R@{k}"] = float(np.mean(ranks < k))
        metrics.update(rank_summary(direction, ranks))
    metrics["images"] = len(i2t)
    metrics["captions"] = len(t2i)
    return metrics


def _warn_skipped(failures: list[tuple[Any, str]]) -> None:
    if failures:
        sys.stderr.write(
            f"coembed: skipped {len(failures)} image(s) that could not be read "
            f"(first: {escape_name(failures[0][1])})\n"
        )


def _none_readable(source, ok: list[int], failures: list[tuple[Any, str]]) -> None:
    # One error line, not a skip warning followed by an error.
    if not ok:
        first = f" (first: {failures[0][1]})" if failures else ""
        raise DataError(f"{source}: none of the {len(failures)} images could be read{first}")


def evaluate_retrieval(
    model: str | os.PathLike | Embedder,
    data: str | os.PathLike,
    *,
    image_key: str | None = None,
    caption_key: str | None = None,
    split: str | None = None,
    device: str = "auto",
) -> dict[str, float | int]:
    """Recall@1/5/10 and the median and mean rank of the true match both ways of a model (a
    directory or an Embedder) on a dataset, plus counts.

    Images that fail to decode are skipped with their captions and counted in
    ``skipped_images``; captions cut to the length limit in ``long_captions_truncated``, empty
    ones (skipped) in ``empty_captions``. Captions of the same text are one caption (module
    docstring); ``repeated_captions`` counts the rows whose text another row has too.
    """
    from coembed.data.formats import read_records
    from coembed.embedder import as_embedder

    # The data first: a dataset that cannot be read fails before a model is loaded for it.
    records, report = read_records(
        os.fspath(data), image_key or "filepath", caption_key or "caption", split
    )
    embedder = as_embedder(model, device)
    image_emb, ok, failures = embedder.embed_images_skipping(
        [r.image for r in records], progress=True
    )
    _none_readable(data, ok, failures)
    _warn_skipped(failures)
    captions: list[str] = []
    text_to_image: list[int] = []
    for row, record_id in enumerate(ok):
        captions.extend(records[record_id].captions)
        text_to_image.extend([row] * len(records[record_id].captions))
    text_emb = embedder.embed_texts(captions)
    caption_ids = caption_ids_of(captions)
    metrics = retrieval_metrics(
        image_emb, text_emb, np.asarray(text_to_image, np.int64), caption_ids=caption_ids
    )
    # Rows whose caption text another row has too (each is a target of the other's image).
    metrics["repeated_captions"] = int((np.bincount(caption_ids)[caption_ids] > 1).sum())
    metrics["skipped_images"] = len(failures)
    # Captions the reader changed or dropped: a cut caption is scored as cut.
    metrics["long_captions_truncated"] = report.long_captions_truncated
    metrics["empty_captions"] = report.empty_captions
    return metrics


# --- zero-shot -----------------------------------------------------------------------------------


def read_templates(path: str | os.PathLike | None) -> list[str]:
    """Templates from a file (one per line, each with one ``{}``), or the default list."""
    if path is None:
        return list(DEFAULT_TEMPLATES)
    check_path(path, "--templates")
    try:
        lines = read_regular_file(path, MAX_TEMPLATES_BYTES).decode("utf-8").splitlines()
    except FileNotFoundError:
        raise UsageError(f"--templates {path}: no such file") from None
    except UnicodeDecodeError:
        raise UsageError(f"--templates {path}: not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise UsageError(f"--templates {path}: cannot read it ({exc})") from None
    templates = [line.strip() for line in lines if line.strip()]
    if not templates:
        raise UsageError(f"--templates {path}: no templates in the file (one per line, with {{}})")
    for number, template in enumerate(templates, start=1):
        problem = template_problem(template)
        if problem:
            raise UsageError(f"--templates {path}: template {number} {template!r} {problem}")
    return templates


def template_problem(template: str) -> str | None:
    """Why ``template`` cannot take a class name (None when it can): it needs exactly one ``{}``
    where the name goes; other braces must be doubled (``{{`` and ``}}``) to print as braces."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:  # a lone { or }
        return f"is not a template ({exc}; write a literal brace as {{{{ or }}}})"
    if not fields:
        return "has no {} where the class name goes"
    if len(fields) > 1:
        return f"has {len(fields)} {{}} where the class name goes; it needs exactly one"
    if fields[0] not in ("", "0"):
        return f"names a field {{{fields[0]}}}; use {{}} where the class name goes"
    try:
        template.format("class name")
    except (IndexError, KeyError, ValueError, TypeError) as exc:  # e.g. a nested {:{}}
        return f"cannot take a class name ({exc}); use a plain {{}}"
    return None


def class_folders(folder: str | os.PathLike) -> list[tuple[str, list[Path]]]:
    """(class name, image paths) per sub-folder, sorted by folder name; '_' reads as a space."""
    from coembed.data.formats import list_images

    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{folder}: no such folder (zero-shot needs one sub-folder per class)")
    classes = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        images = list_images(sub)
        if images:
            classes.append((sub.name.replace("_", " "), images))
    if len(classes) < 2:
        raise DataError(
            f"{folder}: found {len(classes)} class sub-folder(s) with images; zero-shot "
            "classification needs at least two (one sub-folder of images per class)"
        )
    return classes


def zeroshot_classifier(
    embedder: Embedder, classnames: Sequence[str], templates: Sequence[str]
) -> np.ndarray:
    """(C, D) unit rows: per class, the renormalized mean of its normalized template embeddings."""
    prompts = [t.format(name) for name in classnames for t in templates]
    emb = embedder.embed_texts(prompts).reshape(len(classnames), len(templates), -1)  # (C, T, D)
    emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    mean = emb.mean(axis=1)  # (C, D)
    return (mean / np.linalg.norm(mean, axis=-1, keepdims=True)).astype(np.float32)


def zeroshot_scores(
    image_emb: np.ndarray, labels: np.ndarray, classifier: np.ndarray, classnames: Sequence[str]
) -> dict[str, Any]:
    """Top-1/top-5 accuracy overall and per class, and each class's most frequent wrong guess."""
    logits = image_emb @ classifier.T  # (N, C)
    order = np.argsort(-logits, axis=1, kind="stable")
    top1 = order[:, 0] == labels
    top5 = (order[:, :5] == labels[:, None]).any(axis=1)
    per_class = []
    for c, name in enumerate(classnames):
        mine = labels == c
        wrong = order[mine & ~top1, 0]
        confused = classnames[int(np.bincount(wrong).argmax())] if len(wrong) else None
        per_class.append(
            {
                "class": name,
                "images": int(mine.sum()),
                "top1": float(top1[mine].mean()) if mine.any() else 0.0,
                "top5": float(top5[mine].mean()) if mine.any() else 0.0,
                "most_confused_with": confused,
            }
        )
    return {
        "top1": float(top1.mean()),
        "top5": float(top5.mean()),
        "images": len(labels),
        "classes": len(classnames),
        "per_class": per_class,
    }


def zeroshot(
    model: str | os.PathLike | Embedder,
    folder: str | os.PathLike,
    *,
    templates: str | os.PathLike | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Zero-shot top-1/top-5 accuracy and a per-class table for a folder of class sub-folders."""
    from coembed.embedder import as_embedder

    prompts = read_templates(templates)
    classes = class_folders(folder)
    embedder = as_embedder(model, device)
    classnames = [name for name, _ in classes]
    paths = [p for _, images in classes for p in images]
    labels_all = np.concatenate([np.full(len(images), c) for c, (_, images) in enumerate(classes)])
    image_emb, ok, failures = embedder.embed_images_skipping(paths, progress=True)
    _none_readable(folder, ok, failures)
    _warn_skipped(failures)
    classifier = zeroshot_classifier(embedder, classnames, prompts)
    result = zeroshot_scores(image_emb, labels_all[ok], classifier, classnames)
    result["templates"] = len(prompts)
    result["skipped_images"] = len(failures)
    return result


def format_zeroshot(result: dict[str, Any]) -> str:
    """A readable report of ``zeroshot``'s result: the totals, then one row per class (class
    names, which are folder names, with their control characters escaped)."""
    rows = [
        (escape_name(row["class"]), row, escape_name(row["most_confused_with"] or "-"))
        for row in result["per_class"]
    ]
    width = max(len("class"), *(len(name) for name, _, _ in rows))
    # A linear probe's result (``coembed zeroshot --classifier``) names its classifier instead.
    method, prompts = "zero-shot", f", {result['templates']} templates"
    if result.get("classifier"):
        method, prompts = f"linear probe {escape_name(result['classifier'])}", ""
    lines = [
        f"{method}: {result['images']} images, {result['classes']} classes{prompts}"
        + (f", {result['skipped_images']} skipped" if result.get("skipped_images") else ""),
        f"top-1 {result['top1']:.4f}   top-5 {result['top5']:.4f}",
        "",
        f"{'class':<{width}}  images  top-1  top-5  most confused with",
    ]
    for name, row, confused in rows:
        lines.append(
            f"{name:<{width}}  {row['images']:>6}  {row['top1']:.3f}  {row['top5']:.3f}  {confused}"
        )
    return "\n".join(lines)
