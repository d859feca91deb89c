"""Ray Tune sweeps over teacher choice, pruning ratio, learning rate and loss, with CKA as a
live, cheap selection signal.

Each trial: (prune `prune_from` at `prune_ratio`) → SDFT recovery of the student with the
trial's teacher / lr / loss → evaluation → CKA of the result against the reference on a small
shard. While it recovers, the trial measures live CKA against the same reference on the same
shard every `recover.live_cka.every` steps (`sdftlab.cka.live`; the last measurement equals
the final offline CKA). When the sweep's `metric` is a live one
(``live_cka/<ref>/last_layer`` or ``mean_over_layers``), every measurement is a Tune report
(Ray Train's reports forwarded by `TuneReportCallback`), so ASHA — on the trial's optimizer
step, from `scheduler.grace_period` steps — stops the trials whose alignment lags: the paper's
open question of whether alignment can stand in for expensive evaluation, put to work. With
an end-of-trial metric (task accuracy) a trial reports once, at its end, and ASHA can stop
nothing (the sweep says so).

An interrupted sweep resumes with `Tuner.restore` semantics: finished trials are not run
again. Results: `trials.parquet` (one row per trial: parameters, steps run, metrics),
`live_cka.parquet` (every trial's live CKA, step by step), `best_recover.yaml` (a
ready-to-run `recover:` config), `tradeoff.png` (task accuracy vs general capability), and in
`summary.json` (and printed): the Spearman rank correlation of CKA — final, and at the first
measurement — with the task accuracy across trials (with a 95% Fisher-z interval and p from 4
trials up), the trial each would select against the one accuracy selects, whether that trial
scores within the best trial's 95% interval (and how often a random pick does), and the
trial-steps run against a FIFO sweep's.

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
from sdftlab.distill.config import RecoverConfig
from sdftlab.errors import ConfigError
from sdftlab.lineage import Lineage
from sdftlab.specs import CKASpec, EvalSpec
from sdftlab.tracking import TrackingSpec
from sdftlab.world.config import WorldConfig

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
    grace_period: int | None = Field(
        None,
        gt=0,
        description="optimizer steps a trial runs before ASHA may stop it; None: its first "
        "live CKA measurement (recover.live_cka.every)",
    )
    reduction_factor: float = Field(2.0, gt=1)


class SweepConfig(StrictModel):
    name: str = "sweep"
    student: str = "forgot"
    prune_from: str | None = Field(None, description="state pruned per trial at prune_ratio")
    data_dir: str | None = Field(None, description="task files; default the current world's")
    task_data: WorldConfig | None = Field(
        None, description="the tiny world's task files without its model (an imported model's)"
    )
    recover: RecoverConfig = RecoverConfig(steps=20, prompts_per_step=8)
    space: dict[str, SearchDim] = Field(
        min_length=1, description="the parameters the trials vary (e.g. lr: {grid: [...]})"
    )
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
    tracking: TrackingSpec = TrackingSpec()  # one MLflow run per trial (Ray Tune's logger)

    @model_validator(mode="after")
    def _keys(self) -> SweepConfig:
        unknown = sorted(set(self.space) - set(TRIAL_KEYS))
        if unknown:
            raise ValueError(f"space has unknown keys {unknown}; use some of {list(TRIAL_KEYS)}")
        if "prune_ratio" in self.space and self.prune_from is None:
            raise ValueError("space.prune_ratio needs prune_from (the state to prune)")

        if self.metric.startswith("live_cka/") and self.recover.live_cka.every == 0:
            raise ValueError(f"metric {self.metric} needs recover.live_cka.every > 0")
        return self

    def live_metrics(self) -> set[str]:
        """The metrics a trial reports while it trains (what ASHA can stop trials on)."""
        return {f"live_cka/{self.cka.reference}/{k}" for k in ("last_layer", "mean_over_layers")}

    def reported_metrics(self) -> set[str]:
        """Every metric a trial reports (what `metric` may name)."""
        out = {f"{t}/acc" for t in self.eval.tasks}
        out |= {f"cka/{self.cka.reference}/{k}" for k in ("last_layer", "mean_over_layers")}
        return out | self.live_metrics() | {"sdft/loss", "sdft/seconds"}

    @property
    def reports_live(self) -> bool:
        return self.metric in self.live_metrics()

    def trial_steps(self) -> int:
        """The longest trial's optimizer steps (ASHA's horizon)."""
        steps = self.space.get("steps")
        return int(max(steps.values or [0])) if steps else self.recover.steps


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


def _trial_recover_config(cfg: SweepConfig, params: dict[str, Any]) -> RecoverConfig:
    """The trial's recovery: the sweep's, the trial's parameters set, and live CKA on the
    shard and against the reference of the sweep's final CKA (so its last value is that)."""
    data = cfg.recover.model_dump(mode="json")
    data["live_cka"] |= {"reference": cfg.cka.reference, "data": cfg.cka.data,
                         "rows": cfg.cka.limit}  # fmt: skip
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
    """One Tune trial (a function trainable): prune → recover (reporting each live CKA
    measurement when the metric is live) → eval → CKA → the final report."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from sdftlab.cka.run import compare_states, load_examples, summary_metrics
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
    rcfg = _trial_recover_config(cfg, params)
    name = f"{cfg.name}-{trial}"
    callbacks = [TuneReportCallback()] if cfg.reports_live else []
    meta = recover(lineage, student, name, rcfg, data_dir=directory, overwrite=True,
                   callbacks=callbacks)  # fmt: skip
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
    metrics |= summary_metrics(df, lineage.label(cfg.cka.reference))
    keep = ("sdft/loss", "sdft/seconds")
    metrics |= {k: v for k, v in meta.metrics.items() if k in keep or k.startswith("live_cka/")}
    ray.tune.report({**metrics, "step": rcfg.steps, "state": name})


def run_sweep(cfg: SweepConfig, lineage: Lineage, data_dir: Path | None, log=print) -> Path:
    """Run (or resume) the sweep; write the results; returns the output directory."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from sdftlab.paths import sdftlab_home, storage_path
    from sdftlab.raycluster import ensure_ray
    from sdftlab.tracking import tune_callback

    validate(cfg, lineage)
    data_dir = sweep_data_dir(cfg, data_dir)
    ensure_ray()
    if cfg.scheduler.type == "asha" and not cfg.reports_live:
        log(f"ASHA sees {cfg.metric} only when a trial ends, so it can stop no trial early; "
            f"a live metric ({' or '.join(sorted(cfg.live_metrics()))}) lets it")  # fmt: skip
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
        grace = cfg.scheduler.grace_period or cfg.recover.live_cka.every or cfg.trial_steps()
        scheduler = (
            ASHAScheduler(
                time_attr="step",  # the trial's optimizer steps, as its reports count them
                max_t=cfg.trial_steps(),
                grace_period=min(grace, cfg.trial_steps()),
                reduction_factor=cfg.scheduler.reduction_factor,
                stop_last_trials=False,  # a trial at its last step goes on to its evaluation
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
            run_config=tune.RunConfig(
                name=Path(exp_dir).name,
                storage_path=storage_path(),
                callbacks=tune_callback(cfg.tracking, sdftlab_home(), cfg.name),
            ),
        )
    grid = tuner.fit()
    df = grid.get_dataframe()
    if df.empty or "trial_id" not in df:
        errors = [str(r.error).splitlines()[-1] for r in grid if r.error is not None][:1]
        raise RuntimeError(f"no trial reported a result (first error: {errors}); the trials' "
                           f"logs and error files are under {exp_dir}")  # fmt: skip
    return write_results(cfg, df, live_history(cfg, grid, lineage), Path(cfg.out_dir), log)


def sweep_data_dir(cfg: SweepConfig, current: Path | None) -> Path | None:
    """The task files: `data_dir`, else `task_data` (built once, cached), else the world's."""
    if cfg.data_dir is not None:
        return Path(cfg.data_dir)
    if cfg.task_data is not None:
        from sdftlab.paths import sdftlab_home
        from sdftlab.world.build import build_world_data

        return build_world_data(cfg.task_data, sdftlab_home())
    return current


def live_history(cfg: SweepConfig, grid: Any, lineage: Lineage) -> Any:
    """Every trial's live CKA measurements, one row per (trial, step): from its reports to
    Tune (a live metric), and from its saved state's `live_cka.json` (a finished trial)."""
    import pandas as pd

    from sdftlab.train.checkpoint import LIVE_CKA_FILE

    columns = ["trial_id", "step", *sorted(cfg.live_metrics())]
    frames = []
    for result in grid:
        reported = result.metrics_dataframe
        if reported is not None and set(columns) <= set(reported.columns):
            frames.append(reported[columns].dropna())
        state = (result.metrics or {}).get("state")
        if state and lineage.exists(state):
            saved = lineage.local_path(state) / LIVE_CKA_FILE
            if saved.is_file():
                rows = pd.DataFrame(json.loads(saved.read_text()))
                rows["trial_id"] = result.metrics["trial_id"]
                frames.append(rows[[c for c in columns if c in rows]])
    if not frames:
        return pd.DataFrame(columns=columns)
    history = pd.concat(frames, ignore_index=True).drop_duplicates(subset=["trial_id", "step"])
    return history.sort_values(["trial_id", "step"], ignore_index=True)


def spearman(x: list[float], y: list[float]) -> float:
    import pandas as pd

    if len(x) < 3:
        return math.nan
    return float(pd.Series(x).rank().corr(pd.Series(y).rank()))


def selection(cfg: SweepConfig, df: Any, history: Any) -> dict[str, Any]:
    """Whether CKA could stand in for evaluation, on this sweep: its rank correlation with the
    task accuracy (final CKA, and live CKA at the first measurement), the trial each selects
    against the one the accuracy selects, and the trial-steps run against a FIFO sweep's."""
    acc_col = cfg.metric if cfg.metric.endswith("/acc") else f"{cfg.eval.tasks[0]}/acc"
    cka_col = f"cka/{cfg.cka.reference}/last_layer"
    live_col = f"live_cka/{cfg.cka.reference}/last_layer"
    finished = df.dropna(subset=[c for c in (acc_col, cka_col) if c in df.columns])
    out: dict[str, Any] = {"trials": len(df), "finished": len(finished), "accuracy": acc_col}
    if acc_col in finished and finished[acc_col].nunique() < 2:
        out["accuracy_ties"] = True  # every trial scored the same: accuracy ranks nothing
    elif acc_col in finished and cka_col in finished:
        out["spearman_cka_vs_accuracy"] = spearman(
            finished[cka_col].tolist(), finished[acc_col].tolist()
        )
        out["best_by_accuracy"] = _argmax(finished, acc_col)
        out["best_by_cka"] = _argmax(finished, cka_col)
        out["cka_picks_best"] = out["best_by_cka"] == out["best_by_accuracy"]
        out |= _interval("cka_vs_accuracy", finished[cka_col], finished[acc_col])
        out |= _near_best(finished, acc_col, out["best_by_cka"], "cka")
    if len(history):
        first, last = int(history["step"].min()), int(history["step"].max())
        early = history[history["step"] == first].set_index("trial_id")[live_col]
        final = history[history["step"] == last].set_index("trial_id")[live_col]
        out["first_measurement_step"] = first
        out["best_by_early_cka"] = str(early.idxmax())
        both_cka = final.index.intersection(early.index)
        out["spearman_early_vs_final_cka"] = spearman(
            early[both_cka].tolist(), final[both_cka].tolist()
        )
        if "best_by_accuracy" in out:
            both = finished.set_index("trial_id")
            both = both[both.index.isin(early.index)]
            out["spearman_early_cka_vs_accuracy"] = spearman(
                early[both.index].tolist(), both[acc_col].tolist()
            )
            out |= _interval("early_cka_vs_accuracy", early[both.index], both[acc_col])
            out["early_cka_picks_best"] = out["best_by_early_cka"] == out["best_by_accuracy"]
            out |= _near_best(finished, acc_col, out["best_by_early_cka"], "early_cka")
    planned = df["config/steps"] if "config/steps" in df else [cfg.recover.steps] * len(df)
    planned = [int(x) for x in planned]
    if "step" in df:
        out["trial_steps_run"] = int(df["step"].fillna(0).sum())
        out["trial_steps_fifo"] = sum(planned)
        out["steps_saved"] = 1 - out["trial_steps_run"] / max(out["trial_steps_fifo"], 1)
    if "first_measurement_step" in out and "trial_steps_fifo" in out:
        k = out["first_measurement_step"]
        chosen = planned[list(df["trial_id"]).index(out["best_by_early_cka"])]
        cost = sum(min(k, n) for n in planned) + max(chosen - k, 0)
        out["steps_saved_selecting_by_early_cka"] = 1 - cost / max(out["trial_steps_fifo"], 1)
    return out


def _interval(name: str, x: Any, y: Any) -> dict[str, Any]:
    """Spearman's r of x and y with its 95% Fisher-z interval and p, from 4 trials up."""
    import numpy as np

    from sdftlab.stats import correlation

    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(xs) < 4 or np.ptp(xs) == 0 or np.ptp(ys) == 0:
        return {}
    c = correlation(xs, ys, "spearman")
    return {f"spearman_{name}_ci": [c.low, c.high], f"spearman_{name}_p": c.p_value}


def _near_best(finished: Any, acc_col: str, picked: str, by: str) -> dict[str, Any]:
    """Whether the trial `picked` (by CKA) scores within the best trial's 95% Wilson interval
    over its eval rows, and how often a trial drawn at random does."""
    from sdftlab.stats import wilson_interval

    n_col = acc_col.replace("/acc", "/n")
    if n_col not in finished:
        return {}
    best = finished.loc[finished[acc_col].idxmax()]
    low, _ = wilson_interval(best[acc_col] * best[n_col], best[n_col])
    chosen = finished.set_index("trial_id").loc[picked, acc_col]
    return {
        "best_accuracy_ci_low": low,
        f"{by}_pick_within_best_ci": bool(chosen >= low),
        "random_pick_within_best_ci": float((finished[acc_col] >= low).mean()),
    }


def _argmax(df: Any, column: str) -> str:
    return str(df.loc[df[column].idxmax(), "trial_id"])


def write_results(cfg: SweepConfig, df: Any, history: Any, out_dir: Path, log=print) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = selection(cfg, df, history)
    task_col = summary["accuracy"]
    general = [c for c in ("mmlu/acc", "winogrande/acc") if c in df.columns]
    done = df.dropna(subset=[task_col]) if task_col in df else df
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".sweep-", dir=out_dir))
    try:
        keep = [
            c
            for c in df.columns
            if c.startswith(("config/", "sdft/", "cka/", "live_cka/")) or "/acc" in c
        ]
        steps = ["step"] if "step" in df else []
        table = df[["trial_id", *steps, *keep]].rename(
            columns=lambda c: {"step": "steps_run"}.get(c, c.removeprefix("config/"))
        )
        table.to_parquet(tmp / "trials.parquet", index=False)
        history.to_parquet(tmp / "live_cka.parquet", index=False)
        ranked = df.dropna(subset=[cfg.metric]) if cfg.metric in df else df
        best = ranked.sort_values(cfg.metric, ascending=cfg.mode == "min").iloc[0]
        params = {k.removeprefix("config/"): best[k] for k in df.columns if k.startswith("config/")}
        best_cfg = _trial_recover_config(cfg, {k: _plain(v) for k, v in params.items()})
        (tmp / "best_recover.yaml").write_text(
            yaml.safe_dump({"recover": best_cfg.model_dump(mode="json")}, sort_keys=False)
        )
        summary["best"] = params
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
    for line in summary_lines(summary):
        log(line)
    return out_dir


