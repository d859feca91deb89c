"""Pipelines: every job config validates, bad graphs are rejected before any work, and the
forgetting, compression and small-model pipelines run, report and resume on a small world."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from sdftlab import provenance, runs
from sdftlab.config import load_config
from sdftlab.errors import ConfigError, LineageError
from sdftlab.pipelines.graph import PipelineConfig, main, needs_evaluation, order, run_pipeline
from sdftlab.sweep import SweepConfig, run_sweep, validate
from sdftlab.world.config import WorldConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "jobs" / "configs"
CONFIG_MODELS = {
    "world": WorldConfig,
    "forgetting": PipelineConfig,
    "compression": PipelineConfig,
    "small_model": PipelineConfig,
    "sweep": SweepConfig,
}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_job_config_validates(path):
    kind = next(k for k in CONFIG_MODELS if path.name.startswith(k))
    load_config(CONFIG_MODELS[kind], path)


def test_every_job_config_has_a_known_kind_and_every_pipeline_a_job():
    for path in CONFIGS.glob("*.yaml"):
        kind = next((k for k in CONFIG_MODELS if path.name.startswith(k)), None)
        assert kind is not None, path.name
        if CONFIG_MODELS[kind] is PipelineConfig:
            assert (REPO / "jobs" / f"{kind}.py").is_file(), path.name


def test_stages_run_in_dependency_order_whatever_the_file_order():
    cfg = load_config(
        PipelineConfig,
        None,
        [
            "stages={rec: {kind: sdft, from: forgot, teacher: expert}, "
            "forgot: {kind: sft, from: expert}, expert: {kind: sft, from: base}, "
            "base: {kind: world}}",
            "cka.reference=expert",
        ],
    )
    assert order(cfg.stages) == ["base", "expert", "forgot", "rec"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("stages.rec_base.teacher=exprt", "stage 'rec_base': teacher 'exprt' is made by no stage"),
        ("stages.forgot.from=forgotten", "stage 'forgot': from 'forgotten' is made by no stage"),
        ("stages.expert.from=forgot", "stages form a cycle: expert → forgot → expert"),
        ("stages.expert.kind=distil", "stages.expert: unknown 'kind' 'distil'"),
        ("cka.reference=nope", "cka.reference names 'nope', which no stage makes"),
        ("stages.expert.steps=0", "stages.expert.steps: Input should be greater than 0"),
    ],
)
def test_a_bad_graph_is_rejected_with_the_offending_name(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PipelineConfig, CONFIGS / "forgetting.yaml", [override])


def test_a_bad_graph_fails_the_job_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SDFTLAB_HOME", str(tmp_path))
    code = main(["stages.rec_expert.teacher=nobody"], CONFIGS / "forgetting.yaml", "forgetting")
    assert code == 2
    assert "teacher 'nobody' is made by no stage" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no world built, no lineage written


def test_evaluation_is_reused_only_when_every_figure_asked_for_is_there_at_the_same_rows():
    rows = {"science/n": 200.0, "mmlu/n": 300.0}
    mmlu = {"mmlu/acc": 0.3, "mmlu/acc_cloze": 0.4, "mmlu/n": 300.0}  # both formulations
    done = {"science/acc": 0.4, "science/n": 200.0, **mmlu}
    assert not needs_evaluation(done, rows, with_demonstration=False)
    # A state scored before MMLU's cloze figure existed is scored again.
    letter_only = {k: v for k, v in done.items() if k != "mmlu/acc_cloze"}
    assert needs_evaluation(letter_only, rows, with_demonstration=False)
    assert needs_evaluation({**done, "mmlu/n": 100.0}, rows, with_demonstration=False)
    assert needs_evaluation(
        {"science/acc": 0.4, "science/n": 200.0}, rows, with_demonstration=False
    )
    # A teacher also needs its demonstration figures, taken on as many rows.
    assert needs_evaluation(done, rows, with_demonstration=True)
    teacher = {**done, "science/acc_demo": 0.9, "science/n_demo": 200.0}
    assert not needs_evaluation(teacher, rows, with_demonstration=True)
    assert needs_evaluation({**teacher, "science/n_demo": 100.0}, rows, with_demonstration=True)
    # Without a generation task there is no demonstration figure to wait for.
    assert not needs_evaluation(mmlu, {"mmlu/n": 300.0}, with_demonstration=True)
    # A state scored before per-row results were kept is scored again (the paired tests
    # need them); lm-eval's figures have none.
    assert needs_evaluation(teacher, rows, with_demonstration=True, per_row={"science/acc"})
    both = {"science/acc", "science/acc_demo"}
    assert not needs_evaluation(teacher, rows, with_demonstration=True, per_row=both)
    tool = {
        "tooluse/acc": 0.9,
        "tooluse/n": 200.0,
        "tooluse/acc_demo": 0.2,
        "tooluse/n_demo": 200.0,
    }
    assert not needs_evaluation(tool, {"tooluse/n": 200.0}, with_demonstration=True)


def _world_stage(world_config: WorldConfig, **model: int) -> str:
    data = {"kind": "world", **world_config.model_dump(mode="json")}
    data["model"].update(model)
    return json.dumps(data)


TINY_SFT = "steps: 4, batch_size: 8, checkpoint_every: 4"
TINY_SDFT = "steps: 2, prompts_per_step: 4, checkpoint_every: 2, rollout: {max_new_tokens: 8"


@pytest.mark.slow
def test_forgetting_pipeline_reports_and_skips_finished_stages(small_world, tmp_path, monkeypatch):
    world, lineage, home = small_world
    monkeypatch.setenv("SDFTLAB_STORAGE", str(tmp_path / "ray"))  # no other run's checkpoints
    cfg = load_config(
        PipelineConfig,
        CONFIGS / "forgetting.yaml",
        [
            f"stages.base={_world_stage(world.config)}",
            f"stages.expert={{{TINY_SFT}}}", f"stages.forgot={{{TINY_SFT}}}",
            "stages.sft_baseline={steps: 2, batch_size: 8}", "stages.rec_base=null",
            f"stages.rec_expert={{{TINY_SDFT}}}}}",
            "eval.limit=8", "cka.limit=8", f"report.dir={tmp_path / 'report'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "eval.preflight_rows=4",
        ],
    )  # fmt: skip
    lines: list[str] = []
    out = run_pipeline(cfg, lineage, home, log=lines.append)
    report = Path(out["report"])
    assert report.parent == out["run_dir"] and report.parent.parent == tmp_path / "report"
    text = report.read_text()
    assert "## Task accuracy" in text and "rec_expert" in text and "ΔCKA" in text
    assert f"- lock: {provenance.lock_hash()[:12]}" in text and "- commit: " in text
    assert lineage.meta("expert").provenance["lock"] == provenance.lock_hash()
    for figure in ("accuracy.png", "cka_by_layer.png", "misalignment_vs_accuracy.png"):
        assert (report.parent / figure).stat().st_size > 0
    results = pd.read_parquet(report.parent / "results.parquet")
    assert {"base", "expert", "forgot", "rec_expert", "sft_baseline"} <= set(results["state"])
    assert "rec_base" not in set(results["state"])  # left out with stages.rec_base=null
    assert {"science/acc", "mmlu/acc", "mmlu/acc_cloze", "cka/expert/last_layer"} <= set(
        results["metric"]
    )
    assert "| state | mmlu/acc | mmlu/acc_cloze | winogrande/acc |" in text
    assert lineage.meta("rec_expert").parents == ["forgot", "expert"]
    # every state's answers are kept row by row, and the recovery compared on those rows
    assert len(lineage.meta("rec_expert").rows["science/acc"].correct) == 8
    assert 0 <= lineage.meta("expert").metrics["science/agree_n"] <= 8
    assert "| rec_expert | forgot | science/acc |" in text
    # the teacher's pre-flight, before the recovery trained: on the state and in the report
    assert lineage.meta("rec_expert").metrics["preflight/science/n"] == 4
    assert "| rec_expert | expert | science |" in text
    assert "paired/forgot/science/acc" in set(results[results["state"] == "rec_expert"]["metric"])

    # Resubmitted with the same config: every training stage is skipped.
    lines.clear()
    again = run_pipeline(cfg, lineage, home, log=lines.append)
    assert again["run_dir"] != out["run_dir"] and report.is_file()  # the first run is kept
    assert (tmp_path / "report" / "latest").resolve() == again["run_dir"].resolve()
    frame = runs.compare(out["run_dir"], again["run_dir"], ["science/acc"])
    assert set(frame["state"]) >= {"expert", "rec_expert"} and (frame["diff"] == 0).all()
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(cfg.name)
    tracked = client.search_runs([experiment.experiment_id])
    pipelines = [r for r in tracked if "mlflow.parentRunId" not in r.data.tags]
    names = {r.info.run_name for r in pipelines}
    assert names == {out["run_dir"].name, again["run_dir"].name}
    first = next(r for r in pipelines if r.info.run_name == out["run_dir"].name)
    first_expert = next(
        r
        for r in tracked
        if r.data.tags.get("state") == "expert"
        and r.data.tags["mlflow.parentRunId"] == first.info.run_id
    )
    curve = client.get_metric_history(first_expert.info.run_id, "loss")  # Ray Train's reports
    assert curve and curve[-1].step == 4
    assert first_expert.data.metrics["science/acc"] == lineage.meta("expert").metrics["science/acc"]
    assert (
        "cka/expert/by_layer"
        in next(r for r in tracked if r.data.tags.get("state") == "forgot").data.metrics
    )
    skipped = [line for line in lines if "up to date" in line]
    assert len(skipped) == 4, lines  # expert, forgot, rec_expert, sft_baseline
    assert all(again["timings"][s] == 0.0 for s in ("expert", "forgot", "rec_expert"))
    evaluation = next(i for i, line in enumerate(lines) if line.startswith("── evaluation"))
    assert lines[evaluation + 1].startswith("── CKA"), lines  # same limit: figures reused
    assert lineage.meta("expert").metrics["science/n"] == 8

    # A changed stage runs again, and so does every stage downstream of it; figures taken on
    # another number of rows are not reused: every state, unchanged ones too, is scored again.
    changed = cfg.model_copy(deep=True)
    changed.stages["forgot"].lr = 2e-3
    del changed.stages["sft_baseline"]  # (one Ray Train run fewer; rec_expert is downstream)
    changed.eval.limit = 12
    lines.clear()
    run_pipeline(changed, lineage, home, log=lines.append)
    reran = {line.split(": ")[-1] for line in lines
             if line.startswith("── stage") and "up to date" not in line}  # fmt: skip
    assert reran == {"base", "forgot", "rec_expert"}, lines  # base: the cached world
    assert all(lineage.meta(s).metrics["science/n"] == 12 for s in ("base", "expert", "forgot"))
    assert lineage.meta("expert").metrics["science/n_demo"] == 12  # the teacher's demo figure too


@pytest.mark.slow
def test_small_model_pipeline_distils_off_policy_then_runs_sdft(small_world, tmp_path):
    world, lineage, home = small_world
    sdft = f"{TINY_SDFT}, engine: hf}}, data: [science]"
    cfg = load_config(
        PipelineConfig,
        CONFIGS / "small_model.yaml",
        [
            f"stages.large={_world_stage(world.config)}",
            "stages.small="
            + _world_stage(world.config, hidden_size=32, num_heads=1, num_kv_heads=1,
                           intermediate_size=64, num_layers=1),
            f"stages.small_direct={{{sdft}}}", f"stages.small_offpolicy={{{sdft}}}",
            f"stages.small_two_stage={{{sdft}}}",
            "eval.limit=8", "cka.limit=8", f"report.dir={tmp_path / 'report'}",
        ],
    )  # fmt: skip
    lines: list[str] = []
    out = run_pipeline(cfg, lineage, home, log=lines.append)
    assert any("(from `base`)" in line for line in lines), "the cached world was not reused"
    assert lineage.load_model("small").config.hidden_size == 32
    assert lineage.load_model("large").config.hidden_size == world.config.model.hidden_size
    assert lineage.meta("small_offpolicy").parents == ["small", "large"]
    assert lineage.meta("small_offpolicy").config["recover"]["mode"] == "off_policy"
    assert lineage.meta("small_two_stage").parents == ["small_offpolicy"]
    results = pd.read_parquet(Path(out["report"]).parent / "results.parquet")
    states = {"large", "small", "small_direct", "small_offpolicy", "small_two_stage"}
    assert states <= set(results["state"])
    assert "science/acc_demo" in set(results[results["state"] == "small"]["metric"])
    # CKA against the larger model, layer pairs by relative depth across the two sizes
    assert "cka/large/last_layer" in set(results[results["state"] == "small"]["metric"])


# ----------------------------------------------------------------------------- sweeps

SWEEP = [
    "name=t-sweep", "student=base",
    "recover={teacher: base, steps: 1, prompts_per_step: 2, data: [science], checkpoint_every: 1, "
    "rollout: {engine: hf, max_new_tokens: 6}}",
    "eval.tasks=[science]", "eval.limit=4", "cka.limit=4", "cka.reference=base",
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
def test_asha_stops_the_trial_whose_live_cka_lags_at_its_first_measurement(small_world, tmp_path):
    """Two trials (vLLM rollouts: engines outside the trial's placement group, everything on 2
    CPUs) report live CKA every 2 of 6 steps; the one whose lr wrecks the model (CKA to the
    reference falls) is stopped by ASHA at step 2, the other runs to the end. The summary
    counts the trial-steps saved against FIFO."""
    world, lineage, _ = small_world
    cfg = load_config(SweepConfig, None, [
        "name=t-asha", "student=base", "eval.tasks=[science]", "eval.limit=4",
        "cka.limit=8", "cka.reference=base", f"out_dir={tmp_path}",
        "recover={teacher: base, steps: 6, prompts_per_step: 2, data: [science], "
        "rollout: {engine: vllm, max_new_tokens: 6}, live_cka: {every: 2}}",  # engines beside
        "space={lr: {type: grid, values: [1.0e-6, 0.3]}}",  # the trial, on 2 CPUs; steady first
        "metric=live_cka/base/last_layer", "scheduler.type=asha", "max_concurrent_trials=1",
    ])  # fmt: skip
    out = run_sweep(cfg, lineage, world.data_dir, log=lambda _: None)
    trials = pd.read_parquet(out / "trials.parquet").set_index("lr")
    assert trials.loc[1e-6, "steps_run"] == 6 and trials.loc[0.3, "steps_run"] == 2
    assert trials["science/acc"].notna().tolist() == [True, False]  # the stopped one: no eval
    history = pd.read_parquet(out / "live_cka.parquet")
    steady = trials.loc[1e-6, "trial_id"]
    assert history.groupby("trial_id")["step"].apply(list).to_dict() == {
        steady: [2, 4, 6],
        trials.loc[0.3, "trial_id"]: [2],
    }
    lagging = history.set_index(["trial_id", "step"])["live_cka/base/last_layer"]
    assert lagging[(trials.loc[0.3, "trial_id"], 2)] < lagging[(steady, 2)]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["trial_steps_run"], summary["trial_steps_fifo"]) == (8, 12)
    assert summary["best_by_early_cka"] == steady
    assert [n for n in lineage.names() if n.startswith("t-asha-")] == [f"t-asha-{steady}"]


@pytest.mark.slow
def test_an_interrupted_sweep_restores_without_rerunning_its_finished_trial(
    small_world, tmp_path, monkeypatch
):
    """The sweep's process is killed after its first trial finished; `sdftlab sweep` again
    restores it (Tuner.restore): the finished trial is kept, the others run, and the sweep
    reports every trial (its lr, accuracy and CKA) and the best trial's recover config."""
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

    out = run_sweep(cfg, lineage, world.data_dir, log=lambda _: None)
    assert {n: lineage.meta(n).created_at for n in first} == created  # not run again
    assert len(finished()) == 3
    trials = pd.read_parquet(out / "trials.parquet")
    assert len(trials) == 3 and {"lr", "science/acc", "cka/base/last_layer"} <= set(trials.columns)
    assert "recover:" in (out / "best_recover.yaml").read_text()


