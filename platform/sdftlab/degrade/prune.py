"""Structured FFN pruning: remove the same fraction of MLP neurons in every decoder layer.

The paper's second degradation removes 10% of each Qwen2.5 layer's feed-forward neurons.
A SwiGLU MLP computes

    y = W_down · (silu(W_gate x) ⊙ (W_up x)),   W_gate, W_up ∈ ℝ^{I×H}, W_down ∈ ℝ^{H×I}

so intermediate neuron i owns row i of W_gate and W_up and column i of W_down; removing it
means deleting those three slices together (the coupled "group" of LLM-Pruner, Ma et al.
2023). Every layer keeps the same width, the new width is written to
`config.intermediate_size`, and the result is an ordinary, smaller `Qwen2ForCausalLM` that
`from_pretrained` — and vLLM — load with no custom code.

Importance (which neurons to keep), per layer:

* ``magnitude`` — s_i = ‖W_gate[i,:]‖₂ · ‖W_up[i,:]‖₂ · ‖W_down[:,i]‖₂. Because |silu(a)| ≤ |a|,
  neuron i's contribution to y is bounded by s_i·‖x‖², so this product is the data-free bound
  on what removing the neuron can change; a neuron with any all-zero slice scores exactly 0.
* ``taylor`` — LLM-Pruner's first-order group Taylor score on calibration batches:
  s_i = |Σ_w w · ∂L/∂w| over the weights w of the neuron's gate row, up row and down column,
  with L the language-model loss summed over the batches (the first-order estimate of the
  loss change when the group is set to zero).

    sdftlab degrade prune --from expert --to pruned10 --ratio 0.1 --importance taylor \
        --calibration science        # Taylor scores on the first rows of a task's train split

    >>> report = prune_ffn(model, 0.1)            # in place
    >>> report.old_width, report.new_width
    (512, 448)
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field
from torch import nn

from sdftlab.config import StrictModel
from sdftlab.errors import ConfigError
from sdftlab.modes import evaluating

if TYPE_CHECKING:
    from sdftlab.lineage import Lineage, StateMeta

IMPORTANCE_METHODS = ("magnitude", "taylor")
GATED_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

Batch = Mapping[str, torch.Tensor]


@dataclass
class PruneReport:
    """What `prune_ffn` changed."""

    importance: str
    old_width: int
    new_width: int
    num_layers: int
    params_before: int
    params_after: int
    ffn_params_before: int
    ffn_params_after: int
    # kept[l] = the original indices of the neurons layer l keeps, ascending.
    kept: list[list[int]] = field(repr=False, default_factory=list)

    @property
    def ffn_removed(self) -> float:
        """Fraction of the FFN parameters removed."""
        return 1.0 - self.ffn_params_after / self.ffn_params_before

    @property
    def params_removed(self) -> float:
        """Fraction of all the model's parameters removed."""
        return 1.0 - self.params_after / self.params_before

    def summary(self) -> str:
        return (
            f"FFN {self.old_width} → {self.new_width} neurons in each of {self.num_layers} layers "
            f"({self.importance}); parameters {self.params_before:,} → {self.params_after:,} "
            f"(−{self.params_removed:.1%} total, −{self.ffn_removed:.1%} FFN)"
        )


# ------------------------------------------------------------------ validation


def check_ratio(ratio: float) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 <= ratio < 1:
        raise ConfigError(
            f"ratio={ratio!r} is outside [0, 1): it is the fraction of FFN neurons removed; "
            "use e.g. 0.1"
        )


def check_multiple_of(multiple_of: int) -> None:
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise ConfigError(
            f"multiple_of={multiple_of!r} must be a positive integer: the new FFN width is "
            "rounded to a multiple of it (e.g. 64; 1 disables rounding)"
        )


def kept_width(intermediate_size: int, ratio: float, multiple_of: int = 64) -> int:
    """The FFN width left after removing the fraction `ratio` of `intermediate_size` neurons.

    Rounding: (1 − ratio)·I is rounded to the *nearest* multiple of `multiple_of`, halves up
    (⌊(1 − ratio)·I / m + ½⌋·m), then capped at I; a small ratio can therefore round back to
    I and remove nothing. ratio 0 always returns I, even when I is not a multiple of m.
    Multiples of 64 keep the width friendly to GEMM tiles, NF4 blocks and vLLM kernels.
    E.g. I = 512, m = 64: ratio 0.1 → 460.8 → 448; ratio 0.25 → 384; ratio 0.05 → 512.
    """
    check_multiple_of(multiple_of)
    check_ratio(ratio)
    if ratio == 0:
        return intermediate_size
    width = math.floor((1 - ratio) * intermediate_size / multiple_of + 0.5) * multiple_of
    width = min(width, intermediate_size)
    if width <= 0:
        raise ConfigError(
            f"ratio {ratio} with multiple_of {multiple_of} leaves 0 of {intermediate_size} "
            "neurons; lower the ratio or multiple_of"
        )
    return width


