"""Dataset formats: every way a user can hand us image-caption pairs, read into ``Record``s.

``read_records(path)`` detects the format from the path:

- a CSV or TSV file with a header (the separator is sniffed from the header line, whatever the
  extension says), columns ``filepath`` and ``caption`` unless told otherwise;
- a ``.jsonl`` file with the same keys (a caption may also be a list of strings);
- a folder of images with same-named ``.txt`` captions (``cat.jpg`` + ``cat.txt``);
- webdataset ``.tar`` shards (``{jpg,jpeg,png,webp}`` + ``txt`` or ``json``), with brace
  expansion (``shards-{000..003}.tar``, ``{a,b}.tar``), ``::``-joined lists, or a folder of shards;
- a COCO captions JSON (``images`` + ``annotations``) or a Karpathy split JSON (``images`` with
  ``filename``, ``filepath``, ``split``, ``sentences[].raw``), several captions per image.

Relative image paths resolve against the dataset file's folder. Rows that share an image are
grouped into one ``Record`` with several captions. Image files are not opened here: the loader
skips and counts the ones that turn out missing or broken.

Text encoding: whole dataset files (CSV, TSV, JSONL, JSON) must be UTF-8 (a BOM is fine); any
other encoding is a ``DataError`` that says how to convert the file, because guessing would
silently garble every caption. Per-sample caption files (``.txt`` next to an image, ``txt`` in
a shard) are decoded with replacement characters and counted in ``ReadReport.non_utf8_captions``,
so one odd file does not stop a big dataset.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import os
import re
import sys
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from coembed.errors import DataError
from coembed.files import NotRegularFile, read_regular_file
from coembed.names import check_path, escape_name
from coembed.schema import check_shape, mismatch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

# Column names people commonly use, to suggest the right --image-key / --caption-key.
IMAGE_KEY_HINTS = ("filepath", "image", "image_path", "img", "path", "file", "filename", "url")
CAPTION_KEY_HINTS = ("caption", "title", "text", "captions", "sentence", "description", "alt")


@dataclass(frozen=True)
class TarMember:
    """An image inside a webdataset shard: the shard's absolute path and the member name."""

    tar_path: str
    member: str


@dataclass
class Record:
    """One image and its captions (none empty; at least one unless captions were read as
    optional, as for an image index). ``image`` is absolute."""

    image: str | TarMember
    captions: list[str]
    key: str


@dataclass
class ReadReport:
    """What reading a dataset found, for the end-of-run report and the log."""

    format: str = ""
    rows: int = 0  # rows / samples / annotations read, before any were skipped
    empty_captions: int = 0  # empty or whitespace-only captions, skipped
    long_captions_truncated: int = 0  # captions cut to max_caption_chars
    missing_image_field: int = 0  # rows with an empty image path / samples without an image
    missing_caption_field: int = 0  # JSONL rows without the key, images without a caption file
    non_utf8_captions: int = 0  # per-sample caption files decoded with replacement characters
    images: int = 0  # records returned (distinct images)
    captions: int = 0  # captions returned (pairs for training)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the log, e.g. 'csv: 1000 rows -> 998 images, 998 captions; 2 empty ...'."""
        parts = [
            f"{self.format}: {self.rows} rows -> {self.images} images, {self.captions} captions"
        ]
        for name in (
            "empty_captions",
            "long_captions_truncated",
            "missing_image_field",
            "missing_caption_field",
            "non_utf8_captions",
        ):
            if getattr(self, name):
                parts.append(f"{getattr(self, name)} {name.replace('_', ' ')}")
        return "; ".join(parts + self.notes)


