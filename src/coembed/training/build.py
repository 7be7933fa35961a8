"""Assemble a ``TrainRun`` from a config and run options.

Everything is checked before anything is written that would block a retry: a bad config, bad data
or a batch too large fails before run_config.json exists, so the corrected command just runs.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from coembed.checkpoint import TOKENIZER_FILE, load_model_dir, load_state_strict
from coembed.config import Config, complete_config, load_config, validate
from coembed.device import autocast_dtype
from coembed.errors import UsageError
from coembed.loss import loss_of
from coembed.model import CoEmbed
from coembed.training.ema import WeightAverage
from coembed.training.inputs import (
    build_tokenizer_and_config,
    check_resampling,
    choose_splits,
    load_pair_data,
    prepare_validation,
    prepare_zeroshot,
    read_pairs,
)
from coembed.training.memory import memory_for
from coembed.training.optim import make_optimizer, total_steps_for
from coembed.training.proxies import proxies_for
from coembed.training.run import (
    RUN_CONFIG,
    Dist,
    RunOptions,
    TrainRun,
    check_batch_split,
    prepare_output,
    set_threads,
    setup_distributed,
)
from coembed.training.state import (
    SAVED_DATA,
    checkpoint_dirs,
    load_checkpoint,
    read_run_config,
    remove_leftovers,
    resumed_config,
    write_run_config,
)
from coembed.training.views import view_head_for

if TYPE_CHECKING:
    from coembed.data.formats import Record
    from coembed.tokenizer import Tokenizer


@dataclass
class RunPlan:
    """The config to train with and the data to train on, before anything is built."""

    cfg: Config
    requested: Config | None  # the config as asked for; None when resuming a saved run
    options: RunOptions  # a resumed run's data as saved in run_config.json
    notes: list[str] = field(default_factory=list)  # what was chosen for the user, to print

    @property
    def resuming(self) -> bool:
        """Whether the run continues from its saved run_config.json."""
        return self.requested is None


def given_config(config: Config | str | os.PathLike | None, device: str | None) -> Config | None:
    """The config asked for, as a completed and validated copy: a recipe name or YAML path is
    loaded, and ``device`` (when given) replaces ``train.device``."""
    if config is None:
        return None
    if isinstance(config, (str, os.PathLike)):
        cfg = load_config(os.fspath(config))
    else:
        cfg = complete_config(config)  # a copy: the tokenizer completes it further
    if device is not None:
        cfg.train.device = device
    return validate(cfg)


def plan_run(config: Config | str | os.PathLike | None, options: RunOptions) -> RunPlan:
    """A new run's config and data as given, or a resumed run's as saved (checked against what
    is given again)."""
    given = given_config(config, options.device)
    saved = read_run_config(options.output) if options.resume else None
    if saved is not None:
        cfg = resumed_config(saved, given, options)
        data = {key: saved[key] for key in SAVED_DATA}
        return RunPlan(cfg, None, replace(options, **data))
    if options.resume:
        raise UsageError(
            f"--resume: {options.output} holds no run to resume (no {RUN_CONFIG}); "
            "leave out --resume to start a new run there"
        )
    if given is None:
        raise UsageError("give the config (--config) to start a run")
    if options.train_data is None:
        raise UsageError("give the training data (--train-data) to start a run")
    options, notes = choose_splits(options)
    return RunPlan(copy.deepcopy(given), given, options, notes)


def run_tokenizer(plan: RunPlan, records: list[Record], dist_: Dist) -> Tokenizer:
    """A resumed run's saved tokenizer, else a new one (completing ``plan.cfg``'s model)."""
    from coembed.tokenizer import Tokenizer

    output, init = plan.options.output, plan.options.init
    if plan.resuming:
        return Tokenizer.load(output / TOKENIZER_FILE)
    init_dir = init if init and Path(init).is_dir() else None
    return build_tokenizer_and_config(plan.cfg, records, output, init_dir, dist_)


def init_weights(model: CoEmbed, init: str) -> None:
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
    """Freeze the towers the config locks (all but their last unlocked groups or layers)."""
    if cfg.train.lock_image:
        model.lock_image(cfg.train.lock_image_unlocked_groups)
    if cfg.train.lock_text:
        model.lock_text(cfg.train.lock_text_unlocked_layers)


def build_model(
    cfg: Config, device: torch.device, dist_: Dist, init: str | None
) -> tuple[nn.Module, CoEmbed, torch.optim.AdamW, nn.Module | None]:
    """The model to train (DDP- or compile-wrapped as configured), the model itself, its
    optimizer and the projection head of ``train.simclr_weight`` (None without it); weights from
    ``init`` when given."""
    # The initial weights depend on the seed only (nothing else draws from torch's generator
    # before), so a run killed before its first checkpoint restarts from the same weights.
    torch.manual_seed(cfg.train.seed)
    model = CoEmbed(cfg.model)
    if init:
        init_weights(model, init)
    apply_locks(model, cfg)
    model.visual.grad_checkpointing = model.text.grad_checkpointing = cfg.train.grad_checkpointing
    head = view_head_for(cfg)
    head = None if head is None else head.to(device)
    model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg, head)
    wrapped: nn.Module = model
    if dist_.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids, bucket_cap_mb=25)
    if cfg.train.compile:
        wrapped = torch.compile(wrapped)
    return wrapped, model, optimizer, head


def start_processes(cfg: Config, options: RunOptions) -> tuple[Dist, torch.device]:
    """Join the process group, check the run folder and the batch split, set process settings."""
    dist_, device = setup_distributed(cfg.train.device)
    prepare_output(options.output, options.resume, dist_)
    check_batch_split(cfg, dist_)
    set_threads(cfg)
    return dist_, device


def build_run(
    config: Config | str | os.PathLike | None, options: RunOptions, *, keep: bool = True
) -> TrainRun:
    """Everything a run needs, checked before anything is written that would block a retry.

    With ``keep`` (not for a profile) the run is recorded (run_config.json, the tokenizer) so
    that it can be resumed.
    """
    plan = plan_run(config, options)
    cfg, options = plan.cfg, plan.options
    dist_, device = start_processes(cfg, options)
    if dist_.is_main:
        for note in plan.notes:
            print(note, flush=True)
    records, report = read_pairs(options.train_data, cfg, options.split)
    check_resampling(cfg, report)
    tokenizer = run_tokenizer(plan, records, dist_)
    cfg = validate(cfg)
    checkpoints = checkpoint_dirs(options.output) if plan.resuming else []
    model, raw_model, optimizer, view_head = build_model(
        cfg, device, dist_, None if checkpoints else options.init
    )
    data = load_pair_data(records, cfg, options.output, dist_)
    # DataError when the data holds less than one batch.
    batches = data.num_batches(cfg.train.batch_size // dist_.world, dist_.world)
    run = TrainRun(
        cfg=cfg,
        output=options.output,
        device=device,
        dist=dist_,
        model=model,
        raw_model=raw_model,
        tokenizer=tokenizer,
        optimizer=optimizer,
        data=data,
        total_steps=total_steps_for(cfg, batches),
        batches_per_epoch=batches,
        loss_fn=loss_of(cfg.train),
        read_report=report,
        ema=WeightAverage(raw_model, cfg.train.ema_decay) if cfg.train.ema_decay else None,
        view_head=view_head,
        memory=memory_for(cfg, device),
        proxies=proxies_for(cfg, data.pair_caption, device, optimizer),
    )
    read_evaluation_sets(run, options)
    if dist_.is_main and keep and not plan.resuming:
        tokenizer.save(options.output / TOKENIZER_FILE)
        write_run_config(options, cfg, plan.requested)
    if autocast_dtype(cfg.train.precision, device) == torch.float16:
        run.scaler = torch.amp.GradScaler("cuda")
    if dist_.is_main:
        remove_leftovers(options.output)
    if checkpoints:
        load_checkpoint(run, checkpoints[-1])
    elif plan.resuming and dist_.is_main:
        print(f"no checkpoint in {options.output} yet: the run starts again at step 0", flush=True)
    return run


def read_evaluation_sets(run: TrainRun, options: RunOptions) -> None:
    """The validation pairs and the zero-shot class folder, decoded once. Every process reads
    them, though only the main one evaluates: decoding draws from torch's generator, whose state
    a resumed run restores to the main process's on every rank."""
    if options.val_data:
        run.val = prepare_validation(options.val_data, run.cfg, options.val_split)
    if options.zeroshot_data:
        run.zeroshot = prepare_zeroshot(options.zeroshot_data, run.cfg)
