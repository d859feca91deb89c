"""Per-token distillation losses for SDFT (Shenfeld et al. 2026, arXiv 2601.19897).

The student minimises a divergence to the teacher at every completion position t of its own
sampled tokens. With p = teacher, q = student, both over the vocabulary V at position t:

- forward KL (the reference code's default, the published numbers): KL[p‖q] = Σ_v p (log p − log q)
- reverse KL: KL[q‖p] = Σ_v q (log q − log p)
- generalized JSD(β), as in GKD / TRL: with M = β p + (1 − β) q,
  JSD_β = β KL[p‖M] + (1 − β) KL[q‖M]; β = 0 is taken as forward KL and β = 1 as reverse KL
  (the limits of JSD_β / β and JSD_β / (1 − β)), as TRL does.

Top-k: when the teacher gives only its k most likely tokens (vLLM `prompt_logprobs=k`), the
divergence runs over those k tokens plus one "rest of the vocabulary" bucket holding the
remaining mass of each side, so k = |V| gives exactly the full-vocabulary value.

Masking: `mask_BT` selects completion tokens; `mask_first_k` drops the first k of each row (the
reference masks 3). An optional per-token weight carries the capped importance ratio
π_trainer(y_t) / π_engine(y_t) (`importance_weights`). The loss is the weighted mean over the
kept tokens.

    >>> loss, stats = chunked_sdft_loss(hidden_ND, head, teacher_chunk, n_tokens=n)

(The unchunked loss these equal, on whole [B, T, V] logits, is the tests' reference:
`tests/reference_losses.py`.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from sdftlab.errors import ConfigError

LossKind = Literal["forward_kl", "reverse_kl", "jsd"]


@dataclass(frozen=True)
class TopK:
    """A teacher's top-k log-probabilities at every position: indices and values [B, T, k]."""

    indices_BTK: torch.Tensor
    logprobs_BTK: torch.Tensor


_LOG_ZERO = -1e9  # stands for log 0: keeps 0·(log 0 − log 0) = 0 and its gradient finite


