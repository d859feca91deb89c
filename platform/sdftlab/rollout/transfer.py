"""How new weights reach the vLLM engines: through Ray's object store, or vLLM's own weight
transfer engines (NCCL between GPUs, CUDA IPC on a shared GPU).

- `ray`: `ray.put` once, and each actor's worker loads the tensors in memory (`vllm_ext`).
  Runs anywhere, CPU or GPU.
- `nccl`: vLLM's `NCCLTrainerWeightTransferEngine`. Trainer rank 0 broadcasts each tensor to
  the engine's GPU, one NCCL group per engine. For engines on GPUs of their own.
- `ipc`: vLLM's `IPCTrainerWeightTransferEngine`. The engine maps the trainer's CUDA tensors,
  with no copy over a wire. For engines sharing the one trainer's GPU.

`auto` (the default, `choose`) takes `ray` on CPU, `nccl` when the trainer and the engines
each hold whole GPUs, `ipc` when the engines take a fraction of the single trainer's GPU.
The native paths follow vLLM's protocol: `start_weight_update` → `update_weights` (names,
dtypes, shapes) beside the trainer's send → `finish_weight_update`, then the engine's prefix
cache is dropped (its KV entries were computed with the old weights). They move tensors
between GPUs only: CUDA and NCCL in both processes, which this module cannot check on a CPU
machine; `scripts/gpu_check.sh` runs them.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

CHOICES = ("auto", "ray", "nccl", "ipc")


def choose(asked: str, *, use_gpu: bool, gpus_per_actor: float, num_workers: int) -> str:
    """The transfer a run uses (`auto` resolved); a native choice that cannot run raises
    `ValueError` naming the fields and the fix."""
    if asked == "auto":
        if not use_gpu or gpus_per_actor == 0:
            return "ray"
        if gpus_per_actor >= 1:
            return "nccl"
        return "ipc" if num_workers == 1 else "ray"
    if asked in ("nccl", "ipc") and (not use_gpu or gpus_per_actor == 0):
        raise ValueError(
            f"rollout.weight_transfer={asked} moves CUDA tensors: it needs use_gpu=true and "
            "rollout.gpus_per_actor > 0 (on CPU use weight_transfer=ray, or auto)"
        )
    if asked == "nccl" and gpus_per_actor < 1:
        raise ValueError(
            "rollout.weight_transfer=nccl needs engines on GPUs of their own "
            "(rollout.gpus_per_actor ≥ 1); engines sharing the trainer's GPU use ipc"
        )
    if asked == "ipc" and (gpus_per_actor >= 1 or num_workers != 1):
        raise ValueError(
            "rollout.weight_transfer=ipc maps the trainer's tensors on a shared GPU: it needs "
            "one training worker and rollout.gpus_per_actor < 1 (else use nccl)"
        )
    return asked


@functools.cache
def named_tensors() -> type:
    """`NamedTensors`, a vLLM `WeightSource` over the tensors of one sync (`set`), sent from
    the trainer's GPU: their names, dtypes and shapes first (`metadata`), then the tensors in
    the same order. (A class made on first use: importing vLLM waits until a sync needs it.)"""
    from vllm.distributed.weight_transfer import ParamMeta, WeightSource

    class NamedTensors(WeightSource):
        def __init__(self, device: torch.device) -> None:
            self.device = device
            self.named: Mapping[str, torch.Tensor] = {}

        def set(self, named: Mapping[str, torch.Tensor]) -> None:
            self.named = named

        def metadata(self) -> list[ParamMeta]:
            return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in self.named.items()]

        def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in self.named.items():  # one tensor on the device at a time
                yield name, tensor.detach().to(self.device, non_blocking=True).contiguous()

    return NamedTensors


class NativeTransfer:
    """The trainer side of vLLM's weight transfer to each engine actor (rank 0 only): one
    transfer engine per actor, each its own NCCL group (trainer rank 0, the engine rank 1) or
    its own IPC channel. Built in the process that sends, on its first `send`."""

    def __init__(self, backend: str, actors: Sequence[Any]) -> None:
        from vllm.distributed.weight_transfer import (
            RayVLLMWeightSyncClient,
            WeightTransferTrainerFactory,
        )

        device = torch.device("cuda", torch.cuda.current_device())
        self.source = named_tensors()(device)
        self.engines = []
        for actor in actors:
            info = _trainer_info(backend, actor)
            self.engines.append(WeightTransferTrainerFactory.trainer_init(
                init_info=info, client=RayVLLMWeightSyncClient(actor), source=self.source,
            ))  # fmt: skip

    def send(self, named: Mapping[str, torch.Tensor]) -> None:
        self.source.set(named)
        with torch.no_grad():
            for engine in self.engines:
                engine.send_weights()
        self.source.set({})


def _trainer_info(backend: str, actor: Any) -> Any:
    if backend == "ipc":
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

        return IPCTrainerInitInfo(rank=0)
    import ray
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo
    from vllm.utils.network_utils import get_ip, get_open_port

    engine_ranks = ray.get(actor.world_size.remote())
    return NCCLTrainerInitInfo(
        master_address=get_ip(), master_port=get_open_port(), world_size=engine_ranks + 1,
        rank=0, packed=True, packed_buffer_size_bytes=256 * 2**20,
    )  # fmt: skip
