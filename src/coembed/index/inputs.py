"""What to index: images (a folder, a dataset file or a list) or texts (a file or a list), read
and embedded, with repeats left out and undecodable images skipped and listed."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from coembed.errors import CoembedError
from coembed.progress import progress_bar

if TYPE_CHECKING:
    from coembed.embedder import Embedder

ImagesInput = str | os.PathLike | Sequence[str | os.PathLike]
TextsInput = str | os.PathLike | Sequence[str]


@dataclass
class Embedded:
    """New items and their vectors, ready to add to an index."""

    vectors: np.ndarray  # (N, D) float32 unit rows
    items: list[str]  # per row: the image path (or dataset entry) or the text
    captions: list[list[str]]  # per row
    skipped: list[list[str]]  # [source, reason] per image that could not be decoded
    repeats: int  # inputs left out: already in the index, or given twice
    roots: list[str] = field(default_factory=list)  # the real folders of the new image files


def image_roots(paths: Iterable[str], resolve: bool = True) -> list[str]:
    """The folders holding the files ``paths`` name, none inside another: the roots an index
    records, so that a server sends only files still inside them. With ``resolve`` the folders
    are where the files really are (symlinks followed, as when they were read); without, the
    folders as the paths spell them."""
    return merge_roots(
        os.path.dirname(os.path.realpath(p) if resolve else os.path.abspath(p)) for p in paths
    )


def merge_roots(folders: Iterable[str]) -> list[str]:
    """The distinct ``folders`` without those inside another, sorted."""
    kept: list[str] = []
    for folder in sorted(set(folders), key=lambda f: Path(f).parts):  # parents before children
        if not kept or not Path(folder).is_relative_to(kept[-1]):
            kept.append(folder)
    return kept


def image_inputs(
    images: ImagesInput, image_key: str, caption_key: str
) -> tuple[list[Any], list[str], list[list[str]]]:
    """(sources to decode, item names, captions per item) from a folder, a dataset or a list."""
    from coembed.data.formats import IMAGE_EXTENSIONS, list_images, read_records
    from coembed.data.images import describe

    if isinstance(images, (str, os.PathLike)):
        path = Path(images)
        found = list_images(path) if path.is_dir() else []
        if found:
            paths = [str(p.resolve()) for p in found]
            return paths, paths, [[] for _ in paths]
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            return [str(path.resolve())], [str(path.resolve())], [[]]
        # An image index needs images only: captions are kept where the dataset has them.
        records, _ = read_records(os.fspath(images), image_key, caption_key, require_captions=False)
        return (
            [r.image for r in records],
            [describe(r.image) for r in records],
            [list(r.captions) for r in records],
        )
    paths = [str(Path(p).resolve()) for p in images]
    return paths, paths, [[] for _ in paths]


def text_inputs(texts: TextsInput) -> list[str]:
    """Texts from a file (one per line, blank lines skipped) or a list."""
    if isinstance(texts, (str, os.PathLike)):
        path = Path(texts)
        if not path.is_file():
            raise CoembedError(f"{path}: no such text file (--texts wants one caption per line)")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise CoembedError(f"{path}: not UTF-8 text; convert it to UTF-8") from None
        texts = [line.strip() for line in lines]
    return [t for t in texts if t.strip()]


def embed_texts(
    embedder: Embedder, texts: list[str], batch_size: int, progress: bool
) -> np.ndarray:
    """(N, D) float32 unit rows for ``texts``, in chunks of at least 256 under a progress bar."""
    chunks = [np.zeros((0, embedder.dim), np.float32)]
    step = max(batch_size, 256)
    with progress_bar(
        total=len(texts), unit="text", desc="embedding texts", leave=False, enabled=progress
    ) as bar:
        for start in range(0, len(texts), step):
            chunks.append(embedder.embed_texts(texts[start : start + step]))
            bar.update(len(texts[start : start + step]))
    return np.concatenate(chunks)


def embed_inputs(
    embedder: Embedder,
    images: ImagesInput | None,
    texts: TextsInput | None,
    *,
    batch_size: int,
    image_key: str,
    caption_key: str,
    progress: bool,
    skip: set[str] | None = None,
) -> Embedded:
    """Embed images or texts, leaving out (and counting as repeats) items in ``skip`` and items
    given twice; undecodable images are skipped and listed."""
    skip = set(skip or ())
    if texts is not None:
        all_texts = text_inputs(texts)
        fresh = list(dict.fromkeys(t for t in all_texts if t not in skip))
        vectors = embed_texts(embedder, fresh, batch_size, progress)
        return Embedded(vectors, fresh, [[] for _ in fresh], [], len(all_texts) - len(fresh))
    sources, names, captions = image_inputs(images, image_key, caption_key)
    keep = []
    seen = set(skip)
    for i, name in enumerate(names):
        if name not in seen:
            seen.add(name)
            keep.append(i)
    vectors, ok, failures = embedder.embed_images_skipping(
        [sources[i] for i in keep], batch_size, progress=progress
    )
    return Embedded(
        vectors,
        [names[keep[i]] for i in ok],
        [captions[keep[i]] for i in ok],
        [[names[keep[i]], reason] for i, reason in failures],
        len(names) - len(keep),
        image_roots(sources[keep[i]] for i in ok if isinstance(sources[keep[i]], str)),
    )
