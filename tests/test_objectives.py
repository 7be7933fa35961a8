"""Objectives beyond the contrastive pair: soft targets for duplicate captions and
images, label smoothing, the weights' moving average, masked language modelling, image
self-supervision on a second view (SLIP's NT-Xent, DeCLIP's multi-view). Each against a hand
computation, across two gloo processes, through gradient accumulation, learning on a tiny set,
and resumed bitwise (the style augmentation too;
its pixels are tested in test_data_transforms)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from coembed.loss import ClipLoss, SigLipLoss, positive_pairs
from tests.helpers import (
    CLIP_TOKENIZER,
    TINY,
    gloo_group,
    metrics,
    ok,
    run_cli,
    run_two_processes,
    tiny_train_run,
    train_args,
    weights,
    write_csv,
)

# Three pairs: captions 0 and 2 are the same tokens; images all differ.
IMAGES = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]
TEXTS = [[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]]
SCALE = 2.0


def tokens_of(*rows: list[int], length: int = 6) -> torch.Tensor:
    """(B, length) token ids, each row zero-padded."""
    out = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row)
    return out


def hand_cross_entropy(logits: list[float], targets: list[float]) -> float:
    """-sum_j t_j log softmax(logits)_j, written out."""
    log_total = math.log(sum(math.exp(v) for v in logits))
    return -sum(t * (v - log_total) for v, t in zip(logits, targets))


def hand_clip_loss(positives: list[list[int]], smoothing: float = 0.0) -> float:
    """The symmetric InfoNCE of IMAGES/TEXTS at SCALE with each row's target spread uniformly
    over ``positives[row]`` and mixed with ``smoothing`` of the uniform distribution."""
    B = len(IMAGES)

    def dot(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b))

    def target(row: int) -> list[float]:
        hard = [(1 / len(positives[row]) if j in positives[row] else 0.0) for j in range(B)]
        return [(1 - smoothing) * t + smoothing / B for t in hard]

    per_image = [
        hand_cross_entropy([SCALE * dot(IMAGES[i], t) for t in TEXTS], target(i)) for i in range(B)
    ]
    per_text = [
        hand_cross_entropy([SCALE * dot(TEXTS[i], im) for im in IMAGES], target(i))
        for i in range(B)
    ]
    return (sum(per_image) / B + sum(per_text) / B) / 2


def features() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dtype = torch.float64
    return (
        torch.tensor(IMAGES, dtype=dtype),
        torch.tensor(TEXTS, dtype=dtype),
        torch.tensor(SCALE, dtype=dtype),
    )


# --- which pairs are positives -------------------------------------------------------------------


def test_positive_pairs_join_same_captions_and_same_images():
    tokens = tokens_of([1, 5, 2], [1, 6, 2], [1, 5, 2], [1, 7, 2])  # captions 0 and 2 equal
    image_ids = torch.tensor([10, 11, 12, 11])  # pairs 1 and 3 show one image
    got = positive_pairs(tokens, image_ids)
    want = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    assert torch.equal(got, want)
    captions_only = torch.tensor(
        [[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool
    )
    assert torch.equal(positive_pairs(tokens, None), captions_only)


def test_positive_pairs_are_none_without_duplicates():
    """Every pair its own only positive: the plain targets apply, exactly."""
    tokens = tokens_of([1, 5, 2], [1, 6, 2], [1, 5, 2, 0, 3])  # same start, not the same caption
    assert positive_pairs(tokens, torch.tensor([0, 1, 2])) is None


def test_batches_name_one_picture_by_one_id(tmp_path):
    """Two captions of one image, and one picture under two file names, share an id; the ids
    follow the batch's pairs."""
    import shutil

    from coembed.data.formats import read_records
    from coembed.data.loader import PairData
    from tests.helpers import SHIPPED, shipped_rows

    (a, _), (b, _) = shipped_rows(2)
    (tmp_path / "images").mkdir()
    shutil.copyfile(SHIPPED / "images" / a, tmp_path / "images" / "a.png")
    shutil.copyfile(SHIPPED / "images" / a, tmp_path / "images" / "a-copy.png")
    shutil.copyfile(SHIPPED / "images" / b, tmp_path / "images" / "b.png")
    rows = [("images/a.png", "one"), ("images/a.png", "two"), ("images/a-copy.png", "three")]
    rows += [("images/b.png", "four")]
    records, _ = read_records(str(write_csv(tmp_path / "pairs.csv", rows)), "filepath", "caption")
    data = PairData.from_records(records, 32, cache_dir=None, num_workers=0)
    ids = dict(zip(data.pair_caption, data.image_ids()[data.pair_image].tolist()))
    assert ids["one"] == ids["two"] == ids["three"] != ids["four"]
    (x, captions, batch_ids), *_ = data.epoch_batches(0, 0, 4, with_image_ids=True)
    assert batch_ids.tolist() == [ids[c] for c in captions] and x.shape == (4, 3, 32, 32)
    streamed = PairData.from_records(records, 32, None, max_cache_bytes=0, num_workers=0)
    assert len(set(streamed.image_ids()[streamed.pair_image].tolist())) == 3  # names only


# --- the losses against hand computations ----------------------------------------------------------


def test_soft_targets_loss_equals_hand_computation():
    img, txt, scale = features()
    positives = positive_pairs(tokens_of([1, 5, 2], [1, 6, 2], [1, 5, 2]), None)
    got = float(ClipLoss()(img, txt, scale, positives=positives))
    assert got == pytest.approx(hand_clip_loss([[0, 2], [1], [0, 2]]), rel=1e-12)
    assert got != pytest.approx(hand_clip_loss([[0], [1], [2]]), rel=1e-3)  # not the plain loss


@pytest.mark.parametrize("smoothing", [0.1, 0.5])
def test_label_smoothing_equals_hand_computation(smoothing):
    img, txt, scale = features()
    got = float(ClipLoss(label_smoothing=smoothing)(img, txt, scale))
    assert got == pytest.approx(hand_clip_loss([[0], [1], [2]], smoothing), rel=1e-12)
    both = ClipLoss(label_smoothing=smoothing)(
        img, txt, scale, positives=positive_pairs(tokens_of([3], [4], [3]), None)
    )
    assert float(both) == pytest.approx(hand_clip_loss([[0, 2], [1], [0, 2]], smoothing), rel=1e-12)


