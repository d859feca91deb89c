"""Benchmark: lm-eval's `TaskManager` with and without its index of built-in tasks, and what
one `general_capability` call (MMLU- and Winogrande-format, the whole eval splits) costs.

Run from the repository root, after `sdftlab world build`:

    PYTHONPATH=platform .venv/bin/python benchmarks/experiments/lmeval_tasks.py \
        --out runs/bench/lmeval_tasks.json

`evaluate.general` writes one task YAML per general task that includes lm-eval's own task
file by path, so the tasks load without the index (`include_defaults=False`). Both settings
alternate, `--repeats` times each; each run checks that the two load the same tasks. Then
`general_capability` scores `base` `--repeats` times (what the pipelines pay per state).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # benchmarks/
sys.path.insert(0, str(Path(__file__).parent))

from rollout import write_results
from sdftlab.evaluate.general import general_capability, write_task_yamls
from sdftlab.lineage import Lineage
from sdftlab.paths import sdftlab_home
from sdftlab.world.build import current_world


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    from lm_eval.tasks import TaskManager

    world = current_world()
    files = {t: world.task_file(t, "eval") for t in ("mmlu", "winogrande")}
    seconds: dict[bool, list[float]] = {True: [], False: []}
    loaded: dict[bool, list[str]] = {}
    for _ in range(args.repeats):
        for defaults in seconds:
            with tempfile.TemporaryDirectory() as tmp:
                names = write_task_yamls(files, Path(tmp))
                t0 = time.perf_counter()
                manager = TaskManager(include_path=tmp, include_defaults=defaults)
                tasks = manager.load_task_or_group(list(names))
                seconds[defaults].append(time.perf_counter() - t0)
                loaded[defaults] = sorted(tasks)
    lineage = Lineage(sdftlab_home() / "lineage")
    model, tokenizer = lineage.load_model("base").eval(), lineage.load_tokenizer("base")
    calls = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        metrics = general_capability(model, tokenizer, files)
        calls.append(time.perf_counter() - t0)

    print(f"\nlm-eval task loading, {args.repeats} runs per setting, alternating\n")
    print("| built-in task index | index + load s (mean) | runs | tasks loaded |")
    print("|---|---:|---|---|")
    rows = []
    for defaults, runs in seconds.items():
        label = "built (include_defaults=True)" if defaults else "skipped (what sdftlab does)"
        rows.append({"include_defaults": defaults, "seconds": runs, "tasks": loaded[defaults]})
        print(
            f"| {label} | {statistics.mean(runs):.2f} | {', '.join(f'{s:.2f}' for s in runs)} | "
            f"{', '.join(loaded[defaults])} |"
        )
    same = loaded[True] == loaded[False]
    print(f"\nsame tasks either way: {same}")
    print(
        f"general_capability(base), whole splits: {statistics.mean(calls):.2f} s a call "
        f"({', '.join(f'{s:.2f}' for s in calls)}); {metrics}"
    )
    if args.out:
        write_results(
            args.out, {"rows": rows, "same_tasks": same, "call_s": calls, "metrics": metrics}
        )


if __name__ == "__main__":
    main()
