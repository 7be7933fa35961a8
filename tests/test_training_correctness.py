"""Training against CLIP's reference behaviour: every config field reaches something, the crop
scale reaches the batches, accumulation with dropout equals one batch, the sigmoid loss starts
where SigLIP starts, weight decay skips gains and positions, PIL images decode like files, and
streamed batches never hold a pair twice.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import TINY, copy_images, shipped_rows, tiny_train_run, write_csv

# --- every config field changes something ---------------------------------------------------------

# The tiny shapes, a batch of 4 from 12 pairs, three steps with a log line and a checkpoint each.
BASE = [
    *TINY,
    "train.batch_size=4",
    "train.steps=3",
    "train.warmup_steps=1",
    "train.log_every=1",
    "train.checkpoint_every=1",
    "train.keep_checkpoints=3",
    "train.device=cpu",
    "train.precision=fp32",
    "data.workers=0",
]


@dataclass(frozen=True)
class Probe:
    """Set ``field`` to ``value`` (with ``also`` beside it, on top of ``base``) and what ``look``
    sees of ``stage`` must change: "model" builds CoEmbed from the config, "build" assembles the
    run as ``coembed train`` does, "train" trains its three steps."""

    field: str
    value: object
    stage: str
    look: Callable[[dict], object]
    base: tuple[str, ...] = ()
    also: tuple[str, ...] = ()
    error_ok: bool = False  # the change may stop the run with a CoembedError instead


def _model_output(seen: dict) -> object:
    return seen["model"]


def _trainable(seen: dict) -> object:
    return seen["trainable"]


def _group(key: str) -> Callable[[dict], object]:
    return lambda seen: [g[key] for g in seen["groups"]]


def _first_batch(seen: dict) -> object:
    return seen["first_batch"]


def _lrs(seen: dict) -> object:
    return [m["lr"] for m in seen["metrics"] if "lr" in m]


def _weights(seen: dict) -> object:
    return seen["weights"]


MODEL_FIELDS = {
    "model.embed_dim": 16,
    "model.init_logit_scale": 1.0,
    "model.init_logit_bias": -5.0,
    "model.max_logit_scale": 20.0,
    "model.text.vocab_size": 600,
    "model.text.context_length": 12,
    "model.text.width": 16,
    "model.text.layers": 1,
    "model.text.heads": 4,
    "model.text.mlp_ratio": 2.0,
    "model.text.act": "quick_gelu",
    "model.text.positional": "sinusoidal",
    "model.text.attention": "bidirectional",
    "model.text.pool": "mean",
    "model.text.dropout": 0.5,
    "model.text.eot_id": 7,
    "model.image.backbone": "resnet18",
    "model.image.layers": [1, 2, 1, 1],
    "model.image.width": 16,
    "model.image.image_size": 64,
    "model.image.heads": 2,
    "model.image.pool": "avg",
}

PROBES = [
    *(Probe(field, value, "model", _model_output) for field, value in MODEL_FIELDS.items()),
    Probe("model.tokenizer", "clip", "build", lambda s: s["vocab"], also=("model.text.vocab_size=49408",)),
    # A training-time stage: the model's output is the same, the training losses are not.
    Probe("model.image.mixstyle", 1.0, "train", lambda s: s["losses"]),
    Probe("data.image_key", "picture", "build", lambda s: s["sources"]),
    Probe("data.caption_key", "title", "build", lambda s: s["captions"]),
    Probe("data.cache_dir", "{tmp}/elsewhere", "build", lambda s: s["cache_files"]),
    Probe("data.max_cache_gb", 0.0, "build", lambda s: s["streaming"]),
    Probe("data.workers", 1, "build", lambda s: s["workers"]),
    Probe("data.train_num_samples", 8, "build", lambda s: s["total_steps"], error_ok=True),
    Probe("data.augment", False, "train", _first_batch),
    Probe("data.crop_scale_min", 0.5, "train", _first_batch),
    Probe("data.cache_scale", 2.0, "build", lambda s: s["cache_files"]),
    # The shipped captions name colours: the colour-moving changes are seen with sparing off.
    Probe("data.color_jitter", 0.5, "train", _first_batch, base=("data.spare_color_captions=false",)),
    Probe("data.grayscale_p", 1.0, "train", _first_batch, base=("data.spare_color_captions=false",)),
    Probe("data.blur_p", 1.0, "train", _first_batch),
    Probe("data.random_conv_p", 1.0, "train", _first_batch, base=("data.spare_color_captions=false",)),
    Probe("data.spare_color_captions", False, "train", _first_batch, base=("data.color_jitter=0.5",)),
    Probe("data.prefetch", 0, "train", lambda s: s["prefetch_thread"]),
    Probe("train.batch_size", 6, "build", lambda s: (s["per_rank_batch"], s["batches"])),
    Probe("train.steps", 5, "build", lambda s: s["total_steps"]),
    Probe("train.epochs", 2, "build", lambda s: s["total_steps"], base=("train.steps=0", "train.epochs=1")),
    Probe("train.lr", 1e-2, "train", _lrs),
    Probe("train.weight_decay", 0.3, "build", _group("weight_decay")),
    Probe("train.beta1", 0.5, "build", _group("betas")),
    Probe("train.beta2", 0.9, "build", _group("betas")),
    Probe("train.eps", 1e-3, "build", _group("eps")),
    Probe("train.warmup_steps", 2, "train", _lrs),
    Probe("train.schedule", "constant", "train", _lrs),
    Probe("train.cooldown_steps", 2, "train", _lrs, base=("train.schedule=const-cooldown", "train.cooldown_steps=1")),
    Probe("train.grad_clip", 1e-3, "train", _weights),
    Probe("train.accum_steps", 2, "train", _weights),
    Probe("train.loss", "siglip", "train", lambda s: s["losses"]),
    # On the CPU every precision trains in fp32: what it chooses on a GPU.
    Probe("train.precision", "bf16", "build", lambda s: s["cuda_autocast"]),
    Probe("train.device", "cuda", "build", lambda s: s["device"], error_ok=True),  # none here
    Probe("train.seed", 1, "build", _model_output),
    Probe("train.checkpoint_every", 2, "train", lambda s: s["checkpoints"]),
    Probe("train.keep_checkpoints", 1, "train", lambda s: s["checkpoints"]),
    Probe("train.log_every", 2, "train", lambda s: [m["step"] for m in s["metrics"] if "lr" in m]),
    Probe("train.lock_image", True, "build", _trainable),
    Probe("train.lock_image_unlocked_groups", 2, "build", _trainable, base=("train.lock_image=true",)),
    Probe("train.lock_text", True, "build", _trainable),
    Probe("train.lock_text_unlocked_layers", 1, "build", _trainable, base=("train.lock_text=true",)),
    Probe("train.compile", True, "build", lambda s: s["wrapper"]),
    Probe("train.channels_last", False, "build", lambda s: s["conv_layout"]),
    Probe("train.threads", 7, "build", lambda s: s["threads"]),
    Probe("train.reuse_memory", False, "build", lambda s: s["keeps_freed_memory"]),
    Probe("train.deterministic", True, "build", lambda s: s["deterministic"]),
    Probe("train.grad_checkpointing", True, "build", lambda s: s["recompute"]),
    # Two topics among the 12 captions: every batch of 4 holds one caption twice.
    Probe("train.soft_targets", True, "train", lambda s: s["losses"], base=("data.caption_key=topic",)),
    Probe("train.label_smoothing", 0.1, "train", lambda s: s["losses"]),
    Probe("train.ema_decay", 0.9, "train", _weights),
    Probe("train.mlm_weight", 0.5, "train", lambda s: s["losses"]),
    Probe("train.caption_word_dropout", 0.5, "train", lambda s: s["losses"]),
    Probe("train.simclr_weight", 0.5, "train", lambda s: s["losses"]),
    Probe("train.simclr_temperature", 0.5, "train", lambda s: s["losses"], base=("train.simclr_weight=1",)),
    Probe("train.feature_memory", 16, "train", lambda s: s["losses"]),
    Probe("train.multiview", True, "train", lambda s: s["losses"]),
    Probe("train.caption_proxy_weight", 1.0, "train", lambda s: s["losses"], base=("data.caption_key=topic",)),
    Probe("train.caption_proxy_temperature", 0.5, "train", lambda s: s["losses"], base=("data.caption_key=topic", "train.caption_proxy_weight=1")),
    # The 12 probe captions are distinct: with proxies for single captions too the loss changes.
    Probe("train.caption_proxy_min_pairs", 1, "train", lambda s: s["losses"], base=("train.caption_proxy_weight=1",)),
    Probe("data.caption_group", 2, "train", _first_batch, base=("data.caption_key=topic", "train.soft_targets=true")),
    Probe("train.cyclic_weight", 1.0, "train", lambda s: s["losses"]),
    Probe("train.image_supcon_weight", 1.0, "train", lambda s: s["losses"], base=("data.caption_key=topic", "train.soft_targets=true")),
    Probe("train.image_supcon_temperature", 0.5, "train", lambda s: s["losses"], base=("data.caption_key=topic", "train.soft_targets=true", "train.image_supcon_weight=1")),
]  # fmt: skip
PROBE_OF = {p.field: p for p in PROBES}


def config_fields() -> list[str]:
    """Every leaf of coembed.config.Config, as ``section.name`` paths."""
    from coembed.config import Config

    def leaves(obj: object, prefix: str) -> list[str]:
        out = []
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            path = f"{prefix}{f.name}"
            out += leaves(value, path + ".") if dataclasses.is_dataclass(value) else [path]
        return out

    return leaves(Config(), "")


@pytest.fixture(scope="module")
def probe_data(tmp_path_factory) -> Path:
    """12 shipped pairs; ``picture`` and ``title`` hold another row's image and caption,
    ``topic`` one of two captions."""
    folder = tmp_path_factory.mktemp("probe-data")
    rows = shipped_rows(12)
    copy_images(rows, folder / "images")
    shifted = rows[1:] + rows[:1]
    table = [
        (f"images/{a}", b, f"images/{c}", f"{d} again", f"topic {i % 2}")
        for i, ((a, b), (c, d)) in enumerate(zip(rows, shifted))
    ]
    return write_csv(
        folder / "train.csv", table, header=("filepath", "caption", "picture", "title", "topic")
    )


def _model_signature(model: torch.nn.Module, cfg) -> list:
    """Parameter shapes, the temperature after clamping, and both towers' output on fixed input."""
    T, S = cfg.model.text.context_length, cfg.model.image.image_size
    tokens = torch.zeros(2, T, dtype=torch.long)  # (2, T): two captions ending in id 2 or 7
    tokens[0, :6] = torch.tensor([1, 5, 7, 9, 2, 4])
    tokens[1, :4] = torch.tensor([1, 9, 7, 2])
    tokens %= cfg.model.text.vocab_size
    images = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)  # dropout
    with torch.no_grad():
        out = model.train()(images, tokens)
        model.logit_scale.fill_(10.0)
        model.clamp_logit_scale()
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    values = {k: v.flatten()[:8].tolist() for k, v in out.items()}
    return [shapes, values, model.logit_scale.item()]