class _Collector:
    """Groups (image, caption) rows into Records, cleaning and counting captions on the way."""

    def __init__(
        self, report: ReadReport, max_caption_chars: int, captions_optional: bool = False
    ) -> None:
        self.report = report
        self.max_chars = max_caption_chars
        # An image index needs the images only: keep those without a caption.
        self.captions_optional = captions_optional
        self.records: dict[str | TarMember, Record] = {}
        self.nul_paths: list[str] = []  # image paths no file can have: reported by finish

    def add(self, image: str | TarMember, captions: list, key: str) -> None:
        if isinstance(image, str) and "\0" in image:
            self.nul_paths.append(image)
            return
        clean = []
        for caption in captions:
            text = "" if caption is None else str(caption).strip()
            if not text:
                self.report.empty_captions += 1
                continue
            if len(text) > self.max_chars:
                text = text[: self.max_chars].rstrip()
                self.report.long_captions_truncated += 1
            clean.append(text)
        if not clean and not self.captions_optional:
            return
        record = self.records.get(image)
        if record is None:
            self.records[image] = Record(image=image, captions=clean, key=key)
        else:
            record.captions.extend(clean)

    def missing_caption(self, image: str | TarMember, key: str) -> None:
        """Count an image that comes without a caption; keep it when captions are optional."""
        self.report.missing_caption_field += 1
        if self.captions_optional:
            self.add(image, [], key)

    def finish(self, path: str) -> tuple[list[Record], ReadReport]:
        if self.nul_paths:
            raise DataError(
                f"{path}: {len(self.nul_paths)} image path(s) hold a NUL byte (\\x00), which no "
                f"file name can (first: {escape_name(self.nul_paths[0])}); the file is damaged "
                "or binary: repair or regenerate it"
            )
        records = list(self.records.values())
        self.report.images = len(records)
        self.report.captions = sum(len(r.captions) for r in records)
        if not records:
            raise DataError(
                f"{path}: no usable image-caption pairs ({self.report.summary()}); "
                "check that the captions are not empty and the right columns are picked"
            )
        return records, self.report


def _resolve(base: Path, image_path: str) -> str:
    p = Path(os.path.expanduser(image_path))
    return os.path.normpath(p if p.is_absolute() else base / p)


def _read_text(path: Path) -> str:
    """A whole dataset file as text; a clear DataError if it is not UTF-8 or not a regular file."""
    try:
        raw = read_regular_file(path)
    except NotRegularFile as e:
        raise DataError(f"{path}: {e}; give a dataset file (CSV, TSV, JSONL, JSON)") from None
    try:
        return raw.decode("utf-8-sig")  # -sig: Excel writes a BOM at the start of CSVs
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}: not UTF-8 (byte 0x{raw[e.start]:02x} on line {line}); re-save it as UTF-8, "
            f"e.g. `iconv -f latin1 -t utf-8 {path.name} > fixed.{path.suffix.lstrip('.') or 'csv'}`"
        ) from None


def _decode_caption(raw: bytes, report: ReadReport) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        report.non_utf8_captions += 1
        return raw.decode("utf-8", errors="replace")


# Separators spreadsheets write instead of commas (a semicolon in locales with decimal commas).
OTHER_SEPARATORS = (";", "|")


def _separator_error(path: Path, key: str, columns: list[str]) -> DataError | None:
    """The error for a table separated by something other than commas or tabs, whose header
    then reads as one column ('filepath;caption'); None when that is not what happened."""
    for sep in OTHER_SEPARATORS:
        parts = [p.strip() for c in columns for p in c.split(sep)]
        known = IMAGE_KEY_HINTS + CAPTION_KEY_HINTS
        if len(parts) > len(columns) and (key in parts or any(p.lower() in known for p in parts)):
            return DataError(
                f"{path}: the header {sep.join(columns)!r} is separated by {sep!r}, but coembed "
                "reads comma- or tab-separated files: save it with commas or tabs between the "
                "columns (CSV or TSV)"
            )
    return None


def _missing_key_error(path: Path, role: str, key: str, columns: list[str]) -> DataError:
    wrong_separator = _separator_error(path, key, columns)
    if wrong_separator:
        return wrong_separator
    flag = "--image-key" if role == "image" else "--caption-key"
    hints = IMAGE_KEY_HINTS if role == "image" else CAPTION_KEY_HINTS
    guess = next((c for c in columns if c.lower() in hints), None)
    guess = guess or next(iter(difflib.get_close_matches(key, columns, n=1)), None)
    suggestion = f"; pass {flag} {guess}" if guess else f"; pick one with {flag}"
    shown = ", ".join(repr(c) for c in columns) if columns else "(none)"
    return DataError(
        f"{path}: no {role} column {key!r}; the file has columns {shown}{suggestion} "
        "(--image-key/--caption-key choose the image and caption columns)"
    )


# ---------------------------------------------------------------------------------- tables


