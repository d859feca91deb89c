"""Training checkpoints in safetensors, and resuming from them.

A checkpoint holds the trainable parameters, each extra module's parameters (an EMA
teacher), the AdamW state and a JSON of scalars (the step, the live CKA measurements so far);
the last one also the whole state under `model/` (LoRA merged). Nothing is pickled, so a
checkpoint from shared storage is safe to load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sdftlab import sharding

OPTIM_FILE = "optimizer.safetensors"
STATE_FILE = "train_state.json"
LIVE_CKA_FILE = "live_cka.json"  # in a saved state: its live CKA measurements, step by step


def save_optimizer(state: dict[str, Any], directory: Path) -> None:
    """An optimizer's whole state (`sharding.optimizer_state`: keyed by parameter name) as
    safetensors (tensors, `NAME:KEY`) + JSON (scalars and the parameter groups)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {"param_groups": state["param_groups"]}
    for name, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value) and value.ndim > 0:
                tensors[f"{name}:{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{name}:{key}"] = float(value)
    save_file(tensors, str(directory / OPTIM_FILE))
    (directory / "optimizer_scalars.json").write_text(json.dumps(scalars))


def load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path):
    """`save_optimizer`'s files back into `optimizer` (sharded: each rank keeps its shards)."""
    tensors = load_file(str(directory / OPTIM_FILE))
    scalars = json.loads((directory / "optimizer_scalars.json").read_text())
    state: dict[str, dict[str, Any]] = {}
    for name, value in tensors.items():
        param, key = name.rsplit(":", 1)
        state.setdefault(param, {})[key] = value
    for name, value in scalars.items():
        if name == "param_groups":
            continue
        param, key = name.rsplit(":", 1)
        state.setdefault(param, {})[key] = torch.tensor(value)
    whole = {"state": state, "param_groups": scalars["param_groups"]}
    sharding.load_optimizer_state(model, optimizer, whole)


def read_train_state(directory: Path) -> dict[str, Any]:
    return json.loads((directory / STATE_FILE).read_text())


def load_parameters(model: torch.nn.Module, path: Path) -> None:
    """Load a `save_checkpoint` parameter file into `model` (a subset of its parameters)."""
    result = model.load_state_dict(load_file(str(path)), strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"checkpoint has unexpected keys {result.unexpected_keys[:3]}")


def save_checkpoint(
    model: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    directory: Path,
    step: int,
    *,
    final: bool,
    extra: dict[str, torch.nn.Module] | None = None,
    live_cka: list[dict[str, float]] | None = None,
) -> bool:
    """A Ray Train checkpoint directory, safetensors only: the trainable parameters, each
    `extra` module's parameters (`<name>.safetensors`, e.g. an EMA teacher), the optimizer,
    the step and the live CKA measurements so far; with `final`, also the state itself under
    `model/` (LoRA merged), the measurements beside it (`live_cka.json`).

    Called on every worker: a sharded model's state is gathered first (a collective); rank 0
    writes. Returns whether this worker wrote the checkpoint."""
    rank, _ = sharding.world()
    sharded = sharding.is_sharded(model)
    if rank != 0 and not sharded:
        return False
    state = sharding.full_state(model)  # every rank, when sharded
    optimizer_state = sharding.optimizer_state(model, optimizer)
    if rank != 0:
        return False
    bare = sharding.unwrap(model)
    trainable = {n for n, p in bare.named_parameters() if p.requires_grad}
    save_file(
        {n: t.contiguous() for n, t in state.items() if n in trainable},
        str(directory / "trainable.safetensors"),
    )
    for name, module in (extra or {}).items():
        params = {n: p.detach().cpu().contiguous() for n, p in module.named_parameters()}
        save_file(params, str(directory / f"{name}.safetensors"))
    save_optimizer(optimizer_state, directory)
    (directory / STATE_FILE).write_text(json.dumps({"step": step, "live_cka": live_cka or []}))
    if final:
        from sdftlab.models import save_final

        whole = sharding.unsharded_copy(bare, state) if sharded else bare
        save_final(whole, tokenizer, directory / "model")
        if live_cka:
            (directory / "model" / LIVE_CKA_FILE).write_text(json.dumps(live_cka, indent=1))
    return True


def resume_weights(
    checkpoint: Any, model: torch.nn.Module, extra: dict[str, torch.nn.Module]
) -> tuple[int, list[dict[str, float]]]:
    """The trained weights (and each `extra` module's) from Ray Train's `checkpoint` into the
    unsharded model; (steps done, live CKA measurements so far). (0, []) for a fresh run."""
    if checkpoint is None:
        return 0, []
    with checkpoint.as_directory() as d:
        load_parameters(model, Path(d) / "trainable.safetensors")
        for name, module in extra.items():
            load_parameters(module, Path(d) / f"{name}.safetensors")
        state = read_train_state(Path(d))
    # checkpoints from before the live CKA measurements were kept hold none
    return state["step"], list(state.get("live_cka", []))


def resume_optimizer(checkpoint: Any, model: torch.nn.Module, optimizer: Any) -> None:
    """The AdamW state from `checkpoint` (none: a fresh run), after the model is sharded."""
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            load_optimizer(model, optimizer, Path(d))