def summary_lines(s: dict[str, Any]) -> list[str]:
    """The selection summary, in words."""
    lines = []
    if s.get("accuracy_ties"):
        lines.append(f"every finished trial scored the same {s['accuracy']}: it ranks nothing")
    if "spearman_early_vs_final_cka" in s:
        lines.append(
            f"Spearman, live CKA at step {s['first_measurement_step']} vs at the last "
            f"measurement: {s['spearman_early_vs_final_cka']:.3f}"
        )
    if "spearman_cka_vs_accuracy" in s:
        lines.append(
            f"Spearman, final CKA vs {s['accuracy']} over {s['finished']} finished "
            f"trials: {s['spearman_cka_vs_accuracy']:.3f}"
        )
    if "spearman_early_cka_vs_accuracy" in s:
        lines.append(
            f"Spearman, live CKA at step {s['first_measurement_step']} vs "
            f"{s['accuracy']}: {s['spearman_early_cka_vs_accuracy']:.3f}"
        )
    for name, what in (("cka_vs_accuracy", "final CKA"), ("early_cka_vs_accuracy", "early CKA")):
        if f"spearman_{name}_ci" in s:
            low, high = s[f"spearman_{name}_ci"]
            lines.append(f"  ({what}: 95% CI {low:.2f} to {high:.2f}, p = "
                         f"{s[f'spearman_{name}_p']:.2g})")  # fmt: skip
    for by, what in (("cka", "final CKA"), ("early_cka", "early CKA")):
        if f"{by}_pick_within_best_ci" in s:
            verdict = "within" if s[f"{by}_pick_within_best_ci"] else "below"
            lines.append(f"the trial {what} picks scores {verdict} the best trial's 95% "
                         f"interval; a trial picked at random does "
                         f"{s['random_pick_within_best_ci']:.0%} of the time")  # fmt: skip
    if "best_by_accuracy" in s:
        lines.append(
            f"best by {s['accuracy']}: {s['best_by_accuracy']}; by final CKA: "
            f"{s['best_by_cka']}; by early CKA: {s.get('best_by_early_cka', '—')}"
        )
    if "trial_steps_run" in s:
        lines.append(
            f"trial-steps run: {s['trial_steps_run']} of {s['trial_steps_fifo']} a "
            f"FIFO sweep runs ({s['steps_saved']:.0%} saved)"
        )
    if "steps_saved_selecting_by_early_cka" in s:
        lines.append(
            "selecting by the first live CKA and finishing that trial alone would "
            f"save {s['steps_saved_selecting_by_early_cka']:.0%} of the trial-steps"
        )
    return lines


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value
