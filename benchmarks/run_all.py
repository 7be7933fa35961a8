"""Run every benchmark in this folder, one after the other, and summarize (``make bench``).

Each ``bench_*.py`` runs in its own process with this interpreter. With ``--quick`` a script gets
its own ``--quick`` flag when it has one (else the small arguments listed in ``QUICK_ARGS``), and
``--no-write`` when it has that flag, so a quick run never rewrites RESULTS.md. Output streams
through as it comes; at the end one table says what ran, how long it took and whether it passed.

    .venv/bin/python benchmarks/run_all.py --quick     # a few minutes on 2 cores
    .venv/bin/python benchmarks/run_all.py             # the full benchmarks (much longer)
    .venv/bin/python benchmarks/run_all.py --only model train
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Scripts without a --quick flag: the arguments that make them quick.
QUICK_ARGS = {
    "bench_tokenizer.py": ["--captions", "2000", "--repeats", "2"],
    "bench_serve.py": ["--n", "20000", "--single", "200", "--requests", "1000"],
}


def benchmark_args(script: Path, quick: bool) -> list[str]:
    source = script.read_text()
    args: list[str] = []
    if quick:
        if '"--quick"' in source:
            args.append("--quick")
        else:
            args += QUICK_ARGS.get(script.name, [])
        if '"--no-write"' in source:
            args.append("--no-write")
    return args


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="quick versions, for `make bench`")
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help="only these (e.g. model for bench_model.py)"
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per script")
    args = parser.parse_args()

    scripts = sorted(HERE.glob("bench_*.py"))
    if args.only:
        wanted = {
            f"bench_{name.removeprefix('bench_').removesuffix('.py')}.py" for name in args.only
        }
        unknown = wanted - {s.name for s in scripts}
        if unknown:
            parser.error(f"no such benchmark: {', '.join(sorted(unknown))}")
        scripts = [s for s in scripts if s.name in wanted]

    results = []
    for script in scripts:
        cmd = [sys.executable, str(script), *benchmark_args(script, args.quick)]
        print(f"\n=== {' '.join([script.name, *cmd[2:]])}", flush=True)
        started = time.perf_counter()
        try:
            code = subprocess.run(cmd, cwd=HERE.parent, timeout=args.timeout).returncode
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {args.timeout:.0f} s"
        results.append((script.name, time.perf_counter() - started, status))

    print("\n| benchmark            | seconds | status |")
    print("|----------------------|--------:|--------|")
    for name, seconds, status in results:
        print(f"| {name:<20} | {seconds:7.0f} | {status} |")
    return 0 if all(status == "ok" for _, _, status in results) else 1


if __name__ == "__main__":
    sys.exit(main())
