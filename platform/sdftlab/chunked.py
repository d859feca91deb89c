"""The output layer and a per-token loss, computed a chunk of tokens at a time.

A causal LM's logits are the largest tensor of a training step: [N, V] floats for N tokens
over a V-word vocabulary (4 bytes × 49,152 ≈ 0.2 MB a token for SmolLM2, 0.6 MB for Qwen2.5),
and the loss keeps copies of them (log-softmax, its exp, the gradient). `chunked_head_loss`
never holds more than `chunk_tokens` rows of them: for each chunk it runs the head
(`head(hidden)`), the loss on that chunk, and the chunk's gradient with respect to the hidden
states and the head's parameters, then frees the chunk (the fused linear + loss of Liger
Kernel and torchtune, for any loss). The backward pass only scales the stored gradients, so
the value and the gradients are those of the unchunked loss (summed in another order: equal
within float rounding; `tests/test_chunked.py`).

The loss is a function of one chunk's fp32 logits and the chunk's token range; it returns
the chunk's summed loss. Any per-token quantity it also wants to keep (a divergence without
the importance weight, a count) it adds to a dict of its own: the chunks run in order,
during the forward call.

    >>> def cross_entropy(logits_CV, rows):
    ...     return F.cross_entropy(logits_CV, labels_N[rows], reduction="sum")
    >>> loss = chunked_head_loss(hidden_ND, model.lm_head, cross_entropy, 1024) / len(labels_N)
    >>> loss.backward()
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

ChunkLoss = Callable[[torch.Tensor, slice], torch.Tensor]


class _ChunkedHeadLoss(torch.autograd.Function):
    """Σ over chunks of loss(head(hidden[chunk])); gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden_ND: torch.Tensor,
        head: torch.nn.Module,
        loss_fn: ChunkLoss,
        chunk_tokens: int,
        *params: torch.Tensor,
    ) -> torch.Tensor:
        wants_hidden = hidden_ND.requires_grad
        trained = [p for p in params if p.requires_grad]
        grad_hidden_ND = torch.zeros_like(hidden_ND) if wants_hidden else None
        grad_params = [torch.zeros_like(p) for p in trained]
        total = torch.zeros((), dtype=torch.float32, device=hidden_ND.device)
        for start in range(0, hidden_ND.shape[0], chunk_tokens):
            rows = slice(start, min(start + chunk_tokens, hidden_ND.shape[0]))
            h_CD = hidden_ND[rows].detach().requires_grad_(wants_hidden)
            with torch.enable_grad():
                loss = loss_fn(head(h_CD).float(), rows)
            inputs = ([h_CD] if wants_hidden else []) + trained
            if inputs and loss.requires_grad:
                grads = torch.autograd.grad(loss, inputs)
                if grad_hidden_ND is not None:
                    grad_hidden_ND[rows] = grads[0]
                for acc, g in zip(grad_params, grads[int(wants_hidden) :], strict=True):
                    acc += g
            total += loss.detach().float()
        ctx.wants_hidden = wants_hidden
        ctx.trained_mask = [p.requires_grad for p in params]
        ctx.save_for_backward(
            *([grad_hidden_ND] if grad_hidden_ND is not None else []), *grad_params
        )
        return total

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor):  # type: ignore[override]
        saved = list(ctx.saved_tensors)
        grad_hidden = saved.pop(0) * grad_out if ctx.wants_hidden else None
        grad_params = iter(saved)
        per_param = [next(grad_params) * grad_out if t else None for t in ctx.trained_mask]
        return (grad_hidden, None, None, None, *per_param)


def chunked_head_loss(
    hidden_ND: torch.Tensor,
    head: torch.nn.Module,
    loss_fn: ChunkLoss,
    chunk_tokens: int | None,
) -> torch.Tensor:
    """Σ_chunks loss_fn(head(hidden_ND[chunk]).float(), chunk): a scalar with gradients to
    `hidden_ND` and to the head's trainable parameters (a tied head's weight included).

    `chunk_tokens=None` runs the head over all N tokens at once, as the plain unchunked loss."""
    if hidden_ND.ndim != 2:
        raise ValueError(f"hidden states must be [N, D] (selected tokens), got {hidden_ND.shape}")
    if chunk_tokens is None:
        return loss_fn(head(hidden_ND).float(), slice(0, hidden_ND.shape[0]))
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    params = list(head.parameters())
    return _ChunkedHeadLoss.apply(hidden_ND, head, loss_fn, chunk_tokens, *params)


def chunked_cross_entropy(
    hidden_ND: torch.Tensor,
    head: torch.nn.Module,
    labels_N: torch.Tensor,
    *,
    n_tokens: int,
    chunk_tokens: int | None = 1024,
) -> torch.Tensor:
    """Σ −log p(label) over N selected tokens / `n_tokens`, the head run a chunk at a time."""

    def loss_fn(logits_CV: torch.Tensor, rows: slice) -> torch.Tensor:
        return F.cross_entropy(logits_CV, labels_N[rows], reduction="sum")

    return chunked_head_loss(hidden_ND, head, loss_fn, chunk_tokens) / max(n_tokens, 1)