def _look_model(overrides: list[str]) -> dict:
    from coembed.config import load_config
    from coembed.model import CoEmbed

    cfg = load_config("tiny", overrides)
    torch.manual_seed(0)
    return {"model": _model_signature(CoEmbed(cfg.model), cfg)}


def _look_build(overrides: list[str], data: Path, out: Path, monkeypatch) -> dict:
    """What ``build_run`` assembles: model, optimizer, data, schedule length, process settings."""
    from coembed import process
    from coembed.config import load_config
    from coembed.device import autocast_dtype
    from coembed.errors import CoembedError
    from coembed.training.build import build_run
    from coembed.training.run import RunOptions

    kept = []
    monkeypatch.setattr(process, "keep_freed_memory", lambda: kept.append(True))
    threads = torch.get_num_threads()
    try:
        cfg = load_config("tiny", overrides)
        run = build_run(cfg, RunOptions(output=out, train_data=str(data)))
    except CoembedError as exc:
        return {"error": str(exc)}
    finally:
        seen_threads, deterministic = (
            torch.get_num_threads(),
            torch.are_deterministic_algorithms_enabled(),
        )
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    model, root = run.raw_model, out.parents[1]  # the test's tmp_path
    return {
        "error": None,
        "model": _model_signature(model, run.cfg),
        "vocab": run.tokenizer.vocab_size,
        "sources": [str(s) for s in run.data.sources],
        "captions": list(run.data.pair_caption),
        "cache_files": sorted(str(p.relative_to(root)) for p in root.rglob("*.npy")),
        "streaming": run.data.streaming,
        "workers": run.data.num_workers,
        "per_rank_batch": run.per_rank_batch,
        "batches": run.batches_per_epoch,
        "total_steps": run.total_steps,
        "groups": [
            {k: g[k] for k in ("weight_decay", "betas", "eps", "lr")}
            for g in run.optimizer.param_groups
        ],
        "cuda_autocast": autocast_dtype(run.cfg.train.precision, torch.device("cuda")),
        "device": str(run.device),
        "trainable": [n for n, p in model.named_parameters() if p.requires_grad],
        "wrapper": type(run.model).__name__,
        "conv_layout": model.visual.trunk.conv1.weight.is_contiguous(),
        "threads": seen_threads,
        "keeps_freed_memory": bool(kept),
        "deterministic": deterministic,
        "recompute": (model.visual.grad_checkpointing, model.text.grad_checkpointing),
    }


