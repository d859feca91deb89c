"""The SDFT loss on whole [B, T, V] logits: the definition the chunked loss the library trains
with (`distill.losses.chunked_sdft_loss`) is tested against, and the "before" of the
chunked-step benchmark (`benchmarks/real_model.py`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdftlab.distill.losses import LossKind, TopK, divergence_from_logp, mask_first_tokens


def token_divergence(
    student_logits_BTV: torch.Tensor,
    teacher: torch.Tensor | TopK,
    kind: LossKind = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Divergence at every position [B, T]: teacher full log-probs [B, T, V] or top-k."""
    dtype = torch.promote_types(student_logits_BTV.dtype, torch.float32)  # bf16 → fp32
    student_logp_BTV = F.log_softmax(student_logits_BTV.to(dtype) / temperature, dim=-1)
    return divergence_from_logp(student_logp_BTV, teacher, kind, beta)


def sdft_loss(
    student_logits_BTV: torch.Tensor,
    teacher: torch.Tensor | TopK,
    mask_BT: torch.Tensor,
    *,
    kind: LossKind = "forward_kl",
    beta: float = 0.5,
    mask_first_k: int = 0,
    weights_BT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted mean per-token divergence over the kept completion tokens, and its stats."""
    if mask_BT.shape != student_logits_BTV.shape[:2]:
        raise ValueError(
            f"mask {tuple(mask_BT.shape)} does not match logits {tuple(student_logits_BTV.shape)}"
        )
    keep_BT = mask_first_tokens(mask_BT.bool(), mask_first_k)
    per_token_BT = token_divergence(student_logits_BTV, teacher, kind, beta)
    w_BT = keep_BT.float() if weights_BT is None else keep_BT.float() * weights_BT
    n_tokens = keep_BT.sum().clamp(min=1)
    loss = (per_token_BT * w_BT).sum() / n_tokens
    stats = {
        "divergence": float((per_token_BT.detach() * keep_BT).sum() / n_tokens),
        "tokens": float(keep_BT.sum()),
    }
    if weights_BT is not None:
        stats["importance_ratio"] = float((weights_BT * keep_BT).sum() / n_tokens)
    return loss, stats
