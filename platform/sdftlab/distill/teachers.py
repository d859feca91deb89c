"""SDFT teachers: what scores the student's completions from the teacher's prompt.

Every teacher answers the same three calls, once per step and once per micro-batch:

- `prepare(batch)`: work for the whole step (the vLLM teacher scores every row in one call);
- `targets(part, keep_BC, valid_BC, layers)`: for the micro-batch `part`, the teacher's
  distribution at each kept completion token — a function from a range of those tokens to
  full log-probs [C, V] or top-k (`TopK`), so the loss reads them a chunk at a time — and its
  hidden states at `layers` on the valid tokens (the CKA term);
- `after_step(student, rank)`: what follows an optimizer step (the EMA update, pushing the
  EMA weights to the teacher's vLLM engines through its `WeightSync`).

Implementations, one each:

| teacher                 | built by         | scores with                                     |
|-------------------------|------------------|-------------------------------------------------|
| a lineage state or path | `frozen_teacher` | a frozen copy beside the trainer, full vocab    |
| `ema`                   | `ema_teacher`    | an EMA of the student, θ ← (1 − r) θ + r θ_S    |
| `live`                  | `live_teacher`   | the student itself (no gradient), demo in context |
| the student's own state, LoRA | `adapters_off_teacher` | the student with its adapters off |
| any, `scoring=vllm`     | `VLLMTeacher`    | vLLM engines: top-k prompt log-probs            |

The model teachers are one class, `ModelTeacher` (a model scored beside the trainer, and
what follows a step); `VLLMTeacher` asks the engines. When the teacher is the state a LoRA
(or QLoRA) student starts from, its weights are the student's frozen base: scoring with the
adapters switched off gives the same targets as a frozen copy without a second model in
memory (as TRL scores a reference model under PEFT).

With `loss.topk` set and exact scoring, a model teacher gives its top k of the full
distribution (the rest of the mass in one bucket, `losses`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from sdftlab.distill.batch import RolloutBatch, completion_hidden, topk_tensors
from sdftlab.distill.losses import TeacherChunk, TopK
from sdftlab.modes import evaluating
from sdftlab.rollout.sync import WeightSync


@dataclass
class TeacherTargets:
    """A micro-batch's teacher side: targets over the kept tokens, hidden states for CKA."""

    chunk: TeacherChunk
    layers: list[torch.Tensor] = field(default_factory=list)  # [N_valid, d] per CKA layer


class Teacher(Protocol):
    def prepare(self, batch: RolloutBatch) -> None: ...

    def targets(
        self,
        part: RolloutBatch,
        keep_BC: torch.Tensor,
        valid_BC: torch.Tensor,
        layers: Sequence[int],
    ) -> TeacherTargets: ...

    def after_step(self, student: torch.nn.Module, rank: int) -> None: ...


