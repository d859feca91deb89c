"""Benchmark: an SFT stage on a local Ray cluster with its workers at niceness 15 (Ray's
default) vs 0 (what `ensure_ray` starts a local cluster with).

Run from the repository root, after `sdftlab world build` (about 8 minutes on 2 cores with
the defaults; nothing else should run):

    PYTHONPATH=platform .venv/bin/python benchmarks/ray_niceness.py \
        --out runs/bench/ray_niceness.json

Each run is a fresh process: `ensure_ray` starts a local cluster with `RAY_worker_niceness`
set to the value under test, then `degrade.sft.run_sft` makes an expert from `base` on the
current world's science data (`--steps` steps, the expert stage's defaults) into a scratch
lineage beside the world's. The two settings alternate, `--repeats` times each, so a change
in the machine's speed hits both. Prints the table: the stage's wall time, the loop's tokens
per second as the worker reports them, and whether the runs' final losses agree (the
setting changes scheduling only, not the arithmetic).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from rollout import write_results
from sdftlab.lineage import Lineage
from sdftlab.world.build import sdftlab_home

CHILD = """
import json, os, sys, time
from pathlib import Path
from sdftlab.raycluster import ensure_ray
ensure_ray()  # the project's own start-up; RAY_worker_niceness from the environment wins
from sdftlab.degrade.sft import SFTConfig, run_sft
from sdftlab.lineage import Lineage
from sdftlab.world.build import current_world
lineage = Lineage(sys.argv[1])
t0 = time.perf_counter()
meta = run_sft(lineage, "base", sys.argv[2], SFTConfig(data=["science"], steps=int(sys.argv[3])),
               data_dir=current_world().data_dir, log=lambda _: None, overwrite=True)
print("RESULT " + json.dumps({"wall_s": time.perf_counter() - t0, **meta.metrics}))
"""


def run_once(lineage_root: Path, niceness: int, steps: int, name: str, bars: bool) -> dict:
    env = {
        **os.environ,
        "RAY_worker_niceness": str(niceness),
        # Ray Train runs of their own: a finished run of the same name would be restored.
        "SDFTLAB_STORAGE": str(lineage_root.parent / "ray_results"),
    }
    env.pop("RAY_DATA_DISABLE_PROGRESS_BARS", None)
    if not bars:  # as the pipelines run; `sdftlab degrade` / `recover` show Ray Data's bars
        env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(lineage_root), name, str(steps)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"run at niceness {niceness} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=150, help="SFT steps a run")
    ap.add_argument("--repeats", type=int, default=2, help="runs per setting, alternating")
    ap.add_argument(
        "--progress-bars", action="store_true", help="Ray Data's progress bars on, as in the CLI"
    )
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    home = sdftlab_home()
    source = Lineage(home / "lineage")
    scratch = Path(tempfile.mkdtemp(prefix="bench-niceness-", dir=home))
    try:
        root = scratch / "lineage"
        (root / "states").mkdir(parents=True)
        shutil.copytree(source.local_path("base"), root / "states" / "base")
        runs: dict[int, list[dict]] = {15: [], 0: []}
        for r in range(args.repeats):
            for niceness in runs:
                result = run_once(
                    root, niceness, args.steps, f"nice{niceness}_{r}", args.progress_bars
                )
                runs[niceness].append(result)
                print(
                    f"  niceness {niceness:2d}, run {r + 1}: {result['wall_s']:.1f} s, "
                    f"{result['sft/tokens_per_s']:.0f} tokens/s",
                    flush=True,
                )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    losses = {round(x["sft/loss"], 8) for rs in runs.values() for x in rs}
    bars = "on" if args.progress_bars else "off"
    print(
        f"\nSFT stage, {args.steps} steps, {args.repeats} runs per setting, alternating, "
        f"Ray Data progress bars {bars}\n"
    )
    print("| worker niceness | stage wall s (mean) | runs | loop tokens/s (mean) |")
    print("|---:|---:|---|---:|")
    rows = []
    for niceness, rs in runs.items():
        walls = [x["wall_s"] for x in rs]
        rate = statistics.mean(x["sft/tokens_per_s"] for x in rs)
        rows.append({"niceness": niceness, "wall_s": walls, "tokens_per_s": rate})
        print(
            f"| {niceness} | {statistics.mean(walls):.1f} | "
            f"{', '.join(f'{w:.1f}' for w in walls)} | {rate:.0f} |"
        )
    speedup = statistics.mean(rows[0]["wall_s"]) / statistics.mean(rows[1]["wall_s"])
    print(f"\nniceness 0 vs 15: {speedup:.2f}× the stage's speed; final losses equal: "
          f"{len(losses) == 1}")  # fmt: skip
    if args.out:
        write_results(
            args.out,
            {
                "steps": args.steps,
                "progress_bars": args.progress_bars,
                "rows": rows,
                "speedup": speedup,
                "same_loss": len(losses) == 1,
            },
        )


if __name__ == "__main__":
    main()