def test_sigmoid_loss_labels_every_positive_plus_one():
    img, txt, scale = features()
    bias = torch.tensor(-1.0, dtype=torch.float64)
    positives = positive_pairs(tokens_of([1], [2], [3]), torch.tensor([7, 8, 7]))  # one image
    got = float(SigLipLoss()(img, txt, scale, bias, positives=positives))
    want = 0.0
    for i, a in enumerate(IMAGES):
        for j, b in enumerate(TEXTS):
            label = 1.0 if (i == j or {i, j} == {0, 2}) else -1.0
            z = label * (SCALE * sum(x * y for x, y in zip(a, b)) - 1.0)
            want += math.log1p(math.exp(-z))  # -log sigmoid(z)
    assert got == pytest.approx(want / 3, rel=1e-12)


# --- in a training step ----------------------------------------------------------------------------

DISTINCT = [f"caption number {i} of {i % 3} things" for i in range(8)]
REPEATED = [f"a picture of {('red', 'blue', 'green')[i % 3]} things" for i in range(8)]


def one_step(settings: list[str], captions: list[str], image_ids=None) -> tuple[float, dict]:
    """Loss and weights after one train_step of the tiny model on a fixed batch."""
    from coembed.training.step import train_step

    run = tiny_train_run(DISTINCT + REPEATED, [*TINY, "train.device=cpu", *settings])
    run.total_steps = 2
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    loss, _ = train_step(run, images, captions, image_ids)
    return loss, {k: p.detach().clone() for k, p in run.model.named_parameters()}


def test_soft_targets_without_duplicates_train_exactly_as_without():
    plain_loss, plain = one_step([], DISTINCT)
    soft_loss, soft = one_step(["train.soft_targets=true"], DISTINCT, torch.arange(8))
    assert soft_loss == plain_loss
    assert all(torch.equal(plain[k], soft[k]) for k in plain)
    repeated_loss, _ = one_step(["train.soft_targets=true"], DISTINCT, torch.arange(8) % 4)
    assert repeated_loss != plain_loss  # the image ids reach the loss


@pytest.mark.parametrize(
    "settings", [["train.soft_targets=true"], ["train.label_smoothing=0.2"]], ids=str
)
def test_objective_reaches_every_trained_parameter_and_no_frozen_one(settings):
    """One step with the image trunk locked: the same parameters get gradients as with the plain
    loss (the towers' trainable parts and the temperature), none of the frozen trunk's."""
    from coembed.training.step import forward_loss

    def grads(extra: list[str]) -> dict[str, torch.Tensor]:
        run = tiny_train_run(REPEATED, [*TINY, "train.lock_image=true", *extra])
        run.raw_model.lock_image()
        images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        tokens = run.tokenizer(REPEATED)
        positives = positive_pairs(tokens, None) if run.cfg.train.soft_targets else None
        forward_loss(run, images, tokens, positives).backward()
        return {n: p.grad for n, p in run.model.named_parameters() if p.grad is not None}

    plain, changed = grads([]), grads(settings)
    assert changed.keys() == plain.keys()
    assert "logit_scale" in changed and not any(n.startswith("visual.trunk") for n in changed)
    assert all(changed[n].abs().sum() > 0 for n in changed)
    assert any(not torch.equal(changed[n], plain[n]) for n in changed)


def test_soft_targets_through_accumulation_equal_one_batch():
    """The caching path of accumulated_backward gives the whole batch's soft-target gradients."""
    from coembed.training.step import accumulated_backward

    run = tiny_train_run(REPEATED, [*TINY, "train.device=cpu", "train.accum_steps=2"])
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = run.tokenizer(REPEATED)
    positives = positive_pairs(tokens, None)
    assert positives is not None and positives.sum() > 8
    buffers = {k: b.clone() for k, b in run.model.named_buffers()}

    def reference(mask) -> dict[str, torch.Tensor]:
        run.model.zero_grad(set_to_none=True)
        outs = [run.model(i, t) for i, t in zip(images.chunk(2), tokens.chunk(2))]
        feats = {k: torch.cat([o[k] for o in outs]) for k in ("image_features", "text_features")}
        run.loss_fn(**feats, logit_scale=outs[0]["logit_scale"], positives=mask).backward()
        with torch.no_grad():  # BatchNorm's running statistics as they were
            for k, b in run.model.named_buffers():
                b.copy_(buffers[k])
        return {k: p.grad.clone() for k, p in run.model.named_parameters()}

    plain, expected = reference(None), reference(positives)
    run.model.zero_grad(set_to_none=True)
    accumulated_backward(run, images, tokens, positives)
    for name, p in run.model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)
    assert any(not torch.allclose(expected[n], plain[n]) for n in plain)


@pytest.mark.parametrize(
    "settings",
    [["train.soft_targets=true"], ["train.label_smoothing=0.1"]],
    ids=str,
)
def test_loss_falls_on_a_tiny_set(settings):
    from coembed.training.step import train_step

    run = tiny_train_run(REPEATED, [*TINY, "train.device=cpu", "train.warmup_steps=0", *settings])
    run.total_steps = 30
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    losses = [train_step(run, images, REPEATED, torch.arange(8))[0] for _ in range(30)]
    assert losses[-1] < 0.7 * losses[0], losses


# --- across two processes --------------------------------------------------------------------------

# Eight pairs split over two ranks of four; duplicates within and across the ranks.
GLOBAL_TOKENS = tokens_of([1, 4], [1, 5], [1, 4], [1, 6], [1, 7], [1, 5], [1, 8], [1, 9])
GLOBAL_IMAGES = torch.tensor([0, 1, 2, 3, 4, 5, 6, 3])


