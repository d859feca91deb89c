"""vLLM worker extension: in-memory weight updates for rollout engines.

vLLM mixes this class into its worker when the engine starts with
`worker_extension_cls="sdftlab.rollout.vllm_ext.WeightSyncExtension"`; methods are then called
by name through `LLM.collective_rpc` (the pattern of OpenRLHF, verl and NeMo-RL). Calling by
name keeps vLLM's insecure pickle serialisation off.
"""

from __future__ import annotations

from typing import Any

import torch


class WeightSyncExtension:
    model_runner: Any  # provided by the vLLM worker this class is mixed into

    def load_named_weights(self, named: list[tuple[str, torch.Tensor]]) -> int:
        """Reload (Hugging Face name, tensor) pairs in place through vLLM's own reload path.

        `reload_weights` in checkpoint format runs the model's `load_weights` (which maps names
        onto fused layouts: q/k/v → qkv_proj, gate/up → gate_up_proj) and then redoes the
        per-layer processing the backend applied at start-up (e.g. CPU weight repacking).
        """
        device = next(self.model_runner.get_model().parameters()).device
        self.model_runner.reload_weights(
            weights_iterator=((name, t.to(device)) for name, t in named),
            is_checkpoint_format=True,
        )
        return len(named)

    def get_weight(self, name: str) -> torch.Tensor:
        return dict(self.model_runner.get_model().named_parameters())[name].detach().cpu().clone()