def _read_table(
    path: Path, image_key: str, caption_key: str, collect: _Collector
) -> tuple[list[Record], ReadReport]:
    text = _read_text(path)
    header = text.split("\n", 1)[0]
    # Sniff: a header with a tab is TSV, whatever the extension says. csv.Sniffer guesses
    # wrong on caption text full of commas, so we only look at the header line.
    delimiter = "\t" if "\t" in header else ","
    collect.report.format = "tsv" if delimiter == "\t" else "csv"
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # captions can be long
    # newline="": quoted captions may hold newlines; str.splitlines would also break on
    # U+2028 and friends inside a caption.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    lines = io.StringIO(text, newline="").readlines()  # the lines as the reader counts them
    try:
        columns = [c.strip() for c in next(reader)]
    except StopIteration:
        raise DataError(
            f"{path}: empty file; expected a header line like 'filepath,caption'"
        ) from None
    for role, key in (("image", image_key), ("caption", caption_key)):
        if key not in columns and not (role == "caption" and collect.captions_optional):
            raise _missing_key_error(path, role, key, columns)
    i_img = columns.index(image_key)
    i_cap = columns.index(caption_key) if caption_key in columns else None
    base = path.parent
    end = reader.line_num
    try:
        for row in reader:
            start, end = end + 1, reader.line_num
            if end > start:  # a quoted field held a newline: a caption's, or a quote left open
                layout = (delimiter, len(columns), i_img)
                _check_open_quote(path, lines[start - 1 : end], start, layout, end == len(lines))
            if not row or all(not c.strip() for c in row):
                continue  # blank line
            collect.report.rows += 1
            image = row[i_img].strip() if i_img < len(row) else ""
            if not image:
                collect.report.missing_image_field += 1
                continue
            if i_cap is None:
                collect.missing_caption(_resolve(base, image), image)
                continue
            caption = row[i_cap] if i_cap < len(row) else ""
            collect.add(_resolve(base, image), [caption], key=image)
    except csv.Error as e:
        raise DataError(
            f"{path}: malformed {collect.report.format} on line {reader.line_num} ({e})"
        ) from None
    return collect.finish(str(path))


def _check_open_quote(
    path: Path, lines: list[str], start: int, layout: tuple[str, int, int], at_end: bool
) -> None:
    """Refuse a row read over several ``lines`` (from line ``start``) that a quote left open
    made: a quoted caption may hold newlines, but it closes before the end of the file and
    holds no line that is a row of its own (an image path in its column). Otherwise the rest
    of the file would silently become one caption. ``layout``: (delimiter, columns, image
    column); ``at_end``: the row ends the file."""
    delimiter, columns, i_img = layout
    fix = 'close the quote, or write a quote inside a quoted caption as ""'
    if at_end and "".join(lines).count('"') % 2:
        raise DataError(
            f"{path}: line {start}: a quote opened here is never closed, so the rest of the "
            f"file ({len(lines)} lines) would be one field; {fix}"
        )
    for n, line in enumerate(lines[1:], start=start + 1):
        fields = line.rstrip("\r\n").split(delimiter)
        if len(fields) >= columns and fields[i_img].strip().lower().endswith(IMAGE_EXTENSIONS):
            raise DataError(
                f"{path}: line {start}: a quoted field runs on over line {n}, which looks like "
                f"a row of its own ({escape_name(line.strip()[:50])}); {fix}"
            )


# What a JSONL row's image and caption may be (a missing one is skipped and counted).
JSONL_IMAGE = (str, None)
JSONL_CAPTION = (str, None, [(str, None)])