def _check_importance(importance: str, calibration: Any) -> None:
    if importance not in IMPORTANCE_METHODS:
        raise ConfigError(
            f"importance={importance!r} is not one of {', '.join(IMPORTANCE_METHODS)}: "
            "'magnitude' needs no data, 'taylor' needs calibration batches"
        )
    if importance == "taylor" and calibration is None:
        raise ConfigError(
            "importance='taylor' needs calibration batches (dicts with input_ids, "
            "attention_mask, labels) to take loss gradients on; pass calibration=… or use "
            "importance='magnitude'"
        )


def _gated_mlps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The decoder layers' MLPs, after checking that each is a gated (SwiGLU) MLP."""
    from sdftlab.degrade.quantize import is_quantized

    if is_quantized(model):
        raise ConfigError(
            "the model is already 4-bit quantized; prune its unquantized parent, then quantize "
            "the pruned state (prune before quantize)"
        )
    mlps = [(name, mod) for name, mod in model.named_modules() if name.rsplit(".", 1)[-1] == "mlp"]
    if not mlps:
        raise ConfigError(
            f"{type(model).__name__} has no `mlp` submodules; FFN pruning supports only gated "
            "(SwiGLU: gate_proj/up_proj/down_proj) MLPs as in Qwen2/Llama/Mistral"
        )
    for name, mlp in mlps:
        if not all(isinstance(getattr(mlp, p, None), nn.Linear) for p in GATED_PROJECTIONS):
            children = ", ".join(n for n, _ in mlp.named_children()) or "no children"
            raise ConfigError(
                "FFN pruning supports only gated (SwiGLU: gate_proj/up_proj/down_proj) MLPs; "
                f"found {name} = {type(mlp).__name__} with {children}"
            )
    widths = {mlp.gate_proj.out_features for _, mlp in mlps}
    if len(widths) != 1:
        raise ConfigError(
            f"the layers' FFN widths differ ({sorted(widths)}); pruning needs one uniform width"
        )
    return mlps


# ------------------------------------------------------------------ importance


def _magnitude(mlp: nn.Module) -> torch.Tensor:
    # ‖W_gate[i,:]‖₂ · ‖W_up[i,:]‖₂ · ‖W_down[:,i]‖₂, in float32 whatever the weights' dtype.
    gate = mlp.gate_proj.weight.detach().float().norm(dim=1)
    up = mlp.up_proj.weight.detach().float().norm(dim=1)
    down = mlp.down_proj.weight.detach().float().norm(dim=0)
    return gate * up * down


def _taylor(
    model: nn.Module, mlps: list[tuple[str, nn.Module]], calibration: Iterable[Batch]
) -> list[torch.Tensor]:
    weights = [getattr(mlp, p).weight for _, mlp in mlps for p in GATED_PROJECTIONS]
    saved_flags = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    device = next(model.parameters()).device
    # Signed first-order term Σ_w w·∂L/∂w per neuron, summed over batches; |·| at the end.
    totals = [torch.zeros(mlp.gate_proj.out_features, device=device) for _, mlp in mlps]
    batches = 0
    try:
        for p in model.parameters():  # gradients only where they are needed
            p.requires_grad_(False)
            p.grad = None
        for w in weights:
            w.requires_grad_(True)
        with evaluating(model):  # deterministic forward (no dropout); autograd still works
            for batch in calibration:
                inputs = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
                if "input_ids" not in inputs:
                    raise ConfigError(
                        f"calibration batch {batches} has no input_ids (keys: {sorted(batch)})"
                    )
                if "labels" not in inputs:  # plain LM loss on the non-padding tokens
                    labels = inputs["input_ids"].clone()
                    if "attention_mask" in inputs:
                        labels[inputs["attention_mask"] == 0] = -100
                    inputs["labels"] = labels
                loss = model(**inputs).loss
                if not torch.isfinite(loss):
                    raise ConfigError(
                        f"calibration batch {batches} gives a non-finite loss ({loss})"
                    )
                grads = torch.autograd.grad(loss, weights)
                for layer, (_, mlp) in enumerate(mlps):
                    g_gate, g_up, g_down = grads[3 * layer : 3 * layer + 3]
                    totals[layer] += (
                        (mlp.gate_proj.weight.detach().float() * g_gate.float()).sum(dim=1)
                        + (mlp.up_proj.weight.detach().float() * g_up.float()).sum(dim=1)
                        + (mlp.down_proj.weight.detach().float() * g_down.float()).sum(dim=0)
                    )
                batches += 1
    finally:
        for p, flag, grad in saved_flags:
            p.requires_grad_(flag)
            p.grad = grad
    if batches == 0:
        raise ConfigError("importance='taylor' got an empty calibration iterable; pass batches")
    return [t.abs() for t in totals]


