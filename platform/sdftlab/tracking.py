"""Experiment tracking with MLflow: one experiment per pipeline or sweep, one run per stage or
trial, every run of a pipeline side by side in `mlflow ui`.

A pipeline run is an MLflow run (named by its run id, `runs/<pipeline>/<run-id>/`) whose
children are its stages:

- params: the stage's resolved config, flattened (`lr`, `rollout.max_new_tokens`, …);
- metrics: the per-step training log as the workers report it (loss, KL, live CKA, tokens/s,
  …, logged by a Ray Train callback in the controller at each report, by step), the state's
  evaluation results, and its CKA to the reference per layer (`cka/<ref>/by_layer`, step =
  the layer's index; `sequence_cka/<ref>/by_layer` likewise);
- tags: the stage's kind, parents and provenance (commit, lock hash, variant);
- the pipeline run holds the report, figures and results.parquet as artifacts.

A sweep logs through Ray Tune's own `MLflowLoggerCallback`: one run per trial.

The store: `tracking.uri`, else `$MLFLOW_TRACKING_URI`, else `sqlite:///<home>/mlflow.db`
(artifacts beside it, in `<home>/mlartifacts`). `tracking.mlflow=false` turns it off. The
store is opened before any work, and a path that is not an MLflow store is refused then,
untouched.

    .venv/bin/mlflow ui --backend-store-uri sqlite:///.sdftlab/mlflow.db
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field

from sdftlab.config import StrictModel
from sdftlab.errors import ConfigError

SQLITE_MAGIC = b"SQLite format 3\x00"
MAX_PARAM = 500  # MLflow's limit on a param's value (characters)


class TrackingSpec(StrictModel):
    """Where a pipeline or sweep logs its runs."""

    mlflow: bool = Field(True, description="log stages, evaluation, CKA and the report to MLflow")
    uri: str | None = Field(
        None,
        description="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else "
        "sqlite:///<home>/mlflow.db)",
    )
    experiment: str | None = Field(None, description="MLflow experiment (default: the name)")


def tracking_uri(spec: TrackingSpec, home: Path) -> str:
    return spec.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home}/mlflow.db"


def check_store(uri: str) -> None:
    """Refuse a store that cannot be one, before MLflow opens (and could write to) it."""
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_absolute():
            path = Path.cwd() / path
        if path.is_dir():
            raise ConfigError(f"tracking.uri: {path} is a directory, not an MLflow SQLite store; "
                              "name a .db file (e.g. sqlite:///.sdftlab/mlflow.db)")  # fmt: skip
        if path.is_file() and path.stat().st_size > 0:
            with path.open("rb") as fh:
                if fh.read(len(SQLITE_MAGIC)) != SQLITE_MAGIC:
                    raise ConfigError(
                        f"tracking.uri: {path} is not an SQLite database (a corrupt or foreign "
                        "file; left untouched); point tracking.uri at another file, or move "
                        "this one away"
                    )
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
    elif "://" not in uri or uri.startswith("file:"):
        path = Path(uri.removeprefix("file://"))
        if path.is_file():
            raise ConfigError(f"tracking.uri: {path} is a file, not an MLflow store directory; "
                              "use sqlite:///PATH.db or a directory")  # fmt: skip


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = str(value)[:MAX_PARAM]
    return out


def numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite-or-not numbers of a metrics dict (MLflow takes floats only)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


class Tracker:
    """One MLflow experiment and the run of one pipeline (or sweep) in it."""

    def __init__(self, uri: str, experiment_id: str, run_id: str) -> None:
        from mlflow import MlflowClient

        self.uri = uri
        self.client = MlflowClient(uri)
        self.experiment_id = experiment_id
        self.run_id = run_id

    @classmethod
    def open(
        cls,
        spec: TrackingSpec,
        home: Path,
        *,
        experiment: str,
        run_name: str,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        log: Any = print,
    ) -> Tracker | None:
        """The pipeline's run in its experiment (made if new); None when tracking is off."""
        if not spec.mlflow:
            return None
        uri = tracking_uri(spec, home)
        check_store(uri)
        try:
            from mlflow import MlflowClient
        except ImportError:
            log("tracking: MLflow is not installed (bash scripts/setup.sh installs it); "
                "this run is not tracked")  # fmt: skip
            return None
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        name = spec.experiment or experiment
        try:
            client = MlflowClient(uri)
            found = client.get_experiment_by_name(name)
            if found is None:
                artifacts = None
                if uri.startswith("sqlite:///"):
                    store = Path(uri.removeprefix("sqlite:///")).resolve()
                    artifacts = (store.parent / "mlartifacts" / name).as_uri()
                experiment_id = client.create_experiment(name, artifact_location=artifacts)
            else:
                experiment_id = found.experiment_id
            run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
        except Exception as err:  # MLflow raises many kinds; each means the store is unusable
            reason = str(err).splitlines()[0][:200]
            raise ConfigError(
                f"tracking.uri: the MLflow store {uri} cannot be opened ({reason}); point "
                "tracking.uri at a working store, or set tracking.mlflow=false"
            ) from None
        tracker = cls(uri, experiment_id, run.info.run_id)
        tracker.log_params(tracker.run_id, params)
        log(f"tracking: MLflow experiment {name!r}, run {run_name} ({uri})")
        return tracker

    def stage(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        """A child run for stage `name`; its run id."""
        run = self.client.create_run(
            self.experiment_id,
            run_name=name,
            tags={"mlflow.parentRunId": self.run_id, "state": name, **tags},
        )
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = [Param(k[:250], v) for k, v in _flatten(params).items()]
        for i in range(0, len(flat), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(run_id, params=flat[i : i + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int = 0) -> None:
        log_metrics(self.client, run_id, metrics, step)

    def log_cka(self, run_id: str, frame: Any, reference: str) -> None:
        """CKA to `reference` per layer, as one metric whose step is the layer's index."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [
            Metric(f"{column}/{reference}/by_layer", float(row[column]), now, int(row["layer_a"]))
            for _, row in frame.iterrows()
            for column in ("cka", "sequence_cka")
            if column in frame.columns
        ]
        for i in range(0, len(rows), 1000):
            self.client.log_batch(run_id, metrics=rows[i : i + 1000])

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def log_artifacts(self, directory: Path) -> None:
        self.client.log_artifacts(self.run_id, str(directory))

    def train_callback(self, run_id: str) -> Any:
        """A Ray Train callback that logs every report of a stage's workers to `run_id`."""
        return mlflow_reports(self.uri, run_id)


def log_metrics(client: Any, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    rows = [Metric(k, v, now, step) for k, v in numeric(metrics).items()]
    for i in range(0, len(rows), 1000):  # MLflow takes at most 1000 metrics a batch
        client.log_batch(run_id, metrics=rows[i : i + 1000])


def mlflow_reports(uri: str, run_id: str) -> Any:
    """A Ray Train `UserCallback`: each report's metrics (rank 0's) logged to MLflow run
    `run_id` at its `step`. It runs in Ray Train's controller, which opens the store itself."""
    from ray.train import UserCallback

    class MLflowReports(UserCallback):
        client: Any = None  # opened at the first report, in the controller; kept for the run

        def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
            if self.client is None:
                from mlflow import MlflowClient

                logging.getLogger("mlflow").setLevel(logging.WARNING)
                self.client = MlflowClient(uri)
            report = metrics[0]
            log_metrics(self.client, run_id, report, int(report.get("step", 0)))

    return MLflowReports()


def tune_callback(spec: TrackingSpec, home: Path, experiment: str) -> list[Any]:
    """Ray Tune's MLflow logger (one run per trial) for a sweep; [] when tracking is off."""
    if not spec.mlflow:
        return []
    uri = tracking_uri(spec, home)
    check_store(uri)
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return [MLflowLoggerCallback(tracking_uri=uri, experiment_name=spec.experiment or experiment)]
