"""What each process of a stage asks Ray for, in one place.

A stage's processes — Ray Train workers, the vLLM engines that roll out for the student or
score for the teacher, the evaluation tasks, the CKA actors — each ask Ray for CPUs and GPUs.
The runtime builds those requests here (`scaling_config` for Ray Train, `Request.options` for
actors and tasks), and `sdftlab plan` counts the very same requests, so the GPUs a plan says a
stage holds are the GPUs the run asks for.

Memory is not asked of Ray: a request above a node's figure would leave the process pending
without an error, and the figure is an estimate. `sdftlab plan` holds each process's memory
against the config's `resources` section instead, before any work.

    >>> [r.role for r in stage_requests(recover_config)]
    ['train worker', 'rollout engine', 'teacher engine']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Request:
    """`count` processes of one role, each asking for `cpus` CPUs and `gpus` GPUs."""

    role: str
    count: int
    cpus: float
    gpus: float

    def options(self) -> dict[str, float]:
        """The `ray.remote(...)` / `.options(...)` keywords of one of them."""
        return {"num_cpus": self.cpus, "num_gpus": self.gpus}


def train_workers(spec: Any) -> Request:
    """A training stage's Ray Train workers (`specs.TrainSpec`): one GPU each on GPUs."""
    return Request("train worker", spec.num_workers, spec.cpus_per_worker,
                   1.0 if spec.use_gpu else 0.0)  # fmt: skip


def scaling_config(spec: Any) -> Any:
    """Ray Train's `ScalingConfig` for `train_workers(spec)`."""
    from ray.train import ScalingConfig

    workers = train_workers(spec)
    return ScalingConfig(
        num_workers=workers.count,
        use_gpu=workers.gpus > 0,
        resources_per_worker={"CPU": workers.cpus, "GPU": workers.gpus}
        if workers.gpus
        else {"CPU": workers.cpus},
    )


def engines(cfg: Any) -> list[Request]:
    """An SDFT stage's vLLM pools (`distill.config.RecoverConfig`): the student's rollout
    engines when it samples on vLLM, the teacher's when it scores there (`scoring: vllm`)."""
    r = cfg.rollout
    out = []
    if cfg.mode == "on_policy" and r.engine == "vllm":
        out.append(Request("rollout engine", r.actors, r.cpus_per_actor, r.gpus_per_actor))
    if cfg.scoring == "vllm" and cfg.teacher != "live":
        out.append(Request("teacher engine", r.actors, r.cpus_per_actor, r.gpus_per_actor))
    return out


def stage_requests(stage: Any) -> list[Request]:
    """Every process a training stage holds at once: its workers, and an SDFT stage's engines."""
    requests = [train_workers(stage)]
    if hasattr(stage, "scoring"):  # a distillation stage (an `sdft` stage, a RecoverConfig)
        requests += engines(stage)
    return requests


def evaluation(spec: Any) -> Request:
    """The task that evaluates one state (`specs.EvalEngineSpec`): its engine and lm-eval."""
    return Request("evaluation", 1, spec.cpus, spec.gpus)


def cka_actors(spec: Any) -> Request | None:
    """The CKA actor pool (`specs.CKASpec`); None when CKA runs in the calling process."""
    if spec.actors is None:
        return None
    return Request("CKA actor", spec.actors, spec.cpus_per_actor, spec.gpus_per_actor)


def gpus(requests: list[Request]) -> float:
    """The GPUs `requests` hold at once."""
    return sum(r.count * r.gpus for r in requests)