def ffn_importance(
    model: nn.Module,
    method: str = "magnitude",
    calibration: Iterable[Batch] | None = None,
) -> list[torch.Tensor]:
    """One float32 score per intermediate neuron, per layer (higher = more important).

    `calibration` (for ``taylor``): batches as dicts of tensors with ``input_ids`` and
    optionally ``attention_mask`` and ``labels`` (-100 = ignored; without labels the inputs
    are their own labels, padding ignored). See the module docstring for the formulas.
    """
    _check_importance(method, calibration)
    mlps = _gated_mlps(model)
    if method == "magnitude":
        return [_magnitude(mlp) for _, mlp in mlps]
    assert calibration is not None
    return _taylor(model, mlps, calibration)


# ------------------------------------------------------------------ pruning


def _sliced_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new nn.Linear holding `linear`'s weight rows (dim 0) or columns (dim 1) `index`."""
    weight = linear.weight.detach().index_select(dim, index.to(linear.weight.device))
    out_features, in_features = weight.shape
    has_bias = linear.bias is not None
    new = nn.Linear(
        in_features, out_features, bias=has_bias, device=weight.device, dtype=weight.dtype
    )
    new.weight.data.copy_(weight)
    new.weight.requires_grad_(linear.weight.requires_grad)
    if has_bias:
        # gate/up bias entries belong to a neuron; the down bias is per output, kept whole.
        bias = linear.bias.detach()
        new.bias.data.copy_(bias.index_select(0, index.to(bias.device)) if dim == 0 else bias)
        new.bias.requires_grad_(linear.bias.requires_grad)
    return new


def _ffn_params(mlps: list[tuple[str, nn.Module]]) -> int:
    return sum(
        p.numel() for _, mlp in mlps for name in GATED_PROJECTIONS
        for p in getattr(mlp, name).parameters()
    )  # fmt: skip


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors count once


@torch.no_grad()
def _apply(mlps: list[tuple[str, nn.Module]], keep: list[torch.Tensor]) -> None:
    for (_, mlp), idx in zip(mlps, keep, strict=True):
        mlp.gate_proj = _sliced_linear(mlp.gate_proj, idx, dim=0)
        mlp.up_proj = _sliced_linear(mlp.up_proj, idx, dim=0)
        mlp.down_proj = _sliced_linear(mlp.down_proj, idx, dim=1)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(idx)


def prune_ffn(
    model: nn.Module,
    ratio: float,
    importance: str = "magnitude",
    multiple_of: int = 64,
    calibration: Iterable[Batch] | None = None,
) -> PruneReport:
    """Remove the least important FFN neurons of every layer, in place (same count per layer).

    Each layer keeps its top-`kept_width(I, ratio, multiple_of)` neurons by `importance`
    (ties broken towards lower indices), in their original order; `gate_proj`/`up_proj` rows
    and `down_proj` columns are sliced together into new `nn.Linear` modules (same dtype,
    device, bias) and `model.config.intermediate_size` is set to the new width.
    """
    _check_importance(importance, calibration)
    mlps = _gated_mlps(model)
    old = mlps[0][1].gate_proj.out_features
    new = kept_width(old, ratio, multiple_of)
    params_before, ffn_before = _num_params(model), _ffn_params(mlps)
    if new == old:
        keep = [torch.arange(old) for _ in mlps]
    else:
        scores = ffn_importance(model, importance, calibration)
        # stable descending sort: equal scores keep the lower index; then restore order.
        keep = [
            torch.argsort(s.cpu(), descending=True, stable=True)[:new].sort().values for s in scores
        ]
        _apply(mlps, keep)
        config = getattr(model, "config", None)
        if config is not None:
            text_config = getattr(config, "text_config", None)
            for cfg in (config, text_config):
                if cfg is not None and hasattr(cfg, "intermediate_size"):
                    cfg.intermediate_size = new
    return PruneReport(
        importance=importance,
        old_width=old,
        new_width=new,
        num_layers=len(mlps),
        params_before=params_before,
        params_after=_num_params(model),
        ffn_params_before=ffn_before,
        ffn_params_after=_ffn_params(mlps),
        kept=[k.tolist() for k in keep],
    )


