"""Measure what a 10% FFN prune and NF4 quantization do to a lineage state.

Run from the repository root, on a lineage that holds the state (e.g. after `sdftlab demo`):

    PYTHONPATH=platform .venv/bin/python benchmarks/degradation.py --state expert \\
        --out runs/bench/degradation.json            # $SDFTLAB_HOME / --lineage as for sdftlab

For `--state` S it makes `S-prune10` (`prune_state`, magnitude importance, ratio 0.1, width a
multiple of 16) and `S-nf4` (`quantize_state`, NF4 with double quantization) unless they
exist, evaluates all three on `--tasks` (first `--limit` eval rows of the world's task files;
recorded on the states as `sdftlab eval` does), and measures the mean per-token KL
divergence KL(S ‖ degraded) of the next-token distributions over the prompt + golden
response of the first `--kl-rows` science eval rows — the change in the model's outputs even
where the accuracy does not move.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sdftlab.data.chat import tokenize_chat
from sdftlab.data.loaders import load_task_file
from sdftlab.degrade.prune import prune_state
from sdftlab.degrade.quantize import quantize_state
from sdftlab.evaluate.run import default_task_files, evaluate_state
from sdftlab.lineage import Lineage
from sdftlab.paths import sdftlab_home
from sdftlab.world.build import current_world

sys.path.insert(0, str(Path(__file__).parent))
from rollout import write_results


@torch.no_grad()
def logit_kl(lineage: Lineage, ref: str, other: str, science_file: Path, rows: int) -> float:
    """Mean over tokens of KL(ref ‖ other) of the next-token distributions."""
    a, b = lineage.load_model(ref).float().eval(), lineage.load_model(other).eval()
    tok = lineage.load_tokenizer(ref)
    total, count = 0.0, 0
    for ex in load_task_file(science_file, "science", limit=rows):
        ids = torch.tensor([tokenize_chat(tok, ex.messages, ex.demonstration, 512)["input_ids"]])
        logp_a = F.log_softmax(a(input_ids=ids).logits[0].float(), -1)
        logp_b = F.log_softmax(b(input_ids=ids).logits[0].float(), -1)
        total += float((logp_a.exp() * (logp_a - logp_b)).sum())
        count += ids.shape[1]
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--state", default="expert")
    ap.add_argument("--lineage", help="default: $SDFTLAB_HOME/lineage")
    ap.add_argument("--tasks", default="science,tooluse,mmlu,winogrande")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--kl-rows", type=int, default=64)
    ap.add_argument("--out", default="runs/bench/degradation.json")
    args = ap.parse_args()
    lineage = Lineage(args.lineage or str(sdftlab_home() / "lineage"))
    data_dir = current_world().data_dir
    s = args.state
    t0 = time.perf_counter()
    if not lineage.exists(f"{s}-prune10"):
        prune_state(lineage, s, f"{s}-prune10", 0.1, multiple_of=16)
    if not lineage.exists(f"{s}-nf4"):
        quantize_state(lineage, s, f"{s}-nf4")
    tasks = args.tasks.split(",")
    files = default_task_files(data_dir, tasks)
    rows = {}
    for state in (s, f"{s}-prune10", f"{s}-nf4"):
        metrics = evaluate_state(lineage, state, files, limit=args.limit, log=lambda _: None)
        kl = 0.0 if state == s else logit_kl(
            lineage, s, state, data_dir / "science_eval.jsonl", args.kl_rows
        )  # fmt: skip
        rows[state] = {**{t: metrics[f"{t}/acc"] for t in tasks}, "logit_kl": kl}
    print(f"\n{s}: 10% FFN pruning and NF4 (first {args.limit} eval rows; logit KL over "
          f"{args.kl_rows} science rows)")  # fmt: skip
    print(f"{'state':>16} " + " ".join(f"{t:>10}" for t in tasks) + f" {'KL/token':>9}")
    for state, r in rows.items():
        print(f"{state:>16} " + " ".join(f"{100 * r[t]:>10.1f}" for t in tasks)
              + f" {r['logit_kl']:>9.4f}")  # fmt: skip
    write_results(args.out, {"state": s, "rows": rows, "seconds": time.perf_counter() - t0})


if __name__ == "__main__":
    main()
