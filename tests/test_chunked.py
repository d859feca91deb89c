"""Chunked output layer + loss: equal to the unchunked loss in value and gradients, every kind."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference_losses import sdft_loss
from sdftlab.chunked import chunked_cross_entropy, chunked_head_loss
from sdftlab.distill.losses import (
    TopK,
    chunked_sdft_loss,
    importance_weights,
)

N, D, V = 11, 16, 40
CHUNKS = [1, 3, 7, N, 64]


def _setup(seed: int = 0, tied: bool = False):
    g = torch.Generator().manual_seed(seed)
    hidden_ND = torch.randn(N, D, generator=g, dtype=torch.float64).float()
    head = torch.nn.Linear(D, V, bias=not tied)
    embed = torch.nn.Embedding(V, D)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, D, generator=g) * 0.3)
        if tied:
            embed.weight = head.weight  # one Parameter, as a tied LM head
        elif head.bias is not None:
            head.bias.copy_(torch.randn(V, generator=g) * 0.1)
    teacher_head = torch.nn.Linear(D, V, bias=False).requires_grad_(False)
    with torch.no_grad():
        teacher_head.weight.copy_(torch.randn(V, D, generator=g) * 0.3)
    teacher_hidden_ND = torch.randn(N, D, generator=g)
    sampled_N = torch.randint(0, V, (N,), generator=g)
    engine_logp_N = -torch.rand(N, generator=g) * 4
    return hidden_ND, head, teacher_head, teacher_hidden_ND, sampled_N, engine_logp_N


def _grads(loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


@pytest.mark.parametrize(
    ("kind", "beta", "topk", "weighted"),
    [
        ("forward_kl", 0.5, None, False),
        ("reverse_kl", 0.5, None, False),
        ("jsd", 0.5, None, False),
        ("jsd", 0.1, None, True),
        ("forward_kl", 0.5, 5, False),
        ("reverse_kl", 0.5, 5, True),
        ("jsd", 0.5, 5, True),
        ("forward_kl", 0.5, None, True),
    ],
)
@pytest.mark.parametrize("tied", [False, True])
def test_chunked_sdft_loss_equals_the_unchunked_loss(kind, beta, topk, weighted, tied):
    hidden_ND, head, t_head, t_hidden_ND, sampled_N, engine_N = _setup(tied=tied)
    with torch.no_grad():
        teacher_logp_NV = F.log_softmax(t_head(t_hidden_ND), -1)
    top = teacher_logp_NV.topk(topk, dim=-1) if topk else None
    teacher_full: torch.Tensor | TopK = (
        TopK(top.indices, top.values) if top is not None else teacher_logp_NV
    )

    # the reference: full logits [1, N, V], the library's plain loss
    h_ref = hidden_ND.clone().requires_grad_()
    logits_1NV = head(h_ref).unsqueeze(0)
    weights = None
    if weighted:
        trainer = F.log_softmax(logits_1NV.float(), -1).gather(-1, sampled_N.view(1, N, 1))
        weights = importance_weights(trainer.squeeze(-1), engine_N.unsqueeze(0), 2.0)
    ref_teacher = (
        TopK(teacher_full.indices_BTK.unsqueeze(0), teacher_full.logprobs_BTK.unsqueeze(0))
        if isinstance(teacher_full, TopK)
        else teacher_full.unsqueeze(0)
    )
    ref, ref_stats = sdft_loss(
        logits_1NV, ref_teacher, torch.ones(1, N, dtype=torch.bool),
        kind=kind, beta=beta, weights_BT=weights,
    )  # fmt: skip
    ref_grads = _grads(ref, [h_ref, head.weight])

    def teacher_chunk(rows: slice) -> torch.Tensor | TopK:
        if isinstance(teacher_full, TopK):
            return TopK(teacher_full.indices_BTK[rows], teacher_full.logprobs_BTK[rows])
        with torch.no_grad():  # the teacher's head, a chunk at a time
            return F.log_softmax(t_head(t_hidden_ND[rows]), -1)

    for chunk in CHUNKS:
        h = hidden_ND.clone().requires_grad_()
        loss, stats = chunked_sdft_loss(
            h, head, teacher_chunk, n_tokens=N, kind=kind, beta=beta,
            sampled_ids_N=sampled_N if weighted else None,
            engine_logp_N=engine_N if weighted else None,
            importance_cap=2.0 if weighted else None, chunk_tokens=chunk,
        )  # fmt: skip
        assert torch.allclose(loss, ref, atol=1e-6, rtol=1e-5), (chunk, loss, ref)
        for got, want in zip(_grads(loss, [h, head.weight]), ref_grads, strict=True):
            assert torch.allclose(got, want, atol=1e-6, rtol=1e-5), chunk
        assert stats["divergence"] == pytest.approx(ref_stats["divergence"], rel=1e-5)
        if weighted:
            assert stats["importance_ratio"] == pytest.approx(ref_stats["importance_ratio"])


def test_chunked_cross_entropy_equals_the_mean_cross_entropy_and_its_gradients():
    hidden_ND, head, *_ = _setup(seed=3)
    labels_N = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(1))
    h_ref = hidden_ND.clone().requires_grad_()
    ref = F.cross_entropy(head(h_ref), labels_N)
    ref_grads = _grads(ref, [h_ref, head.weight, head.bias])
    for chunk in [*CHUNKS, None]:
        h = hidden_ND.clone().requires_grad_()
        loss = chunked_cross_entropy(h, head, labels_N, n_tokens=N, chunk_tokens=chunk)
        assert torch.allclose(loss, ref, atol=1e-6)
        for got, want in zip(_grads(loss, [h, head.weight, head.bias]), ref_grads, strict=True):
            assert torch.allclose(got, want, atol=1e-6)


def test_micro_batches_normalised_by_the_step_tokens_add_up_to_the_whole_batch():
    hidden_ND, head, *_ = _setup(seed=4)
    labels_N = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(2))
    whole = chunked_cross_entropy(hidden_ND, head, labels_N, n_tokens=N, chunk_tokens=4)
    grad_whole = _grads(whole, [head.weight])[0]
    parts = [slice(0, 5), slice(5, N)]
    total = sum(
        chunked_cross_entropy(hidden_ND[p], head, labels_N[p], n_tokens=N, chunk_tokens=4)
        for p in parts
    )
    assert torch.allclose(total, whole, atol=1e-6)
    assert torch.allclose(_grads(total, [head.weight])[0], grad_whole, atol=1e-6)


def test_the_chunked_loss_holds_one_chunk_of_logits_at_a_time():
    """The loss function sees chunks of at most `chunk_tokens` rows, never all N at once."""
    hidden_ND, head, *_ = _setup()
    seen: list[int] = []

    def loss_fn(logits_CV: torch.Tensor, rows: slice) -> torch.Tensor:
        seen.append(logits_CV.shape[0])
        assert logits_CV.dtype == torch.float32
        return logits_CV.logsumexp(-1).sum()

    h = hidden_ND.clone().requires_grad_()
    chunked_head_loss(h, head, loss_fn, 4).backward()
    assert seen == [4, 4, 3] and h.grad is not None and head.weight.grad is not None


def test_a_frozen_head_gets_no_gradient_and_the_hidden_states_still_do():
    hidden_ND, head, *_ = _setup()
    head.requires_grad_(False)
    h = hidden_ND.clone().requires_grad_()
    loss = chunked_head_loss(h, head, lambda logits, rows: logits.logsumexp(-1).sum(), 5)
    loss.backward()
    assert head.weight.grad is None and h.grad is not None and h.grad.abs().sum() > 0


def test_bad_chunk_sizes_and_shapes_are_refused():
    hidden_ND, head, *_ = _setup()
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_head_loss(hidden_ND, head, lambda x, r: x.sum(), 0)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        chunked_head_loss(hidden_ND.unsqueeze(0), head, lambda x, r: x.sum(), 4)
