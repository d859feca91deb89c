"""Evaluate a lineage state on task accuracy and general capability; record the metrics.

Tasks: `science`, `tooluse` (greedy generation, reference scorers; optionally also with the
demonstration in context: `<task>/acc_demo`) and `mmlu`, `winogrande` (lm-evaluation-harness;
MMLU in its letter and its cloze formulation, `mmlu/acc` and `mmlu/acc_cloze`).
Each task also records `<task>/n` (and `<task>/n_demo`), the number of rows scored, so a
pipeline can tell a figure taken at another `limit` from a current one.
Data defaults to the tiny world's eval splits; `--data task=PATH` points at real files.

    sdftlab eval base --tasks science,tooluse,mmlu,winogrande --demo
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from sdftlab.data.loaders import load_task_file, world_task_file
from sdftlab.errors import DataError
from sdftlab.evaluate.general import GENERAL_TASKS, general_capability
from sdftlab.evaluate.tasks import task_accuracy
from sdftlab.lineage import Lineage

GENERATION_TASKS = ("science", "tooluse")
ALL_TASKS = GENERATION_TASKS + GENERAL_TASKS
ACCURACY_SUFFIXES = ("/acc", "/acc_demo", "/acc_cloze")  # `<task>/n` (rows scored) beside them


def parse_tasks(spec: str | Sequence[str]) -> list[str]:
    names = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec)]
    names = [t for t in names if t]
    unknown = [t for t in names if t not in ALL_TASKS]
    if unknown or not names:
        raise DataError(
            f"--tasks: unknown task(s) {unknown or '(none given)'}; known: {', '.join(ALL_TASKS)}"
        )
    return names


def default_task_files(
    data_dir: Path, tasks: Sequence[str], split: str = "eval"
) -> dict[str, Path]:
    return {t: world_task_file(data_dir, t, split) for t in tasks}


def evaluate_model(
    model: torch.nn.Module,
    tokenizer: object,
    files: Mapping[str, Path],
    *,
    with_demonstration: bool = False,
    limit: int | None = None,
    max_new_tokens: int = 96,
    batch_size: int = 32,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Metrics of an in-memory model on each task in `files` (task → data file)."""
    metrics: dict[str, float] = {}
    for task, path in files.items():
        if task not in GENERATION_TASKS:
            continue
        examples = load_task_file(path, task, limit=limit)
        t0 = time.perf_counter()
        result = task_accuracy(
            model, tokenizer, examples, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
        metrics[f"{task}/acc"] = result.accuracy
        metrics[f"{task}/n"] = float(result.n)  # rows scored: tells a stale figure from a new one
        if with_demonstration:
            demo = task_accuracy(
                model,
                tokenizer,
                examples,
                with_demonstration=True,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
            )
            metrics[f"{task}/acc_demo"] = demo.accuracy
            metrics[f"{task}/n_demo"] = float(demo.n)
        log(f"  {task:<10} n={result.n:<4} {time.perf_counter() - t0:5.1f}s")
    general = {t: p for t, p in files.items() if t in GENERAL_TASKS}
    if general:
        t0 = time.perf_counter()
        metrics.update(
            general_capability(model, tokenizer, general, batch_size=batch_size, limit=limit)
        )
        log(f"  {'+'.join(general):<10} lm-eval {time.perf_counter() - t0:5.1f}s")
    return metrics


def evaluate_state(
    lineage: Lineage,
    ref: str,
    files: Mapping[str, Path],
    *,
    with_demonstration: bool = False,
    limit: int | None = None,
    record: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Evaluate a state by name (or HF directory) and, for named states, record the metrics."""
    model = lineage.load_model(ref, dtype=torch.float32)
    tokenizer = lineage.load_tokenizer(ref)
    metrics = evaluate_model(
        model, tokenizer, files, with_demonstration=with_demonstration, limit=limit, log=log
    )
    if record and lineage.exists(ref):
        lineage.record_metrics(ref, metrics)
    return metrics


def metrics_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """A markdown table: one row per state, one column per metric (accuracy in %)."""
    columns = sorted({k for m in rows.values() for k in m if k.endswith(ACCURACY_SUFFIXES)},
                     key=_metric_order)  # fmt: skip
    header = "| state | " + " | ".join(columns) + " |"
    rule = "|---|" + "---:|" * len(columns)
    body = [
        f"| {name} | " + " | ".join(f"{100 * m[c]:.1f}" if c in m else "–" for c in columns) + " |"
        for name, m in rows.items()
    ]
    return "\n".join([header, rule, *body])


def _metric_order(key: str) -> tuple[int, str]:
    task = key.split("/")[0]
    return (ALL_TASKS.index(task) if task in ALL_TASKS else len(ALL_TASKS), key)
