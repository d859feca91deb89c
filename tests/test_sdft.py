"""SDFT engine: sequence packing, LoRA weight sync, validation, vLLM weight sync, end to end."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from sdftlab.config import load_config
from sdftlab.distill.batch import completion_hidden
from sdftlab.distill.sdft import (
    RecoverConfig,
    check_same_vocabulary,
    check_task_files,
    recover,
)
from sdftlab.errors import ConfigError, DataError, LineageError
from sdftlab.rollout.sync import named_weights
from sdftlab.world import tasks


def test_completion_hidden_matches_unpadded_single_rows(small_world, torch_one_thread):
    """Left-padded prompts, right-padded completions: each row's hidden states (and the head's
    logits on them) are the ones the row gives alone."""
    _, lineage, _ = small_world
    model = lineage.load_model("base").eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    completions = [[12, 13], [14, 15, 16, 17]]
    with torch.no_grad():
        states = completion_hidden(
            model, prompts, completions, pad_id=0, device=torch.device("cpu"), hidden_layers=[1]
        )
        assert states.valid_BC.tolist() == [[True, True, False, False], [True, True, True, True]]
        logits_BCV = model.get_output_embeddings()(states.last_BCD)
        for b, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            alone = model(input_ids=torch.tensor([p + c]), output_hidden_states=True)
            at = slice(len(p) - 1, len(p) + len(c) - 1)
            assert torch.allclose(logits_BCV[b, : len(c)], alone.logits[0, at], atol=1e-5)
            want_h = alone.hidden_states[1][0, at]
            assert torch.allclose(states.layers[0][b, : len(c)], want_h, atol=1e-5)


def test_lora_sync_weights_equal_the_merged_model(small_world, torch_one_thread):
    from peft import LoraConfig, get_peft_model

    _, lineage, _ = small_world
    model = get_peft_model(
        lineage.load_model("base"),
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], task_type="CAUSAL_LM"
        ),
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at 0; make the adapter do something
            torch.nn.init.normal_(p, std=0.1)
    named = named_weights(model)
    merged = model.merge_and_unload().state_dict()
    assert set(named) == {n for n in merged if n.endswith(("q_proj.weight", "down_proj.weight"))}
    for name, tensor in named.items():
        assert torch.allclose(tensor, merged[name], atol=1e-6), name


def test_full_sync_weights_are_the_whole_state_dict_tied_head_included(small_world):
    _, lineage, _ = small_world
    model = lineage.load_model("base")
    named = named_weights(model)
    assert set(named) == set(model.state_dict()) and "lm_head.weight" in named


# ----------------------------------------------------------------------------- bad input


def test_completion_budget_of_zero_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"rollout\.max_new_tokens.*at least 1"):
        load_config(RecoverConfig, None, ["rollout.max_new_tokens=0"])


def test_vllm_scoring_needs_top_k_and_cka_needs_exact_scoring():
    with pytest.raises(ConfigError, match=r"loss\.topk"):
        load_config(RecoverConfig, None, ["scoring=vllm"])
    with pytest.raises(ConfigError, match="scoring=exact"):
        load_config(RecoverConfig, None, ["scoring=vllm", "loss.topk=5", "loss.cka_weight=0.1"])


def test_overlap_needs_vllm_rollouts_on_policy():
    for extra in (["rollout.engine=hf"], ["mode=off_policy", "teacher=base"]):
        with pytest.raises(ConfigError, match=r"rollout\.overlap=1.*rollout\.engine=vllm"):
            load_config(RecoverConfig, None, ["rollout.overlap=1", *extra])
    with pytest.raises(ConfigError, match=r"rollout\.overlap"):
        load_config(RecoverConfig, None, ["rollout.overlap=2"])
    assert load_config(RecoverConfig, None, ["rollout.overlap=1"]).rollout.overlap == 1


def test_weight_transfer_is_chosen_by_where_the_engines_run_and_refused_where_it_cannot():
    def chosen(*overrides):
        return load_config(RecoverConfig, None, list(overrides)).weight_transfer()

    gpu = "use_gpu=true"
    assert chosen() == "ray"  # CPU: the object store
    assert chosen(gpu) == "ray"  # engines without GPUs
    assert chosen(gpu, "rollout.gpus_per_actor=1") == "nccl"  # GPUs of their own
    assert chosen(gpu, "rollout.gpus_per_actor=0.5") == "ipc"  # the one trainer's GPU
    # engines sharing a GPU with one of several sharded workers: the object store
    two = ("num_workers=2", "prompts_per_step=16", "rollout.gpus_per_actor=0.5")
    assert chosen(gpu, *two) == "ray"
    assert chosen(gpu, "rollout.gpus_per_actor=1", "rollout.weight_transfer=ray") == "ray"
    with pytest.raises(ConfigError, match=r"weight_transfer=nccl.*use_gpu=true"):
        chosen("rollout.weight_transfer=nccl")
    with pytest.raises(ConfigError, match=r"weight_transfer=nccl.*gpus_per_actor ≥ 1"):
        chosen(gpu, "rollout.gpus_per_actor=0.5", "rollout.weight_transfer=nccl")
    with pytest.raises(ConfigError, match=r"weight_transfer=ipc.*one training worker"):
        chosen(gpu, *two, "rollout.weight_transfer=ipc")


def test_the_native_transfer_source_declares_what_it_sends_in_order(small_world):
    """vLLM's transfer engines size their receive buffers from `metadata()` and then read the
    tensors: both must list the same names, dtypes and shapes in the same order."""
    from vllm.distributed.weight_transfer import WeightSource

    from sdftlab.rollout.transfer import named_tensors

    _, lineage, _ = small_world
    named = named_weights(lineage.load_model("base"))
    source = named_tensors()(torch.device("cpu"))
    assert isinstance(source, WeightSource)
    source.set(named)
    meta = source.metadata()
    sent = list(source)
    assert [m.name for m in meta] == [n for n, _ in sent] == list(named)
    for m, (name, tensor) in zip(meta, sent, strict=True):
        assert (m.dtype, m.shape) == (tensor.dtype, tuple(tensor.shape))
        assert torch.equal(tensor, named[name])
    assert [n for n, _ in source] == list(named)  # a fresh pass each round


def test_empty_demonstration_names_file_and_line(tmp_path):
    facts = tasks.WorldFacts.generate(0)
    import random

    rows = tasks.science_rows(facts, 3, random.Random(0))
    rows[1]["golden_response"] = []
    path = tmp_path / "science.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"science\.jsonl:2: empty demonstration"):
        check_task_files([("science", path)])


def test_unknown_teacher_lists_the_known_states(small_world, tmp_path):
    _, lineage, _ = small_world
    cfg = load_config(RecoverConfig, None, ["teacher=nonesuch"])
    with pytest.raises(LineageError, match=r"nonesuch.*base"):
        recover(lineage, "base", "r-unknown", cfg, data_dir=tmp_path)


def test_teacher_with_another_vocabulary_is_rejected(small_world, tmp_path, tiny_tokenizer):
    from sdftlab.world.config import TinyModelConfig
    from sdftlab.world.model import build_tiny_model

    _, lineage, _ = small_world
    other = build_tiny_model(
        TinyModelConfig(hidden_size=32, num_layers=1, intermediate_size=64), tiny_tokenizer, 0
    )
    other.save_pretrained(tmp_path / "other")
    tiny_tokenizer.save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError, match="another vocabulary"):
        check_same_vocabulary(lineage, "base", tmp_path / "other")


# ----------------------------------------------------------------------------- vLLM weight sync


@pytest.mark.slow
def test_vllm_log_probs_match_the_trainer_after_a_sync_and_not_before(small_world):
    import ray

    from sdftlab.raycluster import ensure_ray
    from sdftlab.rollout.engines import SamplingSettings
    from sdftlab.rollout.pool import RolloutPool

    _, lineage, _ = small_world
    path = lineage.local_path("base")
    model = lineage.load_model("base").eval()
    prompt, completion = list(range(20, 40)), list(range(50, 62))

    def trainer_logp() -> torch.Tensor:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + completion])).logits[0]
        logp = F.log_softmax(logits[len(prompt) - 1 : -1].float(), -1)
        return logp.gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1)

    def reload_log_state(_actor) -> tuple[int, int]:  # runs in the rollout actor
        import logging

        from sdftlab.rollout.vllm_ext import RELOAD_LOGGER, ComputedCacheReloadFilter

        reload_logger = logging.getLogger(RELOAD_LOGGER)
        kept = [f for f in reload_logger.filters if isinstance(f, ComputedCacheReloadFilter)]
        return sum(f.dropped for f in kept), logging.getLogger("vllm").getEffectiveLevel()

    def engine_logp(pool) -> torch.Tensor:
        rows = pool.score([prompt + completion], [len(prompt)], k=1)[0]  # top-1 + the token
        return torch.tensor(
            [
                dict(zip(ids, lps, strict=True))[tok]
                for (ids, lps), tok in zip(rows, completion, strict=True)
            ]
        )

    ensure_ray(num_cpus=2)
    broken = RolloutPool.start(path / "nowhere", cpus_per_actor=0.5, wait=False)  # no wait...
    with pytest.raises(Exception, match="nowhere"):  # ...until a worker asks for the engines
        broken.wait_ready()
    broken.shutdown()
    pool = RolloutPool.start(path, actors=1, cpus_per_actor=0.5, wait=False)
    try:
        assert pool.wait_ready() > 0 and pool.wait_ready() == 0.0  # awaited once
        assert torch.allclose(engine_logp(pool), trainer_logp(), atol=1e-4)
        with torch.no_grad():  # an optimizer step's worth of change, trainer side only
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        stale = engine_logp(pool)
        assert (stale - trainer_logp()).abs().max() > 1e-2  # differ before the sync
        seconds = pool.sync(named_weights(model))
        # Tolerance: fp32 on both sides, different kernels: |Δ log p| ≤ 1e-4.
        assert torch.allclose(engine_logp(pool), trainer_logp(), atol=1e-4)
        assert seconds < 30
        # The sync's one warning about the computed rotary cache was dropped, and vLLM logs
        # at WARNING in the actor (its INFO lines buried the progress lines).
        dropped, level = ray.get(pool.actors[0].__ray_call__.remote(reload_log_state))
        assert dropped >= 1 and level == logging.WARNING

        # scoring=vllm: the engine's top-k targets line up, row by row and micro-batch by
        # micro-batch, with the same teacher scored exactly beside the trainer.
        _vllm_teacher_equals_the_exact_top_k(pool, model)

        # A seeded batch larger than one scheduler step (chunked prefill) samples fine.
        prompts = [list(range(3, 3 + 200 + i % 7)) for i in range(256)]
        out = pool.generate(prompts, SamplingSettings(max_new_tokens=4, seed=1))
        assert len(out) == 256 and all(len(c.token_ids) == len(c.logprobs) for c in out)
    finally:
        pool.shutdown()


def _vllm_teacher_equals_the_exact_top_k(pool, model) -> None:
    from sdftlab.distill.batch import RolloutBatch, pack
    from sdftlab.distill.losses import mask_first_tokens
    from sdftlab.distill.teachers import VLLMTeacher, frozen_teacher
    from sdftlab.rollout.sync import WeightSync

    prompts = [list(range(20, 30 + 3 * i)) for i in range(4)]
    completions = [list(range(50, 53 + 2 * i)) for i in range(4)]
    batch = RolloutBatch(prompts, prompts, completions)
    remote = VLLMTeacher(WeightSync(pool), topk=5)
    exact = frozen_teacher(model, pad_id=0, topk=5)
    remote.prepare(batch)
    for rows in (slice(0, 1), slice(1, 4)):  # micro-batches, in order
        part = batch.rows(rows)
        _, _, valid_BC, _ = pack(part.student_prompts, part.completions, 0)
        keep_BC = mask_first_tokens(valid_BC, 1)
        n = int(keep_BC.sum())
        got = remote.targets(part, keep_BC, valid_BC, []).chunk(slice(0, n))
        want = exact.targets(part, keep_BC, valid_BC, []).chunk(slice(0, n))
        assert torch.equal(got.indices_BTK, want.indices_BTK)
        assert torch.allclose(got.logprobs_BTK, want.logprobs_BTK, atol=1e-4)


# ----------------------------------------------------------------------------- end to end

FAST = [
    "steps=3", "prompts_per_step=4", "rollout.max_new_tokens=12", "checkpoint_every=3",
    "log_every=1", "warmup_steps=0", "lr=1e-2",
]  # fmt: skip


def _changed(lineage, a: str, b: str) -> float:
    sa, sb = lineage.load_model(a).state_dict(), lineage.load_model(b).state_dict()
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


@pytest.mark.slow
def test_recover_on_vllm_rollouts_writes_a_state_with_metrics(small_world):
    world, lineage, _ = small_world
    cfg = load_config(RecoverConfig, None, [*FAST, "teacher=base", "data=[science,tooluse]"])
    meta = recover(lineage, "base", "sdft-vllm", cfg, data_dir=world.data_dir, overwrite=True)
    assert meta.parents == ["base"] and meta.kind == "sdft"
    assert meta.metrics["sdft/divergence"] >= 0 and meta.metrics["sdft/tokens_per_s"] > 0
    assert _changed(lineage, "base", "sdft-vllm") > 0
    # the rollout diagnostics of the last steps: shares, and a budget of 12 tokens
    m = meta.metrics
    assert 0 <= m["sdft/truncated"] <= 1 and 0 <= m["sdft/answer_format"] <= 1
    assert 0 < m["sdft/completion_len"] <= 12
    assert m["sdft/truncated"] < 1 or m["sdft/completion_len"] == 12


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        ["rollout.engine=hf", "teacher=ema", "ema_rate=0.5"],
        ["rollout.engine=hf", "teacher=live", "loss.cka_weight=0.5", "loss.kind=jsd"],
        ["mode=off_policy", "teacher=tutor", "loss.topk=8", "loss.kind=reverse_kl"],
        ["rollout.engine=hf", "teacher=tutor", "teacher_context=bare", "lora.r=4", "rollout.n=2"],
    ],
    ids=["ema", "live-cka-jsd", "off-policy-topk", "bare-lora-n2"],
)
def test_recover_variants_run_end_to_end(small_world, tutor, overrides):
    world, lineage, _ = small_world
    cfg = load_config(RecoverConfig, None, [*FAST, "data=[science]", *overrides])
    name = "sdft-" + "-".join(o.split("=")[1].strip("[]") for o in overrides[:2])
    meta = recover(lineage, "base", name, cfg, data_dir=world.data_dir, overwrite=True)
    assert meta.metrics["sdft/loss"] == meta.metrics["sdft/loss"]  # finite, not NaN
    assert _changed(lineage, "base", name) > 0


@pytest.mark.slow
def test_qlora_recovery_of_an_nf4_state_runs_end_to_end(small_world, tutor):
    from sdftlab.degrade.quantize import quantize_state

    world, lineage, _ = small_world
    quantize_state(lineage, "tutor", "tutor-nf4", overwrite=True)
    vllm_cfg = load_config(RecoverConfig, None, [*FAST, "teacher=tutor", "data=[science]"])
    with pytest.raises(ConfigError, match=r"rollout\.engine=vllm.*NF4"):
        recover(lineage, "tutor-nf4", "nf4-rec", vllm_cfg, data_dir=world.data_dir)
    cfg = load_config(
        RecoverConfig, None, [*FAST, "teacher=tutor", "data=[science]", "rollout.engine=hf"]
    )
    meta = recover(lineage, "tutor-nf4", "nf4-rec", cfg, data_dir=world.data_dir, overwrite=True)
    assert meta.parents == ["tutor-nf4", "tutor"]
    assert meta.metrics["sdft/divergence"] > 0
    recovered = lineage.load_model("nf4-rec")  # LoRA merged, quantized again: NF4 like its parent
    assert sum(type(m).__name__ == "Linear4bit" for m in recovered.modules()) > 0


@pytest.mark.slow
def test_overlapped_rollouts_train_one_step_off_policy_and_still_lower_the_divergence(
    small_world, tutor, tmp_path
):
    """rollout.overlap=1: the engines sample step t+1 on step t's weights while step t trains.
    Step 1's completions come from the weights it trains (drift ≈ 0, as in the synchronous
    run); every later step's from the weights one step behind, so the trainer's log-probs of
    the sampled tokens differ from the engine's (drift ≫ the synchronous run's). On a fixed
    teacher the divergence still falls."""
    from sdftlab.train.trainer import read_report_log, report_log

    world, lineage, _ = small_world
    steps = 8
    runs = {}
    for overlap in (0, 1):
        cfg = load_config(RecoverConfig, None, [
            f"steps={steps}", "prompts_per_step=8", "rollout.max_new_tokens=12", "log_every=1",
            f"checkpoint_every={steps}", "warmup_steps=0", "lr=1e-2", "teacher=tutor",
            "data=[science]", "loss.mask_first_k=0", f"rollout.overlap={overlap}",
        ])  # fmt: skip
        path = tmp_path / f"overlap{overlap}.jsonl"
        recover(lineage, "base", f"sdft-overlap{overlap}", cfg, data_dir=world.data_dir,
                overwrite=True, callbacks=[report_log(path)])  # fmt: skip
        runs[overlap] = read_report_log(path)
        assert [r["step"] for r in runs[overlap]] == list(range(1, steps + 1))
    sync = [r["policy_drift"] for r in runs[0]]
    drift = [r["policy_drift"] for r in runs[1]]
    assert max(sync) < 2e-3, sync  # on-policy: fp32 engine and trainer agree
    assert drift[0] < 2e-3, drift  # the first rollout is sampled on the weights it trains
    assert min(drift[1:]) > 10 * max(sync), (drift, sync)  # then one step behind
    divergence = [r["divergence"] for r in runs[1]]
    assert sum(divergence[-3:]) < 0.7 * sum(divergence[:3]), divergence


@pytest.mark.slow
def test_full_recovery_of_a_pruned_state_runs_end_to_end_on_vllm(small_world, tutor):
    from sdftlab.degrade.prune import prune_state

    world, lineage, _ = small_world
    prune_state(lineage, "tutor", "tutor-pruned", 0.25, multiple_of=32, overwrite=True)
    cfg = load_config(RecoverConfig, None, [*FAST, "teacher=tutor", "data=[science]"])
    recover(lineage, "tutor-pruned", "pruned-rec", cfg, data_dir=world.data_dir, overwrite=True)
    assert _changed(lineage, "tutor-pruned", "pruned-rec") > 0
    assert lineage.load_model("pruned-rec").config.intermediate_size == 96


@pytest.mark.slow
def test_a_killed_ddp_worker_resumes_from_its_checkpoint_and_matches_an_unkilled_run(
    small_world, tutor, tmp_path, monkeypatch
):
    """Fault tolerance at two data-parallel (DDP) workers: one worker process dies (os._exit)
    after step 3 of 4; Ray Train restarts the group from the step-2 checkpoint; the final
    weights equal an uninterrupted run's and the lineage holds a whole, verifiable state.
    (The sharded case is in tests/test_fsdp.py.)"""
    import ray

    world, lineage, _ = small_world
    # Runs of its own: Ray Train restores a run of the same name from its storage, so an
    # earlier session's finished run would make this one skip the step that kills it.
    monkeypatch.setenv("SDFTLAB_STORAGE", str(tmp_path / "ray"))
    overrides = [
        *FAST, "steps=4", "checkpoint_every=2", "teacher=tutor", "data=[science]",
        "rollout.engine=hf", "max_failures=1", "seed=3", "num_workers=2", "cpus_per_worker=0.5",
    ]  # fmt: skip
    cfg = load_config(RecoverConfig, None, overrides)
    recover(lineage, "base", "ft-clean", cfg, data_dir=world.data_dir, overwrite=True)

    marker = tmp_path / "killed"
    ray.shutdown()  # workers of a fresh cluster inherit the kill switch from this process
    monkeypatch.setenv("SDFTLAB_KILL_AT_STEP", f"3:{marker}")
    try:
        recover(lineage, "base", "ft-killed", cfg, data_dir=world.data_dir, overwrite=True)
    finally:
        ray.shutdown()
    assert marker.read_text() == "killed after step 3\n"  # one of the two workers died
    lineage.verify("ft-killed")
    clean, killed = lineage.load_model("ft-clean"), lineage.load_model("ft-killed")
    for (name, a), b in zip(clean.state_dict().items(), killed.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name