class PruneSpec(StrictModel):
    """`prune_state`'s options, as a pipeline stage and `sdftlab degrade prune` give them."""

    ratio: float = Field(0.1, gt=0, lt=1)
    importance: Literal["magnitude", "taylor"] = "magnitude"
    multiple_of: int = Field(64, gt=0, description="new width rounded to this (16 for tiny)")
    calibration: str = Field("science", description="taylor: task (or task=PATH) to score on")
    calibration_rows: int = Field(64, gt=0)


def prune_state(
    lineage: Lineage,
    src: str,
    dst: str,
    ratio: float,
    *,
    importance: str = "magnitude",
    multiple_of: int = 64,
    calibration: Iterable[Batch] | None = None,
    overwrite: bool = False,
) -> StateMeta:
    """Prune lineage state `src` and save it as `dst` (kind "prune", parent `src`).

    Every argument is checked — names, ratio, multiple_of, importance, that `src` is not
    quantized — before any weights are loaded, and the model's structure (gated MLPs) before
    anything is written: a bad input raises one error and writes nothing.
    """
    from sdftlab.degrade.quantize import is_quantized

    check_ratio(ratio)
    check_multiple_of(multiple_of)
    _check_importance(importance, calibration)
    lineage.check_new(dst, parents=[src], overwrite=overwrite)
    config = json.loads((lineage.local_path(src) / "config.json").read_text())
    if is_quantized(config):
        raise ConfigError(
            f"state {src!r} is already 4-bit quantized; prune its unquantized parent, then "
            "quantize the pruned state (prune before quantize)"
        )
    width = config.get("intermediate_size")
    if isinstance(width, int):
        kept_width(width, ratio, multiple_of)  # "leaves 0 neurons" before loading, too

    model = lineage.load_model(src)
    tokenizer = lineage.load_tokenizer(src)
    report = prune_ffn(model, ratio, importance, multiple_of, calibration)
    return lineage.save(
        dst,
        model,
        tokenizer,
        kind="prune",
        parents=[src],
        config={
            "ratio": ratio,
            "importance": importance,
            "multiple_of": multiple_of,
            "old_width": report.old_width,
            "new_width": report.new_width,
        },
        metrics={
            "prune/params": report.params_after,
            "prune/ffn_removed": report.ffn_removed,
            "prune/params_removed": report.params_removed,
        },
        overwrite=overwrite,
    )


def calibration_batches(
    tokenizer: Any,
    task_path: str | Any,
    task: str,
    *,
    rows: int = 64,
    batch_size: int = 8,
    max_len: int = 256,
) -> list[dict[str, torch.Tensor]]:
    """Taylor calibration: the first `rows` rows of a task file as padded chat batches (the
    prompt and its golden response, loss on the response tokens)."""
    from sdftlab.data.chat import pad_batch, tokenize_chat
    from sdftlab.data.loaders import load_task_file

    if rows < 1 or batch_size < 1:
        raise ConfigError(f"calibration rows={rows}, batch_size={batch_size}: both must be ≥ 1")
    encoded = [
        tokenize_chat(tokenizer, ex.messages, ex.demonstration, max_len)
        for ex in load_task_file(task_path, task, limit=rows)
    ]
    return [
        {k: torch.from_numpy(v) for k, v in pad_batch(encoded[i : i + batch_size],
                                                      tokenizer.pad_token_id).items()}
        for i in range(0, len(encoded), batch_size)
    ]  # fmt: skip


def run_prune(
    lineage: Lineage,
    src: str,
    dst: str,
    spec: PruneSpec,
    *,
    data_dir: Path | None,
    overwrite: bool = False,
) -> StateMeta:
    """`prune_state` with a spec: Taylor importance is scored on `spec.calibration_rows` rows
    of the `spec.calibration` task (the world's train split, or task=PATH)."""
    from sdftlab.data.loaders import task_source

    calibration = None
    if spec.importance == "taylor":
        lineage.require(src)
        task, path = task_source(spec.calibration, data_dir, "train")
        tokenizer = lineage.load_tokenizer(src)
        calibration = calibration_batches(tokenizer, path, task, rows=spec.calibration_rows)
    return prune_state(
        lineage, src, dst, spec.ratio, importance=spec.importance,
        multiple_of=spec.multiple_of, calibration=calibration, overwrite=overwrite,
    )  # fmt: skip
