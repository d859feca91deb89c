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
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch

from sdftlab.config import StrictModel
from sdftlab.errors import ConfigError
from sdftlab.models import (  # re-exported: the quantization API in one import
    LORA_TARGETS,
    dequantized_copy,
    is_quantized,
    prepare_4bit_for_cpu,
    qlora_model,
    save_requantized,
)

if TYPE_CHECKING:
    from sdftlab.lineage import Lineage, StateMeta

QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def quant_description(config: Mapping[str, Any]) -> str:
    """A short description of a config.json's quantization_config, e.g. 'bitsandbytes nf4'."""
    q = config.get("quantization_config") or {}
    kind = q.get("bnb_4bit_quant_type") if q.get("load_in_4bit") else None
    return " ".join(str(x) for x in (q.get("quant_method", "quantized"), kind) if x)


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


class QuantizeSpec(StrictModel):
    """`quantize_state`'s options, as a pipeline stage and `sdftlab degrade quantize` give them."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: str = "float32"


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


__all__ = [
    "LORA_TARGETS",
    "QuantizeSpec",
    "bnb_config",
    "dequantized_copy",
    "is_quantized",
    "load_quantized",
    "prepare_4bit_for_cpu",
    "qlora_model",
    "quant_description",
    "quantize_state",
    "save_requantized",
]
