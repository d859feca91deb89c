"""Connect to Ray the same way on a laptop and on a cluster.

Under `ray job submit` (or with `RAY_ADDRESS` set) the driver joins the existing cluster;
otherwise `ray.init()` starts a local one. The dashboard stays on (Ray Train V2 needs the
State API behind it) but listens on 127.0.0.1 only. `RAY_DATA_DISABLE_PROGRESS_BARS` and
`HF_HUB_DISABLE_PROGRESS_BARS` (transformers' loading and saving bars), when set in the
driver's environment, reach every worker: the pipelines set them, since they print a progress
line per stage and the bars from inside the train workers would bury it.
Ray Data's and Ray Train's own INFO lines (each dataset's execution, every split coordinator,
each report and checkpoint) go to their log files in the Ray session directory, not the
console (`ray_data_logging.yaml`, and `LoggingConfig` in `train.trainer.make_trainer`): the
stages' progress lines are what a person reads.
Ray Train's print patching is off in every worker (`RAY_TRAIN_ENABLE_PRINT_PATCH=0`): it
logs each `print` and also tees it to stdout whenever `sys.stdout` is wrapped, which in a Ray
worker it always is, so every progress line of a train worker reached the driver twice.

A local cluster starts its workers at niceness 0 instead of Ray's 15
(`RAY_worker_niceness`; a value already in the environment wins). On a laptop the train
workers and rollout actors do all the work, and at 15 a busy driver (drawing Ray Data's
progress bars under `sdftlab degrade` / `recover`) preempts one of a worker's two compute
threads and stalls the other (docs/BENCHMARKS.md). A cluster keeps its own setting.

    >>> ensure_ray()          # idempotent
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sdftlab import console
from sdftlab.config import TRUST_REMOTE_CODE_ENV, trust_remote_code

RAY_DATA_LOGGING = Path(__file__).with_name("ray_data_logging.yaml")

PASSED_THROUGH = (
    "RAY_DATA_LOGGING_CONFIG",
    "RAY_DATA_DISABLE_PROGRESS_BARS",
    "HF_HUB_DISABLE_PROGRESS_BARS",
    "SDFTLAB_CPU_ALLOC",
)


def worker_env() -> dict[str, str]:
    """The environment every Ray worker gets (the `runtime_env` of `ensure_ray`)."""
    env_vars = {
        "RAY_TRAIN_V2_ENABLED": "1",
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # a worker's print reaches the driver once
        "TOKENIZERS_PARALLELISM": "false",
    }
    if trust_remote_code():  # an explicit opt-in reaches every worker, or none
        env_vars[TRUST_REMOTE_CODE_ENV] = "1"
    env_vars.update({k: os.environ[k] for k in PASSED_THROUGH if k in os.environ})
    return env_vars


def ensure_ray(num_cpus: int | None = None, **kwargs: Any) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(RAY_DATA_LOGGING))
    runtime_env = {"env_vars": worker_env()}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=runtime_env, **kwargs)
        console.route_worker_lines()
        return
    os.environ.setdefault("RAY_worker_niceness", "0")  # read by the raylet ray.init starts
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        runtime_env=runtime_env,
        log_to_driver=True,
        **kwargs,
    )
    console.route_worker_lines()  # a quiet command: sdftlab's worker lines only, unprefixed
