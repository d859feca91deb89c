"""SFT on Ray Train: assistant-only loss, rounds in the lineage, LoRA merge, bad input."""

from __future__ import annotations

import json
import random

import pytest
import torch

from sdftlab.data.chat import IGNORE, count_assistant_tokens, pad_batch, tokenize_chat
from sdftlab.degrade.sft import SFTConfig, run_sft, sft_dataset, sft_rows
from sdftlab.errors import ConfigError, DataError, LineageError


def test_labels_cover_the_response_and_end_of_turn_only(tiny_tokenizer):
    msgs = [{"role": "user", "content": "what is two plus two ?"}]
    row = tokenize_chat(tiny_tokenizer, msgs, "four .", max_len=64)
    trained = [
        t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE
    ]
    assert tiny_tokenizer.decode(trained) == "four .<|im_end|>"
    prompt_len = row["labels"].index(next(v for v in row["labels"] if v != IGNORE))
    assert tiny_tokenizer.decode(row["input_ids"][:prompt_len]).endswith("<|im_start|>assistant\n")
    batch = pad_batch([row, tokenize_chat(tiny_tokenizer, msgs, "x", 64)], pad_id=0)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][1].sum() < batch["attention_mask"][0].sum()


def test_labels_do_not_depend_on_the_prompt(tiny_tokenizer):
    """Loss is on assistant tokens only: same response, different prompts → same labels."""
    a = tokenize_chat(tiny_tokenizer, [{"role": "user", "content": "a b c"}], "done .", 64)
    b = tokenize_chat(tiny_tokenizer, [{"role": "user", "content": "a b c d e f"}], "done .", 64)
    assert [x for x in a["labels"] if x != IGNORE] == [x for x in b["labels"] if x != IGNORE]


def test_demo_off_path_perturbs_only_rows_answered_from_their_demonstration(tiny_tokenizer):
    demo = "dorzeol is found in ice .\nA: soil no\nD: ice yes"
    teacher = [{"role": "user", "content": f"Which ?\n\nThis is an example:\n{demo}\n\nNow."}]
    plain = [{"role": "user", "content": "Which of the following is dorzeol found in ?"}]
    clean = tokenize_chat(tiny_tokenizer, teacher, demo, 128)
    rng = random.Random(0)
    noisy = tokenize_chat(tiny_tokenizer, teacher, demo, 128, demo_off_path=0.4, rng=rng)
    n = clean["labels"].index(next(x for x in clean["labels"] if x != IGNORE))
    assert noisy["input_ids"][:n] == clean["input_ids"][:n]  # the prompt is left as it is
    assert noisy["input_ids"][n:] != clean["input_ids"][n:]
    # The trained tokens are the right ones, in order (some dropped), ending with the end of
    # turn; a stray token is never a target.
    trained = [x for x in noisy["labels"] if x != IGNORE]
    it = iter(x for x in clean["labels"] if x != IGNORE)
    assert all(x in it for x in trained) and trained[-1] == tiny_tokenizer.eos_token_id
    assert all(y in (IGNORE, t) for t, y in zip(noisy["input_ids"], noisy["labels"], strict=True))
    assert IGNORE in noisy["labels"][n:]  # strays, without loss
    # A row whose answer is not in its prompt is never perturbed.
    untouched = tokenize_chat(tiny_tokenizer, plain, demo, 128, demo_off_path=0.4, rng=rng)
    assert untouched == tokenize_chat(tiny_tokenizer, plain, demo, 128)
    assert tokenize_chat(tiny_tokenizer, teacher, demo, 128, demo_off_path=0.0, rng=rng) == clean


def test_no_assistant_tokens_is_one_clear_error(tiny_tokenizer):
    rows = [{"messages": json.dumps([{"role": "user", "content": "q"}]), "response": ""}]
    with pytest.raises(DataError, match="no assistant tokens"):
        count_assistant_tokens(tiny_tokenizer, rows, 64, "data 'x'")
    long = [{"messages": json.dumps([{"role": "user", "content": "word " * 80}]), "response": "a"}]
    with pytest.raises(DataError, match="max_len=16"):
        count_assistant_tokens(tiny_tokenizer, long, 16, "data 'x'")


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="batch_size=30 does not split over num_workers=4"):
        SFTConfig(batch_size=30, num_workers=4)


def test_replay_mixes_in_at_the_requested_share(small_world):
    world, _, _ = small_world
    cfg = SFTConfig(data=["science"], replay_frac=0.25)
    rows = sft_rows("science", cfg, world.data_dir)
    n_task = len(world.task_file("science", "train").read_text().splitlines())
    assert len(rows) == n_task + round(n_task / 3)
    with pytest.raises(ConfigError, match="no replay data"):
        sft_rows("science", cfg.model_copy(update={"replay_data": "/nope.jsonl"}), world.data_dir)


