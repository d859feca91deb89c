"""One distillation step's sequences, and the forward pass that reads them.

A `RolloutBatch` holds, row by row, the student's prompt, the teacher's prompt (the same
question with the demonstration in context), the completion both are scored on (a student
rollout on-policy, the demonstration off-policy), and the rollout engine's log-probability of
each sampled token (for the importance ratio). Its rows stay aligned through every
transformation: n rollouts per prompt repeat the prompts, and an empty completion drops the
whole row (`from_rollouts`, tested).

`completion_hidden` packs prompts left-padded and completions right-padded after them, so
every row's completion starts in the same column, and returns the hidden states at the
positions that predict completion tokens: the last (normed) layer that the LM head reads, and
any other layers asked for (the CKA term). The head itself runs later, in chunks
(`sdftlab.chunked`): a step never holds the [B, C, V] logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sdftlab.data.templates import reaches_answer_format
from sdftlab.distill.losses import TopK
from sdftlab.rollout.engines import Completion


@dataclass
class RolloutBatch:
    """Aligned rows: student prompt, teacher prompt, completion, engine log-probs."""

    student_prompts: list[list[int]]
    teacher_prompts: list[list[int]]
    completions: list[list[int]]
    engine_logprobs: list[list[float]] | None = None

    def __post_init__(self) -> None:
        sizes = {len(self.student_prompts), len(self.teacher_prompts), len(self.completions)}
        if self.engine_logprobs is not None:
            sizes.add(len(self.engine_logprobs))
        if len(sizes) != 1:
            raise ValueError(f"a rollout batch's columns differ in length: {sorted(sizes)}")

    def __len__(self) -> int:
        return len(self.completions)

    def rows(self, rows: slice) -> RolloutBatch:
        return RolloutBatch(
            self.student_prompts[rows],
            self.teacher_prompts[rows],
            self.completions[rows],
            None if self.engine_logprobs is None else self.engine_logprobs[rows],
        )

    def kept_tokens(self, mask_first_k: int) -> int:
        """Completion tokens with a loss: each row's tokens after its first `mask_first_k`."""
        return sum(max(0, len(c) - mask_first_k) for c in self.completions)


