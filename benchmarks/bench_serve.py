"""Server load: `coembed serve` over 100,000 images, answering text queries on a loopback port.

What is measured (a load check, not a test):

- the index: 100,000 random unit vectors naming fake image paths (``Index.from_vectors``; HNSW at
  that size) and the tiny model (``configs/tiny.yaml`` with CLIP's tokenizer, random weights: the
  cost of a query does not depend on what the weights are);
- the server: the real ``coembed serve`` in a subprocess, as a user starts it;
- the load: ``POST /search {"text": ..., "k": 10}`` end to end (HTTP, tokenize, encode, search,
  JSON). Every query text is distinct, so the server's query cache never answers; then "more like
  this" (``{"id": ...}``: no model, search only). One client in turn, then 32 concurrent clients
  (asyncio, one keep-alive HTTP/1.1 connection each; a minimal client, so that most of the two
  shared cores go to the server), a bounded number of requests each phase. Any non-200 answer,
  a reply without 10 results or a transport error counts as an error.

Targets: single client p50 <= 10 ms; 32 clients >= 200 requests/s with 0 errors.

    .venv/bin/python benchmarks/bench_serve.py             # ~2 minutes; appends to RESULTS.md
    .venv/bin/python benchmarks/bench_serve.py --no-write  # print only
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from machine import machine
from results import RESULTS, write_section

SECTION = "## Server load"
TARGET_SINGLE_P50_MS = 10.0
TARGET_RPS_32 = 200.0

COLOURS = "red green blue yellow black white orange purple pink brown grey golden".split()
THINGS = (
    "dog cat car bicycle house tree boat bird horse chair table lamp cup bottle phone "
    "guitar clock flower mountain bridge"
).split()
PLACES = (
    "on a beach|in a forest|on a street|in a kitchen|in the snow|at night|in the rain|"
    "on a table|in a field|by a lake|in a city|on a rooftop|in a garden|under a bridge|in a room"
).split("|")
STYLES = ("a photo of", "a painting of", "a drawing of", "a close-up of")


def query_texts() -> list[str]:
    """14,400 distinct captions, shuffled the same way every run."""
    texts = [
        f"{style} a {colour} {thing} {place}"
        for style, colour, thing, place in itertools.product(STYLES, COLOURS, THINGS, PLACES)
    ]
    order = np.random.default_rng(0).permutation(len(texts))
    return [texts[i] for i in order]


def build_index(root: Path, n: int) -> Path:
    """The tiny model (random weights) and an index of n random unit vectors; returns its dir."""
    import torch

    from coembed.checkpoint import save_model_dir
    from coembed.config import load_config
    from coembed.embedder import load
    from coembed.index import Index
    from coembed.model import CoEmbed
    from coembed.tokenizer import Tokenizer

    clip_vocab = ["model.tokenizer=clip", "model.text.vocab_size=49408", "model.text.eot_id=49407"]
    cfg = load_config("tiny", clip_vocab)
    torch.manual_seed(0)
    tokenizer = Tokenizer.clip(context_length=cfg.model.text.context_length)
    model_dir = save_model_dir(CoEmbed(cfg.model), tokenizer, root / "model")
    embedder = load(model_dir, device="cpu")
    vectors = np.random.default_rng(0).normal(size=(n, embedder.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    items = [f"/photos/{i // 1000:03d}/{i:06d}.jpg" for i in range(n)]
    t = time.perf_counter()
    index = Index.from_vectors(vectors, items, embedder=embedder)
    print(f"index: {n:,} x {embedder.dim} ({index.kind}) built in {time.perf_counter() - t:.1f} s")
    return index.save(root / "index")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index_dir: Path, port: int) -> subprocess.Popen:
    import httpx

    command = [sys.executable, "-m", "coembed", "serve", "--index", str(index_dir)]
    command += ["--port", str(port), "--device", "cpu"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not answer /health within 120 s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(url: str, bodies: list[dict], concurrency: int, server_pid: int) -> dict[str, float]:
    """``load`` plus the CPU time the server and this client spent per request.

    CPU per request depends far less than latency on what else the shared cores are running.
    """
    server_cpu, client_cpu = cpu_seconds(server_pid), time.process_time()
    result = asyncio.run(load(url, bodies, concurrency))
    result["server_cpu_ms"] = (cpu_seconds(server_pid) - server_cpu) * 1e3 / len(bodies)
    result["client_cpu_ms"] = (time.process_time() - client_cpu) * 1e3 / len(bodies)
    return result


class Connection:
    """One keep-alive HTTP/1.1 connection that POSTs JSON: a few lines of asyncio instead of an
    HTTP library, so the client spends little of the two cores it shares with the server."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: dict) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        data = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        )
        self.writer.write(head.encode() + data)
        status_line = await self.reader.readline()
        length, close = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "connection" and value.strip().lower() == "close":
                close = True
        payload = await self.reader.readexactly(length)
        if close:
            await self.close()
        return int(status_line.split()[1]), payload

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def load(url: str, bodies: list[dict], concurrency: int) -> dict[str, float]:
    """POST every body to url/search from ``concurrency`` clients; latency and error counts."""
    host, port = url.removeprefix("http://").split(":")
    latencies: list[float] = []
    errors = 0
    todo = iter(bodies)

    async def client() -> None:
        nonlocal errors
        connection = Connection(host, int(port))
        for body in todo:  # shared iterator: each body is sent once
            start = time.perf_counter()
            try:
                status, payload = await connection.post("/search", body)
                ok = status == 200 and len(json.loads(payload)["results"]) == 10
            except (OSError, asyncio.IncompleteReadError, ValueError, KeyError):
                ok = False
                await connection.close()
            latencies.append(time.perf_counter() - start)
            errors += not ok
        await connection.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    ms = np.asarray(latencies) * 1e3
    return {
        "requests": len(latencies),
        "errors": errors,
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "rps": len(latencies) / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="vectors in the index")
    parser.add_argument("--single", type=int, default=500, help="requests, one client")
    parser.add_argument("--requests", type=int, default=4000, help="requests, 32 clients")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()
    os.environ.setdefault("COEMBED_NO_PROGRESS", "1")

    texts = query_texts()
    needed = 100 + args.single + args.requests
    if needed > len(texts):
        raise SystemExit(f"at most {len(texts) - 100 - args.single} --requests (distinct texts)")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        index_dir = build_index(Path(tmp), args.n)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(index_dir, port)
        try:
            queue = iter(texts)

            def text_bodies(count: int) -> list[dict]:
                return [{"text": next(queue), "k": 10} for _ in range(count)]

            asyncio.run(load(url, text_bodies(100), 4))  # warm-up: first batches, page faults
            rng = np.random.default_rng(1)
            ids = [{"id": int(i), "k": 10} for i in rng.integers(0, args.n, args.requests)]
            c = args.concurrency
            pid = server.pid
            rows = [
                ("text query, 1 client", measure(url, text_bodies(args.single), 1, pid)),
                (f"text query, {c} clients", measure(url, text_bodies(args.requests), c, pid)),
                (f"more like this (id), {c} clients", measure(url, ids, c, pid)),
            ]
        finally:
            server.terminate()
            server.wait(timeout=30)
    load_after = os.getloadavg()[0]

    single, many = rows[0][1], rows[1][1]
    met_latency = single["p50"] <= TARGET_SINGLE_P50_MS
    met_rps = many["rps"] >= TARGET_RPS_32 and many["errors"] == 0
    header = (
        "| case | requests | errors | p50 ms | p99 ms | requests/s "
        "| server CPU ms/request | client CPU ms/request |"
    )
    table = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows:
        table.append(
            f"| {name} | {r['requests']:,} | {r['errors']} | {r['p50']:.1f} | {r['p99']:.1f} "
            f"| {r['rps']:,.0f} | {r['server_cpu_ms']:.2f} | {r['client_cpu_ms']:.2f} |"
        )
    verdict = (
        f"single-client p50 {single['p50']:.1f} ms (target <= {TARGET_SINGLE_P50_MS:.0f}: "
        f"{'met' if met_latency else 'MISSED'}); {c} clients {many['rps']:,.0f} requests/s with "
        f"{many['errors']} errors (target >= {TARGET_RPS_32:.0f} and 0: "
        f"{'met' if met_rps else 'MISSED'})"
    )
    print("\n".join(table))
    print(verdict)

    import fastapi
    import torch
    import uvicorn

    section = f"""{SECTION}

`coembed serve` in a subprocess over an index of {args.n:,} random unit vectors (HNSW) with fake
image paths and the tiny model (`tiny` config, CLIP tokenizer, random weights). The clients are
a minimal asyncio HTTP/1.1 client on loopback, one keep-alive connection each. A text query is
the whole path: HTTP, tokenize, encode, search, JSON ({args.single} / {args.requests:,} distinct
texts, so the server's query cache never answers). "More like this" searches by an indexed
item's stored vector (no model).

- Command: `.venv/bin/python benchmarks/bench_serve.py` (about 2 minutes)
- Date: {time.strftime("%a %b %d %H:%M:%S UTC %Y", time.gmtime())}
- Machine: {machine()}; shared with other engineers' jobs during the run (load average
  {load_before:.1f} before, {load_after:.1f} after), so the numbers are noisy and the client shares
  the same two cores as the server
- torch {torch.__version__}, fastapi {fastapi.__version__}, uvicorn {uvicorn.__version__} (h11,
  asyncio loop); server: 1 worker, 1 torch thread, model work on one thread with micro-batching

{chr(10).join(table)}

Targets: {verdict}.

Where the server's time goes (py-spy and in-process timing while developing): encoding one short
text with the tiny model ~1.5-2.5 ms of CPU on these shared cores (padding after the end token
is dropped, so a query costs its length, not the context length), the HNSW search 0.2-0.8 ms
(0.2 warm in a loop; more with caches shared with other jobs), and HTTP + FastAPI + JSON ~0.3 ms
(a search by id over a 2,000-item flat index costs 0.3 ms of server CPU in all).
Under load, concurrent texts share forward passes (micro-batching), which is why a text query
costs {many["server_cpu_ms"]:.1f} ms of server CPU at {c} clients against {single["server_cpu_ms"]:.1f} ms alone. Latency
at {c} clients is queueing: {c} requests in flight at {many["rps"]:,.0f}/s.
"""
    if not args.no_write:
        write_section(SECTION, section)
        print(f"wrote the {SECTION!r} section of {RESULTS}")


if __name__ == "__main__":
    main()