def ddp_features(net: torch.nn.Module, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x_img, x_txt = (torch.randn(8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    normalize = torch.nn.functional.normalize
    return normalize(net(x_img[rows]), dim=-1), normalize(net(x_txt[rows]) * 0.5, dim=-1)


def ddp_worker(rank: int, world: int, port: int, queue) -> None:
    with gloo_group(rank, world, port):
        torch.manual_seed(0)
        net = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 6).double())
        rows = slice(rank * 4, (rank + 1) * 4)
        positives = positive_pairs(GLOBAL_TOKENS[rows], GLOBAL_IMAGES[rows])
        img, txt = ddp_features(net, rows)
        loss = ClipLoss(label_smoothing=0.1)(img, txt, torch.tensor(10.0).double(), None, positives)
        loss.backward()  # DDP averages the gradients over the two processes
        total = loss.detach().clone()
        dist.all_reduce(total)
        grads = [p.grad.numpy().copy() for p in net.parameters()]
        queue.put((rank, float(total) / world, positives.numpy().copy(), grads))


def test_soft_targets_across_two_processes_match_one_process():
    results = run_two_processes(ddp_worker)

    torch.manual_seed(0)
    net = torch.nn.Linear(8, 6).double()
    positives = positive_pairs(GLOBAL_TOKENS, GLOBAL_IMAGES)
    img, txt = ddp_features(net, slice(0, 8))
    loss = ClipLoss(label_smoothing=0.1)(img, txt, torch.tensor(10.0).double(), None, positives)
    loss.backward()
    loss = loss.detach()
    for rank, mean_loss, rank_positives, grads in results:
        # Each rank's rows of the whole batch's positives, found through the gathered ids.
        assert (rank_positives == positives[rank * 4 : (rank + 1) * 4].numpy()).all()
        assert abs(mean_loss - float(loss)) < 1e-9
        for g, p in zip(grads, net.parameters()):
            torch.testing.assert_close(torch.from_numpy(g), p.grad, atol=1e-9, rtol=0)


def torchrun(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "COEMBED_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return subprocess.run(
        [*cmd, "-m", "coembed", *args], capture_output=True, text=True, env=env, timeout=600
    )


@pytest.mark.slow
def test_objectives_under_torchrun_train_like_one_process(repeated_data, tmp_path):
    """Two processes of 8 against one of 16 in two micro-batches of 8 (BatchNorm sees the same
    halves): soft targets over the gathered captions and image ids, label smoothing and the
    moving average give the same losses and the same saved (averaged) weights."""
    settings = ["train.soft_targets=true", "train.label_smoothing=0.1", "train.ema_decay=0.5"]
    settings += ["data.augment=false", "train.log_every=1"]
    extra = [a for s in settings for a in ("--set", s)] + list(CLIP_TOKENIZER)
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    ok(torchrun(train_args(repeated_data, ddp, *extra, steps=3, batch=16)))
    accum = ["--set", "train.accum_steps=2"]
    ok(run_cli(*train_args(repeated_data, single, *extra, *accum, steps=3, batch=16)))
    losses = [[m["loss"] for m in metrics(out) if "loss" in m] for out in (ddp, single)]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    a, b = weights(ddp), weights(single)
    for name in a:
        if "running_" not in name and "num_batches_tracked" not in name:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)


def train_two_processes(data, out, settings: list[str]) -> None:
    """Two steps in two gloo processes with ``settings``; both steps log a finite loss."""
    extra = [a for s in settings for a in ("--set", s)] + list(CLIP_TOKENIZER)
    ok(torchrun(train_args(data, out, *extra, steps=2, batch=16)))
    losses = [m["loss"] for m in metrics(out) if "loss" in m]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


@pytest.mark.slow
def test_mlm_under_torchrun_trains(repeated_data, tmp_path):
    """The token objective runs inside the model's forward, so DDP sees both uses of the text
    tower's weights in one backward: two processes train with it and log finite losses."""
    settings = ["train.mlm_weight=0.5", "train.log_every=1", "train.checkpoint_every=2"]
    train_two_processes(repeated_data, tmp_path / "ddp", settings)


@pytest.mark.slow
def test_two_views_under_torchrun_train(repeated_data, tmp_path):
    """Both views in one forward of the DDP-wrapped model, the projection head outside it (its
    gradients averaged by the run): two processes train and log finite losses."""
    settings = ["train.simclr_weight=0.5", "train.multiview=true", "train.log_every=1"]
    out = tmp_path / "ddp"
    train_two_processes(repeated_data, out, settings)
    assert (out / "checkpoints" / "step-0000002" / "view_head.safetensors").is_file()


# --- config and resume -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, message",
    [
        (["train.label_smoothing=1"], "train.label_smoothing: must be in [0, 1), got 1"),
        (["train.label_smoothing=-0.1"], "train.label_smoothing: must be in [0, 1)"),
        (["train.loss=siglip", "train.label_smoothing=0.1"], "use train.loss=clip"),
        (["train.soft_targets=maybe"], "train.soft_targets: expected true or false"),
        (["data.blur_p=1.5"], "data.blur_p: must be in [0, 1], got 1.5"),
        (["train.ema_decay=1"], "train.ema_decay: must be in [0, 1), got 1"),
        (["train.mlm_weight=-1"], "train.mlm_weight: must be in [0, 100]"),
        (["data.color_jitter=-1"], "data.color_jitter: must be in [0, 1]"),
        (["train.simclr_weight=-0.5"], "train.simclr_weight: must be in [0, 100]"),
        (["train.simclr_temperature=0"], "train.simclr_temperature: must be in (0, 10]"),
        (["train.simclr_temperature=-1"], "train.simclr_temperature: must be in (0, 10]"),
        (["train.multiview=2"], "train.multiview: expected true or false"),
        (["train.multiview=true", "data.augment=false"], "train.multiview trains on a second"),
        (["train.simclr_weight=1", "train.accum_steps=2"], "use train.accum_steps=1"),
        (["data.random_conv_p=2"], "data.random_conv_p: must be in [0, 1], got 2"),
        (["train.soft_targets=false", "data.caption_group=2"], "add train.soft_targets=true"),
        (
            ["train.soft_targets=false", "data.caption_group=1", "train.image_supcon_weight=0.5"],
            "or train.image_supcon_weight=0",
        ),
        (["train.caption_proxy_weight=-1"], "train.caption_proxy_weight: must be in [0, 100]"),
        (
            ["train.caption_proxy_temperature=0"],
            "train.caption_proxy_temperature: must be in (0, 10]",
        ),
        (["train.caption_proxy_min_pairs=0"], "train.caption_proxy_min_pairs: must be"),
        (["data.caption_group=0"], "data.caption_group: must be"),
        (["train.image_supcon_weight=-1"], "train.image_supcon_weight: must be in [0, 100]"),
        (
            ["train.image_supcon_temperature=0"],
            "train.image_supcon_temperature: must be in (0, 10]",
        ),
        (["model.image.mixstyle=1.5"], "model.image.mixstyle: must be in [0, 1], got 1.5"),
        (
            ["model.image.backbone=resnet18", "model.image.mixstyle=0.5"],
            "use model.image.mixstyle=0",
        ),
    ],
)
def test_bad_values_say_what_is_wrong(settings, message):
    from coembed.config import load_config
    from coembed.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        load_config("tiny", settings)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_defaults_leave_the_objectives_off():
    from coembed.config import Config
    from coembed.training.loop import style_augment_of
    from coembed.training.views import two_views, view_head_for

    cfg = Config()
    assert cfg.train.soft_targets is False and cfg.train.label_smoothing == 0.0
    assert cfg.train.ema_decay == 0.0 and cfg.train.mlm_weight == 0.0
    assert cfg.train.simclr_weight == 0.0 and cfg.train.multiview is False
    assert cfg.model.image.mixstyle == 0.0 and cfg.data.random_conv_p == 0.0
    assert cfg.data.caption_group == 1 and cfg.train.image_supcon_weight == 0.0
    assert cfg.train.caption_proxy_weight == 0.0
    assert not two_views(cfg) and view_head_for(cfg) is None
    assert not style_augment_of(cfg).active


