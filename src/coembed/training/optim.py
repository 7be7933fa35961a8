"""The optimizer and the learning-rate schedule, and the optimizer's state as stored in a checkpoint."""

from __future__ import annotations

import math

import torch
from torch import nn

from coembed.config import CHOICES, Config
from coembed.errors import UsageError

# Weight decay applies to the weights of these layers only: the matrices and kernels that map
# one activation to the next. Everything else is left alone: biases, norm gains, ConvNeXt's
# layer-scale gains (shape (C, 1, 1): they multiply a branch the way a norm gain does, and
# shrinking them shrinks the whole residual branch), learned positional embeddings and the
# logit temperature and bias.
# Token and positional embeddings (open_clip decays both): the token table is decayed, as in
# CLIP and open_clip, because it is the weight of a linear map on one-hot tokens. The positional
# embeddings (the text tower's and the attention pool's) are not, as timm leaves ViT's pos_embed:
# they are an offset added to every input at a position, a bias rather than a map, and decay
# pulls them towards zero, towards a tower that cannot tell positions apart.
DECAYED_LAYERS = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)


def decayed_names(model: nn.Module) -> set[str]:
    """Names of the parameters weight decay applies to (the weights of ``DECAYED_LAYERS``)."""
    return {
        f"{prefix}.weight" if prefix else "weight"
        for prefix, module in model.named_modules()
        if isinstance(module, DECAYED_LAYERS) and isinstance(module.weight, nn.Parameter)
    }


def make_optimizer(
    model: nn.Module, cfg: Config, head: nn.Module | None = None
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (the model's, then ``head``'s: the projection head of
    ``coembed.training.views``), weight decay only on ``decayed_names``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise UsageError("nothing to train: both towers are locked")
    decayed = decayed_names(model)
    if head is not None:
        named += [(f"view_head.{n}", p) for n, p in head.named_parameters()]
        decayed |= {f"view_head.{n}" for n in decayed_names(head)}
    groups = [
        {"params": [p for n, p in named if n in decayed], "weight_decay": cfg.train.weight_decay},
        {"params": [p for n, p in named if n not in decayed], "weight_decay": 0.0},
    ]
    t = cfg.train
    settings = {"lr": t.lr, "betas": (t.beta1, t.beta2), "eps": t.eps}
    # Fused AdamW updates each parameter in one vectorized pass, on CUDA and (torch >= 2.4) on
    # the CPU too, where the foreach path allocates and faults in temporaries for every
    # intermediate: on 2 cores the step over the tiny recipe's 12.4M parameters (CLIP vocabulary)
    # took 13 ms fused against 37 ms foreach.
    try:
        return torch.optim.AdamW(groups, fused=True, **settings)
    except (RuntimeError, TypeError):  # an older torch without a fused kernel for this device
        return torch.optim.AdamW(groups, foreach=True, **settings)


def total_steps_for(cfg: Config, batches_per_epoch: int) -> int:
    """The schedule's length: ``train.steps``, else ``train.epochs`` passes over the data."""
    if cfg.train.steps > 0:
        return cfg.train.steps
    if cfg.train.epochs > 0:
        return cfg.train.epochs * batches_per_epoch
    raise UsageError(
        "say how long to train: --steps N or --epochs N (or train.steps/epochs in the config)"
    )


def learning_rate(step: int, total: int, cfg: Config) -> float:
    """Linear warmup to the peak, then ``train.schedule``: cosine decay to zero at ``total``,
    constant, or constant then a linear cooldown to zero over the last ``cooldown_steps``."""
    t = cfg.train
    warmup = min(t.warmup_steps, max(total - 1, 0))
    if step < warmup:
        return t.lr * (step + 1) / warmup
    if t.schedule == "constant":
        return t.lr
    if t.schedule == "const-cooldown":
        start = max(total - t.cooldown_steps, warmup)
        return t.lr if step < start else t.lr * (1 - (step - start) / max(total - start, 1))
    if t.schedule != "cosine":
        allowed = ", ".join(CHOICES["train.schedule"])
        raise UsageError(f"train.schedule: {t.schedule!r} is not one of {allowed}")
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * t.lr * (1 + math.cos(math.pi * min(progress, 1.0)))


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and the JSON-able rest."""
    state = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, slots in state["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    """Load what ``optimizer_tensors`` split apart back into ``opt``."""
    params = [p for group in opt.param_groups for p in group["params"]]
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = name.split(".", 1)
        param = params[int(idx)] if int(idx) < len(params) else None
        if torch.is_tensor(value) and param is not None and value.shape == param.shape:
            # Moments take their parameter's memory layout back (channels_last convolution
            # weights): safetensors stores them contiguous, and the fused kernel pairs the
            # elements of a parameter, its gradient and its moments by position in memory.
            value = torch.empty_like(param, dtype=value.dtype).copy_(value)
        state.setdefault(int(idx), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
