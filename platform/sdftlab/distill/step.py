"""One SDFT (or off-policy distillation) step: forward, loss and backward over a batch.

`sdft_step(batch, student, teacher, cfg, ...)` is the step the Ray Train loop, the
benchmarks and the tests all run. For each micro-batch of `cfg.memory.micro_batch_size`
rows (the whole batch by default):

1. the student's hidden states at the positions predicting its completion tokens, from its
   own prompt (`batch.completion_hidden`);
2. the completion tokens with a loss: valid, minus each row's first `loss.mask_first_k`
   on-policy (the reference masks 3);
3. the teacher's targets at those tokens, from the teacher's prompt (`teachers`);
4. the per-token divergence (forward KL by default; full vocabulary or top-k), each token
   weighted by the capped importance ratio min(π_trainer / π_engine, cap) of its sampled
   token, the output layer and the loss run `memory.chunk_tokens` at a time, divided by the
   kept tokens of the whole step on every worker — so micro-batches and workers add up to
   the step's mean;
5. optionally + w · (1 − CKA) between student and teacher hidden states on the
   micro-batch's valid tokens (weighted by its share of the step's tokens);
6. backward (DDP all-reduces, FSDP reduce-scatters, on the last micro-batch only).

The caller clips and steps the optimizer, then calls `teacher.after_step`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from sdftlab.cka.stats import linear_cka_torch
from sdftlab.distill.batch import RolloutBatch, completion_hidden, padded_floats, padded_ids
from sdftlab.distill.config import RecoverConfig
from sdftlab.distill.losses import chunked_sdft_loss, mask_first_tokens
from sdftlab.distill.teachers import Teacher
from sdftlab.sharding import (
    global_tokens,
    is_sharded,
    mean_over_workers,
    no_sync,
    same_on_every_worker,
)
from sdftlab.train.batches import micro_batches, output_layer
from sdftlab.train.setup import autocast


@dataclass
class StepResult:
    loss: float  # the step's loss (divergence, + CKA term), as its gradients are
    stats: dict[str, float] = field(default_factory=dict)


def sdft_step(
    batch: RolloutBatch,
    student: torch.nn.Module,
    teacher: Teacher,
    cfg: RecoverConfig,
    *,
    pad_id: int,
    device: torch.device,
) -> StepResult:
    """Forward and backward of one step over `batch`; gradients accumulate in `student`."""
    mask_first_k = cfg.loss.mask_first_k if cfg.mode == "on_policy" else 0
    n_local = batch.kept_tokens(mask_first_k)
    n_kept = global_tokens(n_local)  # the mean over every worker's tokens (`sharding`)
    n_valid = global_tokens(sum(len(c) for c in batch.completions))
    layers = cfg.loss.cka_layers if cfg.loss.cka_weight > 0 else []
    weighted = batch.engine_logprobs is not None and cfg.loss.importance_cap is not None
    head = output_layer(student)
    autocast_on = cfg.memory.autocast_on(cfg.use_gpu, cpu_default=False)  # SDFT: fp32 on CPU
    sums = dict.fromkeys(["loss", "divergence", "importance_ratio", "policy_drift", "cka"], 0.0)
    t0 = time.perf_counter()
    teacher.prepare(batch)
    teacher_s = time.perf_counter() - t0
    parts = micro_batches(len(batch), cfg.memory.micro_batch_size)
    if is_sharded(student):  # each micro-batch's forward is a collective
        same_on_every_worker(len(parts), "micro-batches")
    for i, rows in enumerate(parts):
        part = batch.rows(rows)
        with no_sync(student, i == len(parts) - 1, cfg.memory.fsdp_accumulate):
            with autocast(device, autocast_on):
                s = completion_hidden(
                    student, part.student_prompts, part.completions, pad_id, device, layers
                )
                keep_BC = mask_first_tokens(s.valid_BC, mask_first_k)
                t0 = time.perf_counter()
                targets = teacher.targets(part, keep_BC, s.valid_BC, layers)
                teacher_s += time.perf_counter() - t0
                width = keep_BC.shape[1]
                loss, stats = chunked_sdft_loss(
                    s.last_BCD[keep_BC],
                    head,
                    targets.chunk,
                    n_tokens=n_kept,
                    kind=cfg.loss.kind,
                    beta=cfg.loss.beta,
                    sampled_ids_N=padded_ids(part.completions, width, device)[keep_BC],
                    engine_logp_N=(
                        padded_floats(part.engine_logprobs, width, device)[keep_BC]
                        if weighted and part.engine_logprobs is not None
                        else None
                    ),
                    importance_cap=cfg.loss.importance_cap,
                    chunk_tokens=cfg.memory.chunk_for(head.weight.shape[0]),
                )
                if layers:  # CKA over the micro-batch's valid tokens, averaged over layers
                    cka = torch.stack([
                        linear_cka_torch(h[s.valid_BC].float(), t.float())
                        for h, t in zip(s.layers, targets.layers, strict=True)
                    ]).mean()  # fmt: skip
                    share = float(s.valid_BC.sum()) / max(n_valid, 1)
                    loss = loss + cfg.loss.cka_weight * (1 - cka) * share
                    sums["cka"] += float(cka) * share
            loss.backward()
        sums["loss"] += float(loss.detach())
        sums["divergence"] += stats["divergence"]
        sums["importance_ratio"] += stats.get("importance_ratio", 0.0)
        sums["policy_drift"] += stats.get("policy_drift", 0.0)
    out: dict[str, Any] = {
        "divergence": mean_over_workers(sums["divergence"]),
        "tokens": float(n_local),
        "teacher_s": teacher_s,
    }
    if weighted:
        out["importance_ratio"] = sums["importance_ratio"]
        out["policy_drift"] = sums["policy_drift"]
    if layers:
        out["cka"] = sums["cka"]
    return StepResult(mean_over_workers(sums["loss"]), out)