def _look_train(overrides: list[str], data: Path, out: Path, monkeypatch) -> dict:
    """Three steps of ``coembed.training.train``: the first batch, the logs, the checkpoints."""
    from coembed.config import load_config
    from coembed.training import loop, train

    real_step, seen = loop.train_step, {}

    def step(run, images, captions, *image_ids):
        if "first_batch" not in seen:
            seen["first_batch"] = (images.sum().item(), images[0, :, :2, :2].tolist(), captions)
            seen["prefetch_thread"] = any(
                t.name == "coembed-prefetch" for t in threading.enumerate()
            )
        loss, norm = real_step(run, images, captions, *image_ids)
        seen.setdefault("losses", []).append(loss)
        return loss, norm

    monkeypatch.setattr(loop, "train_step", step)
    train(load_config("tiny", overrides), data, out)
    from coembed.checkpoint import load_model_dir

    model, _, _ = load_model_dir(out, "cpu")
    seen["weights"] = [p.sum().item() for p in model.parameters()]
    seen["checkpoints"] = sorted(p.name for p in (out / "checkpoints").iterdir())
    seen["metrics"] = [
        json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
    ]
    return seen


@pytest.fixture(scope="module")
def looked() -> dict:
    """Observations by (stage, overrides), so each base is probed once per module."""
    return {}


