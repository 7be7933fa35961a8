"""Caption proxies (``train.caption_proxy_weight``): every caption against all the data's captions.

The contrastive loss tells a pair apart from the other pairs of its batch: 127 negatives at the
tiny recipe's batch, out of the thousands of captions a data set holds. Here every caption
that several pairs share has a learned vector, its proxy, and both towers' features of a pair are
classified among all the proxies (a softmax at ``train.caption_proxy_temperature`` over cosine
similarities): each image and each caption is told apart from every other caption of the data at
every step, for one (B, D) x (D, C) product. This is the proxy / normalized-softmax loss of metric
learning (Movshovitz-Attias et al. 2017, "No Fuss Distance Metric Learning using Proxies"; Zhai
and Wu 2018, "Classification is a Strong Baseline for Deep Metric Learning"), and a caption used as
a class label as in UniCL (Yang et al. 2022). Unlike a memory of past features, the proxies are
trained with the model and never go stale.

Only captions that two or more pairs share (``train.caption_proxy_min_pairs``) get a proxy: one
named thing in several pictures, as the same icon name drawn by several artists. Each row's term
is its own (no row sees another), so it is a mean over the batch's rows: under
gradient accumulation each micro-batch adds its rows' share, and the processes of a DDP run
average their rows' terms as they do the model's gradients. The proxies are trained and
checkpointed with the run but are no part of the saved model.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from coembed.config import Config
from coembed.errors import DataError

# Proxies cost C x D floats, and Adam keeps two more of each.
MAX_PROXIES = 1_000_000


def captions_digest(captions: Sequence[str]) -> str:
    """A short digest of the sorted distinct captions the proxies stand for."""
    h = hashlib.blake2b(digest_size=16)
    for caption in captions:
        h.update(caption.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


class CaptionProxies(nn.Module):
    """One learned vector per distinct caption that at least ``min_pairs`` training pairs share.

    A caption of one picture alone is no class: its proxy could only memorize that pair, which
    the contrastive loss already does (on the shipped synthetic captions, nearly all distinct,
    proxies for every caption made validation recall fall from 0.48 to 0.13 while the training
    loss kept falling). Its pairs get no proxy term, and its caption is no proxy's.
    """

    def __init__(self, captions: Sequence[str], dim: int, min_pairs: int = 2) -> None:
        super().__init__()
        counts = Counter(captions)
        self.captions = sorted(c for c, n in counts.items() if n >= min_pairs)
        if len(self.captions) > MAX_PROXIES:
            raise DataError(
                f"train.caption_proxy_weight gives each distinct caption a vector; the training "
                f"data has {len(self.captions):,} (more than {MAX_PROXIES:,}): use "
                "train.caption_proxy_weight=0 for data this size"
            )
        self.index = {caption: i for i, caption in enumerate(self.captions)}
        self.digest = captions_digest(self.captions)
        # Drawn from a generator of its own: the model's initial weights stay those of the seed.
        generator = torch.Generator().manual_seed(len(self.captions))
        self.weight = nn.Parameter(torch.randn(len(self.captions), dim, generator=generator))

    def ids(self, captions: Sequence[str]) -> torch.Tensor:
        """(B,) int64: each caption's row, or -1 for a caption without a proxy."""
        return torch.tensor([self.index.get(c, -1) for c in captions], dtype=torch.long)

    def summed_term(
        self, features: Sequence[torch.Tensor], ids: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        """Sum over the rows with a proxy (``ids`` not -1) of the mean over ``features`` (each
        (B, D), L2-normalized: the image and the text features) of the cross-entropy of picking
        the row's own proxy among all of them, at cosine similarity / ``temperature``."""
        if not self.captions:  # no caption names two pairs: nothing to classify
            return sum(f.sum() for f in features) * 0.0
        proxies = F.normalize(self.weight, dim=-1)
        terms = [
            F.cross_entropy(f @ proxies.T / temperature, ids, reduction="sum", ignore_index=-1)
            for f in features
        ]
        return sum(terms) / len(terms)


def proxies_for(
    cfg: Config, captions: Sequence[str], device: torch.device, optimizer: torch.optim.Optimizer
) -> CaptionProxies | None:
    """With ``train.caption_proxy_weight``, the proxies of the training ``captions``, added to
    ``optimizer`` as a group of their own (no weight decay: only their directions count); None
    without it."""
    if not cfg.train.caption_proxy_weight:
        return None
    train = cfg.train
    proxies = CaptionProxies(captions, cfg.model.embed_dim, train.caption_proxy_min_pairs)
    proxies = proxies.to(device)
    optimizer.add_param_group({"params": [proxies.weight], "weight_decay": 0.0})
    return proxies
