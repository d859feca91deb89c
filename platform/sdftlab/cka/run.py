"""Compare two lineage states by linear CKA, print a per-layer table, record summary metrics.

Linear CKA (Kornblith et al. 2019) between a student's and a teacher's hidden states on the
same inputs — prompt plus ground-truth answer — the measurement of "CKA as a lens on
self-distillation recovery": how far a degraded or self-distilled state's representations
sit from a reference state's, layer by layer. `compare_states` runs the comparison (in this
process, or on the Ray actor pool with ``actors=n``) and records on state ``a``:

- ``cka/<b>/last_layer``: the per-sample form at the last layer (hidden-state index L, the
  final-norm output), **biased linear CKA, answer_mean pooling, every dimension
  standardized to zero mean and unit variance over the evaluation set** — our reading of the
  paper's §5.4 per-sample comparison. Biased because the standardized biased form is exact
  from one pass of statistics and is the form Kornblith et al. report; the debiased value
  is in the table (``cka_debiased``) and, standardized, behind ``debiased=True``.
- ``cka/<b>/mean_over_layers``: the same value averaged over the diagonal layer pairs of
  the decoder layers (hidden-state indices 1..L; the embedding lookup, index 0, is left
  out — it is a table, not a computed representation).
- ``cka/<b>/sequence_last_layer``: the per-sequence (token-trajectory, L×L kernel) form at
  the last layer, averaged over sequences.

The recorded values use the call's `CKAOptions`; the defaults are the forms above.

    sdftlab cka --state forgot --reference expert --data science

    >>> df = compare_states(lineage, "forgot", "expert", examples)
    >>> print(format_table(df))
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import Field

from sdftlab.cka.capture import diagonal_rows, summary_metrics  # noqa: F401 (re-exported)
from sdftlab.cka.pool import DEFAULT, CKAOptions, cka_local, cka_over_dataset
from sdftlab.config import load_config
from sdftlab.data.loaders import load_task_file, task_source
from sdftlab.errors import ConfigError
from sdftlab.lineage import Lineage
from sdftlab.specs import CKASpec


def compare_states(
    lineage: Lineage,
    a: str,
    b: str,
    examples: Sequence[Any],
    opts: CKAOptions = DEFAULT,
    *,
    actors: int | None = None,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    record: bool = True,
    log: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """CKA of state `a` against reference `b` on `examples`, one row per layer pair.

    ``actors=None`` runs in this process (`cka_local`); an int runs the Ray actor pool
    (`cka_over_dataset`), each actor with `cpus_per_actor` CPUs and `gpus_per_actor` GPUs.
    With ``record=True`` the summary metrics (module docstring) are merged into state `a`'s
    metrics; `a` must then be a lineage state.
    """
    if record:
        lineage.require(a)  # fail before the forward passes, not after
    if actors is None:
        df = cka_local(lineage, a, b, examples, opts)
    else:
        df = cka_over_dataset(
            lineage, a, b, examples, opts, actors=actors, log=log,
            cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor,
        )  # fmt: skip
    if record:
        metrics = summary_metrics(df, lineage.label(b))
        lineage.record_metrics(a, metrics)
        if log is not None:
            log("recorded " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return df


def _fmt(x: Any, digits: int = 4) -> str:
    if isinstance(x, float) and math.isnan(x):
        return "—"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def format_table(df: pd.DataFrame, title: str | None = None) -> str:
    """A markdown table, one line per layer pair."""
    header = (
        "| layer a | layer b | depth | CKA | biased | debiased | standardized "
        "| sequence CKA (± se) | n |"
    )
    lines = [f"**{title}**", ""] if title else []
    lines += [header, "|" + "---:|" * 9]
    for r in df.itertuples(index=False):
        seq = _fmt(float(r.sequence_cka))
        if not math.isnan(float(r.sequence_cka_se)):
            seq += f" ± {float(r.sequence_cka_se):.4f}"
        lines.append(
            f"| {r.layer_a} | {r.layer_b} | {float(r.relative_depth):.2f} | "
            f"{_fmt(float(r.cka))} | {_fmt(float(r.cka_biased))} | "
            f"{_fmt(float(r.cka_debiased))} | {_fmt(float(r.cka_standardized))} | {seq} | "
            f"{r.n_samples} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------- CLI helpers


def load_examples(spec: str, data_dir: Path | None, limit: int | None = None) -> list[Any]:
    """``science`` (the world's eval split) or ``science=PATH`` → TaskExamples."""
    task, path = task_source(spec, data_dir, "eval")
    return load_task_file(path, task, limit=limit)


class CKACommand(CKASpec):
    """``sdftlab cka``: state `a` against `reference` (``--b``) on `data`, every row by default.

    The pipeline's `CKASpec` plus the comparison's options; the command-line flags and any
    ``key=value`` arguments are validated here, with the pipeline's error messages.
    """

    a: str = Field(description="the state to measure; its metrics receive the summary")
    actors: int | None = Field(None, gt=0, description="Ray actors (None: in this process)")
    limit: int | None = Field(None, ge=4, description="the first N rows (default all)")
    batch_size: int = Field(8, gt=0)
    layers: Any = Field("diagonal", description="diagonal | last | all | 0,2,4")
    pooling: Literal["answer_mean", "last"] = "answer_mean"
    debiased: bool = False
    plot: str | None = Field(None, description="write a CKA-by-layer PNG here")
    record: bool = True


_FLAGS = {  # flag -> CKACommand field
    "a": "a", "b": "reference", "data": "data", "limit": "limit", "actors": "actors",
    "batch_size": "batch_size", "layers": "layers", "pooling": "pooling", "plot": "plot",
}  # fmt: skip


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``sdftlab cka``: flags for the common fields, ``key=value`` for all."""
    parser.add_argument("--state", "--a", dest="a", help="the state measured (metrics go here)")
    parser.add_argument("--reference", "--b", dest="b", help="the reference state")
    parser.add_argument("--data", help="TASK or TASK=PATH (default science)")
    parser.add_argument("--limit", help="first N examples only")
    parser.add_argument("--actors", help="Ray actors (default: in this process)")
    parser.add_argument("--batch-size")
    parser.add_argument("--layers", help="diagonal | last | all | 0,2,4")
    parser.add_argument("--pooling", help="answer_mean | last")
    parser.add_argument("--debiased", action="store_true", help="debiased headline CKA")
    parser.add_argument("--plot", help="write a CKA-by-layer PNG here")
    parser.add_argument("--no-record", action="store_true", help="do not record metrics")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="CKACommand fields")


def command_from_args(args: argparse.Namespace) -> CKACommand:
    """The validated `CKACommand` of parsed ``sdftlab cka`` arguments."""
    given = " ".join(args.overrides)
    for flag, field in (("a", "--state"), ("b", "--reference")):
        if getattr(args, flag) is None and f"{_FLAGS[flag]}=" not in given:
            raise ConfigError(f"sdftlab cka: give {field} STATE (the state measured, and the "
                              "reference it is compared with)")  # fmt: skip
    overrides = [f"{field}={getattr(args, flag)}" for flag, field in _FLAGS.items()
                 if getattr(args, flag) is not None]  # fmt: skip
    if args.debiased:
        overrides.append("debiased=true")
    if args.no_record:
        overrides.append("record=false")
    return load_config(CKACommand, None, [*overrides, *args.overrides])


def run_cli(args: argparse.Namespace, lineage: Lineage, data_dir: Path | None) -> str:
    """Run ``sdftlab cka`` with parsed `args`; the table to print."""
    cmd = command_from_args(args)
    examples = load_examples(cmd.data, data_dir, cmd.limit)
    df = compare_states(
        lineage,
        cmd.a,
        cmd.reference,
        examples,
        CKAOptions(batch_size=cmd.batch_size, layers=cmd.layers, pooling=cmd.pooling,
                   debiased=cmd.debiased),
        actors=cmd.actors,
        cpus_per_actor=cmd.cpus_per_actor,
        gpus_per_actor=cmd.gpus_per_actor,
        record=cmd.record,
    )  # fmt: skip
    if cmd.plot:
        from sdftlab.cka.plots import plot_cka_by_layer

        plot_cka_by_layer({cmd.a: df}, lineage.label(cmd.reference), cmd.plot)
    return format_table(df, title=f"CKA of {cmd.a} with {cmd.reference} on {cmd.data}")