def test_augment_false_switches_the_recipes_colour_changes_off_too():
    """The tiny recipe jitters colours; ``data.augment=false`` on top of it is accepted and
    leaves every training image as the eval transform makes it, colours included."""
    from coembed.config import load_config
    from coembed.training.loop import style_augment_of

    assert style_augment_of(load_config("tiny")).active
    assert not style_augment_of(load_config("tiny", ["data.augment=false"])).active


@pytest.fixture(scope="module")
def repeated_data(tmp_path_factory):
    """24 pairs: 12 images with two captions each, the captions from 6 phrases."""
    from tests.helpers import copy_images, shipped_rows

    folder = tmp_path_factory.mktemp("repeated")
    rows = shipped_rows(12)
    copy_images(rows, folder / "images")
    phrases = [f"{c} shapes on a plain background" for c in ("red", "blue", "green")]
    table = [(f"images/{a}", phrases[(i + k) % 3]) for i, (a, _) in enumerate(rows) for k in (0, 1)]
    return write_csv(folder / "train.csv", table)


@pytest.fixture
def process_settings_kept():
    """Training in this process sets its threads and deterministic mode: put them back after."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


@pytest.mark.parametrize(
    "settings",
    [
        ["train.soft_targets=true"],
        ["train.label_smoothing=0.1"],
        ["data.color_jitter=0.4", "data.grayscale_p=0.3", "data.blur_p=0.5"],
        ["data.color_jitter=0.4", "data.grayscale_p=0.3", "data.spare_color_captions=false"],
        ["train.ema_decay=0.9"],
        ["train.mlm_weight=0.5", "model.text.dropout=0.1", "train.accum_steps=2"],
        ["train.simclr_weight=0.5", "data.color_jitter=0.4"],
        ["train.multiview=true"],
        ["model.image.mixstyle=0.5"],
        ["data.random_conv_p=0.5"],
        ["model.image.mixstyle=0.5", "train.grad_checkpointing=true", "train.accum_steps=2"],
        ["train.feature_memory=12"],
        ["train.feature_memory=20", "train.soft_targets=true", "train.accum_steps=2"],
        ["train.soft_targets=true", "data.caption_group=2", "train.image_supcon_weight=0.5"],
        ["train.soft_targets=true", "train.image_supcon_weight=1", "train.accum_steps=2"],
        ["train.caption_proxy_weight=1"],
        ["train.caption_proxy_weight=0.5", "train.accum_steps=2", "train.mlm_weight=0.5"],
        ["train.cyclic_weight=0.25", "train.soft_targets=true", "train.accum_steps=2"],
        ["train.caption_word_dropout=0.3", "train.soft_targets=true", "train.accum_steps=2"],
    ],
    ids=str,
)
def test_resume_is_bitwise_exact_with_the_objective_on(
    settings, repeated_data, tmp_path, process_settings_kept
):
    """Six steps straight, against three steps then a resume from the step-3 checkpoint (the
    later checkpoint and the model removed, as a kill would have left them)."""
    import shutil

    import coembed
    from coembed.config import load_config

    overrides = [
        *TINY,
        "model.text.layers=1",
        "train.batch_size=8",
        "train.steps=6",
        "train.warmup_steps=1",
        "train.checkpoint_every=3",
        "train.keep_checkpoints=3",
        "train.device=cpu",
        "train.precision=fp32",
        "train.deterministic=true",
        "train.threads=1",
        "data.workers=0",
        *settings,
    ]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    for out in (reference, resumed):
        coembed.train(load_config("tiny", overrides), repeated_data, out)
    shutil.rmtree(resumed / "checkpoints" / "step-0000006")
    (resumed / "model.safetensors").unlink()
    summary = coembed.train(None, None, resumed, resume=True)
    assert summary["steps"] == 6
    want, got = weights(reference), weights(resumed)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    losses = [(m["step"], m["loss"]) for m in metrics(resumed) if "loss" in m]
    assert losses == [(m["step"], m["loss"]) for m in metrics(reference) if "loss" in m]
    # The whole last checkpoint too: weights, optimizer, generator (and moving average).
    last = Path("checkpoints") / "step-0000006"
    files = sorted(p.name for p in (reference / last).glob("*.safetensors"))
    assert files == sorted(p.name for p in (resumed / last).glob("*.safetensors"))
    for name in files:
        want, got = load_file(str(reference / last / name)), load_file(str(resumed / last / name))
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


# --- style mixing ---------------------------------------------------------------------------------


def styled_features() -> torch.Tensor:
    """(6, 4, 5, 5) features whose images differ in per-channel mean and spread."""
    g = torch.Generator().manual_seed(3)
    scale = torch.rand(6, 4, 1, 1, generator=g) * 3 + 0.5
    shift = torch.randn(6, 4, 1, 1, generator=g) * 4
    return torch.randn(6, 4, 5, 5, generator=g) * scale + shift


def statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(dim=(2, 3), keepdim=True), (x.var(dim=(2, 3), keepdim=True) + 1e-6).sqrt()


def test_mixstyle_mixes_the_statistics_and_keeps_the_content():
    """At p=1 each image's channel means and spreads become weight x its own + (1 - weight) x its
    partner's, from the same draws (Beta weights, then a permutation) the module makes; the
    normalized content is unchanged; gradients reach the input through the content only."""
    from coembed.towers.image import MixStyle

    x = styled_features().requires_grad_(True)
    torch.manual_seed(11)
    y = MixStyle(1.0, alpha=0.1).train()(x)
    torch.manual_seed(11)
    torch.rand(())  # the draw that decides whether to mix
    weight = torch.distributions.Beta(0.1, 0.1).sample((6, 1, 1, 1))
    partner = torch.randperm(6)
    mean, std = statistics(x.detach())
    want_mean = weight * mean + (1 - weight) * mean[partner]
    want_std = weight * std + (1 - weight) * std[partner]
    torch.testing.assert_close(y, (x - mean) / std * want_std + want_mean, rtol=1e-5, atol=1e-5)
    assert not torch.equal(partner, torch.arange(6))  # some image took another's style
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
    (y * upstream).sum().backward()
    # With the statistics held fixed, d y / d x is want_std / std on every element.
    torch.testing.assert_close(x.grad, upstream * want_std / std, rtol=1e-5, atol=1e-6)


def test_mixstyle_is_identity_in_eval_at_zero_and_for_one_image():
    from coembed.towers.image import MixStyle

    x = styled_features()
    assert torch.equal(MixStyle(1.0).eval()(x), x)
    assert torch.equal(MixStyle(0.0).train()(x), x)
    assert torch.equal(MixStyle(1.0).train()(x[:1]), x[:1])


def test_mixstyle_keeps_fp16_features_fp16():
    """Under autocast the trunk's features are half precision: the mix is computed in fp32 and
    handed back in the features' dtype."""
    from coembed.towers.image import MixStyle

    x = (styled_features() * 100).half()
    y = MixStyle(1.0).train()(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()


def test_mixstyle_leaves_the_saved_model_alone(tmp_path):
    """A training-time stage: no weights, the same state dict keys, the same eval output."""
    from coembed.config import load_config
    from coembed.model import CoEmbed

    plain_cfg = load_config("tiny", [*TINY, "model.text.eot_id=2"])
    mixed_cfg = load_config("tiny", [*TINY, "model.text.eot_id=2", "model.image.mixstyle=1"])
    torch.manual_seed(0)
    plain = CoEmbed(plain_cfg.model).eval()
    torch.manual_seed(0)
    mixed = CoEmbed(mixed_cfg.model).eval()
    assert plain.state_dict().keys() == mixed.state_dict().keys()
    images = torch.randn(4, 3, 32, 32)
    assert torch.equal(plain.encode_image(images), mixed.encode_image(images))
    mixed.train()
    assert not torch.equal(plain.train().encode_image(images), mixed.encode_image(images))


# --- the weights' moving average ----------------------------------------------------------------


def test_ema_update_follows_the_formula_and_copies_buffers():
    from coembed.training.ema import WeightAverage, ema_decay_at

    run = tiny_train_run(REPEATED, TINY)
    model = run.raw_model
    ema = WeightAverage(model, decay=0.9)
    start = {k: v.clone() for k, v in ema.model.state_dict().items()}
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in ema.model.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model.visual.trunk.bn1.running_mean.fill_(3.0)
    ema.update(model, step=1)
    d = ema_decay_at(0.9, 1)
    assert d == pytest.approx(2 / 11)  # still warming up: (1 + t) / (10 + t)
    assert ema_decay_at(0.9, 1000) == 0.9
    for name, p in ema.model.named_parameters():
        torch.testing.assert_close(p, start[name] + (1 - d), rtol=0, atol=1e-6, msg=name)
    assert torch.equal(
        ema.model.visual.trunk.bn1.running_mean,
        torch.full_like(start["visual.trunk.bn1.running_mean"], 3.0),
    )
    # The model's own weights are its own: the average holds a copy.
    assert all(
        p.data_ptr() != q.data_ptr() for p, q in zip(ema.model.parameters(), model.parameters())
    )


def test_ema_in_training_steps_averages_the_trained_weights_and_gets_no_gradient():
    from coembed.training.ema import WeightAverage, ema_decay_at
    from coembed.training.step import train_step

    run = tiny_train_run(REPEATED, [*TINY, "train.device=cpu", "train.warmup_steps=0"])
    run.total_steps, run.ema = 4, WeightAverage(run.raw_model, 0.5)
    want = {k: p.detach().clone() for k, p in run.raw_model.named_parameters()}
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for step in range(1, 4):
        train_step(run, images, REPEATED)
        d = ema_decay_at(0.5, step)
        for k, p in run.raw_model.named_parameters():
            want[k] = d * want[k] + (1 - d) * p.detach()
    for k, p in run.ema.model.named_parameters():
        torch.testing.assert_close(p, want[k], rtol=1e-6, atol=1e-7, msg=k)
        assert p.grad is None
    trained = dict(run.raw_model.named_parameters())
    assert any(not torch.equal(p, trained[k]) for k, p in run.ema.model.named_parameters())


def test_validation_scores_the_moving_average():
    import numpy as np

    from coembed.evaluate import retrieval_metrics
    from coembed.training.ema import WeightAverage
    from coembed.training.inputs import Validation
    from coembed.training.log import validate_run

    run = tiny_train_run(REPEATED, TINY)
    run.ema = WeightAverage(run.raw_model, 0.9)
    with torch.no_grad():
        for p in run.raw_model.parameters():  # trained weights far from their average
            p.normal_(generator=torch.Generator().manual_seed(3))
    pixels = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    run.val = Validation(pixels, DISTINCT, np.arange(8))

    def scores(model) -> dict:
        model.eval()
        with torch.no_grad():
            image = model.encode_image(pixels).numpy()
            text = model.encode_text(run.tokenizer(DISTINCT)).numpy()
        return retrieval_metrics(image, text, np.arange(8))

    got = validate_run(run)
    assert got == scores(run.ema.model) and got != scores(run.raw_model)


def test_saved_model_is_the_moving_average(repeated_data, tmp_path, process_settings_kept):
    """The run folder's model directory holds the average (ema.safetensors of the last
    checkpoint), not the trained weights beside it."""
    import coembed
    from coembed.config import load_config

    out = tmp_path / "run"
    settings = ["model.text.layers=1", "train.batch_size=8", "train.steps=4", "train.ema_decay=0.5"]
    coembed.train(
        load_config("tiny", [*TINY, *settings, "data.workers=0", "train.device=cpu"]),
        repeated_data,
        out,
    )
    final, last = weights(out), out / "checkpoints" / "step-0000004"
    average, trained = (
        load_file(str(last / "ema.safetensors")),
        load_file(str(last / "model.safetensors")),
    )
    assert final.keys() == average.keys() == trained.keys()
    assert all(torch.equal(final[k], average[k]) for k in final)
    assert any(not torch.equal(final[k], trained[k]) for k in final)
    loaded = coembed.load(out)  # and it loads as a model
    assert loaded.embed_texts(["a red square"]).shape == (1, 32)


def test_moving_average_loss_falls_on_a_tiny_set():
    from coembed.training.ema import WeightAverage
    from coembed.training.step import train_step

    run = tiny_train_run(DISTINCT, [*TINY, "train.device=cpu", "train.warmup_steps=0"])
    run.total_steps, run.ema = 30, WeightAverage(run.raw_model, 0.8)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = run.tokenizer(DISTINCT)

    def average_loss() -> float:
        # Scored as the training loss is, BatchNorm on the batch's statistics: running
        # statistics of 30 batches of noise would not describe this one.
        run.ema.model.train()
        with torch.no_grad():
            loss = float(run.loss_fn(**run.ema.model(images, tokens)))
        run.ema.model.eval()
        return loss

    before = average_loss()
    for _ in range(30):
        train_step(run, images, DISTINCT)
    assert average_loss() < 0.7 * before


# --- masked language modelling ---------------------------------------------------------------------


def test_masked_token_logits_see_both_ways_but_not_the_hidden_tokens():
    """Shapes (M, vocab); a hidden token's own id does not reach its logits; a token after it
    does, although the tower's attention is causal (the objective's pass is bidirectional)."""
    run = tiny_train_run(DISTINCT, TINY)
    text = run.raw_model.text.eval()
    tokens = run.tokenizer(DISTINCT[:2])  # (2, T)
    hidden = torch.zeros_like(tokens, dtype=torch.bool)
    hidden[:, 2] = True
    assert text.cfg.attention == "causal"
    with torch.no_grad():
        logits = text.masked_token_logits(tokens, hidden)
        assert logits.shape == (2, text.cfg.vocab_size)
        swapped = tokens.clone()
        swapped[:, 2] = 7
        assert torch.equal(text.masked_token_logits(swapped, hidden), logits)
        later = tokens.clone()
        later[:, 3] = 7
        assert not torch.allclose(text.masked_token_logits(later, hidden), logits)


def test_mlm_gradients_reach_the_text_tower_and_nothing_else():
    import torch.nn.functional as F

    run = tiny_train_run(DISTINCT, TINY)
    model = run.raw_model
    tokens = run.tokenizer(DISTINCT)
    hidden = torch.zeros_like(tokens, dtype=torch.bool)
    hidden[:, 1:3] = True
    F.cross_entropy(model.text.masked_token_logits(tokens, hidden), tokens[hidden]).backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "text.token_embedding.weight" in got and "text.ln_final.weight" in got
    assert all(f"text.blocks.{i}.attn.qkv.weight" in got for i in range(len(model.text.blocks)))
    assert not any(n.startswith("visual.") for n in got)
    assert not {"logit_scale", "text.proj.weight"} & got


def test_mlm_hides_inner_caption_tokens_from_its_own_generator():
    from coembed.training.step import MLM_RATE, mlm_hidden

    run = tiny_train_run(DISTINCT, [*TINY, "train.mlm_weight=1"])
    tokens = run.tokenizer(DISTINCT * 8)  # (64, T)
    eot = run.raw_model.text.end_positions(tokens)
    state = torch.get_rng_state()
    hidden = mlm_hidden(run, tokens)
    assert torch.equal(torch.get_rng_state(), state)  # torch's generator untouched
    positions = torch.arange(tokens.shape[1])
    assert not (hidden & ((positions == 0) | (positions >= eot[:, None]))).any()
    inner = int(((positions > 0) & (positions < eot[:, None])).sum())
    assert 0.5 * MLM_RATE < hidden.sum() / inner < 1.5 * MLM_RATE
    assert torch.equal(mlm_hidden(run, tokens), hidden)  # a function of (seed, step, rank)
    run.step += 1
    assert not torch.equal(mlm_hidden(run, tokens), hidden)
    run.cfg.train.mlm_weight = 0.0
    assert mlm_hidden(run, tokens) is None


def test_mlm_through_accumulation_equals_one_batch():
    """BatchNorm in eval mode, so two micro-batches normalize as one batch: the accumulated
    gradients and loss (contrastive + each micro-batch's share of the token mean) are the whole
    batch's."""
    from coembed.training.step import accumulated_backward, forward_loss, mlm_hidden

    settings = [*TINY, "train.device=cpu", "train.mlm_weight=0.5", "train.accum_steps=2"]
    run = tiny_train_run(DISTINCT, settings, batchnorm_eval=True)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = run.tokenizer(DISTINCT)
    hidden = mlm_hidden(run, tokens)
    assert hidden[:4].sum() != hidden[4:].sum()  # unequal shares: the weighting matters
    whole = forward_loss(run, images, tokens, None, hidden)
    whole.backward()
    expected = {k: p.grad.clone() for k, p in run.model.named_parameters()}
    contrastive = forward_loss(run, images, tokens)
    run.model.zero_grad(set_to_none=True)
    got = accumulated_backward(run, images, tokens, None, hidden)
    assert float(got) == pytest.approx(float(whole), rel=1e-6)
    assert float(whole) > float(contrastive) + 0.1  # the token loss is in it
    for name, p in run.model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_mlm_loss_falls_on_a_tiny_set():
    import torch.nn.functional as F

    from coembed.training.step import train_step

    settings = [*TINY, "train.device=cpu", "train.warmup_steps=0", "train.mlm_weight=1"]
    settings.append("train.lr=3e-3")
    run = tiny_train_run(DISTINCT, settings)
    run.total_steps = 30
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = run.tokenizer(DISTINCT)
    hidden = torch.zeros_like(tokens, dtype=torch.bool)
    hidden[:, 2] = True  # the number in "caption number i of ..."

    def token_loss() -> float:
        with torch.no_grad():
            logits = run.raw_model.text.masked_token_logits(tokens, hidden)
            return float(F.cross_entropy(logits, tokens[hidden]))

    before = token_loss()
    for _ in range(30):
        train_step(run, images, DISTINCT)
    # Each step hides only 15% of the tokens and the tied head moves the inputs too: slower
    # than the contrastive loss, but falling (from log of the vocabulary, 6.3).
    assert token_loss() < 0.85 * before


# --- a second view of each image (SLIP's NT-Xent, DeCLIP's multi-view) -----------------------------

# Two images' two views (unit vectors) and the temperature of the hand computation.
FIRST_VIEWS = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]
SECOND_VIEWS = [[0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]]
TEMPERATURE = 0.5


