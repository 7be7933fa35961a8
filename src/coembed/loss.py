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


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ClipLoss(nn.Module):
    """Symmetric InfoNCE: mean of image->text and text->image cross-entropy over the global batch."""

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        rank, world = _rank_and_world()
        all_images = gather_with_grad(image_features)
        all_texts = gather_with_grad(text_features)
        logits_per_image = logit_scale * image_features @ all_texts.T  # (B, W*B)
        logits_per_text = logit_scale * text_features @ all_images.T  # (B, W*B)
        if logit_bias is not None:
            logits_per_image = logits_per_image + logit_bias
            logits_per_text = logits_per_text + logit_bias
        B = image_features.shape[0]
        labels = torch.arange(B, device=image_features.device) + rank * B
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
        rank, world = _rank_and_world()
        all_texts = gather_with_grad(text_features)
        logits = logit_scale * image_features @ all_texts.T  # (B, W*B)
        if logit_bias is not None:
            logits = logits + logit_bias
        B = image_features.shape[0]
        # +1 on this rank's diagonal (the matching pairs), -1 everywhere else.
        labels = -torch.ones_like(logits)
        idx = torch.arange(B, device=logits.device)
        labels[idx, idx + rank * B] = 1.0
        return -F.logsigmoid(labels * logits).sum() / B


def make_loss(kind: str) -> nn.Module:
    from coembed.errors import ConfigError

    if kind == "clip":
        return ClipLoss()
    if kind == "siglip":
        return SigLipLoss()
    raise ConfigError(f"unknown loss {kind!r} (clip or siglip)")
