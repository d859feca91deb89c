"""Provenance, runs and tracking: every state and run says what made it, runs never overwrite
each other and can be compared, and MLflow holds what was logged."""

from __future__ import annotations

import json
import subprocess

import pandas as pd
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from sdftlab import provenance, runs
from sdftlab.cli import main as cli
from sdftlab.errors import ConfigError
from sdftlab.lineage import META_FILE, Lineage
from sdftlab.tracking import Tracker, TrackingSpec, mlflow_reports


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer):
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    return Qwen2ForCausalLM(config).eval(), tiny_tokenizer


def test_a_state_records_commit_lock_libraries_machine_and_seeds(tmp_path, tiny):
    store = Lineage(tmp_path / "lin")
    config = {"sft": {"seed": 3, "lr": 1e-3, "rollout": {"seed": 4}}}
    meta = store.save("base", *tiny, kind="sft", config=config)
    prov = store.meta("base").provenance
    assert prov == meta.provenance
    head = subprocess.run(["git", "-C", str(provenance.PROJECT_ROOT), "rev-parse", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert prov["git"]["commit"] == head and isinstance(prov["git"]["dirty"], bool)
    assert prov["lock"] == provenance.lock_hash() and len(prov["lock"]) == 64
    assert prov["libraries"]["torch"] == torch.__version__
    assert set(provenance.LOCKED_LIBRARIES) <= set(prov["libraries"])
    assert prov["machine"]["cores"] >= 1 and prov["machine"]["cpu"]
    assert prov["seeds"] == {"sft.seed": 3, "sft.rollout.seed": 4}


def test_lineage_show_prints_the_provenance(tmp_path, tiny, capsys):
    Lineage(tmp_path / "lin").save("base", *tiny, kind="world", config={"seed": 0})
    assert cli(["--lineage", str(tmp_path / "lin"), "lineage", "show", "base"]) == 0
    out = capsys.readouterr().out
    assert f"lock: {provenance.lock_hash()[:12]}" in out
    assert f"transformers {provenance.library_versions()['transformers']}" in out
    assert "commit: " in out and "seeds: seed=0" in out
    assert '"provenance"' in out  # and the whole metadata after it


def test_a_stage_from_a_state_made_under_other_versions_warns_once(tmp_path, tiny, capsys):
    store = Lineage(tmp_path / "lin")
    store.save("base", *tiny, kind="world")
    meta_file = store.local_path("base") / META_FILE
    meta = json.loads(meta_file.read_text())
    meta["provenance"]["libraries"]["transformers"] = "4.0.0"
    meta_file.write_text(json.dumps(meta))
    capsys.readouterr()
    store.check_new("expert", parents=["base"])
    err = capsys.readouterr().err.strip().splitlines()
    now = provenance.library_versions()["transformers"]
    assert len(err) == 1 and f"transformers 4.0.0 → {now}" in err[0] and "'base'" in err[0]
    store.save("expert", *tiny, kind="sft", parents=["base"])  # the save itself stays quiet
    assert "warning" not in capsys.readouterr().err
    store.check_new("forgot", parents=["expert"])  # same versions: no warning
    assert capsys.readouterr().err == ""


def _finished_run(root, pipeline: str, values: dict[str, float], second: int) -> str:
    from datetime import UTC, datetime

    run_id = runs.new_run_id({"v": values}, datetime(2026, 12, 7, 9, 0, second, tzinfo=UTC))
    run_dir = runs.start_run(root / pipeline, run_id, pipeline=pipeline, config={"v": values},
                             provenance=provenance.collect())  # fmt: skip
    frame = pd.DataFrame([{"state": s, "kind": "sft", "parents": "", "metric": "science/acc",
                           "value": v} for s, v in values.items()])  # fmt: skip
    frame.to_parquet(run_dir / "results.parquet")
    runs.finish_run(run_dir, "finished", headline_metric="science/acc",
                    headline=runs.headline(frame, "science/acc"))  # fmt: skip
    return run_id


def test_runs_keep_their_own_directories_and_compare_by_state(tmp_path, capsys):
    root = tmp_path / "runs"
    a = _finished_run(root, "forgetting", {"expert": 0.5, "forgot": 0.2}, 1)
    b = _finished_run(root, "forgetting", {"expert": 0.5, "forgot": 0.3, "rec": 0.4}, 2)
    assert a != b and (root / "forgetting" / a / "run.json").is_file()
    assert (root / "forgetting" / "latest").resolve() == (root / "forgetting" / b).resolve()
    frame = runs.compare(root / "forgetting" / a, root / "forgetting" / "latest")
    diff = frame.set_index("state")["diff"]
    assert diff["expert"] == 0 and diff["forgot"] == pytest.approx(0.1) and pd.isna(diff["rec"])

    assert cli(["runs", "--dir", str(root)]) == 0
    listing = capsys.readouterr().out
    assert a in listing and b in listing and "forgot 30.0" in listing
    assert cli(["runs", "--dir", str(root), "compare", a, f"forgetting/{b}"]) == 0
    table = capsys.readouterr().out
    assert "| forgot | science/acc | 0.2000 | 0.3000 | +0.1000 |" in table


def test_compare_with_an_unknown_run_is_one_line_and_touches_nothing(tmp_path, capsys):
    root = tmp_path / "runs"
    a = _finished_run(root, "forgetting", {"expert": 0.5}, 1)
    before = sorted((p, p.stat().st_mtime_ns) for p in root.rglob("*"))
    assert cli(["runs", "--dir", str(root), "compare", a, "20991231-000000-abcdef"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown run '20991231-000000-abcdef'" in err[0] and a in err[0]
    assert sorted((p, p.stat().st_mtime_ns) for p in root.rglob("*")) == before
    assert cli(["runs", "--dir", str(root), "compare", a]) == 2
    assert "give two runs" in capsys.readouterr().err


def test_a_corrupt_mlflow_store_is_refused_untouched(tmp_path):
    store = tmp_path / "mlflow.db"
    store.write_bytes(b"not a database, but someone's file" * 10)
    spec = TrackingSpec(uri=f"sqlite:///{store}")
    with pytest.raises(ConfigError, match=r"tracking\.uri: .* is not an SQLite database"):
        Tracker.open(spec, tmp_path, experiment="x", run_name="r", params={}, tags={})
    assert store.read_bytes() == b"not a database, but someone's file" * 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="is a file, not an MLflow store"):
        Tracker.open(TrackingSpec(uri=str(a_file)), tmp_path, experiment="x", run_name="r",
                     params={}, tags={})  # fmt: skip


def test_tracked_params_metrics_and_training_reports_read_back_with_mlflows_client(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logs: list[str] = []
    tracker = Tracker.open(TrackingSpec(uri=uri), tmp_path, experiment="forgetting",
                           run_name="run-1", params={"stages": {"expert": {"lr": 1e-3}}},
                           tags={"lock": "abc"}, log=logs.append)  # fmt: skip
    assert tracker is not None and "forgetting" in logs[0]
    stage = tracker.stage("expert", {"lr": 1e-3, "rollout": {"max_new_tokens": 8}}, {"kind": "sft"})
    callback = mlflow_reports(uri, stage)  # what Ray Train's controller calls at each report
    for step, loss in ((10, 2.0), (20, 1.5)):
        callback.after_report(None, [{"step": step, "loss": loss, "note": "text"}], None)
    tracker.log_metrics(stage, {"science/acc": 0.4})
    frame = pd.DataFrame({"layer_a": [0, 1], "cka": [0.9, 0.8], "sequence_cka": [0.7, 0.6]})
    tracker.log_cka(stage, frame, "base")
    tracker.end(stage)
    tracker.end(tracker.run_id)

    client = MlflowClient(uri)
    run = client.get_run(stage)
    assert run.data.params == {"lr": "0.001", "rollout.max_new_tokens": "8"}
    assert run.data.tags["mlflow.parentRunId"] == tracker.run_id
    assert [(m.step, m.value) for m in client.get_metric_history(stage, "loss")] == [
        (10, 2.0), (20, 1.5)]  # fmt: skip
    assert run.data.metrics["science/acc"] == 0.4 and "note" not in run.data.metrics
    cka = client.get_metric_history(stage, "cka/base/by_layer")
    assert sorted((m.step, m.value) for m in cka) == [(0, 0.9), (1, 0.8)]
    assert client.get_run(tracker.run_id).data.params["stages.expert.lr"] == "0.001"
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


def test_tracking_off_opens_nothing(tmp_path):
    assert Tracker.open(TrackingSpec(mlflow=False), tmp_path, experiment="x", run_name="r",
                        params={}, tags={}) is None  # fmt: skip
    assert list(tmp_path.iterdir()) == []