def _kl(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """KL[a‖b] summed over the last axis; 0·log 0 taken as 0."""
    logp_a, logp_b = logp_a.clamp(min=_LOG_ZERO), logp_b.clamp(min=_LOG_ZERO)
    return (logp_a.exp() * (logp_a - logp_b)).sum(-1)


def divergence(
    teacher_logp: torch.Tensor,
    student_logp: torch.Tensor,
    kind: LossKind = "forward_kl",
    beta: float = 0.5,
) -> torch.Tensor:
    """Per-position divergence between two log-distributions over the last axis."""
    if teacher_logp.shape != student_logp.shape:
        raise ValueError(
            f"teacher and student log-probs differ in shape: {tuple(teacher_logp.shape)} vs "
            f"{tuple(student_logp.shape)}"
        )
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return _kl(teacher_logp, student_logp)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _kl(student_logp, teacher_logp)
    if kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise ConfigError(f"loss.beta must be in [0, 1], got {beta}")
        # log M = logsumexp(log p + log β, log q + log(1 − β))
        log_m = torch.logsumexp(
            torch.stack([teacher_logp + math.log(beta), student_logp + math.log(1 - beta)]), dim=0
        )
        return beta * _kl(teacher_logp, log_m) + (1 - beta) * _kl(student_logp, log_m)
    raise ConfigError(f"loss.kind must be forward_kl, reverse_kl or jsd, got {kind!r}")


def _with_rest_bucket(logp_BTK: torch.Tensor) -> torch.Tensor:
    """Append log(1 − Σ p) as a (k+1)-th entry: the mass outside the k tokens."""
    rest = torch.log1p(-logp_BTK.exp().sum(-1).clamp(max=1.0 - 1e-7))
    total = torch.logsumexp(logp_BTK, dim=-1)
    # where the k tokens already hold all the mass (k = |V|), the rest bucket is exactly 0
    rest = torch.where(total >= -1e-7, torch.full_like(rest, -math.inf), rest)
    return torch.cat([logp_BTK, rest.unsqueeze(-1)], dim=-1)


def divergence_from_logp(
    student_logp_BTV: torch.Tensor,
    teacher: torch.Tensor | TopK,
    kind: LossKind = "forward_kl",
    beta: float = 0.5,
) -> torch.Tensor:
    """The divergence at every position from the student's log-probs (any leading shape,
    vocabulary last) and the teacher's full log-probs or top-k."""
    dtype = student_logp_BTV.dtype
    if isinstance(teacher, TopK):
        student_k = student_logp_BTV.gather(-1, teacher.indices_BTK)
        return divergence(
            _with_rest_bucket(teacher.logprobs_BTK.to(dtype)),
            _with_rest_bucket(student_k),
            kind,
            beta,
        )
    if teacher.shape != student_logp_BTV.shape:
        raise ValueError(
            f"teacher log-probs {tuple(teacher.shape)} do not match student logits "
            f"{tuple(student_logp_BTV.shape)}: same tokenizer and positions needed"
        )
    return divergence(teacher.to(dtype), student_logp_BTV, kind, beta)


def mask_first_tokens(mask_BT: torch.Tensor, k: int) -> torch.Tensor:
    """`mask_BT` with the first k kept positions of every row switched off."""
    if k <= 0:
        return mask_BT
    kept_before = mask_BT.long().cumsum(-1)
    return mask_BT & (kept_before > k)


def importance_weights(
    trainer_logp_BT: torch.Tensor, engine_logp_BT: torch.Tensor, cap: float
) -> torch.Tensor:
    """Truncated importance ratio min(π_trainer / π_engine, cap) of the sampled tokens, detached.

    The rollout engine (vLLM, bf16 kernels, stale by one sync at most) and the trainer give
    slightly different probabilities to the same token; the ratio re-weights each token's loss
    toward the trainer's policy and the cap bounds its variance.
    """
    return (trainer_logp_BT - engine_logp_BT).detach().exp().clamp(max=cap)


# A teacher's targets for a range of the selected tokens: full log-probs [C, V] or top-k [C, k].
TeacherChunk = Callable[[slice], "torch.Tensor | TopK"]


def chunked_sdft_loss(
    student_hidden_ND: torch.Tensor,
    student_head: torch.nn.Module,
    teacher_chunk: TeacherChunk,
    *,
    n_tokens: int,
    kind: LossKind = "forward_kl",
    beta: float = 0.5,
    sampled_ids_N: torch.Tensor | None = None,
    engine_logp_N: torch.Tensor | None = None,
    importance_cap: float | None = None,
    chunk_tokens: int | None = 1024,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The SDFT loss over N selected completion tokens given as the student's last hidden states,
    with the output layer and the divergence run `chunk_tokens` at a time (`sdftlab.chunked`).

    The tokens are already selected (completion, not padding, first k masked); the loss is the
    weighted divergence summed over them, divided by `n_tokens` (the kept tokens of the whole
    step, so micro-batches add up to the step's mean). With `engine_logp_N` and a cap, each
    token is weighted by min(π_trainer(y) / π_engine(y), cap) of its sampled token y, and
    `policy_drift` is the mean |log π_trainer(y) − log π_engine(y)| (0 on-policy up to the
    kernels' rounding; one step of training on an overlapped rollout shows here)."""
    from sdftlab.chunked import chunked_head_loss

    weighted = engine_logp_N is not None and importance_cap is not None
    if weighted and sampled_ids_N is None:
        raise ValueError("importance weights need the sampled token ids")
    zero = torch.zeros((), device=student_hidden_ND.device)
    sums = {"divergence": zero, "importance_ratio": zero, "policy_drift": zero}  # detached

    def loss_fn(logits_CV: torch.Tensor, rows: slice) -> torch.Tensor:
        student_logp_CV = F.log_softmax(logits_CV, dim=-1)
        per_token_C = divergence_from_logp(student_logp_CV, teacher_chunk(rows), kind, beta)
        sums["divergence"] = sums["divergence"] + per_token_C.detach().sum()
        if not weighted:
            return per_token_C.sum()
        assert sampled_ids_N is not None and engine_logp_N is not None
        trainer_C = student_logp_CV.gather(-1, sampled_ids_N[rows].unsqueeze(-1)).squeeze(-1)
        w_C = importance_weights(trainer_C, engine_logp_N[rows], importance_cap or 1.0)
        sums["importance_ratio"] = sums["importance_ratio"] + w_C.sum()
        drift_C = (trainer_C.detach() - engine_logp_N[rows]).abs()
        sums["policy_drift"] = sums["policy_drift"] + drift_C.sum()
        return (per_token_C * w_C).sum()

    total = chunked_head_loss(student_hidden_ND, student_head, loss_fn, chunk_tokens)
    denominator = max(n_tokens, 1)
    stats = {
        "divergence": float(sums["divergence"]) / denominator,
        "tokens": float(len(student_hidden_ND)),
    }
    if weighted:
        stats["importance_ratio"] = float(sums["importance_ratio"]) / denominator
        stats["policy_drift"] = float(sums["policy_drift"]) / denominator
    return total / denominator, stats
