"""Run reports: paper-style tables (report.md), results.parquet and PNG figures.

`write_report` reads the metrics every stage recorded in the lineage, so a report can be
(re)written from the lineage alone. Its header says what made it: commit, lock hash,
library versions, machine (`sdftlab.provenance`). Each file is written to a temporary
directory and moved into place whole, so an interrupted report never leaves a half-written
file behind, and other files in the directory (a run's `run.json`) are left alone.

    results.parquet   one row per state × metric (state, kind, parents, metric, value, and
                      for accuracies ci_low, ci_high, n_rows, n_seeds; for the paired
                      comparisons `paired/<versus>/<metric>` also p_value); with seeds, each
                      stage over its seeds under the stage's name
    summary.json      each stage's accuracy (mean, ci_low, ci_high, n_seeds, n_rows), the
                      paired differences, ΔCKA per recovery, misalignment vs accuracy change
    report.md         with seeds, the stages over their seeds first (`over_seeds`); then per
                      seed (or once): accuracy per stage and task with intervals, paired
                      comparisons on the same rows, the SDFT teachers' pre-flight, general
                      capability, CKA and ΔCKA
    accuracy.png      accuracy by stage;  cka_by_layer.png;  misalignment_vs_accuracy.png
                      (with seeds, one of each per seed: accuracy-s0.png, ...)

The statistics are `sdftlab.stats`'; per-row results come from the states' metadata
(`EvalRows`, recorded by every evaluation).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sdftlab.evaluate.general import GENERAL_METRICS, LOWER_IS_BETTER
from sdftlab.evaluate.run import ACCURACY_SUFFIXES
from sdftlab.lineage import Lineage
from sdftlab.pipelines.seeds import Seeded
from sdftlab.provenance import summary
from sdftlab.stats import (
    bootstrap_mean,
    correlation,
    paired_difference,
    seed_interval,
    wilson_interval,
)

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
    out = []
    for metric in PAIRED_METRICS:
        for state, versus in _versus(states, reference, degraded):
            if compared := _compare(lineage, [(state, versus)], state, versus, metric):
                out.append(compared)
    return out


def _versus(order: Sequence[str], reference: str, degraded: str) -> list[tuple[str, str]]:
    """(state, versus): each state after `reference` against it, then each after `degraded`."""
    order = list(order)
    return [(state, versus) for versus in dict.fromkeys((reference, degraded)) if versus in order
            for state in order[order.index(versus) + 1 :]]  # fmt: skip


def _compare(
    lineage: Lineage, pairs: Sequence[tuple[str, str]], state: str, versus: str, metric: str
) -> dict[str, Any] | None:
    """`paired_difference` of the pairs' states (one pair a seed) on the rows all answered."""
    got = _aligned(lineage, [[a for a, _ in pairs], [b for _, b in pairs]], metric)
    if got is None:
        return None
    p = paired_difference(got[0][0], got[0][1], got[1])
    return {"state": state, "versus": versus, "metric": metric, "diff": p.diff, "low": p.low,
            "high": p.high, "p_value": p.p_value, "test": p.test, "n_rows": p.n_rows,
            "n_units": p.n_units, "n_seeds": p.n_seeds}  # fmt: skip


def paired_frame(
    comparisons: Sequence[Mapping[str, Any]], kind: Mapping[str, str], parents: Mapping[str, str]
) -> pd.DataFrame:
    """The comparisons as results.parquet rows: metric `paired/<versus>/<metric>`."""
    rows = [{"state": c["state"], "kind": kind[c["state"]], "parents": parents[c["state"]],
             "metric": f"paired/{c['versus']}/{c['metric']}", "value": c["diff"],
             "ci_low": c["low"], "ci_high": c["high"], "n_rows": c["n_rows"],
             "n_seeds": c["n_seeds"], "p_value": c["p_value"]} for c in comparisons]  # fmt: skip
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def paired_section(comparisons: Sequence[Mapping[str, Any]], seeds: bool = False) -> list[str]:
    if not comparisons:
        return []
    lines = ["## Paired comparisons on the same rows", "",
             "| state | versus | metric | Δ (points) | 95% CI | p | test | rows |",
             "|---|---|---|---:|---:|---:|---|---:|"]  # fmt: skip
    for c in comparisons:
        lines.append(f"| {c['state']} | {c['versus']} | {c['metric']} | {100 * c['diff']:+.1f} "
                     f"| {100 * c['low']:+.1f} to {100 * c['high']:+.1f} | {c['p_value']:.3g} "
                     f"| {c['test']} | {c['n_rows']} |")  # fmt: skip
    if seeds:
        return [*lines, "",
                "Δ: the stage's accuracy minus the other's, seed by seed on the eval rows both "
                "answered; the interval is the bootstrap's over seeds and rows, and so is p.",
                ""]  # fmt: skip
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