def from_rollouts(
    student_prompts: Sequence[Sequence[int]],
    teacher_prompts: Sequence[Sequence[int]],
    rollouts: Sequence[Completion],
    n: int,
) -> RolloutBatch:
    """The batch of `n` rollouts per prompt (prompt-major, as the engines return them), with
    the rows whose completion is empty left out; raises if every completion is empty."""
    if len(rollouts) != n * len(student_prompts):
        raise ValueError(f"{len(rollouts)} rollouts for {len(student_prompts)} prompts × n={n}")
    rows = [i for i, r in enumerate(rollouts) if r.token_ids]
    if not rows:
        raise RuntimeError("every rollout was empty; raise rollout.max_new_tokens")
    return RolloutBatch(
        [list(student_prompts[i // n]) for i in rows],
        [list(teacher_prompts[i // n]) for i in rows],
        [list(rollouts[i].token_ids) for i in rows],
        [list(rollouts[i].logprobs) for i in rows],
    )


def from_demonstrations(
    teacher_prompts: Sequence[Sequence[int]], demonstrations: Sequence[Sequence[int]]
) -> RolloutBatch:
    """Off-policy: both sides see prompt + demonstration and are scored on the demonstration."""
    prompts = [list(p) for p in teacher_prompts]
    return RolloutBatch(prompts, [list(p) for p in prompts], [list(d) for d in demonstrations])


def pack(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Prompts left-padded to the longest and completions right-padded after them, so every
    row's completion starts in the same column: ids [B, P+C], attention mask [B, P+C], the
    completion mask [B, C], and P. The positions predicting completion tokens are then one
    slice, [P − 1, P − 1 + C), shared by the batch."""
    p_max = max(len(p) for p in prompts)
    c_max = max(1, max(len(c) for c in completions))
    ids_BL = torch.full((len(prompts), p_max + c_max), pad_id, dtype=torch.long)
    attn_BL = torch.zeros((len(prompts), p_max + c_max), dtype=torch.long)
    valid_BC = torch.zeros((len(prompts), c_max), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids_BL[i, p_max - len(p) : p_max + len(c)] = torch.tensor([*p, *c])
        attn_BL[i, p_max - len(p) : p_max + len(c)] = 1
        valid_BC[i, : len(c)] = True
    return ids_BL, attn_BL, valid_BC, p_max


@dataclass
class CompletionStates:
    """Hidden states at the positions predicting each completion token of a packed batch."""

    last_BCD: torch.Tensor  # the final (normed) layer: what the LM head reads
    valid_BC: torch.Tensor  # completion token, not padding
    layers: list[torch.Tensor] = field(default_factory=list)  # `hidden_layers`, [B, C, d] each


def completion_hidden(
    model: Any,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device,
    hidden_layers: Sequence[int] = (),
) -> CompletionStates:
    """One forward over prompt + completion rows; the hidden states predicting the completion.

    The LM head runs on one position only (`logits_to_keep=1`): the caller runs it, chunked,
    on the completion tokens that have a loss."""
    from sdftlab.train.batches import last_hidden

    ids_BL, attn_BL, valid_BC, p_max = pack(prompts, completions, pad_id)
    c_max = valid_BC.shape[1]
    ids_BL, attn_BL = ids_BL.to(device), attn_BL.to(device)
    position_ids_BL = (attn_BL.cumsum(-1) - 1).clamp(min=0)  # left padding: count real tokens
    last_BLD, every = last_hidden(
        model, input_ids=ids_BL, attention_mask=attn_BL, position_ids=position_ids_BL
    )
    at = slice(p_max - 1, p_max - 1 + c_max)
    return CompletionStates(
        last_BLD[:, at], valid_BC.to(device), [every[layer][:, at] for layer in hidden_layers]
    )


def padded_ids(completions: Sequence[Sequence[int]], width: int, device: Any) -> torch.Tensor:
    """Completion token ids, right-padded with 0 to `width` columns [B, C]."""
    ids = torch.zeros((len(completions), width), dtype=torch.long)
    for i, c in enumerate(completions):
        ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
    return ids.to(device)


def padded_floats(rows: Sequence[Sequence[float]], width: int, device: Any) -> torch.Tensor:
    """Per-token floats (engine log-probs), right-padded with 0 to `width` columns [B, C]."""
    out = torch.zeros((len(rows), width))
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out.to(device)


def topk_tensors(rows: list[list[tuple[list[int], list[float]]]], c_max: int, k: int) -> TopK:
    """vLLM top-k rows → TopK [B, C, k] (padding positions get a harmless uniform filler)."""
    idx = torch.zeros((len(rows), c_max, k), dtype=torch.long)
    val = torch.full((len(rows), c_max, k), -float(np.log(k + 1)))
    for b, seq in enumerate(rows):
        for c, (ids, logps) in enumerate(seq[:c_max]):
            n = min(k, len(ids))
            idx[b, c, :n] = torch.tensor(ids[:n])
            val[b, c, :n] = torch.tensor(logps[:n])
    return TopK(idx, val)


def rollout_counts(
    completions: Sequence[Sequence[int]],
    *,
    eos_id: int,
    max_new_tokens: int,
    decode: Callable[[list[list[int]]], list[str]],
) -> list[int]:
    """[completions, truncated, in the answer format] of one step's rollouts: truncated ones
    stopped at the token budget without an end-of-sequence token; the answer format is
    `data.templates.reaches_answer_format` on the decoded text (a scorer could read an
    answer, right or wrong)."""
    texts = decode([list(c) for c in completions])
    truncated = sum(len(c) >= max_new_tokens and c[-1] != eos_id for c in completions)
    return [len(completions), int(truncated), sum(map(reaches_answer_format, texts))]
