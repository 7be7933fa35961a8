"""The packed text path under mixed precision: projections in half precision, residuals in fp32.

CUDA autocast runs the linear layers in fp16/bf16 while the residual stream stays fp32, and it
does not promote ``index_copy``; CPU autocast does promote it, which hid the mismatch. These
tests force the same dtype mix on the CPU without autocast, so they fail where CUDA would.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers import tiny_clip_model


class HalfOutput(nn.Module):
    """Wrap a layer so it computes and returns bf16 whatever its input, as autocast would."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.to(torch.bfloat16))


def captions_of_different_lengths(eot_id: int) -> torch.Tensor:
    tokens = torch.zeros(3, 16, dtype=torch.long)
    for row, length in enumerate((4, 9, 6)):
        tokens[row, 1:length] = torch.arange(5, 4 + length)
        tokens[row, length] = eot_id
    return tokens


def test_packed_text_path_keeps_the_projection_dtype():
    model = tiny_clip_model()
    tower = model.text
    # Every linear layer (and the final LayerNorm) in half precision, the residuals in fp32.
    for parent in list(tower.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) or child is tower.ln_final:
                setattr(parent, name, HalfOutput(child))
    tokens = captions_of_different_lengths(model.cfg.text.eot_id)
    features = tower(tokens)  # packed: the rows are shorter than the longest caption
    assert features.dtype == torch.bfloat16
    assert torch.isfinite(features.float()).all()
    features.float().sum().backward()
    assert all(b.attn.qkv.layer.weight.grad is not None for b in tower.blocks)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
        ),
    ],
)
def test_packed_text_path_matches_unpacked_under_autocast(device):
    model = tiny_clip_model().to(device)
    tokens = captions_of_different_lengths(model.cfg.text.eot_id).to(device)
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    with torch.autocast(device, dtype=dtype):
        packed = model.encode_text(tokens).float()
        # One caption at a time: no row is shorter than the longest, so nothing is packed.
        alone = torch.cat([model.encode_text(tokens[i : i + 1]) for i in range(3)]).float()
    # Half precision rounds differently in the two layouts: 2e-2 on unit vectors.
    assert torch.allclose(packed, alone, atol=2e-2), (packed - alone).abs().max()
