"""How OpenMP's idle threads wait, and each trainer's speed: coembed's tiny recipe and open_clip's
trainer on the cross-theme icons, side by side, under four waiting settings.

Between two parallel regions of a CPU training step OpenMP's worker threads either spin or
sleep, and a step runs over a thousand such regions. ``coembed train`` picks for itself
(``coembed.process.openmp_waiting_settings``): a short spin when the machine's cores sit idle
as it starts, sleep beside other work. ``bench_icons.py`` gives both trainers the setting that
rule picks; this benchmark measures what each setting does to each trainer, so that choice is
not taken on trust:

- ``sleep``: ``OMP_WAIT_POLICY=PASSIVE``;
- ``libgomp's default``: nothing set (libgomp spins ~300,000 times, then sleeps);
- ``short spin``: ``OMP_WAIT_POLICY=ACTIVE GOMP_SPINCOUNT=10000``, coembed's choice on idle cores;
- ``spin``: ``OMP_WAIT_POLICY=ACTIVE`` (spin without end).

Each (trainer, setting) is probed as ``bench_icons.py`` probes a side before sizing its epochs
(the median samples/s over windows of 2 steps, ``--probe`` seconds after the first step), in
``--rounds`` rounds that alternate the order, and the table reports the median of the rounds.
Run it on an otherwise idle machine: spinning threads are meant for idle cores.

    .venv/bin/python benchmarks/bench_openmp_wait.py --data data/icon-themes  # ~15 min
    .venv/bin/python benchmarks/bench_openmp_wait.py --quick                  # ~5 min, builds the data
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_icons  # noqa: E402
from coembed.process import SHORT_SPIN  # noqa: E402

SETTINGS = {
    "sleep": {"OMP_WAIT_POLICY": "PASSIVE"},
    "libgomp's default": {},
    "short spin": {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": SHORT_SPIN},
    "spin": {"OMP_WAIT_POLICY": "ACTIVE"},
}


def sides() -> list[bench_icons.Side]:
    """coembed's tiny recipe and open_clip with the recipe's optimizer (the optimizer does not
    change a step's cost)."""
    optimizer = bench_icons.openclip_settings()["open_clip, tiny's optimizer"]
    return [
        bench_icons.Side("coembed, tiny recipe", "coembed"),
        bench_icons.Side("open_clip", "open_clip", (), optimizer),
    ]


def measure(data: Path | None, seconds: float, rounds: int) -> dict[tuple[str, str], list[float]]:
    """samples/s of every (trainer, setting), one list per pair (a value per round); the icons
    are built into a temporary folder when ``data`` is None."""
    base = {k: v for k, v in os.environ.items() if k not in bench_icons.OPENMP_WAITING}
    base["PYTHONUNBUFFERED"] = "1"
    rates: dict[tuple[str, str], list[float]] = {}
    order = [(side, name) for name in SETTINGS for side in sides()]
    with tempfile.TemporaryDirectory(prefix="bench-openmp-") as tmp:
        data = (data or bench_icons.build_data(Path(tmp) / "icon-themes")).resolve()
        for r in range(rounds):
            for side, name in order if r % 2 == 0 else order[::-1]:
                bench = bench_icons.Bench(Path(tmp), data, {**base, **SETTINGS[name]})
                rate = bench.probe(side, seconds)["median_samples_per_s"]
                rates.setdefault((side.trainer, name), []).append(rate)
                print(f"round {r + 1}, {side.trainer}, {name}: {rate:.0f} samples/s", flush=True)
    return rates


def table(rates: dict[tuple[str, str], list[float]]) -> list[str]:
    median = {key: statistics.median(values) for key, values in rates.items()}
    lines = [
        "| OpenMP waiting | coembed samples/s | open_clip samples/s | coembed / open_clip |",
        "|---|--:|--:|--:|",
    ]
    for name in SETTINGS:
        ce, oc = median[("coembed", name)], median[("open_clip", name)]
        lines.append(f"| {name} | {ce:.0f} | {oc:.0f} | {ce / oc:.2f}x |")
    best = {t: max(v for (tr, _), v in median.items() if tr == t) for t in ("coembed", "open_clip")}
    lines.append(
        f"| each at its fastest | {best['coembed']:.0f} | {best['open_clip']:.0f} | "
        f"{best['coembed'] / best['open_clip']:.2f}x |"
    )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a `coembed data icons` folder (default: build)")
    parser.add_argument("--probe", type=float, default=40, help="probe seconds per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over every pair")
    parser.add_argument("--quick", action="store_true", help="10 s probes, one round")
    args = parser.parse_args()
    if args.quick:
        args.probe, args.rounds = 10.0, 1
    if missing := bench_icons.openclip_trainer_missing():
        print(f"bench_openmp_wait: skipped, {missing}")
        return 0
    started, load = time.time(), os.getloadavg()[0]
    rates = measure(args.data, args.probe, args.rounds)
    load = max(load, os.getloadavg()[0])
    print()
    print(
        f"{bench_icons.machine()}; probes of {args.probe:.0f} s, median of {args.rounds} rounds; "
        f"load average up to {load:.1f}; {(time.time() - started) / 60:.0f} min in all"
    )
    print("\n".join(table(rates)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
