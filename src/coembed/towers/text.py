"""The transformer text tower: tokens -> embeddings + positions -> pre-LN blocks -> pool -> project."""

from __future__ import annotations

import torch
from torch import nn

from coembed.config import TextConfig
from coembed.towers.layers import Block, eager, pool_tokens, positional_encoding, run_segment


class TextTower(nn.Module):
    grad_checkpointing = False  # recompute each block's activations in the backward pass

    def __init__(self, cfg: TextConfig, output_dim: int):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional = positional_encoding(cfg.positional, cfg.context_length, cfg.width)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.act) for _ in range(cfg.layers)
        )
        self.ln_final = nn.LayerNorm(cfg.width)
        self.proj = nn.Linear(cfg.width, output_dim, bias=False)
        self.init_parameters()

    def init_parameters(self) -> None:
        # CLIP's scheme: small embeddings, attention/MLP scaled by width and depth.
        c = self.cfg
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        proj_std = (c.width**-0.5) * ((2 * c.layers) ** -0.5)
        attn_std = c.width**-0.5
        fc_std = (2 * c.width) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.normal_(block.attn.out.weight, std=proj_std)
            nn.init.zeros_(block.attn.out.bias)
            nn.init.normal_(block.mlp.fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.proj.weight, std=proj_std)
        nn.init.normal_(self.proj.weight, std=c.width**-0.5)

    def end_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) index of the first end-of-text token; the last position if a row has none."""
        is_eot = tokens == self.cfg.eot_id
        last = torch.full_like(tokens[:, 0], tokens.shape[1] - 1)
        return torch.where(is_eot.any(1), is_eot.int().argmax(1), last)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, output_dim) unnormalized features."""
        eot = self.end_positions(tokens)  # (B,)
        # Nothing after the last end token of the batch can reach a pooled output (it is masked
        # out of attention and pooling), so drop those columns: captions are usually far shorter
        # than the context, and attention and MLP costs shrink with them.
        # Exporters and compilers want static shapes, so they keep the full context.
        if eager():
            tokens = tokens[:, : int(eot.max()) + 1]
        B, T = tokens.shape
        valid = torch.arange(T, device=tokens.device)[None, :] <= eot[:, None]  # (B, T)
        x = self.dropout(self.positional(self.token_embedding(tokens)))  # (B, T, C)
        causal = self.cfg.attention == "causal"
        # With a causal mask nothing before the end token can see the padding after it, so the
        # fast is_causal path is exact; bidirectional attention needs the key-padding mask.
        mask = None if causal else valid[:, None, None, :]  # (B, 1, 1, T)
        rows = valid.flatten().nonzero().squeeze(1) if eager() else None
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        if rows is not None and len(rows) < B * T:
            # Packed: LayerNorms, projections and MLPs (most of the tower's work) run on the
            # real tokens only, not on the padding of captions shorter than the longest one.
            C = x.shape[-1]
            h = x.reshape(B * T, C).index_select(0, rows)  # (N, C)
            for block in self.blocks:
                h = run_segment(
                    block.forward_packed, block, h, rows, B, T, mask, causal, recompute=recompute
                )
            h = self.ln_final(h)  # (N, C), in the dtype autocast gives it (see forward_packed)
            x = h.new_zeros(B * T, C).index_copy(0, rows, h).view(B, T, C)  # (B, T, C)
        else:
            for block in self.blocks:
                x = run_segment(block, block, x, mask, causal, recompute=recompute)
            x = self.ln_final(x)
        return self.proj(pool_tokens(x, self.cfg.pool, eot, valid))

    def masked_token_logits(self, tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Masked language modelling: (B, T) token ids and (B, T) bool ``hidden`` positions ->
        (M, vocab_size) logits of the M hidden tokens.

        One bidirectional pass whatever ``cfg.attention`` says (padding masked out); a hidden
        position's input is its position encoding alone (CLIP's vocabulary has no mask token).
        The output head is the token embedding itself (tied weights), after the final LayerNorm.
        """
        eot = self.end_positions(tokens)  # (B,)
        T = tokens.shape[1]
        valid = torch.arange(T, device=tokens.device)[None, :] <= eot[:, None]  # (B, T)
        shown = self.token_embedding(tokens) * (~hidden)[..., None]  # (B, T, C)
        x = self.dropout(self.positional(shown))
        mask = valid[:, None, None, :]  # (B, 1, 1, T): keys past the end token are padding
        for block in self.blocks:
            x = block(x, mask, False)
        x = self.ln_final(x[hidden])  # (M, C)
        return x @ self.token_embedding.weight.T  # (M, vocab_size)

    def lock(self, unlocked_layers: int = 0) -> None:
        """Freeze the tower except its last ``unlocked_layers`` blocks (plus final LN and projection)."""
        for p in self.parameters():
            p.requires_grad_(False)
        if unlocked_layers <= 0:
            return
        for block in list(self.blocks)[-unlocked_layers:]:
            block.requires_grad_(True)
        self.ln_final.requires_grad_(True)
        self.proj.requires_grad_(True)
