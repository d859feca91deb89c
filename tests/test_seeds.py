"""Seeds as a pipeline option: every training stage (and what is made from it) once per
seed, reading its own seed's states; the report's figures over seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sdftlab.config import load_config
from sdftlab.errors import ConfigError
from sdftlab.lineage import EvalRows, Lineage
from sdftlab.pipelines.graph import PipelineConfig
from sdftlab.pipelines.seeds import Seeded
from sdftlab.report import write_report

GRAPH = (
    "stages={base: {kind: world}, expert: {kind: sft, from: base}, "
    "forgot: {kind: sft, from: expert}, pruned: {kind: prune, from: expert, ratio: 0.25}, "
    "rec: {kind: sdft, from: forgot, teacher: expert}, "
    "rec_ema: {kind: sdft, from: forgot, teacher: ema}}"
)


def test_each_training_stage_and_what_is_made_from_it_runs_once_per_seed():
    cfg = load_config(PipelineConfig, None, [GRAPH, "cka.reference=expert", "seeds=[0, 1, 2]"])
    seeded = cfg.seeded()
    assert list(seeded.stages)[:4] == ["base", "expert.s0", "expert.s1", "expert.s2"]
    assert seeded.seed_of["base"] is None and seeded.states_of("rec") == [
        "rec.s0", "rec.s1", "rec.s2"
    ]  # fmt: skip
    rec = seeded.stages["rec.s1"]
    assert (rec.source, rec.teacher, rec.seed) == ("forgot.s1", "expert.s1", 1)
    assert seeded.stages["rec_ema.s2"].teacher == "ema"  # not a state: left as it is
    assert seeded.stages["forgot.s2"].seed == 2 and seeded.stages["forgot.s2"].source == "expert.s2"
    # pruning has no seed of its own, but prunes each seed's expert
    assert seeded.stages["pruned.s0"].source == "expert.s0"
    assert seeded.reference_of("rec.s2", "expert") == "expert.s2"
    assert seeded.reference_of("base", "expert") == "expert.s0"  # a shared state: the first seed's
    assert seeded.seed_states(1) == ["base", "expert.s1", "forgot.s1", "pruned.s1", "rec.s1",
                                     "rec_ema.s1"]  # fmt: skip


def test_without_seeds_the_stages_are_the_states():
    cfg = load_config(PipelineConfig, None, [GRAPH, "cka.reference=expert"])
    seeded = cfg.seeded()
    assert list(seeded.stages) == ["base", "expert", "forgot", "pruned", "rec", "rec_ema"]
    assert seeded.stages["rec"].teacher == "expert" and not seeded.seeds


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("seeds=[0, 1, 0]", "seeds \\[0, 1, 0\\] repeats a seed"),
        ("seeds=[-1]", "seeds.0"),
        ("seeds=[]", "seeds"),
        (
            GRAPH[:-1] + ", expert.s1: {kind: sft, from: base}}",
            "'expert.s1' is named as stage 'expert'",
        ),
    ],
)
def test_bad_seeds_are_one_error_naming_them(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PipelineConfig, None, [GRAPH, "cka.reference=expert", "seeds=[0, 1]",
                                           override])  # fmt: skip


def _record(store: Lineage, name: str, correct: str, cka: float | None, reference: str) -> None:
    uids = [f"q{i}" for i in range(len(correct))]
    metrics = {"science/acc": correct.count("1") / len(correct), "science/n": len(correct)}
    if cka is not None:
        metrics[f"cka/{reference}/last_layer"] = cka
    rows = EvalRows(uid=uids, unit=uids, correct=correct)
    store.record_metrics(name, metrics, {"science/acc": rows})


def test_the_report_gives_each_stage_over_its_seeds(tmp_path, tiny_qwen):
    model, tok = tiny_qwen
    store = Lineage(tmp_path / "lin")
    seeded = Seeded(
        dict.fromkeys(["expert.s0", "expert.s1", "forgot.s0", "forgot.s1", "rec.s0", "rec.s1"]),
        {f"{st}.s{s}": st for st in ("expert", "forgot", "rec") for s in (0, 1)},
        {f"{st}.s{s}": s for st in ("expert", "forgot", "rec") for s in (0, 1)},
        (0, 1),
    )
    rows = {
        "expert": "1" * 30 + "0" * 10,
        "forgot": "1" * 10 + "0" * 30,
        "rec": "1" * 25 + "0" * 15,
    }
    cka = {"forgot": (0.5, 0.6), "rec": (0.7, 0.9)}
    for name in seeded.stages:
        stage, seed = seeded.stage_of[name], seeded.seed_of[name]
        store.save(name, model, tok, kind="sft")
        reference = f"expert.s{seed}"
        _record(store, name, rows[stage], cka[stage][seed] if stage in cka else None, reference)

    report = write_report(tmp_path / "out", store, list(seeded.stages), {}, reference="expert",
                          degraded="forgot", timings={}, title="t", seeded=seeded)  # fmt: skip
    text = report.read_text()
    assert "## Over seeds (2: 0, 1)" in text and "## Seed 0" in text and "## Seed 1" in text
    assert (report.parent / "accuracy-s0.png").is_file()
    summary = json.loads((report.parent / "summary.json").read_text())
    forgot = summary["stages"]["forgot"]["science/acc"]
    assert forgot["mean"] == pytest.approx(0.25) and forgot["n_seeds"] == 2
    assert forgot["n_rows"] == 40
    # ΔCKA seed by seed: +0.2 and +0.3; the t interval over two seeds
    delta = summary["delta_cka"]["rec"]
    assert delta["mean"] == pytest.approx(0.25) and delta["n_seeds"] == 2
    assert delta["ci_low"] < 0.25 < delta["ci_high"]
    paired = {(p["state"], p["versus"]): p for p in summary["paired"]}
    assert paired[("rec", "forgot")]["diff"] == pytest.approx(15 / 40)
    assert paired[("rec", "forgot")]["n_seeds"] == 2
    assert paired[("forgot", "expert")]["diff"] == pytest.approx(-0.5)


@pytest.mark.slow
def test_a_seeded_pipeline_makes_each_seeds_states_and_reports_over_them(small_world, tmp_path):
    from sdftlab.pipelines.graph import run_pipeline

    world, lineage, home = small_world
    base = {"kind": "world", **world.config.model_dump(mode="json")}
    cfg = load_config(
        PipelineConfig,
        None,
        [
            f"stages={{base: {json.dumps(base)}, "
            "expert: {kind: sft, from: base, data: [science], steps: 2, batch_size: 8, "
            "checkpoint_every: 2}, "
            "rec: {kind: sdft, from: expert, teacher: expert, data: [science], steps: 1, "
            "prompts_per_step: 4, checkpoint_every: 1, rollout: {engine: hf, max_new_tokens: 8}}}",
            "seeds=[0, 1]", "cka.reference=expert", "cka.limit=4", "report.degraded=expert",
            "eval.tasks=[science]", "eval.limit=4", "eval.demonstration_for=[expert]",
            f"report.dir={tmp_path / 'report'}", "tracking.mlflow=false",
        ],
    )  # fmt: skip
    out = run_pipeline(cfg, lineage, home, log=lambda _: None)
    assert lineage.meta("expert.s1").config["sft"]["seed"] == 1
    one, two = lineage.load_model("expert.s0"), lineage.load_model("expert.s1")
    assert any(
        not torch.equal(a, b) for a, b in zip(one.parameters(), two.parameters(), strict=True)
    )
    rec = lineage.meta("rec.s1")
    assert rec.parents == ["expert.s1"] and rec.config["recover"]["teacher"] == "expert.s1"
    assert "cka/expert.s1/last_layer" in rec.metrics  # compared with its own seed's reference
    assert "science/acc_demo" in lineage.meta("expert.s0").metrics  # demonstration_for: a stage
    text = Path(out["report"]).read_text()
    assert "## Over seeds (2: 0, 1)" in text and "## Seed 1" in text
    summary = json.loads((Path(out["report"]).parent / "summary.json").read_text())
    assert summary["stages"]["rec"]["science/acc"]["n_seeds"] == 2
    assert summary["delta_cka"]["rec"]["n_seeds"] == 2
