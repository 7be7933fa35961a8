"""Training state on disk: checkpoints (weights, optimizer, RNG, step) and run_config.json.

A checkpoint folder is renamed into place only when complete and renamed away before it is
deleted, so a ``step-*`` folder is always whole, whenever the process dies. run_config.json holds
the resolved config, the config as it was asked for and the data arguments, so that ``resume``
continues the run exactly as it started.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from coembed.checkpoint import (
    WEIGHTS_FILE,
    load_state_strict,
    refuse_non_finite,
    save_model_dir,
    save_weights,
)
from coembed.config import Config, config_from_dict, dump_json, load_config, to_dict
from coembed.errors import CoembedError, ConfigError, DataError, ModelDirError, UsageError
from coembed.files import atomic_write_text, is_atomic_temporary
from coembed.schema import Range, check_shape, read_json
from coembed.training.optim import optimizer_tensors, restore_optimizer
from coembed.training.run import (
    CHECKPOINTS,
    RUN_CONFIG,
    RunOptions,
    TrainingDiverged,
    TrainRun,
)

# --- checkpoints ---------------------------------------------------------------------------------

EMA_FILE = "ema.safetensors"  # the weights' moving average, in runs with train.ema_decay
VIEW_HEAD_FILE = "view_head.safetensors"  # the projection head, in runs with train.simclr_weight
MEMORY_FILE = "memory.safetensors"  # the feature memory, in runs with train.feature_memory
PROXIES_FILE = "proxies.safetensors"  # the caption proxies, in runs with train.caption_proxy_weight


def rng_tensors() -> dict[str, torch.Tensor]:
    """The CPU generator's state and each CUDA device's."""
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = s
    return rng


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    """Set the generators back to what ``rng_tensors`` saved (CUDA only on as many devices)."""
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
    model directory at the top of the run folder (with the weights' moving average when the run
    keeps one) and drop checkpoints beyond ``keep_checkpoints``. Returns the checkpoint folder."""
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
    try:
        opt_tensors, opt_meta = optimizer_tensors(run.optimizer)
        save_weights(tmp / WEIGHTS_FILE, model.state_dict(), {"step": str(run.step)})
        save_weights(tmp / "optimizer.safetensors", opt_tensors, {})
        save_weights(tmp / "rng.safetensors", rng_tensors(), {})
        if run.ema is not None:
            save_weights(tmp / EMA_FILE, run.ema.model.state_dict(), {"step": str(run.step)})
        if run.view_head is not None:
            save_weights(tmp / VIEW_HEAD_FILE, run.view_head.state_dict(), {"step": str(run.step)})
        if run.memory is not None:
            save_weights(tmp / MEMORY_FILE, run.memory.state_dict(), {"step": str(run.step)})
        if run.proxies is not None:
            save_weights(tmp / PROXIES_FILE, run.proxies.state_dict(), {"step": str(run.step)})
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
        if run.proxies is not None:
            state["caption_proxies"] = run.proxies.digest  # which captions the rows stand for
        atomic_write_text(tmp / "state.json", json.dumps(state))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # e.g. a full disk: give back what it took
        raise
    if final.exists():
        delete_checkpoint(final)
    os.replace(tmp, final)
    save_model_dir(run.evaluated_model, run.tokenizer, run.output)
    for old in checkpoint_dirs(run.output)[: -run.cfg.train.keep_checkpoints]:
        delete_checkpoint(old)
    return final


def delete_checkpoint(checkpoint: Path) -> None:
    """Delete a checkpoint folder: renamed away first, so no ``step-*`` is ever half-deleted."""
    gone = checkpoint.with_name(f".del-{checkpoint.name}")
    shutil.rmtree(gone, ignore_errors=True)
    os.replace(checkpoint, gone)
    shutil.rmtree(gone, ignore_errors=True)


def last_good(output: Path) -> str:
    """Where a stopped run can be resumed from, as a phrase for an error message."""
    kept = checkpoint_dirs(output)
    return (
        f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint had been written yet"
    )


# What a checkpoint's state.json holds (``save_checkpoint``); more keys are allowed.
STATE_SHAPE = {
    "step": Range(int, 0),
    "epoch?": Range(int, 0),
    "batch?": Range(int, 0),
    "batches_per_epoch?": Range(int, 1),
    "optimizer": {"param_groups": [{"params": [Range(int, 0)]}], "scalars": dict},
    "skipped?": dict,
}


