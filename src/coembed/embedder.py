"""The Python API for a trained model: ``coembed.load(dir)`` -> Embedder."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from coembed.checkpoint import load_model_dir
from coembed.device import resolve_device
from coembed.errors import CoembedError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

ImageInput = str | os.PathLike | Image.Image


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files below ``folder`` (recursively), sorted for a stable order."""
    root = Path(folder)
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


class Embedder:
    """A model in eval mode with its tokenizer and preprocessing; embeds images and texts."""

    def __init__(self, model, tokenizer, preprocess: dict, device: torch.device, source: str = ""):
        from coembed.data.transforms import eval_transform

        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.device = device
        self.source = source
        self.image_size = int(preprocess["image_size"])
        self.transform = eval_transform(self.image_size)

    @property
    def dim(self) -> int:
        return self.model.cfg.embed_dim

    def _expand(self, images: ImageInput | Iterable[ImageInput]) -> list[ImageInput]:
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

    def _pixels(self, item: ImageInput) -> torch.Tensor:
        from coembed.data.images import open_image

        image = item.convert("RGB") if isinstance(item, Image.Image) else open_image(item)
        return self.transform(image)

    @torch.no_grad()
    def embed_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """(N, 3, S, S) preprocessed images -> (N, D) float32 unit rows."""
        pixels = pixels.to(self.device, non_blocking=True).contiguous(
            memory_format=torch.channels_last
        )
        return self.model.encode_image(pixels).float().cpu().numpy()

    def embed_images(
        self, images: ImageInput | Iterable[ImageInput], batch_size: int = 64
    ) -> np.ndarray:
        """Paths, PIL images or a folder -> (N, D) float32 array of L2-normalized rows."""
        items = self._expand(images)
        out = [np.zeros((0, self.dim), np.float32)]
        for start in range(0, len(items), batch_size):
            batch = torch.stack([self._pixels(item) for item in items[start : start + batch_size]])
            out.append(self.embed_pixels(batch))
        return np.concatenate(out)

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
