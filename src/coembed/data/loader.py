"""Batches of (images, captions) for training, and batches of images for embedding.

``PairData`` turns records into image-caption pairs (each caption of a multi-caption image is
one pair) and serves deterministic epochs:

- the epoch's permutation comes from ``torch.Generator().manual_seed(seed * 1000003 + epoch)``
  and is the same on every rank;
- global batch b is ``perm[b*B*W : (b+1)*B*W]`` and rank r takes ``[r*B : (r+1)*B]`` of it;
- a batch's augmentation generator is seeded from (seed, epoch, b, rank), so ``start_batch=k``
  yields exactly batches k, k+1, ... of an uninterrupted epoch (resume), and the concatenated
  rank slices are the single-process batch of size B*W (DDP).

Small data (the decoded cache fits ``max_cache_bytes``) is decoded once into a memory-mapped
uint8 array (``coembed.data.cache``); bigger data streams through a DataLoader whose workers
decode each batch. Either way the random resized crop runs batched (``train_augment``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from coembed.data.cache import (
    CACHE_SCALE,
    Source,
    cache_size_for,
    decode_images,
    decode_square,
)
from coembed.data.formats import Record, caption_ids_of
from coembed.data.images import ImageReadError, ImageSource, open_image
from coembed.data.transforms import (
    Preprocess,
    StyleAugment,
    eval_from_uint8,
    eval_transform,
    names_a_color,
    train_augment,
)
from coembed.errors import DataError
from coembed.process import worker_signals

log = logging.getLogger(__name__)

T = TypeVar("T")
_END = object()


@contextlib.contextmanager
def prefetched(items: Iterable[T], depth: int = 1) -> Iterator[Iterator[T]]:
    """Iterate ``items`` in a background thread, up to ``depth`` items ahead of the consumer.

    Training uses it to gather, crop and normalize the next batch while the current step runs
    (PyTorch's kernels release the GIL); with ``depth`` 0 the items are made in place. An
    exception raised while making an item is raised again at the consumer, in order. Leaving
    the block early stops the thread before it touches the iterator again.
    """
    if depth <= 0:
        yield iter(items)
        return
    made: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        made.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            made.put((_END, None))
        except BaseException as exc:  # handed to the consumer, raised there
            made.put((_END, exc))

    def consume() -> Iterator[T]:
        while True:
            item, exc = made.get()
            if exc is not None:
                raise exc
            if item is _END:
                return
            yield item

    worker = threading.Thread(target=produce, name="coembed-prefetch", daemon=True)
    worker.start()
    try:
        yield consume()
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            with contextlib.suppress(queue.Empty):
                made.get(timeout=0.1)
        if hasattr(items, "close"):
            items.close()  # the generator is ours again: finish it (closes DataLoader workers)


def epoch_permutation(num_pairs: int, seed: int, epoch: int) -> Tensor:
    """The order of the pairs in an epoch; identical on every rank."""
    return torch.randperm(
        num_pairs, generator=torch.Generator().manual_seed(seed * 1000003 + epoch)
    )


# Keeps the caption runs' draws apart from the other streams seeded from the run's seed.
CAPTION_RUN_STREAM = 0xCA97


def caption_runs(
    order: Tensor, caption_ids: np.ndarray, length: int, seed: int, epoch: int
) -> Tensor:
    """``order`` (E,) rearranged so that pairs sharing a caption id stand together in runs of up
    to ``length``: each caption's pairs, in their order in ``order``, are cut into runs, and the
    runs (a caption's own, and single pairs) are shuffled by a generator of (seed, epoch). A batch
    then holds one caption under several pictures, which soft targets count as positives.

    ``caption_ids`` (P,) gives each pair its caption's id; ``order`` may repeat pairs (a
    resampled epoch's draw). The same on every rank; ``length`` 1 returns ``order`` unchanged.
    """
    if length <= 1 or len(order) == 0:
        return order
    ids = caption_ids[order.numpy()]
    by_caption = np.argsort(ids, kind="stable")  # each caption's pairs together, in epoch order
    grouped = ids[by_caption]
    position = np.arange(len(grouped))
    first = np.ones(len(grouped), dtype=bool)
    first[1:] = grouped[1:] != grouped[:-1]  # (E,) the caption's first pair
    within = position - np.maximum.accumulate(np.where(first, position, 0))  # index in caption
    run = np.cumsum(first | (within % length == 0)) - 1  # (E,) run number of each pair
    words = np.random.SeedSequence([seed, epoch, CAPTION_RUN_STREAM]).generate_state(1)
    generator = torch.Generator().manual_seed(int(words[0]))
    run_place = torch.randperm(int(run[-1]) + 1, generator=generator).numpy()
    arranged = np.lexsort((within, run_place[run]))  # by the run's place, then within the run
    return order[torch.from_numpy(by_caption[arranged])]


def batch_generator(seed: int, epoch: int, batch: int, rank: int) -> torch.Generator:
    """The augmentation generator of one rank's slice of one global batch."""
    words = [x & 0xFFFFFFFF for x in (seed, seed >> 32, epoch, batch, rank)]
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


class _DecodePairs(Dataset):
    """Streaming mode: pair index -> (pair index, uint8 square or None, failure reason or None)."""

    def __init__(self, sources: Sequence[Source], pair_image: np.ndarray, size: int) -> None:
        self.sources, self.pair_image, self.size = sources, pair_image, size

    def __len__(self) -> int:
        return len(self.pair_image)

    def __getitem__(self, pair: int) -> tuple[int, np.ndarray | None, str | None]:
        try:
            return pair, decode_square(self.sources[self.pair_image[pair]], self.size), None
        except ImageReadError as e:
            return pair, None, e.reason


def _collate_pairs(items: list) -> tuple[Tensor, list[int], list[tuple[int, str]]]:
    ok = [(p, a) for p, a, _ in items if a is not None]
    failed = [(p, r) for p, a, r in items if a is None]
    if ok:
        u8 = torch.from_numpy(np.stack([a for _, a in ok]))  # (b, C, C, 3)
    else:
        u8 = torch.empty(0, 0, 0, 3, dtype=torch.uint8)
    return u8, [p for p, _ in ok], failed


class PairData:
    """Image-caption pairs with deterministic, resumable, rank-sliced epochs."""

    def __init__(
        self,
        sources: list[Source],
        pair_image: np.ndarray,
        pair_caption: list[str],
        image_size: int,
        cache_size: int,
        images: np.ndarray | None,
        skipped: dict[str, int],
        num_workers: int,
    ) -> None:
        self.sources = sources
        self.pair_image = pair_image  # (P,) int64: pair -> row of `sources` / `images`
        self.pair_caption = pair_caption  # (P,) captions
        self.image_size = image_size
        self.cache_size = cache_size
        self.images = images  # (N, C, C, 3) uint8, or None when streaming
        self.skipped = skipped  # reason -> number of images dropped
        self.num_workers = num_workers
        self._stream_failed: dict[int, str] = {}  # image row -> reason, streaming mode
        self._image_ids: np.ndarray | None = None  # (N,) see ``image_ids``, made when asked
        self._caption_ids: np.ndarray | None = None  # (P,) see ``caption_ids``, made when asked
        self._color_named: np.ndarray | None = None  # (P,) bool, see ``colors_kept``

    @property
    def streaming(self) -> bool:
        """Whether batches are decoded as they are needed (the data is over the cache budget)."""
        return self.images is None

    @classmethod
    def from_records(
        cls,
        records: Sequence[Record],
        image_size: int,
        cache_dir: str | None,
        max_cache_bytes: int = 4 << 30,
        num_workers: int = 2,
        cache_scale: float = CACHE_SCALE,
    ) -> PairData:
        """Pairs from records; decodes into the cache when it fits ``max_cache_bytes``.

        ``cache_dir=None`` keeps the decoded array in memory for this run only. Images that
        fail to decode are dropped and counted in ``skipped`` (streaming mode: as met).
        """
        sources, pair_image, pair_caption = _pairs(records)
        size = cache_size_for(image_size, cache_scale)
        need = len(sources) * size * size * 3
        if need > max_cache_bytes:
            log.info(
                "decoded cache would need %.2f GB > budget %.2f GB: decoding per batch with %d workers",
                need / 2**30,
                max_cache_bytes / 2**30,
                num_workers,
            )
            return cls(sources, pair_image, pair_caption, image_size, size, None, {}, num_workers)

        decoded = decode_images(sources, size, cache_dir, num_workers=num_workers)
        failed_rows = np.fromiter(decoded.failures, dtype=np.int64, count=len(decoded.failures))
        keep = ~np.isin(pair_image, failed_rows)  # (P,) pairs whose image decoded
        skipped = _count_failures(decoded.failures, len(sources), bool(keep.any()))
        captions = [c for c, k in zip(pair_caption, keep) if k]
        return cls(
            sources,
            pair_image[keep],
            captions,
            image_size,
            size,
            decoded.array,
            skipped,
            num_workers,
        )

    def __len__(self) -> int:
        return len(self.pair_caption)

    def image_ids(self) -> np.ndarray:
        """(N,) int64: for each image row, the first row with the same picture. Cached images are
        the same when their decoded squares are byte for byte (one photo under two names); a
        streamed image is only itself."""
        if self._image_ids is None:
            rows = np.arange(len(self.sources), dtype=np.int64)
            if not self.streaming:
                first: dict[bytes, int] = {}
                for row in range(len(rows)):
                    digest = hashlib.blake2b(self.images[row].tobytes(), digest_size=16).digest()
                    rows[row] = first.setdefault(digest, row)
            self._image_ids = rows
        return self._image_ids

    def caption_ids(self) -> np.ndarray:
        """(P,) int64: for each pair, an id its caption shares with every pair of the same text."""
        if self._caption_ids is None:
            self._caption_ids = caption_ids_of(self.pair_caption)
        return self._caption_ids

    def colors_kept(self, pairs: Sequence[int], style: StyleAugment | None) -> Tensor | None:
        """(B,) bool: which of ``pairs`` keep their pictures' colours under ``style`` (their
        captions name a colour, ``names_a_color``), or None when ``style`` changes no colours or
        spares none."""
        if style is None or not (style.changes_colors and style.spare_color_captions):
            return None
        if self._color_named is None:
            self._color_named = np.fromiter(
                (names_a_color(c) for c in self.pair_caption), dtype=bool, count=len(self)
            )
        return torch.from_numpy(self._color_named[np.asarray(pairs, dtype=np.int64)])

    @property
    def epoch_size(self) -> int:
        """Pairs in an epoch: every pair once (a resampled epoch draws another number)."""
        return len(self)

    def epoch_pairs(self, seed: int, epoch: int) -> Tensor:
        """The (epoch_size,) pairs of an epoch in order, the same on every rank: a permutation."""
        return epoch_permutation(len(self), seed, epoch)

    def num_batches(self, batch_size: int, world_size: int = 1) -> int:
        """Global batches per epoch (the last partial batch is dropped)."""
        n = self.epoch_size // (batch_size * world_size)
        if n == 0:
            raise DataError(
                f"a global batch of {batch_size} x {world_size} process(es) is more than the "
                f"{self.epoch_size} pairs of an epoch; lower the batch size"
            )
        return n

    def epoch_batches(
        self,
        epoch: int,
        seed: int,
        batch_size: int,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        augment: bool = True,
        device: str | torch.device = "cpu",
        fill_failed: bool = False,
        crop_scale_min: float = 0.8,
        with_image_ids: bool = False,
        style: StyleAugment | None = None,
        second_view: bool = False,
        caption_group: int = 1,
    ) -> Iterator[tuple[Tensor, list[str]] | tuple[Tensor, list[str], Tensor]]:
        """This rank's batches of one epoch from ``start_batch`` on: (images, captions), and with
        ``with_image_ids`` a third item, the (B,) int64 id of each pair's image (two captions of
        one image share it, and so do two files of one picture: ``image_ids``; soft targets need
        it).

        Images are float32 (B, 3, S, S), normalized, channels_last, on ``device`` (uint8 is
        moved there before augmenting: 4x less to copy). With ``augment`` each image is a random
        resized crop of ``crop_scale_min`` to all of the cached square's area, then ``style``'s
        colour jitter, greyscale and blur (from the same per-batch generator); with ``second_view``
        a second crop and style of each image follows, drawn after the first, and the images are
        (2B, 3, S, S), the first views on top (the first views as without it). In streaming mode
        an image that fails to decode is dropped from its batch (and a batch with none left is
        skipped). With ``fill_failed`` (training) every batch keeps its size instead, which DDP's
        all-gather and the step -> batch arithmetic of a resume need: see ``_fill``. With
        ``caption_group`` above 1 the epoch's pairs that share a caption stand together in runs of
        up to that many (``caption_runs``).
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        n_batches = self.num_batches(batch_size, world_size)
        perm = caption_runs(
            self.epoch_pairs(seed, epoch), self.caption_ids(), caption_group, seed, epoch
        )
        G = batch_size * world_size
        # Rows of `perm` this rank takes: (n_batches, B) pair indices.
        mine = perm[: n_batches * G].view(n_batches, world_size, batch_size)[:, rank]
        batches = range(start_batch, n_batches)
        if self.streaming:
            stream = self._stream(mine, batches, fill_failed)
        else:
            stream = self._cached(mine, batches)
        for b, u8, pairs in stream:
            u8 = u8.to(device)  # (B, C, C, 3) uint8
            if augment:
                generator = batch_generator(seed, epoch, b, rank)
                x = self._augmented(u8, pairs, generator, crop_scale_min, style, second_view)
            else:
                x = eval_from_uint8(u8, self.image_size)
            captions = [self.pair_caption[p] for p in pairs]
            if with_image_ids:
                yield x, captions, torch.from_numpy(self.image_ids()[self.pair_image[pairs]])
            else:
                yield x, captions

    def _augmented(
        self,
        u8: Tensor,
        pairs: list[int],
        generator: torch.Generator,
        crop_scale_min: float,
        style: StyleAugment | None,
        second_view: bool,
    ) -> Tensor:
        """The training crops (B, 3, S, S) of ``u8``, the images of ``pairs``, or with
        ``second_view`` (2B, 3, S, S): the first views, then second ones drawn after them from the
        same ``generator``; pictures whose captions name a colour keep it in every view
        (``colors_kept``)."""
        scale, keep_colors = (crop_scale_min, 1.0), self.colors_kept(pairs, style)
        views = [
            train_augment(
                u8, self.image_size, generator, scale, style=style, keep_colors=keep_colors
            )
            for _ in range(2 if second_view else 1)
        ]
        return (
            torch.cat(views).contiguous(memory_format=torch.channels_last)
            if second_view
            else views[0]
        )

    def _cached(self, mine: Tensor, batches: range) -> Iterator[tuple[int, Tensor, list[int]]]:
        """(batch number, its cached uint8 squares, its pair indices) for each of ``batches``."""
        for b in batches:
            yield (
                b,
                torch.from_numpy(self.images[self.pair_image[mine[b].numpy()]]),
                mine[b].tolist(),
            )

    def _stream(
        self, mine: Tensor, batches: range, fill_failed: bool = False
    ) -> Iterator[tuple[int, Tensor, list[int]]]:
        dataset = _DecodePairs(self.sources, self.pair_image, self.cache_size)
        loader = DataLoader(
            dataset,
            batch_sampler=[mine[b].tolist() for b in batches],
            collate_fn=_collate_pairs,
            num_workers=self.num_workers,
            # Its own generator: iterating must not draw from torch's global one (a resumed
            # run restores that state and must see the same draws as an uninterrupted one).
            generator=torch.Generator().manual_seed(0),
            worker_init_fn=worker_signals,
        )
        for b, (u8, pairs, failed) in zip(batches, loader):
            self._note_failures(failed)
            if fill_failed and failed:
                u8, pairs = self._fill(dataset, mine, b, u8, pairs, len(failed))
            if pairs:
                yield b, u8, pairs

    def _note_failures(self, failed: list[tuple[int, str]]) -> None:
        """Count the images of failed pairs (pair, reason) in ``skipped``, each image once."""
        for pair, reason in failed:
            row = int(self.pair_image[pair])
            if row not in self._stream_failed:
                self._stream_failed[row] = reason
                self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def _fill(
        self,
        dataset: _DecodePairs,
        mine: Tensor,
        b: int,
        u8: Tensor,
        pairs: list[int],
        missing: int,
    ) -> tuple[Tensor, list[int]]:
        """Batch ``b`` with ``missing`` failed pairs replaced by the next pairs that decode.

        The next pairs are this rank's in the epoch's following batches (wrapping around to its
        first), so a batch never holds a pair twice: two copies of one pair would be each
        other's negatives with conflicting targets. The choice depends only on the batch and
        the images, so a resumed run sees the same batch. A ``DataError`` when too few decode.
        """
        n_batches = mine.shape[0]
        after = torch.cat([mine[b + 1 :], mine[:b]]).flatten().tolist()  # candidates, in order
        extra: list[np.ndarray] = []
        for pair in after:
            if len(extra) == missing:
                break
            if int(self.pair_image[pair]) in self._stream_failed:
                continue
            _, square, reason = dataset[pair]
            if square is None:
                self._note_failures([(pair, reason)])
                continue
            extra.append(square)
            pairs = [*pairs, pair]
        if len(extra) < missing:
            raise DataError(
                f"batch {b} has {missing} images that could not be read and the other "
                f"{n_batches - 1} batches of the epoch cannot replace them "
                f"({_format_counts(self.skipped)} so far); check the image files"
            )
        filled = torch.from_numpy(np.stack(extra))  # (missing, C, C, 3)
        return (torch.cat([u8, filled]) if len(u8) else filled), pairs


def _pairs(records: Sequence[Record]) -> tuple[list[Source], np.ndarray, list[str]]:
    """(distinct images, (P,) int64 image row of each pair, (P,) captions) from records.

    Each caption of a multi-caption image is one pair; an image met again keeps its first row.
    """
    sources: list[Source] = []
    row_of: dict[Source, int] = {}
    pair_rows: list[int] = []
    pair_caption: list[str] = []
    for record in records:
        row = row_of.setdefault(record.image, len(sources))
        if row == len(sources):
            sources.append(record.image)
        pair_rows.extend([row] * len(record.captions))
        pair_caption.extend(record.captions)
    if not pair_caption:
        raise DataError("no image-caption pairs to train on; check the dataset path and columns")
    return sources, np.asarray(pair_rows, dtype=np.int64), pair_caption


def _count_failures(failures: dict[int, str], num_images: int, any_left: bool) -> dict[str, int]:
    """Images that failed to decode, by reason; a DataError when no pair is ``any_left``."""
    skipped = dict(Counter(failures.values()))
    if not any_left:
        raise DataError(
            f"none of the {num_images} images could be read ({_format_counts(skipped)}); "
            "check that the image paths in the dataset point at real image files"
        )
    if skipped:
        log.warning(
            "skipped %d of %d images: %s", len(failures), num_images, _format_counts(skipped)
        )
    return skipped


def _format_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "none"


# ---------------------------------------------------------------------------------- embedding


class _EvalImages(Dataset):
    """index -> (index, (3, S, S) tensor or None, error message or None)."""

    def __init__(self, sources: Sequence[ImageSource], preprocess: Preprocess) -> None:
        self.sources, self.transform = sources, eval_transform(preprocess)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[int, Tensor | None, str | None]:
        try:
            return i, self.transform(open_image(self.sources[i])), None
        except ImageReadError as e:
            return i, None, str(e)


def _collate_eval(items: list) -> list:
    return items


def iter_image_batches(
    sources: Sequence[ImageSource],
    preprocess: Preprocess,
    batch_size: int,
    num_workers: int = 2,
) -> Iterator[tuple[Tensor, list[int], list[tuple[int, str]]]]:
    """Batches of arbitrary images through ``eval_transform(preprocess)``: (pixels, ok, failures).

    ``pixels`` is float32 (n_ok, 3, S, S) channels_last (n_ok may be 0 when a whole batch
    fails); ``ok`` indices index into ``sources``; failures are (index, message). Lists longer
    than two batches are decoded by DataLoader workers.
    """
    S = preprocess.image_size
    dataset = _EvalImages(sources, preprocess)
    workers = num_workers if len(sources) > 2 * batch_size else 0
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=_collate_eval,
        num_workers=workers,
        worker_init_fn=worker_signals,
    )
    for items in loader:
        ok = [(i, x) for i, x, _ in items if x is not None]
        failures = [(i, msg) for i, x, msg in items if x is None]
        if ok:
            pixels = torch.stack([x for _, x in ok])  # (n_ok, 3, S, S)
        else:
            pixels = torch.empty(0, 3, S, S)
        yield pixels.contiguous(memory_format=torch.channels_last), [i for i, _ in ok], failures