def read_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict, dict]:
    """(state.json, weights, optimizer tensors, RNG tensors) of the checkpoint folder ``path``,
    checked for shape; ModelDirError for anything missing, truncated or of the wrong kind."""
    advice = f"delete {path} to resume from an older checkpoint"
    state = read_json(path / "state.json", ModelDirError, advice)
    check_shape(state, STATE_SHAPE, str(path / "state.json"), ModelDirError, advice)
    if path.name != f"step-{state['step']:07d}":
        raise ModelDirError(
            f"{path / 'state.json'}: step {state['step']} is not the step of its folder; {advice}"
        )
    try:
        weights = load_file(str(path / WEIGHTS_FILE))
        opt = load_file(str(path / "optimizer.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelDirError(f"{path}: unreadable checkpoint ({exc}); {advice}") from None
    cpu = rng.get("torch_cpu")
    if cpu is None or cpu.dtype != torch.uint8 or cpu.ndim != 1:
        raise ModelDirError(f"{path / 'rng.safetensors'}: no CPU generator state; {advice}")
    return state, weights, opt, rng


def read_extra(path: Path, name: str, why: str) -> dict[str, torch.Tensor]:
    """The tensors of the file ``name`` in the checkpoint folder ``path``, which the run needs
    ``why`` (e.g. "the run keeps a moving average (train.ema_decay)"); ModelDirError when the
    checkpoint has none (one of a run without it) or it cannot be read."""
    try:
        return load_file(str(path / name))
    except FileNotFoundError:
        raise ModelDirError(
            f"{path}: no {name}, though {why}; delete {path} to resume from an older checkpoint"
        ) from None
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelDirError(
            f"{path / name}: unreadable ({exc}); delete {path} to resume from an older checkpoint"
        ) from None


def load_proxies(run: TrainRun, path: Path, state: dict) -> None:
    """The caption proxies of the checkpoint ``path``, refused unless they stand for the same
    captions as the run's (the data's distinct captions, sorted)."""
    if state.get("caption_proxies") != run.proxies.digest:
        raise DataError(
            f"{path}: its caption proxies were trained for other captions than the training data "
            "has now; resume on the same data (train.caption_proxy_weight keeps one per caption)"
        )
    why = "the run trains caption proxies (train.caption_proxy_weight)"
    proxies = read_extra(path, PROXIES_FILE, why)
    refuse_non_finite(proxies, str(path / PROXIES_FILE))
    load_state_strict(run.proxies, proxies, str(path / PROXIES_FILE))


def load_checkpoint(run: TrainRun, path: Path) -> None:
    """Restore weights (and their moving average), optimizer, RNG and step from the checkpoint
    folder ``path``."""
    state, weights, opt, rng = read_checkpoint(path)
    if state.get("batches_per_epoch", run.batches_per_epoch) != run.batches_per_epoch:
        raise DataError(
            f"{path}: the run had {state['batches_per_epoch']} batches per epoch, the data now "
            f"gives {run.batches_per_epoch}; resume on the same data (images may have changed)"
        )
    load_state_strict(run.raw_model, weights, str(path / WEIGHTS_FILE))
    if run.ema is not None:
        why = "the run keeps a moving average (train.ema_decay)"
        load_state_strict(run.ema.model, read_extra(path, EMA_FILE, why), str(path / EMA_FILE))
    if run.view_head is not None:
        why = "the run trains a projection head (train.simclr_weight)"
        head = read_extra(path, VIEW_HEAD_FILE, why)
        load_state_strict(run.view_head, head, str(path / VIEW_HEAD_FILE))
    if run.proxies is not None:
        load_proxies(run, path, state)
    if run.memory is not None:
        why = "the run keeps a feature memory (train.feature_memory)"
        remembered = read_extra(path, MEMORY_FILE, why)
        refuse_non_finite(remembered, str(path / MEMORY_FILE))
        try:
            run.memory.load_state_dict(remembered, str(path / MEMORY_FILE))
        except ValueError as exc:
            raise ModelDirError(
                f"{exc}; resume with the run's train.feature_memory, or delete {path}"
            ) from None
    refuse_non_finite(opt, str(path / "optimizer.safetensors"))
    try:
        restore_optimizer(run.optimizer, opt, state["optimizer"])
        restore_rng(rng)
    except (ValueError, KeyError, IndexError, TypeError, RuntimeError) as exc:
        raise ModelDirError(
            f"{path}: the optimizer or generator state does not fit this run ({exc}); "
            f"delete {path} to resume from an older checkpoint"
        ) from None
    run.step = state["step"]


# --- run_config.json -----------------------------------------------------------------------------


def dataset_path(path: str | os.PathLike | None) -> str | None:
    """A dataset argument as stored in run_config.json: absolute when it is a local path."""
    if path is None:
        return None
    return os.path.abspath(path) if os.path.exists(path) else str(path)


# The data arguments run_config.json stores, which a resumed run takes from it.
SAVED_DATA = ("train_data", "val_data", "split", "init", "val_split", "zeroshot_data")


def write_run_config(options: RunOptions, cfg: Config, requested: Config) -> None:
    """Store the resolved config, the config as asked for, the data arguments and ``init``."""
    run_config = {
        "config": json.loads(dump_json(cfg)),
        "requested_config": json.loads(dump_json(requested)),
        "train_data": dataset_path(options.train_data),
        "val_data": dataset_path(options.val_data),
        "split": options.split,
        "init": options.init and os.path.abspath(options.init),
        "val_split": options.val_split,
        "zeroshot_data": dataset_path(options.zeroshot_data),
    }
    atomic_write_text(options.output / RUN_CONFIG, json.dumps(run_config, indent=2))


# What run_config.json holds (``write_run_config``; older runs stored "recipe" and "flags"
# instead of "requested_config"); more keys are allowed.
RUN_CONFIG_SHAPE = {
    "config": dict,
    "requested_config?": dict,
    "recipe?": (str, None),
    "flags?": ([str], None),
    "train_data?": (str, None),
    "val_data?": (str, None),
    "split?": (str, None),
    "init?": (str, None),
    "val_split?": (str, None),
    "zeroshot_data?": (str, None),
}


def read_run_config(output: Path) -> dict | None:
    """The saved run_config.json, checked; None when a run never got that far (nothing to
    resume). A damaged one is a ModelDirError: --resume cannot know how the run started."""
    path = output / RUN_CONFIG
    if not path.exists():
        return None
    advice = "the run cannot be resumed without it: restore it, or start a new run elsewhere"
    saved = read_json(path, ModelDirError, advice)
    check_shape(saved, RUN_CONFIG_SHAPE, str(path), ModelDirError, advice)
    if "val_split" not in saved:  # older runs read their validation data with ``split`` too
        saved["val_split"] = saved.get("split")
    for key in SAVED_DATA:
        saved.setdefault(key, None)
    return saved


def saved_request(saved: dict) -> dict:
    """The config the saved run was asked for: stored, or (older run folders) rebuilt from the
    recipe and ``key=value`` flags they stored instead."""
    if "requested_config" in saved:
        return saved["requested_config"]
    try:
        return to_dict(load_config(saved.get("recipe"), saved.get("flags") or []))
    except CoembedError as exc:
        raise UsageError(
            f"--resume cannot compare the config given with the run's ({exc}); give no config "
            f"(or no flags) to continue the run as saved in {RUN_CONFIG}"
        ) from None


def flat_items(values: dict, prefix: str = "") -> dict[str, object]:
    """A nested config dict as ``{"train.lr": 0.0005, ...}``."""
    flat: dict[str, object] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flat_items(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_same_config(given: Config, saved: dict) -> None:
    """Refuse a config given on resume that differs from the saved run's (the device may move)."""
    # Keys added to the config since the run started hold their defaults in it.
    now = flat_items(to_dict(given))
    then = {**flat_items(to_dict(Config())), **flat_items(saved_request(saved))}
    differ = sorted(
        k for k in now.keys() | then.keys() if k != "train.device" and now.get(k) != then.get(k)
    )
    if differ:
        raise UsageError(
            f"--resume continues the run as saved in {RUN_CONFIG}, but the config given differs "
            f"(given: {' '.join(f'{k}={now.get(k)}' for k in differ)}; "
            f"saved: {' '.join(f'{k}={then.get(k)}' for k in differ)}); "
            "give no config (no flags) to continue as saved, or repeat the original one"
        )


def check_same_data(options: RunOptions, saved: dict) -> None:
    """Refuse data given on resume that is not the data the run started with."""
    given = {
        "train_data": dataset_path(options.train_data),
        "val_data": dataset_path(options.val_data),
        "split": options.split,
        "val_split": options.val_split,
        "zeroshot_data": dataset_path(options.zeroshot_data),
    }
    for name, value in given.items():
        if value is not None and value != saved[name]:
            raise UsageError(
                f"--resume continues the run on its own data: {name.replace('_', '-')} was "
                f"{saved[name]}, now {value}"
            )


def resumed_config(saved: dict, given: Config | None, options: RunOptions) -> Config:
    """The saved run's resolved config, on the device named (by ``options`` or the config given).

    A config or data given again must be those the run started with (UsageError otherwise)."""
    if given is not None:
        check_same_config(given, saved)
    check_same_data(options, saved)
    try:
        cfg = config_from_dict(saved["config"])
    except ConfigError as exc:
        raise ModelDirError(f"{options.output / RUN_CONFIG}: config: {exc}") from None
    device = options.device or (given.train.device if given is not None else None)
    if device not in (None, "auto"):
        cfg.train.device = device  # a run may move to another device
    return cfg
