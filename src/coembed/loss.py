"""Contrastive losses: symmetric InfoNCE (CLIP) and sigmoid (SigLIP), across processes.

With several processes every rank all-gathers the features of all ranks *with gradient*, so each
sees the whole global batch as negatives. Each rank's loss covers its own rows against all
columns; the mean over ranks (what DDP's gradient averaging applies) is exactly the loss of one
process on the whole batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0; gradients flow back to each rank's part."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x), dim=0)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _logits(
    rows: torch.Tensor, others: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Scaled similarities of this rank's ``rows`` (B, D) to every rank's ``others``: (B, W*B)."""
    logits = scale * rows @ gather_with_grad(others).T
    return logits if bias is None else logits + bias


class ClipLoss(nn.Module):
    """Symmetric InfoNCE: mean of image->text and text->image cross-entropy over the global batch."""

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        logits_per_image = _logits(image_features, text_features, logit_scale, logit_bias)
        logits_per_text = _logits(text_features, image_features, logit_scale, logit_bias)
        B = image_features.shape[0]
        labels = torch.arange(B, device=image_features.device) + _rank() * B
        return (
            F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)
        ) / 2


class SigLipLoss(nn.Module):
    """Sigmoid loss: every (image, text) pair is a binary match / no-match decision."""

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        logits = _logits(image_features, text_features, logit_scale, logit_bias)
        B = image_features.shape[0]
        # +1 on this rank's diagonal (the matching pairs), -1 everywhere else.
        labels = -torch.ones_like(logits)
        idx = torch.arange(B, device=logits.device)
        labels[idx, idx + _rank() * B] = 1.0
        return -F.logsigmoid(labels * logits).sum() / B


def make_loss(kind: str) -> nn.Module:
    from coembed.errors import ConfigError

    if kind == "clip":
        return ClipLoss()
    if kind == "siglip":
        return SigLipLoss()
    raise ConfigError(f"unknown loss {kind!r} (clip or siglip)")
