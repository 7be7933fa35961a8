"""An exponential moving average of the weights (``train.ema_decay``), kept in fp32.

After optimizer step t (counting from 1) every floating-point weight moves towards the model's:
``ema = d_t * ema + (1 - d_t) * weight`` with ``d_t = min(decay, (1 + t) / (10 + t))``, the
warm-up of TensorFlow's ExponentialMovingAverage, so that the average forgets the random start
within tens of steps instead of thousands. Buffers (BatchNorm's running statistics) are copied, not
averaged. The average is what validation scores and what the run folder's model directory holds.
"""

from __future__ import annotations

import copy

import torch

from coembed.model import CoEmbed


def ema_decay_at(decay: float, step: int) -> float:
    """The decay used by the update after optimizer step ``step`` (1-based), warm-up included."""
    return min(decay, (1 + step) / (10 + step))


class WeightAverage:
    """The moving average of ``model``'s weights: ``self.model`` is an fp32 copy in eval mode."""

    def __init__(self, model: CoEmbed, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).float().eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: CoEmbed, step: int) -> None:
        """Move the average towards ``model``'s weights after optimizer step ``step``."""
        weight = 1 - ema_decay_at(self.decay, step)
        for mine, theirs in zip(self.model.parameters(), model.parameters()):
            mine.lerp_(theirs.detach().float(), weight)  # ema += weight * (weight_now - ema)
        for mine, theirs in zip(self.model.buffers(), model.buffers()):
            mine.copy_(theirs)
