"""A pool of vLLM engines as Ray actors: on-policy rollouts, teacher scoring, weight sync.

Each actor loads one state once (`VLLMEngine`); the pool splits a batch of prompts across
actors, and pushes new weights to all of them (`sync`). On a cluster, give actors GPUs with
`gpus_per_actor`; on a laptop they share the CPUs with the train workers. vLLM logs at
WARNING in the actors (its INFO lines, a few per weight sync, buried the progress lines); set
`VLLM_LOGGING_LEVEL` in the driver's environment to choose another level.

    >>> pool = RolloutPool.start(lineage.local_path("forgot"), actors=2, cpus_per_actor=0.5)
    >>> completions = pool.generate(prompt_ids, SamplingSettings(n=1, max_new_tokens=64))
    >>> pending = pool.submit(next_ids, sampling)  # sampled while the caller trains
    >>> seconds = pool.sync(named_tensors)

Weights travel through the object store on CPU, and over vLLM's own NCCL (or CUDA IPC)
transfer between GPUs (`sdftlab.rollout.transfer`); what is sent after a training step — the
whole state, or LoRA-merged layers, gathered from shards — is `sdftlab.rollout.sync`'s.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sdftlab.rollout.engines import Completion, SamplingSettings, TopKRows, VLLMEngine


class RolloutServer:
    """The actor body: one `VLLMEngine`."""

    def __init__(self, model_path: str, seed: int, engine_kwargs: dict[str, Any]) -> None:
        import os

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.engine = VLLMEngine(model_path, seed=seed, **engine_kwargs)

    def startup_seconds(self) -> float:
        return self.engine.startup_s

    def generate(self, prompts: list[list[int]], sampling: SamplingSettings) -> list[Completion]:
        return self.engine.generate(prompts, sampling)

    def score(self, sequences: list[list[int]], starts: list[int], k: int) -> list[TopKRows]:
        return self.engine.score(sequences, starts, k)

    def load_weights(self, named: Mapping[str, torch.Tensor]) -> float:
        return self.engine.load_weights(named)

    def named_weight(self, name: str) -> torch.Tensor:
        return self.engine.named_weight(name)

    # vLLM's weight transfer protocol (`RayVLLMWeightSyncClient` calls these by name)
    def world_size(self) -> int:
        return self.engine.llm.get_world_size()

    def init_weight_transfer_engine(self, request: Any) -> None:
        self.engine.llm.init_weight_transfer_engine(request)

    def start_weight_update(self) -> None:
        self.engine.llm.start_weight_update()

    def update_weights(self, request: Any) -> None:
        self.engine.llm.update_weights(request)

    def finish_weight_update(self) -> None:
        self.engine.llm.finish_weight_update()
        self.engine.llm.reset_prefix_cache()  # its KV entries hold the old weights' keys

    def shutdown_weight_transfer_engine(self) -> None:
        self.engine.llm.shutdown_weight_transfer_engine()


class ActorResults:
    """Completions on their way from the actors (`RolloutPool.submit`; a `Pending`)."""

    def __init__(self, futures: list[Any]) -> None:
        self.futures = futures

    def result(self) -> list[Completion]:
        """Wait for every actor's part; the completions in prompt order."""
        import ray

        return [c for part in ray.get(self.futures) for c in part]


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) chunks of n items over `parts` (first ones one larger)."""
    base, extra = divmod(n, parts)
    bounds, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


class RolloutPool:
    """Handles to rollout actors (picklable: Ray Train workers receive the pool itself)."""

    def __init__(
        self, actors: list[Any], startup: list[Any] | None = None, transfer: str = "ray"
    ) -> None:
        self.actors = actors
        self._startup = startup or []  # refs to each engine's start-up seconds, until awaited
        self.transfer = transfer  # `sdftlab.rollout.transfer`: ray, nccl or ipc
        self._native: Any = None  # vLLM's trainer-side transfer, built where `sync` runs

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_native": None}  # a process's own NCCL group stays there

    @classmethod
    def start(
        cls,
        model_path: str | Path,
        *,
        actors: int = 1,
        cpus_per_actor: float = 0.5,
        gpus_per_actor: float = 0.0,
        seed: int = 0,
        engine_kwargs: dict[str, Any] | None = None,
        weight_transfer: str = "ray",
        wait: bool = True,
    ) -> RolloutPool:
        """Start `actors` engines on `model_path`. With `wait=False` the engines load in the
        background (a Ray Train worker group can start meanwhile); `wait_ready` then blocks
        until they are up and raises an engine's start-up error. `weight_transfer`: how
        `sync` reaches them (`transfer.choose` resolves a config's `auto`)."""
        import ray

        env = {
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
        }
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        remote = ray.remote(RolloutServer).options(
            num_cpus=cpus_per_actor, num_gpus=gpus_per_actor, runtime_env={"env_vars": env},
            # Outside any placement group the caller runs in (a Tune trial's holds only the
            # trial driver's own CPUs): the engines ask the cluster for their resources.
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
        )  # fmt: skip
        kwargs = {**(engine_kwargs or {}), "weight_transfer": weight_transfer}
        handles = [remote.remote(str(model_path), seed + i, kwargs) for i in range(actors)]
        pool = cls(handles, [h.startup_seconds.remote() for h in handles], weight_transfer)
        if wait:
            pool.wait_ready()
        return pool

    def wait_ready(self) -> float:
        """Block until every engine is up; the slowest engine's start-up seconds (0 if the
        pool was already awaited)."""
        import ray

        startup, self._startup = self._startup, []
        return max(ray.get(startup), default=0.0)

    def generate(
        self, prompts: Sequence[list[int]], sampling: SamplingSettings
    ) -> list[Completion]:
        """Completions for `prompts` (n per prompt, in prompt order), spread over the actors."""
        return self.submit(prompts, sampling).result()

    def submit(self, prompts: Sequence[list[int]], sampling: SamplingSettings) -> ActorResults:
        """Ask for `generate`'s completions and return at once. Each actor runs its calls in
        the order they came: a `sync` sent after this waits for these completions, which are
        sampled on the weights the actors hold now (an overlapped rollout)."""
        chunks = [(a, b) for a, b in _split(len(prompts), len(self.actors)) if b > a]
        return ActorResults([
            actor.generate.remote(list(prompts[a:b]), sampling)
            for actor, (a, b) in zip(self.actors, chunks, strict=False)
        ])  # fmt: skip

    def score(
        self, sequences: Sequence[list[int]], starts: Sequence[int], k: int
    ) -> list[TopKRows]:
        import ray

        chunks = [(a, b) for a, b in _split(len(sequences), len(self.actors)) if b > a]
        futures = [
            actor.score.remote(list(sequences[a:b]), list(starts[a:b]), k)
            for actor, (a, b) in zip(self.actors, chunks, strict=False)
        ]
        return [rows for part in ray.get(futures) for rows in part]

    def sync(self, named: Mapping[str, torch.Tensor]) -> float:
        """Push weights to every actor; wall seconds until all have them. `ray`: one
        object-store copy, loaded in memory by each actor; `nccl`/`ipc`: vLLM's transfer
        engines, set up in this process on its first sync."""
        import ray

        t0 = time.perf_counter()
        if self.transfer == "ray":
            ref = ray.put({k: v.detach().cpu().contiguous() for k, v in named.items()})
            ray.get([actor.load_weights.remote(ref) for actor in self.actors])
        else:
            from sdftlab.rollout.transfer import NativeTransfer

            if self._native is None:
                self._native = NativeTransfer(self.transfer, self.actors)
            self._native.send(named)
        return time.perf_counter() - t0

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
