"""Ray Tune sweeps over teacher choice, pruning ratio, learning rate and loss, with CKA as a
cheap selection signal.

Each trial: (prune `prune_from` at `prune_ratio`) → SDFT recovery of the student with the
trial's teacher / lr / loss → evaluation → CKA of the result against the reference on a small
shard. A trial reports once, at its end; the scheduler (ASHA by default) ranks trials on the
metric the config names, which may be the CKA itself (`cka/<ref>/last_layer`): the paper's
open question of whether alignment can stand in for expensive evaluation.

An interrupted sweep resumes with `Tuner.restore` semantics: finished trials are not run
again. Results: `trials.parquet` (one row per trial), `best_recover.yaml` (a ready-to-run
`recover:` config), `tradeoff.png` (task accuracy vs general capability), and the Spearman
rank correlation between CKA and accuracy across trials (printed and in `summary.json`).

    sdftlab sweep jobs/configs/sweep_teacher_lr.yaml
    ray job submit --working-dir . -- python jobs/sweep.py jobs/configs/sweep_teacher_lr.yaml
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from sdftlab.config import StrictModel
from sdftlab.distill.sdft import RecoverConfig
from sdftlab.errors import ConfigError
from sdftlab.lineage import Lineage
from sdftlab.specs import CKASpec, EvalSpec

SPACE_TYPES = ("grid", "choice", "loguniform", "uniform")
# what a trial's parameters may set (RecoverConfig fields, dotted) besides the prune ratio
TRIAL_KEYS = ("teacher", "lr", "loss.kind", "loss.beta", "teacher_context", "steps", "prune_ratio")


class SearchDim(StrictModel):
    type: str
    values: list[Any] | None = None
    low: float | None = None
    high: float | None = None

    @model_validator(mode="after")
    def _shape(self) -> SearchDim:
        if self.type not in SPACE_TYPES:
            raise ValueError(f"unknown search-space type {self.type!r}; use one of {SPACE_TYPES}")
        if self.type in ("grid", "choice") and not self.values:
            raise ValueError(f"type {self.type} needs a non-empty `values` list")
        if self.type in ("loguniform", "uniform") and (self.low is None or self.high is None):
            raise ValueError(f"type {self.type} needs `low` and `high`")
        return self


class SchedulerSpec(StrictModel):
    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, gt=0)
    reduction_factor: float = Field(2.0, gt=1)


class SweepConfig(StrictModel):
    name: str = "sweep"
    student: str = "forgot"
    prune_from: str | None = Field(None, description="state pruned per trial at prune_ratio")
    recover: RecoverConfig = RecoverConfig(steps=20, prompts_per_step=8)
    space: dict[str, SearchDim]
    num_samples: int = Field(1, gt=0, description="samples per grid point")
    metric: str = "science/acc"
    mode: Literal["max", "min"] = "max"
    scheduler: SchedulerSpec = SchedulerSpec()
    eval: EvalSpec = EvalSpec(limit=50)
    cka: CKASpec = CKASpec(reference="expert", limit=16)
    max_concurrent_trials: int = Field(1, gt=0)
    cpus_per_trial: float = Field(
        0.01, gt=0, description="the trial driver itself; its Ray Train workers ask for their own"
    )
    lineage: str | None = None
    out_dir: str = "runs/sweep"

    @model_validator(mode="after")
    def _keys(self) -> SweepConfig:
        unknown = sorted(set(self.space) - set(TRIAL_KEYS))
        if unknown:
            raise ValueError(f"space has unknown keys {unknown}; use some of {list(TRIAL_KEYS)}")
        if "prune_ratio" in self.space and self.prune_from is None:
            raise ValueError("space.prune_ratio needs prune_from (the state to prune)")
        return self

    def reported_metrics(self) -> set[str]:
        """Every metric a trial reports (what `metric` may name)."""
        out = {f"{t}/acc" for t in self.eval.tasks}
        out |= {f"cka/{self.cka.reference}/{k}" for k in ("last_layer", "mean_over_layers")}
        return out | {"sdft/loss", "sdft/seconds"}


def param_space(cfg: SweepConfig) -> dict[str, Any]:
    from ray import tune

    build = {
        "grid": lambda d: tune.grid_search(d.values),
        "choice": lambda d: tune.choice(d.values),
        "loguniform": lambda d: tune.loguniform(d.low, d.high),
        "uniform": lambda d: tune.uniform(d.low, d.high),
    }
    return {key: build[dim.type](dim) for key, dim in cfg.space.items()}


def validate(cfg: SweepConfig, lineage: Lineage) -> None:
    """Reject, before any trial starts: unknown teachers/states and a metric no trial reports."""
    lineage.require(cfg.student)
    if cfg.prune_from:
        lineage.require(cfg.prune_from)
    teachers = set(cfg.space["teacher"].values or []) if "teacher" in cfg.space else set()
    for teacher in teachers | {cfg.recover.teacher}:
        if teacher not in ("ema", "live"):
            lineage.resolve(teacher)  # raises with the known states
    if cfg.metric not in cfg.reported_metrics():
        raise ConfigError(
            f"metric {cfg.metric!r} is reported by no trial; use one of "
            f"{sorted(cfg.reported_metrics())}"
        )


def _trial_recover_config(base: RecoverConfig, params: dict[str, Any]) -> RecoverConfig:
    data = base.model_dump(mode="json")
    for key, value in params.items():
        if key == "prune_ratio":
            continue
        node = data
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return RecoverConfig.model_validate(data)


def run_trial(params: dict[str, Any], *, cfg_json: str, root: str, data_dir: str | None) -> None:
    """One Tune trial (a function trainable): prune → recover → eval → CKA → one report."""
    import ray.tune

    from sdftlab.cka.run import compare_states, load_examples, reference_label, summary_metrics
    from sdftlab.degrade.prune import prune_state
    from sdftlab.distill.sdft import recover
    from sdftlab.evaluate.run import default_task_files, evaluate_state

    cfg = SweepConfig.model_validate_json(cfg_json)
    lineage = Lineage(root)
    directory = Path(data_dir) if data_dir else None
    trial = ray.tune.get_context().get_trial_id()
    student = cfg.student
    if "prune_ratio" in params:
        student = f"{cfg.name}-{trial}-pruned"
        prune_state(lineage, cfg.prune_from, student, float(params["prune_ratio"]), overwrite=True)
    rcfg = _trial_recover_config(cfg.recover, params)
    name = f"{cfg.name}-{trial}"
    meta = recover(lineage, student, name, rcfg, data_dir=directory, overwrite=True)
    assert directory is not None
    metrics = evaluate_state(
        lineage,
        name,
        default_task_files(directory, cfg.eval.tasks),
        limit=cfg.eval.limit,
        engine=cfg.eval.generation,
        log=lambda _: None,
    )
    examples = load_examples(cfg.cka.data, directory, limit=cfg.cka.limit)
    df = compare_states(lineage, name, cfg.cka.reference, examples, record=True)
    metrics |= summary_metrics(df, reference_label(lineage, cfg.cka.reference))
    metrics |= {k: v for k, v in meta.metrics.items() if k in ("sdft/loss", "sdft/seconds")}
    ray.tune.report({**metrics, "state": name})


def run_sweep(cfg: SweepConfig, lineage: Lineage, data_dir: Path | None, log=print) -> Path:
    """Run (or resume) the sweep; write the results; returns the output directory."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from sdftlab.paths import storage_path
    from sdftlab.raycluster import ensure_ray

    validate(cfg, lineage)
    ensure_ray()
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            cfg_json=cfg.model_dump_json(),
            root=str(lineage.root),
            data_dir=str(data_dir) if data_dir else None,
        ),
        {"CPU": cfg.cpus_per_trial},
    )
    exp_dir = os.path.join(storage_path(), f"{cfg.name}-{cfg.stable_hash()[:8]}")
    if tune.Tuner.can_restore(exp_dir):
        log(f"resuming sweep {exp_dir}: finished trials are kept, not run again")
        tuner = tune.Tuner.restore(exp_dir, trainable=trainable, resume_errored=True)
    else:
        scheduler = (
            ASHAScheduler(
                grace_period=cfg.scheduler.grace_period,
                reduction_factor=cfg.scheduler.reduction_factor,
            )
            if cfg.scheduler.type == "asha"
            else FIFOScheduler()
        )
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(cfg),
            tune_config=tune.TuneConfig(
                metric=cfg.metric,
                mode=cfg.mode,
                scheduler=scheduler,
                num_samples=cfg.num_samples,
                max_concurrent_trials=cfg.max_concurrent_trials,
            ),
            run_config=tune.RunConfig(name=Path(exp_dir).name, storage_path=storage_path()),
        )
    grid = tuner.fit()
    df = grid.get_dataframe()
    return write_results(cfg, df, Path(cfg.out_dir), log)


