"""Pipelines: every job config validates; the forgetting pipeline runs, reports and resumes."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from sdftlab.config import WorldConfig, load_config
from sdftlab.pipelines.forgetting import ForgettingConfig, run_forgetting

REPO = Path(__file__).resolve().parents[1]
CONFIG_MODELS = {"world": WorldConfig, "forgetting": ForgettingConfig}


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
