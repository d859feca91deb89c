"""The SDFT step as components: rollout rows, teachers, the step's loss and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from reference_losses import sdft_loss
from sdftlab.cka.stats import linear_cka_torch
from sdftlab.config import load_config
from sdftlab.distill.batch import RolloutBatch, completion_hidden, from_rollouts
from sdftlab.distill.config import RecoverConfig
from sdftlab.distill.step import sdft_step
from sdftlab.distill.teachers import (
    adapters_off_teacher,
    ema_teacher,
    frozen_teacher,
    live_teacher,
)
from sdftlab.rollout.engines import Completion

CPU = torch.device("cpu")


def _cfg(*overrides: str) -> RecoverConfig:
    return load_config(RecoverConfig, None, list(overrides))


@pytest.fixture(scope="module")
def models(small_world, torch_one_thread):
    """(student, teacher): the small world's base, and a perturbed copy of it as teacher."""
    _, lineage, _ = small_world
    student = lineage.load_model("base")
    teacher = copy.deepcopy(student)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return student, teacher


def _batch(n_rows: int = 4, with_engine: bool = False) -> RolloutBatch:
    g = torch.Generator().manual_seed(1)
    student = [torch.randint(5, 300, (3 + i,), generator=g).tolist() for i in range(n_rows)]
    teacher = [p + torch.randint(5, 300, (4,), generator=g).tolist() for p in student]
    completions = [torch.randint(5, 300, (6 + 2 * i,), generator=g).tolist() for i in range(n_rows)]
    engine = [[-1.0] * len(c) for c in completions] if with_engine else None
    return RolloutBatch(student, teacher, completions, engine)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------- rollout rows


def test_rollouts_keep_prompts_and_completions_aligned_when_empty_ones_are_dropped():
    rollouts = [
        Completion([1], [11, 12], [-0.1, -0.2]),
        Completion([1], [], []),  # prompt 0's second sample: empty, dropped
        Completion([2], [21], [-0.3]),
        Completion([2], [22, 23, 24], [-0.4, -0.5, -0.6]),
    ]
    batch = from_rollouts([[1], [2]], [[101], [102]], rollouts, n=2)
    assert batch.completions == [[11, 12], [21], [22, 23, 24]]
    assert batch.student_prompts == [[1], [2], [2]]
    assert batch.teacher_prompts == [[101], [102], [102]]
    assert batch.engine_logprobs == [[-0.1, -0.2], [-0.3], [-0.4, -0.5, -0.6]]
    assert batch.rows(slice(1, 3)).completions == [[21], [22, 23, 24]]
    assert batch.kept_tokens(mask_first_k=1) == 1 + 0 + 2
    with pytest.raises(RuntimeError, match="every rollout was empty"):
        from_rollouts([[1]], [[101]], [Completion([1], [], [])], n=1)
    with pytest.raises(ValueError, match="differ in length"):
        RolloutBatch([[1]], [[1], [2]], [[3]])


# ----------------------------------------------------------------------------- teachers


def test_ema_update_is_a_lerp_toward_the_student(models):
    student, _ = models
    ema = ema_teacher(student, rate=0.25, pad_id=0, topk=None)
    before = [p.detach().clone() for p in ema.model.parameters()]
    moved = copy.deepcopy(student)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(1.0)
    ema.after_step(moved, rank=0)
    for b, t, s in zip(before, ema.model.parameters(), moved.parameters(), strict=True):
        assert torch.allclose(t, 0.75 * b + 0.25 * s, atol=1e-6)
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_a_teacher_equal_to_the_student_on_the_same_prompt_has_zero_divergence(models):
    student, _ = models
    batch = _batch()
    same = RolloutBatch(batch.student_prompts, batch.student_prompts, batch.completions)
    student.zero_grad(set_to_none=True)
    out = sdft_step(same, student, live_teacher(student, 0, None), _cfg(), pad_id=0, device=CPU)
    assert abs(out.loss) < 1e-6 and out.stats["divergence"] < 1e-6


# ----------------------------------------------------------------------------- the step


def test_the_step_equals_the_plain_full_logits_loss_and_micro_batches_change_nothing(models):
    """sdft_step's loss and gradients are the full-batch, full-logits `sdft_loss`'s, for one
    micro-batch or several, chunked or not."""
    student, teacher_model = models
    batch = _batch(n_rows=5)
    from sdftlab.distill.losses import mask_first_tokens

    student.zero_grad(set_to_none=True)
    s = completion_hidden(student, batch.student_prompts, batch.completions, 0, CPU)
    with torch.no_grad():
        t = completion_hidden(teacher_model, batch.teacher_prompts, batch.completions, 0, CPU)
        teacher_logp = F.log_softmax(teacher_model.lm_head(t.last_BCD), -1)
    ref, _ = sdft_loss(student.lm_head(s.last_BCD), teacher_logp, s.valid_BC, mask_first_k=3)
    ref.backward()
    ref_grads = _grads(student)
    assert mask_first_tokens(s.valid_BC, 3).sum() == batch.kept_tokens(3)

    teacher = frozen_teacher(copy.deepcopy(teacher_model), 0, None)
    for overrides in (
        [],
        ["memory.micro_batch_size=2", "memory.chunk_tokens=7"],
        ["memory.micro_batch_size=1", "memory.chunk_tokens=null"],
    ):
        student.zero_grad(set_to_none=True)
        out = sdft_step(batch, student, teacher, _cfg(*overrides), pad_id=0, device=CPU)
        assert out.loss == pytest.approx(float(ref), rel=1e-5), overrides
        got = _grads(student)
        assert got.keys() == ref_grads.keys()
        for name, want in ref_grads.items():
            assert torch.allclose(got[name], want, atol=1e-6, rtol=1e-4), (overrides, name)


