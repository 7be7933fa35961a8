"""The cross-batch feature memory (``train.feature_memory``): the loss against a hand
computation, the ring's order, gradients, accumulation, two processes, learning on a tiny set and
the bad values. (Resumed bitwise with the memory on: test_objectives's resume test.)"""

from __future__ import annotations

import math

import pytest
import torch

from coembed.loss import ClipLoss
from coembed.training.memory import FeatureMemory, caption_keys
from tests.helpers import TINY, gloo_group, run_two_processes, tiny_train_run

# Two pairs in the batch, three remembered; the second remembered caption is the first row's.
IMAGES = [[1.0, 0.0], [0.0, 1.0]]
TEXTS = [[0.8, 0.6], [0.6, 0.8]]
MEMORY_IMAGES = [[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]]
MEMORY_TEXTS = [[0.0, 1.0], [1.0, 0.0], [0.8, 0.6]]
BLOCKED = [[False, True, False], [False, False, False]]
SCALE = 3.0


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def hand_loss() -> float:
    """Symmetric InfoNCE with the memory's unblocked columns as extra negatives, written out."""

    def cross_entropy(logits: list[float], target: int) -> float:
        return math.log(sum(math.exp(v) for v in logits)) - logits[target]

    total = 0.0
    for row in range(2):
        kept = [m for m in range(3) if not BLOCKED[row][m]]
        to_texts = [SCALE * dot(IMAGES[row], t) for t in TEXTS]
        to_texts += [SCALE * dot(IMAGES[row], MEMORY_TEXTS[m]) for m in kept]
        to_images = [SCALE * dot(TEXTS[row], i) for i in IMAGES]
        to_images += [SCALE * dot(TEXTS[row], MEMORY_IMAGES[m]) for m in kept]
        total += cross_entropy(to_texts, row) + cross_entropy(to_images, row)
    return total / 4


def tensors(*rows) -> list[torch.Tensor]:
    return [torch.tensor(r, dtype=torch.float64) for r in rows]


def test_loss_with_memory_equals_hand_computation():
    img, txt, mem_img, mem_txt = tensors(IMAGES, TEXTS, MEMORY_IMAGES, MEMORY_TEXTS)
    scale = torch.tensor(SCALE, dtype=torch.float64)
    memory = (mem_img, mem_txt, torch.tensor(BLOCKED))
    got = float(ClipLoss()(img, txt, scale, memory=memory))
    assert got == pytest.approx(hand_loss(), rel=1e-12)
    without = float(ClipLoss()(img, txt, scale))
    assert got > without  # more negatives, a larger loss


def test_memory_columns_are_never_soft_targets():
    """With a duplicate caption in the batch, the targets spread over the batch's positives and
    stay off the memory's columns: the loss is finite and its gradient reaches no memory."""
    img, txt, mem_img, mem_txt = tensors(IMAGES, TEXTS, MEMORY_IMAGES, MEMORY_TEXTS)
    img.requires_grad_(True)
    positives = torch.ones(2, 2, dtype=torch.bool)
    memory = (mem_img, mem_txt, torch.tensor(BLOCKED))
    loss = ClipLoss()(img, txt, torch.tensor(SCALE, dtype=torch.float64), None, positives, memory)
    assert math.isfinite(float(loss.detach()))
    loss.backward()
    assert torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0


def test_caption_keys_match_equal_captions_only():
    tokens = torch.tensor([[1, 5, 2, 0], [1, 6, 2, 0], [1, 5, 2, 0], [1, 2, 5, 0]])
    keys = caption_keys(tokens)
    assert keys.dtype == torch.long and keys.shape == (4,)
    assert keys[0] == keys[2] and len({int(k) for k in keys}) == 3  # order matters


