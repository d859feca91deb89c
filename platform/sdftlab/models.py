"""Loading and saving model weights: safetensors only, no remote code unless asked, and the
bitsandbytes hygiene that 4-bit states need on CPU.

The lineage stores directories; this module turns them into models and back:

- `load_model(path)` / `load_tokenizer(path)`: `from_pretrained` with safetensors only and
  `trust_remote_code` off unless the user opted in (`config.trust_remote_code`); a 4-bit
  (bitsandbytes) state comes back with the CPU repacking switched off
  (`prepare_4bit_for_cpu`, the pitfall below).
- `qlora_model(model, r, ...)`: QLoRA on a loaded 4-bit model (frozen NF4 base, LoRA
  adapters in fp32);
- `save_final(model, tokenizer, directory)`: a trained model as a state directory, LoRA
  adapters merged; a QLoRA-trained 4-bit model is dequantized, merged and quantized again
  (`save_requantized`), so it reloads as 4-bit like its parent;
- `dequantized_dir(path, dtype)`: a temporary plain copy of a 4-bit state, its weights the
  ones bitsandbytes computes with, for an engine without NF4 kernels (vLLM evaluation).

CPU pitfall (bitsandbytes 0.50, CPUs with AVX512-BF16): `Linear4bit.forward` repacks its
weight in place into a bf16 inference layout the first time it runs in eval mode on an input
that does not require grad. After that the layer always takes the inference kernel — bf16
numerics, no autograd through the base weight — and the repack asserts
out_features % 32 == 0. `prepare_4bit_for_cpu` switches the repack off per layer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdftlab.config import trust_remote_code
from sdftlab.errors import ConfigError

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# bitsandbytes module classes holding quantized weights (matched by name: no bnb import).
_QUANTIZED_MODULES = ("Linear4bit", "LinearNF4", "LinearFP4", "Linear8bitLt", "Params4bit")


class _NoKernelsHubWarning(logging.Filter):
    """Drop bitsandbytes' import-time "Failed to load CPU gemm_4bit_forward" warning.

    On AVX512-BF16 CPUs bitsandbytes tries the optional `kernels` package for the kernel of
    its packed bf16 inference path and falls back to its own C kernel when it is missing. That
    path is the one `prepare_4bit_for_cpu` switches off, so the warning is noise here.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoKernelsHubWarning())


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoKernelsHubWarning())


def is_quantized(obj: Any) -> bool:
    """Whether a model, a config, a config.json dict or a model directory is bnb-quantized."""
    if isinstance(obj, str | os.PathLike):
        path = Path(obj)
        obj = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    if isinstance(obj, nn.Module):
        if getattr(obj, "is_loaded_in_4bit", False) or getattr(obj, "is_loaded_in_8bit", False):
            return True
        if any(type(m).__name__ in _QUANTIZED_MODULES for m in obj.modules()):
            return True
        obj = getattr(obj, "config", None)
    if isinstance(obj, Mapping):
        return bool(obj.get("quantization_config"))
    return bool(getattr(obj, "quantization_config", None))


def prepare_4bit_for_cpu(model: nn.Module) -> int:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference; returns the layers changed.

    bitsandbytes 0.50 `Linear4bit.__init__` sets `support_avx512bf16_for_cpu =
    has_avx512bf16()`, and `forward` calls `_convert_weight_packed_for_cpu` when that flag is
    set, the input is on CPU, the module is in eval mode, the input does not require grad and
    the weight is not packed yet. Clearing the flag keeps the standard layout (dequantize →
    `compute_dtype` matmul, differentiable) for every forward.

    Call it right after loading. A weight that was already packed is unpacked back
    (`_convert_weight_packed_for_cpu_inverse`, which bitsandbytes also runs before saving),
    with a warning: packing stores the block scales in bf16, so with double quantization the
    unpacked weights differ slightly from the loaded ones.
    """
    import bitsandbytes as bnb

    count = 0
    unpacked = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            state = getattr(module.weight, "quant_state", None)
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

                data, state = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)
                module.weight.data, module.weight.quant_state = data, state
                module.quant_state = state
                unpacked += 1
            count += 1
    if unpacked:
        warnings.warn(
            f"{unpacked} Linear4bit layers had already been repacked for CPU inference (an "
            "eval forward ran before prepare_4bit_for_cpu); they were unpacked, but their "
            "block scales went through bf16, so the weights differ slightly from the saved "
            "state. Call prepare_4bit_for_cpu (or load_quantized) right after loading.",
            stacklevel=2,
        )
    return count


def local_device() -> torch.device:
    """This process's GPU if it has one (a Ray task or actor given GPUs), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(path: str | os.PathLike[str], **kwargs: Any) -> Any:
    """`AutoModelForCausalLM.from_pretrained` on a state directory: safetensors only, no
    remote code unless opted in; 4-bit states made safe to evaluate then train on CPU."""
    from transformers import AutoModelForCausalLM

    kwargs.setdefault("trust_remote_code", trust_remote_code())
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, **kwargs)
    if getattr(model.config, "quantization_config", None):
        prepare_4bit_for_cpu(model)
    return model


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code())


