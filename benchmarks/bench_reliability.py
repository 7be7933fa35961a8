"""Reliability under abuse: random SIGKILLs during training and ``index --add``, and a long server
load. Not a test (it takes minutes); its figures go into RELIABILITY.md.

1. ``coembed train`` killed with SIGKILL 20 times at seeded random moments (during start-up, or a
   random delay after a random step, so some kills land inside checkpoint writes) and resumed
   each time: after every kill no model directory or ``checkpoints/step-*`` is half-written, and
   the final weights equal, bitwise, those of a run that was never interrupted.
2. ``coembed index --add`` killed 10 times (seeded random delays, and exact points of the save:
   SIGKILL while paused at a chosen rename): the index always loads with the old or the new
   content, and rerunning ``--add`` gives the uninterrupted result.
3. The real ``coembed serve`` on loopback: >= 10,000 mixed requests (text, compositional,
   more-like-this) from 32 concurrent keep-alive clients; errors and the server's RSS
   (``/proc/PID/status``) before and after. Then searches while the server is also busy with
   large ``/embed`` requests (16 noise PNGs of 320 x 320, ~6 MB of JSON each): none may fail.

    .venv/bin/python benchmarks/bench_reliability.py            # ~10 minutes on 2 shared cores
    .venv/bin/python benchmarks/bench_reliability.py --quick    # fewer kills and requests
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import csv
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]

from bench_serve import Connection, free_port, start_server  # noqa: E402
from machine import machine  # noqa: E402
from tests.helpers import TINY_SET as TRAIN_TINY_SET  # noqa: E402
from tests.helpers import (  # noqa: E402
    assert_nothing_half_written,
    kill_after,
    kill_at_event,
    start,
)

ENV = {**os.environ, "COEMBED_NO_PROGRESS": "1", "PYTHONPATH": str(REPO / "src")}
RSS_BOUND_MB = 64.0  # allowed growth over the load (the query cache alone holds <= 4096 vectors)
# The training tests' tiny model, checkpointing and logging every few steps, deterministic.
TINY_SET = [
    *TRAIN_TINY_SET,
    "train.checkpoint_every=3",
    "train.log_every=1",
    "train.deterministic=true",
]


# --- 1. training ----------------------------------------------------------------------------------


def tiny_dataset(folder: Path, n: int) -> Path:
    shipped = REPO / "data" / "synthetic"
    with open(shipped / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:n]
    (folder / "images").mkdir(parents=True)
    out = []
    for row in rows:
        name = Path(row["filepath"]).name
        shutil.copyfile(shipped / "images" / name, folder / "images" / name)
        out.append((f"images/{name}", row["caption"]))
    path = folder / "train.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("filepath", "caption"), *out])
    return path


def train_command(data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    args = ["train", "--train-data", str(data), "--output", str(out), "--device", "cpu"]
    args += ["--batch-size", "8", "--steps", str(steps)]
    args += [a for s in TINY_SET for a in ("--set", s)]
    return [sys.executable, "-m", "coembed", *args, *extra]


def last_step(out: Path) -> int:
    best, path = 0, out / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if "loss" in row:
                best = max(best, row["step"])
    return best


def bench_training(root: Path, kills: int, steps: int, seed: int) -> dict:
    from safetensors.torch import load_file

    data = tiny_dataset(root / "data", 32)
    reference, resumed = root / "reference", root / "resumed"
    popen = dict(stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    uninterrupted = subprocess.Popen(train_command(data, reference, steps), **popen)
    rng = random.Random(seed)
    points = []
    t0 = time.monotonic()
    while len(points) < kills:
        resume = ["--resume"] if (resumed / "run_config.json").exists() else []
        proc = subprocess.Popen(train_command(data, resumed, steps, *resume), **popen)
        if rng.random() < 0.25:  # somewhere in start-up or the first steps
            time.sleep(rng.uniform(0.5, 5.0))
        else:
            target = min(steps - 1, last_step(resumed) + rng.randint(1, 4))
            while last_step(resumed) < target and proc.poll() is None:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is not None:
            raise SystemExit(f"the run ended before kill {len(points) + 1}: {proc.stderr.read()}")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        points.append(last_step(resumed))
        assert_nothing_half_written(resumed)
    final = subprocess.run(train_command(data, resumed, steps, "--resume"), **popen)
    uninterrupted.wait()
    for proc in (final, uninterrupted):
        if proc.returncode != 0:
            raise SystemExit(f"a training run failed: {proc.stderr}")
    want = load_file(str(reference / "model.safetensors"))
    got = load_file(str(resumed / "model.safetensors"))
    equal = want.keys() == got.keys() and all((want[k] == got[k]).all() for k in want)
    return {
        "kills": len(points),
        "kill_steps": points,
        "steps": steps,
        "bitwise_equal": bool(equal),
        "seconds": time.monotonic() - t0,
    }


# --- 2. index --add -------------------------------------------------------------------------------


def bench_index(root: Path, kills: int, seed: int) -> dict:
    from PIL import Image

    from coembed.checkpoint import save_model_dir
    from coembed.cli import main
    from coembed.config import load_config
    from coembed.embedder import load
    from coembed.index import Index
    from coembed.model import CoEmbed
    from coembed.tokenizer import Tokenizer

    cfg = load_config(
        "tiny",
        [
            *TINY_SET[:8],
            "model.tokenizer=clip",
            "model.text.vocab_size=49408",
            "model.text.eot_id=49407",
        ],
    )
    model = save_model_dir(CoEmbed(cfg.model), Tokenizer.clip(context_length=16), root / "model")
    photos = root / "photos"
    photos.mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (300, 24, 24, 3), np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(photos / f"p{i:04d}.png")
    base = root / "base"
    embedder = load(model, device="cpu")
    Index.build(embedder, images=sorted(photos.iterdir())[:100], progress=False).save(base)
    reference = root / "reference"
    shutil.copytree(base, reference)
    add = ["index", "--images", str(photos), "--add", "--device", "cpu", "--output"]
    assert main([*add, str(reference)]) == 0
    old, new = Index.load(base), Index.load(reference)
    rng = random.Random(seed)
    plans = [
        ("delay", round(rng.uniform(0.5, 8.0), 2)) if i % 2 else ("event", rng.randint(1, 8))
        for i in range(kills)
    ]

    def attempt(numbered):
        number, (how, when) = numbered
        folder = root / f"kill-{number}"
        shutil.copytree(base, folder)
        proc = start(folder, [*add, str(folder)])
        if how == "delay":
            kill_after(proc, when)
            proc.stderr.read()
        else:
            kill_at_event(proc, when)
        return folder, proc.returncode

    t0 = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        killed = list(pool.map(attempt, enumerate(plans)))
    seen = {"old": 0, "new": 0, "mixed": 0}
    rerun_equal = 0
    for folder, _ in killed:
        index = Index.load(folder)
        state = {len(old): "old", len(new): "new"}.get(len(index), "mixed")
        want = old if state == "old" else new
        if state != "mixed" and index.items != want.items:
            state = "mixed"
        seen[state] += 1
        assert index.search("noise", k=5)
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            assert main([*add, str(folder)]) == 0
        again = Index.load(folder)
        rerun_equal += again.items == new.items and np.allclose(
            again.faiss.reconstruct_n(0, len(again)),
            new.faiss.reconstruct_n(0, len(new)),
            atol=1e-5,
        )
    return {
        "kills": sum(code == -signal.SIGKILL for _, code in killed),
        "attempts": len(plans),
        "plans": plans,
        **seen,
        "rerun_equal": int(rerun_equal),
        "seconds": time.monotonic() - t0,
        "index": reference,
    }


# --- 3. server ------------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def mixed_bodies(n: int, items: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = "red green blue dog cat car tree house boat bird lamp cup".split()
    bodies = []
    for i in range(n):
        r = rng.random()
        if r < 0.6:  # mostly distinct texts: the cache rarely answers
            a, b, c = rng.choice(words, 3)
            bodies.append({"text": f"a photo of a {a} {b} {c} number {i}", "k": 10})
        elif r < 0.8:
            a, b = rng.choice(words, 2, replace=False)
            bodies.append({"query": f'"a {a} thing" - "{b}" + 0.5*"{i}"', "k": 10})
        else:
            bodies.append({"id": int(rng.integers(items)), "k": 10})
    return bodies


async def run_load(port: int, bodies: list[dict], concurrency: int, path: str = "/search"):
    latencies, errors, todo = [], 0, iter(bodies)

    async def client():
        nonlocal errors
        connection = Connection("127.0.0.1", port)
        for body in todo:
            t = time.perf_counter()
            try:
                status, payload = await connection.post(path, body)
                reply = json.loads(payload)
                ok = status == 200 and (path != "/search" or len(reply["results"]) == 10)
            except (OSError, asyncio.IncompleteReadError, ValueError, KeyError):
                ok = False
                await connection.close()
            latencies.append(time.perf_counter() - t)
            errors += not ok
        await connection.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    ms = np.asarray(latencies) * 1e3
    return {
        "requests": len(latencies),
        "errors": errors,
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "rps": len(latencies) / wall,
    }


def embed_bodies(n: int) -> list[dict]:
    from PIL import Image

    rng = np.random.default_rng(1)
    images = []
    for _ in range(16):
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (320, 320, 3), np.uint8)).save(out, "PNG")
        images.append(base64.b64encode(out.getvalue()).decode())
    return [{"images": images} for _ in range(n)]


async def busy_phase(port: int, searches: list[dict], embeds: list[dict]):
    embed_task = asyncio.create_task(run_load(port, embeds, 2, "/embed"))
    await asyncio.sleep(0.5)  # the embeds are under way
    search = await run_load(port, searches, 8)
    return search, await embed_task


def bench_server(index_dir: Path, requests: int, concurrency: int) -> dict:
    port = free_port()
    server = start_server(index_dir, port)
    try:
        items = json.loads((index_dir / "index.json").read_text())["count"]
        asyncio.run(run_load(port, mixed_bodies(500, items, 1), concurrency))  # warm up
        before = rss_mb(server.pid)
        load = asyncio.run(run_load(port, mixed_bodies(requests, items, 2), concurrency))
        after = rss_mb(server.pid)
        quiet = asyncio.run(run_load(port, mixed_bodies(300, items, 3), 8))
        search, embed = asyncio.run(busy_phase(port, mixed_bodies(300, items, 4), embed_bodies(12)))
        alive = server.poll() is None
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    return {
        "load": load,
        "rss_before": before,
        "rss_after": after,
        "quiet": quiet,
        "busy_search": search,
        "busy_embed": embed,
        "alive": alive,
    }


# --- report ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-kills", type=int, default=20)
    parser.add_argument("--index-kills", type=int, default=10)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="5 + 4 kills, 2,000 requests")
    args = parser.parse_args()
    if args.quick:
        args.train_kills, args.index_kills, args.requests = 5, 4, 2000
    os.environ["COEMBED_NO_PROGRESS"] = "1"
    started = time.strftime("%Y-%m-%d %H:%M")
    with tempfile.TemporaryDirectory(prefix="coembed-reliability-") as tmp:
        root = Path(tmp)
        (root / "train").mkdir()
        (root / "index").mkdir()
        steps = max(40, 6 * args.train_kills)
        train = bench_training(root / "train", args.train_kills, steps, args.seed)
        index = bench_index(root / "index", args.index_kills, args.seed)
        server = bench_server(index["index"], args.requests, args.concurrency)
    load, growth = server["load"], server["rss_after"] - server["rss_before"]
    rows = [
        (
            "train: SIGKILL + --resume",
            f"{train['kills']} kills at steps {train['kill_steps']} of {train['steps']}",
            "final weights bitwise equal" if train["bitwise_equal"] else "WEIGHTS DIFFER",
            f"{train['seconds']:.0f} s",
        ),
        (
            "index --add: SIGKILL",
            f"{index['kills']} kills ({index['attempts']} tries: {index['plans']})",
            f"old {index['old']}, new {index['new']}, mixed {index['mixed']}; "
            f"rerun = uninterrupted {index['rerun_equal']}/{index['attempts']}",
            f"{index['seconds']:.0f} s",
        ),
        (
            f"serve: {load['requests']:,} requests, {args.concurrency} clients",
            f"{load['errors']} errors, {load['rps']:.0f} req/s",
            f"RSS {server['rss_before']:.0f} -> {server['rss_after']:.0f} MB "
            f"(+{growth:.1f} MB, bound {RSS_BOUND_MB:.0f})",
            f"p50 {load['p50']:.1f} ms, p99 {load['p99']:.1f} ms",
        ),
        (
            "serve: searches, idle (8 clients)",
            f"{server['quiet']['requests']} requests, {server['quiet']['errors']} errors",
            "",
            f"p50 {server['quiet']['p50']:.1f} ms, p99 {server['quiet']['p99']:.1f} ms",
        ),
        (
            "serve: searches during /embed x16 images",
            f"{server['busy_search']['requests']} requests, {server['busy_search']['errors']} errors",
            f"{server['busy_embed']['requests']} embeds, {server['busy_embed']['errors']} errors "
            f"(p50 {server['busy_embed']['p50']:.0f} ms)",
            f"p50 {server['busy_search']['p50']:.1f} ms, p99 {server['busy_search']['p99']:.1f} ms",
        ),
    ]
    print(f"coembed reliability, {started}, {machine()}")
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in [("what", "runs", "outcome", "time / latency"), *rows]:
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    ok = (
        train["bitwise_equal"]
        and index["mixed"] == 0
        and index["rerun_equal"] == index["attempts"]
        and load["errors"] == 0
        and server["busy_search"]["errors"] == 0
        and server["busy_embed"]["errors"] == 0
        and growth < RSS_BOUND_MB
        and server["alive"]
    )
    print("all promises held" if ok else "A PROMISE WAS BROKEN")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
