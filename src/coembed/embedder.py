"""The Python API for a trained model: ``coembed.load(dir)`` -> Embedder."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from PIL import Image

from coembed.checkpoint import load_model_dir
from coembed.data.formats import list_images
from coembed.data.transforms import Preprocess, eval_transform
from coembed.device import resolve_device
from coembed.errors import CoembedError, ImageError

if TYPE_CHECKING:
    from coembed.data.images import ImageSource

ImageInput = str | os.PathLike | Image.Image


class ImageEmbeddings(NamedTuple):
    """What ``Embedder.embed_images_skipping`` returns: the rows of the images that decoded."""

    vectors: np.ndarray  # (n_ok, D) float32 unit rows
    kept: list[int]  # per row, its index into the sources
    skipped: list[tuple[int, str]]  # (index into the sources, why it could not be decoded)


class Embedder:
    """A model in eval mode with its tokenizer and preprocessing; embeds images and texts."""

    def __init__(
        self, model, tokenizer, preprocess: Preprocess, device: torch.device, source: str = ""
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.device = device
        self.source = source
        self.image_size = preprocess.image_size
        self.transform = eval_transform(preprocess)

    @property
    def dim(self) -> int:
        """The embedding size D."""
        return self.model.cfg.embed_dim

    def _expand(self, images: ImageInput | Iterable[ImageInput]) -> list[ImageInput]:
        """The images to embed, with each folder replaced by the images in it."""
        if isinstance(images, (str, os.PathLike)) and Path(images).is_dir():
            found = list_images(images)
            if not found:
                raise CoembedError(f"{images}: no image files found")
            return list(found)
        if isinstance(images, (str, os.PathLike, Image.Image)):
            return [images]
        expanded: list[ImageInput] = []
        for item in images:
            if isinstance(item, (str, os.PathLike)) and Path(item).is_dir():
                expanded.extend(list_images(item))
            else:
                expanded.append(item)
        return expanded

    @torch.no_grad()
    def embed_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """(N, 3, S, S) preprocessed images -> (N, D) float32 unit rows."""
        pixels = pixels.to(self.device, non_blocking=True).contiguous(
            memory_format=torch.channels_last
        )
        return self.model.encode_image(pixels).float().cpu().numpy()

    def _pixel_batches(
        self, sources: Sequence[ImageSource], batch_size: int
    ) -> Iterator[tuple[torch.Tensor, list[int], list[tuple[int, str]]]]:
        """(pixels (n_ok, 3, S, S), ok indices, [(index, reason)]) per batch of ``sources``,
        decoded robustly (``coembed.data.images``) by loader workers when there are many."""
        from coembed.data.loader import iter_image_batches

        return iter_image_batches(list(sources), self.preprocess, batch_size)

    def embed_images(
        self, images: ImageInput | Iterable[ImageInput], batch_size: int = 64
    ) -> np.ndarray:
        """Paths, PIL images or a folder -> (N, D) float32 array of L2-normalized rows.

        Raises ImageError for the first image that cannot be decoded.
        """
        out = [np.zeros((0, self.dim), np.float32)]
        for pixels, _, failures in self._pixel_batches(self._expand(images), batch_size):
            if failures:
                raise ImageError(failures[0][1])
            out.append(self.embed_pixels(pixels))
        return np.concatenate(out)

    def embed_images_skipping(
        self, sources: Sequence[ImageSource], batch_size: int = 64, progress: bool = False
    ) -> ImageEmbeddings:
        """Embed images (paths, bytes, tar members or PIL images), skipping and counting the
        ones that cannot be decoded; returns ``ImageEmbeddings(vectors, kept, skipped)``."""
        from coembed.progress import progress_bar

        chunks = [np.zeros((0, self.dim), np.float32)]
        kept: list[int] = []
        skipped: list[tuple[int, str]] = []
        with progress_bar(
            total=len(sources), unit="img", desc="embedding images", leave=False, enabled=progress
        ) as bar:
            for pixels, ok, failures in self._pixel_batches(sources, batch_size):
                if ok:
                    chunks.append(self.embed_pixels(pixels))
                kept.extend(ok)
                skipped.extend(failures)
                bar.update(len(ok) + len(failures))
        return ImageEmbeddings(np.concatenate(chunks), kept, skipped)

    @torch.no_grad()
    def embed_texts(self, texts: str | Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Captions -> (N, D) float32 array of L2-normalized rows."""
        if isinstance(texts, str):
            texts = [texts]
        out = [np.zeros((0, self.dim), np.float32)]
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start : start + batch_size])).to(self.device)
            out.append(self.model.encode_text(tokens).float().cpu().numpy())
        return np.concatenate(out)


def load(directory: str | os.PathLike, device: str = "auto") -> Embedder:
    """Load a model directory written by ``coembed train`` (or ``convert``) as an Embedder."""
    dev = resolve_device(device)
    model, tokenizer, preprocess = load_model_dir(directory, dev)
    model = model.to(memory_format=torch.channels_last)
    return Embedder(model, tokenizer, preprocess, dev, source=str(directory))


def as_embedder(model: str | os.PathLike | Embedder, device: str = "auto") -> Embedder:
    """``model`` itself when it is already an Embedder, else the model directory it names, loaded."""
    if isinstance(model, (str, os.PathLike)):
        return load(model, device=device)
    return model
