"""One optimizer step: the forward pass and loss, the backward pass (with gradient accumulation
that keeps the whole batch as negatives), the divergence checks and the update."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from coembed.config import Config
from coembed.device import autocast_dtype
from coembed.loss import positive_pairs
from coembed.towers.layers import buffers_restored
from coembed.training.optim import learning_rate
from coembed.training.run import TrainingDiverged, TrainRun
from coembed.training.state import last_good
from coembed.training.views import average_head_gradients, two_view_loss, two_views


def autocast(run: TrainRun) -> contextlib.AbstractContextManager:
    """Autocast to the run's reduced precision, or nothing when it trains in fp32."""
    amp = autocast_dtype(run.cfg.train.precision, run.device)
    return torch.autocast(run.device.type, dtype=amp) if amp else contextlib.nullcontext()


# Masked language modelling (train.mlm_weight): the share of caption tokens hidden, BERT's.
MLM_RATE = 0.15
MLM_STREAM = 0x4D4C4D  # keeps the hiding draws apart from the other streams of the run's seed


def step_generator(run: TrainRun, stream: int) -> torch.Generator:
    """A CPU generator of (seed, step, rank, ``stream``): the same draws at a step however the
    run got there (a resume included), and never torch's own generator, whose state dropout's
    replay in the accumulation path depends on."""
    seed = run.cfg.train.seed
    words = [seed & 0xFFFFFFFF, seed >> 32, run.step, run.dist.rank, stream]
    state = np.random.SeedSequence(words).generate_state(1)
    return torch.Generator().manual_seed(int(state[0]))


def mlm_hidden(run: TrainRun, tokens: torch.Tensor) -> torch.Tensor | None:
    """With ``train.mlm_weight``, the (B, T) bool caption positions the masked language model
    hides: each token between the start and end tokens with probability MLM_RATE, drawn from
    ``step_generator``. None without the objective."""
    if not run.cfg.train.mlm_weight:
        return None
    draws = torch.rand(tokens.shape, generator=step_generator(run, MLM_STREAM))
    positions = torch.arange(tokens.shape[1], device=tokens.device)  # (T,)
    eot = run.raw_model.text.end_positions(tokens)  # (B,)
    inside = (positions[None, :] > 0) & (positions[None, :] < eot[:, None])  # (B, T)
    return (draws.to(tokens.device) < MLM_RATE) & inside


# Caption augmentation (train.caption_word_dropout): its own stream of the run's seed.
WORD_DROP_STREAM = 0x574F5244


def dropped_words(run: TrainRun, captions: list[str]) -> list[str]:
    """With ``train.caption_word_dropout`` p, each caption with each of its words (split at
    white space) left out with probability p, EDA's random deletion (Wei and Zou, 2019): the
    text tower then cannot lean on any one word of a caption. A caption that would lose every
    word keeps one of them, drawn at random; one word alone stays as it is. Drawn from
    ``step_generator``, so a resumed run drops what an uninterrupted one does. The captions as
    they are without the setting."""
    p = run.cfg.train.caption_word_dropout
    if not p:
        return captions
    generator = step_generator(run, WORD_DROP_STREAM)
    out = []
    for caption in captions:
        words = caption.split()
        draws = torch.rand(len(words), generator=generator).tolist()
        kept = [word for word, draw in zip(words, draws) if draw >= p]
        if not kept and words:
            kept = [words[int(torch.randint(len(words), (1,), generator=generator))]]
        out.append(" ".join(kept) if len(words) > 1 else caption)
    return out


def mlm_term(
    run: TrainRun, logits: torch.Tensor, tokens: torch.Tensor, hidden: torch.Tensor, count: int
) -> torch.Tensor:
    """``train.mlm_weight`` x the cross-entropy of the hidden tokens ``logits`` (M, vocab) predict,
    summed and divided by ``count``, the hidden tokens of the whole batch (so the micro-batches'
    terms add up to the batch's mean)."""
    summed = F.cross_entropy(logits.float(), tokens[hidden], reduction="sum")
    return run.cfg.train.mlm_weight * summed / max(count, 1)


