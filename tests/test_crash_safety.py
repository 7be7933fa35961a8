"""SIGKILL during ``coembed index --add`` and during ``coembed train`` checkpoint writing: no
directory ever holds a half-written index, model or checkpoint.

Kills land either after a seeded random delay or at an exact point of a save: the command runs
under a small wrapper that announces every rename into the output folder on stderr and pauses
there (before and after it), and the test kills the process while it waits at the chosen one.
After each kill the folder is scanned: the index loads and searches and holds the old or the new
content, never a mix; the model directory loads; every ``checkpoints/step-*`` folder is whole;
and the next run completes with the result of an uninterrupted one. (test_resume.py checks
bitwise resume equality for kills between steps.)
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import (
    ENV,
    HOOKED,
    assert_nothing_half_written,
    kill_after,
    kill_at_event,
    start,
    tiny_clip_model,
    tiny_dataset,
    train_args,
)


def files_state(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# --- index --add ----------------------------------------------------------------------------------

N_OLD, N_ALL = 100, 200


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """A tiny model, 200 small PNGs, an index of the first 100 and the uninterrupted --add."""
    from coembed.checkpoint import save_model_dir
    from coembed.cli import main
    from coembed.embedder import load
    from coembed.index import Index
    from coembed.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("gallery")
    model = save_model_dir(tiny_clip_model(), Tokenizer.clip(context_length=16), root / "model")
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N_ALL):
        pixels = rng.integers(0, 255, (24, 24, 3), np.uint8)
        Image.fromarray(pixels).save(photos / f"p{i:04d}.png")
    paths = sorted(photos.iterdir())[:N_OLD]
    base = root / "base"
    Index.build(load(model, device="cpu"), images=paths, progress=False).save(base)
    reference = root / "reference"
    shutil.copytree(base, reference)
    args = ["index", "--images", str(photos), "--output", str(reference), "--add"]
    assert main([*args, "--device", "cpu"]) == 0
    return root, photos, base, Index.load(reference, device="cpu")


def layout(folder: Path) -> list[str]:
    return sorted(re.sub(r"\d{6,}", "N", p.name) for p in folder.iterdir())


def contents(index) -> tuple[list[str], np.ndarray]:
    return index.items, index.faiss.reconstruct_n(0, len(index))


def assert_old_or_new(folder: Path, old, new) -> str:
    """The index in ``folder`` loads, searches, and holds exactly the old or the new content."""
    from coembed.index import Index

    index = Index.load(folder, device="cpu")
    items, vectors = contents(index)
    which = "old" if len(items) == len(old.items) else "new"
    want_items, want_vectors = contents(old if which == "old" else new)
    assert items == want_items
    np.testing.assert_allclose(vectors, want_vectors, atol=1e-5)
    _, scores = index.search_ids(vectors[-1], k=1)
    assert scores[0] == pytest.approx(1.0, abs=1e-4)  # finds the last item (or its twin)
    assert len(index.search("a photo of noise", k=5)) == 5  # the index's own model copy loads
    return which


@pytest.mark.slow
def test_index_add_killed_anywhere_keeps_old_or_new(gallery, tmp_path):
    from coembed.cli import main
    from coembed.index import Index

    root, photos, base, reference = gallery
    old = Index.load(base, device="cpu")
    model_before = files_state(root / "model")
    rng = random.Random(9)
    # Seeded random moments (import, embedding, saving) and exact points of the save: the
    # renames of the FAISS file, the items file, index.json (the commit) and skipped.txt;
    # the last "after" leaves the old generation's files behind, not yet deleted.
    plans = [("delay", round(rng.uniform(1.0, 6.0), 2)) for _ in range(3)]
    plans += [("event", e) for e in (1, 5, 6, 8)]

    def attempt(plan):
        how, when = plan
        folder = tmp_path / f"{how}-{when}"
        shutil.copytree(base, folder)
        args = ["index", "--images", str(photos), "--output", str(folder), "--add"]
        proc = start(folder, [*args, "--device", "cpu"])
        if how == "delay":
            kill_after(proc, when)
            proc.stderr.read()
        else:
            kill_at_event(proc, when)
        return folder, proc.returncode

    with ThreadPoolExecutor(2) as pool:
        killed = list(pool.map(attempt, plans))
    outcomes = []
    for (folder, code), plan in zip(killed, plans):
        which = assert_old_or_new(folder, old, reference)
        outcomes.append((plan, code, which))
        # The interrupted --add, run again, ends where an uninterrupted one does.
        args = ["index", "--images", str(photos), "--output", str(folder), "--add"]
        assert main([*args, "--device", "cpu"]) == 0
        assert assert_old_or_new(folder, old, reference) == "new"
        assert layout(folder) == layout(root / "reference")  # no leftovers, one generation
    killed_codes = [code for _, code, _ in outcomes]
    assert killed_codes.count(-signal.SIGKILL) >= 4, outcomes  # the kills did happen
    assert {w for _, _, w in outcomes} == {"old", "new"}, outcomes  # before and after the commit
    assert files_state(root / "model") == model_before


# --- train checkpoints ----------------------------------------------------------------------------


@pytest.mark.slow
def test_train_killed_while_writing_checkpoints(tmp_path):
    data = tiny_dataset(tmp_path / "data", n=16)
    out = tmp_path / "run"
    settings = ["train.checkpoint_every=2", "train.keep_checkpoints=1", "train.deterministic=true"]
    args = train_args(data, out, *[a for s in settings for a in ("--set", s)], steps=8)
    rng = random.Random(5)
    events_seen = []
    for _ in range(4):
        resume = ["--resume"] if (out / "run_config.json").exists() else []
        # One checkpoint is ~20 announced renames (four files in the checkpoint folder, its
        # rename into place, four model files, retiring the older checkpoint), twice each.
        event = rng.randint(2, 36)
        proc = start(out, [*args, *resume], pause=0.05)
        seen = kill_at_event(proc, event)
        events_seen.append((event, proc.returncode, seen[-1] if seen else None))
        assert_nothing_half_written(out)
    killed = [e for e in events_seen if e[1] == -signal.SIGKILL]
    assert len(killed) >= 3, events_seen
    final = subprocess.run(
        [sys.executable, "-m", "coembed", *args, "--resume"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert final.returncode == 0, final.stderr
    assert_nothing_half_written(out)
    assert json.loads((out / "summary.json").read_text())["steps"] == 8
    leftovers = [p.name for p in (out / "checkpoints").iterdir()]
    assert leftovers == ["step-0000008"], leftovers


def test_hook_sees_every_rename_of_a_save(tmp_path):
    """The wrapper really announces the index save's renames (or the kill points mean nothing)."""
    from coembed.index import Index

    folder = tmp_path / "idx"
    vectors = np.eye(4, dtype=np.float32)
    Index.from_vectors(vectors, ["a", "b", "c", "d"]).save(folder)
    script = (
        "import numpy as np; from coembed.index import Index; "
        f"i = Index.load({str(folder)!r}); i.add_vectors(np.eye(4, dtype=np.float32), list('wxyz')); "
        f"i.save({str(folder)!r})"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", HOOKED.replace("from coembed.cli import main\nsys.exit(main(sys.argv[3:]))", script),
         str(folder), "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    _, err = proc.communicate(timeout=120)
    events = [line[3:] for line in err.splitlines() if line.startswith("@@ ")]
    names = [Path(e.split(" ", 1)[1]).name for e in events if e.startswith("before")]
    assert names == ["index-000002.faiss", "items-000002.json", "index.json", "skipped.txt"], err


def test_a_restarted_run_removes_the_temporaries_a_kill_left_at_its_top(tmp_path):
    """``atomic_write``'s temporaries (a kill between writing and renaming) are deleted when the
    run starts again; anything else in the folder, hidden or not, stays."""
    import tempfile

    from coembed.files import is_atomic_temporary
    from coembed.training.state import remove_leftovers

    fd, left = tempfile.mkstemp(prefix=".model.safetensors.", suffix=".tmp", dir=tmp_path)
    os.close(fd)
    keep = [tmp_path / n for n in (".notes.tmp", "model.safetensors", ".config.json.swp")]
    for p in keep:
        p.write_text("mine")
    assert is_atomic_temporary(Path(left).name)
    remove_leftovers(tmp_path)
    assert not Path(left).exists()
    assert all(p.read_text() == "mine" for p in keep)
