"""Run reports: paper-style tables (report.md), results.parquet and PNG figures.

`write_report` reads the metrics every stage recorded in the lineage, so a report can be
(re)written from the lineage alone. Its header says what made it: commit, lock hash,
library versions, machine (`sdftlab.provenance`). Each file is written to a temporary
directory and moved into place whole, so an interrupted report never leaves a half-written
file behind, and other files in the directory (a run's `run.json`) are left alone.

    results.parquet   one row per state × metric (state, kind, parents, metric, value, and
                      for accuracies ci_low, ci_high, n_rows, n_seeds; for the paired
                      comparisons `paired/<versus>/<metric>` also p_value)
    report.md         accuracy per stage and task with intervals, paired comparisons on the
                      same rows, general capability, CKA and ΔCKA
    accuracy.png      accuracy by stage;  cka_by_layer.png;  misalignment_vs_accuracy.png
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from sdftlab.evaluate.general import GENERAL_METRICS, LOWER_IS_BETTER
from sdftlab.evaluate.run import ACCURACY_SUFFIXES
from sdftlab.lineage import Lineage
from sdftlab.provenance import summary
from sdftlab.stats import correlation, paired_difference, wilson_interval

TASK_COLUMNS = ("science/acc", "science/acc_demo", "tooluse/acc", "tooluse/acc_demo")
# mmlu/acc, mmlu/acc_cloze, winogrande/acc (accuracies); english/bpb (bits per byte)
GENERAL_COLUMNS = tuple(m for m in GENERAL_METRICS if not m.endswith(LOWER_IS_BETTER))
TEXT_COLUMNS = tuple(m for m in GENERAL_METRICS if m.endswith(LOWER_IS_BETTER))
PAIRED_METRICS = ("science/acc", "tooluse/acc")  # compared state against state, row by row
RESULT_COLUMNS = ["state", "kind", "parents", "metric", "value", "ci_low", "ci_high",
                  "n_rows", "n_seeds", "p_value"]  # fmt: skip


def results_frame(lineage: Lineage, states: Sequence[str]) -> pd.DataFrame:
    """One row per state × metric; accuracies with their 95% Wilson interval and rows."""
    rows = []
    for state in states:
        meta = lineage.meta(state)
        for metric, value in sorted(meta.metrics.items()):
            row = {"state": state, "kind": meta.kind, "parents": ",".join(meta.parents),
                   "metric": metric, "value": float(value)}  # fmt: skip
            n = meta.metrics.get(_rows_of(metric))
            if metric.endswith(ACCURACY_SUFFIXES) and n:
                low, high = wilson_interval(value * n, n)
                row |= {"ci_low": low, "ci_high": high, "n_rows": n, "n_seeds": 1}
            rows.append(row)
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def paired_comparisons(
    lineage: Lineage, states: Sequence[str], reference: str, degraded: str
) -> list[dict[str, Any]]:
    """Each state after `reference` against it, and each after `degraded` against that, on
    the rows both were evaluated on (`paired_difference`: a paired bootstrap interval,
    resampling units where rows share one, and McNemar's exact p otherwise)."""
    order = list(states)
    out = []
    for metric in PAIRED_METRICS:
        for versus in dict.fromkeys((reference, degraded)):
            if versus not in order:
                continue
            for state in order[order.index(versus) + 1 :]:
                compared = _paired(lineage, state, versus, metric)
                if compared is not None:
                    out.append(compared)
    return out


def _paired(lineage: Lineage, state: str, versus: str, metric: str) -> dict[str, Any] | None:
    mine, theirs = lineage.meta(state).rows.get(metric), lineage.meta(versus).rows.get(metric)
    if mine is None or theirs is None:
        return None
    other = theirs.scores()
    common = [(unit, score, other[uid][1]) for uid, (unit, score) in mine.scores().items()
              if uid in other]  # fmt: skip
    if not common:
        return None
    units = [u for u, _, _ in common]
    shared = len(set(units)) < len(units)
    p = paired_difference([a for _, a, _ in common], [b for _, _, b in common],
                          units if shared else None)  # fmt: skip
    return {"state": state, "versus": versus, "metric": metric, "diff": p.diff, "low": p.low,
            "high": p.high, "p_value": p.p_value, "test": p.test, "n_rows": p.n_rows,
            "n_units": p.n_units}  # fmt: skip


def paired_frame(comparisons: Sequence[Mapping[str, Any]], df: pd.DataFrame) -> pd.DataFrame:
    """The comparisons as results.parquet rows: metric `paired/<versus>/<metric>`."""
    meta = df.drop_duplicates("state").set_index("state")
    rows = [{"state": c["state"], "kind": meta.loc[c["state"], "kind"],
             "parents": meta.loc[c["state"], "parents"],
             "metric": f"paired/{c['versus']}/{c['metric']}", "value": c["diff"],
             "ci_low": c["low"], "ci_high": c["high"], "n_rows": c["n_rows"], "n_seeds": 1,
             "p_value": c["p_value"]} for c in comparisons if c["state"] in meta.index]  # fmt: skip
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def paired_section(comparisons: Sequence[Mapping[str, Any]]) -> list[str]:
    if not comparisons:
        return []
    lines = ["## Paired comparisons on the same rows", "",
             "| state | versus | metric | Δ (points) | 95% CI | p | test | rows |",
             "|---|---|---|---:|---:|---:|---|---:|"]  # fmt: skip
    for c in comparisons:
        lines.append(f"| {c['state']} | {c['versus']} | {c['metric']} | {100 * c['diff']:+.1f} "
                     f"| {100 * c['low']:+.1f} to {100 * c['high']:+.1f} | {c['p_value']:.3g} "
                     f"| {c['test']} | {c['n_rows']} |")  # fmt: skip
    return [*lines, "",
            "Δ: the state's accuracy minus the other's, over the eval rows both answered; the "
            "interval is the paired bootstrap's (rows sharing a unit resampled together); p: "
            "McNemar's exact test on the rows where the two disagree (`mcnemar-exact`), or "
            "the bootstrap's where rows share units. One seed.", ""]  # fmt: skip


def _pct(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _table(wide: pd.DataFrame, columns: Sequence[str], fmt=_pct) -> str:
    present = [c for c in columns if c in wide.columns]
    lines = ["| state | " + " | ".join(present) + " |", "|---|" + "---:|" * len(present)]
    for state, row in wide.iterrows():
        lines.append(f"| {state} | " + " | ".join(fmt(row.get(c)) for c in present) + " |")
    return "\n".join(lines)


def _rows_of(metric: str) -> str:
    """The metric counting the rows an accuracy was taken on (`science/acc_demo` →
    `science/n_demo`)."""
    task = metric.split("/")[0]
    return f"{task}/n_demo" if metric.endswith("_demo") else f"{task}/n"


def accuracy_table(wide: pd.DataFrame, columns: Sequence[str]) -> str:
    """Accuracies (%) with their 95% Wilson interval over the eval rows, and the rows."""
    present = [c for c in columns if c in wide.columns]
    lines = ["| state | " + " | ".join(present) + " |", "|---|" + "---:|" * len(present)]
    counts: dict[str, set[int]] = {}
    for state, row in wide.iterrows():
        cells = []
        for column in present:
            acc, n = row.get(column), row.get(_rows_of(column))
            if acc is None or math.isnan(acc) or n is None or math.isnan(n):
                cells.append(_pct(acc))
                continue
            low, high = wilson_interval(acc * n, n)
            cells.append(f"{100 * acc:.1f} ({100 * low:.1f}–{100 * high:.1f})")
            counts.setdefault(column.split("/")[0], set()).add(int(n))
        lines.append(f"| {state} | " + " | ".join(cells) + " |")
    rows = ", ".join(f"{task} {'/'.join(map(str, sorted(n)))}" for task, n in counts.items())
    lines += ["", f"In brackets: the 95% Wilson interval over the eval rows (n: {rows}); one "
              "seed, so run-to-run variation is not in it."]  # fmt: skip
    return "\n".join(lines)


def _bits(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def recovery_rows(
    wide: pd.DataFrame, states: Sequence[str], *, reference: str, degraded: str, metric: str
) -> list[str]:
    """The summary the papers report: for every state made after the degraded one, the share
    of the lost `metric` points it regained — (acc − acc_degraded) / (acc_ref − acc_degraded)
    — and what it kept of the other task (tool use)."""
    if metric not in wide.columns or degraded not in wide.index or reference not in wide.index:
        return []
    ref, low = wide.loc[reference, metric], wide.loc[degraded, metric]
    lost = ref - low
    kept = "tooluse/acc" if metric != "tooluse/acc" else "science/acc"
    lines = [
        f"## Forgetting and recovery on {metric}",
        "",
        f"`{reference}` {100 * ref:.1f} → `{degraded}` {100 * low:.1f}: "
        f"{100 * lost:.1f} points forgotten.",
        "",
        f"| state | {metric} | regained (% of the lost points) | {kept} |",
        "|---|---:|---:|---:|",
    ]
    after = states[list(states).index(degraded) + 1 :] if degraded in states else []
    for state in after:
        acc = wide.loc[state, metric]
        share = (acc - low) / lost if lost else float("nan")
        other = wide.loc[state].get(kept, float("nan"))
        lines.append(f"| {state} | {_pct(acc)} | {_pct(share)} | {_pct(other)} |")
    return [*lines, ""]


def write_report(
    out_dir: Path,
    lineage: Lineage,
    states: Sequence[str],
    cka_frames: Mapping[str, pd.DataFrame],
    *,
    reference: str,
    degraded: str,
    timings: Mapping[str, float],
    title: str,
    accuracy_metric: str = "science/acc",
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write report.md, results.parquet and the figures into `out_dir`; returns report.md."""
    df = results_frame(lineage, states)
    wide = df.pivot_table(index="state", columns="metric", values="value").reindex(states)
    comparisons = paired_comparisons(lineage, states, reference, degraded)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".report-", dir=out_dir))
    try:
        pd.concat([df, paired_frame(comparisons, df)], ignore_index=True).to_parquet(
            tmp / "results.parquet", index=False
        )
        plot_accuracy(wide, tmp / "accuracy.png")
        lines = [f"# {title}", ""]
        if provenance is not None:
            lines += [f"- {line}" for line in summary(dict(provenance))] + [""]
        lines += accuracy_sections(wide, states, reference, degraded, accuracy_metric)
        lines += paired_section(comparisons)
        if cka_frames:
            lines += cka_section(wide, states, cka_frames, lineage.label(reference), tmp,
                                 reference=reference, degraded=degraded,
                                 accuracy_metric=accuracy_metric)  # fmt: skip
        lines += ["## Wall time per stage (s)", "", "| stage | seconds |", "|---|---:|"]
        lines += [f"| {k} | {'up to date, not rerun' if v == 0.0 else f'{v:.0f}'} |"
                  for k, v in timings.items()]  # fmt: skip
        lines += ["", "Every metric: results.parquet (one row per state × metric)."]
        (tmp / "report.md").write_text("\n".join(lines) + "\n")
        for path in sorted(tmp.iterdir(), key=lambda p: p.name == "report.md"):  # report last
            os.replace(path, out_dir / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / "report.md"


def plot_accuracy(wide: pd.DataFrame, path: Path) -> None:
    """Task and general accuracies by state, as grouped bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    plot_cols = [c for c in (*TASK_COLUMNS[::2], *GENERAL_COLUMNS) if c in wide.columns]
    (100 * wide[plot_cols]).plot.bar(ax=ax)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy by stage")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def accuracy_sections(
    wide: pd.DataFrame, states: Sequence[str], reference: str, degraded: str, metric: str
) -> list[str]:
    """Task accuracy, the recovery table, general capability and held-out English."""
    lines = ["## Task accuracy (%)", "", accuracy_table(wide, TASK_COLUMNS), "",
             "![accuracy by stage](accuracy.png)", ""]  # fmt: skip
    lines += recovery_rows(wide, states, reference=reference, degraded=degraded, metric=metric)
    if any(c in wide.columns for c in GENERAL_COLUMNS):
        lines += ["## General capability (%, lm-eval)", "", accuracy_table(wide, GENERAL_COLUMNS),
                  ""]  # fmt: skip
    if any(c in wide.columns for c in TEXT_COLUMNS):
        lines += [
            "## Held-out English (bits per byte, lower is better; lm-eval)",
            "",
            _table(wide, TEXT_COLUMNS, fmt=_bits),
            "",
            "CPython's documentation topics (`pydoc_data`), 64 prose passages, rolling "
            "log-likelihood: general language the tasks never train.",
            "",
        ]
    if "mmlu/acc_cloze" in wide.columns:
        lines += [
            "`mmlu/acc`: the letter after `Answer:` (lm-eval's `mmlu`); `mmlu/acc_cloze`: "
            "each option's own text (its `mmlu_continuation`), the form small models are "
            "read by. Chance: 25% (MMLU), 50% (Winogrande).",
            "",
        ]
    return lines


def cka_section(
    wide: pd.DataFrame, states: Sequence[str], cka_frames: Mapping[str, pd.DataFrame],
    label: str, figures: Path, *, reference: str, degraded: str, accuracy_metric: str,
) -> list[str]:  # fmt: skip
    """CKA to the reference (last layer, mean over layers, sequence form) with ΔCKA against
    the degraded state, the by-layer figure, and misalignment against the accuracy change."""
    from sdftlab.cka.plots import plot_cka_by_layer, plot_misalignment_vs_accuracy

    plot_cka_by_layer(cka_frames, reference, figures / "cka_by_layer.png")
    cka_col, mean_col = f"cka/{label}/last_layer", f"cka/{label}/mean_over_layers"
    base_cka = wide.loc[degraded, cka_col] if cka_col in wide.columns else float("nan")
    base_mean = wide.loc[degraded].get(mean_col, float("nan"))
    lines = [f"## CKA to `{reference}` (ΔCKA vs `{degraded}`)", "",
             "| state | CKA, last layer | ΔCKA | CKA, mean over layers | ΔCKA | "
             "sequence CKA, last layer |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    points = []
    ref_acc = wide.loc[reference, accuracy_metric] if accuracy_metric in wide else None
    for state in states:
        if state == reference or cka_col not in wide.columns:
            continue
        cka = wide.loc[state, cka_col]
        seq = wide.loc[state].get(f"cka/{label}/sequence_last_layer", float("nan"))
        mean = wide.loc[state].get(mean_col, float("nan"))
        lines.append(f"| {state} | {cka:.4f} | {cka - base_cka:+.4f} | {mean:.4f} | "
                     f"{mean - base_mean:+.4f} | {seq:.4f} |")  # fmt: skip
        if ref_acc is not None and not math.isnan(wide.loc[state, accuracy_metric]):
            points.append((state, 1 - cka, wide.loc[state, accuracy_metric] - ref_acc))
    lines += ["", "![CKA to the reference by layer](cka_by_layer.png)", ""]
    if points:
        r = plot_misalignment_vs_accuracy(points, figures / "misalignment_vs_accuracy.png")
        why = " (undefined: fewer than 3 states or a constant axis)" if math.isnan(r) else ""
        lines += [f"Pearson r between CKA misalignment (1 − CKA) and the change in "
                  f"{accuracy_metric} against `{reference}`: {r:.3f} over {len(points)} "
                  f"states{why}{_interval_of(points, r)}.", "",
                  "![misalignment against the accuracy change](misalignment_vs_accuracy.png)",
                  ""]  # fmt: skip
    return lines


def _interval_of(points: Sequence[tuple[str, float, float]], r: float) -> str:
    """The correlation's 95% Fisher-z interval and p-value, where there are states enough."""
    if math.isnan(r) or len(points) < 4:
        return "; too few states for an interval (4 needed)" if not math.isnan(r) else ""
    c = correlation([p[1] for p in points], [p[2] for p in points])
    return f", 95% CI {c.low:.2f} to {c.high:.2f}, p = {c.p_value:.2g}"
