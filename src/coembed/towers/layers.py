"""Reusable layers of both towers: positional encodings, attention, MLP, blocks, pooling."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from coembed.errors import ConfigError


def eager() -> bool:
    """False while tracing, exporting to ONNX or compiling: those want static, plain graphs."""
    return not (
        torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()
    )


class _HalvingAvgPool(torch.autograd.Function):
    """2x2 average pooling with stride 2 whose backward is one broadcast copy.

    The gradient of each output pixel is spread evenly over its 2x2 window, so for even sizes
    the input gradient is the output gradient / 4 repeated twice along each axis. ATen's
    ``avg_pool2d_backward`` zero-fills the input gradient and accumulates window by window:
    on a 2-core CPU it took 2x as long as this on the stem's activations (128 x 32 x 32 x 32,
    channels_last), and ModifiedResNet runs it 7 times a step.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        B, C, h, w = grad.shape
        grad = grad * 0.25
        if grad.is_contiguous(memory_format=torch.channels_last) and not grad.is_contiguous():
            nhwc = grad.permute(0, 2, 3, 1)[:, :, None, :, None, :].expand(B, h, 2, w, 2, C)
            return nhwc.reshape(B, 2 * h, 2 * w, C).permute(0, 3, 1, 2)  # channels_last
        return grad[:, :, :, None, :, None].expand(B, C, h, 2, w, 2).reshape(B, C, 2 * h, 2 * w)


class HalvingAvgPool(nn.Module):
    """``nn.AvgPool2d(2)`` (kernel 2, stride 2) with a faster backward for even sizes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        if x.requires_grad and torch.is_grad_enabled() and H % 2 == 0 and W % 2 == 0 and eager():
            return _HalvingAvgPool.apply(x)
        return F.avg_pool2d(x, 2)


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU that OpenAI's CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "quick_gelu":
        return QuickGELU()
    raise ConfigError(f"unknown activation {name!r} (gelu or quick_gelu)")


class LearnedPositional(nn.Module):
    """One learned vector per position, added to the token embeddings."""

    def __init__(self, length: int, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(length, width))
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight[: x.shape[1]]


def sinusoidal_table(length: int, width: int) -> torch.Tensor:
    """The fixed (length, width) table of "Attention is all you need": sin on even, cos on odd dims."""
    position = torch.arange(length, dtype=torch.float64)[:, None]
    frequency = torch.exp(
        torch.arange(0, width, 2, dtype=torch.float64) * (-math.log(10000.0) / width)
    )
    table = torch.zeros(length, width, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table.float()


class SinusoidalPositional(nn.Module):
    """Fixed sin/cos positions; a non-persistent buffer, so it never enters a checkpoint."""

    def __init__(self, length: int, width: int):
        super().__init__()
        self.register_buffer("table", sinusoidal_table(length, width), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.table[: x.shape[1]].to(x.dtype)


def positional_encoding(kind: str, length: int, width: int) -> nn.Module:
    if kind == "learned":
        return LearnedPositional(length, width)
    if kind == "sinusoidal":
        return SinusoidalPositional(length, width)
    raise ConfigError(f"unknown positional encoding {kind!r} (learned or sinusoidal)")


class SelfAttention(nn.Module):
    """Multi-head self-attention on torch's scaled_dot_product_attention."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        # q, k, v: (B, nh, T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and mask is None
        )
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.out(y)

    def forward_packed(
        self, x: torch.Tensor, rows: torch.Tensor, B: int, T: int, mask, causal: bool
    ) -> torch.Tensor:
        """Attention over packed tokens: ``x`` (N, C) holds rows ``rows`` of the (B*T, C) batch.

        The projections run on the N real tokens only; attention itself runs on the padded
        (B, T) layout, where the missing positions are zeros that no real token attends to
        (they lie after every real token of their row, behind the causal or padding mask).
        """
        C = x.shape[1]
        projected = self.qkv(x)  # (N, 3C)
        # The buffer takes the projection's dtype, not the input's: under CUDA autocast the
        # projection is half precision while x stays fp32, and index_copy does not promote.
        qkv = projected.new_zeros(B * T, 3 * C).index_copy(0, rows, projected)  # (B*T, 3C)
        q, k, v = qkv.view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and mask is None
        )
        y = y.transpose(1, 2).reshape(B * T, C).index_select(0, rows)  # (N, C)
        return self.out(y)


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.fc = nn.Linear(width, hidden)
        self.act = activation(act)
        self.proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, act: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio), act)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask=mask, causal=causal)
        return x + self.mlp(self.ln_2(x))

    def forward_packed(
        self, x: torch.Tensor, rows: torch.Tensor, B: int, T: int, mask, causal: bool
    ) -> torch.Tensor:
        """The block on packed tokens (see ``SelfAttention.forward_packed``): (N, C) -> (N, C)."""
        x = x + self.attn.forward_packed(self.ln_1(x), rows, B, T, mask, causal)
        return x + self.mlp(self.ln_2(x))