def test_ring_keeps_the_latest_pairs_in_place():
    memory = FeatureMemory(5, 2, torch.device("cpu"))
    assert memory.columns(torch.ones(1, 3, dtype=torch.long)) is None  # empty: no columns
    batches = [torch.full((3, 2), float(b)) for b in (1, 2, 3)]
    tokens = [torch.tensor([[b, i, 0] for i in range(3)]) for b in (1, 2, 3)]
    for feats, toks in zip(batches, tokens):
        memory.columns(toks)
        memory.stage(feats, -feats)
        memory.commit()
    # 9 pairs through a ring of 5: batch 3's three, then batch 2's last two (overwritten in order).
    assert memory.filled == 5 and memory.next == 4
    assert memory.images[:, 0].tolist() == [2.0, 3.0, 3.0, 3.0, 2.0]
    assert torch.equal(memory.texts, -memory.images)
    images, texts, blocked = memory.columns(tokens[2][:2])
    assert images.shape == texts.shape == (5, 2)
    assert blocked.tolist() == [
        [False, True, False, False, False],
        [False, False, True, False, False],
    ]
    big = FeatureMemory(2, 1, torch.device("cpu"))
    big.columns(torch.arange(4)[:, None])
    big.stage(torch.arange(4.0)[:, None], torch.zeros(4, 1))
    big.commit()  # a batch larger than the ring: its newest entries
    assert big.images[:, 0].tolist() == [2.0, 3.0] and big.filled == 2 and big.next == 0


def test_commit_without_stage_changes_nothing():
    memory = FeatureMemory(4, 2, torch.device("cpu"))
    memory.commit()
    assert memory.filled == 0 and memory.images.abs().sum() == 0


def test_remembered_pairs_of_the_rows_image_are_blocked_too():
    """Two captions of one image: the other caption's remembered pair is no negative."""
    memory = FeatureMemory(8, 2, torch.device("cpu"))
    memory.columns(torch.tensor([[1, 5], [1, 6], [1, 7]]), torch.tensor([10, 11, 12]))
    memory.stage(torch.randn(3, 2), torch.randn(3, 2))
    memory.commit()
    # Rows: image 11 with a new caption; caption [1, 7] of a new image; unknown ids.
    _, _, blocked = memory.columns(
        torch.tensor([[1, 8], [1, 7], [1, 9]]), torch.tensor([11, 20, -1])
    )
    assert blocked.tolist() == [[False, True, False], [False, False, True], [False, False, False]]
    _, _, by_caption = memory.columns(torch.tensor([[1, 5]]))  # ids unknown: captions alone
    assert by_caption.tolist() == [[True, False, False]]


def test_state_round_trips_and_refuses_another_size():
    memory = FeatureMemory(4, 2, torch.device("cpu"))
    memory.columns(torch.arange(6).reshape(3, 2), torch.tensor([4, 5, 6]))
    memory.stage(torch.randn(3, 2), torch.randn(3, 2))
    memory.commit()
    again = FeatureMemory(4, 2, torch.device("cpu"))
    again.load_state_dict(memory.state_dict(), "memory.safetensors")
    for k, v in memory.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    with pytest.raises(ValueError, match="memory.safetensors: a memory of shapes"):
        FeatureMemory(8, 2, torch.device("cpu")).load_state_dict(
            memory.state_dict(), "memory.safetensors"
        )


# --- in training steps -----------------------------------------------------------------------------

CAPTIONS = [f"a picture of {('red', 'blue', 'green')[i % 3]} thing {i}" for i in range(8)]


def test_steps_fill_the_memory_and_gradients_reach_both_towers():
    from coembed.training.step import train_step

    run = tiny_train_run(CAPTIONS, [*TINY, "train.device=cpu", "train.feature_memory=12"])
    run.total_steps = 3
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    train_step(run, images, CAPTIONS)
    assert run.memory.filled == 8
    first = run.memory.images[:8].clone()
    assert torch.allclose(first.norm(dim=1), torch.ones(8), atol=1e-5)  # the normalized features
    # The second step reads the memory: the tower's gradients differ from a run without one.
    run.optimizer.zero_grad(set_to_none=True)
    from coembed.training.step import forward_loss

    tokens = run.tokenizer(CAPTIONS)
    with_memory = forward_loss(run, images, tokens, memory=run.memory.columns(tokens))
    with_memory.backward()
    grads = {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}
    assert any(n.startswith("visual") for n in grads) and any(n.startswith("text") for n in grads)
    run.optimizer.zero_grad(set_to_none=True)
    forward_loss(run, images, tokens).backward()
    plain = {n: p.grad for n, p in run.model.named_parameters() if p.grad is not None}
    assert grads.keys() == plain.keys()
    assert any(not torch.allclose(grads[n], plain[n]) for n in grads)
    # Every remembered caption is one of the batch's own: every memory column is blocked for
    # its own row, and the memory's 8 columns stay for the other rows.
    _, _, blocked = run.memory.columns(tokens)
    assert blocked.sum(dim=1).tolist() == [1] * 8
    train_step(run, images, CAPTIONS)
    assert run.memory.filled == 12 and run.memory.next == 4