def hand_nt_xent(first: list[list[float]], second: list[list[float]], t: float) -> float:
    """SimCLR's NT-Xent by its definition, one row at a time, in plain Python."""
    views = first + second
    n = len(first)
    total = 0.0
    for i, a in enumerate(views):
        partner = (i + n) % (2 * n)
        sims = {j: sum(x * y for x, y in zip(a, b)) / t for j, b in enumerate(views) if j != i}
        total += -sims[partner] + math.log(sum(math.exp(s) for s in sims.values()))
    return total / (2 * n)


def test_nt_xent_equals_hand_computation():
    from coembed.loss import nt_xent

    first, second = (torch.tensor(v, dtype=torch.float64) for v in (FIRST_VIEWS, SECOND_VIEWS))
    got = float(nt_xent(first, second, TEMPERATURE))
    assert got == pytest.approx(hand_nt_xent(FIRST_VIEWS, SECOND_VIEWS, TEMPERATURE), rel=1e-12)
    # Lengths do not matter (cosine similarity); the temperature does.
    assert float(nt_xent(3 * first, second, TEMPERATURE)) == pytest.approx(got, rel=1e-12)
    assert float(nt_xent(first, second, 1.0)) != pytest.approx(got, rel=1e-3)


def nt_xent_worker(rank: int, world: int, port: int, queue) -> None:
    from coembed.training.run import Dist
    from coembed.training.views import average_head_gradients

    with gloo_group(rank, world, port):
        head, (first, second) = nt_xent_case()
        rows = slice(rank * 4, (rank + 1) * 4)
        loss = nt_xent_of(head, first[rows], second[rows])
        loss.backward()
        # The head is outside DDP: the run averages its gradients itself.
        run = SimpleNamespace(view_head=head, dist=Dist(rank, world), heads=lambda: [head])
        average_head_gradients(run)
        total = loss.detach().clone()
        dist.all_reduce(total)
        queue.put((rank, float(total) / world, [p.grad.numpy().copy() for p in head.parameters()]))


