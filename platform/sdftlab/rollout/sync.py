"""Weight sync: a training model's weights to the vLLM engines that sample from it (the
student's rollout pool) or score with it (an EMA teacher's pool), in one place.

After each step, `WeightSync(pool).push(model, rank)` sends what the engines need under
Hugging Face parameter names (`named_weights`): every tensor for a fully fine-tuned model,
only the adapted layers merged (W + (α/r)·B A) for a LoRA one — the adapter's effect without
a round trip through disk. A sharded (FSDP2) model is gathered first, on every rank (a
collective); rank 0 sends. The transport is the pool's (`RolloutPool.sync`: Ray's object
store, or vLLM's NCCL / CUDA IPC transfer engines).

    >>> sync = WeightSync(rollout_pool)
    >>> sync.push(student, rank)      # after optimizer.step(): the next rollouts are on-policy
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from sdftlab import sharding


class WeightSync:
    """Pushes a model's weights to one pool of engines (None: nothing to push)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    def push(self, model: torch.nn.Module, rank: int) -> float:
        """Gather (sharded: on every rank) and send (rank 0); the seconds the pool took."""
        if self.pool is None:
            return 0.0
        state = sharding.full_state(model) if sharding.is_sharded(model) else None
        if rank != 0:
            return 0.0
        return self.pool.sync(named_weights(model, state))


def named_weights(
    model: Any, state: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """What the rollout engines need after a step, under Hugging Face parameter names.

    Full fine-tuning: every tensor of the state dict. LoRA: only the adapted layers, merged
    (W + (α/r)·B A) — the adapter's effect, without a round trip through disk. `state`: the
    model's whole state dict gathered from shards (`sharding.full_state`), read instead of
    the model's own (sharded) tensors.
    """
    try:
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        PeftModel = LoraLayer = ()

    if isinstance(model, PeftModel):
        out = {}
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and module.active_adapters:
                clean = name.removeprefix("base_model.model.")
                if state is None:
                    base = module.get_base_layer().weight.detach()
                    delta = sum(module.get_delta_weight(a) for a in module.active_adapters)
                else:  # plain linear adapters: (α/r)·B A from the gathered tensors
                    base = state[f"{name}.base_layer.weight"]
                    delta = sum(
                        state[f"{name}.lora_B.{a}.weight"].float()
                        @ state[f"{name}.lora_A.{a}.weight"].float()
                        * module.scaling[a]
                        for a in module.active_adapters
                    )
                out[f"{clean}.weight"] = (base + delta.detach()).float()
        return out
    # The tied head is sent too: vLLM's in-place reload re-creates the embedding tensor, and a
    # head left out would keep the old weights (`tests/test_sdft.py`).
    return {n: p.detach() for n, p in (state or model.state_dict()).items()}