def score_with_model(
    model: torch.nn.Module,
    part: RolloutBatch,
    keep_BC: torch.Tensor,
    valid_BC: torch.Tensor,
    layers: Sequence[int],
    *,
    pad_id: int,
    topk: int | None,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> TeacherTargets:
    """A model's targets: one no-grad forward from the teacher prompts; the LM head later,
    a chunk of kept tokens at a time, inside the loss. `context` is entered around both
    (the adapters switched off, for `adapters_off_teacher`)."""
    device = keep_BC.device
    with torch.no_grad(), evaluating(model), context():
        states = completion_hidden(
            model, part.teacher_prompts, part.completions, pad_id, device, layers
        )
    hidden_ND = states.last_BCD[keep_BC]
    head = model.get_output_embeddings()

    def chunk(rows: slice) -> torch.Tensor | TopK:
        with torch.no_grad(), context():
            logp_CV = F.log_softmax(head(hidden_ND[rows]).float(), dim=-1)
        if topk is None:
            return logp_CV
        values, indices = logp_CV.topk(topk, dim=-1)
        return TopK(indices, values)

    return TeacherTargets(chunk, [h[valid_BC] for h in states.layers])


class ModelTeacher:
    """A model scored beside the trainer, exactly; `update` (if any) runs after each step."""

    def __init__(
        self,
        model: torch.nn.Module,
        pad_id: int,
        topk: int | None,
        update: Callable[[torch.nn.Module], None] | None = None,
        context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> None:
        self.model, self.pad_id, self.topk, self.update = model, pad_id, topk, update
        self.context = context

    def prepare(self, batch: RolloutBatch) -> None:
        return None

    def targets(self, part, keep_BC, valid_BC, layers) -> TeacherTargets:
        return score_with_model(
            self.model, part, keep_BC, valid_BC, layers, pad_id=self.pad_id, topk=self.topk,
            context=self.context,
        )  # fmt: skip

    def after_step(self, student: torch.nn.Module, rank: int) -> None:
        if self.update is not None:
            self.update(student)


def frozen_teacher(model: torch.nn.Module, pad_id: int, topk: int | None) -> ModelTeacher:
    """A fixed state (base, expert, a path): frozen, never updated."""
    return ModelTeacher(model.eval().requires_grad_(False), pad_id, topk)


def live_teacher(student: torch.nn.Module, pad_id: int, topk: int | None) -> ModelTeacher:
    """The student as it is at each step, with the demonstration in its prompt."""
    return ModelTeacher(student, pad_id, topk)


def adapters_off_teacher(student: Any, pad_id: int, topk: int | None) -> ModelTeacher:
    """The state a LoRA/QLoRA student (a peft model) started from: the student itself with
    its adapters switched off while it scores — the frozen base, without a copy."""
    if not hasattr(student, "disable_adapter"):
        raise TypeError(f"adapters_off_teacher needs a peft model, got {type(student).__name__}")
    return ModelTeacher(student, pad_id, topk, context=student.disable_adapter)


def ema_teacher(
    student: torch.nn.Module, rate: float, pad_id: int, topk: int | None
) -> ModelTeacher:
    """An exponential moving average of the student, starting as its copy: after each step
    θ_T ← (1 − r) θ_T + r θ_S (the reference's teacher, r = 0.01)."""
    average = copy.deepcopy(student).eval().requires_grad_(False)

    @torch.no_grad()
    def update(current: torch.nn.Module) -> None:
        for p_t, p_s in zip(average.parameters(), current.parameters(), strict=True):
            p_t.lerp_(p_s.detach(), rate)  # θ_T + r (θ_S − θ_T)

    return ModelTeacher(average, pad_id, topk, update)


class VLLMTeacher:
    """Top-k prompt log-probs from vLLM engines holding the teacher (`scoring=vllm`, the
    pool behind `sync`); for `ema`, the worker keeps the average and pushes it to the engines
    after each step."""

    def __init__(self, sync: WeightSync, topk: int, ema: ModelTeacher | None = None) -> None:
        self.sync, self.pool, self.topk, self.ema = sync, sync.pool, topk, ema
        self._scored: TopK | None = None
        self._row = 0

    def prepare(self, batch: RolloutBatch) -> None:
        rows = self.pool.score(
            [p + c for p, c in zip(batch.teacher_prompts, batch.completions, strict=True)],
            [len(p) for p in batch.teacher_prompts],
            self.topk,
        )
        self._scored = topk_tensors(rows, max(len(c) for c in batch.completions), self.topk)
        self._row = 0

    def targets(self, part, keep_BC, valid_BC, layers) -> TeacherTargets:
        if self._scored is None:
            raise RuntimeError("VLLMTeacher.targets before prepare(batch)")
        if layers:
            raise ValueError("vLLM scoring gives no hidden states: use scoring=exact for CKA")
        rows = slice(self._row, self._row + len(part))  # micro-batches come in order
        self._row = rows.stop
        width = keep_BC.shape[1]
        idx_NK = self._scored.indices_BTK[rows, :width].to(keep_BC.device)[keep_BC]
        val_NK = self._scored.logprobs_BTK[rows, :width].to(keep_BC.device)[keep_BC]
        return TeacherTargets(lambda r: TopK(idx_NK[r], val_NK[r]))

    def after_step(self, student: torch.nn.Module, rank: int) -> None:
        if self.ema is not None:
            self.ema.after_step(student, rank)
            self.sync.push(self.ema.model, rank)
