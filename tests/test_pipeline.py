"""Pipelines: every job config validates; the forgetting pipeline runs, reports and resumes."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from sdftlab.config import WorldConfig, load_config
from sdftlab.errors import ConfigError, LineageError
from sdftlab.pipelines.compression import CompressionConfig, run_compression
from sdftlab.pipelines.forgetting import ForgettingConfig, run_forgetting
from sdftlab.sweep import SweepConfig, run_sweep, validate

REPO = Path(__file__).resolve().parents[1]
CONFIG_MODELS = {
    "world": WorldConfig,
    "forgetting": ForgettingConfig,
    "compression": CompressionConfig,
    "sweep": SweepConfig,
}


@pytest.mark.parametrize(
    "path", sorted((REPO / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_job_config_validates(path):
    kind = next(k for k in CONFIG_MODELS if path.name.startswith(k))
    load_config(CONFIG_MODELS[kind], path)


def test_every_job_config_has_a_known_kind():
    for path in (REPO / "jobs" / "configs").glob("*.yaml"):
        assert any(path.name.startswith(k) for k in CONFIG_MODELS), path.name


TINY_STAGES = [
    "expert.steps=4", "expert.batch_size=8", "expert.checkpoint_every=4",
    "forget.steps=4", "forget.batch_size=8", "forget.checkpoint_every=4",
    "sft_baseline.steps=2", "sft_baseline.batch_size=8",
    "eval.limit=8", "cka.limit=8",
]  # fmt: skip
TINY_RECOVER = (
    "recover={rec_expert: {teacher: expert, steps: 2, prompts_per_step: 4, "
    "rollout: {max_new_tokens: 8}, checkpoint_every: 2}}"
)


@pytest.mark.slow
def test_forgetting_pipeline_reports_and_skips_finished_stages(small_world, tmp_path):
    world, lineage, home = small_world
    cfg = load_config(
        ForgettingConfig,
        None,
        [*TINY_STAGES, TINY_RECOVER, f"report_dir={tmp_path / 'report'}"],
    ).model_copy(update={"world": world.config})
    lines: list[str] = []
    out = run_forgetting(cfg, lineage, home, log=lines.append)
    report = Path(out["report"])
    text = report.read_text()
    assert "## Task accuracy" in text and "rec_expert" in text and "ΔCKA" in text
    for figure in ("accuracy.png", "cka_by_layer.png", "misalignment_vs_accuracy.png"):
        assert (report.parent / figure).stat().st_size > 0
    results = pd.read_parquet(report.parent / "results.parquet")
    assert {"base", "expert", "forgot", "rec_expert", "sft_baseline"} <= set(results["state"])
    assert {"science/acc", "mmlu/acc", "cka/expert/last_layer"} <= set(results["metric"])
    assert lineage.meta("rec_expert").parents == ["forgot", "expert"]

    # Resubmitted with the same config: every training stage is skipped.
    lines.clear()
    again = run_forgetting(cfg, lineage, home, log=lines.append)
    skipped = [line for line in lines if "up to date" in line]
    assert len(skipped) == 4, lines  # expert, forgot, rec_expert, sft_baseline
    assert all(again["timings"][s] == 0.0 for s in ("expert", "forgot", "rec_expert"))


# ----------------------------------------------------------------------------- sweeps

SWEEP = [
    "name=t-sweep", "student=base",
    "recover={teacher: base, steps: 1, prompts_per_step: 2, data: [science], checkpoint_every: 1, "
    "rollout: {engine: hf, max_new_tokens: 6}}",
    "eval_tasks=[science]", "eval_limit=4", "cka_limit=4", "cka_reference=base",
    "scheduler.type=fifo",
]  # fmt: skip


def test_unknown_search_space_type_is_rejected():
    with pytest.raises(ConfigError, match="unknown search-space type 'gaussian'"):
        load_config(SweepConfig, None, [*SWEEP, "space={lr: {type: gaussian, low: 1, high: 2}}"])


def test_sweep_teacher_and_metric_are_checked_before_trials(small_world):
    _, lineage, _ = small_world
    cfg = load_config(
        SweepConfig, None, [*SWEEP, "space={teacher: {type: grid, values: [base, nope]}}"]
    )
    with pytest.raises(LineageError, match="nope"):
        validate(cfg, lineage)
    cfg = load_config(
        SweepConfig, None, [*SWEEP, "space={lr: {type: grid, values: [0.1]}}", "metric=bleu"]
    )
    with pytest.raises(ConfigError, match="metric 'bleu' is reported by no trial"):
        validate(cfg, lineage)


@pytest.mark.slow
def test_sweep_runs_reports_and_restores_without_rerunning_finished_trials(small_world, tmp_path):
    world, lineage, _ = small_world
    cfg = load_config(
        SweepConfig,
        None,
        [*SWEEP, "space={lr: {type: grid, values: [0.001, 0.01]}}", f"out_dir={tmp_path}"],
    )
    out = run_sweep(cfg, lineage, world.data_dir, log=lambda _: None)
    trials = pd.read_parquet(out / "trials.parquet")
    assert len(trials) == 2 and {"lr", "science/acc", "cka/base/last_layer"} <= set(trials.columns)
    assert "recover:" in (out / "best_recover.yaml").read_text()
    states = [n for n in lineage.names() if n.startswith("t-sweep-")]
    created = {n: lineage.meta(n).created_at for n in states}
    assert len(states) == 2

    # Run again: the sweep is restored and its finished trials are not run again.
    run_sweep(cfg, lineage, world.data_dir, log=lambda _: None)
    assert {n: lineage.meta(n).created_at for n in states} == created
    assert len(pd.read_parquet(out / "trials.parquet")) == 2


@pytest.mark.slow
def test_an_interrupted_sweep_restores_without_rerunning_its_finished_trial(
    small_world, tmp_path, monkeypatch
):
    """The sweep's process is killed after its first trial finished; `sdftlab sweep` again
    restores it (Tuner.restore): the finished trial is kept, the others run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import ray
    import yaml

    world, lineage, home = small_world
    cfg = load_config(
        SweepConfig,
        None,
        [
            *SWEEP, "name=t-interrupted", f"out_dir={tmp_path / 'out'}",
            "space={lr: {type: grid, values: [0.001, 0.002, 0.004]}}",
        ],
    )  # fmt: skip
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    storage = tmp_path / "ray_results"
    monkeypatch.setenv("SDFTLAB_STORAGE", str(storage))
    ray.shutdown()
    cmd = [sys.executable, "-m", "sdftlab.cli", "--home", str(home), "--lineage", str(lineage.root)]
    proc = subprocess.Popen(
        [*cmd, "sweep", str(path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip

    def finished() -> list[str]:
        return [
            n for n in lineage.names()
            if n.startswith("t-interrupted-") and "cka/base/last_layer" in lineage.meta(n).metrics
        ]  # fmt: skip

    try:
        deadline = time.time() + 600
        while not finished() and time.time() < deadline and proc.poll() is None:
            time.sleep(2)
        assert finished(), "no trial finished before the deadline"
        time.sleep(20)  # let Tune persist the experiment state
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait()
    first = finished()
    assert 1 <= len(first) < 3
    created = {n: lineage.meta(n).created_at for n in first}

    run_sweep(cfg, lineage, world.data_dir, log=lambda _: None)
    assert {n: lineage.meta(n).created_at for n in first} == created  # not run again
    assert len(finished()) == 3
    assert len(pd.read_parquet(tmp_path / "out" / "trials.parquet")) == 3


@pytest.mark.slow
def test_compression_pipeline_runs_end_to_end_and_reports(small_world, tmp_path):
    world, lineage, home = small_world
    tiny = "steps: 2, prompts_per_step: 4, checkpoint_every: 2, rollout: {max_new_tokens: 8"
    cfg = load_config(
        CompressionConfig,
        None,
        [
            "expert.steps=4", "expert.batch_size=8", "expert.checkpoint_every=4",
            "prune.multiple_of=32", "prune.ratio=0.25", "eval.limit=8", "cka.limit=8",
            f"recover_nf4={{teacher: expert, {tiny}, engine: hf}}, lora: {{r: 4}}}}",
            f"recover_pruned={{teacher: expert, {tiny}}}}}",
            f"report_dir={tmp_path / 'report'}",
        ],
    ).model_copy(update={"world": world.config})  # fmt: skip
    out = run_compression(cfg, lineage, home, log=lambda _: None)
    text = Path(out["report"]).read_text()
    assert "nf4_rec" in text and "pruned_rec" in text
    results = pd.read_parquet(Path(out["report"]).parent / "results.parquet")
    assert {"nf4", "nf4_rec", "pruned", "pruned_rec"} <= set(results["state"])
    assert lineage.load_model("pruned_rec").config.intermediate_size == 96
    assert lineage.meta("nf4_rec").parents == ["nf4", "expert"]