def preflight_section(lineage: Lineage, states: Sequence[str]) -> list[str]:
    """Each SDFT state's teacher before training, without and with the demonstration
    (`pipelines.preflight`)."""
    lines = []
    for state in states:
        meta = lineage.meta(state)
        tasks = [k.split("/")[1] for k in meta.metrics if k.startswith("preflight/") and
                 k.endswith("/acc")]  # fmt: skip
        teacher = meta.config.get("recover", {}).get("teacher", "?")
        for task in tasks:
            bare, demo = (meta.metrics[f"preflight/{task}/{m}"] for m in ("acc", "acc_demo"))
            n = int(meta.metrics[f"preflight/{task}/n"])
            lines.append(f"| {state} | {teacher} | {task} | {100 * bare:.1f} | {100 * demo:.1f} "
                         f"| {100 * (demo - bare):+.1f} | {n} |")  # fmt: skip
    if not lines:
        return []
    return ["## The teachers before recovery (pre-flight, %)", "",
            "| state | teacher | task | without the demonstration | with it | gain | rows |",
            "|---|---|---|---:|---:|---:|---:|", *lines, "",
            "The teacher's greedy accuracy on the first rows of the recovery's training data, on "
            "its rollout engine and budget: SDFT needs a teacher that gains from the "
            "demonstration.", ""]  # fmt: skip


CKA_FORMS = (("pooled", "cka"), ("per sequence", "sequence_cka"))


def _by_layer(frame: pd.DataFrame) -> pd.DataFrame:
    """A comparison's decoder layers (diagonal pairs, the embedding left out), both forms."""
    from sdftlab.cka.capture import diagonal_rows

    diag = diagonal_rows(frame)
    return diag[diag["layer_a"] >= 1].set_index("layer_a")[[c for _, c in CKA_FORMS]]


def cka_robustness(
    cka_frames: Mapping[str, pd.DataFrame], states: Sequence[str], degraded: str,
    wide: pd.DataFrame, accuracy_metric: str, ref_acc: float | None,
) -> list[str]:  # fmt: skip
    """Whether the two CKA predictions hold at every decoder layer and in both forms (the
    pooled rows and the per-sequence tokens), or only at some: (1) a recovery raises CKA to
    the reference above the degraded state's (ΔCKA > 0); (2) misalignment (1 − CKA) goes with
    a larger accuracy loss (Pearson r < 0 across the states)."""
    if degraded not in cka_frames:
        return []
    base = _by_layer(cka_frames[degraded])
    after = [s for s in states[list(states).index(degraded) + 1 :] if s in cka_frames]
    lines = ["| state | form | layers with ΔCKA > 0 | ΔCKA, lowest to highest layer value |",
             "|---|---|---:|---:|"]  # fmt: skip
    for state in after:
        layers = _by_layer(cka_frames[state])
        for form, column in CKA_FORMS:
            delta = (layers[column] - base[column]).dropna()
            lines.append(f"| {state} | {form} | {int((delta > 0).sum())} of {len(delta)} | "
                         f"{delta.min():+.4f} to {delta.max():+.4f} |")  # fmt: skip
    known = ref_acc is not None and accuracy_metric in wide.columns
    scored = [s for s in cka_frames if known and not math.isnan(wide.loc[s, accuracy_metric])]
    if len(scored) >= 3:
        change = np.array([wide.loc[s, accuracy_metric] - ref_acc for s in scored])
        for form, column in CKA_FORMS:
            table = pd.concat([_by_layer(cka_frames[s])[column] for s in scored], axis=1)
            rs = [np.corrcoef(1 - row.to_numpy(), change)[0, 1] for _, row in table.iterrows()
                  if np.ptp(row.to_numpy()) > 0 and np.ptp(change) > 0]  # fmt: skip
            negative = sum(r < 0 for r in rs)
            lines.append(f"| all {len(scored)} states | {form} | r(1 − CKA, Δ{accuracy_metric}) "
                         f"< 0 at {negative} of {len(rs)} layers | |")  # fmt: skip
    return ["### Do the CKA conclusions hold at every layer?", "", *lines, "",
            "ΔCKA against the degraded state at each decoder layer (diagonal pairs), in the "
            "pooled form (one row per example) and the per-sequence form (each example's "
            "tokens); the last rows: at how many layers misalignment goes with the accuracy "
            "loss across the states. A conclusion that holds at some layers only is not one "
            "this comparison supports.", ""]  # fmt: skip