def _read_jsonl(
    path: Path, image_key: str, caption_key: str, collect: _Collector
) -> tuple[list[Record], ReadReport]:
    collect.report.format = "jsonl"
    base = path.parent
    keys_seen: set[str] = set()
    has_image = has_caption = False
    for n, line in enumerate(
        _read_text(path).split("\n"), start=1
    ):  # not splitlines: see _read_table
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as e:  # also: nested too deeply, a huge number
            reason = getattr(e, "msg", "nested too deeply or a number too long")
            raise DataError(f"{path}: line {n} is not valid JSON ({reason})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {n} is not a JSON object; expected one object per line")
        for key, shape in ((image_key, JSONL_IMAGE), (caption_key, JSONL_CAPTION)):
            problem = mismatch(row.get(key), shape, key)
            if problem:
                raise DataError(f"{path}: line {n}: {problem}")
        collect.report.rows += 1
        keys_seen.update(row)
        has_image |= image_key in row
        has_caption |= caption_key in row
        image, caption = row.get(image_key), row.get(caption_key)
        if not isinstance(image, str) or not image.strip():
            collect.report.missing_image_field += 1
            continue
        if caption_key not in row:
            collect.missing_caption(_resolve(base, image.strip()), image.strip())
            continue
        captions = caption if isinstance(caption, list) else [caption]
        collect.add(_resolve(base, image.strip()), captions, key=image.strip())
    if collect.report.rows and not has_image:
        raise _missing_key_error(path, "image", image_key, sorted(keys_seen))
    if collect.report.rows and not has_caption and not collect.captions_optional:
        raise _missing_key_error(path, "caption", caption_key, sorted(keys_seen))
    return collect.finish(str(path))


# ---------------------------------------------------------------------------------- folders


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files below ``folder`` (recursively, by suffix), sorted for a stable order."""
    root = Path(folder)
    return sorted(
        p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )


def _read_folder(
    path: Path, caption_key: str, collect: _Collector
) -> tuple[list[Record], ReadReport]:
    collect.report.format = "folder"
    images = list_images(path)
    if not images:
        shards = sorted(path.glob("*.tar"))
        if shards:
            return _read_shards([str(s) for s in shards], caption_key, collect, str(path))
        raise DataError(
            f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) or .tar shards in this folder"
        )
    for image in images:
        collect.report.rows += 1
        txt = image.with_suffix(".txt")
        key = str(image.relative_to(path).with_suffix(""))
        if not txt.is_file():
            collect.missing_caption(str(image.resolve()), key)
            continue
        caption = _decode_caption(txt.read_bytes(), collect.report)
        collect.add(str(image.resolve()), [caption], key=key)
    uncaptioned = collect.report.missing_caption_field == collect.report.rows
    if uncaptioned and not collect.captions_optional:
        raise DataError(
            f"{path}: {len(images)} images but no same-named .txt captions (cat.jpg + cat.txt); "
            "for a folder of class subfolders use `coembed zeroshot` instead"
        )
    return collect.finish(str(path))


# ---------------------------------------------------------------------------------- shards


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{000..003}`` ranges (zero padding kept) and ``{a,b}`` lists, left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        if int(hi) < int(lo):
            raise DataError(f"{pattern}: empty range {{{body}}}; write the smaller number first")
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [out for option in options for out in expand_braces(head + option + tail)]


def _shard_key(member: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first dot of the basename."""
    directory, _, base = member.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _read_shards(
    shards: list[str], caption_key: str, collect: _Collector, shown: str
) -> tuple[list[Record], ReadReport]:
    collect.report.format = "webdataset"
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise DataError(
            f"{shown}: {len(missing)} of {len(shards)} shards not found (first: {missing[0]}); "
            "check the path and the {000..NNN} range"
        )
    for shard in shards:
        shard_abs = os.path.abspath(shard)
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(shard_abs, "r:") as tar:
                for info in tar.getmembers():
                    if info.isfile():
                        key, ext = _shard_key(info.name)
                        samples.setdefault(key, {})[ext] = info
                for key, parts in samples.items():
                    collect.report.rows += 1
                    image_ext = next((e for e in SHARD_IMAGE_EXTENSIONS if e in parts), None)
                    if image_ext is None:
                        collect.report.missing_image_field += 1
                        continue
                    caption = _shard_caption(tar, parts, caption_key, collect.report)
                    member = TarMember(shard_abs, parts[image_ext].name)
                    if caption is None:
                        collect.missing_caption(member, f"{os.path.basename(shard)}/{key}")
                        continue
                    collect.add(member, caption, key=f"{os.path.basename(shard)}/{key}")
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(
                f"{shard}: not a readable tar shard ({e}); re-create or remove it"
            ) from None
    return collect.finish(shown)


