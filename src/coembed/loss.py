"""Contrastive losses: symmetric InfoNCE (CLIP) and sigmoid (SigLIP), across processes.

With several processes every rank all-gathers the features of all ranks *with gradient*, so each
sees the whole global batch as negatives. Each rank's loss covers its own rows against all
columns; the mean over ranks (what DDP's gradient averaging applies) is exactly the loss of one
process on the whole batch.

Soft targets (``positive_pairs``): a batch may hold one caption twice, or one image with two of its
captions. Such pairs are positives of each other, not negatives: a row's target spreads uniformly
over all its positives (the sigmoid loss labels them all +1). Label smoothing mixes the softmax
loss's targets with the uniform distribution over the global batch.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from coembed.config import TrainConfig


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0; gradients flow back to each rank's part."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x), dim=0)


def gather_ids(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, without gradient: ids, or features kept
    apart from their graph (the feature memory's)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def positive_pairs(tokens: torch.Tensor, image_ids: torch.Tensor | None) -> torch.Tensor | None:
    """Which pairs of the global batch are positives of this rank's pairs: (B, W*B) bool, True
    where the captions are the same token ids or the images the same image id; None when every
    pair is its own only positive (the plain targets are then exact).

    ``tokens`` (B, T) are this rank's captions; ``image_ids`` (B,) its images' ids, or None to
    match captions alone.
    """
    B = tokens.shape[0]
    all_tokens = gather_ids(tokens)  # (W*B, T)
    # One id per distinct caption: comparing (W*B,) ids, not (B, W*B, T) tokens.
    caption_ids = torch.unique(all_tokens, dim=0, return_inverse=True)[1]  # (W*B,)
    mine = slice(_rank() * B, (_rank() + 1) * B)
    same = caption_ids[mine, None] == caption_ids[None, :]  # (B, W*B)
    if image_ids is not None:
        all_images = gather_ids(image_ids)  # (W*B,)
        same |= all_images[mine, None] == all_images[None, :]
    return same if bool((same.sum(dim=1) > 1).any()) else None


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _logits(
    rows: torch.Tensor, others: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Scaled similarities of this rank's ``rows`` (B, D) to every rank's ``others``: (B, W*B)."""
    logits = scale * rows @ gather_with_grad(others).T
    return logits if bias is None else logits + bias


