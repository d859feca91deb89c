"""Benchmark: an SFT stage whose tokenized rows are materialized once (`materialize=true`, the
default) vs re-tokenized by Ray Data every epoch (`materialize=false`).

Run from the repository root, after `sdftlab world build` (nothing else should run):

    PYTHONPATH=platform .venv/bin/python benchmarks/experiments/sft_ingest.py \
        --out runs/bench/sft_ingest.json

Each run is a fresh process (`sft_stage.run_stage`): a local Ray cluster started the
project's way, then `degrade.sft.run_sft` makes an expert from `base` on the current world's
science data (`--steps` steps; with the defaults' 3919 rows and batch 32 an epoch is 122
steps, so the default 300 steps are the expert stage itself, two epoch boundaries included)
into a scratch lineage beside the world's. The two settings alternate, `--repeats` times
each, so a change in the machine's speed hits both. Prints the table: the stage's wall time,
the time inside `trainer.fit`, the loop's tokens per second as the worker reports them, and
whether the final losses agree (both read the same blocks in the same order, so they must).
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="SFT steps a run")
    ap.add_argument("--repeats", type=int, default=2, help="runs per setting, alternating")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    settings = {"per epoch": {"sft": {"materialize": False}}, "materialized": {}}
    with scratch_lineage("bench-ingest-") as root:
        runs = alternate(root, settings, args.steps, args.repeats)
    same = same_loss(runs)
    print(f"\nSFT stage, {args.steps} steps, {args.repeats} runs per setting, alternating\n")
    print("| tokenized | stage wall s (mean) | runs | in fit s (mean) | loop tokens/s (mean) |")
    print("|---|---:|---|---:|---:|")
    rows = []
    for mode, rs in runs.items():
        walls = [x["wall_s"] for x in rs]
        fit = statistics.mean(x["sft/seconds"] for x in rs)
        rate = statistics.mean(x["sft/tokens_per_s"] for x in rs)
        rows.append({"tokenized": mode, "wall_s": walls, "fit_s": fit, "tokens_per_s": rate})
        print(
            f"| {mode} | {statistics.mean(walls):.1f} | "
            f"{', '.join(f'{w:.1f}' for w in walls)} | {fit:.1f} | {rate:.0f} |"
        )
    speedup = statistics.mean(rows[0]["wall_s"]) / statistics.mean(rows[1]["wall_s"])
    print(f"\nmaterialized vs per epoch: {speedup:.2f}× the stage's speed; final losses equal: "
          f"{same}")  # fmt: skip
    if args.out:
        write_results(
            args.out,
            {"steps": args.steps, "rows": rows, "speedup": speedup, "same_loss": same},
        )


if __name__ == "__main__":
    main()