def nt_xent_case() -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A seeded projection head and two views (8, 8) of eight images."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 6).double()
    g = torch.Generator().manual_seed(5)
    return head, tuple(torch.randn(8, 8, generator=g, dtype=torch.float64) for _ in range(2))


def nt_xent_of(head: torch.nn.Module, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    from coembed.loss import nt_xent

    return nt_xent(head(first), head(second), 0.2)


def test_nt_xent_across_two_processes_matches_one_process():
    """Each rank's rows against the gathered views of both: the mean over the ranks is the
    whole batch's loss, and the averaged head gradients are the whole batch's."""
    results = run_two_processes(nt_xent_worker)
    head, (first, second) = nt_xent_case()
    loss = nt_xent_of(head, first, second)
    loss.backward()
    for _, mean_loss, grads in results:
        assert abs(mean_loss - loss.item()) < 1e-9
        for g, p in zip(grads, head.parameters()):
            torch.testing.assert_close(torch.from_numpy(g), p.grad, atol=1e-9, rtol=0)


def test_second_view_comes_after_the_first_views_draws(tmp_path):
    """With a second view the batch is (2B) images: the first B exactly as without it (the
    generator draws them first), then other crops of the same images."""
    from coembed.data.formats import read_records
    from coembed.data.loader import PairData
    from coembed.data.transforms import StyleAugment
    from tests.helpers import copy_images, shipped_rows

    rows = shipped_rows(4)
    copy_images(rows, tmp_path / "images")
    table = [(f"images/{a}", caption) for a, caption in rows]
    records, _ = read_records(str(write_csv(tmp_path / "pairs.csv", table)), "filepath", "caption")
    data = PairData.from_records(records, 32, cache_dir=None, num_workers=0)
    style = StyleAugment(color_jitter=0.4)

    def first_batch(second_view: bool) -> torch.Tensor:
        kwargs = {"crop_scale_min": 0.3, "style": style, "second_view": second_view}
        return next(iter(data.epoch_batches(0, 0, 4, **kwargs)))[0]

    one, two = first_batch(False), first_batch(True)
    assert one.shape == (4, 3, 32, 32) and two.shape == (8, 3, 32, 32)
    assert torch.equal(two[:4], one)
    assert all(not torch.allclose(two[i], two[i + 4]) for i in range(4))


VIEWS = [*TINY, "train.device=cpu", "train.warmup_steps=0"]


def two_view_images() -> torch.Tensor:
    """Eight images' two views: (16, 3, 32, 32), the first views on top."""
    return torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_simclr_shapes_and_gradients_reach_the_image_tower_and_head_not_the_text():
    from coembed.training.step import forward_loss
    from coembed.training.views import simclr_term

    run = tiny_train_run(DISTINCT, [*VIEWS, "train.simclr_weight=0.5"])
    tokens = run.tokenizer(DISTINCT)
    out = run.model(two_view_images(), tokens)
    assert out["image_features"].shape == (16, 32) and out["text_features"].shape == (8, 32)
    first, second = out["image_features"].chunk(2)
    assert run.view_head(first).shape == (8, 32)
    simclr_term(run, first, second).backward()
    got = {n for n, p in run.model.named_parameters() if p.grad is not None and p.grad.abs().sum()}
    assert any(n.startswith("visual.trunk") for n in got)
    assert not any(n.startswith("text.") for n in got) and "logit_scale" not in got
    assert all(p.grad.abs().sum() > 0 for p in run.view_head.parameters())
    run.optimizer.zero_grad(set_to_none=True)
    loss = forward_loss(run, two_view_images(), tokens)
    assert loss.shape == ()
    loss.backward()  # the contrastive term reaches the text tower
    assert run.raw_model.text.token_embedding.weight.grad.abs().sum() > 0
    # The head is trained by the run's optimizer, and counted in the gradient norm.
    trained = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in trained for p in run.view_head.parameters())
    assert len(run.trained_parameters()) == len(list(run.model.parameters())) + 4