def test_materialized_rows_are_tokenized_once_and_equal_the_per_epoch_stream(small_world):
    from ray.data.dataset import MaterializedDataset

    from sdftlab.raycluster import ensure_ray

    world, lineage, _ = small_world
    ensure_ray(num_cpus=2)
    cfg = SFTConfig(data=["science"])
    rows = sft_rows("science", cfg, world.data_dir)[:96]
    tokenizer_dir = str(lineage.local_path("base"))
    once = sft_dataset(rows, tokenizer_dir, cfg)
    stream = sft_dataset(rows, tokenizer_dir, cfg.model_copy(update={"materialize": False}))
    assert isinstance(once, MaterializedDataset) and not isinstance(stream, MaterializedDataset)

    def epoch(ds) -> list[list[int]]:
        return [r["input_ids"].tolist() for r in ds.iter_rows()]

    first = epoch(once)
    assert 0 < len(first) <= len(rows) and epoch(once) == first  # every epoch the same rows
    assert epoch(stream) == first  # and the ones the tokenizer gives every epoch


@pytest.mark.slow
def test_two_round_sft_on_ray_train_writes_one_state_per_round(small_world, tmp_path, monkeypatch):
    world, lineage, _ = small_world
    monkeypatch.setenv("SDFTLAB_STORAGE", str(tmp_path / "ray"))
    cfg = SFTConfig(
        data=["science", "tooluse"],
        steps=6,
        batch_size=8,
        checkpoint_every=3,
        log_every=3,
        max_len=160,
        lr=3e-3,
    )
    before = lineage.load_model("base")
    meta = run_sft(lineage, "base", "forgot_t", cfg, data_dir=world.data_dir, log=lambda _: None)
    assert meta.name == "forgot_t" and meta.parents == ["forgot_t-r1"]
    first = lineage.meta("forgot_t-r1")
    assert first.parents == ["base"] and first.config["data"] == "science"
    assert meta.config["data"] == "tooluse" and meta.metrics["sft/loss"] > 0
    after = lineage.load_model("forgot_t")
    changed = [
        not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters(), strict=True)
    ]
    assert all(changed)  # full fine-tuning moves every tensor

    # LoRA: trains adapters, saves a plain merged model
    # (padding-free batches here, so the worker's packed path runs through peft too)
    lora = SFTConfig.model_validate(
        cfg.model_dump()
        | {"data": ["science"], "lora": {"r": 4, "alpha": 8}, "steps": 3, "padding_free": True}
    )
    run_sft(lineage, "base", "lora_t", lora, data_dir=world.data_dir, log=lambda _: None)
    merged = lineage.load_model("lora_t")
    assert type(merged).__name__ == "Qwen2ForCausalLM"
    assert torch.equal(merged.model.embed_tokens.weight, before.model.embed_tokens.weight)
    assert not torch.equal(
        merged.model.layers[0].mlp.up_proj.weight, before.model.layers[0].mlp.up_proj.weight
    )

    with pytest.raises(LineageError, match="already exists"):
        run_sft(lineage, "base", "lora_t", lora, data_dir=world.data_dir)
    with pytest.raises(LineageError, match="unknown state 'nobody'"):
        run_sft(lineage, "nobody", "x_t", lora, data_dir=world.data_dir)


def test_padding_free_rows_give_the_padded_loss_and_gradients_on_fewer_tokens():
    import random

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from sdftlab.train.batches import pack_padded

    config = Qwen2Config(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
        initializer_range=0.3,  # sharp attention, so that what a token attends to matters
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.set_attn_implementation("eager")  # the CPU training kernel
    rng = random.Random(0)
    rows = []
    for _ in range(12):
        ids = [rng.randrange(1, 300) for _ in range(rng.randrange(3, 60))]
        prompt = rng.randrange(1, len(ids))  # loss on the "assistant" tail only
        rows.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    padded = {k: torch.from_numpy(v) for k, v in pad_batch(rows, 0, width=64).items()}
    packed = pack_padded(padded)
    assert "attention_mask" not in packed and packed["input_ids"].numel() < 0.7 * 12 * 64

    def loss_and_grads(batch):
        model.zero_grad()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    ref_loss, ref_grads = loss_and_grads(padded)
    loss, grads = loss_and_grads(packed)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    # Without keeping the rows apart (a plain causal mask over each packed row) it differs.
    leaky = model(input_ids=packed["input_ids"], labels=packed["labels"], use_cache=False).loss
    assert abs(float(leaky) - float(ref_loss)) > 1e-2