def load_model_config(path: str | os.PathLike[str]) -> Any:
    """A state directory's transformers config (no weights read)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code())


def dequantized_copy(model: nn.Module) -> nn.Module:
    """A full-precision (fp32) copy of a bitsandbytes 4-bit model: every `Linear4bit` weight
    dequantized, every other tensor copied. QLoRA recovery saves its result through this:
    LoRA merged into the dequantized weights, then quantized again the way `quantize_state`
    does, so the recovered state reloads as NF4 like its parent."""
    import copy

    import bitsandbytes.functional as bnbf
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "Linear4bit":
            weight = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
            state[f"{name}.weight"] = weight.float().cpu()
            if module.bias is not None:
                state[f"{name}.bias"] = module.bias.detach().float().cpu()
    for name, tensor in model.state_dict().items():
        if name not in state and name in fresh.state_dict():
            state[name] = tensor.detach().float().cpu()
    missing = set(fresh.state_dict()) - set(state)
    if missing - {"lm_head.weight"}:
        raise RuntimeError(f"dequantized copy lacks {sorted(missing)[:3]}")
    fresh.load_state_dict(state, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
    return fresh


@contextlib.contextmanager
def dequantized_dir(path: str | os.PathLike[str], dtype: torch.dtype) -> Iterator[Path]:
    """A temporary plain copy of the 4-bit state at `path`: its weights dequantized
    (`dequantized_copy`, exactly what bitsandbytes computes each NF4 matmul with) and cast to
    `dtype`, its tokenizer beside them — a state an engine without NF4 kernels (vLLM here)
    can serve. Removed on exit."""
    import tempfile

    model = load_model(path)
    plain = dequantized_copy(model).to(dtype)
    del model
    with tempfile.TemporaryDirectory(prefix="sdftlab-dequantized-") as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        del plain
        load_tokenizer(path).save_pretrained(tmp)
        yield Path(tmp)


def save_requantized(model: nn.Module, tokenizer: Any, directory: Path) -> None:
    """Save a (LoRA-merged) 4-bit model as a 4-bit state: dequantize, then quantize again."""
    import tempfile

    from transformers import AutoModelForCausalLM

    quantization_config = model.config.quantization_config
    with tempfile.TemporaryDirectory() as tmp:
        dequantized_copy(model).save_pretrained(tmp, safe_serialization=True)
        device_map = {"": 0} if torch.cuda.is_available() else {"": "cpu"}
        requantized = AutoModelForCausalLM.from_pretrained(
            tmp, quantization_config=quantization_config, device_map=device_map
        )
        prepare_4bit_for_cpu(requantized)
        requantized.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def qlora_model(
    model: Any,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: Sequence[str] = LORA_TARGETS,
    *,
    gradient_checkpointing: bool = False,
) -> Any:  # a peft PeftModel
    """Wrap a 4-bit model for QLoRA: frozen NF4 base + trainable LoRA adapters (fp32).

    Runs `prepare_4bit_for_cpu` (see the module docstring), then peft's
    `prepare_model_for_kbit_training` (freezes every base parameter and casts fp16/bf16
    non-4-bit parameters to fp32 — both fine on CPU), then `get_peft_model` with
    `LoraConfig(r, alpha, dropout, target_modules, task_type="CAUSAL_LM")`. Each adapted
    layer computes W₄ x + (α/r)·B A x with B initialised to zero, so the wrapped model starts
    exactly at the quantized model.

    `gradient_checkpointing` is off by default (pure overhead at the tiny world's size); turn
    it on for real models. It uses `use_reentrant=False`, which works on CPU and needs no
    input-grad hook.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ConfigError(f"r={r!r} must be a positive integer (the LoRA rank, e.g. 8)")
    if not 0 <= dropout < 1:
        raise ConfigError(f"dropout={dropout!r} must be in [0, 1)")
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in target_modules if t not in names]
    if not target_modules or missing:
        raise ConfigError(
            f"target_modules {list(target_modules)}: {missing or 'empty'} not found in "
            f"{type(model).__name__}; use module names such as {', '.join(LORA_TARGETS)}"
        )
    prepare_4bit_for_cpu(model)
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    lora = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def save_final(model: nn.Module, tokenizer: Any, directory: Path) -> None:
    """A trained model as a state directory: LoRA merged; a 4-bit base quantized again."""
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    if getattr(merged.config, "quantization_config", None) is not None:  # QLoRA: NF4 again
        save_requantized(merged, tokenizer, directory)
        return
    merged.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
