"""Evaluate a lineage state on task accuracy and general capability; record the metrics.

Tasks: `science`, `tooluse` (greedy generation, reference scorers; optionally also with the
demonstration in context: `<task>/acc_demo`) and `mmlu`, `winogrande` (lm-evaluation-harness;
MMLU in its letter and its cloze formulation, `mmlu/acc` and `mmlu/acc_cloze`).
Each task also records `<task>/n` (and `<task>/n_demo`), the number of rows scored, so a
pipeline can tell a figure taken at another `limit` from a current one, and each answer row
by row (`EvalRows`, for paired comparisons). Science also records `science/agree`: of the
answers whose reasoning marks an option `yes`, the share whose `<answer>` names that option
(`science/agree_n` of them) — whether a model answers by its own reasoning.
Data defaults to the tiny world's eval splits; `--data task=PATH` points at real files.
Generation runs where `EvalEngineSpec` says: transformers in this process, or a vLLM engine
as a Ray actor (`--engine vllm`; a GPU actor on a cluster).

    sdftlab eval base --tasks science,tooluse,mmlu,winogrande --demo
    sdftlab eval smol --tasks science,tooluse --demo --engine vllm
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sdftlab.data.loaders import load_task_file, world_task_file
from sdftlab.errors import DataError
from sdftlab.evaluate.general import (
    GENERAL_TASKS,
    LOWER_IS_BETTER,
    english_text_file,
    general_capability,
)
from sdftlab.evaluate.scorers import answer_agreement
from sdftlab.evaluate.tasks import Generator, HFGenerator, VLLMGenerator, task_accuracy
from sdftlab.lineage import EvalRows, Lineage
from sdftlab.specs import EvalEngineSpec

GENERATION_TASKS = ("science", "tooluse")
ALL_TASKS = GENERATION_TASKS + GENERAL_TASKS
ACCURACY_SUFFIXES = ("/acc", "/acc_demo", "/acc_cloze")  # `<task>/n` (rows scored) beside them
SHOWN_SUFFIXES = (*ACCURACY_SUFFIXES, *LOWER_IS_BETTER)  # accuracies in %, bits per byte as is


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
    """Each task's file in `data_dir`; `english` is written from CPython's documentation."""
    from sdftlab.paths import sdftlab_home

    return {
        t: english_text_file(sdftlab_home() / "eval_text")
        if t == "english"
        else world_task_file(data_dir, t, split)
        for t in tasks
    }


def evaluate_generation(
    generate: Generator,
    files: Mapping[str, Path],
    *,
    with_demonstration: bool = False,
    limit: int | None = None,
    max_new_tokens: int = 96,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, float], dict[str, EvalRows]]:
    """Accuracy of `generate`'s greedy answers on each generation task in `files`, and each
    accuracy's rows (for paired comparisons: `sdftlab.report`)."""
    metrics: dict[str, float] = {}
    rows: dict[str, EvalRows] = {}
    for task, path in files.items():
        if task not in GENERATION_TASKS:
            continue
        examples = load_task_file(path, task, limit=limit)
        t0 = time.perf_counter()
        views = [False, True] if with_demonstration else [False]
        for demo in views:
            result = task_accuracy(
                generate, examples, with_demonstration=demo, max_new_tokens=max_new_tokens
            )
            suffix = "_demo" if demo else ""
            metrics[f"{task}/acc{suffix}"] = result.accuracy
            # rows scored: tells a figure taken at another `limit` from a current one
            metrics[f"{task}/n{suffix}"] = float(result.n)
            if task == "science":  # does the answer follow the model's own reasoning?
                agreeing, both = answer_agreement(result.responses)
                metrics[f"science/agree_n{suffix}"] = float(both)
                if both:
                    metrics[f"science/agree{suffix}"] = agreeing / both
            rows[f"{task}/acc{suffix}"] = EvalRows(
                uid=[ex.uid for ex in examples],
                unit=[str(ex.meta.get("unit", ex.uid)) for ex in examples],
                correct="".join("1" if c else "0" for c in result.correct),
            )
        log(f"  {task:<10} n={len(examples):<4} {time.perf_counter() - t0:5.1f}s")
    return metrics, rows


