"""One optimizer step: the forward pass and loss, the backward pass (with gradient accumulation
that keeps the whole batch as negatives), the divergence checks and the update."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch import nn

from coembed.device import autocast_dtype
from coembed.towers.layers import buffers_restored
from coembed.training.optim import learning_rate
from coembed.training.run import TrainingDiverged, TrainRun
from coembed.training.state import last_good


def autocast(run: TrainRun) -> contextlib.AbstractContextManager:
    """Autocast to the run's reduced precision, or nothing when it trains in fp32."""
    amp = autocast_dtype(run.cfg.train.precision, run.device)
    return torch.autocast(run.device.type, dtype=amp) if amp else contextlib.nullcontext()


def forward_loss(run: TrainRun, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The contrastive loss of one batch (model under autocast, loss in fp32)."""
    with autocast(run):
        out = run.model(images, tokens)
    out = {k: v.float() for k, v in out.items()}
    return run.loss_fn(**out)


def rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The random state dropout draws from: the CPU generator's, and the device's on CUDA."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    """Put back a state taken by ``rng_state``."""
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def accumulated_backward(run: TrainRun, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Gradient accumulation that keeps the whole batch as contrastive negatives; returns the loss.

    First embed every micro-batch without gradients; then, one micro-batch at a time, recompute
    its features with gradients, splice them into the cached features and back-propagate the
    full-batch loss. Memory grows with the micro-batch, the negatives with the whole batch.

    The gradients are exactly those of one full-batch step: micro-batch j contributes
    dL/df_j * df_j/dtheta, and summing over j gives dL/dtheta (so no division by the number of
    micro-batches). The temperature (and bias) enter every micro-batch's loss directly, so they
    carry gradient in one micro-batch only. The caching pass restores BatchNorm's running
    statistics, so they are updated once per micro-batch, not twice. BatchNorm in train mode
    still normalizes each micro-batch with its own statistics, as each rank does under DDP.
    The random state is saved before each micro-batch's caching pass and put back before its
    recompute, so dropout draws the same masks in both: the cached features (the negatives) and
    the differentiated ones are the same function of the weights (and the generator ends where the
    caching pass left it).
    """
    n = run.cfg.train.accum_steps
    image_chunks, token_chunks = images.chunk(n), tokens.chunk(n)
    states, cached = [], []
    with torch.no_grad(), autocast(run), buffers_restored(run.raw_model):
        for i, t in zip(image_chunks, token_chunks):
            states.append(rng_state(run.device))
            cached.append(run.model(i, t))
    cached_images = [c["image_features"].float() for c in cached]
    cached_texts = [c["text_features"].float() for c in cached]
    ddp = isinstance(run.model, nn.parallel.DistributedDataParallel)
    for j in range(n):
        last = j == n - 1
        # DDP all-reduces the accumulated gradients once, in the last micro-batch's backward.
        with contextlib.nullcontext() if last or not ddp else run.model.no_sync():
            set_rng_state(states[j], run.device)
            with autocast(run):
                out = run.model(image_chunks[j], token_chunks[j])
            features_i = (
                cached_images[:j] + [out["image_features"].float()] + cached_images[j + 1 :]
            )
            features_t = cached_texts[:j] + [out["text_features"].float()] + cached_texts[j + 1 :]
            scalars = {
                k: (v if last else v.detach()).float()
                for k, v in out.items()
                if k in ("logit_scale", "logit_bias")
            }
            loss = run.loss_fn(torch.cat(features_i), torch.cat(features_t), **scalars)
            backward(run, loss)
    return loss.detach()


def backward(run: TrainRun, loss: torch.Tensor) -> None:
    """Back-propagate ``loss``, through the grad scaler when training in fp16."""
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
    else:
        loss.backward()


def global_mean(run: TrainRun, value: torch.Tensor) -> float:
    """This rank's loss averaged over ranks: the loss of the whole global batch."""
    if run.dist.world > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= run.dist.world
    return float(value)


def gradient_norm(run: TrainRun) -> float:
    """The global gradient norm, clipped to ``grad_clip`` on the way when that is set."""
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    params = [p for p in run.raw_model.parameters() if p.grad is not None]
    if run.cfg.train.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, run.cfg.train.grad_clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    return float(norm)


def train_step(run: TrainRun, images: torch.Tensor, captions: list[str]) -> tuple[float, float]:
    """One optimizer step on one global batch; returns (loss before the step, gradient norm).

    A non-finite loss or gradient stops the run before the optimizer touches the weights, so the
    checkpoints on disk stay good (with fp16 the grad scaler skips such steps on its own).
    """
    tokens = run.tokenizer(captions)
    if run.device.type == "cuda":
        # Page-locked host memory lets the copies overlap with the previous step's kernels.
        images, tokens = images.pin_memory(), tokens.pin_memory()
    images = images.to(run.device, non_blocking=True)
    tokens = tokens.to(run.device, non_blocking=True)
    lr = learning_rate(run.step, run.total_steps, run.cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.optimizer.zero_grad(set_to_none=True)
    if run.cfg.train.accum_steps > 1:
        loss = accumulated_backward(run, images, tokens)
    else:
        loss = forward_loss(run, images, tokens)
        backward(run, loss)
    value = global_mean(run, loss.detach())
    if not math.isfinite(value):
        raise TrainingDiverged(
            f"loss became {value} at step {run.step + 1}; stopped without saving "
            f"({last_good(run.output)}). Try a lower --lr, more warmup "
            "(--set train.warmup_steps=...) or fp32 precision"
        )
    grad_norm = gradient_norm(run)
    if run.scaler is None and not math.isfinite(grad_norm):
        raise TrainingDiverged(
            f"gradient norm became {grad_norm} at step {run.step + 1}; stopped without saving "
            f"({last_good(run.output)}). Try a lower --lr or gradient clipping "
            "(--set train.grad_clip=1.0)"
        )
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.raw_model.clamp_logit_scale()
    run.step += 1
    return value, grad_norm
