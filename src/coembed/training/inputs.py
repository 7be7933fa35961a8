"""What a run reads: the pairs, the tokenizer (and the model config it completes), the decoded
training images and the validation set."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from coembed.checkpoint import TOKENIZER_FILE, load_model_dir
from coembed.config import Config
from coembed.errors import DataError
from coembed.training.run import Dist

if TYPE_CHECKING:
    from coembed.data.formats import ReadReport, Record
    from coembed.data.loader import PairData
    from coembed.tokenizer import Tokenizer


@dataclass
class Validation:
    """The validation pairs, decoded once: images, captions and each caption's image."""

    pixels: torch.Tensor  # (N_img, 3, S, S) preprocessed once
    captions: list[str]
    text_to_image: np.ndarray  # (N_txt,)


def read_pairs(path: str, cfg: Config, split: str | None) -> tuple[list[Record], ReadReport]:
    """The records of a dataset in any supported format, and the report of what was read."""
    from coembed.data.formats import read_records

    return read_records(
        path, image_key=cfg.data.image_key, caption_key=cfg.data.caption_key, split=split
    )


def build_tokenizer(cfg: Config, records: list[Record], output: Path, dist_: Dist) -> Tokenizer:
    """CLIP's BPE, or one trained on the training captions (rank 0 trains, the others read it)."""
    from coembed.tokenizer import Tokenizer

    t = cfg.model.text
    if cfg.model.tokenizer == "clip":
        return Tokenizer.clip(context_length=t.context_length)
    path = output / TOKENIZER_FILE
    if dist_.is_main:
        captions = (c for r in records for c in r.captions)
        Tokenizer.train(captions, vocab_size=t.vocab_size, context_length=t.context_length).save(
            path
        )
    if dist_.world > 1:
        dist.barrier()
    return Tokenizer.load(path)


def build_tokenizer_and_config(
    cfg: Config, records: list[Record], output: Path, init_dir: str | None, dist_: Dist
) -> Tokenizer:
    """The tokenizer, and the model config it completes (vocabulary size, end-of-text id)."""
    if init_dir:
        # Fine-tuning a coembed model keeps its architecture and tokenizer.
        source, tokenizer, _ = load_model_dir(init_dir, "cpu")
        cfg.model = source.cfg
        return tokenizer
    tokenizer = build_tokenizer(cfg, records, output, dist_)
    if cfg.model.tokenizer == "trained":
        cfg.model.text.vocab_size = tokenizer.vocab_size
    cfg.model.text.eot_id = tokenizer.eot_id
    return tokenizer


def load_pair_data(records: list[Record], cfg: Config, output: Path, dist_: Dist) -> PairData:
    """Decode the training images (into the cache when it fits); rank 0 first, so ranks share one cache."""
    from coembed.data.loader import PairData

    def build():
        return PairData.from_records(
            records,
            cfg.model.image.image_size,
            cache_dir=cfg.data.cache_dir or str(output / "cache"),
            max_cache_bytes=int(cfg.data.max_cache_gb * (1 << 30)),
            num_workers=cfg.data.workers,
        )

    if dist_.world == 1:
        return build()
    if not dist_.is_main:
        dist.barrier()
    data = build()
    if dist_.is_main:
        dist.barrier()
    return data


def prepare_validation(path: str, cfg: Config, split: str | None) -> Validation:
    """Read and preprocess the validation pairs once; DataError when no image can be read."""
    from coembed.data.loader import iter_image_batches
    from coembed.data.transforms import Preprocess

    records, _ = read_pairs(path, cfg, split)
    # The preprocessing a trained model directory records (save_model_dir's default).
    preprocess = Preprocess(image_size=cfg.model.image.image_size)
    batches, kept = [], []
    for pixels, ok, _failures in iter_image_batches([r.image for r in records], preprocess, 256):
        batches.append(pixels)
        kept.extend(ok)
    if not kept:
        raise DataError(f"{path}: no validation image could be read")
    captions, targets = [], []
    for image_idx, record_idx in enumerate(kept):
        for caption in records[record_idx].captions:
            captions.append(caption)
            targets.append(image_idx)
    return Validation(torch.cat(batches), captions, np.asarray(targets))
