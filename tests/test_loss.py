"""Losses against the real open_clip package, and the gathered loss across two gloo processes."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from coembed.loss import ClipLoss, SigLipLoss
from tests.helpers import gloo_group, run_two_processes

open_clip_loss = pytest.importorskip("open_clip.loss")


def features(n: int = 12, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return img, txt


@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_clip_loss_equals_open_clip(scale):
    img, txt = features()
    s = torch.tensor(scale, dtype=torch.float64)
    ours = ClipLoss()(img, txt, s)
    theirs = open_clip_loss.ClipLoss()(img, txt, s)
    # Tolerance 1e-6; float64 makes it a check of the formula, not of rounding.
    assert abs(float(ours) - float(theirs)) < 1e-6


@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (1.0, 0.0), (50.0, -3.0)])
def test_sigmoid_loss_equals_open_clip(scale, bias):
    img, txt = features(seed=1)
    s, b = torch.tensor(scale, dtype=torch.float64), torch.tensor(bias, dtype=torch.float64)
    ours = SigLipLoss()(img, txt, s, b)
    theirs = open_clip_loss.SigLipLoss()(img, txt, s, b)
    assert abs(float(ours) - float(theirs)) < 1e-6


def test_perfect_alignment_gives_low_loss():
    img, _ = features()
    assert float(ClipLoss()(img, img, torch.tensor(100.0, dtype=torch.float64))) < 1e-3


# --- two real processes (gloo) -----------------------------------------------------------------


def make_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(8, 6).double()


def batch(seed: int = 5, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g, dtype=torch.float64), torch.randn(
        n, 8, generator=g, dtype=torch.float64
    )


def single_process_reference(kind: str):
    """Loss and parameter gradients of one process on the whole batch."""
    net = make_net()
    x_img, x_txt = batch()
    img = torch.nn.functional.normalize(net(x_img), dim=-1)
    txt = torch.nn.functional.normalize(net(x_txt) * 0.5, dim=-1)
    scale = torch.tensor(10.0, dtype=torch.float64)
    loss_fn = ClipLoss() if kind == "clip" else SigLipLoss()
    loss = loss_fn(
        img, txt, scale, torch.tensor(-2.0, dtype=torch.float64) if kind == "siglip" else None
    )
    loss.backward()
    return float(loss), [p.grad.clone() for p in net.parameters()]


def worker(rank: int, world: int, port: int, kind: str, queue) -> None:
    with gloo_group(rank, world, port):
        net = torch.nn.parallel.DistributedDataParallel(make_net())
        x_img, x_txt = batch()
        local = slice(rank * 4, (rank + 1) * 4)
        img = torch.nn.functional.normalize(net(x_img[local]), dim=-1)
        txt = torch.nn.functional.normalize(net.module(x_txt[local]) * 0.5, dim=-1)
        scale = torch.tensor(10.0, dtype=torch.float64)
        loss_fn = ClipLoss() if kind == "clip" else SigLipLoss()
        bias = torch.tensor(-2.0, dtype=torch.float64) if kind == "siglip" else None
        loss = loss_fn(img, txt, scale, bias)
        loss.backward()  # DDP averages the gradients over the two processes
        total = loss.detach().clone()
        dist.all_reduce(total)
        reference = None
        if kind == "clip":
            # open_clip's distributed ClipLoss on the same features (local loss, gather with grad).
            reference = float(
                open_clip_loss.ClipLoss(
                    local_loss=True, gather_with_grad=True, rank=rank, world_size=world
                )(img.detach(), txt.detach(), scale)
            )
        # Plain arrays, not tensors: tensors travel as shared-memory handles that die with the worker.
        grads = [p.grad.numpy().copy() for p in net.parameters()]
        queue.put((rank, float(total) / world, float(loss.detach()), reference, grads))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_gathered_loss_and_gradients_match_one_process(kind):
    results = run_two_processes(worker, kind)
    ref_loss, ref_grads = single_process_reference(kind)
    for _rank, mean_loss, local_loss, open_clip_value, grads in results:
        assert abs(mean_loss - ref_loss) < 1e-6
        if open_clip_value is not None:
            assert abs(local_loss - open_clip_value) < 1e-6
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(torch.from_numpy(g), r, atol=1e-6, rtol=0)
