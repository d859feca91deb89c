"""The SDFT teacher's pre-flight: does the teacher read the demonstration?

SDFT's premise is that the teacher — the model conditioned on an expert demonstration — is
better than the student. Before an SDFT stage trains, its teacher (a state; for `ema` and
`live` the student's own starting state) answers the first `eval.preflight_rows` rows of each
of the recovery's training tasks greedily, without and with the demonstration in the
teacher's template, on the recovery's rollout engine and token budget, in a Ray task (never
in the driver). Both accuracies are printed before training and recorded on the new state
(`preflight/<task>/acc`, `acc_demo`, `n`); the report shows them. One warning line says so
when the demonstration does not raise the teacher's accuracy — the precondition fails, and a
recovery toward that teacher has no better behaviour to copy.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sdftlab import console
from sdftlab.distill.config import SPECIAL_TEACHERS, RecoverConfig
from sdftlab.lineage import Lineage
from sdftlab.specs import EvalEngineSpec, VLLMEngineSpec


def preflight_engine(cfg: RecoverConfig) -> EvalEngineSpec:
    """The recovery's own rollout engine and budget, one engine of its actors' size."""
    shared = cfg.rollout.model_dump(include=set(VLLMEngineSpec.model_fields))
    return EvalEngineSpec(**shared, engine=cfg.rollout.engine,
                          max_new_tokens=cfg.rollout.max_new_tokens,
                          cpus=cfg.rollout.cpus_per_actor,
                          gpus=cfg.rollout.gpus_per_actor)  # fmt: skip


def teacher_preflight(
    lineage: Lineage,
    student: str,
    cfg: RecoverConfig,
    data_dir: Path | None,
    rows: int,
    log: Callable[[str], None],
) -> dict[str, float]:
    """The teacher's accuracy without and with the demonstration on the first `rows` rows
    of each training task, as `preflight/<task>/...` metrics; {} when `rows` is 0 or the
    recovery is off-policy (its teacher is scored on demonstrations, not asked to answer)."""
    from sdftlab.distill.sdft import task_files
    from sdftlab.evaluate.run import GENERATION_TASKS, evaluate_on_worker

    if rows == 0 or cfg.mode == "off_policy":
        return {}
    teacher = student if cfg.teacher in SPECIAL_TEACHERS else cfg.teacher
    files = {t: p for t, p in task_files(cfg, data_dir) if t in GENERATION_TASKS}
    lines: list[str] = []
    got = evaluate_on_worker(lineage, teacher, files, with_demonstration=True, limit=rows,
                             engine=preflight_engine(cfg), log=lines.append,
                             record=False)  # fmt: skip
    metrics: dict[str, float] = {}
    for task in files:
        bare, demo, n = got[f"{task}/acc"], got[f"{task}/acc_demo"], int(got[f"{task}/n"])
        metrics |= {f"preflight/{task}/acc": bare, f"preflight/{task}/acc_demo": demo,
                    f"preflight/{task}/n": float(n)}  # fmt: skip
        log(f"pre-flight: teacher {cfg.teacher} on {task}: {100 * bare:.1f}% without the "
            f"demonstration, {100 * demo:.1f}% with it ({n} rows)")  # fmt: skip
        if demo <= bare:
            console.warn(
                f"teacher {cfg.teacher!r} does not gain from the demonstration on {task} "
                f"({100 * bare:.1f}% → {100 * demo:.1f}% on {n} rows): SDFT copies a teacher "
                "that reads the demonstration; compare teachers with `sdftlab eval STATE --demo`"
            )
    return metrics
