"""Data parallelism over Ray Train workers: DDP replicas, or FSDP2 shards (`memory.fsdp`).

Off (the default), every worker holds the whole model and DDP all-reduces the gradients
(`ray.train.torch.prepare_model`). On, PyTorch FSDP2 (`fully_shard`) shards the weights,
gradients and optimizer state over the workers: each decoder layer is one group (its weights
gathered for its forward and backward, then freed), the root holds the embeddings, the final
norm and the head. It runs on the process group Ray Train made: NCCL on GPUs, gloo on CPUs.
With bf16 autocast the shards are gathered in bf16 and gradients reduced in fp32
(`MixedPrecisionPolicy`). LoRA adapters shard with the layer they sit in.

Sharded, every worker must run the same collectives in the same order. A forward of the
student is one (each layer gathers its weights), so every rank runs each micro-batch, each
live CKA probe and each generation (`synced_gpus`); gathering the whole state is another, so
checkpoints, weight sync to vLLM and the final save call `full_state` on every rank (rank 0
receives the whole tensors, on CPU).

Whatever the parallelism, a step's batch is the same: every worker reads the whole dataset in
the same order and takes rows `rank::world` of each global batch (`rank_rows`), and the loss is
the mean over all workers' tokens (`global_tokens`: each worker divides its token sum by the
global count over the world size, so the averaged gradients are one worker's on the whole
batch). 1 and N workers follow the same trajectory, up to float rounding (tested).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: modules whose class its config never splits across
    devices (`_no_split_modules`: `Qwen2DecoderLayer`, `LlamaDecoderLayer`, ...)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"{type(base).__name__} names no decoder layer class (_no_split_modules): "
            "memory.fsdp cannot group it; train it with memory.fsdp=false"
        )
    return layers


def prepare(model: torch.nn.Module, fsdp: bool, bf16: bool) -> torch.nn.Module:
    """The worker's training model: DDP-wrapped, or sharded in place with FSDP2."""
    import ray.train.torch

    if not fsdp:
        return ray.train.torch.prepare_model(model)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model.to(ray.train.torch.get_device())
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy()
    )
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (an FSDP2 model is its own)."""
    return getattr(model, "module", model)


def no_sync(
    model: torch.nn.Module, sync: bool, fsdp_accumulate: str = "unsharded"
) -> contextlib.AbstractContextManager:
    """Gradients of a micro-batch not yet to be reduced across workers: DDP's `no_sync`,
    FSDP2's `set_requires_gradient_sync(False)` — which keeps them whole until the step's last
    micro-batch. With `fsdp_accumulate="sharded"` FSDP2 reduce-scatters every micro-batch's
    gradients into the shards instead (`MemorySpec.fsdp_accumulate`)."""
    if sync:
        return contextlib.nullcontext()
    if is_sharded(model):
        return _fsdp_no_sync(model) if fsdp_accumulate == "unsharded" else contextlib.nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: Any) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def global_tokens(n_local: int) -> float:
    """The loss normaliser of a worker: all workers' tokens / world size (the local count on
    one worker), so that averaging the workers' gradients gives the mean over every token."""
    import torch.distributed as dist

    _, size = world()
    if size == 1:
        return float(n_local)
    count = torch.tensor([float(n_local)], dtype=torch.float64)
    dist.all_reduce(count)
    return float(count) / size


def mean_over_workers(value: float) -> float:
    """The mean of a per-worker figure (each worker's share of the step's loss, summed)."""
    import torch.distributed as dist

    _, size = world()
    if size == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(total)
    return float(total) / size


def same_on_every_worker(count: int, what: str) -> None:
    """Sharded forwards are collectives: every worker must run as many. One error if not."""
    import torch.distributed as dist

    _, size = world()
    if size == 1:
        return
    counts = torch.tensor([count, -count], dtype=torch.int64)
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    if int(counts[0]) != -int(counts[1]):
        raise RuntimeError(
            f"memory.fsdp: the workers ran {-int(counts[1])} to {int(counts[0])} {what} this "
            "step; sharded forwards must match on every worker (set memory.micro_batch_size to "
            "None, or memory.fsdp=false)"
        )


def rank_rows(batch: dict[str, Any], rank: int, size: int) -> dict[str, Any]:
    """This worker's rows of a global batch: rows rank, rank + size, ..."""
    return {k: v[rank::size] for k, v in batch.items()}


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict under Hugging Face names, on CPU. Sharded, a collective: every
    rank calls it, rank 0 receives the tensors (the others an empty dict)."""
    if not is_sharded(model):
        return {n: t.detach().cpu() for n, t in unwrap(model).state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def unsharded_copy(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain CPU copy of `model` holding `state` (`full_state`'s): what the final save of a
    sharded run writes from (rank 0). LoRA adapters are rebuilt with the model's config."""
    from transformers import AutoModelForCausalLM

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.device("cpu"):
        copy = AutoModelForCausalLM.from_config(base.config, dtype=torch.float32)
    if hasattr(model, "peft_config"):
        from peft import get_peft_model

        name, config = next(iter(model.peft_config.items()))
        copy = get_peft_model(copy, config, adapter_name=name)
    copy.load_state_dict(state)
    return copy


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's whole state keyed by parameter name (a collective when sharded; rank 0
    receives it)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=is_sharded(model))
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """`optimizer_state`'s dict back into the optimizer (each rank keeps its shards)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    set_optimizer_state_dict(
        model, optimizer, state, options=StateDictOptions(full_state_dict=True)
    )
