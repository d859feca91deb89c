"""Pieces every Ray Train loop here shares: checkpoints in safetensors, schedules, autocast,
LoRA adapters, micro-batches, the last hidden states that the chunked losses start from, and
the worker's peak memory.

Checkpoints hold the model (a Hugging Face directory, or a PEFT adapter) and the AdamW state,
all as safetensors plus a JSON of scalars — nothing is pickled, so a checkpoint from shared
storage is safe to load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import resource
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sdftlab import sharding
from sdftlab.sharding import no_sync, unwrap  # noqa: F401 (the training loops' `tu.` names)

OPTIM_FILE = "optimizer.safetensors"
STATE_FILE = "train_state.json"
LIVE_CKA_FILE = "live_cka.json"  # in a saved state: its live CKA measurements, step by step


class _RayTrainRecords(logging.Filter):
    """Drops the records of Ray Train's own modules (some log under their file's path, not
    under `ray.train`, and so reach the root logger's console handler)."""

    def filter(self, record: logging.LogRecord) -> bool:
        inside = record.name.startswith("ray.train") or f"{os.sep}ray{os.sep}train{os.sep}" in (
            record.pathname or ""
        )
        return not inside


def ray_train_logs_to_files() -> None:
    """In a Ray Train worker: Ray Train's own records go to its log files only.

    `ray.train`'s console handler already filters them at the run's level (`LoggingConfig`
    in `make_trainer`); the root logger's console handler, which Ray Train also configures,
    gets a filter for the ones logged under a file path ("Reporting training result …" at
    every report), while its file handler keeps them."""
    logging.getLogger("ray.train").propagate = False
    for handler in logging.getLogger().handlers:
        if type(handler).__name__ == "PlainRayHandler":  # the console, not the log files
            handler.addFilter(_RayTrainRecords())


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


def enable_checkpointing(model: Any) -> None:
    """Activation checkpointing on every decoder layer (non-reentrant: frozen inputs, LoRA and
    DDP all work with it)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def output_layer(model: torch.nn.Module) -> torch.nn.Module:
    """The LM head of a model, under any DDP or PEFT wrapper."""
    return unwrap(model).get_output_embeddings()


def last_hidden(model: torch.nn.Module, **inputs: Any) -> tuple[torch.Tensor, tuple]:
    """The last hidden states [B, T, D] (after the final norm: what the LM head reads) and all
    layers' hidden states, from a forward that runs the LM head on one position only.

    The call goes through `model` itself (DDP's hooks, PEFT's adapters); the chunked losses
    then run the head on the tokens that have a loss."""
    out = model(**inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False)
    return out.hidden_states[-1], out.hidden_states


def micro_batches(n: int, size: int | None) -> list[slice]:
    """Row ranges of `size` (the last one shorter) covering n rows; one range for None."""
    step = n if size is None else size
    return [slice(i, min(i + step, n)) for i in range(0, n, max(step, 1))]


def peak_rss_gb() -> float:
    """This process's peak resident memory so far, in GB (the kernel's high-water mark)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)  # bytes on macOS, KiB on Linux


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
    from sdftlab.sharding import load_optimizer_state

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
    load_optimizer_state(model, optimizer, whole)


def write_train_state(directory: Path, **values: Any) -> None:
    (directory / STATE_FILE).write_text(json.dumps(values))


def read_train_state(directory: Path) -> dict[str, Any]:
    return json.loads((directory / STATE_FILE).read_text())


