"""CyCLIP's consistency terms (``train.cyclic_weight``): the term against a hand computation and
its zero, across two gloo processes, the gradients it sends to both towers, through gradient
accumulation, learning on a tiny set; its resume is in test_objectives."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from coembed.loss import ClipLoss, cyclic_consistency, make_loss
from tests.helpers import (
    TINY,
    assert_accumulation_equals_one_batch,
    gloo_group,
    losses_on_a_fixed_batch,
    run_two_processes,
    tiny_train_run,
    unit_rows,
)


def hand_cyclic(images: list[list[float]], texts: list[list[float]]) -> float:
    """Both terms from their definition, with plain Python loops."""

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    n, total = len(images), 0.0
    for i in range(n):
        for j in range(n):
            total += (dot(images[i], images[j]) - dot(texts[i], texts[j])) ** 2
            total += (dot(images[i], texts[j]) - dot(texts[i], images[j])) ** 2
    return total / n


def test_cyclic_consistency_equals_hand_computation_and_is_zero_when_consistent():
    images, texts = unit_rows(5, 4, 0), unit_rows(5, 4, 1)
    got = float(cyclic_consistency(images, texts))
    assert got == pytest.approx(hand_cyclic(images.tolist(), texts.tolist()), rel=1e-6) and got > 0
    # Texts that equal their images make every similarity symmetric and alike: both vanish.
    assert float(cyclic_consistency(images, images.clone())) == pytest.approx(0.0, abs=1e-12)


def test_the_wrapped_loss_adds_the_weighted_term_to_the_contrastive_loss():
    images, texts = unit_rows(8, 6, 3), unit_rows(8, 6, 4)
    scale = torch.tensor(10.0, dtype=torch.float64)
    wrapped = make_loss("clip", cyclic_weight=0.25)(images, texts, scale, None)
    parts = ClipLoss()(images, texts, scale, None) + 0.25 * cyclic_consistency(images, texts)
    assert float(wrapped) == pytest.approx(float(parts), rel=1e-6)
    assert make_loss("clip").__class__ is ClipLoss  # off: the plain loss, nothing wrapped


def cyclic_worker(rank: int, world: int, port: int, queue) -> None:
    with gloo_group(rank, world, port):
        torch.manual_seed(0)
        net = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 12).double())
        rows = slice(rank * 4, (rank + 1) * 4)
        x = torch.randn(8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        out = net(x[rows])
        images = torch.nn.functional.normalize(out[:, :6], dim=-1)
        texts = torch.nn.functional.normalize(out[:, 6:], dim=-1)
        loss = cyclic_consistency(images, texts)
        loss.backward()  # DDP averages the gradients over the two processes
        total = loss.detach().clone()
        dist.all_reduce(total)
        queue.put((rank, float(total) / world, [p.grad.numpy().copy() for p in net.parameters()]))


def test_cyclic_consistency_across_two_processes_matches_one_process():
    """Each rank's rows against the global batch's columns: the mean over ranks, and DDP's
    averaged gradients, are one process's term and gradients on the whole batch (float64)."""
    results = run_two_processes(cyclic_worker)
    torch.manual_seed(0)
    net = torch.nn.Linear(8, 12).double()
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = net(x)
    images = torch.nn.functional.normalize(out[:, :6], dim=-1)
    texts = torch.nn.functional.normalize(out[:, 6:], dim=-1)
    loss = cyclic_consistency(images, texts)
    loss.backward()
    for _, mean_loss, grads in results:
        assert abs(mean_loss - float(loss.detach())) < 1e-6
        for g, p in zip(grads, net.parameters()):
            torch.testing.assert_close(torch.from_numpy(g), p.grad, atol=1e-6, rtol=1e-6)


CAPTIONS = [f"a picture of {('red', 'blue', 'green')[i % 3]} thing {i}" for i in range(8)]


def test_cyclic_term_reaches_both_towers():
    from coembed.training.step import forward_loss

    def grads(extra: list[str]) -> dict[str, torch.Tensor]:
        run = tiny_train_run(CAPTIONS, [*TINY, *extra], batchnorm_eval=True)
        images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        forward_loss(run, images, run.tokenizer(CAPTIONS), None).backward()
        return {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}

    plain, cyclic = grads([]), grads(["train.cyclic_weight=1"])
    assert plain.keys() == cyclic.keys()
    changed = {n for n in plain if not torch.allclose(plain[n], cyclic[n], rtol=1e-6, atol=1e-9)}
    assert any(n.startswith("visual.trunk") for n in changed), sorted(changed)
    assert any(n.startswith("text.") for n in changed), sorted(changed)
    # The term has no temperature: the logit scale's gradient is the contrastive loss's alone.
    assert "logit_scale" not in changed


def test_cyclic_term_through_accumulation_equals_one_batch():
    settings = [*TINY, "train.cyclic_weight=1", "train.accum_steps=2"]
    run = tiny_train_run(CAPTIONS, settings, batchnorm_eval=True)
    assert_accumulation_equals_one_batch(run, CAPTIONS)


def test_cyclic_loss_falls_on_a_tiny_set():
    run = tiny_train_run(CAPTIONS, [*TINY, "train.warmup_steps=0", "train.cyclic_weight=1"])
    losses = losses_on_a_fixed_batch(run, CAPTIONS)
    assert losses[-1] < 0.7 * losses[0], losses
