"""What several test files (and benchmarks/bench_reliability.py) share: the tiny models, the
command line in a subprocess, tiny training runs, kills at an exact point of a save, a served
index, and small open_clip models. Fixtures live in conftest.py; a test file imports from here,
never from another test file.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "data" / "synthetic"

# --- tiny models ----------------------------------------------------------------------------------

# The tiny recipe's objectives beyond the contrastive pair, off: unit tests of one objective
# start from the plain loss (runs through the CLI keep the recipe's, TINY_SET below).
CONTRASTIVE_ONLY = [
    "train.soft_targets=false",
    "data.caption_group=1",
    "train.image_supcon_weight=0",
    "train.caption_proxy_weight=0",
    "train.cyclic_weight=0",
]

# Small shapes so the whole suite stays fast on two cores.
TINY = [
    "model.embed_dim=32",
    "model.text.width=32",
    "model.text.layers=2",
    "model.text.heads=2",
    "model.text.context_length=16",
    "model.image.width=8",
    "model.image.layers=[1,1,1,1]",
    "model.image.image_size=32",
    "model.image.heads=4",
    *CONTRASTIVE_ONLY,
]


def tiny_config(*extra: str):
    """The tiny recipe at the TINY shapes, with ``extra`` overrides."""
    from coembed.config import load_config

    return load_config("tiny", [*TINY, *extra])


def tiny_clip_model(*extra: str, seed: int = 0):
    """A tiny random model on CLIP's tokenizer (vocab 49408, EOT 49407)."""
    from coembed.model import CoEmbed

    cfg = tiny_config(
        "model.tokenizer=clip", "model.text.vocab_size=49408", "model.text.eot_id=49407", *extra
    )
    torch.manual_seed(seed)
    return CoEmbed(cfg.model)


# --- the command line -----------------------------------------------------------------------------


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None):
    """Run the real ``coembed`` command in a subprocess; returns the CompletedProcess."""
    full_env = {**os.environ, "COEMBED_NO_PROGRESS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "coembed", *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        timeout=timeout,
        env=full_env,
    )


# Runs CLI calls one after the other in one interpreter, each through the same `main` that
# `python -m coembed` calls, with its own stdout and stderr: the torch import and the tokenizer's
# Unicode tables (~7 s of CPU per process) are paid once instead of once per call. Around each call
# it notes which entries under root/<top> changed (kind, size, mtime, inode), for each protected
# top; a writer's lock file beside what it locks (``*.lock``) comes and goes and is not counted.
CLI_BATCH = """
import contextlib, io, json, os, sys, traceback
from coembed.cli import main

def snap(root, tops):
    out = {}
    for top in tops:
        for item in os.listdir(os.path.join(root, top)):
            if item.endswith(".lock"):
                continue
            path = os.path.join(root, top, item)
            walked = os.walk(path) if os.path.isdir(path) else [(os.path.dirname(path), [], [item])]
            for dirpath, dirs, files in walked:
                for name in [*dirs, *files, ""]:
                    st = os.lstat(os.path.join(dirpath, name))
                    key = os.path.relpath(os.path.join(dirpath, name), root)
                    out[key] = [st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino]
    return out

argvs, root, tops = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
results = []
for argv in argvs:
    before = snap(root, tops)
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        except BaseException:
            traceback.print_exc(file=err)
            code = -1
    after = snap(root, tops)
    diff = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    results.append((code, out.getvalue(), err.getvalue(), diff))
sys.__stdout__.write(json.dumps(results))
"""