def warmup_cosine(step: int, total: int, warmup: int, peak: float, floor: float = 0.1) -> float:
    """Linear warm-up to `peak`, cosine decay to `floor · peak` at `total`."""
    if step < warmup:
        return peak * (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


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


EAGER_MAX_HIDDEN = 256  # CPU: eager attention for models up to this width, SDPA beyond


def use_cpu_allocator(memory: Any, model: torch.nn.Module, device: torch.device) -> bool:
    """Apply `memory.cpu_allocator` in a CPU worker (`auto`: the heap setting for models up
    to `EAGER_MAX_HIDDEN` wide, the C library's beyond); whether the heap setting is on."""
    from sdftlab.allocator import tune_cpu_allocator

    if device.type != "cpu":
        return False
    choice = memory.cpu_allocator
    if choice == "auto":
        hidden = getattr(getattr(model, "config", None), "hidden_size", EAGER_MAX_HIDDEN + 1)
        choice = "heap" if hidden <= EAGER_MAX_HIDDEN else "system"
    return tune_cpu_allocator() if choice == "heap" else False


def use_training_attention(model: torch.nn.Module, device: torch.device) -> None:
    """Pick the attention kernel for training on `device`: on CPU, eager for models of hidden
    size up to `EAGER_MAX_HIDDEN` (the tiny worlds), the default (SDPA) otherwise and on GPUs.

    On CPU with bf16 autocast, the eager implementation is 11–29% faster per training step of
    the tiny world than PyTorch's SDPA (benchmarks/experiments/attention_cpu.py;
    docs/BENCHMARKS.md). Eager also keeps every [T, T] score matrix for the backward pass:
    on a real model's longer sequences that costs memory (17 GB against 11.7 GB for SDPA on an
    8 × 600-token SmolLM2-135M batch), so real models keep SDPA. Only the runtime choice
    changes; nothing of it is saved with the weights.
    """
    hidden = getattr(getattr(model, "config", None), "hidden_size", EAGER_MAX_HIDDEN + 1)
    if (
        device.type == "cpu"
        and hidden <= EAGER_MAX_HIDDEN
        and hasattr(model, "set_attn_implementation")
    ):
        model.set_attn_implementation("eager")


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut right padding common to the whole batch (fixed-width rows → the longest row)."""
    width = int(batch["attention_mask"].sum(dim=1).max().item())
    return {k: v[:, :width] for k, v in batch.items()}


def pack_documents(
    documents: Sequence[tuple[Sequence[int], Sequence[int]]], width: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """A padding-free batch: (input ids, labels) documents laid end to end in rows of at most
    `width` tokens (first fit, longest first), each with its own positions from 0.

    Given `position_ids` and no `attention_mask`, transformers builds a causal mask that
    keeps every document to itself (`find_packed_sequence_indices`), so the loss is the one
    the documents give padded one a row — the same (context, target) pairs — while far
    fewer pad tokens are computed (TRL's `padding_free`). Each document's first label is
    -100: it would otherwise be predicted from the document before it. The rows' padding
    forms a sequence of its own, with no loss.
    """
    order = sorted(range(len(documents)), key=lambda i: -len(documents[i][0]))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(documents[i][0])
        if n > width:
            raise ValueError(f"a document of {n} tokens does not fit a row of {width}")
        slot = next((r for r, free in enumerate(room) if free >= n), None)
        if slot is None:
            rows.append([])
            room.append(width)
            slot = len(rows) - 1
        rows[slot].append(i)
        room[slot] -= n
    used = max(width - free for free in room)
    ids = torch.full((len(rows), used), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), used), -100, dtype=torch.long)
    positions = torch.zeros((len(rows), used), dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            doc_ids, doc_labels = documents[i]
            n = len(doc_ids)
            ids[r, at : at + n] = torch.as_tensor(doc_ids)
            labels[r, at : at + n] = torch.as_tensor(doc_labels)
            labels[r, at] = -100
            positions[r, at : at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(used - at)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def pack_padded(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`pack_documents` over a right-padded batch (`input_ids`, `attention_mask`, `labels`
    [B, T]), in rows of T tokens, on the batch's device."""
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    ids, labels = batch["input_ids"].cpu(), batch["labels"].cpu()
    documents = [(ids[i, :n].tolist(), labels[i, :n].tolist()) for i, n in enumerate(lengths)]
    packed = pack_documents(documents, ids.shape[1], pad_id=0)
    return {k: v.to(batch["input_ids"].device) for k, v in packed.items()}


def cycle_epochs(make_iter: Any, skip: int = 0) -> Iterator[Any]:
    """Iterate `make_iter()` again and again (one pass per epoch), leaving out the first
    `skip` items: a resumed worker passes the steps it had done, so it goes on with the
    batches the killed run would have trained on next."""
    while True:
        empty = True
        for item in make_iter():
            empty = False
            if skip:
                skip -= 1
                continue
            yield item
        if empty:
            raise RuntimeError("the training data shard is empty: give more rows or fewer workers")


def kill_point(step: int) -> None:
    """Fault injection for drills and the fault-tolerance tests.

    With `SDFTLAB_KILL_AT_STEP="N:MARKER"`, the first worker process to finish step N creates
    the file MARKER and dies at once (`os._exit`, no cleanup), as a killed worker would; the
    marker keeps the restarted run from dying again. Unset, this does nothing.
    """
    spec = os.environ.get("SDFTLAB_KILL_AT_STEP")
    if not spec:
        return
    at, marker = spec.split(":", 1)
    if step == int(at) and not Path(marker).exists():
        Path(marker).write_text(f"killed after step {step}\n")
        os._exit(1)


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
    write_train_state(directory, step=step, live_cka=live_cka or [])
    if final:
        from sdftlab.models import save_final

        whole = sharding.unsharded_copy(bare, state) if sharded else bare
        save_final(whole, tokenizer, directory / "model")
        if live_cka:
            (directory / "model" / LIVE_CKA_FILE).write_text(json.dumps(live_cka, indent=1))
    return True


def read_live_cka(directory: Path) -> list[dict[str, float]]:
    """The live CKA measurements a checkpoint holds (none in one from before they existed)."""
    return list(read_train_state(directory).get("live_cka", []))


def load_parameters(model: torch.nn.Module, path: Path) -> None:
    """Load a `save_checkpoint` parameter file into `model` (a subset of its parameters)."""
    result = model.load_state_dict(load_file(str(path)), strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"checkpoint has unexpected keys {result.unexpected_keys[:3]}")


def run_name(kind: str, dst: str, cfg: Any, *inputs: str) -> str:
    """The Ray Train run of a stage. A restarted run finds its checkpoints under the same
    name — but only for the same config on the same input weights (`inputs`: content hashes),
    never a finished run of another student that happens to share the config."""
    digest = hashlib.sha256("|".join([cfg.stable_hash(), *inputs]).encode()).hexdigest()[:8]
    return f"{kind}-{dst}-{digest}"


def make_trainer(
    loop: Any,
    loop_config: dict[str, Any],
    *,
    run_name: str,
    num_workers: int,
    use_gpu: bool,
    cpus_per_worker: float,
    max_failures: int,
    datasets: dict[str, Any],
    callbacks: Sequence[Any] = (),
) -> Any:
    """The `TorchTrainer` every training stage uses: `num_workers` workers (DDP or FSDP2,
    `sharding`; gloo on CPU, NCCL on GPU), the latest checkpoint kept under the Ray storage
    path, and `max_failures` restarts from it when a worker dies.

    The datasets reach the workers in order (`preserve_order`): batches are then the same
    from run to run whatever the load, and a resumed worker that skips the batches it had
    seen skips the very ones the killed run saw."""
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    from sdftlab.paths import storage_path

    with warnings.catch_warnings():  # Ray's own use of its deprecated `exclude_resources`
        warnings.filterwarnings("ignore", message=".*exclude_resources", category=Warning)
        ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus_per_worker},
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path(),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=max_failures),
            # Ray Train's own INFO lines (each report, each checkpoint) go to its log files,
            # not the console: the stage's progress lines are what a person reads.
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=list(callbacks),
        ),
        datasets=datasets,
        # every worker reads every row in the same order and takes its rows of each global
        # batch (`sharding.rank_rows`): a step's batch is the same for 1 or N workers
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ingest),
    )


