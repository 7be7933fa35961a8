"""The towers and the two-tower model: shapes, options, masking, determinism, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from coembed.config import load_config
from coembed.model import CoEmbed
from coembed.towers.layers import HalvingAvgPool, sinusoidal_table
from tests.helpers import TINY, tiny_clip_model, tiny_config


def tokens_for(
    lengths: list[int], context: int = 16, eot: int = 49407, seed: int = 0
) -> torch.Tensor:
    """Rows of [SOT, random words, EOT, 0-padding]."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.zeros(len(lengths), context, dtype=torch.long)
    for i, n in enumerate(lengths):
        rows[i, 0] = 49406
        rows[i, 1 : n + 1] = torch.randint(1, 49000, (n,), generator=g)
        rows[i, n + 1] = eot
    return rows


def test_shapes_and_unit_norms():
    model = tiny_clip_model().eval()
    out = model(torch.randn(3, 3, 32, 32), tokens_for([2, 5, 9]))
    assert out["image_features"].shape == (3, 32)
    assert out["text_features"].shape == (3, 32)
    for key in ("image_features", "text_features"):
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)
    assert math.isclose(float(out["logit_scale"].detach()), 1 / 0.07, rel_tol=1e-5)
    assert "logit_bias" not in out


def test_logit_scale_is_clamped_at_100():
    model = tiny_clip_model()
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_logit_scale()
    assert math.isclose(float(model.logit_scale.exp()), 100.0, rel_tol=1e-5)


def test_sigmoid_loss_config_adds_a_learnable_bias():
    model = tiny_clip_model("train.loss=siglip")
    assert model.logit_bias is not None and model.logit_bias.requires_grad
    assert float(model.logit_bias) == -10.0


@pytest.mark.parametrize("pool", ["eot", "mean", "max"])
@pytest.mark.parametrize("positional", ["learned", "sinusoidal"])
@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_padding_does_not_change_text_features(pool, positional, attention):
    model = tiny_clip_model(
        f"model.text.pool={pool}",
        f"model.text.positional={positional}",
        f"model.text.attention={attention}",
    ).eval()
    tokens = tokens_for([3, 7])
    garbage = tokens.clone()
    # Whatever sits after the end token must not matter.
    for row, n in zip(garbage, [3, 7]):
        row[n + 2 :] = torch.randint(1, 49000, (16 - n - 2,))
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_text(tokens), model.encode_text(garbage), atol=1e-6, rtol=0
        )


def test_cls_pooling_with_bidirectional_attention_sees_the_whole_caption():
    model = tiny_clip_model("model.text.pool=cls", "model.text.attention=bidirectional").eval()
    a, b = tokens_for([5]), tokens_for([5])
    b[0, 4] = (b[0, 4] + 1) % 49000  # change a late word: the first token's output must change
    with torch.no_grad():
        assert not torch.allclose(model.encode_text(a), model.encode_text(b))


def test_causal_mask_hides_the_future():
    model = tiny_clip_model("model.text.pool=mean").eval()
    tokens = tokens_for([8])
    changed = tokens.clone()
    changed[0, 6] = (changed[0, 6] + 7) % 49000
    hidden = {}

    def grab(name):
        def hook(_module, _inputs, output):
            hidden[name] = output

        return hook

    model.text.ln_final.register_forward_hook(grab("a"))
    with torch.no_grad():
        model.encode_text(tokens)
        first = hidden["a"].clone()
        model.encode_text(changed)
        second = hidden["a"]
    # Positions before the change see nothing of it; the changed position and later do.
    torch.testing.assert_close(first[0, :6], second[0, :6], atol=1e-6, rtol=0)
    assert not torch.allclose(first[0, 6:9], second[0, 6:9])


def test_bidirectional_attention_sees_the_future():
    model = tiny_clip_model("model.text.attention=bidirectional", "model.text.pool=mean").eval()
    tokens = tokens_for([8])
    changed = tokens.clone()
    changed[0, 6] = (changed[0, 6] + 7) % 49000
    captured = []
    model.text.ln_final.register_forward_hook(lambda m, i, o: captured.append(o.clone()))
    with torch.no_grad():
        model.encode_text(tokens)
        model.encode_text(changed)
    assert not torch.allclose(captured[0][0, 1], captured[1][0, 1])


def test_sinusoidal_table_matches_the_formula():
    table = sinusoidal_table(10, 8)
    pos, i = 3, 2  # dims 4 and 5 share frequency 10000^(-4/8)
    freq = 10000 ** (-(2 * i) / 8)
    assert math.isclose(float(table[pos, 2 * i]), math.sin(pos * freq), abs_tol=1e-6)
    assert math.isclose(float(table[pos, 2 * i + 1]), math.cos(pos * freq), abs_tol=1e-6)
    model = tiny_clip_model("model.text.positional=sinusoidal")
    assert not any(name.startswith("text.positional") for name in model.state_dict())


