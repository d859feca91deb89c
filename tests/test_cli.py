"""The `sdftlab` command wires the library: degrade prune/quantize, cka, lineage."""

from __future__ import annotations

import pytest

from sdftlab.cli import main

pytestmark = pytest.mark.slow


def test_degrade_prune_then_cka_through_the_cli(small_world, capsys):
    _, lineage, home = small_world
    base = ["--home", str(home), "--lineage", lineage.root]
    code = main([*base, "degrade", "prune", "--from", "base", "--to", "cli_pruned",
                 "--ratio", "0.5", "--multiple-of", "8"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "cli_pruned  <prune>" in out
    width = lineage.meta("base").config["world"]["model"]["intermediate_size"]
    assert lineage.meta("cli_pruned").config["new_width"] == width // 2

    code = main([*base, "cka", "--state", "cli_pruned", "--reference", "base", "--data", "science",
                 "--limit", "8", "--layers", "last"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "CKA of cli_pruned with base" in out
    recorded = lineage.meta("cli_pruned").metrics
    assert 0.0 < recorded["cka/base/last_layer"] <= 1.0


def test_degrade_errors_are_one_line_and_write_nothing(small_world, capsys):
    _, lineage, home = small_world
    base = ["--home", str(home), "--lineage", lineage.root]
    before = lineage.names()
    assert main([*base, "degrade", "prune", "--from", "base", "--to", "bad", "--ratio", "1.5"]) == 2
    assert "ratio" in capsys.readouterr().err
    assert main([*base, "degrade", "prune", "--from", "base", "--to", "bad", "--ratio", "0.99",
                 "--multiple-of", "64"]) == 2  # fmt: skip
    assert "leaves 0" in capsys.readouterr().err
    assert main([*base, "degrade", "sft", "--from", "base", "--to", "bad", "--data", "chess"]) == 2
    assert "chess" in capsys.readouterr().err
    before_metrics = dict(lineage.meta("base").metrics)
    assert main([*base, "cka", "--state", "base", "--reference", "base", "--limit", "2"]) == 2
    assert "limit" in capsys.readouterr().err
    assert main([*base, "cka", "--reference", "base"]) == 2  # no state to measure
    assert "give --state STATE" in capsys.readouterr().err
    assert main([*base, "cka", "--state", "base", "--reference", "base", "pooling=max"]) == 2
    assert "pooling" in capsys.readouterr().err
    assert lineage.names() == before and lineage.meta("base").metrics == before_metrics


def test_demo_runs_the_projects_forgetting_config_and_rejects_a_bad_graph_first(tmp_path, capsys):
    """`sdftlab demo` reads jobs/configs/forgetting.yaml; a bad override fails before any
    world is built or any state written."""
    base = ["--home", str(tmp_path / "home"), "--lineage", str(tmp_path / "lineage")]
    assert main([*base, "demo", "stages.rec_base.teacher=expret"]) == 2
    assert "teacher 'expret' is made by no stage" in capsys.readouterr().err
    assert not (tmp_path / "home").exists() and not (tmp_path / "lineage").exists()


def test_degrade_prune_taylor_scores_on_calibration_data(small_world, capsys):
    _, lineage, home = small_world
    base = ["--home", str(home), "--lineage", lineage.root]
    code = main([*base, "degrade", "prune", "--from", "base", "--to", "cli_taylor",
                 "--ratio", "0.25", "--multiple-of", "8", "--importance", "taylor",
                 "--calibration", "science"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert lineage.meta("cli_taylor").config["importance"] == "taylor"
