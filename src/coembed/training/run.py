"""The run and its processes: the run folder's layout, the process group, process settings.

Every other module of the package works on a ``TrainRun``; this one imports none of them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from coembed import process
from coembed.checkpoint import CONFIG_FILE, MODEL_FILES
from coembed.config import Config
from coembed.device import resolve_device
from coembed.errors import CoembedError, UsageError
from coembed.files import is_atomic_temporary, refuse_overlap
from coembed.locks import writer_lock
from coembed.model import CoEmbed

if TYPE_CHECKING:
    from coembed.data.formats import ReadReport
    from coembed.data.loader import PairData
    from coembed.tokenizer import Tokenizer
    from coembed.training.ema import WeightAverage
    from coembed.training.memory import FeatureMemory
    from coembed.training.proxies import CaptionProxies

RUN_CONFIG = "run_config.json"
CHECKPOINTS = "checkpoints"
# What training writes at the top of a run folder (besides atomic_write's temporaries).
RUN_ENTRIES = frozenset(
    {RUN_CONFIG, CHECKPOINTS, "cache", "tensorboard", "metrics.jsonl", "summary.json"}
    | {"profile.json", "profile.txt", *MODEL_FILES}
)


class TrainingDiverged(CoembedError):
    """The loss became NaN or infinite."""


@dataclass
class RunOptions:
    """Where a run writes, what it reads and how it starts: ``train``'s values besides the config."""

    output: Path
    train_data: str | None = None
    val_data: str | None = None
    split: str | None = None  # the training data's split (Karpathy / COCO JSON)
    init: str | None = None
    resume: bool = False
    device: str | None = None
    val_split: str | None = None  # the validation data's split
    zeroshot_data: str | None = None  # a folder of class sub-folders, classified at validation


@dataclass
class Dist:
    """This process's place in the process group (a lone process is rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that writes files and prints."""
        return self.rank == 0


@dataclass
class TrainRun:
    """Everything the step, the loop and the checkpoints share while a run trains."""

    cfg: Config
    output: Path
    device: torch.device
    dist: Dist
    model: nn.Module  # possibly DDP- or compile-wrapped
    raw_model: CoEmbed
    tokenizer: Tokenizer
    optimizer: torch.optim.AdamW
    data: PairData
    total_steps: int
    batches_per_epoch: int
    loss_fn: nn.Module
    val: object = None  # inputs.Validation when the run validates
    zeroshot: object = None  # inputs.ZeroShotSet when the run classifies a class folder
    step: int = 0
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    read_report: ReadReport | None = None
    ema: WeightAverage | None = None  # train.ema_decay > 0: the weights' moving average
    view_head: nn.Module | None = None  # train.simclr_weight > 0: views.ViewHead, not in the model
    memory: FeatureMemory | None = None  # train.feature_memory > 0: the latest pairs' features
    proxies: CaptionProxies | None = None  # train.caption_proxy_weight > 0: one per caption

    def heads(self) -> list[nn.Module]:
        """What the run trains beside the model: the projection head, the caption proxies."""
        return [m for m in (self.view_head, self.proxies) if m is not None]

    def trained_parameters(self) -> list[nn.Parameter]:
        """The model's parameters, then those of the run's ``heads``."""
        return [*self.raw_model.parameters(), *(p for m in self.heads() for p in m.parameters())]

    @property
    def evaluated_model(self) -> CoEmbed:
        """The weights validation scores and the model directory holds: the moving average
        when the run keeps one, else the trained weights."""
        return self.raw_model if self.ema is None else self.ema.model

    @property
    def per_rank_batch(self) -> int:
        """The share of the global batch one process trains on."""
        return self.cfg.train.batch_size // self.dist.world


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


def check_batch_split(cfg: Config, dist_: Dist) -> None:
    """Refuse a global batch that the processes and accumulation steps cannot share evenly."""
    if cfg.train.batch_size % (dist_.world * cfg.train.accum_steps):
        raise UsageError(
            f"--batch-size {cfg.train.batch_size} is not divisible by {dist_.world} process(es) "
            f"x {cfg.train.accum_steps} accumulation steps"
        )


def set_threads(cfg: Config) -> None:
    """Threads, the allocator and determinism, for the whole process."""
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.reuse_memory:
        process.keep_freed_memory()
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)


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
    if dist_.is_main:
        output.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def owned_output(options: RunOptions) -> Iterator[None]:
    """Hold the run folder while the run builds and trains: refuse one overlapping an input,
    lock it (rank 0, the process that writes), and remove it again when the run fails in a
    folder it created before anything resumable was saved."""
    output = options.output
    inputs = {"--train-data": options.train_data, "--val-data": options.val_data}
    refuse_overlap(output, {**inputs, "--init": options.init})
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun's other ranks write nothing
        yield
        return
    created = not output.exists()
    with writer_lock(output):
        try:
            yield
        except BaseException:
            if created:
                remove_failed_output(output)
            raise


def remove_failed_output(output: Path) -> None:
    """Delete the run folder of a failed run unless it holds a checkpoint (something to resume)
    or anything training does not write."""
    if not output.is_dir() or any((output / CHECKPOINTS).glob("step-*")):
        return
    if all(p.name in RUN_ENTRIES or is_atomic_temporary(p.name) for p in output.iterdir()):
        shutil.rmtree(output, ignore_errors=True)


def finish_distributed(dist_: Dist) -> None:
    """Wait for every rank, then leave the process group (nothing to do when alone)."""
    if dist_.world > 1:
        dist.barrier()
        dist.destroy_process_group()