def _observe(probe: Probe, overrides: list[str], data, tmp_path, monkeypatch, cache) -> dict:
    key = (probe.stage, tuple(overrides))
    if key not in cache:
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}" / "out"
        out.parent.mkdir()
        if probe.stage == "model":
            cache[key] = _look_model(overrides)
        elif probe.stage == "build":
            cache[key] = _look_build(overrides, data, out, monkeypatch)
        else:
            cache[key] = _look_train(overrides, data, out, monkeypatch)
    return cache[key]


@pytest.mark.parametrize("field", config_fields())
def test_every_config_field_changes_something(field, probe_data, tmp_path, monkeypatch, looked):
    """A value that reaches nothing is a setting that silently does nothing (as data.crop_scale_min
    did): change each field and something downstream must change with it."""
    probe = PROBE_OF.get(field)
    assert probe is not None, f"no probe for {field}: add one to PROBES, or remove the field"
    value = probe.value
    if isinstance(value, str):
        value = value.replace("{tmp}", str(tmp_path))
    base = [*BASE, *probe.base]
    if probe.stage == "model":
        base.append("model.text.eot_id=2")  # the tiny recipe's tokenizer sets it when training
    changed = [*base, *probe.also, f"{field}={value}"]
    before = _observe(probe, base, probe_data, tmp_path, monkeypatch, looked)
    after = _observe(probe, changed, probe_data, tmp_path, monkeypatch, looked)
    assert before.get("error") is None, before["error"]
    if after.get("error"):
        assert probe.error_ok, after["error"]
        return
    assert probe.look(after) != probe.look(before), f"{field}={value} changed nothing"