def test_multiview_loss_is_the_mean_of_both_views_against_the_captions():
    from coembed.training.step import forward_loss

    run = tiny_train_run(DISTINCT, [*VIEWS, "train.multiview=true"], batchnorm_eval=True)
    assert run.view_head is None  # multi-view alone has no projection head
    tokens = run.tokenizer(DISTINCT)
    images = two_view_images()
    with torch.no_grad():
        got = float(forward_loss(run, images, tokens))
        one, two = (run.model(x, tokens) for x in images.chunk(2))
        want = (float(run.loss_fn(**one)) + float(run.loss_fn(**two))) / 2
    assert got == pytest.approx(want, rel=1e-5)
    assert abs(float(run.loss_fn(**one)) - want) > 1e-4  # the second view counts


@pytest.mark.parametrize("settings", [["train.simclr_weight=1"], ["train.multiview=true"]], ids=str)
def test_two_view_loss_falls_on_a_tiny_set(settings):
    from coembed.training.step import train_step

    run = tiny_train_run(DISTINCT, [*VIEWS, *settings])
    run.total_steps = 12
    images = two_view_images()
    losses = [train_step(run, images, DISTINCT)[0] for _ in range(12)]
    assert losses[-1] < 0.7 * losses[0], losses


def test_simclr_head_is_checkpointed_but_not_in_the_model(
    repeated_data, tmp_path, process_settings_kept
):
    import coembed
    from coembed.config import load_config

    settings = [*TINY, "train.batch_size=8", "train.steps=2", "train.device=cpu"]
    settings += ["train.simclr_weight=0.5", "data.workers=0", "train.threads=1"]
    coembed.train(load_config("tiny", settings), repeated_data, tmp_path / "run")
    head = load_file(
        str(tmp_path / "run" / "checkpoints" / "step-0000002" / "view_head.safetensors")
    )
    assert set(head) == {"hidden.weight", "hidden.bias", "out.weight", "out.bias"}
    # The model directory holds the model alone, and loads (strictly: no tensor left over).
    embedder = coembed.load(tmp_path / "run", device="cpu")
    assert set(weights(tmp_path / "run")) == set(embedder.model.state_dict())
    assert embedder.embed_texts(["red shapes"]).shape == (1, 32)


