"""NF4 quantization with bitsandbytes, and the QLoRA wrapper that trains on top of it.

The paper's first degradation stores Qwen2.5 in 4-bit NormalFloat (NF4, Dettmers et al.
2023, "QLoRA"): each block of 64 weights is scaled by its absmax and every weight is rounded
to the nearest of 16 levels placed at the quantiles of N(0, 1), so Gaussian-shaped weights
use the levels evenly. Double quantization also quantizes the per-block absmax scales
(8-bit, blocks of 256), saving ≈ 0.37 bit per weight. Matmuls dequantize to
`compute_dtype` on the fly. Recovery then trains LoRA adapters on the frozen 4-bit base
(QLoRA): the 4-bit weights never change, only the low-rank adapters do.

A quantized state is an ordinary transformers directory whose `config.json` carries the
`quantization_config`, so plain `AutoModelForCausalLM.from_pretrained(path)` reloads it as
`bitsandbytes.nn.Linear4bit` layers (the embeddings and the tied `lm_head` stay full
precision, as transformers leaves them).

CPU pitfall (bitsandbytes 0.50, CPUs with AVX512-BF16): `Linear4bit.forward` repacks its
weight in place into a bf16 inference layout the first time it runs in eval mode on an input
that does not require grad (any `torch.no_grad()` evaluation or generation). After that the
layer always takes the inference kernel — bf16 numerics, no autograd through the base
weight (training a LoRA on it fails: "a view of a leaf Variable that requires grad is being
used in an in-place operation" on biased layers) — and the repack asserts
out_features % 32 == 0. `prepare_4bit_for_cpu` switches the repack off per layer;
`load_quantized` and `qlora_model` call it for you.

    sdftlab degrade quantize --from expert --to nf4

    >>> quantize_state(lineage, "expert", "nf4")
    >>> model = load_quantized(lineage, "nf4")     # Linear4bit layers, CPU-safe
    >>> peft_model = qlora_model(model, r=8)
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sdftlab.errors import ConfigError

if TYPE_CHECKING:
    from peft import PeftModel

    from sdftlab.lineage import Lineage, StateMeta

QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
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


def quant_description(config: Mapping[str, Any]) -> str:
    """A short description of a config.json's quantization_config, e.g. 'bitsandbytes nf4'."""
    q = config.get("quantization_config") or {}
    kind = q.get("bnb_4bit_quant_type") if q.get("load_in_4bit") else None
    return " ".join(str(x) for x in (q.get("quant_method", "quantized"), kind) if x)


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


def load_quantized(lineage: Lineage, ref: str, **kwargs: Any) -> Any:
    """`lineage.load_model(ref)` for a 4-bit state, made safe to evaluate then train on CPU."""
    model = lineage.load_model(ref, **kwargs)
    if not is_quantized(model):
        raise ConfigError(f"state {ref!r} is not quantized; run `sdftlab degrade quantize` first")
    prepare_4bit_for_cpu(model)
    return model


def bnb_config(
    quant_type: str = "nf4", double_quant: bool = True, compute_dtype: str = "float32"
) -> Any:
    """A validated `BitsAndBytesConfig` for 4-bit loading."""
    from transformers import BitsAndBytesConfig

    if quant_type not in QUANT_TYPES:
        raise ConfigError(
            f"quant_type={quant_type!r} is not one of {', '.join(QUANT_TYPES)}: 'nf4' is the "
            "paper's NormalFloat4, 'fp4' plain 4-bit float"
        )
    if compute_dtype not in COMPUTE_DTYPES:
        raise ConfigError(
            f"compute_dtype={compute_dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}: the "
            "dtype 4-bit weights are dequantized to for matmuls (float32 on CPU)"
        )
    if not isinstance(double_quant, bool):
        raise ConfigError(f"double_quant={double_quant!r} must be true or false")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=COMPUTE_DTYPES[compute_dtype],
    )


def quantize_state(
    lineage: Lineage,
    src: str,
    dst: str,
    *,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str = "float32",
    overwrite: bool = False,
) -> StateMeta:
    """Load state `src` in 4-bit with bitsandbytes and save it as `dst` (kind "quantize").

    Names, options and that `src` is not quantized yet are checked before anything is loaded
    or written. On CPU (no GPU visible) the weights are quantized by bitsandbytes' CPU
    kernels; on a GPU machine they are loaded onto GPU 0.
    """
    lineage.check_new(dst, parents=[src], overwrite=overwrite)
    quantization_config = bnb_config(quant_type, double_quant, compute_dtype)
    config = json.loads((lineage.local_path(src) / "config.json").read_text())
    if is_quantized(config):
        raise ConfigError(
            f"state {src!r} is already 4-bit quantized ({quant_description(config)}); "
            "quantize its unquantized parent instead"
        )

    device_map = {"": 0} if torch.cuda.is_available() else {"": "cpu"}
    model = lineage.load_model(src, quantization_config=quantization_config, device_map=device_map)
    prepare_4bit_for_cpu(model)
    layers = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    tokenizer = lineage.load_tokenizer(src)
    return lineage.save(
        dst,
        model,
        tokenizer,
        kind="quantize",
        parents=[src],
        config={
            "method": "bitsandbytes",
            "quant_type": quant_type,
            "double_quant": double_quant,
            "compute_dtype": compute_dtype,
            "blocksize": 64,
        },
        metrics={
            "quantize/layers_4bit": layers,
            "quantize/memory_bytes": model.get_memory_footprint(),
        },
        overwrite=overwrite,
    )


def qlora_model(
    model: Any,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: Sequence[str] = LORA_TARGETS,
    *,
    gradient_checkpointing: bool = False,
) -> PeftModel:
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