# ----------------------------------------------------------------------------- over seeds


def _aligned(
    lineage: Lineage, groups: Sequence[Sequence[str]], metric: str
) -> tuple[list[np.ndarray], list[str] | None] | None:
    """Each group's per-row scores (one row of the array per state, i.e. per seed) on the
    rows every state answered, and their units where rows share one; None without rows."""
    scores = []
    for group in groups:
        recorded = [lineage.meta(state).rows.get(metric) for state in group]
        if any(r is None for r in recorded):
            return None
        scores.append([r.scores() for r in recorded])
    first = scores[0][0]
    common = [uid for uid in first if all(uid in d for g in scores for d in g)]
    if not common:
        return None
    units = [first[uid][0] for uid in common]
    arrays = [np.array([[d[uid][1] for uid in common] for d in g]) for g in scores]
    return arrays, units if len(set(units)) < len(units) else None


def over_seeds(
    lineage: Lineage, seeded: Seeded, reference: str, degraded: str, accuracy_metric: str
) -> dict[str, Any]:
    """Each stage over its seeds (summary.json): accuracy with its bootstrap interval over
    seeds × rows, seed-paired differences against the reference and the degraded stage, ΔCKA
    against the degraded stage with a t interval over seeds, and the misalignment–accuracy
    correlation over every state."""
    seeds = seeded.seeds or (None,)
    stages = list(dict.fromkeys(seeded.stage_of.values()))
    per_seed = {st: [seeded.state(st, s) for s in seeds] for st in stages}
    out: dict[str, Any] = {"seeds": list(seeded.seeds), "stages": {}, "paired": [],
                           "delta_cka": {}, "misalignment_vs_accuracy": None}  # fmt: skip
    for stage in stages:
        figures = {}
        for metric in PAIRED_METRICS:
            got = _aligned(lineage, [list(dict.fromkeys(per_seed[stage]))], metric)
            if got is not None:
                e = bootstrap_mean(got[0][0], got[1])
                figures[metric] = {"mean": e.mean, "ci_low": e.low, "ci_high": e.high,
                                   "n_seeds": e.n_seeds, "n_rows": e.n_rows,
                                   "n_units": e.n_units}  # fmt: skip
        out["stages"][stage] = figures
    for metric in PAIRED_METRICS:
        for stage, versus in _versus(stages, reference, degraded):
            pairs = list(dict.fromkeys(zip(per_seed[stage], per_seed[versus], strict=True)))
            if compared := _compare(lineage, pairs, stage, versus, metric):
                out["paired"].append(compared)
    out["delta_cka"] = _delta_cka(lineage, seeded, stages, reference, degraded)
    out["misalignment_vs_accuracy"] = _misalignment(lineage, seeded, reference, accuracy_metric)
    return out


def _cka_last(lineage: Lineage, seeded: Seeded, state: str, reference: str) -> float | None:
    """CKA of `state` to its seed's reference at the last layer (1 for the reference)."""
    ref = seeded.reference_of(state, reference)
    if state == ref:
        return 1.0
    return lineage.meta(state).metrics.get(f"cka/{lineage.label(ref)}/last_layer")