def test_word_dropout_leaves_words_out_from_its_own_generator():
    from coembed.training.step import dropped_words

    run = tiny_train_run(DISTINCT, [*TINY, "train.caption_word_dropout=0.3"])
    captions = [*DISTINCT, "one", "two words"] * 30
    state = torch.get_rng_state()
    shown = dropped_words(run, captions)
    assert torch.equal(torch.get_rng_state(), state)  # torch's generator untouched
    words = kept = 0
    for caption, dropped in zip(captions, shown):
        whole = caption.split()
        left = dropped.split()
        rest = iter(whole)
        assert left and all(w in rest for w in left)  # the caption's words in order, not none
        words, kept = words + len(whole), kept + len(left)
    assert 0.6 < kept / words < 0.8  # about 70% of the words stay
    assert all(d == "one" for c, d in zip(captions, shown) if c == "one")
    assert dropped_words(run, captions) == shown  # a function of (seed, step, rank)
    run.step += 1
    assert dropped_words(run, captions) != shown
    run.cfg.train.caption_word_dropout = 0.0
    assert dropped_words(run, captions) is captions


def test_word_dropout_keeps_one_word_of_a_caption_and_positives_of_whole_captions(monkeypatch):
    """At a dropout of 1 each caption keeps one of its words; the text tower reads those while
    the soft targets' positives follow the whole captions (REPEATED holds three captions)."""
    from coembed.training import step

    seen = {}
    positives, original = step.batch_positives, step.forward_loss

    def keys(run, tokens, image_ids):
        seen["keys"] = tokens
        return positives(run, tokens, image_ids)

    monkeypatch.setattr(step, "batch_positives", keys)

    def spy(run, images, tokens, *args):
        seen["read"] = tokens
        return original(run, images, tokens, *args)

    monkeypatch.setattr(step, "forward_loss", spy)
    run = tiny_train_run(REPEATED, [*TINY, "train.caption_word_dropout=1", "train.device=cpu"])
    assert all(len(c.split()) == 1 for c in step.dropped_words(run, REPEATED))
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    step.train_step(run, images, REPEATED)
    assert torch.equal(seen["keys"], run.tokenizer(REPEATED))
    run.step = 0
    assert torch.equal(seen["read"], run.tokenizer(step.dropped_words(run, REPEATED)))
    assert not torch.equal(seen["read"], seen["keys"])


def test_word_dropout_setting_is_bounded():
    from coembed.config import load_config
    from coembed.errors import ConfigError

    with pytest.raises(ConfigError, match="train.caption_word_dropout"):
        load_config("tiny", ["train.caption_word_dropout=1.5"])
    assert load_config("tiny", []).train.caption_word_dropout == 0.0
