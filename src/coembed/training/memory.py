"""A cross-batch memory of features (``train.feature_memory``): more negatives at no extra step.

The contrastive loss tells each pair apart from the other pairs of its batch; a larger batch gives
more negatives but fewer steps per epoch. The memory keeps the image and text features of the
latest training pairs (detached, fp32) in a ring, and each step's loss takes them as extra columns:
an image is told apart from the memory's captions as well as its batch's, a caption from the
memory's images. Features drift as the weights change, so the memory holds only the last few
batches (Wang et al., "Cross-Batch Memory for Embedding Learning", 2020: the drift is slow once
the first steps are past).

A remembered pair with the row's own caption (compared by a hash of the token ids) or its own
image (the loader's image ids) is no negative of it: such columns are left out of the row. Every
process keeps the same memory of the whole global batch. The memory is checkpointed with the run,
so a resumed run is exact.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from coembed.config import Config
from coembed.loss import gather_ids

# Fixed odd multipliers of the caption hash: the same on every process and in every run.
_HASH_SEED = 0x5EED


def caption_keys(tokens: torch.Tensor) -> torch.Tensor:
    """(B, T) token ids -> (B,) int64 keys, equal for equal captions (a 64-bit polynomial hash,
    wrapping; two different captions collide with probability ~2^-64)."""
    return (tokens.long() * _hash_weights(tokens.shape[1], tokens.device)).sum(dim=1)


@lru_cache(maxsize=8)
def _hash_weights(length: int, device: torch.device) -> torch.Tensor:
    """The hash's ``length`` odd int64 multipliers on ``device``, drawn once."""
    generator = torch.Generator().manual_seed(_HASH_SEED)
    weights = torch.randint(1, 2**62, (length,), generator=generator) * 2 + 1
    return weights.to(device)


def memory_for(cfg: Config, device: torch.device) -> FeatureMemory | None:
    """The memory ``train.feature_memory`` asks for, empty; None without it."""
    size = cfg.train.feature_memory
    return FeatureMemory(size, cfg.model.embed_dim, device) if size else None


class FeatureMemory:
    """A ring of the latest ``size`` pairs' image and text features, caption keys and image ids."""

    def __init__(self, size: int, dim: int, device: torch.device) -> None:
        self.size = size
        self.images = torch.zeros(size, dim, device=device)
        self.texts = torch.zeros(size, dim, device=device)
        self.keys = torch.zeros(size, dtype=torch.long, device=device)
        self.image_ids = torch.full((size,), -1, dtype=torch.long, device=device)  # -1: unknown
        self.filled = 0  # entries written so far, up to size
        self.next = 0  # where the next entry goes
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None  # (keys, image ids)
        self._staged: tuple[torch.Tensor, ...] | None = None

    def columns(
        self, tokens: torch.Tensor, image_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The memory as extra loss columns for this rank's batch, captions ``tokens`` (B, T) and
        images ``image_ids`` (B,) (None: unknown): (images (M, D), texts (M, D), blocked (B, M)
        bool, True where a remembered pair has the row's caption or image); None while the
        memory is empty. The batch is noted for ``stage``."""
        keys = caption_keys(tokens)
        if image_ids is None:
            ids = torch.full_like(keys, -1)
        else:
            ids = image_ids.to(device=keys.device, dtype=torch.long)
        self._batch = (keys, ids)
        if self.filled == 0:
            return None
        blocked = keys[:, None] == self.keys[None, : self.filled]
        known = ids[:, None] >= 0
        blocked |= known & (ids[:, None] == self.image_ids[None, : self.filled])
        return self.images[: self.filled], self.texts[: self.filled], blocked

    def stage(self, images: torch.Tensor, texts: torch.Tensor) -> None:
        """Hold this rank's batch (features (B, D) of the batch ``columns`` was last given) for
        ``commit``: the whole global batch, gathered from every process, detached."""
        keys, ids = self._batch
        features = (gather_ids(x.detach().float()) for x in (images, texts))
        self._staged = (*features, gather_ids(keys), gather_ids(ids))

    def commit(self) -> None:
        """Write the staged batch into the ring (after the optimizer step: the loss that read the
        memory has been differentiated by then). The newest entries win when a batch is larger
        than the memory."""
        if self._staged is None:
            return
        images, texts, keys, ids = (x[-self.size :] for x in self._staged)
        self._staged = None
        n = images.shape[0]
        rows = (torch.arange(n, device=self.keys.device) + self.next) % self.size
        self.images[rows], self.texts[rows], self.keys[rows] = images, texts, keys
        self.image_ids[rows] = ids
        self.next = (self.next + n) % self.size
        self.filled = min(self.filled + n, self.size)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The ring as tensors, for a checkpoint."""
        counters = torch.tensor([self.filled, self.next], dtype=torch.long)
        return {
            "images": self.images.cpu(),
            "texts": self.texts.cpu(),
            "keys": self.keys.cpu(),
            "image_ids": self.image_ids.cpu(),
            "counters": counters,
        }

    def load_state_dict(self, state: dict[str, torch.Tensor], where: str) -> None:
        """Put back what ``state_dict`` saved; ValueError naming ``where`` when it does not fit
        this memory (another size or width)."""
        dim = self.images.shape[1]
        shapes = {"images": (self.size, dim), "texts": (self.size, dim), "keys": (self.size,)}
        shapes |= {"image_ids": (self.size,), "counters": (2,)}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if got != shapes:
            raise ValueError(f"{where}: a memory of shapes {got}, the run keeps {shapes}")
        filled, nxt = (int(v) for v in state["counters"])
        if not (0 <= filled <= self.size and 0 <= nxt < self.size):
            raise ValueError(f"{where}: counters {filled}, {nxt} outside a memory of {self.size}")
        device = self.keys.device
        self.images = state["images"].float().to(device)
        self.texts = state["texts"].float().to(device)
        self.keys = state["keys"].long().to(device)
        self.image_ids = state["image_ids"].long().to(device)
        self.filled, self.next = filled, nxt