def test_importance_weights_line_up_with_their_tokens(models):
    """An engine log-prob 1.5× below the trainer's at one kept token only: the mean ratio is
    (n + 0.5) / n; the same change on a masked (first-k) token changes nothing."""
    student, teacher_model = models
    batch = _batch(n_rows=3)
    with torch.no_grad():
        s = completion_hidden(student, batch.student_prompts, batch.completions, 0, CPU)
        logp = F.log_softmax(student.lm_head(s.last_BCD), -1)
    trainer = [
        [float(logp[b, i, tok]) for i, tok in enumerate(c)] for b, c in enumerate(batch.completions)
    ]
    n = batch.kept_tokens(3)
    teacher = frozen_teacher(copy.deepcopy(teacher_model), 0, None)
    for row, col, want in [(1, 5, (n + 0.5) / n), (2, 1, 1.0)]:  # (2, 1) is masked: k = 3
        engine = [list(r) for r in trainer]
        engine[row][col] -= float(torch.log(torch.tensor(1.5)))
        weighted = RolloutBatch(batch.student_prompts, batch.teacher_prompts, batch.completions,
                                engine)  # fmt: skip
        cfg = _cfg("memory.micro_batch_size=2", "loss.importance_cap=2.0")
        student.zero_grad(set_to_none=True)
        out = sdft_step(weighted, student, teacher, cfg, pad_id=0, device=CPU)
        assert out.stats["importance_ratio"] == pytest.approx(want, rel=1e-4)
        # the drift: mean |log π_trainer − log π_engine| over the kept tokens
        drift = float(torch.log(torch.tensor(1.5))) / n if want != 1.0 else 0.0
        assert out.stats["policy_drift"] == pytest.approx(drift, abs=1e-5)


def test_a_lora_students_own_state_scores_with_its_adapters_off_as_a_frozen_copy_does(models):
    """The teacher that is the state a LoRA student started from: the student with its
    adapters off gives a frozen copy's loss and gradients, holds no second model, and leaves
    the adapters on for the student's own forward."""
    from sdftlab.specs import LoraSpec
    from sdftlab.train.setup import with_lora

    base, _ = models
    student = with_lora(copy.deepcopy(base), LoraSpec(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(3)
    with torch.no_grad():  # adapters that change the model (B starts at zero)
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batch = _batch(n_rows=3)
    outs, grads = [], []
    for teacher in (
        frozen_teacher(copy.deepcopy(base), 0, None),
        adapters_off_teacher(student, 0, None),
    ):
        student.zero_grad(set_to_none=True)
        outs.append(sdft_step(batch, student, teacher, _cfg(), pad_id=0, device=CPU))
        grads.append(_grads(student))
    assert outs[0].stats["divergence"] > 1e-3  # the adapters moved the student off its base
    assert outs[1].loss == pytest.approx(outs[0].loss, rel=1e-5)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name
    assert teacher.model is student  # no copy
    with torch.no_grad():  # the adapters are on again after scoring
        on = completion_hidden(student, batch.student_prompts, batch.completions, 0, CPU)
        off = completion_hidden(base, batch.student_prompts, batch.completions, 0, CPU)
    assert not torch.allclose(on.last_BCD, off.last_BCD, atol=1e-3)
    with pytest.raises(TypeError, match="peft model"):
        adapters_off_teacher(base, 0, None)


def test_sdft_steps_lower_the_divergence_to_a_fixed_teacher(models):
    student_model, teacher_model = models
    student = copy.deepcopy(student_model)
    teacher = frozen_teacher(copy.deepcopy(teacher_model), 0, None)
    batch = _batch(n_rows=4)
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    divergences = []
    for _ in range(6):
        optimizer.zero_grad(set_to_none=True)
        out = sdft_step(batch, student, teacher, _cfg("memory.micro_batch_size=2"), pad_id=0,
                        device=CPU)  # fmt: skip
        optimizer.step()
        divergences.append(out.stats["divergence"])
    assert divergences[-1] < 0.5 * divergences[0], divergences


def test_the_cka_term_adds_w_times_one_minus_cka_and_its_gradient(models):
    student, teacher_model = models
    batch = _batch(n_rows=3)
    teacher = frozen_teacher(copy.deepcopy(teacher_model), 0, None)
    student.zero_grad(set_to_none=True)
    plain = sdft_step(batch, student, teacher, _cfg(), pad_id=0, device=CPU)
    plain_grads = _grads(student)
    student.zero_grad(set_to_none=True)
    cfg = _cfg("loss.cka_weight=0.5", "loss.cka_layers=[-1]")
    with_cka = sdft_step(batch, student, teacher, cfg, pad_id=0, device=CPU)
    cka_grads = _grads(student)

    # the term, computed directly: 0.5 (1 − CKA) of the last hidden states on valid tokens
    student.zero_grad(set_to_none=True)
    s = completion_hidden(student, batch.student_prompts, batch.completions, 0, CPU, [-1])
    with torch.no_grad():
        t = completion_hidden(teacher_model, batch.teacher_prompts, batch.completions, 0, CPU, [-1])
    cka = linear_cka_torch(s.layers[0][s.valid_BC], t.layers[0][t.valid_BC])
    (0.5 * (1 - cka)).backward()
    term_grads = _grads(student)

    assert with_cka.loss == pytest.approx(plain.loss + 0.5 * (1 - float(cka)), rel=1e-5)
    assert with_cka.stats["cka"] == pytest.approx(float(cka), rel=1e-5)
    assert term_grads  # the term reaches the student's weights
    for name, term in term_grads.items():
        assert torch.allclose(cka_grads[name] - plain_grads[name], term, atol=1e-5), name
