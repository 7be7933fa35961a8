"""Cache reuse and invalidation, skip counts, and the determinism rules of epoch_batches."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from coembed.data.cache import decode_images, decode_square
from coembed.data.formats import Record
from coembed.data.images import open_image
from coembed.data.loader import PairData, iter_image_batches, prefetched
from coembed.data.transforms import Preprocess, eval_transform
from coembed.errors import DataError

SIZE = 16  # image_size of the tests; the cache holds round(16 * 8/7) = 18 px squares


def make_images(folder, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        h, w = rng.integers(12, 30, size=2)
        path = folder / f"im{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def records_for(paths: list[str], captions_per_image: int = 1) -> list[Record]:
    return [
        Record(p, [f"caption {i}.{k}" for k in range(captions_per_image)], key=str(i))
        for i, p in enumerate(paths)
    ]


@pytest.fixture
def dataset(tmp_path):
    paths = make_images(tmp_path, 24)
    return PairData.from_records(records_for(paths), SIZE, cache_dir=str(tmp_path / "cache"))


def test_cache_reuse_and_invalidation(tmp_path):
    paths = make_images(tmp_path, 6)
    cache = tmp_path / "cache"
    first = decode_images(paths, 18, cache)
    assert not first.reused and first.array.shape == (6, 18, 18, 3)
    assert np.array_equal(first.array[2], decode_square(paths[2], 18))
    again = decode_images(paths, 18, cache)
    assert again.reused and np.array_equal(again.array, first.array)
    # Editing one image changes its size/mtime: the cache is rebuilt in place, with the new pixels.
    Image.new("RGB", (20, 20), (255, 0, 0)).save(paths[2])
    os.utime(paths[2], ns=(1, 1))
    rebuilt = decode_images(paths, 18, cache)
    assert not rebuilt.reused and tuple(rebuilt.array[2, 9, 9]) == (255, 0, 0)
    assert len(list(cache.glob("*.npy"))) == 1  # one file per (dataset, size), not one per edit
    # Another size is another cache.
    assert not decode_images(paths, 20, cache).reused
    assert len(list(cache.glob("*.npy"))) == 2


def test_parallel_decode_matches_serial(tmp_path):
    paths = make_images(tmp_path, 70)  # over the pool threshold
    serial = decode_images(paths, 18, None, num_workers=1)
    parallel = decode_images(paths, 18, tmp_path / "cache", num_workers=2)
    assert np.array_equal(serial.array, parallel.array)


def test_failed_images_dropped_and_counted(tmp_path):
    paths = make_images(tmp_path, 5)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not a picture")
    bad = [str(tmp_path / "missing.png"), str(tmp_path / "empty.png"), str(tmp_path / "text.png")]
    data = PairData.from_records(records_for(paths + bad, 2), SIZE, cache_dir=None)
    assert data.skipped == {"missing": 1, "empty": 1, "corrupt": 1}
    assert len(data) == 10  # 5 good images x 2 captions
    with pytest.raises(DataError, match="none of the 3 images"):
        PairData.from_records(records_for(bad), SIZE, cache_dir=None)


def test_epoch_batches_shapes_and_determinism(dataset):
    assert len(dataset) == 24 and dataset.num_batches(5) == 4 and dataset.num_batches(5, 2) == 2
    batches = list(dataset.epoch_batches(epoch=3, seed=7, batch_size=5))
    x, caps = batches[0]
    assert len(batches) == 4 and x.shape == (5, 3, SIZE, SIZE) and len(caps) == 5
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    again = list(dataset.epoch_batches(epoch=3, seed=7, batch_size=5))
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(batches, again))
    other = list(dataset.epoch_batches(epoch=4, seed=7, batch_size=5))
    assert [c for _, c in other] != [c for _, c in batches]
    # The order is the documented permutation: global batch b = perm[b*B : (b+1)*B].
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(7 * 1000003 + 3))
    assert caps == [f"caption {i}.0" for i in perm[:5].tolist()]


def test_start_batch_resumes_exactly(dataset):
    full = list(dataset.epoch_batches(epoch=1, seed=0, batch_size=4))
    tail = list(dataset.epoch_batches(epoch=1, seed=0, batch_size=4, start_batch=3))
    assert len(tail) == len(full) - 3
    for (xa, ca), (xb, cb) in zip(full[3:], tail):
        assert torch.equal(xa, xb) and ca == cb


def test_rank_slices_concatenate_to_single_process(dataset):
    B, W = 3, 2
    single = list(dataset.epoch_batches(2, 5, B * W, augment=False))
    ranks = [
        list(dataset.epoch_batches(2, 5, B, rank=r, world_size=W, augment=False)) for r in range(W)
    ]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 4
    for b, (x, caps) in enumerate(single):
        assert torch.equal(torch.cat([ranks[r][b][0] for r in range(W)]), x)
        assert caps == ranks[0][b][1] + ranks[1][b][1]
    # With augmentation each rank draws its own crops, but the pairs are still the same.
    aug = [list(dataset.epoch_batches(2, 5, B, rank=r, world_size=W)) for r in range(W)]
    assert [c for _, c in aug[1]] == [c for _, c in ranks[1]]
    assert not torch.equal(aug[0][0][0], aug[1][0][0])


def test_batch_too_big_is_a_clear_error(dataset):
    with pytest.raises(DataError, match="lower the batch size"):
        dataset.num_batches(16, world_size=2)


def test_streaming_mode_matches_cache_and_drops_failures(tmp_path):
    paths = make_images(tmp_path, 12)
    records = records_for(paths)
    cached = PairData.from_records(records, SIZE, cache_dir=None)
    streamed = PairData.from_records(
        records, SIZE, cache_dir=None, max_cache_bytes=0, num_workers=0
    )
    workers = PairData.from_records(records, SIZE, cache_dir=None, max_cache_bytes=0, num_workers=2)
    assert streamed.streaming and not cached.streaming
    for a, b, c in zip(
        cached.epoch_batches(0, 1, 4),
        streamed.epoch_batches(0, 1, 4),
        workers.epoch_batches(0, 1, 4),
    ):
        assert torch.equal(a[0], b[0]) and a[1] == b[1]
        assert torch.equal(a[0], c[0]) and a[1] == c[1]
    os.remove(paths[0])  # vanishes after the dataset was read
    got = [caps for _, caps in streamed.epoch_batches(0, 1, 4)]
    assert sum(len(c) for c in got) == 11 and "caption 0.0" not in sum(got, [])
    assert streamed.skipped == {"missing": 1}


def test_iter_image_batches(tmp_path):
    paths = make_images(tmp_path, 7)
    sources = [paths[0], str(tmp_path / "nope.png"), *paths[1:], Image.open(paths[3])]
    got = list(iter_image_batches(sources, Preprocess(SIZE), batch_size=3, num_workers=0))
    ok = sum((o for _, o, _ in got), [])
    failures = sum((f for _, _, f in got), [])
    assert ok == [0, 2, 3, 4, 5, 6, 7, 8] and [i for i, _ in failures] == [1]
    assert "not found" in failures[0][1]
    pixels = torch.cat([x for x, _, _ in got])
    assert pixels.shape == (8, 3, SIZE, SIZE)
    assert torch.equal(pixels[1], eval_transform(Preprocess(SIZE))(open_image(paths[1])))
    assert torch.equal(pixels[7], pixels[3])  # the PIL image is the same picture as paths[3]
    # Longer than two batches: decoded by DataLoader workers, same result.
    with_workers = list(iter_image_batches(sources, Preprocess(SIZE), batch_size=2, num_workers=2))
    assert torch.equal(torch.cat([x for x, _, _ in with_workers]), pixels)
    assert sum((o for _, o, _ in with_workers), []) == ok


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetched_keeps_order_and_raises_where_the_item_failed(depth):
    def items():
        yield from range(5)
        raise DataError("batch 5 is unreadable")

    seen = []
    with pytest.raises(DataError, match="batch 5"), prefetched(items(), depth) as ready:
        for x in ready:
            seen.append(x)
    assert seen == [0, 1, 2, 3, 4]


def test_prefetched_stops_its_thread_and_closes_the_generator_when_left_early():
    made, closed = [], threading.Event()

    def items():
        try:
            for i in range(1000):
                made.append(i)
                yield i
        finally:
            closed.set()

    with prefetched(items(), depth=2) as ready:
        assert next(ready) == 0
    assert closed.is_set()
    assert len(made) <= 4  # the consumed item, the queue's two, and the one being put
    assert not any(t.name == "coembed-prefetch" for t in threading.enumerate())


def test_cache_scale_sizes_the_squares(tmp_path):
    """data.cache_scale sets the cached side (16 px at 2.0 for 8 px models); training crops and
    whole-image batches keep the model's size, and streaming decodes to the same squares."""
    paths = make_images(tmp_path, 6)
    records, size = records_for(paths), 8
    data = PairData.from_records(records, size, cache_dir=None, cache_scale=2.0)
    streamed = PairData.from_records(
        records, size, cache_dir=None, max_cache_bytes=0, num_workers=0, cache_scale=2.0
    )
    assert data.images.shape[1:] == (16, 16, 3) and streamed.cache_size == 16
    for augment in (True, False):
        for a, b in zip(
            data.epoch_batches(0, 1, 3, augment=augment),
            streamed.epoch_batches(0, 1, 3, augment=augment),
        ):
            assert a[0].shape == (3, 3, size, size)
            assert torch.equal(a[0], b[0]) and a[1] == b[1]
