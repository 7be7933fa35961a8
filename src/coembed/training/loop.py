"""The loop: epochs of prefetched batches through ``train_step``, with checkpoints, validation and
logging at their steps, and a clean stop on SIGINT / SIGTERM between two steps."""

from __future__ import annotations

import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from types import FrameType
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from coembed.config import Config
from coembed.data.transforms import StyleAugment
from coembed.progress import progress_bar
from coembed.training.log import Logger, evaluate_and_log
from coembed.training.run import CHECKPOINTS, TrainRun
from coembed.training.state import save_checkpoint
from coembed.training.step import train_step, wants_image_ids
from coembed.training.views import two_views

if TYPE_CHECKING:
    from tqdm import tqdm

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """Within the block, SIGINT and SIGTERM ask the loop to stop after the current step instead of
    acting at once, so the step is finished and saved. A second signal of either kind acts at once,
    as it would have without the block (a signal the process ignores stays ignored)."""

    def __init__(self) -> None:
        self.signum = 0  # the first signal received, 0 for none
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # handlers live there only
            for signum in STOP_SIGNALS:
                previous = signal.getsignal(signum)
                if previous is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._request)
        return self

    def _request(self, signum: int, frame: FrameType | None) -> None:
        if self.signum:  # asked again: stop now
            self.restore()
            signal.raise_signal(signum)
            return
        self.signum = signum

    def restore(self) -> None:
        """Put the handlers back as they were before the block."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def __exit__(self, *exc: object) -> None:
        self.restore()


def agreed_stop(run: TrainRun, requests: StopRequests) -> int:
    """The signal every process stops for after this step (0: go on): one process receiving
    it stops them all, at the same step."""
    if run.dist.world == 1:
        return requests.signum
    flag = torch.tensor([requests.signum], device=run.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def style_augment_of(cfg: Config) -> StyleAugment:
    """The style-invariant augmentation the config asks for (all off by default, and all off
    with ``data.augment=false``, which switches every change of the training images off)."""
    d = cfg.data
    if not d.augment:
        return StyleAugment()
    return StyleAugment(
        d.color_jitter, d.grayscale_p, d.blur_p, d.random_conv_p, d.spare_color_captions
    )


def run_loop(run: TrainRun, logger: Logger) -> dict:
    """Train to ``total_steps``; checkpoint every ``checkpoint_every`` steps and at the end,
    evaluate at the end of every epoch. Returns the last evaluation metrics.

    A SIGINT or SIGTERM stops the run after the current step: its checkpoint is written, the
    command that resumes it is printed, and the signal then acts as it would have (Ctrl-C
    raises KeyboardInterrupt).
    """
    bar = progress_bar(
        total=run.total_steps,
        initial=run.step,
        enabled=run.dist.is_main,
        unit="step",
        on_pipes=True,
    )
    run.raw_model.train()
    with StopRequests() as requests:
        last_metrics, signum = run_epochs(run, logger, bar, requests)
        bar.close()
        if signum:
            save_stopped(run, signum)
    if signum:
        signal.raise_signal(signum)
        raise KeyboardInterrupt  # the handler before ours acted on the signal without raising
    return last_metrics


def epoch_batches(
    run: TrainRun, epoch: int, start_batch: int = 0, fill_failed: bool = False
) -> Iterator[tuple]:
    """This rank's training batches of ``epoch`` from ``start_batch`` on, as the run's config asks
    for them (augmentation, image ids, a second view, caption runs)."""
    cfg = run.cfg
    return run.data.epoch_batches(
        epoch,
        cfg.train.seed,
        run.per_rank_batch,
        start_batch=start_batch,
        rank=run.dist.rank,
        world_size=run.dist.world,
        augment=cfg.data.augment,
        fill_failed=fill_failed,
        crop_scale_min=cfg.data.crop_scale_min,
        with_image_ids=wants_image_ids(cfg),
        style=style_augment_of(cfg),
        second_view=two_views(cfg),
        caption_group=cfg.data.caption_group,
    )


def run_epochs(
    run: TrainRun, logger: Logger, bar: tqdm, requests: StopRequests
) -> tuple[dict, int]:
    """Epochs from the run's step to its last one, or until a stop is agreed on; returns the
    last evaluation metrics and the signal that stopped the run (0 when it finished)."""
    from coembed.data.loader import prefetched

    cfg = run.cfg
    last_metrics: dict = {}
    signum = 0
    while run.step < run.total_steps and not signum:
        epoch, start_batch = divmod(run.step, run.batches_per_epoch)
        stream = epoch_batches(run, epoch, start_batch, fill_failed=True)
        with prefetched(stream, cfg.data.prefetch) as ready:
            last_metrics, signum = run_epoch(run, logger, ready, bar, epoch, requests, last_metrics)
        if run.dist.world > 1:
            dist.barrier()
    return last_metrics, signum


def save_stopped(run: TrainRun, signum: int) -> None:
    """Checkpoint the step a signal stopped the run after (unless it just was), and print the
    command that continues the run."""
    if run.dist.is_main:
        checkpoint = run.output / CHECKPOINTS / f"step-{run.step:07d}"
        if not checkpoint.is_dir():
            save_checkpoint(run)
        resume = f"coembed train --output {shlex.quote(str(run.output))} --resume"
        if run.dist.world > 1:
            resume = f"torchrun --nproc_per_node={run.dist.world} -m {resume}"
        print(
            f"{signal.Signals(signum).name}: stopped after step {run.step} of {run.total_steps}, "
            f"saved in {checkpoint}; continue with: {resume}",
            file=sys.stderr,
            flush=True,
        )
    if run.dist.world > 1:
        dist.barrier()


def run_epoch(
    run: TrainRun,
    logger: Logger,
    ready: Iterable[tuple[torch.Tensor, list[str]]],
    bar: tqdm,
    epoch: int,
    requests: StopRequests,
    last_metrics: dict,
) -> tuple[dict, int]:
    """The steps of one epoch from ``ready`` batches (from a resumed position on), up to the
    epoch's end, the run's last step or an agreed stop; returns the latest evaluation metrics
    and the signal that stops the run (0: none)."""
    cfg = run.cfg
    window_start, window_samples = time.perf_counter(), 0
    for images, captions, *image_ids in ready:  # image ids: see step.wants_image_ids
        loss, grad_norm = train_step(run, images, captions, *image_ids)
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
        evaluates = run.val is not None or run.zeroshot is not None
        if evaluates and run.dist.is_main and (end_of_epoch or finished):
            last_metrics = evaluate_and_log(run, logger, epoch, bar.write)
            window_start, window_samples = time.perf_counter(), 0  # not charged to training
        signum = 0 if finished else agreed_stop(run, requests)
        if finished or end_of_epoch or signum:
            return last_metrics, signum
    return last_metrics, 0
