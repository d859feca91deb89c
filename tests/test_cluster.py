"""cluster.yaml validates against Ray's own cluster-launcher schema; the local cluster's worker
settings."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _validate(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_yaml_passes_rays_schema():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    _validate(config)
    assert config["head_node_type"] in config["available_node_types"]
    workers = [t for t in config["available_node_types"] if t != config["head_node_type"]]
    assert workers, "a GPU worker node type is expected beside the head"


def test_worker_env_passes_the_progress_bar_switches_and_only_opt_ins(monkeypatch):
    from sdftlab.config import TRUST_REMOTE_CODE_ENV
    from sdftlab.raycluster import worker_env

    switches = ("RAY_DATA_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS")
    for name in (*switches, TRUST_REMOTE_CODE_ENV):
        monkeypatch.delenv(name, raising=False)
    base = worker_env()
    assert base["RAY_TRAIN_V2_ENABLED"] == "1"
    assert not {*switches, TRUST_REMOTE_CODE_ENV} & set(base)
    for name in (*switches, TRUST_REMOTE_CODE_ENV):
        monkeypatch.setenv(name, "1")
    env = worker_env()
    assert all(env[name] == "1" for name in (*switches, TRUST_REMOTE_CODE_ENV))


def test_a_local_cluster_runs_its_workers_at_niceness_zero():
    """Ray's default of 15 lets every raylet, GCS or driver wake-up preempt a train worker."""
    import ray

    from sdftlab.raycluster import ensure_ray

    ensure_ray(num_cpus=2)

    @ray.remote(num_cpus=0)
    def niceness() -> int:
        return os.nice(0)

    assert ray.get(niceness.remote()) == 0


def test_a_train_workers_print_reaches_the_driver_once(tmp_path):
    """Ray Train V2 patches `print` in its workers to log it, and tees it to stdout as well when
    `sys.stdout` is wrapped — which in a Ray worker it always is — so every progress line of an
    SFT or SDFT worker was shown twice. The workers run with the patch off."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from sdftlab.raycluster import ensure_ray

    ensure_ray(num_cpus=2)

    def loop(_config: dict) -> None:
        import builtins

        if builtins.print.__name__ != "print":
            raise AssertionError(f"print in the train worker is {builtins.print.__qualname__}")

    trainer = TorchTrainer(
        loop,
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="print-once", storage_path=str(tmp_path)),
    )
    assert trainer.fit().error is None  # a worker's error fails fit(); this one did not