def _shard_caption(
    tar: tarfile.TarFile, parts: dict[str, tarfile.TarInfo], caption_key: str, report: ReadReport
) -> list | None:
    for ext in ("txt", caption_key):
        if ext in parts and ext != "json":
            return [_decode_caption(tar.extractfile(parts[ext]).read(), report)]
    if "json" in parts:
        try:
            meta = json.loads(_decode_caption(tar.extractfile(parts["json"]).read(), report))
        except json.JSONDecodeError:
            return None
        if isinstance(meta, dict) and caption_key in meta:
            value = meta[caption_key]
            return value if isinstance(value, list) else [value]
    return None


# ---------------------------------------------------------------------------------- COCO/Karpathy


def _image_root(base: Path, first_image: str, extra: list[str]) -> Path:
    """The folder images live in: the JSON's folder, or its images/ or split subfolder."""
    for sub in ["", "images", *extra]:
        if (base / sub / first_image).exists():
            return base / sub
    return base


# How many of a COCO file's images are looked for when choosing the folder they live in.
_ROOT_SAMPLE = 20


def _coco_image_root(path: Path, names: list[str], split: str | None) -> Path:
    """The folder a COCO captions file's images live in: beside it, in images/ or a split folder
    below it, or (COCO's own layout, annotations/captions_val2017.json beside val2017/) in a split
    folder beside its folder. A DataError names the folders searched when none holds them."""
    base = path.parent
    # captions_val2014.json -> a val2014/ folder; so does an explicit split.
    splits = [s for s in (split, re.sub(r"^captions_", "", path.stem)) if s]
    candidates = [base, base / "images", *(base / s for s in splits)]
    candidates += [*(base.parent / s for s in splits), base.parent / "images"]
    candidates += [*(base.parent / "images" / s for s in splits), base.parent]
    sample = names[:_ROOT_SAMPLE]
    if not sample:
        return base
    for folder in dict.fromkeys(candidates):
        if any((folder / name).exists() for name in sample):
            return folder
    searched = ", ".join(f"{folder}/" for folder in dict.fromkeys(candidates))
    raise DataError(
        f"{path}: none of its images (first: {sample[0]}) is in the folders searched: {searched}; "
        "move them into one (COCO's layout: annotations/captions_val2017.json beside val2017/)"
    )


# The parts of COCO captions and Karpathy split files that are read (more keys are allowed).
# A missing caption or file name is skipped and counted; one of the wrong type is an error.
COCO_SHAPE = {
    "images": [{"id": (int, str), "file_name": str}],
    "annotations": [{"image_id": (int, str), "caption?": (str, None)}],
}
KARPATHY_SHAPE = {
    "images": [
        {
            "filename?": (str, None),
            "filepath?": (str, None),
            "split?": (str, None),
            "imgid?": (int, str),
            "sentences?": [{"raw?": (str, None)}],
        }
    ]
}


def _read_coco(path: Path, data: dict, split: str | None, collect: _Collector) -> tuple:
    collect.report.format = "coco"
    check_shape(data, COCO_SHAPE, str(path), DataError, "fix or remove that entry")
    files = {img["id"]: img["file_name"] for img in data["images"]}
    root = _coco_image_root(path, list(files.values()), split)
    by_image: dict[int, list[str]] = {}
    for ann in data["annotations"]:
        collect.report.rows += 1
        image_id = ann.get("image_id")
        if image_id not in files:
            collect.report.missing_image_field += 1
            continue
        by_image.setdefault(image_id, []).append(ann.get("caption", ""))
    for image_id, captions in by_image.items():
        collect.add(os.path.normpath(root / files[image_id]), captions, key=str(image_id))
    return collect.finish(str(path))


def _read_karpathy(path: Path, data: dict, split: str | None, collect: _Collector) -> tuple:
    collect.report.format = "karpathy"
    check_shape(data, KARPATHY_SHAPE, str(path), DataError, "fix or remove that entry")
    images = data["images"]
    # Karpathy's "restval" images are, by convention, part of the training split.
    wanted = {split, "restval"} if split == "train" else {split}
    if split is not None:
        available = sorted({str(img.get("split")) for img in images})
        images = [img for img in images if img.get("split") in wanted]
        if not images:
            raise DataError(
                f"{path}: no images in split {split!r}; the file has splits {', '.join(available)}"
            )
        collect.report.notes.append(f"split {split!r}: {len(images)} images")
    first = images[0] if images else {}
    rel_first = os.path.join(first.get("filepath") or "", first.get("filename") or "")
    root = _image_root(path.parent, rel_first, [s for s in (split,) if s])
    for img in images:
        collect.report.rows += 1
        filename = img.get("filename")
        if not filename:
            collect.report.missing_image_field += 1
            continue
        rel = os.path.join(img.get("filepath") or "", filename)
        captions = [s.get("raw") for s in img.get("sentences", [])]
        if not captions:
            collect.report.missing_caption_field += 1
            continue
        collect.add(os.path.normpath(root / rel), captions, key=str(img.get("imgid", rel)))
    return collect.finish(str(path))