@contextlib.contextmanager
def buffers_restored(module: nn.Module) -> Iterator[None]:
    """Within the block, changes to ``module``'s buffers are undone on the way out."""
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def run_segment(
    function: Callable[..., torch.Tensor], module: nn.Module, *args: object, recompute: bool
) -> torch.Tensor:
    """``function(*args)``: one segment of a tower, made of ``module``'s layers.

    With ``recompute`` (gradient checkpointing) the segment keeps only its inputs for the
    backward pass, which runs it a second time to get its activations back: memory for one more
    forward. The second run normalizes with the same batch statistics, so the gradients are the
    same; BatchNorm's running statistics, which it would update again, are put back after it.
    """
    if not recompute:
        return function(*args)
    return checkpoint(
        function,
        *args,
        use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), buffers_restored(module)),
    )


def pool_tokens(
    x: torch.Tensor, kind: str, eot_pos: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Pool (B, T, C) token states to (B, C).

    ``eot_pos`` (B,) is each sequence's end-of-text position; ``valid`` (B, T) is True up to and
    including it, so padding never enters mean or max.
    """
    if kind == "eot":
        return x[torch.arange(x.shape[0], device=x.device), eot_pos]
    if kind == "cls":
        return x[:, 0]
    if kind == "mean":
        weights = valid.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
        return (x * weights).sum(1) / weights.sum(1).clamp_min(1)
    if kind == "max":
        return x.masked_fill(~valid.unsqueeze(-1), torch.finfo(x.dtype).min).amax(1)
    raise ConfigError(f"unknown text pooling {kind!r} (eot, cls, mean or max)")


class AttentionPool2d(nn.Module):
    """CLIP's attention pooling: the mean of the feature map queries all positions, QKV-attention style.

    Parameter names follow OpenAI CLIP so that checkpoints convert by renaming a prefix.
    """

    def __init__(self, spatial: int, width: int, heads: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(
            torch.randn(spatial * spatial + 1, width) / width**0.5
        )
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.c_proj = nn.Linear(width, output_dim)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)  # NCHW -> (B, HW, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # (B, HW+1, C)
        if x.shape[1] != self.positional_embedding.shape[0]:
            raise ConfigError(
                f"attention pooling was built for {self.positional_embedding.shape[0] - 1} positions "
                f"but the feature map has {H}x{W}: the image size does not match the model"
            )
        x = x + self.positional_embedding.to(x.dtype)
        nh, hs = self.heads, C // self.heads
        q = self.q_proj(x[:, 0]).view(B, nh, hs)  # (B, nh, hs)
        # Only the mean token queries, so instead of projecting all HW+1 positions to keys and
        # values (2(HW+1)C^2 multiply-adds per image) fold the projections into the query and
        # the attention-weighted input (2C^2): q.(Wk x_j + bk) = (Wk^T q).x_j + q.bk, and
        # sum_j a_j (Wv x_j + bv) = Wv (sum_j a_j x_j) + bv since the weights sum to one.
        # The same function with 3.5x fewer FLOPs (q.bk cancels in the softmax, but is kept so
        # that k_proj.bias still gets its (zero) gradient, as DDP expects of every parameter).
        w_k = self.k_proj.weight.view(nh, hs, C)
        w_v = self.v_proj.weight.view(nh, hs, C)
        q_in = torch.einsum("bhd,hdc->bhc", q, w_k)  # (B, nh, C)
        q_bias = (q * self.k_proj.bias.view(nh, hs)).sum(-1, keepdim=True)  # (B, nh, 1)
        scores = (torch.einsum("bhc,bjc->bhj", q_in, x) + q_bias) * hs**-0.5  # (B, nh, HW+1)
        weights = scores.float().softmax(dim=-1).to(x.dtype)
        mixed = torch.einsum("bhj,bjc->bhc", weights, x)  # (B, nh, C)
        y = torch.einsum("bhc,hdc->bhd", mixed, w_v) + self.v_proj.bias.view(nh, hs)  # (B, nh, hs)
        return self.c_proj(y.reshape(B, C))


class GlobalPool2d(nn.Module):
    """Average or max over the spatial positions, then a linear projection."""

    def __init__(self, kind: str, width: int, output_dim: int):
        super().__init__()
        if kind not in ("avg", "max"):
            raise ConfigError(f"unknown image pooling {kind!r} (attention, avg or max)")
        self.kind = kind
        self.proj = nn.Linear(width, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3)) if self.kind == "avg" else x.amax(dim=(2, 3))  # (B, C)
        return self.proj(pooled)


def image_pool(kind: str, spatial: int, width: int, heads: int, output_dim: int) -> nn.Module:
    if kind == "attention":
        if width % heads:
            raise ConfigError(
                f"model.image.heads ({heads}) must divide the feature width ({width})"
            )
        return AttentionPool2d(spatial, width, heads, output_dim)
    return GlobalPool2d(kind, width, output_dim)