def _with_memory(
    logits: torch.Tensor,
    rows: torch.Tensor,
    remembered: torch.Tensor,
    blocked: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``logits`` (B, W*B) with the scaled similarities of ``rows`` to the ``remembered`` features
    (M, D) appended as columns, the ``blocked`` (B, M) ones at -1e9: (B, W*B + M)."""
    extra = scale * rows @ remembered.T
    if bias is not None:
        extra = extra + bias
    # A large finite logit, not -inf: its softmax share is exactly 0 and a soft target's 0 times
    # its log-probability stays 0 (not NaN).
    extra = extra.masked_fill(blocked, -1e9)
    return torch.cat([logits, extra], dim=1)


class ClipLoss(nn.Module):
    """Symmetric InfoNCE: mean of image->text and text->image cross-entropy over the global batch.

    ``label_smoothing`` mixes each row's target with the uniform distribution over the global
    batch's columns (``torch.nn.functional.cross_entropy``'s rule).
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        positives: torch.Tensor | None = None,
        memory: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The loss; ``positives`` (B, W*B) bool from ``positive_pairs`` spreads each row's target
        over its positives (None: the matching pair alone). ``memory`` (images (M, D), texts
        (M, D), blocked (B, M) bool), from ``coembed.training.memory.FeatureMemory.columns``, adds
        M negative columns to each direction, leaving out the blocked ones."""
        logits_per_image = _logits(image_features, text_features, logit_scale, logit_bias)
        logits_per_text = _logits(text_features, image_features, logit_scale, logit_bias)
        if memory is not None:
            images, texts, blocked = memory
            scalars = (logit_scale, logit_bias)
            logits_per_image = _with_memory(
                logits_per_image, image_features, texts, blocked, *scalars
            )
            logits_per_text = _with_memory(
                logits_per_text, text_features, images, blocked, *scalars
            )
        if positives is None:
            B = image_features.shape[0]
            targets = torch.arange(B, device=image_features.device) + _rank() * B
        else:
            # The relation is symmetric: text j is a positive of image i exactly when image j
            # is a positive of text i, so both directions share one target distribution.
            share = positives.to(logits_per_image.dtype)
            targets = share / share.sum(dim=1, keepdim=True)  # (B, W*B)
            # The memory's columns are never targets.
            targets = F.pad(targets, (0, logits_per_image.shape[1] - targets.shape[1]))
        smoothing = self.label_smoothing
        return (
            F.cross_entropy(logits_per_image, targets, label_smoothing=smoothing)
            + F.cross_entropy(logits_per_text, targets, label_smoothing=smoothing)
        ) / 2


class SigLipLoss(nn.Module):
    """Sigmoid loss: every (image, text) pair is a binary match / no-match decision."""

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        positives: torch.Tensor | None = None,
        memory: tuple[torch.Tensor, ...] | None = None,
    ) -> torch.Tensor:
        """The loss; ``positives`` (B, W*B) bool from ``positive_pairs`` are labelled +1 (None:
        the matching pairs alone). No feature memory: ``coembed.config`` refuses it with this
        loss, whose per-pair terms do not normalize over columns."""
        if memory is not None:
            raise ValueError("the sigmoid loss takes no feature memory (train.feature_memory)")
        logits = _logits(image_features, text_features, logit_scale, logit_bias)
        B = image_features.shape[0]
        if positives is None:
            # +1 on this rank's diagonal (the matching pairs), -1 everywhere else.
            labels = -torch.ones_like(logits)
            idx = torch.arange(B, device=logits.device)
            labels[idx, idx + _rank() * B] = 1.0
        else:
            labels = positives.to(logits.dtype) * 2 - 1
        return -F.logsigmoid(labels * logits).sum() / B


def nt_xent(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent of two views' projections ``first`` and ``second`` (B, D) of this rank's
    images: each of the 2B rows must pick its other view among the 2*W*B views of the global batch
    (itself left out), at cosine similarity / ``temperature``; the mean over the rows."""
    B = first.shape[0]
    first, second = F.normalize(first, dim=-1), F.normalize(second, dim=-1)
    every_first, every_second = gather_with_grad(first), gather_with_grad(second)  # (N=W*B, D)
    N = every_first.shape[0]
    rows = torch.cat([first, second])  # (2B, D)
    columns = torch.cat([every_first, every_second])  # (2N, D)
    logits = rows @ columns.T / temperature  # (2B, 2N)
    mine = torch.arange(B, device=first.device) + _rank() * B  # this rank's images among N
    own = torch.cat([mine, mine + N])  # (2B,) each row's own column
    itself = torch.zeros_like(logits, dtype=torch.bool)
    itself[torch.arange(2 * B, device=first.device), own] = True
    targets = torch.cat([mine + N, mine])  # the other view of the same image
    return F.cross_entropy(logits.masked_fill(itself, float("-inf")), targets)


