"""``coembed train --init FILE``: fine-tune an open_clip checkpoint on the shipped data, end to end.

A random open_clip ResNet CLIP is saved as a plain state dict (what users download or train with
open_clip), then the real CLI fine-tunes it on a slice of data/synthetic with one tower locked.
"""

from __future__ import annotations

import csv

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import SHIPPED, run_cli, small_openclip

open_clip = pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def checkpoint_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    model, overrides = small_openclip("quickgelu")
    ckpt = root / "openclip.pt"
    torch.save(model.state_dict(), ckpt)
    rows = list(csv.DictReader(open(SHIPPED / "train.csv")))[:64]
    data = root / "train.csv"
    with open(data, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["filepath", "caption"])
        writer.writeheader()
        for row in rows:
            writer.writerow({"filepath": str(SHIPPED / row["filepath"]), "caption": row["caption"]})
    return model, overrides, ckpt, data, root


@pytest.mark.parametrize("lock", ["--lock-image", "--lock-text"])
def test_finetune_an_openclip_checkpoint_with_a_locked_tower(checkpoint_and_data, lock):
    model, overrides, ckpt, data, root = checkpoint_and_data
    out = root / lock.strip("-")
    sets = [
        *overrides,
        "model.tokenizer=clip",
        "model.text.vocab_size=49408",
        "model.text.eot_id=49407",
        "model.text.context_length=77",
        "train.lr=1e-2",
        "train.warmup_steps=0",
        "train.checkpoint_every=100",
    ]
    args = ["train", "--config", "tiny", "--train-data", str(data), "--output", str(out)]
    args += ["--init", str(ckpt), lock, "--steps", "3", "--batch-size", "16", "--device", "cpu"]
    for item in sets:
        args += ["--set", item]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]

    from coembed.config import load_config
    from coembed.interop.openclip import read_openclip_state

    cfg = load_config("tiny", sets).model
    start = read_openclip_state(str(ckpt), cfg)
    after = load_file(str(out / "model.safetensors"))
    frozen, trained = ("visual.", "text.") if lock == "--lock-image" else ("text.", "visual.")
    changed = [k for k in start if k.startswith(frozen) and not torch.equal(start[k], after[k])]
    assert not changed, changed[:3]
    moved = [k for k in start if k.startswith(trained) and not torch.equal(start[k], after[k])]
    assert len(moved) > 0.5 * sum(k.startswith(trained) for k in start)