def _delta_cka(
    lineage: Lineage, seeded: Seeded, stages: list[str], reference: str, degraded: str
) -> dict[str, Any]:
    """Per stage after `degraded`: CKA to the reference (last layer) minus the degraded
    state's, seed by seed; the mean and its t interval over seeds."""
    out = {}
    for stage in stages[stages.index(degraded) + 1 :] if degraded in stages else []:
        deltas = []
        for seed in seeded.seeds or (None,):
            after = _cka_last(lineage, seeded, seeded.state(stage, seed), reference)
            before = _cka_last(lineage, seeded, seeded.state(degraded, seed), reference)
            if after is not None and before is not None:
                deltas.append(after - before)
        if deltas:
            mean, low, high = seed_interval(deltas)
            out[stage] = {"mean": mean, "ci_low": low, "ci_high": high, "n_seeds": len(deltas)}
    return out


def _misalignment(
    lineage: Lineage, seeded: Seeded, reference: str, metric: str
) -> dict[str, Any] | None:
    """Pearson r between 1 − CKA (last layer) and the accuracy change against the state's own
    seed's reference, over every state and seed, with its Fisher-z interval."""
    xs, ys = [], []
    for state in seeded.stages:
        ref = seeded.reference_of(state, reference)
        cka = _cka_last(lineage, seeded, state, reference)
        acc, ref_acc = (lineage.meta(s).metrics.get(metric) for s in (state, ref))
        if state != ref and None not in (cka, acc, ref_acc):
            xs.append(1 - cka)
            ys.append(acc - ref_acc)
    if len(xs) < 4 or np.ptp(xs) == 0 or np.ptp(ys) == 0:
        return None
    c = correlation(xs, ys)
    return {"r": c.r, "ci_low": c.low, "ci_high": c.high, "p_value": c.p_value, "n": c.n}


