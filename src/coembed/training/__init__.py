"""Training: one process on a CPU or GPU, or many through ``torchrun`` (DDP).

``train`` builds the run (build.py), loops over ``train_step`` (loop.py, step.py) and reports
(log.py). Everything a resumed run needs is a pure function of the step number plus what a
checkpoint stores (state.py): the data order of an epoch and the augmentation of a batch are
seeded from (seed, epoch, batch), the optimizer state and RNG states are saved with the weights.
A run killed at any moment and resumed therefore ends with the same weights as one that was never
interrupted (on the CPU in deterministic mode).

Run folder::

    OUTPUT/config.json ...          the latest model directory (what ``coembed.load`` reads)
    OUTPUT/run_config.json          the resolved config, the config asked for, the data arguments
    OUTPUT/metrics.jsonl            one JSON object per logged step / validation
    OUTPUT/summary.json             steps, seconds, skipped data and the last validation recall
    OUTPUT/tensorboard/             TensorBoard events
    OUTPUT/checkpoints/step-NNNNNNN model + optimizer + RNG + step, renamed into place when complete
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from coembed.config import Config
from coembed.training.build import build_run
from coembed.training.log import Logger, data_skipped, report_end, report_start, run_summary
from coembed.training.loop import run_loop
from coembed.training.run import (
    RunOptions,
    TrainingDiverged,
    TrainRun,
    finish_distributed,
    owned_output,
)

__all__ = ["RunOptions", "TrainingDiverged", "train"]


def train(
    config: Config | str | None,
    train_data: str | os.PathLike | None,
    output: str | os.PathLike,
    *,
    val_data: str | None = None,
    init: str | None = None,
    resume: bool = False,
    split: str | None = None,
    val_split: str | None = None,
    zeroshot_data: str | os.PathLike | None = None,
    device: str | None = None,
    profile: bool = False,
) -> dict:
    """Train a model into the run folder ``output``; returns the summary written to summary.json
    (with ``profile``, the profile's figures instead).

    ``config`` is a Config, a recipe name or YAML path, or None to resume with the run's saved
    config; ``device`` replaces ``train.device``. ``split`` and ``val_split`` pick the splits of
    Karpathy / COCO files (a Karpathy file trains on "train" and validates on "val" unless told
    otherwise); ``zeroshot_data`` is a folder of class sub-folders classified at every
    validation. On ``resume`` a config or data given again must be the run's own (UsageError
    otherwise), and there must be a run to resume.

    SIGINT or SIGTERM during the steps stops the run after the current step with a checkpoint
    of it, then acts as it would have (KeyboardInterrupt for SIGINT).
    """
    started = time.perf_counter()
    options = RunOptions(
        output=Path(output),
        train_data=None if train_data is None else os.fspath(train_data),
        val_data=val_data,
        split=split,
        init=init,
        resume=resume,
        device=device,
        val_split=val_split,
        zeroshot_data=None if zeroshot_data is None else os.fspath(zeroshot_data),
    )
    with owned_output(options):  # locked; removed again if the run fails before a checkpoint
        run = build_run(config, options, keep=not profile)
        if profile:
            return profile_and_print(run)
        return fit(run, started)


def fit(run: TrainRun, started: float) -> dict:
    """Log, loop to the last step and report; returns the run's summary."""
    logger = Logger(run.output, run.dist.is_main, start_step=run.step)
    try:
        if run.dist.is_main:
            report_start(run, logger)
        try:
            metrics = run_loop(run, logger)
        except TrainingDiverged as exc:
            logger.log(run.step, diverged=str(exc))
            raise
        if run.dist.is_main:
            empty = run.read_report.empty_captions
            logger.log(run.step, skipped_images=data_skipped(run), empty_captions=empty)
    finally:
        logger.close()
    seconds = time.perf_counter() - started
    summary = run_summary(run, metrics, seconds)
    if run.dist.is_main:
        report_end(run, summary, seconds)
    finish_distributed(run.dist)
    return summary


def profile_and_print(run: TrainRun) -> dict:
    """Profile a few steps (profile.py) and print the figures; returns them."""
    from coembed.training.profile import format_profile, profile_run

    result = profile_run(run)
    if run.dist.is_main:
        print(format_profile(result))
        print(f"details: {run.output / 'profile.json'}, {run.output / 'profile.txt'}")
    return result