def proxy_term(
    run: TrainRun,
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    caption_ids: torch.Tensor,
    rows: int,
) -> torch.Tensor:
    """``train.caption_proxy_weight`` x the proxies' term of these pairs, summed over them and
    divided by ``rows``, the pairs of the whole batch on this process (so micro-batches add up
    to the batch's mean)."""
    train = run.cfg.train
    ids = caption_ids.to(image_features.device)
    features = (image_features.float(), text_features.float())
    summed = run.proxies.summed_term(features, ids, train.caption_proxy_temperature)
    return train.caption_proxy_weight * summed / rows


def forward_loss(
    run: TrainRun,
    images: torch.Tensor,
    tokens: torch.Tensor,
    positives: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    memory: tuple[torch.Tensor, ...] | None = None,
    caption_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss of one batch (model under autocast, loss in fp32): contrastive, with
    ``positives`` as ``coembed.loss.positive_pairs`` returns them and the feature memory's
    columns (``memory.FeatureMemory.columns``), plus the masked language model's term when
    ``hidden`` (from ``mlm_hidden``) is given and the caption proxies' term when the pairs'
    ``caption_ids`` (``proxies.CaptionProxies.ids``) are. With a second view (``views.two_views``)
    ``images`` are (2B, 3, S, S), both views in one pass through the tower, and the loss is
    ``views.two_view_loss``. The batch's features are staged for the memory."""
    with autocast(run):
        out = run.model(images, tokens, hidden)
    logits = out.pop("mlm_logits", None)
    out = {k: v.float() for k, v in out.items()}
    first_view = out["image_features"][: tokens.shape[0]]
    if run.memory is not None:
        run.memory.stage(first_view, out["text_features"])
    extra = torch.zeros((), device=first_view.device)
    if caption_ids is not None:
        extra = proxy_term(run, first_view, out["text_features"], caption_ids, len(caption_ids))
    if two_views(run.cfg):
        loss = two_view_loss(run, out, positives, memory)
    else:
        loss = run.loss_fn(**out, positives=positives, memory=memory)
    if logits is not None:
        loss = loss + mlm_term(run, logits, tokens, hidden, int(hidden.sum()))
    return loss + extra


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


def cache_features(
    run: TrainRun, image_chunks: tuple[torch.Tensor, ...], token_chunks: tuple[torch.Tensor, ...]
) -> tuple[list, list[torch.Tensor], list[torch.Tensor]]:
    """The caching pass of ``accumulated_backward``: each micro-batch's random state before its
    forward, and its image and text features (fp32, no gradient), buffers left as they were.
    The whole batch's features are staged for the feature memory."""
    states, cached = [], []
    with torch.no_grad(), autocast(run), buffers_restored(run.raw_model):
        for i, t in zip(image_chunks, token_chunks):
            states.append(rng_state(run.device))
            cached.append(run.model(i, t))
    images = [c["image_features"].float() for c in cached]
    texts = [c["text_features"].float() for c in cached]
    if run.memory is not None:
        run.memory.stage(torch.cat(images), torch.cat(texts))
    return states, images, texts


def spliced(
    out: dict[str, torch.Tensor], images: list[torch.Tensor], texts: list[torch.Tensor], j: int
) -> dict[str, torch.Tensor]:
    """The whole batch's features (fp32) with micro-batch ``j``'s recomputed ``out`` in place of
    its cached ones (``images``, ``texts``); the temperature (and bias) with gradient in the last
    micro-batch only."""
    features = {
        k: torch.cat(cached[:j] + [out[k].float()] + cached[j + 1 :])
        for k, cached in (("image_features", images), ("text_features", texts))
    }
    last = j == len(images) - 1
    for k in ("logit_scale", "logit_bias"):
        if k in out:
            features[k] = (out[k] if last else out[k].detach()).float()
    return features


def accumulated_backward(
    run: TrainRun,
    images: torch.Tensor,
    tokens: torch.Tensor,
    positives: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    memory: tuple[torch.Tensor, ...] | None = None,
    caption_ids: torch.Tensor | None = None,
) -> torch.Tensor:
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
    caching pass left it). Every micro-batch's loss is the whole batch's, so ``positives`` (of the
    whole batch) and the feature memory's columns apply to each unchanged. The masked language
    model's term (``hidden``) is a mean over tokens and the caption proxies' (``caption_ids``)
    a mean over rows, both local to each micro-batch: each adds its share, in its recompute only.
    """
    n = run.cfg.train.accum_steps
    image_chunks, token_chunks = images.chunk(n), tokens.chunk(n)
    states, cached_images, cached_texts = cache_features(run, image_chunks, token_chunks)
    ddp = isinstance(run.model, nn.parallel.DistributedDataParallel)
    hidden_chunks = [None] * n if hidden is None else hidden.chunk(n)
    count = 0 if hidden is None else int(hidden.sum())
    id_chunks = [None] * n if caption_ids is None else caption_ids.chunk(n)
    local_total = torch.zeros((), device=run.device)  # the local terms' sum over micro-batches
    for j in range(n):
        # DDP all-reduces the accumulated gradients once, in the last micro-batch's backward.
        with contextlib.nullcontext() if j == n - 1 or not ddp else run.model.no_sync():
            set_rng_state(states[j], run.device)
            with autocast(run):
                out = run.model(image_chunks[j], token_chunks[j], hidden_chunks[j])
            features = spliced(out, cached_images, cached_texts, j)
            contrastive = run.loss_fn(**features, positives=positives, memory=memory)
            local = torch.zeros((), device=run.device)
            if hidden is not None:
                local = mlm_term(run, out["mlm_logits"], token_chunks[j], hidden_chunks[j], count)
            if caption_ids is not None:
                feats = (out["image_features"], out["text_features"])
                local = local + proxy_term(run, *feats, id_chunks[j], len(caption_ids))
            local_total += local.detach()
            backward(run, contrastive + local)
    return contrastive.detach() + local_total


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
    params = [p for p in run.trained_parameters() if p.grad is not None]
    if run.cfg.train.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, run.cfg.train.grad_clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    return float(norm)


def wants_image_ids(cfg: Config) -> bool:
    """Whether batches carry their images' ids: soft targets and the feature memory use them."""
    return bool(cfg.train.soft_targets or cfg.train.feature_memory)


