"""Benchmark: an SFT stage on a local Ray cluster with its workers at niceness 15 (Ray's
default) vs 0 (what `ensure_ray` starts a local cluster with).

Run from the repository root, after `sdftlab world build` (about 8 minutes on 2 cores with
the defaults; nothing else should run):

    PYTHONPATH=platform .venv/bin/python benchmarks/experiments/ray_niceness.py \
        --out runs/bench/ray_niceness.json

Each run is a fresh process (`sft_stage.run_stage`): `ensure_ray` starts a local cluster
with `RAY_worker_niceness` set to the value under test, then `degrade.sft.run_sft` makes an
expert from `base` on the current world's science data (`--steps` steps, the expert stage's
defaults) into a scratch lineage beside the world's. The two settings alternate, `--repeats`
times each, so a change in the machine's speed hits both. Prints the table: the stage's wall
time, the loop's tokens per second as the worker reports them, and whether the runs' final
losses agree (the setting changes scheduling only, not the arithmetic).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # benchmarks/
sys.path.insert(0, str(Path(__file__).parent))

from sft_stage import alternate, same_loss, scratch_lineage

from rollout import write_results

NICENESS = (15, 0)  # Ray's default, then what `ensure_ray` starts a local cluster with


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=150, help="SFT steps a run")
    ap.add_argument("--repeats", type=int, default=2, help="runs per setting, alternating")
    ap.add_argument(
        "--progress-bars", action="store_true", help="Ray Data's progress bars on, as in the CLI"
    )
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    settings = {
        f"niceness {n}": {"env": {"RAY_worker_niceness": str(n)}, "bars": args.progress_bars}
        for n in NICENESS
    }
    with scratch_lineage("bench-niceness-") as root:
        runs = alternate(root, settings, args.steps, args.repeats)
    same = same_loss(runs)
    bars = "on" if args.progress_bars else "off"
    print(
        f"\nSFT stage, {args.steps} steps, {args.repeats} runs per setting, alternating, "
        f"Ray Data progress bars {bars}\n"
    )
    print("| worker niceness | stage wall s (mean) | runs | loop tokens/s (mean) |")
    print("|---:|---:|---|---:|")
    rows = []
    for niceness, rs in zip(NICENESS, runs.values(), strict=True):
        walls = [x["wall_s"] for x in rs]
        rate = statistics.mean(x["sft/tokens_per_s"] for x in rs)
        rows.append({"niceness": niceness, "wall_s": walls, "tokens_per_s": rate})
        print(
            f"| {niceness} | {statistics.mean(walls):.1f} | "
            f"{', '.join(f'{w:.1f}' for w in walls)} | {rate:.0f} |"
        )
    speedup = statistics.mean(rows[0]["wall_s"]) / statistics.mean(rows[1]["wall_s"])
    print(f"\nniceness 0 vs 15: {speedup:.2f}× the stage's speed; final losses equal: "
          f"{same}")  # fmt: skip
    if args.out:
        write_results(
            args.out,
            {
                "steps": args.steps,
                "progress_bars": args.progress_bars,
                "rows": rows,
                "speedup": speedup,
                "same_loss": same,
            },
        )


if __name__ == "__main__":
    main()
