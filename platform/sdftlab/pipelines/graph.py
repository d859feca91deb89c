"""Pipelines as graphs of named stages over the lineage, and the runner every pipeline job uses.

A pipeline config (one YAML per experiment, `jobs/configs/`) names the states it makes and,
for each, the stage that makes it — its `kind`, its input (`from`) and the stage's own
options — then how to evaluate, compare and report:

    stages:
      base:       {kind: world}                        # or {kind: import, path: /models/…}
      expert:     {kind: sft, from: base, data: [science], steps: 300}
      forgot:     {kind: sft, from: expert, data: [tooluse], steps: 300}
      rec_expert: {kind: sdft, from: forgot, teacher: expert, steps: 100}
    eval: {limit: 100}
    cka: {reference: expert}
    report: {dir: runs/forgetting, degraded: forgot}

Kinds: `world` (the embedded tiny world, built or cached; its options are a `WorldConfig`),
`import` (an HF folder, a GGUF file, a hub id or a packaged model: `sdftlab.importer`),
`sft`, `sdft` (a `RecoverConfig`, on- or off-policy), `quantize` (NF4) and `prune`
(structured FFN). Every name a stage reads — its `from`, an SDFT `teacher`, the CKA
reference, the report's degraded state — must be made by a stage of the same config, and the
stages must not form a cycle: `PipelineConfig` checks that (and every option) when the file
is loaded, so a bad config fails before any work.

`seeds: [0, 1, 2]` runs every training stage, and what is made from it, once per seed as
`<name>.s<seed>` (`pipelines.seeds`); the report then gives each stage over its seeds.
Before each SDFT stage trains, its teacher's accuracy without and with the demonstration is
checked (`pipelines.preflight`, `eval.preflight_rows`).

Stages run in dependency order (file order among independent ones). A stage whose state
exists with the same options and is newer than its inputs is skipped, so a killed pipeline
resubmitted continues after its last finished stage. Then every state is evaluated (task
accuracy, the teacher's view with the demonstration for `eval.demonstration_for`, general
capability through lm-eval), compared with `cka.reference` layer by layer, and reported
(`report.md`, `results.parquet`, figures) in a directory of the run's own,
`<report.dir>/<run-id>/` (`<report.dir>/latest` is the last finished one; `sdftlab.runs`).
Every state and the report record their provenance (`sdftlab.provenance`), and the run, its
stages' configs, training curves, evaluation and CKA go to MLflow (`tracking`,
`sdftlab.tracking`).

    python jobs/forgetting.py --config jobs/configs/forgetting.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/forgetting.py \
        --config jobs/configs/forgetting.yaml
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import Field, field_validator, model_validator

from sdftlab import console
from sdftlab.config import TRUST_REMOTE_CODE_ENV, StrictModel
from sdftlab.errors import SdftlabError
from sdftlab.lineage import Lineage
from sdftlab.pipelines.seeds import Seeded, expand
from sdftlab.pipelines.stages import KINDS, Job, Log, WorldStage, kind_of, options
from sdftlab.specs import CKASpec, EvalSpec, ResourcesSpec
from sdftlab.tracking import TrackingSpec
from sdftlab.world.config import WorldConfig

# ----------------------------------------------------------------------------- stage kinds

Stage = Annotated[
    Union[tuple(kind.stage for kind in KINDS.values())],  # noqa: UP007 - built from KINDS
    Field(discriminator="kind"),
]


def inputs(stage: Any) -> list[str]:
    """The states a stage reads (its `from`, an SDFT teacher that names a state)."""
    return kind_of(stage).reads(stage)


# ----------------------------------------------------------------------------- the config


class ReportSpec(StrictModel):
    dir: str = Field(
        "runs/pipeline",
        description="the pipeline's runs: <dir>/<run-id>/, <dir>/latest (`sdftlab runs`)",
    )
    title: str | None = None
    degraded: str | None = Field(
        None, description="the damaged state recoveries are measured against (ΔCKA, recovery)"
    )
    accuracy_metric: str = "science/acc"


class PipelineConfig(StrictModel):
    """A pipeline: named stages over the lineage, then evaluation, CKA and the report."""

    name: str = "pipeline"
    stages: dict[str, Stage | None] = Field(
        min_length=1, description="state name → the stage that makes it (null: left out)"
    )
    seeds: list[Annotated[int, Field(ge=0)]] | None = Field(
        None,
        min_length=1,
        description="run every training stage (and what is made from it) once per seed, as "
        "<name>.s<seed>; the report gives each stage over its seeds (`pipelines.seeds`)",
    )
    data_dir: str | None = Field(None, description="task files; default the world stage's")
    task_data: WorldConfig | None = Field(
        None,
        description="the tiny world's task files without its model (seed and split sizes): "
        "tasks an imported model can learn, forget and recover",
    )
    lineage: str | None = Field(None, description="lineage root (path or URI); default home")
    trust_remote_code: bool = Field(
        False, description="let model directories run their own code (imported models only)"
    )
    eval: EvalSpec = EvalSpec()
    cka: CKASpec
    report: ReportSpec = ReportSpec()
    resources: ResourcesSpec = Field(
        ResourcesSpec(), description="what it runs on: each stage is planned against it first"
    )
    tracking: TrackingSpec = TrackingSpec()

    @field_validator("stages")
    @classmethod
    def _left_out(cls, stages: dict[str, Any]) -> dict[str, Any]:
        return {name: stage for name, stage in stages.items() if stage is not None}

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int] | None) -> list[int] | None:
        if seeds is not None and len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds {seeds} repeats a seed; list each seed once")
        return seeds

    @model_validator(mode="after")
    def _a_graph(self) -> PipelineConfig:
        self.seeded()  # every input made by a stage, no cycle, no seeded name taken
        made = set(self.stages)
        named = [("cka.reference", self.cka.reference)]
        named += [("eval.demonstration_for", n) for n in self.eval.demonstration_for]
        if self.report.degraded is not None:
            named.append(("report.degraded", self.report.degraded))
        for field, name in named:
            if name not in made:
                raise ValueError(
                    f"{field} names {name!r}, which no stage makes (stages: "
                    f"{', '.join(self.stages)}); name one of them or add a stage {name!r}"
                )
        worlds = [(n, s) for n, s in self.stages.items() if isinstance(s, WorldStage)]
        if not worlds and self.data_dir is None and self.task_data is None:
            raise ValueError(
                "no stage has kind world: set data_dir to the task files' folder, or task_data "
                "(e.g. task_data: {seed: 0}) for the tiny world's tasks"
            )
        for name, world in worlds[1:]:  # one world's data for every stage
            if _world_data(world) != _world_data(worlds[0][1]):
                raise ValueError(
                    f"world stages {worlds[0][0]!r} and {name!r} differ in more than `model` and "
                    "`pretrain`; they must share seed, sizes and vocabulary (one task set)"
                )
        return self

    def seeded(self) -> Seeded:
        """The states a run makes, in run order: the stages once per seed where they train."""
        return expand(self.stages, order(self.stages), self.seeds)


def _world_data(world: WorldStage) -> dict[str, Any]:
    return world.model_dump(exclude={"kind", "model", "pretrain"})


def order(stages: dict[str, Any]) -> list[str]:
    """Stage names in dependency order (file order among independent stages).

    Raises ValueError naming the stage and the input when an input is made by no stage, and
    naming the states of a cycle when there is one.
    """
    for name, stage in stages.items():
        for needed in inputs(stage):
            if needed not in stages:
                what = "teacher" if needed != getattr(stage, "source", None) else "from"
                raise ValueError(
                    f"stage {name!r}: {what} {needed!r} is made by no stage (stages: "
                    f"{', '.join(stages)}); add a stage {needed!r} or name one of them"
                )
    done: list[str] = []
    pending = list(stages)
    while pending:
        ready = [n for n in pending if all(i in done for i in inputs(stages[n]))]
        if not ready:
            raise ValueError(f"stages form a cycle: {' → '.join(_cycle(stages, pending))}")
        done.append(ready[0])
        pending.remove(ready[0])
    return done


def _cycle(stages: dict[str, Any], pending: list[str]) -> list[str]:
    path = [pending[0]]
    while True:
        nxt = next(i for i in inputs(stages[path[-1]]) if i in pending)
        if nxt in path:
            return [*path[path.index(nxt) :], nxt]
        path.append(nxt)


# ----------------------------------------------------------------------------- running


def up_to_date(lineage: Lineage, name: str, recorded: dict[str, Any], reads: list[str]) -> bool:
    """Whether state `name` exists with `recorded` in its config and is newer than `reads`."""
    if not lineage.exists(name):
        return False
    meta = lineage.meta(name)
    if any(meta.config.get(k) != v for k, v in recorded.items()):
        return False
    if reads and reads[0] not in meta.parents:  # made from another state of that name
        return False
    # ISO-8601 UTC timestamps sort as strings.
    return all(lineage.meta(r).created_at <= meta.created_at for r in reads)


def recorded_config(stage: Any) -> dict[str, Any]:
    """What the stage's operator writes into the state's config, to compare on resume."""
    return kind_of(stage).recorded(options(stage).model_dump(mode="json"))


def run_stage(
    label: str, name: str, done: bool, work: Callable[[], Any], log: Log, timings: dict
) -> Any:
    """Run `work` (unless `done`), logging the stage and timing it; what `work` returns."""
    if done:
        log(f"── {label}: {name} is up to date (same config), skipped")
        timings[name] = 0.0
        return None
    log(f"── {label}: {name}")
    t0 = time.perf_counter()
    out = work()
    timings[name] = time.perf_counter() - t0
    log(f"   {name} done in {timings[name]:.0f}s")
    return out


def needs_evaluation(
    metrics: dict[str, float],
    rows: dict[str, float],
    *,
    with_demonstration: bool,
    per_row: Collection[str] | None = None,
) -> bool:
    """Whether a state's recorded `metrics` lack a figure asked for, or hold one taken on
    another number of rows. `rows` maps `<task>/n` to the rows the config scores; with the
    demonstration, the generation tasks are scored a second time (`acc_demo`, `n_demo`).
    `per_row`: the accuracies whose per-row results the state holds (its metadata's `rows`);
    a generation accuracy without them is scored again, for the report's paired tests."""
    from sdftlab.evaluate.general import FORMULATIONS
    from sdftlab.evaluate.run import GENERATION_TASKS

    tasks = [key.removesuffix("/n") for key in rows]
    demo_tasks = [t for t in tasks if t in GENERATION_TASKS] if with_demonstration else []
    wanted = {f"{t}/{m}" for t in tasks for m in FORMULATIONS.get(t, ("acc",))}
    wanted |= {f"{t}/acc_demo" for t in demo_tasks}
    counts = {**rows, **{f"{t}/n_demo": rows[f"{t}/n"] for t in demo_tasks}}
    if per_row is not None:
        generated = {m for m in wanted if m.split("/")[0] in GENERATION_TASKS}
        if not generated <= set(per_row):
            return True
    return not wanted <= set(metrics) or any(metrics.get(k) != n for k, n in counts.items())


def built_data_dir(cfg: PipelineConfig, home: Path) -> Path | None:
    """The pipeline's task files if they are on this machine already (`data_dir`, the
    cached `task_data`, or the world built under `home`), else None: what `sdftlab plan`
    measures prompt lengths on, before any stage runs."""
    from sdftlab.world.build import current_world, world_digest

    if cfg.data_dir:
        return Path(cfg.data_dir)
    if cfg.task_data is not None:
        cached = home / "world_data" / world_digest(cfg.task_data)
        return cached if cached.is_dir() else None
    try:
        return current_world(home).data_dir
    except SdftlabError:
        return None


def run_pipeline(
    cfg: PipelineConfig, lineage: Lineage, home: Path, log: Log = print
) -> dict[str, Any]:
    """Run (or resume) the pipeline into a new run directory (`sdftlab.runs`), tracked in
    MLflow (`sdftlab.tracking`); returns {'timings', 'report', 'run_dir'}."""
    from sdftlab import provenance, runs
    from sdftlab.plan import check, plan_pipeline
    from sdftlab.tracking import Tracker

    seeded = cfg.seeded()
    lineage.check_writable()
    plans = plan_pipeline(cfg, order(cfg.stages), lineage, built_data_dir(cfg, home))
    check(plans, cfg.resources)  # a stage that cannot fit: refused now
    resolved = cfg.model_dump(mode="json", by_alias=True)
    prov = provenance.collect(resolved)
    run_id = runs.new_run_id(resolved)
    tracker = Tracker.open(cfg.tracking, home, experiment=cfg.name, run_name=run_id,
                           params=resolved, tags=_tags(prov), log=log)  # fmt: skip
    run_dir = runs.start_run(Path(cfg.report.dir), run_id, pipeline=cfg.name, config=resolved,
                             provenance=prov)  # fmt: skip
    log(f"run {run_dir}")
    try:
        out = _run(cfg, lineage, home, seeded, run_dir, prov, tracker, log)
    except BaseException as err:
        runs.finish_run(run_dir, "failed", error=f"{type(err).__name__}: {err}"[:1000])
        if tracker is not None:
            tracker.end(tracker.run_id, "FAILED")
        raise
    results = runs.run_results(run_dir)
    runs.finish_run(run_dir, "finished", timings=out["timings"],
                    headline_metric=cfg.report.accuracy_metric,
                    headline=runs.headline(results, cfg.report.accuracy_metric))  # fmt: skip
    if tracker is not None:
        tracker.log_artifacts(run_dir)
        tracker.end(tracker.run_id)
    log(f"report: {out['report']}")
    return {**out, "run_dir": run_dir}


def _tags(prov: dict[str, Any]) -> dict[str, str]:
    git = prov.get("git") or {}
    return {
        "git.commit": str(git.get("commit")), "git.dirty": str(git.get("dirty")),
        "lock": str(prov.get("lock")), "variant": str(prov.get("variant")),
        "machine": str((prov.get("machine") or {}).get("cpu")),
    }  # fmt: skip


def _quiet_progress(cfg: PipelineConfig) -> None:
    if cfg.trust_remote_code:  # before Ray starts: its workers inherit the environment
        os.environ[TRUST_REMOTE_CODE_ENV] = "1"
    # One progress line per stage: no Ray Data or transformers progress bars (the workers
    # inherit the switches; this process has imported transformers already).
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _run(
    cfg: PipelineConfig, lineage: Lineage, home: Path, seeded: Seeded, run_dir: Path,
    prov: dict[str, Any], tracker: Any, log: Log,
) -> dict[str, Any]:  # fmt: skip
    """The stages (once per seed where they train), evaluation, CKA and the report; each
    state's stage an MLflow child run."""
    from sdftlab.report import write_report
    from sdftlab.world.build import build_world_data

    _quiet_progress(cfg)
    timings: dict[str, float] = {}
    tracked: dict[str, str] = {}  # state → its MLflow run
    t_all = time.perf_counter()
    data_dir = Path(cfg.data_dir) if cfg.data_dir else None
    if data_dir is None and cfg.task_data is not None:
        data_dir = build_world_data(cfg.task_data, home)
    names = list(seeded.stages)
    for i, name in enumerate(names, 1):
        stage = seeded.stages[name]
        kind = kind_of(stage)
        label = f"stage {i}/{len(names)} {kind.describe(stage)}"
        done = not kind.caches_itself and up_to_date(
            lineage, name, recorded_config(stage), inputs(stage)
        )
        callbacks: tuple[Any, ...] = ()
        if tracker is not None:
            tracked[name] = tracker.stage(
                name,
                options(stage).model_dump(mode="json"),
                {"kind": stage.kind, "parents": ",".join(inputs(stage)), "skipped": str(done)},
            )
            callbacks = (tracker.train_callback(tracked[name]),)
        job = Job(name, stage, options(stage), lineage, data_dir, home,
                  lambda m: log("   " + m), callbacks, cfg.eval.preflight_rows)  # fmt: skip
        try:
            made = run_stage(label, name, done, partial(kind.run, job), log, timings)
        except BaseException:
            if tracker is not None:
                tracker.end(tracked[name], "FAILED")
            raise
        data_dir = data_dir or made
    assert data_dir is not None  # PipelineConfig: a world stage or data_dir

    t0 = time.perf_counter()
    evaluate_states(cfg, lineage, seeded, data_dir, log)
    timings["evaluation"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    frames = compare_to_reference(cfg, lineage, seeded, data_dir, log)
    timings["cka"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all
    if tracker is not None:
        for state, run_id in tracked.items():
            tracker.log_metrics(run_id, lineage.meta(state).metrics)
            if state in frames:
                label = lineage.label(seeded.reference_of(state, cfg.cka.reference))
                tracker.log_cka(run_id, frames[state], label)
            tracker.end(run_id)
    report = write_report(
        run_dir, lineage, names, frames, reference=cfg.cka.reference,
        degraded=cfg.report.degraded or names[0], timings=timings,
        title=cfg.report.title or cfg.name, accuracy_metric=cfg.report.accuracy_metric,
        provenance=prov, seeded=seeded,
    )  # fmt: skip
    return {"timings": timings, "report": report}


def evaluate_states(
    cfg: PipelineConfig, lineage: Lineage, seeded: Seeded, data_dir: Path, log: Log
) -> None:
    """Score every state whose recorded figures lack one asked for (or were taken on another
    number of rows): task accuracy, with the demonstration for `eval.demonstration_for`,
    general capability."""
    from sdftlab.data.loaders import count_rows
    from sdftlab.evaluate.run import default_task_files, evaluate_on_worker

    log(f"── evaluation ({', '.join(cfg.eval.tasks)}, limit {cfg.eval.limit})")
    files = default_task_files(data_dir, cfg.eval.tasks)
    # A state's figures are reused only if they were taken on as many rows as asked for now.
    rows = {f"{t}/n": float(count_rows(p, limit=cfg.eval.limit)) for t, p in files.items()}
    for state in seeded.stages:
        demo = seeded.stage_of[state] in cfg.eval.demonstration_for
        meta = lineage.meta(state)
        if not needs_evaluation(meta.metrics, rows, with_demonstration=demo, per_row=meta.rows):
            continue
        log(f"   {state}")
        evaluate_on_worker(lineage, state, files, with_demonstration=demo,
                           limit=cfg.eval.limit, engine=cfg.eval.generation,
                           log=lambda m: log("   " + m))  # fmt: skip


def compare_to_reference(
    cfg: PipelineConfig, lineage: Lineage, seeded: Seeded, data_dir: Path, log: Log
) -> dict[str, Any]:
    """CKA of every state against `cka.reference` (its own seed's), layer by layer:
    {state: frame}."""
    from sdftlab.cka.pool import CKAOptions
    from sdftlab.cka.run import compare_states, load_examples
    from sdftlab.placement import cka_actors

    log(f"── CKA against {cfg.cka.reference} on {cfg.cka.data}")
    examples = load_examples(cfg.cka.data, data_dir, limit=cfg.cka.limit)
    opts = CKAOptions(dtype=cfg.cka.model_dtype())
    pool = cka_actors(cfg.cka)  # what `sdftlab plan` counts; None: in this process
    where = {} if pool is None else {
        "actors": pool.count, "cpus_per_actor": pool.cpus, "gpus_per_actor": pool.gpus,
    }  # fmt: skip
    references = {s: seeded.reference_of(s, cfg.cka.reference) for s in seeded.stages}
    return {
        s: compare_states(lineage, s, reference, examples, opts, **where)
        for s, reference in references.items()
        if s != reference
    }


def main(argv: list[str] | None, default_config: Path, doc: str) -> int:
    """`python jobs/<pipeline>.py [--config FILE] [key=value ...]`: load the config (the job's
    own YAML by default), open the lineage (the config's `lineage`, else $SDFTLAB_LINEAGE,
    else `<home>/lineage`), run."""
    import argparse

    from sdftlab.allocator import tune_cpu_allocator
    from sdftlab.config import load_config
    from sdftlab.errors import SdftlabError
    from sdftlab.paths import lineage_root, sdftlab_home

    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--config", default=str(default_config), help="a pipeline YAML")
    parser.add_argument("--verbose", action="store_true", help="the libraries' output here too")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)
    home = sdftlab_home()
    try:
        with console.session(home, Path(default_config).stem, args.verbose):
            tune_cpu_allocator()  # the world build, evaluation and CKA in this process
            cfg = load_config(PipelineConfig, args.config, args.overrides)
            run_pipeline(cfg, Lineage(lineage_root(None, cfg.lineage, home)), home)
    except SdftlabError as err:
        console.error(str(err))
        return 2
    return 0
