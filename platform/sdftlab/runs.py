"""Pipeline runs that never overwrite one another: a directory per run, listed and compared.

Each run of a pipeline writes into a directory of its own under the config's `report.dir`
(`runs/<pipeline>/`), named by its run id — the UTC start time and 6 hex digits of the
resolved config's hash, `20261207-091502-3fa9c1`:

    run.json          run id, pipeline, resolved config, provenance, status (running,
                      finished, failed), timings, headline metrics (the report's accuracy
                      metric per state)
    report.md  results.parquet  *.png        when the run finishes

`runs/<pipeline>/latest` points at the last run that finished. Nothing of an earlier run is
touched by a later one (the lineage's states are shared, and a later run may replace a state
an earlier run made; each run's results.parquet keeps the figures it reported).

    sdftlab runs                                       # every run, with its headline metrics
    sdftlab runs compare forgetting/20261207-091502-3fa9c1 forgetting/latest
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from sdftlab.errors import SdftlabError
from sdftlab.paths import atomic_write

RUN_FILE = "run.json"
LATEST = "latest"


def new_run_id(config: Mapping[str, Any], now: datetime | None = None) -> str:
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    return f"{stamp}-{digest.hexdigest()[:6]}"


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    with atomic_write(path) as fh:
        json.dump(data, fh, indent=2, default=str)


def start_run(
    pipeline_dir: Path, run_id: str, *, pipeline: str, config: Mapping[str, Any],
    provenance: Mapping[str, Any],
) -> Path:  # fmt: skip
    """Make the run's directory (never an existing one) and its run.json; the directory."""
    pipeline_dir.mkdir(parents=True, exist_ok=True)
    run_dir, n = pipeline_dir / run_id, 1
    while True:
        try:
            run_dir.mkdir()
            break
        except FileExistsError:  # two runs of one config in the same second
            n += 1
            run_dir = pipeline_dir / f"{run_id}.{n}"
    _write_json(run_dir / RUN_FILE, {
        "run_id": run_dir.name, "pipeline": pipeline, "status": "running",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": dict(config), "provenance": dict(provenance),
    })  # fmt: skip
    return run_dir


def read_run(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / RUN_FILE).read_text())


def finish_run(run_dir: Path, status: str, **fields: Any) -> None:
    """Record the run's end (`finished` or `failed`, with timings, headline, error); a run
    that finished becomes the pipeline's `latest`."""
    info = read_run(run_dir) | fields
    info |= {"status": status, "ended_at": datetime.now(UTC).isoformat(timespec="seconds")}
    _write_json(run_dir / RUN_FILE, info)
    if status == "finished":
        link = run_dir.parent / LATEST
        tmp = run_dir.parent / f".{LATEST}-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(run_dir.name)
        os.replace(tmp, link)  # atomic: `latest` is always one whole run


def headline(results: pd.DataFrame, metric: str) -> dict[str, float]:
    """{state: value} of the report's accuracy metric."""
    rows = results[results["metric"] == metric]
    return {str(r.state): float(r.value) for r in rows.itertuples(index=False)}


def find_runs(root: Path) -> list[Path]:
    """Every run directory under `root` (a runs folder or one pipeline's), oldest first."""
    found = [p.parent for p in root.glob(f"*/{RUN_FILE}")]
    found += [p.parent for p in root.glob(f"*/*/{RUN_FILE}")]
    unique = {p.resolve(): p for p in found if p.name != LATEST and p.parent.name != LATEST}
    return sorted(unique.values(), key=lambda p: (read_run(p).get("started_at", ""), p.name))


def resolve_run(root: Path, ref: str) -> Path:
    """A run directory from `ref`: a path to one, `<pipeline>/<run-id>`, `<pipeline>/latest`,
    or a run id found under `root`."""
    for candidate in (Path(ref), root / ref):
        if (candidate / RUN_FILE).is_file():
            return candidate
    matches = [p for p in find_runs(root) if p.name == ref]
    if len(matches) == 1:
        return matches[0]
    known = [f"{p.parent.name}/{p.name}" for p in find_runs(root)]
    if len(matches) > 1:
        raise SdftlabError(f"run {ref!r} is in several pipelines under {root}: write "
                           f"<pipeline>/{ref} ({', '.join(known)})")  # fmt: skip
    listing = ", ".join(known[-8:]) if known else "none yet (run a pipeline: sdftlab demo)"
    raise SdftlabError(f"unknown run {ref!r} under {root}; known runs: {listing}")


def run_results(run_dir: Path) -> pd.DataFrame:
    path = run_dir / "results.parquet"
    if not path.is_file():
        status = read_run(run_dir).get("status", "unknown")
        raise SdftlabError(f"run {run_dir} has no results.parquet (status: {status}); compare "
                           "runs that finished (`sdftlab runs` lists them)")  # fmt: skip
    return pd.read_parquet(path)


def list_table(root: Path) -> str:
    """One line per run: pipeline, id, status, commit, lock, headline metrics."""
    runs = find_runs(root)
    if not runs:
        return f"(no runs under {root} — run a pipeline: sdftlab demo)"
    lines = [
        "| pipeline | run | status | commit | lock | headline |",
        "|---|---|---|---|---|---|",
    ]
    for run_dir in runs:
        info = read_run(run_dir)
        prov = info.get("provenance") or {}
        git = prov.get("git") or {}
        commit = (git.get("commit") or "?")[:8] + ("+dirty" if git.get("dirty") else "")
        head = info.get("headline") or {}
        metric = info.get("headline_metric", "")
        shown = " ".join(f"{s} {100 * v:.1f}" for s, v in head.items())
        lines.append(
            f"| {info.get('pipeline', run_dir.parent.name)} | {run_dir.name} | "
            f"{info.get('status', '?')} | {commit} | {(prov.get('lock') or '-')[:8]} | "
            f"{metric + ': ' if shown else ''}{shown} |"
        )
    return "\n".join(lines)


def compare(a_dir: Path, b_dir: Path, metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Per state and metric: run A's value, run B's, and B − A (states of either run)."""
    a, b = run_results(a_dir), run_results(b_dir)
    key = ["state", "metric"]
    both = a[[*key, "value"]].merge(b[[*key, "value"]], on=key, how="outer",
                                    suffixes=("_a", "_b"))  # fmt: skip
    if metrics:
        both = both[both["metric"].isin(metrics)]
    else:  # counts and timings are not results
        both = both[~both["metric"].str.endswith(("/n", "/n_demo", "/seconds"))]
    both["diff"] = both["value_b"] - both["value_a"]
    order = {s: i for i, s in enumerate(dict.fromkeys([*a["state"], *b["state"]]))}
    both = both.sort_values(by=["state", "metric"], key=lambda c: c.map(order) if c.name ==
                            "state" else c)  # fmt: skip
    return both.reset_index(drop=True)


def compare_table(frame: pd.DataFrame, a_name: str, b_name: str) -> str:
    def fmt(x: float, sign: str = "") -> str:
        return "–" if pd.isna(x) else f"{x:{sign}.4f}"

    lines = [f"A = {a_name}", f"B = {b_name}", "",
             "| state | metric | A | B | B − A |", "|---|---|---:|---:|---:|"]  # fmt: skip
    for r in frame.itertuples(index=False):
        lines.append(f"| {r.state} | {r.metric} | {fmt(r.value_a)} | {fmt(r.value_b)} | "
                     f"{fmt(r.diff, '+')} |")  # fmt: skip
    return "\n".join(lines)
