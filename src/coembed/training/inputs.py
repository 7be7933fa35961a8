"""What a run reads: the pairs and their splits, the tokenizer (and the model config it
completes), the decoded training images (resampled from webdataset shards when asked) and the
validation and zero-shot sets."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from coembed.checkpoint import TOKENIZER_FILE, load_model_dir
from coembed.config import Config
from coembed.data.loader import PairData
from coembed.errors import DataError, UsageError
from coembed.training.run import Dist, RunOptions

if TYPE_CHECKING:
    from coembed.data.formats import ReadReport, Record
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


# --- splits --------------------------------------------------------------------------------------


def split_reads(split: str | None, splits: set[str]) -> set[str]:
    """The splits of a Karpathy file that reading it with ``split`` takes ("train" takes
    "restval" too, as the reader does; no split takes them all)."""
    if split is None:
        return set(splits)
    return {split, "restval"} if split == "train" else {split}


def choose_splits(options: RunOptions) -> tuple[RunOptions, list[str]]:
    """The splits a new run reads, and what was chosen for the user, as lines to print.

    A Karpathy file trains on its ``train`` split and validates on its ``val`` split unless told
    otherwise; training and validation on the same file must not share a split (UsageError).
    """
    from coembed.data.formats import karpathy_splits

    if options.val_split is not None and options.val_data is None:
        raise UsageError("--val-split picks a split of the validation data: give --val-data")
    given = (options.train_data, options.val_data)
    same_file = None not in given and os.path.abspath(given[0]) == os.path.abspath(given[1])
    train_splits = karpathy_splits(options.train_data) if options.train_data else None
    val_splits = train_splits if same_file else None
    if options.val_data is not None and not same_file:
        val_splits = karpathy_splits(options.val_data)
    split, val_split, notes = options.split, options.val_split, []
    if split is None and train_splits and "train" in train_splits:
        split = "train"
        notes.append(
            f"training on the 'train' split of {options.train_data} (--split picks another)"
        )
    if val_split is None and val_splits and "val" in val_splits:
        val_split = "val"
        notes.append(
            f"validating on the 'val' split of {options.val_data} (--val-split picks another)"
        )
    if same_file:
        check_disjoint(split, val_split, train_splits)
    return replace(options, split=split, val_split=val_split), notes


def check_disjoint(split: str | None, val_split: str | None, splits: set[str] | None) -> None:
    """Refuse training and validation splits of one file that share images."""
    if splits is not None:
        common = split_reads(split, splits) & split_reads(val_split, splits)
    else:  # a COCO file: a split names the folder of its images
        common = {split} if split is not None and split == val_split else set()
    if common:
        raise UsageError(
            f"--train-data and --val-data are the same file, and both read its split "
            f"{', '.join(repr(s) for s in sorted(common))}: validation would score pairs the "
            "model trains on; give them different splits (--split train --val-split val)"
        )


# --- training pairs ------------------------------------------------------------------------------


# Keeps the shard draws apart from the other streams seeded from the run's seed.
RESAMPLE_STREAM = 0x5A3B


class ResampledShards(PairData):
    """Webdataset pairs whose every epoch draws ``draw_per_epoch`` pairs from the shards.

    Shards are drawn with replacement, each giving all its pairs, until there are enough; those
    are shuffled and the first ``num_samples`` make the epoch (open_clip's resampled shards,
    without its shuffle buffer). The draw is a function of (seed, epoch) alone, so every rank
    draws the same epoch and a resumed run draws the epochs an uninterrupted one would.
    """

    num_samples: int = 0
    shard_pairs: list[np.ndarray]  # per shard (sorted by path), its pairs

    def draw_per_epoch(self, num_samples: int) -> None:
        """Make each epoch ``num_samples`` pairs drawn from the shards; group the pairs by shard."""
        shard_names = sorted({source.tar_path for source in self.sources})
        shard_of = {name: i for i, name in enumerate(shard_names)}
        row_shard = np.asarray([shard_of[source.tar_path] for source in self.sources])
        pair_shard = row_shard[self.pair_image]  # (P,)
        order = np.argsort(pair_shard, kind="stable")
        bounds = np.cumsum(np.bincount(pair_shard, minlength=len(shard_names)))[:-1]
        self.shard_pairs = [p for p in np.split(order, bounds) if len(p)]
        self.num_samples = num_samples

    @property
    def epoch_size(self) -> int:
        """Pairs in an epoch: the number drawn."""
        return self.num_samples

    def epoch_pairs(self, seed: int, epoch: int) -> torch.Tensor:
        """The (num_samples,) pairs drawn for ``epoch``."""
        words = np.random.SeedSequence([seed, epoch, RESAMPLE_STREAM]).generate_state(1)
        generator = torch.Generator().manual_seed(int(words[0]))
        drawn, count = [], 0
        while count < self.num_samples:
            shard = int(torch.randint(len(self.shard_pairs), (1,), generator=generator))
            drawn.append(self.shard_pairs[shard])
            count += len(self.shard_pairs[shard])
        pairs = torch.from_numpy(np.concatenate(drawn))
        return pairs[torch.randperm(len(pairs), generator=generator)[: self.num_samples]]


def check_resampling(cfg: Config, report: ReadReport) -> None:
    """``data.train_num_samples`` draws from webdataset shards; refuse it for other data."""
    if cfg.data.train_num_samples and report.format != "webdataset":
        raise UsageError(
            f"--train-num-samples draws each epoch from webdataset shards, but the training data "
            f"is {report.format}: give .tar shards, or --epochs / --steps alone"
        )


def load_pair_data(records: list[Record], cfg: Config, output: Path, dist_: Dist) -> PairData:
    """Decode the training images (into the cache when it fits); rank 0 first, so ranks share one
    cache. With ``data.train_num_samples`` the epochs are drawn from the shards (ResampledShards)."""
    samples = cfg.data.train_num_samples

    def build():
        data = (ResampledShards if samples else PairData).from_records(
            records,
            cfg.model.image.image_size,
            cache_dir=cfg.data.cache_dir or str(output / "cache"),
            max_cache_bytes=int(cfg.data.max_cache_gb * (1 << 30)),
            num_workers=cfg.data.workers,
            cache_scale=cfg.data.cache_scale,
        )
        if samples:
            data.draw_per_epoch(samples)
        return data

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


# --- zero-shot -----------------------------------------------------------------------------------


@dataclass
class ZeroShotSet:
    """A folder of class sub-folders, decoded once: images, their classes, the prompts."""

    pixels: torch.Tensor  # (N, 3, S, S) preprocessed once
    labels: np.ndarray  # (N,) class of each image
    classnames: list[str]
    templates: list[str]


def prepare_zeroshot(folder: str, cfg: Config) -> ZeroShotSet:
    """Read and preprocess a zero-shot class folder once; DataError when no image can be read."""
    from coembed.data.loader import iter_image_batches
    from coembed.data.transforms import Preprocess
    from coembed.evaluate import DEFAULT_TEMPLATES, class_folders

    classes = class_folders(folder)
    paths = [path for _, images in classes for path in images]
    labels = np.concatenate([np.full(len(images), c) for c, (_, images) in enumerate(classes)])
    preprocess = Preprocess(image_size=cfg.model.image.image_size)
    batches, kept = [], []
    for pixels, ok, _failures in iter_image_batches(paths, preprocess, 256):
        batches.append(pixels)
        kept.extend(ok)
    if not kept:
        raise DataError(f"--zeroshot-data {folder}: no image could be read")
    return ZeroShotSet(
        torch.cat(batches), labels[kept], [name for name, _ in classes], list(DEFAULT_TEMPLATES)
    )