def test_crop_scale_min_reaches_the_training_batches(probe_data, tmp_path, monkeypatch):
    """The loop hands data.crop_scale_min to the augmentation: the crops of a run at 0.3 cover
    less of each picture than at 1.0 (whole pictures, only the aspect ratio varies)."""
    from coembed.data import transforms

    areas: list[float] = []
    real = transforms.random_resized_boxes

    def boxes(*args, **kwargs):
        b = real(*args, **kwargs)  # (B, 4) x0, y0, x1, y1
        H, W = args[1], args[2]
        areas.extend(((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / (H * W)).tolist())
        return b

    monkeypatch.setattr(transforms, "random_resized_boxes", boxes)
    seen = {}
    for scale in (0.3, 1.0):
        areas.clear()
        overrides = [*BASE, f"data.crop_scale_min={scale}"]
        _look_train(overrides, probe_data, tmp_path / f"s{scale}", monkeypatch)
        seen[scale] = list(areas)
    assert seen[1.0] and min(seen[1.0]) > 0.74  # whole square, or clamped to a 3:4 ratio
    assert seen[0.3] and min(seen[0.3]) < 0.74


# --- gradient accumulation with dropout ----------------------------------------------------------


def _run_in_memory(*overrides: str):
    """A TrainRun of the tiny model on the CPU, built in memory; and its captions."""
    captions = [f"caption number {i} of {i % 3} things" for i in range(16)]
    return tiny_train_run(captions, [*TINY, "train.device=cpu", *overrides]), captions


@pytest.mark.parametrize("n", [2, 4])
def test_accumulation_with_dropout_equals_one_batch(n):
    """With text dropout at 0.3, the accumulated gradients equal those of the whole batch's loss
    over features made with the same dropout masks (each micro-batch's forward in turn from one
    random state, as the caching pass draws them): to 1e-5 relative, float32 sums in another
    order. Without the random state put back before each recompute they do not."""
    from coembed.training.step import accumulated_backward

    run, captions = _run_in_memory("model.text.dropout=0.3", f"train.accum_steps={n}")
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = run.tokenizer(captions)
    buffers = {k: b.clone() for k, b in run.model.named_buffers()}

    torch.manual_seed(5)
    outs = [run.model(i, t) for i, t in zip(images.chunk(n), tokens.chunk(n))]
    features = {k: torch.cat([o[k] for o in outs]) for k in ("image_features", "text_features")}
    run.loss_fn(**features, logit_scale=outs[0]["logit_scale"]).backward()
    expected = {k: p.grad.clone() for k, p in run.model.named_parameters() if p.grad is not None}
    after_reference = torch.get_rng_state()

    run.model.zero_grad(set_to_none=True)
    with torch.no_grad():  # BatchNorm's running statistics as they were
        for k, b in run.model.named_buffers():
            b.copy_(buffers[k])
    torch.manual_seed(5)
    accumulated_backward(run, images, tokens)
    for name, p in run.model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)
    assert torch.equal(torch.get_rng_state(), after_reference)  # ends where one pass would


# --- the sigmoid loss's starting temperature and bias --------------------------------------------


def test_sigmoid_loss_starts_at_temperature_10_and_bias_minus_10():
    """SigLIP's start: t' = log 10, b = -10; CLIP's softmax loss keeps log(1/0.07) and no bias;
    values the user sets are kept."""
    import math

    from coembed.config import Config, complete_config, load_config
    from coembed.model import CoEmbed

    siglip = load_config("tiny", [*TINY, "train.loss=siglip"])
    model = CoEmbed(siglip.model)
    assert model.logit_scale.item() == pytest.approx(math.log(10))
    assert model.logit_bias.item() == -10.0
    clip = CoEmbed(load_config("tiny", TINY).model)
    assert clip.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert clip.logit_bias is None
    chosen = load_config(
        "tiny",
        [*TINY, "train.loss=siglip", "model.init_logit_scale=2.0", "model.init_logit_bias=-3"],
    )
    assert (chosen.model.init_logit_scale, chosen.model.init_logit_bias) == (2.0, -3.0)
    bare = Config()
    bare.train.loss = "siglip"
    assert complete_config(bare).model.init_logit_scale == pytest.approx(math.log(10))
    assert bare.model.init_logit_scale is None  # completion returns a copy


