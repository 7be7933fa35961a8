"""Image-caption scores: the cosine similarity of every pair in a dataset, the number that
LAION- and DataComp-style curation filters on, and a filtered copy of the dataset.

``score_pairs`` reads any dataset format ``read_records`` reads and scores each (image, caption)
pair; undecodable images are skipped and counted. ``filter_dataset`` writes the pairs scoring at
least a threshold in the input's own format, for the formats a row can be copied from:

- CSV and TSV: the header and every column kept, rows in their order, the same delimiter;
- JSONL: every key kept; a caption list keeps the captions that pass.

Image paths that are relative are rewritten to resolve from the output's folder.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from coembed.errors import DataError, UsageError
from coembed.files import atomic_write_all, atomic_write_text, refuse_overlap

if TYPE_CHECKING:
    from coembed.data.formats import Record
    from coembed.embedder import Embedder

FILTERABLE_FORMATS = ("csv", "tsv", "jsonl")
# Captions longer than this are cut before scoring (read_records' limit, passed explicitly so
# that a row's caption can be matched to its score when the dataset is filtered).
CAPTION_CHARS = 1000
TEXT_CHUNK = 1024  # captions embedded per call, under the progress bar


@dataclass
class PairScores:
    """The score of every pair whose image decoded, in dataset order."""

    data: str
    format: str  # the dataset's format as read_records names it (csv, tsv, jsonl, folder, ...)
    images: list[str]  # per pair: the image (an absolute path, or shard:member)
    captions: list[str]  # per pair: the caption as scored
    scores: np.ndarray  # (P,) float32 cosine similarities
    skipped: list[tuple[str, str]]  # (image, reason) per image that could not be decoded
    skipped_pairs: int  # the captions of those images

    def summary(self) -> dict[str, Any]:
        """Counts and the score distribution's quantiles, JSON-ready."""
        scores = self.scores.astype(np.float64)
        quantiles = np.quantile(scores, [0.05, 0.25, 0.5, 0.75, 0.95]) if len(scores) else []
        return {
            "pairs": len(scores),
            "images": len(set(self.images)),
            "skipped_images": len(self.skipped),
            "skipped_pairs": self.skipped_pairs,
            "mean": round(float(scores.mean()), 6) if len(scores) else None,
            "quantiles": {
                f"p{q}": round(float(v), 6) for q, v in zip((5, 25, 50, 75, 95), quantiles)
            },
        }


def check_min_score(min_score: float) -> None:
    """Raise UsageError unless ``min_score`` is a cosine similarity (-1..1)."""
    if not -1.0 <= min_score <= 1.0:
        raise UsageError(f"--min-score {min_score}: a cosine similarity is between -1 and 1")


def read_pairs(
    data: str | os.PathLike, image_key: str | None = None, caption_key: str | None = None
) -> tuple[list[Record], str]:
    """The records of any dataset format and the format's name (no image is opened)."""
    from coembed.data.formats import read_records

    records, report = read_records(
        os.fspath(data),
        image_key or "filepath",
        caption_key or "caption",
        max_caption_chars=CAPTION_CHARS,
    )
    return records, report.format


def score_records(
    embedder: Embedder,
    records: list[Record],
    *,
    data: str = "",
    format: str = "",
    batch_size: int = 64,
    progress: bool = True,
) -> PairScores:
    """Score every (image, caption) pair of ``records``; undecodable images are skipped."""
    from coembed.data.images import describe
    from coembed.progress import progress_bar

    vectors, kept, skipped = embedder.embed_images_skipping(
        [r.image for r in records], batch_size, progress=progress
    )
    if not kept:
        first = f" (first: {skipped[0][1]})" if skipped else ""
        raise DataError(f"{data}: none of the {len(records)} images could be read{first}")
    rows = [(row, records[i]) for row, i in enumerate(kept)]
    pair_rows = np.array([row for row, r in rows for _ in r.captions], np.int64)  # (P,)
    captions = [c for _, r in rows for c in r.captions]
    scores = np.empty(len(captions), np.float32)
    with progress_bar(
        total=len(captions), unit="text", desc="scoring", leave=False, enabled=progress
    ) as bar:
        for start in range(0, len(captions), TEXT_CHUNK):
            end = min(start + TEXT_CHUNK, len(captions))
            text = embedder.embed_texts(captions[start:end])  # (n, D)
            scores[start:end] = (vectors[pair_rows[start:end]] * text).sum(axis=1)
            bar.update(end - start)
    images = [describe(records[kept[row]].image) for row in pair_rows.tolist()]
    return PairScores(
        data=os.fspath(data),
        format=format,
        images=images,
        captions=captions,
        scores=scores,
        skipped=[(describe(records[i].image), reason) for i, reason in skipped],
        skipped_pairs=sum(len(records[i].captions) for i, _ in skipped),
    )


