"""The Ray Train side every training stage's driver shares: the `TorchTrainer` (its workers,
storage, failure policy and datasets), the run's name, report logs, and `fit_and_save` —
train, then save the final checkpoint's state in the lineage."""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sdftlab.cka.live import live_cka_metrics
from sdftlab.lineage import Lineage, StateMeta


def run_name(kind: str, dst: str, cfg: Any, *inputs: str) -> str:
    """The Ray Train run of a stage. A restarted run finds its checkpoints under the same
    name — but only for the same config on the same input weights (`inputs`: content hashes),
    never a finished run of another student that happens to share the config."""
    digest = hashlib.sha256("|".join([cfg.stable_hash(), *inputs]).encode()).hexdigest()[:8]
    return f"{kind}-{dst}-{digest}"


def make_trainer(
    loop: Callable[[dict[str, Any]], None],
    job: Any,
    *,
    run_name: str,
    datasets: dict[str, Any],
    callbacks: Sequence[Any] = (),
) -> Any:
    """The `TorchTrainer` every training stage uses: `job.spec.num_workers` workers (DDP or
    FSDP2, `sharding`; gloo on CPU, NCCL on GPU) each running `loop({"job": job})`, the latest
    checkpoint kept under the Ray storage path, and `max_failures` restarts from it when a
    worker dies.

    The datasets reach the workers in order (`preserve_order`): batches are then the same
    from run to run whatever the load, and a resumed worker that skips the batches it had
    seen skips the very ones the killed run saw."""
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
    )
    from ray.train.torch import TorchTrainer

    from sdftlab.paths import storage_path
    from sdftlab.placement import scaling_config

    spec = job.spec
    with warnings.catch_warnings():  # Ray's own use of its deprecated `exclude_resources`
        warnings.filterwarnings("ignore", message=".*exclude_resources", category=Warning)
        ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True
    return TorchTrainer(
        loop,
        train_loop_config={"job": job},
        scaling_config=scaling_config(spec),  # what `sdftlab plan` counts (`placement`)
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path(),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=spec.max_failures),
            # Ray Train's own INFO lines (each report, each checkpoint) go to its log files,
            # not the console: the stage's progress lines are what a person reads.
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=list(callbacks),
        ),
        datasets=datasets,
        # every worker reads every row in the same order and takes its rows of each global
        # batch (`sharding.rank_rows`): a step's batch is the same for 1 or N workers
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ingest),
    )


def fit_and_save(
    loop: Callable[[dict[str, Any]], None],
    job: Any,
    *,
    run_name: str,
    datasets: dict[str, Any],
    callbacks: Sequence[Any],
    lineage: Lineage,
    name: str,
    kind: str,
    parents: list[str],
    overwrite: bool,
    config: dict[str, Any],
    metrics: Callable[[dict[str, Any], float], dict[str, float]],
) -> tuple[StateMeta, dict[str, Any], float]:
    """Train (`make_trainer`), then save the last checkpoint's state as `name`, with
    `metrics(final report, seconds)` and the last live CKA measurement; (the state's
    metadata, the final report, seconds)."""
    trainer = make_trainer(loop, job, run_name=run_name, datasets=datasets, callbacks=callbacks)
    t0 = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"{kind} {name!r} finished without a checkpoint: {result.error}")
    final = result.metrics
    with result.checkpoint.as_directory() as d:
        meta = lineage.save_dir(
            name, Path(d) / "model", kind=kind, parents=parents, overwrite=overwrite,
            config=config, metrics={**metrics(final, seconds), **live_cka_metrics(final)},
        )  # fmt: skip
    return meta, final, seconds


def report_log(path: Path) -> Any:
    """A Ray Train callback (`recover(callbacks=...)`, a trainer's `RunConfig`) that appends
    each report's metrics — rank 0's, one JSON line a report — to `path`: a run's curve step
    by step (`read_report_log`). It runs in Ray Train's controller: `path` must be on a disk
    the controller's node writes (any local path on a single machine)."""
    from ray.train import UserCallback

    class ReportLog(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
            with open(path, "a") as f:
                f.write(json.dumps(metrics[0]) + "\n")

    return ReportLog()


def read_report_log(path: Path) -> list[dict[str, Any]]:
    """The reports `report_log` wrote, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]
