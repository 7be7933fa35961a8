"""The training loop: one process on a CPU or GPU, or many through ``torchrun`` (DDP).

The loop is a handful of functions around ``train_step``. Everything a resumed run needs is a
pure function of the step number plus what a checkpoint stores: the data order of an epoch and
the augmentation of a batch are seeded from (seed, epoch, batch), the optimizer state and RNG
states are saved with the weights. A run killed at any moment and resumed therefore ends with
the same weights as one that was never interrupted (on the CPU in deterministic mode).

Run folder::

    OUTPUT/config.json ...          the latest model directory (what ``coembed.load`` reads)
    OUTPUT/run_config.json          the whole resolved config and the data arguments
    OUTPUT/metrics.jsonl            one JSON object per logged step / validation
    OUTPUT/tensorboard/             TensorBoard events
    OUTPUT/checkpoints/step-NNNNNNN model + optimizer + RNG + step, renamed into place when complete
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from coembed import process
from coembed.checkpoint import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    atomic_write_text,
    is_atomic_temporary,
    load_model_dir,
    load_state_strict,
    save_model_dir,
    save_weights,
)
from coembed.config import (
    Config,
    config_from_dict,
    dump_json,
    load_config,
    validate,
)
from coembed.device import autocast_dtype, resolve_device
from coembed.errors import CoembedError, DataError, UsageError
from coembed.loss import make_loss
from coembed.model import CoEmbed

RUN_CONFIG = "run_config.json"
CHECKPOINTS = "checkpoints"


class TrainingDiverged(CoembedError):
    """The loss became NaN or infinite."""


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/...), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), resolve_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank), device


# --- configuration from the command line ---------------------------------------------------------


def config_flags(args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides plus the explicit flags (which win), as ``key=value`` strings."""
    flags: list[str] = list(getattr(args, "set", None) or [])
    for flag, key in (
        ("steps", "train.steps"),
        ("epochs", "train.epochs"),
        ("batch_size", "train.batch_size"),
        ("lr", "train.lr"),
        ("image_key", "data.image_key"),
        ("caption_key", "data.caption_key"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            flags.append(f"{key}={value}")
    if getattr(args, "steps", None) is not None:
        flags.append("train.epochs=0")
    elif getattr(args, "epochs", None) is not None:
        flags.append("train.steps=0")
    if getattr(args, "lock_image", False):
        flags.append("train.lock_image=true")
    if getattr(args, "lock_text", False):
        flags.append("train.lock_text=true")
    return flags


def config_from_args(args: argparse.Namespace) -> Config:
    """The recipe, then ``--set`` overrides, then the explicit flags (which win)."""
    flags = config_flags(args)
    if getattr(args, "device", None):
        flags.append(f"train.device={args.device}")
    return load_config(args.config, flags)


# --- optimizer and schedule ----------------------------------------------------------------------


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Gains, biases, norms, embeddings' positions and the temperature are not weight-decayed."""
    return (
        param.ndim < 2 or "bn" in name or "ln" in name or "logit_" in name or "positional" in name
    )


def make_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise UsageError("nothing to train: both towers are locked")
    groups = [
        {
            "params": [p for n, p in named if not no_decay(n, p)],
            "weight_decay": cfg.train.weight_decay,
        },
        {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
    ]
    t = cfg.train
    settings = {"lr": t.lr, "betas": (t.beta1, t.beta2), "eps": t.eps}
    # Fused AdamW updates each parameter in one vectorized pass, on CUDA and (torch >= 2.4) on
    # the CPU too, where the foreach path allocates and faults in temporaries for every
    # intermediate: on 2 cores the step over the tiny recipe's 12.4M parameters (CLIP vocabulary)
    # took 13 ms fused against 37 ms foreach.
    try:
        return torch.optim.AdamW(groups, fused=True, **settings)
    except (RuntimeError, TypeError):  # an older torch without a fused kernel for this device
        return torch.optim.AdamW(groups, foreach=True, **settings)


def learning_rate(step: int, total: int, cfg: Config) -> float:
    """Linear warmup to the peak, then cosine decay to zero at ``total``."""
    warmup = min(cfg.train.warmup_steps, max(total - 1, 0))
    if step < warmup:
        return cfg.train.lr * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * cfg.train.lr * (1 + math.cos(math.pi * min(progress, 1.0)))


# --- checkpoints ---------------------------------------------------------------------------------


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and the JSON-able rest."""
    state = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, slots in state["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    params = [p for group in opt.param_groups for p in group["params"]]
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = name.split(".", 1)
        param = params[int(idx)] if int(idx) < len(params) else None
        if torch.is_tensor(value) and param is not None and value.shape == param.shape:
            # Moments take their parameter's memory layout back (channels_last convolution
            # weights): safetensors stores them contiguous, and the fused kernel pairs the
            # elements of a parameter, its gradient and its moments by position in memory.
            value = torch.empty_like(param, dtype=value.dtype).copy_(value)
        state.setdefault(int(idx), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_tensors() -> dict[str, torch.Tensor]:
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = s
    return rng


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def checkpoint_dirs(output: Path) -> list[Path]:
    """Complete checkpoints, oldest first (incomplete ones still have their .tmp- name)."""
    root = output / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def remove_leftovers(output: Path) -> None:
    """Delete what a killed run left half-done: checkpoints being written or being deleted, and
    the temporaries of files being replaced at the top of the run folder (the model directory,
    metrics)."""
    root = output / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".del-")):
                shutil.rmtree(p, ignore_errors=True)
    for p in output.iterdir() if output.is_dir() else ():
        if p.is_file() and is_atomic_temporary(p.name):
            p.unlink(missing_ok=True)


def save_checkpoint(run: TrainRun) -> Path:
    """Write the training state into a temporary folder and rename it into place, then update the
    model directory at the top of the run folder and drop checkpoints beyond ``keep_checkpoints``.

    A checkpoint folder is renamed into place only when complete and renamed away before it is
    deleted, so a ``step-*`` folder is always whole, whenever the process dies.
    """
    model = run.raw_model
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise TrainingDiverged(
            f"weights became non-finite at step {run.step} (first: {bad[0]}); stopped without "
            f"saving ({last_good(run.output)}). Try a lower --lr or more warmup"
        )
    root = run.output / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{run.step:07d}"
    tmp = root / f".tmp-step-{run.step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    opt_tensors, opt_meta = optimizer_tensors(run.optimizer)
    save_weights(tmp / WEIGHTS_FILE, model.state_dict(), {"step": str(run.step)})
    save_weights(tmp / "optimizer.safetensors", opt_tensors, {})
    save_weights(tmp / "rng.safetensors", rng_tensors(), {})
    epoch, batch = divmod(run.step, run.batches_per_epoch)
    state = {
        "step": run.step,
        # The data position is a function of the step; stored for people and for checking.
        "epoch": epoch,
        "batch": batch,
        "batches_per_epoch": run.batches_per_epoch,
        "optimizer": opt_meta,
        "skipped": run.data.skipped,
    }
    atomic_write_text(tmp / "state.json", json.dumps(state))
    if final.exists():
        retire(final)
    os.replace(tmp, final)
    save_model_dir(model, run.tokenizer, run.output)
    for old in checkpoint_dirs(run.output)[: -run.cfg.train.keep_checkpoints]:
        retire(old)
    return final


def retire(checkpoint: Path) -> None:
    """Delete a checkpoint folder: renamed away first, so no ``step-*`` is ever half-deleted."""
    gone = checkpoint.with_name(f".del-{checkpoint.name}")
    shutil.rmtree(gone, ignore_errors=True)
    os.replace(checkpoint, gone)
    shutil.rmtree(gone, ignore_errors=True)


def last_good(output: Path) -> str:
    kept = checkpoint_dirs(output)
    return (
        f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint had been written yet"
    )


def load_checkpoint(run: TrainRun, path: Path) -> None:
    try:
        state = json.loads((path / "state.json").read_text())
        weights = load_file(str(path / WEIGHTS_FILE))
        opt = load_file(str(path / "optimizer.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))
    except (OSError, ValueError, RuntimeError) as exc:
        raise CoembedError(
            f"{path}: unreadable checkpoint ({exc}); delete it to resume from an older one"
        ) from None
    if state.get("batches_per_epoch", run.batches_per_epoch) != run.batches_per_epoch:
        raise DataError(
            f"{path}: the run had {state['batches_per_epoch']} batches per epoch, the data now "
            f"gives {run.batches_per_epoch}; resume on the same data (images may have changed)"
        )
    load_state_strict(run.raw_model, weights, str(path / WEIGHTS_FILE))
    restore_optimizer(run.optimizer, opt, state["optimizer"])
    restore_rng(rng)
    run.step = int(state["step"])


# --- data ----------------------------------------------------------------------------------------


def read_pairs(path: str, cfg: Config, split: str | None):
    from coembed.data.formats import read_records

    return read_records(
        path, image_key=cfg.data.image_key, caption_key=cfg.data.caption_key, split=split
    )


def build_tokenizer(cfg: Config, records, output: Path, dist_: Dist):
    """CLIP's BPE, or one trained on the training captions (rank 0 trains, the others read it)."""
    from coembed.tokenizer import Tokenizer

    t = cfg.model.text
    if cfg.model.tokenizer == "clip":
        return Tokenizer.clip(context_length=t.context_length)
    path = output / "tokenizer.json"
    if dist_.main:
        captions = (c for r in records for c in r.captions)
        Tokenizer.train(captions, vocab_size=t.vocab_size, context_length=t.context_length).save(
            path
        )
    if dist_.world > 1:
        dist.barrier()
    return Tokenizer.load(path)


# --- the run -------------------------------------------------------------------------------------


@dataclass
class TrainRun:
    cfg: Config
    output: Path
    device: torch.device
    dist: Dist
    model: nn.Module  # possibly DDP- or compile-wrapped
    raw_model: CoEmbed
    tokenizer: object
    optimizer: torch.optim.AdamW
    data: object
    total_steps: int
    batches_per_epoch: int
    loss_fn: nn.Module
    val: object = None
    step: int = 0
    scaler: object = None
    read_report: object = None

    @property
    def per_rank_batch(self) -> int:
        return self.cfg.train.batch_size // self.dist.world


def forward_loss(run: TrainRun, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    amp = autocast_dtype(run.cfg.train.precision, run.device)
    ctx = torch.autocast(run.device.type, dtype=amp) if amp else contextlib.nullcontext()
    with ctx:
        out = run.model(images, tokens)
    out = {k: v.float() for k, v in out.items()}
    return run.loss_fn(**out)


@contextlib.contextmanager
def no_state_change(model: nn.Module):
    """Forwards inside leave no trace: buffers (BatchNorm running statistics) are restored."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def accumulated_backward(run: TrainRun, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Gradient accumulation that keeps the whole batch as contrastive negatives.

    First embed every micro-batch without gradients; then, one micro-batch at a time, recompute
    its features with gradients, splice them into the cached features and back-propagate the
    full-batch loss. Memory grows with the micro-batch, the negatives with the whole batch.

    The gradients are exactly those of one full-batch step: micro-batch j contributes
    dL/df_j * df_j/dtheta, and summing over j gives dL/dtheta (so no division by the number of
    micro-batches). The temperature (and bias) enter every micro-batch's loss directly, so they
    carry gradient in one micro-batch only. The caching pass restores BatchNorm's running
    statistics, so they are updated once per micro-batch, not twice. BatchNorm in train mode
    still normalizes each micro-batch with its own statistics, as each rank does under DDP.
    """
    n = run.cfg.train.accum_steps
    image_chunks, token_chunks = images.chunk(n), tokens.chunk(n)
    amp = autocast_dtype(run.cfg.train.precision, run.device)

    def autocast():
        return torch.autocast(run.device.type, dtype=amp) if amp else contextlib.nullcontext()

    with torch.no_grad(), autocast(), no_state_change(run.raw_model):
        cached = [run.model(i, t) for i, t in zip(image_chunks, token_chunks)]
    cached_images = [c["image_features"].float() for c in cached]
    cached_texts = [c["text_features"].float() for c in cached]
    ddp = isinstance(run.model, nn.parallel.DistributedDataParallel)
    for j in range(n):
        last = j == n - 1
        # DDP all-reduces the accumulated gradients once, in the last micro-batch's backward.
        with contextlib.nullcontext() if last or not ddp else run.model.no_sync():
            with autocast():
                out = run.model(image_chunks[j], token_chunks[j])
            features_i = (
                cached_images[:j] + [out["image_features"].float()] + cached_images[j + 1 :]
            )
            features_t = cached_texts[:j] + [out["text_features"].float()] + cached_texts[j + 1 :]
            scalars = {
                k: (v if last else v.detach()).float()
                for k, v in out.items()
                if k in ("logit_scale", "logit_bias")
            }
            loss = run.loss_fn(torch.cat(features_i), torch.cat(features_t), **scalars)
            backward(run, loss)
    return loss.detach()


def backward(run: TrainRun, loss: torch.Tensor) -> None:
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
    else:
        loss.backward()


def global_mean(run: TrainRun, value: torch.Tensor) -> float:
    """This rank's loss averaged over ranks: the loss of the whole global batch."""
    if run.dist.world > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= run.dist.world
    return float(value)


def train_step(run: TrainRun, images: torch.Tensor, captions: list[str]) -> tuple[float, float]:
    """One optimizer step on one global batch; returns (loss before the step, gradient norm).

    A non-finite loss or gradient stops the run before the optimizer touches the weights, so the
    checkpoints on disk stay good (with fp16 the grad scaler skips such steps on its own).
    """
    tokens = run.tokenizer(captions)
    if run.device.type == "cuda":
        # Page-locked host memory lets the copies overlap with the previous step's kernels.
        images, tokens = images.pin_memory(), tokens.pin_memory()
    images = images.to(run.device, non_blocking=True)
    tokens = tokens.to(run.device, non_blocking=True)
    lr = learning_rate(run.step, run.total_steps, run.cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.optimizer.zero_grad(set_to_none=True)
    if run.cfg.train.accum_steps > 1:
        loss = accumulated_backward(run, images, tokens)
    else:
        loss = forward_loss(run, images, tokens)
        backward(run, loss)
    value = global_mean(run, loss.detach())
    if not math.isfinite(value):
        raise TrainingDiverged(
            f"loss became {value} at step {run.step + 1}; stopped without saving "
            f"({last_good(run.output)}). Try a lower --lr, more warmup "
            "(--set train.warmup_steps=...) or fp32 precision"
        )
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    params = [p for p in run.raw_model.parameters() if p.grad is not None]
    if run.cfg.train.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, run.cfg.train.grad_clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    grad_norm = float(norm)
    if run.scaler is None and not math.isfinite(grad_norm):
        raise TrainingDiverged(
            f"gradient norm became {grad_norm} at step {run.step + 1}; stopped without saving "
            f"({last_good(run.output)}). Try a lower --lr or gradient clipping "
            "(--set train.grad_clip=1.0)"
        )
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.raw_model.clamp_logit_scale()
    run.step += 1
    return value, grad_norm


# --- validation and logging ----------------------------------------------------------------------


@dataclass
class Validation:
    pixels: torch.Tensor  # (N_img, 3, S, S) preprocessed once
    captions: list[str]
    text_to_image: np.ndarray  # (N_txt,)


def prepare_validation(path: str, cfg: Config, split: str | None) -> Validation:
    from coembed.data.loader import iter_image_batches

    records, _ = read_pairs(path, cfg, split)
    batches, kept = [], []
    for pixels, ok, _failures in iter_image_batches(
        [r.image for r in records], cfg.model.image.image_size, 256
    ):
        batches.append(pixels)
        kept.extend(ok)
    if not kept:
        raise DataError(f"{path}: no validation image could be read")
    captions, targets = [], []
    for image_idx, record_idx in enumerate(kept):
        for caption in records[record_idx].captions:
            captions.append(caption)
            targets.append(image_idx)
    return Validation(torch.cat(batches), captions, np.asarray(targets))


@torch.no_grad()
def validate_run(run: TrainRun) -> dict[str, float]:
    from coembed.evaluate import retrieval_metrics

    model = run.raw_model
    model.eval()
    images, texts = [], []
    for start in range(0, len(run.val.pixels), 256):
        batch = (
            run.val.pixels[start : start + 256]
            .to(run.device)
            .contiguous(memory_format=torch.channels_last)
        )
        images.append(model.encode_image(batch).float().cpu())
    for start in range(0, len(run.val.captions), 512):
        tokens = run.tokenizer(run.val.captions[start : start + 512]).to(run.device)
        texts.append(model.encode_text(tokens).float().cpu())
    model.train()
    return retrieval_metrics(
        torch.cat(images).numpy(), torch.cat(texts).numpy(), run.val.text_to_image
    )


class Logger:
    """JSONL metrics and TensorBoard events, written by rank 0 only.

    A resumed run starts logging at its checkpoint's step: lines a killed run wrote after that
    step (and a line it was cut off in the middle of) are dropped, and TensorBoard purges them.
    """

    def __init__(self, output: Path, enabled: bool, start_step: int = 0):
        self.enabled = enabled
        self.path = output / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if start_step > 0 or self.path.exists():
            self._truncate(start_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(output / "tensorboard"), purge_step=start_step or None)
        except ImportError:
            self.tb = None

    def _truncate(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, step: int, **values) -> None:
        """One JSON line; numbers also go to TensorBoard."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key.replace("@", "_at_"), value, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# --- setup ---------------------------------------------------------------------------------------


def init_weights(model: CoEmbed, init: str, device: torch.device) -> None:
    """Start from a coembed model directory or an open_clip / OpenAI checkpoint file."""
    if Path(init).is_dir():
        source, _, _ = load_model_dir(init, "cpu")
        load_state_strict(model, source.state_dict(), init)
    elif Path(init).is_file():
        from coembed.interop.openclip import read_openclip_state

        load_state_strict(model, read_openclip_state(init, model.cfg), init)
    else:
        raise UsageError(f"--init {init}: no such model directory or checkpoint file")


def apply_locks(model: CoEmbed, cfg: Config) -> None:
    if cfg.train.lock_image:
        model.lock_image(cfg.train.lock_image_unlocked_groups)
    if cfg.train.lock_text:
        model.lock_text(cfg.train.lock_text_unlocked_layers)


def prepare_output(output: Path, resume: bool, dist_: Dist) -> None:
    """Refuse to write over a training run (without ``--resume``) or over a model directory."""
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} is a file; give a folder for the run")
    if (output / RUN_CONFIG).exists() and not resume:
        raise UsageError(
            f"{output} already holds a training run: add --resume to continue it, or pick another --output"
        )
    if not (output / RUN_CONFIG).exists() and (output / CONFIG_FILE).exists():
        raise UsageError(
            f"{output} holds a model directory that is not a training run; pick another --output "
            f"(--init {output} fine-tunes it)"
        )
    if dist_.world > 1:
        dist.barrier()  # every rank has looked before rank 0 writes anything
    if dist_.main:
        output.mkdir(parents=True, exist_ok=True)


def dataset_path(path: str | None) -> str | None:
    """A dataset argument as stored in run_config.json: absolute when it is a local path."""
    if path is None:
        return None
    return os.path.abspath(path) if os.path.exists(path) else str(path)


def read_run_config(output: Path) -> dict | None:
    """The saved run_config.json, or None when a run never got that far (nothing to resume)."""
    path = output / RUN_CONFIG
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    saved.setdefault("recipe", None)
    saved.setdefault("flags", [])
    for key in ("val_data", "split", "init"):
        saved.setdefault(key, None)
    return saved


def resumed_config(args: argparse.Namespace, saved: dict) -> Config:
    """The saved run's config. Flags and data given again must be those the run started with."""
    given = config_flags(args)
    if given and (given != saved["flags"] or args.config != saved["recipe"]):
        now = [f for f in [args.config, *given] if f not in [saved["recipe"], *saved["flags"]]]
        then = [f for f in [saved["recipe"], *saved["flags"]] if f not in [args.config, *given]]
        raise UsageError(
            f"--resume continues the run as saved in {RUN_CONFIG}, but the config given differs "
            f"(given: {' '.join(map(str, now)) or '-'}; saved: {' '.join(map(str, then)) or '-'}); "
            "drop the flags or repeat the original ones"
        )
    for name in ("train_data", "val_data", "split"):
        value = getattr(args, name, None)
        value = dataset_path(value) if name != "split" else value
        if value is not None and value != saved[name]:
            raise UsageError(
                f"--resume continues the run on its own data: {name.replace('_', '-')} was "
                f"{saved[name]}, now {value}"
            )
    cfg = config_from_dict(saved["config"])
    if getattr(args, "device", None) not in (None, "auto"):
        cfg.train.device = args.device  # a run may move to another device
    return cfg


def build_tokenizer_and_config(cfg: Config, records, output: Path, init_dir: str | None, dist_):
    """The tokenizer, and the model config it completes (vocabulary size, end-of-text id)."""
    if init_dir:
        # Fine-tuning a coembed model keeps its architecture and tokenizer.
        source, tokenizer, _ = load_model_dir(init_dir, "cpu")
        cfg.model = source.cfg
        return tokenizer
    tokenizer = build_tokenizer(cfg, records, output, dist_)
    if cfg.model.tokenizer == "trained":
        cfg.model.text.vocab_size = tokenizer.vocab_size
    cfg.model.text.eot_id = tokenizer.eot_id
    return tokenizer


def total_steps_for(cfg: Config, batches_per_epoch: int) -> int:
    if cfg.train.steps > 0:
        return cfg.train.steps
    if cfg.train.epochs > 0:
        return cfg.train.epochs * batches_per_epoch
    raise UsageError(
        "say how long to train: --steps N or --epochs N (or train.steps/epochs in the config)"
    )


def set_threads(cfg: Config) -> None:
    """Threads, the allocator and determinism, for the whole process."""
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.reuse_memory:
        process.keep_freed_memory()
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)


def load_pair_data(records, cfg: Config, output: Path, dist_: Dist):
    """Decode the training images (into the cache when it fits); rank 0 first, so ranks share one cache."""
    from coembed.data.loader import PairData

    def build():
        return PairData.from_records(
            records,
            cfg.model.image.image_size,
            cache_dir=cfg.data.cache_dir or str(output / "cache"),
            max_cache_bytes=int(cfg.data.max_cache_gb * (1 << 30)),
            num_workers=cfg.data.workers,
        )

    if dist_.world == 1:
        return build()
    if not dist_.main:
        dist.barrier()
    data = build()
    if dist_.main:
        dist.barrier()
    return data


def build_run(args: argparse.Namespace) -> TrainRun:
    """Everything a run needs, checked before anything is written that would block a retry."""
    output = Path(args.output)
    resume = bool(getattr(args, "resume", False))
    saved = read_run_config(output) if resume else None
    if saved is not None:
        cfg = resumed_config(args, saved)
        train_data, val_data, split, init = (
            saved[k] for k in ("train_data", "val_data", "split", "init")
        )
    else:
        cfg = config_from_args(args)
        train_data, val_data = args.train_data, getattr(args, "val_data", None)
        split, init = getattr(args, "split", None), getattr(args, "init", None)
    dist_, device = setup_distributed(cfg.train.device)
    prepare_output(output, resume, dist_)
    if cfg.train.batch_size % (dist_.world * cfg.train.accum_steps):
        raise UsageError(
            f"--batch-size {cfg.train.batch_size} is not divisible by {dist_.world} process(es) "
            f"x {cfg.train.accum_steps} accumulation steps"
        )
    set_threads(cfg)

    records, report = read_pairs(train_data, cfg, split)
    if saved is not None:
        from coembed.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(output / TOKENIZER_FILE)
    else:
        init_dir = init if init and Path(init).is_dir() else None
        tokenizer = build_tokenizer_and_config(cfg, records, output, init_dir, dist_)
    validate(cfg)

    # The initial weights depend on the seed only (nothing else draws from torch's generator
    # before), so a run killed before its first checkpoint restarts from the same weights.
    torch.manual_seed(cfg.train.seed)
    model = CoEmbed(cfg.model)
    checkpoints = checkpoint_dirs(output) if saved is not None else []
    if init and not checkpoints:
        init_weights(model, init, device)
    apply_locks(model, cfg)
    model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    raw_model = model
    optimizer = make_optimizer(model, cfg, device)
    if dist_.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids, bucket_cap_mb=25)
    if cfg.train.compile:
        model = torch.compile(model)

    data = load_pair_data(records, cfg, output, dist_)
    per_rank = cfg.train.batch_size // dist_.world
    batches = data.num_batches(per_rank, dist_.world)  # DataError when one batch is too many
    total_steps = total_steps_for(cfg, batches)
    val = prepare_validation(val_data, cfg, split) if val_data else None
    if dist_.main and saved is None:
        tokenizer.save(output / TOKENIZER_FILE)
        run_config = {
            "config": json.loads(dump_json(cfg)),
            "recipe": args.config,
            "flags": config_flags(args),
            "train_data": dataset_path(train_data),
            "val_data": dataset_path(val_data),
            "split": split,
            "init": init and os.path.abspath(init),
        }
        atomic_write_text(output / RUN_CONFIG, json.dumps(run_config, indent=2))

    run = TrainRun(
        cfg=cfg,
        output=output,
        device=device,
        dist=dist_,
        model=model,
        raw_model=raw_model,
        tokenizer=tokenizer,
        optimizer=optimizer,
        data=data,
        total_steps=total_steps,
        batches_per_epoch=batches,
        loss_fn=make_loss(cfg.train.loss),
        val=val,
        read_report=report,
    )
    if autocast_dtype(cfg.train.precision, device) == torch.float16:
        run.scaler = torch.amp.GradScaler("cuda")
    if dist_.main:
        remove_leftovers(output)
    if checkpoints:
        load_checkpoint(run, checkpoints[-1])
    return run


def run_loop(run: TrainRun, logger: Logger) -> dict:
    """Train to ``total_steps``; checkpoint every ``checkpoint_every`` steps and at the end,
    validate at the end of every epoch. Returns the last validation metrics."""
    from tqdm import tqdm

    from coembed.data.loader import prefetched

    cfg = run.cfg
    batches = run.batches_per_epoch
    bar = tqdm(
        total=run.total_steps,
        initial=run.step,
        disable=not run.dist.main or os.environ.get("COEMBED_NO_PROGRESS") == "1",
        unit="step",
        dynamic_ncols=True,
    )
    run.raw_model.train()
    last_metrics: dict = {}
    while run.step < run.total_steps:
        epoch, start_batch = divmod(run.step, batches)
        stream = run.data.epoch_batches(
            epoch,
            cfg.train.seed,
            run.per_rank_batch,
            start_batch=start_batch,
            rank=run.dist.rank,
            world_size=run.dist.world,
            augment=cfg.data.augment,
            fill_failed=True,
        )
        with prefetched(stream, cfg.data.prefetch) as ready:
            last_metrics = run_epoch(run, logger, ready, bar, epoch, last_metrics)
        if run.dist.world > 1:
            dist.barrier()
    bar.close()
    return last_metrics


def run_epoch(run: TrainRun, logger: Logger, ready, bar, epoch: int, last_metrics: dict) -> dict:
    """The steps of one epoch from ``ready`` batches (from a resumed position on), up to the
    epoch's end or the run's last step; returns the latest validation metrics."""
    cfg = run.cfg
    window_start, window_samples = time.perf_counter(), 0
    for images, captions in ready:
        loss, grad_norm = train_step(run, images, captions)
        window_samples += len(captions) * run.dist.world
        lr = run.optimizer.param_groups[0]["lr"]
        if run.step % cfg.train.log_every == 0 or run.step == run.total_steps:
            rate = window_samples / max(time.perf_counter() - window_start, 1e-9)
            scale = run.raw_model.logit_scale.detach().exp().item()
            logger.log(
                run.step,
                epoch=epoch,
                loss=loss,
                lr=lr,
                grad_norm=grad_norm,
                samples_per_s=rate,
                logit_scale=scale,
            )
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", samples_s=f"{rate:.0f}")
            window_start, window_samples = time.perf_counter(), 0
        bar.update(1)
        end_of_epoch = run.step % run.batches_per_epoch == 0
        finished = run.step >= run.total_steps
        if run.dist.main and (run.step % cfg.train.checkpoint_every == 0 or finished):
            save_checkpoint(run)
        if run.val is not None and run.dist.main and (end_of_epoch or finished):
            last_metrics = validate_run(run)
            logger.log(run.step, epoch=epoch, **{f"val/{k}": v for k, v in last_metrics.items()})
            bar.write(
                f"step {run.step} val: i2t R@1 {last_metrics['image_to_text_R@1']:.3f}  "
                f"t2i R@1 {last_metrics['text_to_image_R@1']:.3f}"
            )
            window_start, window_samples = time.perf_counter(), 0  # not charged to training
        if finished or end_of_epoch:
            break
    return last_metrics


def train_from_args(args: argparse.Namespace) -> dict:
    """``coembed train``: build the run, loop, report. Returns the last validation metrics."""
    started = time.perf_counter()
    run = build_run(args)
    if getattr(args, "profile", False):
        from coembed.profile import format_profile, profile_run

        result = profile_run(run)
        if run.dist.main:
            print(format_profile(result))
            print(f"details: {run.output / 'profile.json'}, {run.output / 'profile.txt'}")
        return result
    logger = Logger(run.output, run.dist.main, start_step=run.step)
    try:
        if run.dist.main:
            report = run.read_report
            print(
                f"training {sum(p.numel() for p in run.raw_model.parameters()) / 1e6:.1f}M parameters on "
                f"{len(run.data)} pairs, {run.total_steps} steps of {run.cfg.train.batch_size} "
                f"({run.dist.world} process{'es' if run.dist.world > 1 else ''}, {run.device})"
                + (f", resuming at step {run.step}" if run.step else ""),
                flush=True,
            )
            skipped = data_skipped(run)
            if skipped:
                print("images skipped: " + ", ".join(f"{v} {k}" for k, v in skipped.items()))
            print(f"data: {report.summary()}", flush=True)
            threads = f"{torch.get_num_threads()} threads, OpenMP waiting: {process.openmp_waiting}"
            print(f"CPU: {threads}", flush=True)
            logger.log(
                run.step,
                data=report.summary(),
                empty_captions=report.empty_captions,
                cpu=threads,
            )
        try:
            metrics = run_loop(run, logger)
        except TrainingDiverged as exc:
            logger.log(run.step, diverged=str(exc))
            raise
        if run.dist.main:
            logger.log(
                run.step, skipped_images=data_skipped(run), empty_captions=report.empty_captions
            )
    finally:
        logger.close()
    if run.dist.main:
        report_end(run, metrics, time.perf_counter() - started)
    if run.dist.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return metrics


def data_skipped(run: TrainRun) -> dict[str, int]:
    return {k: v for k, v in sorted(run.data.skipped.items()) if v}


def report_end(run: TrainRun, metrics: dict, seconds: float) -> None:
    """summary.json, and the end-of-run lines: steps, skipped captions and images, recall."""
    skipped = data_skipped(run)
    report = run.read_report
    notes = []
    if report.empty_captions:
        notes.append(f"{report.empty_captions} empty captions skipped")
    if report.long_captions_truncated:
        notes.append(f"{report.long_captions_truncated} long captions truncated")
    if skipped:
        notes.append("images skipped: " + ", ".join(f"{v} {k}" for k, v in sorted(skipped.items())))
    summary = {
        "steps": run.step,
        "seconds": round(seconds, 1),
        "skipped_images": skipped,
        "empty_captions": report.empty_captions,
    }
    summary.update({k: v for k, v in metrics.items()})
    atomic_write_text(run.output / "summary.json", json.dumps(summary, indent=2))
    print(f"done: {run.step} steps in {seconds:.0f} s; model in {run.output}")
    if notes:
        print("data: " + "; ".join(notes))
    if metrics:
        print(
            "val recall@1/5/10  image->text "
            + " / ".join(f"{metrics[f'image_to_text_R@{k}']:.3f}" for k in (1, 5, 10))
            + "   text->image "
            + " / ".join(f"{metrics[f'text_to_image_R@{k}']:.3f}" for k in (1, 5, 10))
        )