def image_supcon(
    image_features: torch.Tensor, positives: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    """Supervised contrast between images (SupCon's L_out): each of this rank's images picks the
    other images of the global batch it is a positive of (the same caption or the same picture,
    ``positive_pairs``) among all the batch's images but itself, at cosine similarity /
    ``temperature``. Summed over the rows that have such an image and divided by all B rows, so
    the mean over ranks is one process's loss on the whole batch; 0 when no row has one.

    ``image_features`` (B, D) are L2-normalized; ``positives`` (B, W*B) bool or None.
    """
    if positives is None:
        return image_features.sum() * 0.0  # no pair of the batch shares a caption or picture
    B = image_features.shape[0]
    logits = image_features @ gather_with_grad(image_features).T / temperature  # (B, W*B)
    rows = torch.arange(B, device=logits.device)
    itself = torch.zeros_like(positives)
    itself[rows, rows + _rank() * B] = True
    others = positives & ~itself
    counts = others.sum(dim=1)  # (B,) each row's positives
    logits = logits.masked_fill(itself, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    # Mean log-probability over each row's positives (the -inf diagonal is never selected).
    picked = torch.where(others, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    has = counts > 0
    return -(picked[has] / counts[has]).sum() / B


def cyclic_consistency(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """CyCLIP's two consistency terms (Goel et al., 2022): the similarity of image i to image j
    should equal that of text i to text j (in-modal), and image i to text j that of text i to
    image j (cross-modal). Squared differences of cosine similarities, each of this rank's rows
    summed over the global batch's columns, then averaged over rows, the two terms added.

    The mean over ranks is one process's term on the whole batch, as for the contrastive loss.
    ``image_features`` and ``text_features`` (B, D) are L2-normalized. Computed in float64: the
    terms are differences of nearly equal similarities, and Adam amplifies their float32
    rounding (two processes and one with accumulation drifted apart by 1e-4 in four steps).
    """
    images, texts = image_features.double(), text_features.double()
    all_images, all_texts = gather_with_grad(images), gather_with_grad(texts)  # (W*B, D)
    in_modal = images @ all_images.T - texts @ all_texts.T  # (B, W*B)
    cross_modal = images @ all_texts.T - texts @ all_images.T
    return (in_modal.square().sum(dim=1) + cross_modal.square().sum(dim=1)).mean().float()


class WithTerms(nn.Module):
    """A contrastive loss plus weighted terms of the same features: ``terms`` pairs a weight
    with a function of (image features, text features, positives), e.g. the images' supervised
    contrast (``train.image_supcon_weight``) or CyCLIP's consistency (``train.cyclic_weight``)."""

    def __init__(self, loss: nn.Module, terms: list[tuple[float, Callable]]) -> None:
        super().__init__()
        self.loss, self.terms = loss, terms

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        positives: torch.Tensor | None = None,
        memory: tuple[torch.Tensor, ...] | None = None,
    ) -> torch.Tensor:
        """The wrapped loss of the same arguments, plus the weighted terms."""
        total = self.loss(image_features, text_features, logit_scale, logit_bias, positives, memory)
        for weight, term in self.terms:
            total = total + weight * term(image_features, text_features, positives)
        return total


def make_loss(
    kind: str,
    label_smoothing: float = 0.0,
    image_supcon_weight: float = 0.0,
    image_supcon_temperature: float = 0.1,
    cyclic_weight: float = 0.0,
) -> nn.Module:
    """The contrastive loss named ``kind`` (clip or siglip); label smoothing is the softmax
    loss's alone. With ``image_supcon_weight`` the images' supervised contrast is added, with
    ``cyclic_weight`` CyCLIP's consistency terms."""
    from coembed.errors import ConfigError

    if kind == "clip":
        loss: nn.Module = ClipLoss(label_smoothing)
    elif kind == "siglip":
        if label_smoothing:
            raise ConfigError("label smoothing applies to the softmax loss (clip), not siglip")
        loss = SigLipLoss()
    else:
        raise ConfigError(f"unknown loss {kind!r} (clip or siglip)")
    terms: list[tuple[float, Callable]] = []
    if image_supcon_weight:
        supcon = partial(image_supcon, temperature=image_supcon_temperature)
        terms.append((image_supcon_weight, lambda images, _texts, pos: supcon(images, pos)))
    if cyclic_weight:
        terms.append((cyclic_weight, lambda images, texts, _pos: cyclic_consistency(images, texts)))
    return WithTerms(loss, terms) if terms else loss


def loss_of(train: TrainConfig) -> nn.Module:
    """The training loss a run's ``train`` settings ask for."""
    return make_loss(
        train.loss,
        train.label_smoothing,
        train.image_supcon_weight,
        train.image_supcon_temperature,
        train.cyclic_weight,
    )
