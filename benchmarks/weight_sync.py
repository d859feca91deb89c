"""Benchmark: weight sync from the trainer to the vLLM rollout actor, as a share of an SDFT step.

Run from the repository root:

    PYTHONPATH=platform .venv/bin/python benchmarks/weight_sync.py --out runs/bench/weight_sync.json
    PYTHONPATH=platform .venv/bin/python benchmarks/weight_sync.py --quick     # 4 SDFT steps

Two measurements on the same tiny Qwen2 (benchmarks/rollout.py's model: hidden 128, 4 layers,
random weights, an in-process tokenizer; or `--hidden`/`--layers` for a larger one):

1. ``push``: `RolloutPool.sync` alone, `--pushes` times (median), for the full state dict
   and for what a LoRA run sends (the merged weights of the adapted projections only:
   `named_weights` on a peft model, r = 16 on q/k/v/o); payload size in MiB.
2. ``sdft``: a real `sdftlab.distill.sdft.recover` run of `--steps` steps (16 prompts a
   step, 64 new tokens, vLLM rollouts, exact teacher scoring, one Ray Train CPU worker),
   full fine-tuning and LoRA; the run records its mean step time and the share of it spent
   in weight sync (`sdft/step_s`, `sdft/sync_fraction` in the lineage). Target: < 10%.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from rollout import build_state, write_results
from sdftlab.config import load_config
from sdftlab.data.loaders import write_task_file
from sdftlab.distill.config import RecoverConfig
from sdftlab.distill.sdft import recover
from sdftlab.raycluster import ensure_ray
from sdftlab.rollout.pool import RolloutPool
from sdftlab.rollout.sync import named_weights
from sdftlab.world import tasks


def lora_model(model: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))


def push_times(pool: RolloutPool, named: dict[str, Any], pushes: int) -> dict[str, float]:
    pool.sync(named)  # warm-up
    walls = [pool.sync(named) for _ in range(pushes)]
    mib = sum(t.numel() * t.element_size() for t in named.values()) / 2**20
    return {"median_s": statistics.median(walls), "mib": mib, "tensors": len(named)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12, help="SDFT steps per run")
    ap.add_argument("--pushes", type=int, default=10)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="runs/bench/weight_sync.json")
    args = ap.parse_args()
    steps = 4 if args.quick else args.steps

    with tempfile.TemporaryDirectory(prefix="sync-bench-") as tmp:
        lineage, state, _ = build_state(Path(tmp) / "lineage")
        science = Path(tmp) / "science_train.jsonl"
        write_task_file(science, tasks.science_rows(tasks.WorldFacts.generate(0), 400,
                                                    random.Random(1)))  # fmt: skip
        ensure_ray(num_cpus=2)

        pool = RolloutPool.start(lineage.resolve(state), cpus_per_actor=0.5)
        model = lineage.load_model(state).float()
        push = {
            "full": push_times(pool, named_weights(model), args.pushes),
            "lora": push_times(pool, named_weights(lora_model(model)), args.pushes),
        }
        pool.shutdown()

        runs = {}
        for kind, extra in (("full", []), ("lora", ["lora={r: 16, alpha: 32}"])):
            cfg = load_config(RecoverConfig, None, [
                f"teacher={state}", f"data=[science={science}]", f"steps={steps}",
                "prompts_per_step=16", "rollout.max_new_tokens=64", f"log_every={steps}",
                f"checkpoint_every={steps}", *extra,
            ])  # fmt: skip
            meta = recover(lineage, state, f"rec-{kind}", cfg, log=lambda _: None)
            runs[kind] = {k.split("/")[1]: v for k, v in meta.metrics.items()}

    print(f"\nweight sync to one vLLM rollout actor (tiny Qwen2, {push['full']['tensors']} "
          f"tensors, {push['full']['mib']:.1f} MiB in full)")  # fmt: skip
    print(f"{'what':>6} {'payload MiB':>12} {'push ms':>8} {'SDFT step s':>12} "
          f"{'sync ms (last)':>15} {'sync share':>11}")  # fmt: skip
    for kind in ("full", "lora"):
        p, r = push[kind], runs[kind]
        print(f"{kind:>6} {p['mib']:>12.2f} {p['median_s'] * 1e3:>8.1f} {r['step_s']:>12.2f} "
              f"{r['sync_s'] * 1e3:>15.1f} {r['sync_fraction']:>10.1%}")  # fmt: skip
    write_results(args.out, {"steps": steps, "push": push, "sdft": runs})


if __name__ == "__main__":
    main()