def spearman(x: list[float], y: list[float]) -> float:
    import pandas as pd

    if len(x) < 3:
        return math.nan
    return float(pd.Series(x).rank().corr(pd.Series(y).rank()))


def write_results(cfg: SweepConfig, df, out_dir: Path, log=print) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cka_col = f"cka/{cfg.cka.reference}/last_layer"
    task_col = cfg.metric if not cfg.metric.startswith("cka/") else "science/acc"
    general = [c for c in ("mmlu/acc", "winogrande/acc") if c in df.columns]
    done = df.dropna(subset=[c for c in (cka_col, task_col) if c in df.columns])
    rho = spearman(done[cka_col].tolist(), done[task_col].tolist()) if len(done) else math.nan
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".sweep-", dir=out_dir))
    try:
        keep = [c for c in df.columns if c.startswith(("config/", "sdft/", "cka/")) or "/acc" in c]
        table = df[["trial_id", *keep]].rename(columns=lambda c: c.removeprefix("config/"))
        table.to_parquet(tmp / "trials.parquet", index=False)
        best = df.sort_values(cfg.metric, ascending=cfg.mode == "min").iloc[0]
        params = {k.removeprefix("config/"): best[k] for k in df.columns if k.startswith("config/")}
        best_cfg = _trial_recover_config(cfg.recover, {k: _plain(v) for k, v in params.items()})
        (tmp / "best_recover.yaml").write_text(
            yaml.safe_dump({"recover": best_cfg.model_dump(mode="json")}, sort_keys=False)
        )
        summary = {"trials": len(df), "spearman_cka_vs_accuracy": rho, "best": params}
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        if general:
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.scatter(done[task_col] * 100, done[general].mean(axis=1) * 100)
            for _, row in done.iterrows():
                label = ", ".join(
                    f"{k.removeprefix('config/')}={row[k]}"
                    for k in df.columns
                    if k.startswith("config/")
                )
                ax.annotate(label, (row[task_col] * 100, row[general].mean() * 100), fontsize=7)
            ax.set_xlabel(f"{task_col} (%)")
            ax.set_ylabel("general capability (%, mean of " + ", ".join(general) + ")")
            ax.set_title("task accuracy vs general capability over trials")
            fig.tight_layout()
            fig.savefig(tmp / "tradeoff.png", dpi=120)
            plt.close(fig)
        for f in tmp.iterdir():
            os.replace(f, out_dir / f.name)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    log(table.to_string(index=False))
    log(f"Spearman rank correlation, {cka_col} vs {task_col} over {len(done)} trials: {rho:.3f}")
    return out_dir


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value