def _read_json(path: Path, split: str | None, collect: _Collector) -> tuple:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    except (ValueError, RecursionError):
        raise DataError(
            f"{path}: not valid JSON (nested too deeply or a number too long)"
        ) from None
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        if "annotations" in data:
            return _read_coco(path, data, split, collect)
        if _is_karpathy(data):
            return _read_karpathy(path, data, split, collect)
    raise DataError(
        f"{path}: a JSON file must be COCO captions (images + annotations) or a Karpathy split "
        "(images with sentences); for one pair per line use .jsonl"
    )


def _is_karpathy(data: dict) -> bool:
    """Whether a JSON object with an ``images`` list is a Karpathy split (images with sentences)."""
    return "annotations" not in data and any(
        isinstance(i, dict) and "sentences" in i for i in data["images"][:10]
    )


def karpathy_splits(path: str | os.PathLike) -> set[str] | None:
    """The splits named in a Karpathy split JSON ("restval" included), or None for a dataset in
    any other format (which holds no splits to choose from)."""
    p = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    if p.suffix.lower() != ".json" or not p.is_file():
        return None
    try:
        data = json.loads(_read_text(p))
    except json.JSONDecodeError:
        return None  # reading the dataset says what is wrong with it
    if not (isinstance(data, dict) and isinstance(data.get("images"), list)):
        return None
    if not _is_karpathy(data):
        return None
    return {str(i.get("split")) for i in data["images"] if isinstance(i, dict)}


# ---------------------------------------------------------------------------------- entry


def read_records(
    path: str,
    image_key: str = "filepath",
    caption_key: str = "caption",
    split: str | None = None,
    max_caption_chars: int = 1000,
    require_captions: bool = True,
) -> tuple[list[Record], ReadReport]:
    """Read any supported dataset into records (one per distinct image) and a report.

    ``split`` filters a Karpathy JSON ("train" also takes "restval") and names the image
    subfolder of a COCO JSON; any other format refuses it. With ``require_captions=False`` (an
    image index) images without a caption, or a file without a caption column, are kept with no
    captions. Raises ``DataError`` for a wrong path,
    a missing column (naming the columns the file has), an unreadable file, or no usable rows.
    """
    path = os.fspath(check_path(path, "the dataset path"))
    report = ReadReport()
    collect = _Collector(report, max_caption_chars, captions_optional=not require_captions)
    p = Path(os.path.abspath(os.path.expanduser(path)))
    is_pattern = not p.exists() and ("{" in path or "::" in path)
    is_shards = is_pattern or p.suffix.lower() == ".tar"
    is_json = p.suffix.lower() == ".json" and p.is_file()
    if split is not None and not is_json:
        raise DataError(f"{path}: a split ({split!r}) only applies to COCO or Karpathy JSON files")
    if is_shards:
        shards = [s for part in path.split("::") for s in expand_braces(os.path.expanduser(part))]
        return _read_shards(shards, caption_key, collect, path)
    if not p.exists():
        raise DataError(f"{path}: no such file or folder; check the dataset path")
    if p.is_dir():
        return _read_folder(p, caption_key, collect)
    if is_json:
        return _read_json(p, split, collect)
    if p.suffix.lower() == ".jsonl":
        return _read_jsonl(p, image_key, caption_key, collect)
    return _read_table(p, image_key, caption_key, collect)


def caption_ids_of(captions: Sequence[str]) -> np.ndarray:
    """(N,) int64: for each caption an id that every caption of the same text shares."""
    if not len(captions):
        return np.zeros(0, np.int64)
    return np.unique(np.asarray(captions, dtype=object).astype(str), return_inverse=True)[1]