def local_dtype(spec: EvalEngineSpec) -> torch.dtype:
    """The dtype a model evaluated in this process runs in: `spec.dtype`, auto resolved by
    whether this process has a GPU."""
    from sdftlab.models import local_device
    from sdftlab.specs import resolve_dtype

    gpus = 1.0 if local_device().type == "cuda" else 0.0
    return getattr(torch, resolve_dtype(spec.dtype, gpus))


@contextlib.contextmanager
def generator_for(
    lineage: Lineage, ref: str, tokenizer: Any, spec: EvalEngineSpec, *, in_process: bool = False
) -> Iterator[Generator]:
    """A greedy generator for state `ref` on `spec.engine`, on this process's GPU if it has
    one; a vLLM engine runs in this process (`in_process`: an evaluation worker's own
    resources) or as a Ray actor with `spec.cpus`/`spec.gpus`, and stops on exit.

    vLLM does not serve bitsandbytes NF4 here; an NF4 state is served from its dequantized
    copy (`models.dequantized_dir`: the weights each NF4 matmul computes with) in the
    engine's dtype — on this machine, or where the engine actor shares its file system."""
    from sdftlab.models import dequantized_dir, is_quantized, local_device

    path = lineage.resolve(ref)
    if spec.engine == "hf":
        model = lineage.load_model(ref, dtype=local_dtype(spec)).to(local_device())
        yield HFGenerator(model, tokenizer, batch_size=spec.batch_size)
        return
    if is_quantized(path):
        dtype = getattr(torch, spec.engine_kwargs(spec.gpus)["dtype"])
        with (
            dequantized_dir(path, dtype) as plain,
            _vllm_generator(plain, tokenizer, spec, in_process) as generate,
        ):
            yield generate
        return
    with _vllm_generator(path, tokenizer, spec, in_process) as generate:
        yield generate


@contextlib.contextmanager
def _vllm_generator(
    path: Path, tokenizer: Any, spec: EvalEngineSpec, in_process: bool
) -> Iterator[Generator]:
    if in_process:
        from sdftlab.rollout.engines import VLLMEngine

        yield VLLMGenerator(VLLMEngine(path, seed=0, **spec.engine_kwargs(spec.gpus)), tokenizer)
        return
    from sdftlab.raycluster import ensure_ray
    from sdftlab.rollout.pool import RolloutPool

    ensure_ray()
    pool = RolloutPool.start(
        path,
        cpus_per_actor=spec.cpus,
        gpus_per_actor=spec.gpus,
        engine_kwargs=spec.engine_kwargs(spec.gpus),
    )
    try:
        yield VLLMGenerator(pool, tokenizer)
    finally:
        pool.shutdown()


def evaluate_state(
    lineage: Lineage,
    ref: str,
    files: Mapping[str, Path],
    *,
    with_demonstration: bool = False,
    limit: int | None = None,
    record: bool = True,
    engine: EvalEngineSpec | None = None,
    log: Callable[[str], None] = print,
    in_process: bool = False,
) -> dict[str, float]:
    """Evaluate a state by name (or HF directory) and, for named states, record the metrics.

    Generation tasks run on `engine` (transformers here by default, or vLLM: an actor, or in
    this process with `in_process`); the general tasks score log-likelihoods with lm-eval on
    the model loaded in this process (on its GPU when it has one)."""
    spec = engine or EvalEngineSpec()
    tokenizer = lineage.load_tokenizer(ref)
    metrics: dict[str, float] = {}
    rows: dict[str, EvalRows] = {}
    if any(t in GENERATION_TASKS for t in files):
        with generator_for(lineage, ref, tokenizer, spec, in_process=in_process) as generate:
            metrics, rows = evaluate_generation(
                generate, files, with_demonstration=with_demonstration, limit=limit,
                max_new_tokens=spec.max_new_tokens, log=log,
            )  # fmt: skip
    general = {t: p for t, p in files.items() if t in GENERAL_TASKS}
    if general:
        t0 = time.perf_counter()
        from sdftlab.models import local_device

        model = lineage.load_model(ref, dtype=local_dtype(spec)).to(local_device())
        metrics |= general_capability(
            model, tokenizer, general, batch_size=spec.batch_size, limit=limit
        )
        log(f"  {'+'.join(general):<10} lm-eval {time.perf_counter() - t0:5.1f}s")
    if record and lineage.exists(ref):
        lineage.record_metrics(ref, metrics, rows)
    return metrics