def score_pairs(
    model: str | os.PathLike | Embedder,
    data: str | os.PathLike,
    *,
    image_key: str | None = None,
    caption_key: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = True,
) -> PairScores:
    """The cosine image-caption score of every pair of a dataset (any supported format)."""
    from coembed.embedder import as_embedder

    records, format = read_pairs(data, image_key, caption_key)
    embedder = as_embedder(model, device)
    return score_records(
        embedder,
        records,
        data=os.fspath(data),
        format=format,
        batch_size=batch_size,
        progress=progress,
    )


def scores_csv_text(scores: PairScores) -> str:
    """The scores as CSV: ``path,caption,score``, one row per pair in dataset order."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", "caption", "score"])
    for image, caption, score in zip(scores.images, scores.captions, scores.scores.tolist()):
        writer.writerow([image, caption, f"{score:.6f}"])
    return out.getvalue()


# --- the filtered dataset ------------------------------------------------------------------------


def _clean_caption(caption: object) -> str:
    """A caption as read_records keeps it: stripped, cut to CAPTION_CHARS."""
    text = "" if caption is None else str(caption).strip()
    return text[:CAPTION_CHARS].rstrip() if len(text) > CAPTION_CHARS else text


def _resolved(base: Path, image: str) -> str:
    """An image path as read_records resolves it: relative to the dataset file's folder."""
    return os.path.normpath(os.path.join(base, os.path.expanduser(image.strip())))


def _image_for(image: str, base: Path, out_dir: Path) -> str:
    """``image`` as the filtered file must write it so that it still names the same file."""
    path = os.path.expanduser(image.strip())
    if os.path.isabs(path) or base == out_dir:
        return image
    return os.path.relpath(_resolved(base, image), out_dir)


def _table_rows(text: str) -> tuple[str, Iterator[list[str]]]:
    header = text.split("\n", 1)[0]
    delimiter = "\t" if "\t" in header else ","  # as read_records sniffs it
    return delimiter, csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)


def _filter_table(
    text: str, keep: set[tuple[str, str]], keys: tuple[str, str], base: Path, out: Path
) -> tuple[str, int]:
    delimiter, reader = _table_rows(text)
    columns = next(reader)
    names = [c.strip() for c in columns]  # as read_records matches them
    i_img, i_cap = names.index(keys[0]), names.index(keys[1])
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\n")
    writer.writerow(columns)
    kept = 0
    for row in reader:
        if max(i_img, i_cap) >= len(row) or not row[i_img].strip():
            continue
        if (_resolved(base, row[i_img]), _clean_caption(row[i_cap])) in keep:
            row[i_img] = _image_for(row[i_img], base, out)
            writer.writerow(row)
            kept += 1
    return buffer.getvalue(), kept


def _filter_jsonl(
    text: str, keep: set[tuple[str, str]], keys: tuple[str, str], base: Path, out: Path
) -> tuple[str, int]:
    image_key, caption_key = keys
    lines, kept = [], 0
    for line in text.split("\n"):
        if not line.strip():
            continue
        row = json.loads(line)
        image = row.get(image_key)
        if not isinstance(image, str) or not image.strip() or caption_key not in row:
            continue
        given = row[caption_key]
        captions = given if isinstance(given, list) else [given]
        passing = [c for c in captions if (_resolved(base, image), _clean_caption(c)) in keep]
        if not passing:
            continue
        row[image_key] = _image_for(image, base, out)
        row[caption_key] = passing if isinstance(given, list) else passing[0]
        lines.append(json.dumps(row, ensure_ascii=False))
        kept += len(passing)
    return "".join(line + "\n" for line in lines), kept


def check_filterable(format: str, data: str | os.PathLike) -> None:
    """Raise UsageError unless a dataset of this format can be written back filtered."""
    if format not in FILTERABLE_FORMATS:
        raise UsageError(
            f"--min-score writes a filtered copy of a CSV, TSV or JSONL dataset; "
            f"{data} is read as {format}: convert it to CSV (filepath,caption) first"
        )