def report_log(path: Path) -> Any:
    """A Ray Train callback (`recover(callbacks=...)`, a trainer's `RunConfig`) that appends
    each report's metrics — rank 0's, one JSON line a report — to `path`: a run's curve step
    by step (`read_report_log`). It runs in Ray Train's controller: `path` must be on a disk
    the controller's node writes (any local path on a single machine)."""
    from ray.train import UserCallback

    class ReportLog(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
            with open(path, "a") as f:
                f.write(json.dumps(metrics[0]) + "\n")

    return ReportLog()


def read_report_log(path: Path) -> list[dict[str, Any]]:
    """The reports `report_log` wrote, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def live_cka_probe(
    lineage: Any, spec: Any, *, reference: str, data: str, data_dir: Path | None
) -> dict[str, Any] | None:
    """The driver's half of live CKA (`specs.LiveCKASpec`; None when it is off): the probe's
    rows and the reference's directory and label, checked before any worker starts.
    `reference` and `data` are the run's defaults (the spec's own values win)."""
    if spec.every == 0:
        return None
    from sdftlab.cka.capture import example_record
    from sdftlab.data.loaders import load_task_file, task_source
    from sdftlab.errors import SdftlabError

    ref, entry = spec.reference or reference, spec.data or data.split("+")[0]
    try:
        task, path = task_source(entry, data_dir, "eval")
        rows = [example_record(e) for e in load_task_file(path, task, limit=spec.rows)]
        reference_dir = lineage.resolve(ref)
    except SdftlabError as err:
        raise type(err)(
            f"live_cka: {err} (set live_cka.reference / live_cka.data, or live_cka.every=0)"
        ) from None
    return {
        "every": spec.every, "label": lineage.label(ref), "reference_dir": str(reference_dir),
        "rows": rows, "batch_size": spec.batch_size,
    }  # fmt: skip


def live_cka_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The last live CKA measurement among a run's final metrics (its time left out)."""
    return {k: float(v) for k, v in metrics.items()
            if k.startswith("live_cka/") and k != "live_cka/seconds"}  # fmt: skip


def live_cka(
    probe: dict[str, Any] | None,
    tokenizer: Any,
    device: torch.device,
    resident: dict[str | None, torch.nn.Module],
    everywhere: bool = False,
) -> Any:
    """The worker's half: on rank 0, a `cka.live.LiveCKA` with the reference's states captured
    (from a `resident` model that holds the reference's weights — the frozen teacher, the
    student before its first step — or else loaded and let go); None elsewhere or when off.
    `everywhere`: on every rank (a sharded student's forward is a collective; rank 0's
    measurement is the one reported)."""
    if probe is None or (sharding.world()[0] != 0 and not everywhere):
        return None
    from sdftlab.cka.live import LiveCKA

    model = resident.get(probe["reference_dir"])
    if model is None:
        from transformers import AutoModelForCausalLM

        from sdftlab.config import trust_remote_code

        model = AutoModelForCausalLM.from_pretrained(
            probe["reference_dir"], use_safetensors=True, dtype=torch.float32,
            trust_remote_code=trust_remote_code(),
        ).to(device)  # fmt: skip
    return LiveCKA(model, tokenizer, probe["rows"], label=probe["label"], every=probe["every"],
                   batch_size=probe["batch_size"])  # fmt: skip