def test_memory_through_accumulation_equals_one_batch():
    """The caching path of accumulated_backward gives one batch's gradients with the memory."""
    from coembed.training.step import accumulated_backward

    settings = [*TINY, "train.device=cpu", "train.feature_memory=16", "train.accum_steps=2"]
    run = tiny_train_run(CAPTIONS, settings)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = run.tokenizer(CAPTIONS)
    g = torch.Generator().manual_seed(2)
    remembered = torch.nn.functional.normalize(
        torch.randn(2, 16, run.cfg.model.embed_dim, generator=g), dim=-1
    )
    run.memory.columns(torch.arange(32).reshape(16, 2))
    run.memory.stage(remembered[0], remembered[1])
    run.memory.commit()
    columns = run.memory.columns(tokens)
    buffers = {k: b.clone() for k, b in run.model.named_buffers()}

    run.model.zero_grad(set_to_none=True)
    outs = [run.model(i, t) for i, t in zip(images.chunk(2), tokens.chunk(2))]
    feats = {k: torch.cat([o[k] for o in outs]) for k in ("image_features", "text_features")}
    run.loss_fn(**feats, logit_scale=outs[0]["logit_scale"], memory=columns).backward()
    expected = {k: p.grad.clone() for k, p in run.model.named_parameters()}
    with torch.no_grad():  # BatchNorm's running statistics as they were
        for k, b in run.model.named_buffers():
            b.copy_(buffers[k])
    run.model.zero_grad(set_to_none=True)
    accumulated_backward(run, images, tokens, memory=columns)
    for name, p in run.model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_loss_falls_on_a_tiny_set_with_the_memory():
    from coembed.training.step import train_step

    settings = [*TINY, "train.device=cpu", "train.warmup_steps=0", "train.feature_memory=24"]
    run = tiny_train_run(CAPTIONS, settings)
    run.total_steps = 30
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    losses = [train_step(run, images, CAPTIONS)[0] for _ in range(30)]
    assert losses[-1] < 0.7 * losses[0], losses


# --- across two processes --------------------------------------------------------------------------


def memory_worker(rank: int, world: int, port: int, queue) -> None:
    """Each rank stages its half of a global batch of 6; both memories must hold all 6."""
    with gloo_group(rank, world, port):
        memory = FeatureMemory(8, 2, torch.device("cpu"))
        features = torch.arange(12.0).reshape(6, 2)
        tokens = torch.arange(12).reshape(6, 2)
        rows = slice(rank * 3, (rank + 1) * 3)
        memory.columns(tokens[rows], torch.arange(6)[rows] + 100)
        memory.stage(features[rows], -features[rows])
        memory.commit()
        _, _, blocked = memory.columns(tokens[rows])
        ids = memory.image_ids.tolist()
        queue.put((rank, memory.images.tolist(), memory.filled, blocked.tolist(), ids))


def test_every_process_remembers_the_global_batch():
    results = run_two_processes(memory_worker)
    everything = torch.arange(12.0).reshape(6, 2).tolist() + [[0.0, 0.0]] * 2
    for rank, images, filled, blocked, ids in results:
        assert images == everything and filled == 6
        assert ids == [100, 101, 102, 103, 104, 105, -1, -1]
        # Each rank's rows find their own captions among the six remembered.
        assert [row.index(True) for row in blocked] == [rank * 3 + i for i in range(3)]


# --- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, message",
    [
        (["train.feature_memory=-1"], "train.feature_memory: must not be negative, got -1"),
        (["train.feature_memory=64", "train.loss=siglip"], "use train.loss=clip"),
        (["train.feature_memory=64", "train.label_smoothing=0.1"], "train.label_smoothing=0"),
    ],
)
def test_bad_values_say_what_is_wrong(settings, message):
    from coembed.config import load_config
    from coembed.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        load_config("tiny", settings)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_off_by_default_and_the_plain_path_is_untouched():
    from coembed.config import Config

    assert Config().train.feature_memory == 0
    run = tiny_train_run(CAPTIONS, [*TINY, "train.device=cpu"])
    assert run.memory is None
    img = torch.nn.functional.normalize(torch.randn(4, 8, dtype=torch.float64), dim=-1)
    scale = torch.tensor(5.0, dtype=torch.float64)
    assert torch.equal(ClipLoss()(img, img, scale), ClipLoss()(img, img, scale, memory=None))
