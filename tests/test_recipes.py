"""Every shipped recipe (src/coembed/configs/*.yaml) builds, runs forward and backward with finite
outputs and a gradient for every parameter, and comes back from a model directory unchanged.

Each recipe keeps its depths, head counts, activations, pooling, tokenizer and context length;
only the widths and the image size shrink, so the whole table runs in seconds on two cores.
"""

from __future__ import annotations

import math

import pytest
import torch

from coembed.checkpoint import load_model_dir, save_model_dir
from coembed.config import CONFIG_DIR, Config, load_config
from coembed.loss import make_loss
from coembed.model import CoEmbed
from coembed.tokenizer import Tokenizer

RECIPES = sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))
CAPTIONS = [
    "a red circle on the left",
    "two blue squares",
    "a small green triangle above a yellow star",
    # Long enough to fill any context: every position takes part in the text tower's forward.
    "a striped purple hexagon next to a dotted orange cross " * 12,
]
IMAGE_SIZE = 64  # two 32-pixel cells at the attention pool: the smallest a ResNet trunk allows
# The attention pool's key bias shifts every score of one query by the same amount, which the
# softmax cancels: its gradient is zero by construction (kept for DDP, see towers/layers.py).
ZERO_BY_DESIGN = {"visual.pool.k_proj.bias"}


def reduced(recipe: str) -> list[str]:
    """Overrides that shrink ``recipe``'s widths and image size but keep its structure."""
    cfg = load_config(recipe)
    text, image = cfg.model.text, cfg.model.image
    overrides = [
        "model.embed_dim=32",
        f"model.text.width={8 * text.heads}",  # 8 channels per head, as many heads
        f"model.image.image_size={IMAGE_SIZE}",
    ]
    if image.backbone == "modified_resnet":
        # The pooled width (32 x width) must split into the recipe's heads: the smallest such
        # width of at least 8.
        step = image.heads // math.gcd(image.heads, 32)
        overrides.append(f"model.image.width={step * math.ceil(8 / step)}")
    return overrides


def recipe_tokenizer(cfg: Config) -> Tokenizer:
    """CLIP's tokenizer, or one trained on CAPTIONS; completes ``cfg`` as training does."""
    text = cfg.model.text
    if cfg.model.tokenizer == "trained":
        tokenizer = Tokenizer.train(CAPTIONS, text.vocab_size, text.context_length)
        text.vocab_size = tokenizer.vocab_size
    else:
        tokenizer = Tokenizer.clip(context_length=text.context_length)
    text.eot_id = tokenizer.eot_id
    return tokenizer


@torch.no_grad()
def wake_zero_parameters(model: torch.nn.Module) -> None:
    """Give every all-zero parameter small random values.

    CLIP starts each residual branch at zero (the last BatchNorm's scale), which stops the
    gradient into the branch's other weights at the first step; with small values there, a
    parameter cut off from the loss shows up as a zero gradient."""
    for p in model.parameters():
        if not p.any():
            p.normal_(0, 0.02)


def test_every_shipped_recipe_is_covered():
    assert {"tiny", "small", "rn50", "rn101", "rn50x4"} <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_builds_trains_and_round_trips(recipe, tmp_path):
    cfg = load_config(recipe, reduced(recipe))
    tokenizer = recipe_tokenizer(cfg)
    torch.manual_seed(0)
    model = CoEmbed(cfg.model)
    wake_zero_parameters(model)
    images = torch.randn(len(CAPTIONS), 3, IMAGE_SIZE, IMAGE_SIZE)
    tokens = tokenizer(CAPTIONS)  # (B, context_length)
    assert tokens[-1, -1] != tokenizer.pad_id  # the long caption fills the context

    out = model(images, tokens)
    loss = make_loss(cfg.train.loss)(**out)
    loss.backward()
    assert out["image_features"].shape == out["text_features"].shape == (len(CAPTIONS), 32)
    assert torch.isfinite(loss) and all(torch.isfinite(v).all() for v in out.values())
    grads = dict(model.named_parameters())
    missing = [n for n, p in grads.items() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    zero = [n for n, p in grads.items() if not p.grad.any() and n not in ZERO_BY_DESIGN]
    assert not zero, zero

    model.eval()
    with torch.no_grad():
        expected = model.encode_image(images), model.encode_text(tokens)
    save_model_dir(model, tokenizer, tmp_path / "model")
    loaded, loaded_tokenizer, _ = load_model_dir(tmp_path / "model")
    assert loaded.cfg == model.cfg
    assert torch.equal(loaded_tokenizer(CAPTIONS), tokens)
    with torch.no_grad():
        got = loaded.encode_image(images), loaded.encode_text(tokens)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
