"""Pairs that share a caption, used on purpose: caption runs in an epoch's order
(``data.caption_group``) and the supervised contrast of a batch's images whose captions match
(``train.image_supcon_weight``). The order against its definition, the term against a hand
computation, across two gloo processes, through gradient accumulation, learning on a tiny set;
their resume is in test_objectives."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from coembed.data.loader import caption_runs
from coembed.loss import ClipLoss, image_supcon, positive_pairs
from tests.helpers import (
    TINY,
    assert_accumulation_equals_one_batch,
    gloo_group,
    losses_on_a_fixed_batch,
    run_two_processes,
    tiny_train_run,
    unit_rows,
)

# --- caption runs ----------------------------------------------------------------------------------

# 14 pairs: caption 0 five times, 1 three times, 2 twice, 3-6 once.
CAPTION_IDS = np.array([0, 1, 0, 2, 3, 0, 1, 4, 0, 2, 5, 1, 0, 6])


@pytest.mark.parametrize("length", [2, 3])
def test_caption_runs_keep_every_pair_and_put_a_caption_together(length):
    order = torch.randperm(14, generator=torch.Generator().manual_seed(3))
    arranged = caption_runs(order, CAPTION_IDS, length, seed=0, epoch=0)
    assert sorted(arranged.tolist()) == list(range(14))  # a permutation: an epoch is unchanged
    # Each caption's pairs, in the given order, cut into runs of `length` (the last shorter):
    # every run stands together in the arranged order.
    arranged_list = arranged.tolist()
    for c in range(7):
        mine = [p for p in order.tolist() if CAPTION_IDS[p] == c]
        for k in range(0, len(mine), length):
            run = mine[k : k + length]
            at = arranged_list.index(run[0])
            assert arranged_list[at : at + len(run)] == run, (c, run, arranged_list)


def test_caption_runs_depend_on_seed_and_epoch_alone():
    order = torch.arange(14)
    one = caption_runs(order, CAPTION_IDS, 2, seed=0, epoch=0)
    assert torch.equal(one, caption_runs(order, CAPTION_IDS, 2, seed=0, epoch=0))
    assert not torch.equal(one, caption_runs(order, CAPTION_IDS, 2, seed=0, epoch=1))
    assert not torch.equal(one, caption_runs(order, CAPTION_IDS, 2, seed=1, epoch=0))
    assert torch.equal(caption_runs(order, CAPTION_IDS, 1, seed=0, epoch=0), order)
    # A resampled epoch may draw a pair twice: both copies stay.
    drawn = torch.tensor([0, 0, 2, 7, 7, 13])
    assert sorted(caption_runs(drawn, CAPTION_IDS, 2, 0, 0).tolist()) == sorted(drawn.tolist())


def test_epoch_batches_hold_a_caption_under_several_pictures(tmp_path):
    """Real training batches: with caption runs of 2 most batches hold a caption twice; the rank
    slices of two processes are the single-process batches, cut in two."""
    from coembed.data.formats import read_records
    from coembed.data.loader import PairData
    from tests.helpers import copy_images, shipped_rows, write_csv

    rows = shipped_rows(24)
    copy_images(rows, tmp_path / "images")
    table = [(f"images/{a}", f"topic {i % 8}") for i, (a, _) in enumerate(rows)]
    records, _ = read_records(str(write_csv(tmp_path / "train.csv", table)))
    data = PairData.from_records(records, 32, str(tmp_path / "cache"))

    def batches(group: int, rank: int = 0, world: int = 1) -> list[list[str]]:
        stream = data.epoch_batches(
            0, 0, 8 // world, rank=rank, world_size=world, augment=False, caption_group=group
        )
        return [captions for _, captions in stream]

    def repeats(batch: list[str]) -> int:
        return len(batch) - len(set(batch))

    plain, grouped = batches(1), batches(2)
    assert sum(map(repeats, grouped)) > sum(map(repeats, plain))
    assert sum(map(repeats, grouped)) >= 6  # 3 batches of 8, runs of 2: nearly every pair paired
    halves = [batches(2, rank, 2) for rank in (0, 1)]
    assert [a + b for a, b in zip(*halves)] == grouped


# --- the images' supervised contrast -----------------------------------------------------------------


def hand_supcon(images: list[list[float]], positive: list[list[bool]], t: float) -> float:
    """SupCon's L_out written out: sum over rows with other positives, / all rows."""
    n, total = len(images), 0.0
    for i in range(n):
        sims = [sum(a * b for a, b in zip(images[i], images[j])) / t for j in range(n)]
        denominator = sum(math.exp(sims[j]) for j in range(n) if j != i)
        mine = [j for j in range(n) if j != i and positive[i][j]]
        if mine:
            total -= sum(sims[j] - math.log(denominator) for j in mine) / len(mine)
    return total / n