def evaluate_on_worker(
    lineage: Lineage,
    ref: str,
    files: Mapping[str, Path],
    *,
    with_demonstration: bool = False,
    limit: int | None = None,
    engine: EvalEngineSpec | None = None,
    log: Callable[[str], None] = print,
    record: bool = True,
) -> dict[str, float]:
    """`evaluate_state` in Ray tasks that hold `engine.cpus` CPUs and `engine.gpus` GPUs —
    GPU workers on a cluster, CPU workers here — never in the calling process (a job's
    driver on the head node). The generation tasks (a vLLM engine or transformers) and the
    lm-eval tasks each run in a task of their own, one after the other, so the two models
    never share the device, and a GPU task's process exits after it (vLLM does not hand its
    GPU memory back). Each task's log lines are printed here, in order, when it returns."""
    import ray

    from sdftlab.placement import evaluation
    from sdftlab.raycluster import ensure_ray

    spec = engine or EvalEngineSpec()
    ensure_ray()
    request = evaluation(spec)  # what `sdftlab plan` counts
    task = ray.remote(**request.options(), max_calls=1 if request.gpus else 0)(_evaluate_task)
    metrics: dict[str, float] = {}
    for kinds in (GENERATION_TASKS, GENERAL_TASKS):
        part = {t: p for t, p in files.items() if t in kinds}
        if part:
            got, lines = ray.get(
                task.remote(lineage, ref, part, with_demonstration, limit, spec, record)
            )
            metrics |= got
            for line in lines:
                log(line)
    return metrics


def _evaluate_task(
    lineage: Lineage,
    ref: str,
    files: dict[str, Path],
    with_demonstration: bool,
    limit: int | None,
    spec: EvalEngineSpec,
    record: bool,
) -> tuple[dict[str, float], list[str]]:
    lines: list[str] = []
    metrics = evaluate_state(
        lineage, ref, files, with_demonstration=with_demonstration, limit=limit, engine=spec,
        log=lines.append, in_process=True, record=record,
    )  # fmt: skip
    return metrics, lines


def metrics_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """A markdown table: one row per state, one column per metric (accuracy in %)."""
    columns = sorted({k for m in rows.values() for k in m if k.endswith(SHOWN_SUFFIXES)},
                     key=_metric_order)  # fmt: skip
    header = "| state | " + " | ".join(columns) + " |"
    rule = "|---|" + "---:|" * len(columns)
    body = [
        f"| {name} | " + " | ".join(_shown(c, m) for c in columns) + " |"
        for name, m in rows.items()
    ]
    return "\n".join([header, rule, *body])


def _shown(column: str, metrics: Mapping[str, float]) -> str:
    if column not in metrics:
        return "–"
    if column.endswith(LOWER_IS_BETTER):
        return f"{metrics[column]:.3f}"
    return f"{100 * metrics[column]:.1f}"


def _metric_order(key: str) -> tuple[int, str]:
    task = key.split("/")[0]
    return (ALL_TASKS.index(task) if task in ALL_TASKS else len(ALL_TASKS), key)
