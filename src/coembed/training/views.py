"""Image self-supervision on a second augmented view of each training image.

``train.simclr_weight`` (SLIP): both views go through the image tower, a small projection head
maps each view's embedding, and SimCLR's NT-Xent (``coembed.loss.nt_xent``) pulls the two views of
an image together against every other view of the global batch. ``train.multiview`` (DeCLIP): the
second view is also contrasted with the caption. Both share the one second view, which the loader
draws after the first (``PairData.epoch_batches(second_view=True)``) and stacks below it: a batch of
B pairs comes with (2B, 3, S, S) images.

The head lives in the ``TrainRun``, not in ``CoEmbed``: it is trained and checkpointed with the
run (for an exact resume) but is no part of the model that embeds, is saved or is exported.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from coembed.config import Config
from coembed.loss import nt_xent
from coembed.training.run import TrainRun


def two_views(cfg: Config) -> bool:
    """Whether the run trains on a second view of each image."""
    return bool(cfg.train.simclr_weight or cfg.train.multiview)


class ViewHead(nn.Module):
    """SLIP's image projection head, two layers: embedding -> hidden -> ReLU -> projection."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) image embeddings -> (B, D) projections for NT-Xent."""
        return self.out(torch.relu(self.hidden(features)))


def view_head_for(cfg: Config) -> ViewHead | None:
    """The projection head ``train.simclr_weight`` trains (drawing its initial weights from
    torch's generator), None without it."""
    return ViewHead(cfg.model.embed_dim) if cfg.train.simclr_weight else None


def simclr_term(run: TrainRun, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``train.simclr_weight`` x NT-Xent of the two views' projections; ``first`` and ``second``
    are the views' (B, D) image embeddings."""
    head, train = run.view_head, run.cfg.train
    loss = nt_xent(head(first), head(second), train.simclr_temperature)
    return train.simclr_weight * loss


def two_view_loss(
    run: TrainRun,
    out: dict[str, torch.Tensor],
    positives: torch.Tensor | None,
    memory: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """The loss of a batch whose images hold both views (``out`` the model's fp32 output on
    (2B) images and B captions): contrastive on the first view (with ``train.multiview`` the mean
    of both views' contrastive losses; each with the feature memory's columns), plus the
    weighted NT-Xent with ``train.simclr_weight``."""
    first, second = out.pop("image_features").chunk(2)  # (B, D) each
    loss = run.loss_fn(first, **out, positives=positives, memory=memory)
    if run.cfg.train.multiview:
        loss = (loss + run.loss_fn(second, **out, positives=positives, memory=memory)) / 2
    if run.cfg.train.simclr_weight:
        loss = loss + simclr_term(run, first, second)
    return loss


def average_head_gradients(run: TrainRun) -> None:
    """Average the gradients of the run's heads (the projection head, the caption proxies) over
    the ranks, as DDP does the model's: they are outside DDP's module, and each rank's terms
    cover its own rows."""
    if run.dist.world == 1:
        return
    for p in (p for head in run.heads() for p in head.parameters()):
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= run.dist.world