def test_image_supcon_equals_hand_computation():
    images = unit_rows(5, 3, 0)
    positive = torch.tensor(
        [[1, 0, 1, 0, 0], [0, 1, 0, 0, 0], [1, 0, 1, 0, 1], [0, 0, 0, 1, 0], [0, 0, 1, 0, 1]],
        dtype=torch.bool,
    )
    got = float(image_supcon(images, positive, 0.5))
    want = hand_supcon(images.tolist(), positive.tolist(), 0.5)
    assert got == pytest.approx(want, rel=1e-12) and want > 0
    # Without any shared caption or picture the term is 0 (and still part of the graph).
    zero = image_supcon(images.requires_grad_(), None, 0.5)
    assert float(zero.detach()) == 0.0 and zero.requires_grad


def test_image_supcon_reaches_the_image_tower_and_not_the_text():
    from coembed.training.step import forward_loss

    captions = [f"a picture of {('red', 'blue', 'green')[i % 3]} things" for i in range(8)]

    def grads(extra: list[str]) -> dict[str, torch.Tensor]:
        settings = [*TINY, "train.soft_targets=true", *extra]
        run = tiny_train_run(captions, settings, batchnorm_eval=True)
        images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        tokens = run.tokenizer(captions)
        forward_loss(run, images, tokens, positive_pairs(tokens, None)).backward()
        return {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}

    plain, supcon = grads([]), grads(["train.image_supcon_weight=1"])
    assert plain.keys() == supcon.keys()
    changed = {n for n in plain if not torch.allclose(plain[n], supcon[n], rtol=1e-6, atol=1e-9)}
    assert changed and all(n.startswith("visual.") for n in changed), sorted(changed)
    assert any(n.startswith("visual.trunk") for n in changed)


def test_image_supcon_through_accumulation_equals_one_batch():
    captions = [f"a picture of {('red', 'blue', 'green')[i % 3]} things" for i in range(8)]
    settings = [*TINY, "train.soft_targets=true", "train.image_supcon_weight=1"]
    run = tiny_train_run(captions, [*settings, "train.accum_steps=2"], batchnorm_eval=True)
    assert_accumulation_equals_one_batch(run, captions, soft_targets=True)


def test_image_supcon_and_caption_runs_loss_falls_on_a_tiny_set():
    captions = [f"a picture of {('red', 'blue', 'green')[i % 3]} things" for i in range(8)]
    settings = [*TINY, "train.warmup_steps=0", "train.soft_targets=true"]
    run = tiny_train_run(captions, [*settings, "train.image_supcon_weight=1"])
    losses = losses_on_a_fixed_batch(run, captions, image_ids=torch.arange(8))
    assert losses[-1] < 0.7 * losses[0], losses


# Eight images over two ranks of four; captions shared within and across the ranks.
GLOBAL_CAPTIONS = torch.tensor([[1, 4], [1, 5], [1, 4], [1, 6], [1, 7], [1, 5], [1, 8], [1, 4]])


def supcon_worker(rank: int, world: int, port: int, queue) -> None:
    with gloo_group(rank, world, port):
        torch.manual_seed(0)
        net = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 6).double())
        rows = slice(rank * 4, (rank + 1) * 4)
        x = torch.randn(8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        features = torch.nn.functional.normalize(net(x[rows]), dim=-1)
        loss = image_supcon(features, positive_pairs(GLOBAL_CAPTIONS[rows], None), 0.2)
        loss.backward()  # DDP averages the gradients over the two processes
        total = loss.detach().clone()
        dist.all_reduce(total)
        queue.put((rank, float(total) / world, [p.grad.numpy().copy() for p in net.parameters()]))


def test_image_supcon_across_two_processes_matches_one_process():
    results = run_two_processes(supcon_worker)
    torch.manual_seed(0)
    net = torch.nn.Linear(8, 6).double()
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    features = torch.nn.functional.normalize(net(x), dim=-1)
    loss = image_supcon(features, positive_pairs(GLOBAL_CAPTIONS, None), 0.2)
    loss.backward()
    for _, mean_loss, grads in results:
        assert abs(mean_loss - float(loss)) < 1e-9
        for g, p in zip(grads, net.parameters()):
            torch.testing.assert_close(torch.from_numpy(g), p.grad, atol=1e-9, rtol=0)


def test_the_wrapped_loss_is_the_contrastive_loss_plus_the_weighted_term():
    from coembed.loss import make_loss

    images, texts = unit_rows(8, 6, 1), unit_rows(8, 6, 2)
    positives = positive_pairs(GLOBAL_CAPTIONS, None)
    scale = torch.tensor(10.0, dtype=torch.float64)
    wrapped = make_loss("clip", 0.0, 0.5, 0.2)(images, texts, scale, None, positives=positives)
    parts = ClipLoss()(images, texts, scale, None, positives) + 0.5 * image_supcon(
        images, positives, 0.2
    )
    assert float(wrapped) == pytest.approx(float(parts), rel=1e-12)
    assert make_loss("siglip", 0.0, 0.5, 0.2) is not None  # the sigmoid loss takes it too