@pytest.mark.slow
def test_compression_pipeline_runs_end_to_end_and_reports(small_world, tmp_path):
    world, lineage, home = small_world
    cfg = load_config(
        PipelineConfig,
        CONFIGS / "compression.yaml",
        [
            f"stages.base={_world_stage(world.config)}", f"stages.expert={{{TINY_SFT}}}",
            "stages.pruned.multiple_of=32", "stages.pruned.ratio=0.25",
            "stages.pruned.importance=taylor", "stages.pruned.calibration_rows=8",
            f"stages.nf4_rec={{{TINY_SDFT}, engine: hf}}, lora: {{r: 4}}}}",
            f"stages.pruned_rec={{{TINY_SDFT}}}}}",
            "eval.limit=8", "cka.limit=8", f"report.dir={tmp_path / 'report'}",
        ],
    )  # fmt: skip
    out = run_pipeline(cfg, lineage, home, log=lambda _: None)
    text = Path(out["report"]).read_text()
    assert "nf4_rec" in text and "pruned_rec" in text
    results = pd.read_parquet(Path(out["report"]).parent / "results.parquet")
    assert {"nf4", "nf4_rec", "pruned", "pruned_rec"} <= set(results["state"])
    assert lineage.meta("pruned").config["importance"] == "taylor"
    assert lineage.load_model("pruned_rec").config.intermediate_size == 96
    assert lineage.meta("nf4_rec").parents == ["nf4", "expert"]