def filtered_dataset(
    scores: PairScores,
    min_score: float,
    output: str | os.PathLike,
    *,
    image_key: str | None = None,
    caption_key: str | None = None,
) -> tuple[str, int]:
    """The text of ``scores.data`` keeping only the pairs scoring >= ``min_score``, as a file at
    ``output`` holds it (same format; relative image paths resolving from its folder), and
    how many pairs it keeps."""
    check_min_score(min_score)
    check_filterable(scores.format, scores.data)
    source = Path(os.path.abspath(os.path.expanduser(scores.data)))
    keep = {
        (image, caption)
        for image, caption, score in zip(scores.images, scores.captions, scores.scores.tolist())
        if score >= min_score
    }
    keys = (image_key or "filepath", caption_key or "caption")
    text = source.read_bytes().decode("utf-8-sig")  # read_records has checked it is UTF-8
    rewrite = _filter_jsonl if scores.format == "jsonl" else _filter_table
    return rewrite(text, keep, keys, source.parent, Path(os.path.abspath(output)).parent)


def filter_dataset(
    scores: PairScores,
    min_score: float,
    output: str | os.PathLike,
    *,
    image_key: str | None = None,
    caption_key: str | None = None,
) -> int:
    """Write ``filtered_dataset`` to ``output`` atomically; returns how many pairs it keeps."""
    text, kept = filtered_dataset(
        scores, min_score, output, image_key=image_key, caption_key=caption_key
    )
    atomic_write_text(output, text)
    return kept


# --- the whole command ---------------------------------------------------------------------------


@dataclass
class ScoreFiles:
    """Where ``score_dataset`` writes (None: not asked for)."""

    scores_csv: Path | None = None  # path,caption,score per pair
    histogram: Path | None = None  # PNG
    filtered: Path | None = None  # the dataset's pairs scoring >= min_score, its own format


def _check_outputs(files: ScoreFiles, data: str | os.PathLike, overwrite: bool) -> None:
    named = {
        "--scores": files.scores_csv,
        "--histogram": files.histogram,
        "--output": files.filtered,
    }
    given = {flag: path for flag, path in named.items() if path is not None}
    if len({Path(p).resolve() for p in given.values()}) < len(given):
        raise UsageError(f"{', '.join(given)}: give each output its own file")
    for flag, path in given.items():
        refuse_overlap(path, {"--data": data}, flag)
        if Path(path).is_dir():
            raise UsageError(f"{flag} {path} is a folder; give a file name")
        if Path(path).exists() and not overwrite:
            raise UsageError(f"{flag} {path} exists; add --overwrite to replace it")


def score_dataset(
    model: str | os.PathLike | Embedder,
    data: str | os.PathLike,
    files: ScoreFiles,
    *,
    min_score: float | None = None,
    image_key: str | None = None,
    caption_key: str | None = None,
    overwrite: bool = False,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = True,
) -> tuple[PairScores, int | None]:
    """Score every pair of ``data`` and write the ``files`` asked for, all of them or (on any
    failure) none; returns the scores and, with ``min_score``, how many pairs the filtered
    dataset keeps. Every argument is checked before the model is loaded."""
    from coembed.curate.plots import score_histogram_png
    from coembed.embedder import as_embedder

    if (min_score is None) != (files.filtered is None):
        raise UsageError("--min-score and --output go together: the threshold and where to write")
    if min_score is not None:
        check_min_score(min_score)
    _check_outputs(files, data, overwrite)
    records, format = read_pairs(data, image_key, caption_key)
    if min_score is not None:
        check_filterable(format, data)
    scores = score_records(
        as_embedder(model, device),
        records,
        data=os.fspath(data),
        format=format,
        batch_size=batch_size,
        progress=progress,
    )
    writes: dict[Path, Any] = {}
    kept = None
    if files.filtered is not None:
        text, kept = filtered_dataset(
            scores, min_score, files.filtered, image_key=image_key, caption_key=caption_key
        )
        writes[Path(files.filtered)] = _text_writer(text)
    if files.scores_csv is not None:
        writes[Path(files.scores_csv)] = _text_writer(scores_csv_text(scores))
    if files.histogram is not None:
        title = f"image-caption scores: {Path(os.fspath(data)).name}"
        png = score_histogram_png(scores.scores, min_score, title)
        writes[Path(files.histogram)] = lambda tmp: Path(tmp).write_bytes(png)
    atomic_write_all(writes)
    return scores, kept


def _text_writer(text: str):
    return lambda tmp: Path(tmp).write_text(text, encoding="utf-8")