def over_seeds_section(over: Mapping[str, Any]) -> list[str]:
    """The stages over their seeds: accuracy, paired differences, ΔCKA, the correlation."""
    seeds = ", ".join(map(str, over["seeds"]))
    lines = [
        f"## Over seeds ({len(over['seeds'])}: {seeds})",
        "",
        "| stage | metric | mean (%) | 95% CI | seeds | rows |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for stage, figures in over["stages"].items():
        for metric, f in figures.items():
            lines.append(
                f"| {stage} | {metric} | {100 * f['mean']:.1f} | {100 * f['ci_low']:.1f}"
                f"–{100 * f['ci_high']:.1f} | {f['n_seeds']} | {f['n_rows']} |"
            )
    lines += [
        "",
        "Intervals: the bootstrap over seeds and, crossed with them, eval rows (units "
        "where rows share one).",
        "",
    ]
    lines += paired_section(over["paired"], seeds=True)
    if over["delta_cka"]:
        lines += [
            "| stage | ΔCKA, last layer | 95% CI (t over seeds) | seeds |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {st} | {d['mean']:+.4f} | {_signed(d['ci_low'])} to {_signed(d['ci_high'])} "
            f"| {d['n_seeds']} |"
            for st, d in over["delta_cka"].items()
        ]
        lines += [
            "",
            "ΔCKA: CKA to the seed's reference minus the degraded state's, seed by seed.",
            "",
        ]
    m = over["misalignment_vs_accuracy"]
    if m is not None:
        lines += [
            f"Misalignment (1 − CKA) against the accuracy change, over {m['n']} states "
            f"of every seed: Pearson r = {m['r']:.2f} (95% CI {m['ci_low']:.2f} to "
            f"{m['ci_high']:.2f}, p = {m['p_value']:.2g}).",
            "",
        ]
    return lines


def _signed(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:+.4f}"


def over_seeds_frame(over: Mapping[str, Any]) -> pd.DataFrame:
    """The stages' figures over seeds as results.parquet rows (state: the stage's name)."""
    rows = [
        {
            "state": stage,
            "kind": "over seeds",
            "parents": "",
            "metric": metric,
            "value": f["mean"],
            "ci_low": f["ci_low"],
            "ci_high": f["ci_high"],
            "n_rows": f["n_rows"],
            "n_seeds": f["n_seeds"],
        }
        for stage, figures in over["stages"].items()
        for metric, f in figures.items()
    ]
    stages = {c["state"] for c in over["paired"]}
    paired = paired_frame(over["paired"], dict.fromkeys(stages, "over seeds"),
                          dict.fromkeys(stages, ""))  # fmt: skip
    return pd.concat([pd.DataFrame(rows, columns=RESULT_COLUMNS), paired], ignore_index=True)


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
    seeded: Seeded | None = None,
) -> Path:
    """Write report.md, results.parquet, summary.json and the figures into `out_dir`;
    returns report.md. With `seeded` seeds, each stage's figures over its seeds come first,
    then each seed's own tables and figures."""
    seeded = seeded or Seeded.of(dict.fromkeys(states))
    over = over_seeds(lineage, seeded, reference, degraded, accuracy_metric)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".report-", dir=out_dir))
    try:
        lines = [f"# {title}", ""]
        if provenance is not None:
            lines += [f"- {line}" for line in summary(dict(provenance))] + [""]
        frames = [over_seeds_frame(over)] if seeded.seeds else []
        lines += over_seeds_section(over) if seeded.seeds else []
        for seed in seeded.seeds or (None,):
            part = [s for s in seeded.seed_states(seed) if s in states]
            ref, deg = seeded.state(reference, seed), seeded.state(degraded, seed)
            if seed is None:  # one seed: the very comparisons `over_seeds` made
                comparisons = over["paired"]
            else:
                comparisons = paired_comparisons(lineage, part, ref, deg)
            part_lines, frame = seed_part(
                tmp, lineage, part, {k: v for k, v in cka_frames.items() if k in part},
                comparisons, reference=ref, degraded=deg, accuracy_metric=accuracy_metric,
                suffix="" if seed is None else f"-s{seed}",
            )  # fmt: skip
            lines += ([f"## Seed {seed}", ""] if seed is not None else []) + part_lines
            frames.append(frame)
        lines += ["## Wall time per stage (s)", "", "| stage | seconds |", "|---|---:|"]
        lines += [f"| {k} | {'up to date, not rerun' if v == 0.0 else f'{v:.0f}'} |"
                  for k, v in timings.items()]  # fmt: skip
        lines += ["", "Every metric: results.parquet (one row per state × metric); each "
                  "stage's figures with their intervals: summary.json."]  # fmt: skip
        results = pd.concat(frames, ignore_index=True).drop_duplicates(["state", "metric"])
        results.to_parquet(tmp / "results.parquet", index=False)
        (tmp / "summary.json").write_text(json.dumps(_json(over), indent=2) + "\n")
        (tmp / "report.md").write_text("\n".join(lines) + "\n")
        for path in sorted(tmp.iterdir(), key=lambda p: p.name == "report.md"):  # report last
            os.replace(path, out_dir / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / "report.md"


def _json(value: Any) -> Any:
    """Plain JSON: NaN (an interval one seed cannot give) as null, numpy numbers as floats."""
    if isinstance(value, Mapping):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    return None if isinstance(value, float) and math.isnan(value) else value


def seed_part(
    figures: Path, lineage: Lineage, states: Sequence[str], cka_frames: Mapping[str, Any],
    comparisons: Sequence[Mapping[str, Any]], *, reference: str, degraded: str,
    accuracy_metric: str, suffix: str,
) -> tuple[list[str], pd.DataFrame]:  # fmt: skip
    """One seed's tables and figures (the states shared by every seed included): accuracy,
    recovery, its paired `comparisons`, general capability, CKA; and its results.parquet
    rows."""
    df = results_frame(lineage, states)
    wide = df.pivot_table(index="state", columns="metric", values="value").reindex(states)
    plot_accuracy(wide, figures / f"accuracy{suffix}.png")
    lines = accuracy_sections(wide, states, reference, degraded, accuracy_metric, suffix)
    lines += paired_section(comparisons)
    lines += preflight_section(lineage, states)
    if cka_frames:
        lines += cka_section(wide, states, cka_frames, lineage.label(reference), figures,
                             reference=reference, degraded=degraded,
                             accuracy_metric=accuracy_metric, suffix=suffix)  # fmt: skip
    meta = df.drop_duplicates("state").set_index("state")
    paired = paired_frame(comparisons, meta["kind"], meta["parents"])
    return lines, pd.concat([df, paired], ignore_index=True)


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
    wide: pd.DataFrame, states: Sequence[str], reference: str, degraded: str, metric: str,
    suffix: str = "",
) -> list[str]:  # fmt: skip
    """Task accuracy, the recovery table, general capability and held-out English."""
    lines = ["## Task accuracy (%)", "", accuracy_table(wide, TASK_COLUMNS), "",
             f"![accuracy by stage](accuracy{suffix}.png)", ""]  # fmt: skip
    lines += recovery_rows(wide, states, reference=reference, degraded=degraded, metric=metric)
    if "science/agree" in wide.columns:
        lines += ["## Science answers that follow their own reasoning (%)", "",
                  _table(wide, ("science/agree", "science/agree_demo")), "",
                  "Of the answers whose reasoning marks an option `yes`, the share whose "
                  "`<answer>` names that option (rows counted: `science/agree_n` in "
                  "results.parquet).", ""]  # fmt: skip
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
    suffix: str = "",
) -> list[str]:  # fmt: skip
    """CKA to the reference (last layer, mean over layers, sequence form) with ΔCKA against
    the degraded state, the by-layer figure, and misalignment against the accuracy change."""
    from sdftlab.cka.plots import plot_cka_by_layer, plot_misalignment_vs_accuracy

    plot_cka_by_layer(cka_frames, reference, figures / f"cka_by_layer{suffix}.png")
    cka_col, mean_col = f"cka/{label}/last_layer", f"cka/{label}/mean_over_layers"
    base_cka = wide.loc[degraded, cka_col] if cka_col in wide.columns else float("nan")
    base_mean = wide.loc[degraded].get(mean_col, float("nan"))
    lines = [f"## CKA to `{reference}` (ΔCKA vs `{degraded}`)", "",
             "| state | CKA, last layer | ΔCKA | CKA, mean over layers | ΔCKA | "
             "sequence CKA, last layer |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    points = []
    ref_acc = wide.loc[reference, accuracy_metric] if accuracy_metric in wide else None
    for state in states:
        if (
            state == reference
            or cka_col not in wide.columns
            or math.isnan(wide.loc[state, cka_col])
        ):
            continue  # a state shared by every seed is compared with the first seed's reference
        cka = wide.loc[state, cka_col]
        seq = wide.loc[state].get(f"cka/{label}/sequence_last_layer", float("nan"))
        mean = wide.loc[state].get(mean_col, float("nan"))
        lines.append(f"| {state} | {cka:.4f} | {cka - base_cka:+.4f} | {mean:.4f} | "
                     f"{mean - base_mean:+.4f} | {seq:.4f} |")  # fmt: skip
        if ref_acc is not None and not math.isnan(wide.loc[state, accuracy_metric]):
            points.append((state, 1 - cka, wide.loc[state, accuracy_metric] - ref_acc))
    lines += ["", f"![CKA to the reference by layer](cka_by_layer{suffix}.png)", ""]
    lines += cka_robustness(cka_frames, states, degraded, wide, accuracy_metric, ref_acc)
    if points:
        path = figures / f"misalignment_vs_accuracy{suffix}.png"
        r = plot_misalignment_vs_accuracy(points, path)
        why = " (undefined: fewer than 3 states or a constant axis)" if math.isnan(r) else ""
        lines += [f"Pearson r between CKA misalignment (1 − CKA) and the change in "
                  f"{accuracy_metric} against `{reference}`: {r:.3f} over {len(points)} "
                  f"states{why}{_interval_of(points, r)}.", "",
                  f"![misalignment against the accuracy change]({path.name})",
                  ""]  # fmt: skip
    return lines


def _interval_of(points: Sequence[tuple[str, float, float]], r: float) -> str:
    """The correlation's 95% Fisher-z interval and p-value, where there are states enough."""
    if math.isnan(r) or len(points) < 4:
        return "; too few states for an interval (4 needed)" if not math.isnan(r) else ""
    c = correlation([p[1] for p in points], [p[2] for p in points])
    return f", 95% CI {c.low:.2f} to {c.high:.2f}, p = {c.p_value:.2g}"
