"""SDFT losses, tested by relations (no magic numbers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference_losses import sdft_loss, token_divergence
from sdftlab.distill.losses import (
    TopK,
    divergence,
    importance_weights,
    mask_first_tokens,
)
from sdftlab.errors import ConfigError

V = 11


def logits(seed: int, shape=(2, 5, V)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_divergence_of_a_distribution_with_itself_is_zero(kind):
    logp = F.log_softmax(logits(0), -1)
    assert torch.allclose(divergence(logp, logp, kind), torch.zeros(2, 5, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_divergence_is_positive_between_different_distributions(kind):
    p, q = F.log_softmax(logits(0), -1), F.log_softmax(logits(1), -1)
    assert (divergence(p, q, kind) > 0).all()


def test_forward_and_reverse_kl_swap_arguments():
    p, q = F.log_softmax(logits(0), -1), F.log_softmax(logits(1), -1)
    assert torch.allclose(divergence(p, q, "forward_kl"), divergence(q, p, "reverse_kl"))
    assert torch.allclose(
        divergence(p, q, "forward_kl"), F.kl_div(q, p, log_target=True, reduction="none").sum(-1)
    )


def test_jsd_reaches_forward_and_reverse_kl_at_its_ends():
    p, q = F.log_softmax(logits(0), -1), F.log_softmax(logits(1), -1)
    forward, reverse = divergence(p, q, "forward_kl"), divergence(p, q, "reverse_kl")
    assert torch.equal(divergence(p, q, "jsd", beta=0.0), forward)
    assert torch.equal(divergence(p, q, "jsd", beta=1.0), reverse)
    # and continuously: JSD_β / β → KL[p‖q] as β → 0, JSD_β / (1 − β) → KL[q‖p] as β → 1
    eps = 1e-6
    assert torch.allclose(divergence(p, q, "jsd", beta=eps) / eps, forward, rtol=1e-4)
    assert torch.allclose(divergence(p, q, "jsd", beta=1 - eps) / eps, reverse, rtol=1e-4)
    # symmetric at β = 1/2
    assert torch.allclose(divergence(p, q, "jsd", 0.5), divergence(q, p, "jsd", 0.5))


def test_top_k_with_k_equal_to_vocabulary_equals_full():
    student, teacher_logp = logits(0), F.log_softmax(logits(1), -1)
    values, indices = teacher_logp.topk(V, dim=-1)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        full = token_divergence(student, teacher_logp, kind)
        top = token_divergence(student, TopK(indices, values), kind)
        assert torch.allclose(full, top, atol=1e-9), kind


def test_top_k_below_vocabulary_is_an_approximation_that_vanishes_for_a_copy():
    student, teacher_logp = logits(0), F.log_softmax(logits(1), -1)
    values, indices = teacher_logp.topk(3, dim=-1)
    top = token_divergence(student, TopK(indices, values))
    assert (top > 0).all() and (top <= token_divergence(student, teacher_logp) + 1e-9).all()
    same_v, same_i = F.log_softmax(student, -1).topk(3, dim=-1)
    assert torch.allclose(
        token_divergence(student, TopK(same_i, same_v)),
        torch.zeros(2, 5, dtype=torch.float64),
        atol=1e-9,
    )


def test_gradients_flow_to_the_student_and_vanish_at_the_teacher():
    teacher_logits = logits(1)
    student = logits(0).requires_grad_()
    loss, _ = sdft_loss(
        student, F.log_softmax(teacher_logits, -1), torch.ones(2, 5, dtype=torch.bool)
    )
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    at_teacher = teacher_logits.clone().requires_grad_()
    loss, _ = sdft_loss(
        at_teacher, F.log_softmax(teacher_logits, -1), torch.ones(2, 5, dtype=torch.bool)
    )
    loss.backward()
    assert at_teacher.grad.abs().max() < 1e-12 and abs(float(loss.detach())) < 1e-12


def test_masking_one_of_two_identical_positions_keeps_the_mean_and_halves_the_sum():
    row = logits(0, (1, 1, V)).expand(1, 2, V)
    teacher = F.log_softmax(logits(1, (1, 1, V)).expand(1, 2, V), -1)
    both, s_both = sdft_loss(row, teacher, torch.tensor([[True, True]]))
    one, s_one = sdft_loss(row, teacher, torch.tensor([[True, False]]))
    assert torch.allclose(both, one)  # token mean
    assert s_one["tokens"] == s_both["tokens"] / 2
    none, s_none = sdft_loss(row, teacher, torch.tensor([[False, False]]))
    assert float(none) == 0.0 and s_none["tokens"] == 0


def test_mask_first_k_drops_the_first_kept_tokens_of_each_row():
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    assert mask_first_tokens(mask, 2).tolist() == [
        [False, False, False, True, True],
        [False, False, False, False, False],
    ]
    assert torch.equal(mask_first_tokens(mask, 0), mask)
    loss_all, _ = sdft_loss(logits(0), F.log_softmax(logits(1), -1), mask)
    loss_k, stats = sdft_loss(logits(0), F.log_softmax(logits(1), -1), mask, mask_first_k=2)
    assert stats["tokens"] == 2 and not torch.allclose(loss_all, loss_k)


def test_importance_weights_are_capped_ratios_without_gradient():
    trainer = torch.tensor([[0.0, -1.0, -5.0]], requires_grad=True)
    engine = torch.tensor([[0.0, -2.0, -0.1]])
    w = importance_weights(trainer, engine, cap=2.0)
    assert torch.allclose(w, torch.tensor([[1.0, 2.0, float(torch.exp(torch.tensor(-4.9)))]]))
    assert not w.requires_grad
    # a weight of 2 on one of two identical tokens: loss × 1.5
    row = logits(0, (1, 1, V)).expand(1, 2, V)
    teacher = F.log_softmax(logits(1, (1, 1, V)).expand(1, 2, V), -1)
    plain, _ = sdft_loss(row, teacher, torch.ones(1, 2, dtype=torch.bool))
    weighted, stats = sdft_loss(
        row, teacher, torch.ones(1, 2, dtype=torch.bool), weights_BT=torch.tensor([[1.0, 2.0]])
    )
    assert torch.allclose(weighted, 1.5 * plain) and stats["importance_ratio"] == 1.5


def test_bad_loss_settings_are_rejected_by_name():
    p = F.log_softmax(logits(0), -1)
    with pytest.raises(ConfigError, match=r"loss\.kind"):
        divergence(p, p, "hellinger")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"loss\.beta"):
        divergence(p, p, "jsd", beta=1.5)
    with pytest.raises(ValueError, match="same tokenizer"):
        token_divergence(logits(0), F.log_softmax(logits(1, (2, 5, V + 1)), -1))