def test_embedding_dropout_is_active_only_in_training():
    model = tiny_clip_model("model.text.dropout=0.5")
    tokens = tokens_for([6, 6])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens), model.encode_text(tokens))
        model.train()
        assert not torch.allclose(model.encode_text(tokens), model.encode_text(tokens))


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_activation_choice_changes_the_output(act):
    a = tiny_clip_model(f"model.text.act={act}", seed=1).eval()
    other = "gelu" if act == "quick_gelu" else "quick_gelu"
    b = tiny_clip_model(f"model.text.act={other}", seed=1).eval()
    tokens = tokens_for([5])
    with torch.no_grad():
        assert not torch.allclose(a.encode_text(tokens), b.encode_text(tokens), atol=1e-6)


def test_same_seed_same_weights_and_different_seed_different():
    a, b, c = tiny_clip_model(seed=3), tiny_clip_model(seed=3), tiny_clip_model(seed=4)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.text.token_embedding.weight, c.text.token_embedding.weight)


IMAGE_VARIANTS = [
    ("modified_resnet", "attention"),
    ("modified_resnet", "avg"),
    ("modified_resnet", "max"),
    ("resnet18", "attention"),
    ("convnext_tiny", "avg"),
    ("efficientnet_b0", "max"),
    ("mobilenet_v3_small", "avg"),
    ("regnet_y_400mf", "attention"),
]


@pytest.mark.parametrize("backbone,pool", IMAGE_VARIANTS)
def test_every_backbone_and_pool_trains(backbone, pool):
    """As timm tests every model: finite outputs, and every parameter receives a gradient."""
    model = tiny_clip_model(
        f"model.image.backbone={backbone}", f"model.image.pool={pool}", "model.image.heads=1"
    )
    model.train()
    out = model(torch.randn(4, 3, 32, 32), tokens_for([3, 4, 5, 6]))
    assert torch.isfinite(out["image_features"]).all()
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    torch.nn.functional.cross_entropy(logits, torch.arange(4)).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]


def test_unknown_backbone_is_a_config_error():
    from coembed.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown backbone"):
        tiny_clip_model("model.image.backbone=vit_b_16x")


def test_lock_image_keeps_last_groups_trainable_and_freezes_batchnorm_stats():
    model = tiny_clip_model()
    model.lock_image(unlocked_groups=1)
    trainable = {n for n, p in model.visual.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("pool.") for n in trainable)
    model.train()
    bn = model.visual.trunk.bn1
    assert not bn.training
    before = bn.running_mean.clone()
    model.encode_image(torch.randn(2, 3, 32, 32))
    assert torch.equal(before, bn.running_mean)


def test_lock_text_keeps_last_layers():
    model = tiny_clip_model()
    model.lock_text(unlocked_layers=1)
    trainable = {n for n, p in model.text.named_parameters() if p.requires_grad}
    assert any(n.startswith("blocks.1.") for n in trainable)
    assert not any(n.startswith("blocks.0.") or n.startswith("token_embedding") for n in trainable)


@pytest.mark.parametrize("name", ["tiny", "small", "rn50"])
def test_shipped_recipes_build(name):
    cfg = load_config(
        name, [] if name != "tiny" else ["model.tokenizer=clip", "model.text.vocab_size=49408"]
    )
    if name == "rn50":
        # The shapes of OpenAI's RN50 CLIP: 102M parameters, 1024-d embeddings.
        model = CoEmbed(cfg.model)
        assert cfg.model.embed_dim == 1024
        assert 101.5e6 < sum(p.numel() for p in model.parameters()) < 102.5e6
    else:
        assert cfg.model.embed_dim > 0


def test_tiny_fixture_is_really_tiny():
    cfg = tiny_config()
    assert cfg.model.image.image_size == 32 and "model.embed_dim=32" in TINY


def test_text_tower_runs_only_on_the_real_tokens():
    """Columns after the batch's last end token are dropped and the padding of shorter rows is
    packed away: the projections see 4 + 7 tokens, not 2 x 16, and the features are those of
    each caption encoded alone (no padding at all)."""
    model = tiny_clip_model().eval()
    tokens = tokens_for([2, 5])  # end tokens at positions 3 and 6 of 16
    seen = []
    qkv = model.text.blocks[0].attn.qkv
    qkv.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[:-1])))
    with torch.no_grad():
        batch = model.encode_text(tokens)
        alone = torch.cat(
            [model.encode_text(tokens[i : i + 1, : n + 2]) for i, n in enumerate([2, 5])]
        )
    assert seen == [(11,), (1, 4), (1, 7)]
    torch.testing.assert_close(batch, alone, atol=1e-6, rtol=0)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("size", [(16, 16), (6, 10), (7, 8)])
def test_halving_avg_pool_is_avg_pool2d_exactly(size, channels_last):
    """Same outputs, same gradients bit for bit, same memory format (odd sizes use ATen's op)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, *size, generator=gen).contiguous(memory_format=fmt)
    grad = torch.randn(3, 5, size[0] // 2, size[1] // 2, generator=gen)
    ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_ref = HalvingAvgPool()(ours), torch.nn.functional.avg_pool2d(ref, 2)
    (y_ours * grad).sum().backward()
    (y_ref * grad).sum().backward()
    assert torch.equal(y_ours, y_ref)
    assert torch.equal(ours.grad, ref.grad)
    assert ours.grad.is_contiguous(memory_format=fmt)
