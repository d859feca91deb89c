"""The forgetting pipeline (paper Fig. 1/4, Tables 1, 6, 7) as a sequence of named stages.

    base ──SFT science──▶ expert ──SFT tool use──▶ forgot ──SDFT t=base───▶ rec_base
                                                          └─SDFT t=expert─▶ rec_expert
                                                          └─SFT baseline──▶ sft_baseline

then every state is evaluated (task accuracy, the teacher view with the demonstration for
`base` and `expert`, MMLU/Winogrande through lm-eval) and compared to the expert with CKA.
A stage whose state already exists with the same config (and a parent older than itself) is
not re-run, so a killed job resubmitted continues after its last finished stage.

    python jobs/forgetting.py --config jobs/configs/forgetting.yaml
    sdftlab demo            # the same on the embedded tiny world, with its default config
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field

from sdftlab.config import StrictModel, WorldConfig
from sdftlab.degrade.sft import SFTConfig
from sdftlab.distill.sdft import RecoverConfig
from sdftlab.lineage import Lineage


class EvalSpec(StrictModel):
    tasks: list[str] = ["science", "tooluse", "mmlu", "winogrande"]
    limit: int | None = Field(100, gt=0, description="first N eval rows per task")
    demonstration_for: list[str] = ["base", "expert"]


class CKASpec(StrictModel):
    reference: str = "expert"
    data: str = "science"
    limit: int = Field(64, ge=4)
    actors: int | None = Field(None, description="None: in the driver; N: the Ray actor pool")


class ForgettingConfig(StrictModel):
    """One YAML per experiment; every section optional (defaults: the tiny world)."""

    name: str = "forgetting"
    world: WorldConfig | None = WorldConfig()
    model: str | None = Field(None, description="paper scale: a local HF directory as `base`")
    data_dir: str | None = Field(None, description="task files; default the world's")
    expert: SFTConfig = SFTConfig(data=["science"], steps=300)
    forget: SFTConfig = SFTConfig(data=["tooluse"], steps=300)
    recover: dict[str, RecoverConfig] = {
        "rec_base": RecoverConfig(teacher="base"),
        "rec_expert": RecoverConfig(teacher="expert"),
    }
    sft_baseline: SFTConfig | None = SFTConfig(data=["science+tooluse"], steps=100)
    eval: EvalSpec = EvalSpec()
    cka: CKASpec = CKASpec()
    lineage: str | None = Field(None, description="lineage root (path or URI); default home")
    report_dir: str = "runs/forgetting"


Log = Callable[[str], None]


def _same(lineage: Lineage, name: str, key: str, cfg: StrictModel, parent: str) -> bool:
    """Whether `name` is a finished run of this stage config on the current `parent`."""
    if not lineage.exists(name):
        return False
    meta = lineage.meta(name)
    if meta.config.get(key) != cfg.model_dump(mode="json") or parent not in meta.parents:
        return False
    return lineage.meta(parent).created_at <= meta.created_at  # ISO-8601 UTC: sortable


def run_stage(
    label: str, name: str, done: bool, work: Callable[[], Any], log: Log, timings: dict
) -> None:
    if done:
        log(f"── {label}: {name} is up to date (same config), skipped")
        timings[name] = 0.0
        return
    log(f"── {label}: {name}")
    t0 = time.perf_counter()
    work()
    timings[name] = time.perf_counter() - t0
    log(f"   {name} done in {timings[name]:.0f}s")


def prepare_base(
    model: str | None,
    world: WorldConfig | None,
    data_dir: str | None,
    lineage: Lineage,
    home: Path,
    log: Log,
) -> Path | None:
    """`base` in the lineage — imported from `model` (paper scale) or the tiny world, built or
    cached — and the task-data directory every later stage reads."""
    from sdftlab.world.build import build_world

    if model is not None:
        if not lineage.exists("base"):
            lineage.save_dir("base", Path(model), kind="import", config={"path": model})
        return Path(data_dir) if data_dir else None
    built = build_world(world or WorldConfig(), lineage, home, log=lambda m: log("   " + m))
    return Path(data_dir) if data_dir else built.data_dir


def run_forgetting(
    cfg: ForgettingConfig, lineage: Lineage, home: Path, log: Log = print
) -> dict[str, Any]:
    """Run (or resume) the pipeline; returns {'timings': ..., 'report': path}."""
    from sdftlab.cka.run import compare_states, load_examples
    from sdftlab.degrade.sft import run_sft
    from sdftlab.distill.sdft import recover
    from sdftlab.evaluate.run import default_task_files, evaluate_state
    from sdftlab.report import write_report

    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    # 1. base
    t0 = time.perf_counter()
    log("── stage 1/6 world: base")
    data_dir = prepare_base(cfg.model, cfg.world, cfg.data_dir, lineage, home, log)
    timings["base"] = time.perf_counter() - t0

    # 2-3. expert, forgot (SFT)
    for label, name, parent, sft in (
        ("stage 2/6 SFT science expert", "expert", "base", cfg.expert),
        ("stage 3/6 SFT tool use (forgetting)", "forgot", "expert", cfg.forget),
    ):
        run_stage(
            label,
            name,
            _same(lineage, name, "sft", sft, parent),
            lambda n=name, p=parent, s=sft: run_sft(
                lineage, p, n, s, data_dir=data_dir, log=lambda m: log("   " + m), overwrite=True
            ),
            log,
            timings,
        )

    # 4. recoveries and the plain-SFT baseline
    for name, rcfg in cfg.recover.items():
        run_stage(
            f"stage 4/6 SDFT t={rcfg.teacher}",
            name,
            _same(lineage, name, "recover", rcfg, "forgot"),
            lambda n=name, r=rcfg: recover(
                lineage, "forgot", n, r, data_dir=data_dir, log=lambda m: log("   " + m),
                overwrite=True,
            ),
            log,
            timings,
        )  # fmt: skip
    if cfg.sft_baseline is not None:
        run_stage(
            "stage 4/6 plain-SFT baseline (same prompts, gold answers)",
            "sft_baseline",
            _same(lineage, "sft_baseline", "sft", cfg.sft_baseline, "forgot"),
            lambda: run_sft(
                lineage, "forgot", "sft_baseline", cfg.sft_baseline, data_dir=data_dir,
                log=lambda m: log("   " + m), overwrite=True,
            ),
            log,
            timings,
        )  # fmt: skip

    states = ["base", "expert", "forgot", *cfg.recover]
    if cfg.sft_baseline is not None:
        states.append("sft_baseline")

    # 5. evaluation of every state (metrics recorded in the lineage)
    log(f"── stage 5/6 evaluation ({', '.join(cfg.eval.tasks)}, limit {cfg.eval.limit})")
    assert data_dir is not None
    files = default_task_files(data_dir, cfg.eval.tasks)
    t0 = time.perf_counter()
    for state in states:
        have = lineage.meta(state).metrics
        demo = state in cfg.eval.demonstration_for
        wanted = [f"{t}/acc" for t in cfg.eval.tasks]
        if all(k in have for k in wanted) and (not demo or "science/acc_demo" in have):
            continue
        log(f"   {state}")
        evaluate_state(
            lineage, state, files, with_demonstration=demo, limit=cfg.eval.limit,
            log=lambda m: log("   " + m),
        )  # fmt: skip
    timings["evaluation"] = time.perf_counter() - t0

    # 6. CKA against the reference, per layer
    log(f"── stage 6/6 CKA against {cfg.cka.reference} on {cfg.cka.data}")
    t0 = time.perf_counter()
    examples = load_examples(cfg.cka.data, data_dir, limit=cfg.cka.limit)
    cka_frames = {}
    for state in states:
        if state == cfg.cka.reference:
            continue
        cka_frames[state] = compare_states(
            lineage, state, cfg.cka.reference, examples, actors=cfg.cka.actors, record=True
        )
    timings["cka"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all
    report = write_report(
        Path(cfg.report_dir),
        lineage,
        states,
        cka_frames,
        reference=cfg.cka.reference,
        degraded="forgot",
        timings=timings,
        title=f"{cfg.name}: forgetting and SDFT recovery",
    )
    log(f"report: {report}")
    return {"timings": timings, "report": report}


def pipeline_main(config_model: type, run: Any, argv: list[str] | None, doc: str) -> int:
    """The `jobs/<pipeline>.py --config FILE [key=value ...]` entry point of every pipeline:
    load the config, open the lineage (its `lineage`, else the home's), run."""
    import argparse

    from sdftlab.config import load_config
    from sdftlab.errors import SdftlabError
    from sdftlab.world.build import sdftlab_home

    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--config", help=f"a {config_model.__name__} YAML (jobs/configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(config_model, args.config, args.overrides)
        home = sdftlab_home()
        run(cfg, Lineage(cfg.lineage or str(home / "lineage")), home)
    except SdftlabError as err:
        print(f"sdftlab: error: {err}")
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python jobs/forgetting.py --config FILE [key=value ...]`."""
    return pipeline_main(ForgettingConfig, run_forgetting, argv, __doc__ or "")
