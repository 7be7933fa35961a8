"""The two-tower model: encode_image and encode_text into one L2-normalized space."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from coembed.config import CLIP_INIT_LOGIT_SCALE, ModelConfig
from coembed.towers.image import ImageTower
from coembed.towers.text import TextTower


class CoEmbed(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = ImageTower(cfg.image, cfg.embed_dim)
        self.text = TextTower(cfg.text, cfg.embed_dim)
        # Temperature is learned in log space; clamp_logit_scale keeps exp(t) <= max_logit_scale.
        # A config that was never completed (no loss chosen) starts where CLIP starts.
        init = CLIP_INIT_LOGIT_SCALE if cfg.init_logit_scale is None else cfg.init_logit_scale
        self.logit_scale = nn.Parameter(torch.tensor(float(init)))
        self.logit_bias = None
        if cfg.init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.tensor(float(cfg.init_logit_bias)))

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, 3, S, S) -> (B, embed_dim), unit rows when ``normalize``."""
        features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, T) token ids -> (B, embed_dim), unit rows when ``normalize``."""
        features = self.text(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor, mlm_hidden: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Returns the loss's keyword arguments: ``loss(**model(images, tokens))``; with
        ``mlm_hidden`` (B, T) bool also ``mlm_logits`` (M, vocab), the masked language model's
        logits of the hidden tokens (inside forward, so DDP sees every use of the weights)."""
        out = {
            "image_features": self.encode_image(images),
            "text_features": self.encode_text(tokens),
            "logit_scale": self.logit_scale.exp(),
        }
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        if mlm_hidden is not None:
            out["mlm_logits"] = self.text.masked_token_logits(tokens, mlm_hidden)
        return out

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        self.logit_scale.clamp_(0, math.log(self.cfg.max_logit_scale))

    def lock_image(self, unlocked_groups: int = 0) -> None:
        self.visual.lock(unlocked_groups)

    def lock_text(self, unlocked_layers: int = 0) -> None:
        self.text.lock(unlocked_layers)