# --- weight decay groups -------------------------------------------------------------------------

DECAY, NO_DECAY = "decay", "no decay"

# Every parameter of every backbone must match exactly one rule, so a new kind of parameter
# fails here until someone decides its group.
DECAY_RULES: list[tuple[str, Callable[[str, tuple], bool], str]] = [
    ("logit temperature and bias", lambda n, s: n in ("logit_scale", "logit_bias"), NO_DECAY),
    ("biases", lambda n, s: n.endswith(".bias"), NO_DECAY),
    ("norm gains (1-D weights)", lambda n, s: n.endswith(".weight") and len(s) == 1, NO_DECAY),
    ("ConvNeXt layer-scale gains (C, 1, 1)", lambda n, s: n.endswith(".layer_scale"), NO_DECAY),
    ("text positions", lambda n, s: n == "text.positional.weight", NO_DECAY),
    ("attention-pool positions", lambda n, s: n.endswith("pool.positional_embedding"), NO_DECAY),
    ("token embedding", lambda n, s: n == "text.token_embedding.weight", DECAY),
    (
        "linear and convolution weights",
        lambda n, s: n.endswith(".weight") and len(s) in (2, 4) and "positional" not in n
        and "token_embedding" not in n,
        DECAY,
    ),
]  # fmt: skip

BACKBONES = {  # one of each family towers/image.py builds, at 32 px
    "modified_resnet": "attention",
    "resnet18": "avg",
    "convnext_tiny": "avg",
    "efficientnet_b0": "avg",
    "mobilenet_v3_small": "avg",
    "regnet_y_400mf": "avg",
}


@pytest.mark.parametrize("backbone", BACKBONES)
def test_weight_decay_groups_of_every_backbone(backbone):
    """Each parameter's group, for every backbone: weights of linear and convolution layers and the
    token table are decayed; biases, norm and layer-scale gains, positions and logit scalars not."""
    from coembed.config import load_config
    from coembed.model import CoEmbed
    from coembed.training.optim import make_optimizer

    cfg = load_config(
        "tiny",
        [
            *TINY,
            "train.loss=siglip",
            f"model.image.backbone={backbone}",
            f"model.image.pool={BACKBONES[backbone]}",
        ],
    )
    model = CoEmbed(cfg.model)
    optimizer = make_optimizer(model, cfg)
    group_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            group_of[id(p)] = DECAY if group["weight_decay"] > 0 else NO_DECAY
    listed = []
    for name, p in model.named_parameters():
        rules = [(what, group) for what, test, group in DECAY_RULES if test(name, tuple(p.shape))]
        assert len(rules) == 1, f"{name} {tuple(p.shape)} matches {rules}"
        listed.append((name, rules[0][0], group_of[id(p)]))
        assert group_of[id(p)] == rules[0][1], f"{name} {tuple(p.shape)}: {rules[0][0]}"
    kinds = {what for _, what, _ in listed}
    assert {"biases", "norm gains (1-D weights)", "linear and convolution weights"} <= kinds
    if backbone.startswith("convnext"):
        assert "ConvNeXt layer-scale gains (C, 1, 1)" in kinds
    assert len(listed) == len(group_of)  # every trainable parameter is in one group


# --- one decode path for PIL images and files ---------------------------------------------------


