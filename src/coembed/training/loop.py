"""The loop: epochs of prefetched batches through ``train_step``, with checkpoints, validation and
logging at their steps."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from coembed.progress import progress_bar
from coembed.training.log import Logger, validate_run
from coembed.training.run import TrainRun
from coembed.training.state import save_checkpoint
from coembed.training.step import train_step

if TYPE_CHECKING:
    from tqdm import tqdm


def run_loop(run: TrainRun, logger: Logger) -> dict:
    """Train to ``total_steps``; checkpoint every ``checkpoint_every`` steps and at the end,
    validate at the end of every epoch. Returns the last validation metrics."""
    from coembed.data.loader import prefetched

    cfg = run.cfg
    batches = run.batches_per_epoch
    bar = progress_bar(
        total=run.total_steps,
        initial=run.step,
        enabled=run.dist.is_main,
        unit="step",
        on_pipes=True,
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


def run_epoch(
    run: TrainRun,
    logger: Logger,
    ready: Iterable[tuple[torch.Tensor, list[str]]],
    bar: tqdm,
    epoch: int,
    last_metrics: dict,
) -> dict:
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
        if run.dist.is_main and (run.step % cfg.train.checkpoint_every == 0 or finished):
            save_checkpoint(run)
        if run.val is not None and run.dist.is_main and (end_of_epoch or finished):
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
