"""The report compares states on the rows they share: per-row results recorded with the
metrics give paired differences (McNemar's exact p) in report.md and results.parquet."""

from __future__ import annotations

import pandas as pd
import pytest

from sdftlab.lineage import EvalRows, Lineage
from sdftlab.report import write_report


def _rows(correct: str, first: int = 0) -> EvalRows:
    uids = [f"q{i}" for i in range(first, first + len(correct))]
    return EvalRows(uid=uids, unit=uids, correct=correct)


def _record(store: Lineage, name: str, rows: EvalRows) -> None:
    n = len(rows.correct)
    store.record_metrics(name, {"science/acc": rows.correct.count("1") / n, "science/n": n},
                         {"science/acc": rows})  # fmt: skip


def test_paired_comparisons_on_shared_rows_in_the_report_and_results(tmp_path, tiny_qwen):
    model, tok = tiny_qwen
    store = Lineage(tmp_path / "lin")
    for name, parents in (("expert", []), ("forgot", ["expert"]), ("rec", ["forgot", "expert"])):
        store.save(name, model, tok, kind="sft", parents=parents)
    # 50 rows: the expert alone right on 9, `forgot` alone on 2, both on 20, neither on 19
    _record(store, "expert", _rows("1" * 20 + "0" * 19 + "1" * 9 + "0" * 2))
    _record(store, "forgot", _rows("1" * 20 + "0" * 19 + "0" * 9 + "1" * 2))
    # `rec` answered rows q10..q59: only q10..q49 are shared with the others
    _record(store, "rec", _rows("1" * 50, first=10))
    assert store.meta("expert").rows["science/acc"].correct.count("1") == 29

    report = write_report(tmp_path / "out", store, ["expert", "forgot", "rec"], {},
                          reference="expert", degraded="forgot", timings={},
                          title="t")  # fmt: skip
    text = report.read_text()
    assert "## Paired comparisons on the same rows" in text
    mcnemar = 2 * (1 + 11 + 55) / 2048  # 2·P(X ≤ 2), X ~ Binomial(11, ½)
    assert "| forgot | expert | science/acc | -14.0 |" in text and f"{mcnemar:.3g}" in text
    results = pd.read_parquet(report.parent / "results.parquet").set_index(["state", "metric"])
    forgetting = results.loc[("forgot", "paired/expert/science/acc")]
    assert forgetting["value"] == pytest.approx(-7 / 50)
    assert forgetting["p_value"] == pytest.approx(mcnemar)
    assert forgetting["ci_low"] < -7 / 50 < forgetting["ci_high"] and forgetting["n_rows"] == 50
    regained = results.loc[("rec", "paired/forgot/science/acc")]
    assert regained["n_rows"] == 40  # the shared rows only
    assert regained["value"] == pytest.approx(1 - 12 / 40)  # `forgot` right on 12 of them
    # each accuracy carries its Wilson interval and rows
    expert = results.loc[("expert", "science/acc")]
    assert expert["ci_low"] < 29 / 50 < expert["ci_high"] and expert["n_rows"] == 50


def test_a_state_without_rows_is_left_out_of_the_comparisons(tmp_path, tiny_qwen):
    model, tok = tiny_qwen
    store = Lineage(tmp_path / "lin")
    store.save("expert", model, tok, kind="sft", metrics={"science/acc": 0.5, "science/n": 4})
    store.save("forgot", model, tok, kind="sft", parents=["expert"])
    _record(store, "forgot", _rows("0101"))
    report = write_report(tmp_path / "out", store, ["expert", "forgot"], {},
                          reference="expert", degraded="forgot", timings={}, title="t")  # fmt: skip
    assert "Paired comparisons" not in report.read_text()
    results = pd.read_parquet(report.parent / "results.parquet")
    assert not results["metric"].str.startswith("paired/").any()


def _frame(values: list[float], sequence: list[float]) -> pd.DataFrame:
    """A comparison's result as `compare_states` returns it: layer 0 (embeddings) and the
    decoder layers, diagonal pairs, both forms."""
    import json

    n = len(values)
    frame = pd.DataFrame({"layer_a": range(n + 1), "layer_b": range(n + 1),
                          "cka": [1.0, *values], "sequence_cka": [1.0, *sequence]})  # fmt: skip
    frame.attrs["cka"] = json.dumps({"depth_a": n, "depth_b": n})
    return frame


def test_the_cka_conclusions_are_checked_at_every_layer_and_in_both_forms():
    from sdftlab.report import cka_robustness

    frames = {
        "forgot": _frame([0.8, 0.7, 0.6], [0.5, 0.5, 0.5]),
        "rec": _frame([0.9, 0.6, 0.7], [0.4, 0.4, 0.4]),  # up at layers 1 and 3, down at 2
        "sft": _frame([0.95, 0.9, 0.9], [0.6, 0.7, 0.8]),
    }
    wide = pd.DataFrame({"science/acc": [0.6, 0.3, 0.5, 0.55]},
                        index=["expert", "forgot", "rec", "sft"])  # fmt: skip
    lines = cka_robustness(frames, ["expert", "forgot", "rec", "sft"], "forgot", wide,
                           "science/acc", ref_acc=0.6)  # fmt: skip
    text = "\n".join(lines)
    assert "| rec | pooled | 2 of 3 | -0.1000 to +0.1000 |" in text
    assert "| rec | per sequence | 0 of 3 | -0.1000 to -0.1000 |" in text
    assert "| sft | per sequence | 3 of 3 |" in text
    # at every layer, in both forms, the less aligned state lost more science here
    assert "| all 3 states | pooled | r(1 − CKA, Δscience/acc) < 0 at 3 of 3 layers |" in text
    assert cka_robustness(frames, ["expert", "rec"], "base", wide, "science/acc", 0.6) == []


def test_summary_json_is_plain_json_with_null_for_an_interval_one_seed_cannot_give(
    tmp_path, tiny_qwen
):
    import json

    model, tok = tiny_qwen
    store = Lineage(tmp_path / "lin")
    for name in ("expert", "forgot", "rec"):
        store.save(name, model, tok, kind="sft")
        _record(store, name, _rows("1100"))
        store.record_metrics(name, {"cka/expert/last_layer": 0.9})
    report = write_report(tmp_path / "out", store, ["expert", "forgot", "rec"], {},
                          reference="expert", degraded="forgot", timings={}, title="t")  # fmt: skip
    text = (report.parent / "summary.json").read_text()
    summary = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))
    assert summary["delta_cka"]["rec"]["ci_low"] is None and summary["seeds"] == []
    assert summary["stages"]["rec"]["science/acc"]["n_seeds"] == 1