def test_pil_images_embed_like_their_files(tiny_model_dir, tmp_path):
    """An RGBA PIL image embeds as the same picture read from a PNG (transparency on white, not
    black), and a PIL image with an EXIF rotation as its JPEG file (the rotation applied)."""
    from PIL import Image

    import coembed

    model = coembed.load(tiny_model_dir, device="cpu")
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (40, 48, 4), dtype=np.uint8)
    rgba[:, :20, 3] = 0  # a transparent left side
    picture = Image.fromarray(rgba, "RGBA")
    picture.save(tmp_path / "a.png")
    np.testing.assert_array_equal(
        model.embed_images([picture]), model.embed_images([str(tmp_path / "a.png")])
    )
    black = Image.fromarray(rgba[..., :3].copy() * (rgba[..., 3:] > 0), "RGB")
    assert not np.allclose(model.embed_images([picture]), model.embed_images([black]), atol=1e-4)

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    tall = Image.fromarray(rng.integers(0, 256, (64, 32, 3), dtype=np.uint8))
    tall.save(tmp_path / "r.jpg", exif=exif, quality=95)
    with Image.open(tmp_path / "r.jpg") as opened:
        from_pil = model.embed_images([opened])
    np.testing.assert_array_equal(from_pil, model.embed_images([str(tmp_path / "r.jpg")]))
    with Image.open(tmp_path / "r.jpg") as opened:
        unrotated = Image.fromarray(np.asarray(opened.convert("RGB")))  # pixels only, no EXIF
    assert not np.allclose(from_pil, model.embed_images([unrotated]), atol=1e-4)


# --- streamed batches with failed images --------------------------------------------------------


def test_streamed_batches_with_failures_hold_no_pair_twice(tmp_path):
    """Streaming mode: failed images are replaced by the next pairs that decode, never by a copy
    of a pair of the same batch; batches keep their size and a resumed epoch gives the same
    batch."""
    from coembed.data.cache import decode_square
    from coembed.data.formats import read_records
    from coembed.data.loader import PairData
    from coembed.data.transforms import eval_from_uint8

    rows = shipped_rows(24)
    copy_images(rows, tmp_path / "images")
    csv_path = write_csv(tmp_path / "train.csv", [(f"images/{a}", b) for a, b in rows])
    records, _ = read_records(str(csv_path))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    for i in (1, 5, 6, 17):
        records[i].image = str(broken)
    captions = {c for r in records for c in r.captions}
    assert len(captions) == 24  # a caption names its pair here
    good = {c for r in records if r.image != str(broken) for c in r.captions}

    def batches(start: int = 0):
        stream = PairData.from_records(records, 32, None, max_cache_bytes=0, num_workers=0)
        return list(stream.epoch_batches(0, 3, 8, start, augment=False, fill_failed=True)), stream

    epoch, stream = batches()
    assert [x.shape[0] for x, _ in epoch] == [8, 8, 8]
    image_of = {c: r.image for r in records for c in r.captions}
    for x, caps in epoch:
        assert len(set(caps)) == len(caps) == 8, caps  # no pair twice
        assert set(caps) <= good
        for i in (0, 7):  # a pair of the batch's own and one that may have filled it
            square = torch.from_numpy(np.array(decode_square(image_of[caps[i]], stream.cache_size)))
            torch.testing.assert_close(x[i], eval_from_uint8(square[None], 32)[0])
    assert stream.skipped == {"corrupt": 1}
    resumed, _ = batches(2)
    assert resumed[0][1] == epoch[2][1] and torch.equal(resumed[0][0], epoch[2][0])


def test_streamed_batches_fail_when_no_image_can_fill(tmp_path):
    """When every image is broken, training's batches end with one DataError naming the batch."""
    from coembed.data.formats import read_records
    from coembed.data.loader import PairData
    from coembed.errors import DataError

    rows = shipped_rows(8)
    csv_path = write_csv(tmp_path / "train.csv", [("broken.png", b) for _, b in rows])
    (tmp_path / "broken.png").write_bytes(b"not an image")
    records, _ = read_records(str(csv_path))
    stream = PairData.from_records(records, 32, None, max_cache_bytes=0, num_workers=0)
    with pytest.raises(DataError, match="batch 0 has 8 images that could not be read"):
        next(stream.epoch_batches(0, 0, 8, fill_failed=True))