def test_a_sweeps_cka_selection_is_judged_against_the_best_trials_interval():
    """Six trials: live CKA at step 2 ranks them as their final accuracy does, so the early
    pick is the best; the summary gives the rank correlation's interval and how often a random
    pick lands within the best trial's interval."""
    from sdftlab.sweep import selection, summary_lines

    cfg = load_config(SweepConfig, CONFIGS / "sweep_teacher_lr.yaml")
    ids = [f"t{i}" for i in range(6)]
    acc = [0.10, 0.20, 0.30, 0.40, 0.55, 0.60]
    df = pd.DataFrame({"trial_id": ids, "science/acc": acc, "science/n": [100.0] * 6,
                       f"cka/{cfg.cka.reference}/last_layer": [0.5, 0.6, 0.7, 0.8, 0.9, 0.95],
                       "step": [4] * 6})  # fmt: skip
    live = f"live_cka/{cfg.cka.reference}/last_layer"
    history = pd.DataFrame({"trial_id": ids * 2, "step": [2] * 6 + [4] * 6,
                            live: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6] * 2})  # fmt: skip
    s = selection(cfg, df, history)
    assert s["best_by_early_cka"] == "t5" and s["early_cka_picks_best"]
    assert s["spearman_early_cka_vs_accuracy"] == pytest.approx(1.0)
    low, high = s["spearman_cka_vs_accuracy_ci"]
    assert low < 1.0 and high == pytest.approx(1.0)
    # the best (60% of 100 rows) has a Wilson interval from ~50%: trials t4 and t5 are in it
    assert s["early_cka_pick_within_best_ci"] and s["random_pick_within_best_ci"] == pytest.approx(
        2 / 6
    )
    assert any("a trial picked at random does 33% of the time" in line for line in summary_lines(s))
