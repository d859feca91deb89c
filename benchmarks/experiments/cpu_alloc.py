"""Benchmark: glibc's default allocator settings vs `SDFTLAB_CPU_ALLOC=heap` for CPU training.

Run from the repository root, after `sdftlab world build`, with nothing else running:

    PYTHONPATH=platform .venv/bin/python benchmarks/experiments/cpu_alloc.py \
        --steps 40 --stage-steps 150 --repeats 2 --out runs/bench/cpu_alloc.json   # ~12 min

Two measurements, each alternating the two settings (`system`: the C library's defaults;
`heap`: `sdftlab.allocator.tune_cpu_allocator`, mmap off for malloc and no trimming) so that
a change in the machine's speed hits both alike:

- **bare steps in a plain process** (as `sdftlab world build` pretrains): full training steps
  (`benchmarks/experiments/padding_free.py`'s `time_steps`: bf16 autocast where the CPU has it,
  eager attention, gradient clipping, AdamW, 2 threads) on the world's copy-curriculum and SFT
  batches as that script draws them, each run a fresh process; seconds and minor page faults per
  step after 3 warm-up steps, and a checksum of the trained weights;
- **a whole SFT stage in a Ray Train worker** (as the pipelines run it): the expert stage
  (`benchmarks/experiments/sft_stage.py`), each run a fresh process and Ray cluster; wall
  seconds, `trainer.fit` seconds, tokens/s of the loop, and the final loss.

The setting changes where memory comes from, not the arithmetic: the checksums and the
losses must be equal, and the script says so.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).parents[1]))  # benchmarks/
sys.path.insert(0, str(Path(__file__).parent))

from sft_stage import alternate, run_child, same_loss, scratch_lineage

from rollout import write_results

SETTINGS = ("system", "heap")

BARE_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from padding_free import copy_documents, padded, sft_documents, time_steps
from sdftlab.train.setup import use_training_attention
from sdftlab.allocator import tune_cpu_allocator
from sdftlab.lineage import Lineage
from sdftlab.paths import sdftlab_home
from sdftlab.world.build import current_world
kind, steps = sys.argv[2], int(sys.argv[3])
torch.set_num_threads(2)
tuned = tune_cpu_allocator()
base = Lineage(sdftlab_home() / "lineage").resolve("base")
tokenizer = AutoTokenizer.from_pretrained(base)
n = steps + 3
docs = (copy_documents(tokenizer, 32 * n, 256, seed=0) if kind == "copy"
        else sft_documents(tokenizer, current_world().data_dir, 32 * n, seed=0))
batches = [padded(docs[i : i + 32], tokenizer.pad_token_id) for i in range(0, len(docs), 32)]
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
use_training_attention(model, torch.device("cpu"))
seconds, faults = time_steps(model, batches, 3)
checksum = float(sum(p.double().sum() for p in model.parameters()))
print("RESULT " + json.dumps({"s_per_step": seconds, "faults_per_step": faults,
                             "checksum": checksum, "tuned": tuned}))
"""


def bare_run(kind: str, setting: str, steps: int) -> dict:
    result = run_child(
        BARE_CHILD,
        [str(Path(__file__).parent), kind, str(steps)],
        {**os.environ, "SDFTLAB_CPU_ALLOC": setting},
        f"bare run {kind}/{setting}",
    )
    if result["tuned"] != (setting == "heap"):
        raise RuntimeError(f"{setting}: the allocator tuning was {result['tuned']}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="timed bare steps per run")
    ap.add_argument("--stage-steps", type=int, default=150, help="SFT steps per stage run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    bare: dict[str, dict[str, list[dict]]] = {}
    for kind in ("copy", "sft"):
        bare[kind] = {s: [] for s in SETTINGS}
        for r in range(args.repeats):
            for setting in SETTINGS:
                result = bare_run(kind, setting, args.steps)
                bare[kind][setting].append(result)
                print(
                    f"  bare {kind}, {setting}, run {r + 1}: {result['s_per_step']:.3f} s/step, "
                    f"{result['faults_per_step']:.0f} faults/step",
                    flush=True,
                )

    with scratch_lineage(".cpu-alloc-") as root:
        settings = {s: {"env": {"SDFTLAB_CPU_ALLOC": s}} for s in SETTINGS}
        stage = alternate(root, settings, args.stage_steps, args.repeats)

    print(f"\nBare steps ({args.steps} timed, {args.repeats} runs each, 2 threads)\n")
    print("| batches | system s/step | faults/step | heap s/step | faults/step | speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = []
    for kind, runs in bare.items():
        s = {k: mean([x["s_per_step"] for x in v]) for k, v in runs.items()}
        f = {k: mean([x["faults_per_step"] for x in v]) for k, v in runs.items()}
        same = len({round(x["checksum"], 6) for v in runs.values() for x in v}) == 1
        rows.append({"batches": kind, "s_per_step": s, "faults_per_step": f, "same_weights": same})
        print(
            f"| {kind} | {s['system']:.3f} | {f['system']:.0f} | {s['heap']:.3f} | "
            f"{f['heap']:.0f} | {s['system'] / s['heap']:.2f}× |"
        )
    print(f"\nSFT stage in a Ray Train worker ({args.stage_steps} steps, {args.repeats} runs)\n")
    print("| setting | stage s (runs) | fit s | loop tokens/s |")
    print("|---|---:|---:|---:|")
    for label, runs in stage.items():
        walls = ", ".join(f"{x['wall_s']:.1f}" for x in runs)
        print(
            f"| {label} | {mean([x['wall_s'] for x in runs]):.1f} ({walls}) | "
            f"{mean([x['sft/seconds'] for x in runs]):.1f} | "
            f"{mean([x['sft/tokens_per_s'] for x in runs]):.0f} |"
        )
    speedup = mean([x["wall_s"] for x in stage["system"]]) / mean(
        [x["wall_s"] for x in stage["heap"]]
    )
    weights = all(r["same_weights"] for r in rows)
    losses = same_loss(stage)
    print(f"\nstage speed-up {speedup:.2f}×; bare weights equal: {weights}; losses equal: {losses}")
    if args.out:
        write_results(args.out, {"bare": rows, "stage": stage, "stage_speedup": speedup})


if __name__ == "__main__":
    main()
