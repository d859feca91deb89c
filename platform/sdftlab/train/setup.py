"""How a training worker runs its model: precision, attention kernel, allocator, activation
checkpointing and LoRA adapters. None of these changes what a step computes, except bf16
autocast (the precision) and LoRA (what is trained)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

EAGER_MAX_HIDDEN = 256  # CPU: eager attention for models up to this width, SDPA beyond


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 matmuls (AVX512-BF16 / AMX): autocast pays off."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, or on a CPU with native bf16; otherwise a no-op."""
    if not enabled:
        return contextlib.nullcontext()
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and cpu_supports_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _hidden_size(model: torch.nn.Module) -> int:
    return getattr(getattr(model, "config", None), "hidden_size", EAGER_MAX_HIDDEN + 1)


def use_cpu_allocator(memory: Any, model: torch.nn.Module, device: torch.device) -> bool:
    """Apply `memory.cpu_allocator` in a CPU worker (`auto`: the heap setting for models up
    to `EAGER_MAX_HIDDEN` wide, the C library's beyond); whether the heap setting is on."""
    from sdftlab.allocator import tune_cpu_allocator

    if device.type != "cpu":
        return False
    choice = memory.cpu_allocator
    if choice == "auto":
        choice = "heap" if _hidden_size(model) <= EAGER_MAX_HIDDEN else "system"
    return tune_cpu_allocator() if choice == "heap" else False


def use_training_attention(model: torch.nn.Module, device: torch.device) -> None:
    """Pick the attention kernel for training on `device`: on CPU, eager for models of hidden
    size up to `EAGER_MAX_HIDDEN` (the tiny worlds: faster there, docs/BENCHMARKS.md), the
    default (SDPA) otherwise and on GPUs (eager keeps every [T, T] score matrix for the
    backward pass, which a real model's longer sequences cannot afford). Only the runtime
    choice changes; nothing of it is saved with the weights."""
    if (
        device.type == "cpu"
        and _hidden_size(model) <= EAGER_MAX_HIDDEN
        and hasattr(model, "set_attn_implementation")
    ):
        model.set_attn_implementation("eager")


def enable_checkpointing(model: Any) -> None:
    """Activation checkpointing on every decoder layer (non-reentrant: frozen inputs, LoRA and
    DDP all work with it)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def with_lora(model: Any, lora: Any) -> Any:
    """`model` with LoRA adapters (`specs.LoraSpec`), or the model itself for `lora=None`."""
    if lora is None:
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        model,
        LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        ),
    )


def prepare_for_training(model: Any, memory: Any, device: torch.device) -> None:
    """The attention kernel for `device`, and activation checkpointing if `memory` asks."""
    use_training_attention(model, device)
    if memory.gradient_checkpointing:
        enable_checkpointing(model)