def batch_positives(
    run: TrainRun, tokens: torch.Tensor, image_ids: torch.Tensor | None
) -> torch.Tensor | None:
    """With ``train.soft_targets``, the pairs of the global batch that are positives of this
    rank's (same caption or same image); None without it or without duplicates."""
    if not run.cfg.train.soft_targets:
        return None
    ids = None if image_ids is None else image_ids.to(run.device)
    return positive_pairs(tokens, ids)


def train_step(
    run: TrainRun,
    images: torch.Tensor,
    captions: list[str],
    image_ids: torch.Tensor | None = None,
) -> tuple[float, float]:
    """One optimizer step on one global batch; returns (loss before the step, gradient norm).

    ``image_ids`` (B,) name each pair's image, so soft targets can tell two captions of one image
    apart from two images (without them only identical captions count as positives). With a
    second view (``views.two_views``) ``images`` are (2B, 3, S, S): the first views, then the
    second ones.
    A non-finite loss or gradient stops the run before the optimizer touches the weights, so the
    checkpoints on disk stay good (with fp16 the grad scaler skips such steps on its own).
    """
    # Which pairs are positives, and the memory's and proxies' keys, follow the whole captions;
    # the text tower reads them with words dropped (train.caption_word_dropout).
    whole = run.tokenizer(captions).to(run.device)
    shown = dropped_words(run, captions)
    tokens = whole if shown is captions else run.tokenizer(shown).to(run.device)
    if run.device.type == "cuda":
        # Page-locked host memory lets the copy overlap with the previous step's kernels.
        images = images.pin_memory()
    images = images.to(run.device, non_blocking=True)
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(run.step, run.total_steps, run.cfg)
    run.optimizer.zero_grad(set_to_none=True)
    positives = batch_positives(run, whole, image_ids)
    hidden = mlm_hidden(run, tokens)
    memory = None if run.memory is None else run.memory.columns(whole, image_ids)
    ids = None if run.proxies is None else run.proxies.ids(captions)
    if run.cfg.train.accum_steps > 1:
        loss = accumulated_backward(run, images, tokens, positives, hidden, memory, ids)
    else:
        loss = forward_loss(run, images, tokens, positives, hidden, memory, ids)
        backward(run, loss)
    average_head_gradients(run)
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
    if run.memory is not None:
        run.memory.commit()
    run.step += 1
    if run.ema is not None:
        run.ema.update(run.raw_model, run.step)
    return value, grad_norm
