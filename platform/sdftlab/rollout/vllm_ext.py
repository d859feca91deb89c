"""vLLM worker extension: in-memory weight updates for rollout engines.

vLLM mixes this class into its worker when the engine starts with
`worker_extension_cls="sdftlab.rollout.vllm_ext.WeightSyncExtension"`; methods are then called
by name through `LLM.collective_rpc` (the pattern of OpenRLHF, verl and NeMo-RL). Calling by
name keeps vLLM's insecure pickle serialisation off.

A reload warns "RotaryEmbedding: Failed to load weights" on every sync: the rotary layer's
cos/sin cache is computed at start-up, is in no checkpoint, and vLLM keeps it as it was —
which is right. `ComputedCacheReloadFilter` drops that one message (once per step, it buried
the progress lines); every other reload warning passes.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class ComputedCacheReloadFilter(logging.Filter):
    """Drops vLLM's "<layer>: Failed to load weights" for rotary-embedding layers only, and
    counts what it dropped (`dropped`)."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        computed_cache = (
            record.msg == "%s: Failed to load weights"
            and bool(args)
            and str(args[0]).endswith("RotaryEmbedding")
        )
        self.dropped += computed_cache
        return not computed_cache


def quiet_computed_cache_reloads() -> None:
    """Install `ComputedCacheReloadFilter` on vLLM's reload logger (once per process)."""
    logger = logging.getLogger(RELOAD_LOGGER)
    if not any(isinstance(f, ComputedCacheReloadFilter) for f in logger.filters):
        logger.addFilter(ComputedCacheReloadFilter())


class WeightSyncExtension:
    model_runner: Any  # provided by the vLLM worker this class is mixed into

    def load_named_weights(self, named: list[tuple[str, torch.Tensor]]) -> int:
        """Reload (Hugging Face name, tensor) pairs in place through vLLM's own reload path.

        `reload_weights` in checkpoint format runs the model's `load_weights` (which maps names
        onto fused layouts: q/k/v → qkv_proj, gate/up → gate_up_proj) and then redoes the
        per-layer processing the backend applied at start-up (e.g. CPU weight repacking).
        """
        quiet_computed_cache_reloads()
        param = next(self.model_runner.get_model().parameters())
        # The trainer's fp32 tensors in the engine's dtype (a bf16 engine would otherwise warn
        # once per tensor per sync, and cast anyway).
        self.model_runner.reload_weights(
            weights_iterator=(
                (name, t.to(param.device, param.dtype if t.is_floating_point() else t.dtype))
                for name, t in named
            ),
            is_checkpoint_format=True,
        )
        return len(named)

    def get_weight(self, name: str) -> torch.Tensor:
        return dict(self.model_runner.get_model().named_parameters())[name].detach().cpu().clone()