def run_cli_cases(
    arg_lists: list[list[str]],
    *,
    cwd: Path | None = None,
    root: Path | None = None,
    protected: tuple[str, ...] = (),
    timeout: float = 600,
) -> list[tuple[int, str, str, list[str]]]:
    """Run several CLI calls in one interpreter, all within ``timeout`` seconds (a call that hangs
    fails the test instead of holding it): (exit code, stdout, stderr, paths changed under
    root/<each of protected>) per call."""
    env = {**os.environ, "COEMBED_NO_PROGRESS": "1", "PYTHONPATH": str(REPO / "src")}
    argv = [json.dumps(arg_lists), str(root or REPO), json.dumps(list(protected))]
    proc = subprocess.run(
        [sys.executable, "-c", CLI_BATCH, *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [tuple(r) for r in json.loads(proc.stdout)]


def run_cli_batch(
    arg_lists: list[list[str]], cwd: Path | None = None, timeout: float = 600
) -> list[subprocess.CompletedProcess]:
    """Run several CLI calls in one interpreter; one CompletedProcess per call."""
    results = run_cli_cases(arg_lists, cwd=cwd, timeout=timeout)
    return [subprocess.CompletedProcess(a, *r[:3]) for a, r in zip(arg_lists, results)]


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """``proc``, after asserting it succeeded without a traceback."""
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def assert_one_line_error(proc, code: int | None = None, contains: str = "") -> None:
    """A user's mistake: non-zero exit, one line on stderr, no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    if code is not None:
        assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("coembed: error:"), proc.stderr
    assert contains.lower() in lines[0].lower(), (contains, proc.stderr)


# --- files before and after ----------------------------------------------------------------------


def tree_snapshot(folder: Path, deep: bool = False) -> dict[str, tuple]:
    """Every entry under ``folder`` (itself included): kind, size, mtime and inode, and with
    ``deep`` the sha256 of each file's content. Compare two with ``tree_changes``."""
    import hashlib

    out = {}
    for path in sorted([folder, *folder.rglob("*")]) if folder.exists() else []:
        st = path.lstat()
        key = str(path.relative_to(folder))
        out[key] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino)
        if deep and path.is_file() and not path.is_symlink():
            out[key] += (hashlib.sha256(path.read_bytes()).hexdigest(),)
    return out


def tree_changes(before: dict, after: dict) -> list[str]:
    """The entries added, removed or changed between two ``tree_snapshot``s."""
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


# --- tiny training runs ---------------------------------------------------------------------------

# The tiny test model: a 0.4M-parameter run takes well under a second per step on a CPU.
TINY_SET = [
    "model.image.width=8",
    "model.image.image_size=32",
    "model.text.width=32",
    "model.text.layers=1",
    "model.text.heads=2",
    "model.embed_dim=32",
    "model.image.heads=4",
    "model.text.context_length=16",
    "model.text.vocab_size=600",
    "train.threads=1",
    "data.workers=0",
]
# Runs compared with each other use CLIP's fixed tokenizer: a BPE trained on the captions is not
# the same in every process (tokenizers' trainer breaks ties between equally frequent pairs in
# hash-map order), so two separately started runs would not even share their token ids.
CLIP_TOKENIZER = ("--set", "model.tokenizer=clip", "--set", "model.text.vocab_size=49408")


def tiny_train_run(captions: list[str], settings: list[str], batchnorm_eval: bool = False):
    """A TrainRun of the tiny recipe with ``settings`` on the CPU, built in memory around a BPE
    trained on ``captions`` (BatchNorm in eval mode if asked, so two passes see the same
    normalisation)."""
    from coembed.config import load_config
    from coembed.loss import loss_of
    from coembed.model import CoEmbed
    from coembed.tokenizer import Tokenizer
    from coembed.training.memory import memory_for
    from coembed.training.optim import make_optimizer
    from coembed.training.run import Dist, TrainRun
    from coembed.training.views import view_head_for

    tokenizer = Tokenizer.train(captions, vocab_size=600, context_length=16)
    cfg = load_config("tiny", settings)
    cfg.model.text.vocab_size, cfg.model.text.eot_id = tokenizer.vocab_size, tokenizer.eot_id
    torch.manual_seed(0)
    model = CoEmbed(cfg.model).train()
    for m in model.modules():
        if batchnorm_eval and isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    head = view_head_for(cfg)
    return TrainRun(
        cfg=cfg,
        output=Path("."),
        device=torch.device("cpu"),
        dist=Dist(),
        model=model,
        raw_model=model,
        tokenizer=tokenizer,
        optimizer=make_optimizer(model, cfg, head),
        data=None,
        total_steps=1,
        batches_per_epoch=1,
        loss_fn=loss_of(cfg.train),
        view_head=head,
        memory=memory_for(cfg, torch.device("cpu")),
    )


def shipped_rows(n: int, split: str = "train") -> list[tuple[str, str]]:
    """The first n (image file name, caption) rows of the shipped dataset."""
    with open(SHIPPED / f"{split}.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:n]
    return [(Path(r["filepath"]).name, r["caption"]) for r in rows]


def copy_images(rows: list[tuple[str, str]], folder: Path) -> None:
    """Copy the shipped images named in ``rows`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, _ in rows:
        shutil.copyfile(SHIPPED / "images" / name, folder / name)


def write_csv(path: Path, rows: list[tuple[str, str]], header=("filepath", "caption"), sep=","):
    """Write ``rows`` under ``header``; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter=sep)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def tiny_dataset(folder: Path, n: int = 24, split: str = "train") -> Path:
    """A CSV of n shipped pairs with its images copied beside it; returns the CSV path."""
    rows = shipped_rows(n, split)
    copy_images(rows, folder / "images")
    return write_csv(folder / f"{split}.csv", [(f"images/{a}", b) for a, b in rows])


def train_args(data, output, *extra: str, steps: int | None = 2, batch: int = 8) -> list[str]:
    """``coembed train`` arguments for the tiny model on CPU; ``extra`` is appended."""
    args = ["train", "--train-data", str(data), "--output", str(output), "--device", "cpu"]
    args += ["--batch-size", str(batch), *[a for pair in TINY_SET for a in ("--set", pair)]]
    if steps is not None:
        args += ["--steps", str(steps)]
    return args + list(extra)


def metrics(output: Path) -> list[dict]:
    """The lines of a run's metrics.jsonl."""
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``folder``/model.safetensors."""
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


# --- kills at an exact point of a save ------------------------------------------------------------

# Runs `coembed ARGS...` with os.replace/os.rename announcing "@@ before|after PATH" for every
# rename into WATCH and pausing there, so the parent can SIGKILL at an exact point of a save.
HOOKED = r"""
import os, sys, time
watch, pause = os.path.abspath(sys.argv[1]), float(sys.argv[2])
real = {"replace": os.replace, "rename": os.rename}

def hooked(name):
    def move(src, dst, *args, **kwargs):
        seen = os.path.abspath(dst).startswith(watch)
        if seen:
            sys.__stderr__.write(f"@@ before {dst}\n"); sys.__stderr__.flush(); time.sleep(pause)
        real[name](src, dst, *args, **kwargs)
        if seen:
            sys.__stderr__.write(f"@@ after {dst}\n"); sys.__stderr__.flush(); time.sleep(pause)
    return move

os.replace, os.rename = hooked("replace"), hooked("rename")
from coembed.cli import main
sys.exit(main(sys.argv[3:]))
"""
# The environment of a killed subprocess: this checkout's source, no progress bars.
ENV = {**os.environ, "COEMBED_NO_PROGRESS": "1", "PYTHONPATH": str(REPO / "src")}


def start(watch: Path, args: list[str], pause: float = 0.2) -> subprocess.Popen:
    """Start ``coembed ARGS`` under HOOKED, announcing and pausing at every rename into ``watch``."""
    return subprocess.Popen(
        [sys.executable, "-c", HOOKED, str(watch), str(pause), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )


def kill_at_event(proc: subprocess.Popen, event: int) -> list[str]:
    """SIGKILL ``proc`` while it pauses at its ``event``-th announced rename (1-based); returns
    the events seen. If it finishes first, nothing is killed."""
    seen = []
    for line in proc.stderr:
        if line.startswith("@@ "):
            seen.append(line[3:].strip())
            if len(seen) == event:
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait()
    return seen


def kill_after(proc: subprocess.Popen, delay: float) -> None:
    """SIGKILL ``proc`` after ``delay`` seconds unless it finished before."""
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


CHECKPOINT_FILES = {"model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"}
# What a checkpoint holds besides, when the run's objectives keep state of their own.
OBJECTIVE_FILES = {
    "ema.safetensors",
    "view_head.safetensors",
    "memory.safetensors",
    "proxies.safetensors",
}
MODEL_FILES = {"config.json", "model.safetensors", "tokenizer.json", "preprocess.json"}


def assert_nothing_half_written(out: Path) -> None:
    """The model at the top loads (or is not there yet); every step-* folder is whole; anything
    else under checkpoints/ is a hidden leftover that ``train`` never reads as a checkpoint."""
    from safetensors.torch import load_file

    from coembed.checkpoint import load_model_dir
    from coembed.training.state import checkpoint_dirs

    if (out / "config.json").exists():
        assert MODEL_FILES <= {p.name for p in out.iterdir()}
        load_model_dir(out)
    else:
        assert not (out / "model.safetensors").exists()
    root = out / "checkpoints"
    for folder in sorted(root.iterdir()) if root.exists() else []:
        if not folder.name.startswith("step-"):
            assert folder.name.startswith((".tmp-", ".del-")), folder
            assert folder not in checkpoint_dirs(out)
            continue
        names = {p.name for p in folder.iterdir()}
        assert CHECKPOINT_FILES <= names <= CHECKPOINT_FILES | OBJECTIVE_FILES, folder
        state = json.loads((folder / "state.json").read_text())
        assert folder.name == f"step-{state['step']:07d}"
        for name in names - {"state.json"}:
            load_file(str(folder / name))


# --- a served index -------------------------------------------------------------------------------

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (40, 60, 220),
    "yellow": (240, 220, 40),
    "black": (10, 10, 10),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square")


def make_images(folder: Path) -> list[Path]:
    """Twelve small PNGs: every colour as a circle and a square on grey."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rgb in COLOURS.items():
        for shape in SHAPES:
            image = Image.new("RGB", (48, 40), (128, 128, 128))
            draw = ImageDraw.Draw(image)
            box = (8, 6, 40, 34)
            (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=rgb)
            path = folder / f"{name}_{shape}.png"
            image.save(path)
            paths.append(path)
    return paths


def build_served_index(root: Path) -> Path:
    """A tiny random model, twelve images and their index under ``root``; returns the index dir."""
    from coembed.checkpoint import save_model_dir
    from coembed.embedder import load
    from coembed.index import Index
    from coembed.tokenizer import Tokenizer

    model_dir = save_model_dir(tiny_clip_model(), Tokenizer.clip(context_length=16), root / "model")
    make_images(root / "images")
    index = Index.build(load(model_dir, device="cpu"), images=root / "images", progress=False)
    return index.save(root / "index")


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- small open_clip models -----------------------------------------------------------------------

# Small open_clip CLIP ResNets: (name, embed_dim, image layers, image width, image size,
# head_width, text width, text heads, text layers, quick_gelu)
SMALL = {
    "quickgelu": (32, (1, 1, 1, 1), 16, 64, 16, 32, 4, 2, True),
    "gelu": (24, (2, 1, 1, 1), 8, 96, 32, 48, 3, 1, False),
    "deeper": (16, (1, 2, 2, 1), 8, 64, 64, 32, 2, 3, True),
}


def small_openclip(name: str, seed: int = 0):
    """A random open_clip CLIP with the SMALL[name] shapes, and the coembed overrides that match it."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    dim, layers, width, size, head_width, tw, th, tl, quick = SMALL[name]
    torch.manual_seed(seed)
    model = CLIP(
        dim,
        CLIPVisionCfg(layers=layers, width=width, image_size=size, head_width=head_width),
        CLIPTextCfg(context_length=77, vocab_size=49408, width=tw, heads=th, layers=tl),
        quick_gelu=quick,
    )
    randomize(model)
    overrides = [
        f"model.embed_dim={dim}",
        f"model.image.layers=[{','.join(map(str, layers))}]",
        f"model.image.width={width}",
        f"model.image.image_size={size}",
        f"model.image.heads={width * 32 // head_width}",
        f"model.text.width={tw}",
        f"model.text.heads={th}",
        f"model.text.layers={tl}",
        f"model.text.act={'quick_gelu' if quick else 'gelu'}",
    ]
    return model.eval(), overrides


@torch.no_grad()
def randomize(model: torch.nn.Module) -> None:
    """Give every BatchNorm non-trivial statistics and scales, and the temperature a distinct value."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.copy_(torch.randn(n, generator=gen) * 0.3 + 1)
            m.bias.copy_(torch.randn(n, generator=gen) * 0.2)
            m.num_batches_tracked.fill_(7)
    for name, p in model.named_parameters():
        if name.endswith("logit_scale"):
            p.fill_(3.3)


# A small open_clip CLIP ResNet with CLIP's 64-wide heads, which its weights do not store: the
# coembed overrides of its shapes, for recipes that do not read them from the file.
HEADS_64 = [
    "model.embed_dim=32",
    "model.image.layers=[1,1,1,1]",
    "model.image.width=64",
    "model.image.image_size=64",
    "model.image.heads=32",
    "model.text.width=64",
    "model.text.heads=1",
    "model.text.layers=2",
]


def heads_64_openclip(quick_gelu: bool, seed: int = 0):
    """A random open_clip CLIP of the HEADS_64 shapes (GELU, or QuickGELU), in eval mode."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    model = CLIP(
        32,
        CLIPVisionCfg(layers=(1, 1, 1, 1), width=64, image_size=64),
        CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=2),
        quick_gelu=quick_gelu,
    )
    randomize(model)
    return model.eval()


@contextlib.contextmanager
def running_server(index_dir: Path):
    """A real uvicorn on a free loopback port serving ``index_dir``; yields its URL."""
    import uvicorn

    from coembed.serve.app import create_app

    port = free_port()
    config = uvicorn.Config(create_app(index_dir), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# --- the browser ----------------------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
# Without these flags Chromium tries to reach the network (closed here) at start.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def leave_after(worker, *args) -> None:
    """Run ``worker(*args)`` (its last argument the result queue), deliver what it queued, then
    leave the process at once. Interpreter teardown after a gloo group, in torch 2.14 on CPU,
    now and then aborts in a C++ destructor ("terminate called without an active exception")
    after the work is done and delivered; what the test checks is the work, so the worker
    exits 0 before teardown. An exception in the worker still exits non-zero."""
    worker(*args)
    queue = args[-1]
    queue.close()
    queue.join_thread()
    os._exit(0)


def run_two_processes(worker, *args, timeout: float = 120) -> list:
    """Run ``worker(rank, 2, port, *args, queue)`` in two spawned processes (a gloo group on a
    free port); returns what each put on the queue, sorted, after both exited cleanly."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [
        ctx.Process(target=leave_after, args=(worker, r, 2, port, *args, queue)) for r in range(2)
    ]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=timeout) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int):
    """This process as ``rank`` of a gloo group of ``world`` on localhost:``port``, for the block.

    After the block every rank waits for the others before leaving the group, as the trainer
    does: a rank that tears its connections down while its peer still uses them can make gloo's
    background thread abort the peer ("terminate called without an active exception")."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def losses_on_a_fixed_batch(
    run, captions: list[str], steps: int = 30, image_ids=None
) -> list[float]:
    """The losses of ``steps`` train_steps of ``run`` on one seeded batch of random images."""
    from coembed.training.step import train_step

    run.total_steps = steps
    images = torch.randn(len(captions), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return [train_step(run, images, captions, image_ids)[0] for _ in range(steps)]


def assert_accumulation_equals_one_batch(run, captions: list[str], soft_targets: bool = False):
    """``run`` (with ``train.accum_steps`` above 1) on a seeded batch of random images: the
    gradients of its accumulated backward equal one backward of the whole batch's loss (to 1e-4
    relative; float32 sums in another order). With ``soft_targets`` the batch's captions that
    match are positives of each other."""
    from coembed.loss import positive_pairs
    from coembed.training.step import accumulated_backward

    images = torch.randn(len(captions), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = run.tokenizer(captions)
    positives = positive_pairs(tokens, None) if soft_targets else None
    run.loss_fn(**run.model(images, tokens), positives=positives).backward()
    expected = {n: p.grad.clone() for n, p in run.model.named_parameters()}
    run.model.zero_grad(set_to_none=True)
    accumulated_backward(run, images, tokens, positives)
    for name, p in run.model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-7, msg=name)


def unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    """(n, d) seeded float64 rows of unit length: stand-ins for L2-normalized features."""
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.nn.functional.normalize(x, dim=-1)
