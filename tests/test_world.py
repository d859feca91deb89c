"""The tiny world: real formats, seeded determinism, disjoint splits, tokenizer, cached build."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sdftlab.data.chat import off_path
from sdftlab.data.loaders import load_task_file
from sdftlab.data.templates import teacher_messages
from sdftlab.errors import LineageError
from sdftlab.evaluate.scorers import score
from sdftlab.lineage import Lineage
from sdftlab.world import tasks
from sdftlab.world.build import (
    build_world,
    current_world,
    encode_document,
    generate_data,
    pretrain_documents,
    world_digest,
)
from sdftlab.world.config import DEFAULT_MIXTURE


def test_generators_are_seeded():
    a = tasks.science_rows(tasks.WorldFacts.generate(3), 20, random.Random(1))
    b = tasks.science_rows(tasks.WorldFacts.generate(3), 20, random.Random(1))
    c = tasks.science_rows(tasks.WorldFacts.generate(4), 20, random.Random(1))
    assert a == b
    assert a != c


def test_written_files_load_in_the_real_formats_and_gold_scores_100(tmp_path, small_world_config):
    cfg = small_world_config
    data = generate_data(cfg, tmp_path)
    for task in ("science", "tooluse"):
        for split in ("train", "eval"):
            examples = load_task_file(tmp_path / f"{task}_{split}.jsonl", task)
            assert len(examples) == len(data[task][split]) > 0
            assert all(score(ex, ex.demonstration) for ex in examples)
            assert not any(score(ex, "I do not know.") for ex in examples)
    science = json.loads((tmp_path / "science_eval.jsonl").read_text().splitlines()[0])
    assert [m["role"] for m in science["prompt"]] == ["system", "user"]
    assert science["answer"] in "ABCD"
    tool = json.loads((tmp_path / "tooluse_eval.jsonl").read_text().splitlines()[0])
    assert {"prompt", "name", "instruction", "golden_answer", "nl_documentation"} <= set(tool)
    assert all({"Action", "Action_Input"} == set(call) for call in tool["golden_answer"])
    mmlu = json.loads((tmp_path / "mmlu_eval.jsonl").read_text().splitlines()[0])
    assert len(mmlu["choices"]) == 4 and mmlu["answer"] in range(4)
    wino = json.loads((tmp_path / "winogrande_eval.jsonl").read_text().splitlines()[0])
    assert wino["sentence"].count("_") == 1 and wino["answer"] in ("1", "2")


def test_eval_rows_are_disjoint_from_train_rows(tmp_path, small_world_config):
    cfg = small_world_config
    data = generate_data(cfg, tmp_path)
    for task, splits in data.items():

        def key(row):
            return json.dumps({k: v for k, v in row.items() if k != "id"}, sort_keys=True)

        assert not {key(r) for r in splits["train"]} & {key(r) for r in splits["eval"]}, task


def test_science_facts_never_appear_in_pretraining():
    facts = tasks.WorldFacts.generate(0)
    data = {
        "mmlu": {"train": tasks.mmlu_rows(facts, 50, random.Random(0))},
        "winogrande": {"train": tasks.winogrande_rows(50, random.Random(0))},
    }
    shadows = tasks.shadow_worlds(1, 8, facts)
    stream = pretrain_documents(facts, data, 0, DEFAULT_MIXTURE, shadows)
    docs = [next(stream) for _ in range(2000)]
    text = " ".join(t for _, t in docs)
    assert not any(compound in text for compound in facts.compounds)
    # Demonstration use is taught in the teacher's own format, on shadow-world tasks.
    shadow_names = {c for s in shadows for c in s.compounds}
    task_demos = [t for kind, t in docs if kind == "task_demo"]
    assert task_demos and all("This is an example for a response" in t for t in task_demos)
    assert any(name in t for t in task_demos for name in shadow_names)
    counts = {kind: sum(k == kind for k, _ in docs) for kind in DEFAULT_MIXTURE}
    assert abs(counts["task_demo"] / 2000 - DEFAULT_MIXTURE["task_demo"]) < 0.04


def test_replay_keeps_the_teacher_format_and_leaks_no_real_science_fact(
    tmp_path, small_world_config
):
    generate_data(small_world_config, tmp_path)
    lines = (tmp_path / "replay_train.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == small_world_config.replay_rows
    # Half are the SDFT teacher's own messages (system prompt, demonstration template) on
    # shadow-world tasks, answered with the demonstration: an SFT that replays them leaves a
    # state that can still be a teacher.
    science = [r for r in rows if "<answer>" in r["response"]]
    tooluse = [r for r in rows if r["response"].startswith("Action:")]
    assert abs((len(science) + len(tooluse)) / len(rows) - 0.5) < 0.01
    assert min(len(science), len(tooluse)) > 0.2 * len(rows)
    for row in science + tooluse:
        prompt = row["messages"][-1]["content"]
        assert "This is an example for a response" in prompt and row["response"] in prompt
    facts = tasks.WorldFacts.generate(small_world_config.seed, small_world_config.n_compounds)
    text = json.dumps(rows)
    assert not any(
        f'"{compound}' in text or f" {compound} " in text for compound in facts.compounds
    )


def test_tokenizer_round_trips_task_text_and_has_a_chat_template(tiny_tokenizer):
    facts = tasks.WorldFacts.generate(0)
    row = tasks.tooluse_rows(facts, 1, random.Random(5))[0]
    text = row["prompt"] + "\n" + "\n".join(row["golden_response"])
    ids = tiny_tokenizer(text)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text
    rendered = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tiny_tokenizer.eos_token == "<|im_end|>"


def test_teacher_prompt_wraps_the_user_message_with_the_demonstration(tmp_path, small_world_config):
    cfg = small_world_config
    generate_data(cfg, tmp_path)
    ex = load_task_file(tmp_path / "science_eval.jsonl", "science")[0]
    msgs = teacher_messages(ex)
    assert msgs[0] == ex.messages[0]  # the system message is kept
    assert msgs[1]["content"].startswith("\n" + ex.prompt_text + "\n\nThis is an example")
    assert ex.demonstration in msgs[1]["content"]
    assert ex.messages[1]["content"] == ex.prompt_text  # the example itself is not mutated


@pytest.mark.slow
def test_built_world_loads_with_plain_transformers_and_is_cached(small_world):
    world, lineage, home = small_world
    path = lineage.local_path("base")
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "qwen2"
    assert model.config.vocab_size == len(tok)
    assert current_world(home).directory == world.directory
    meta = lineage.meta("base")
    assert meta.kind == "world" and meta.config["world_hash"] == world_digest(world.config)

    logs: list[str] = []
    again = build_world(world.config, lineage, home, log=logs.append)
    assert again.directory == world.directory
    assert any("cached" in line for line in logs)
    assert lineage.meta("base").content_hash == meta.content_hash

    other = world.config.model_copy(update={"seed": 9})
    with pytest.raises(LineageError, match="already has a `base` from another world config"):
        build_world(other, lineage, home, log=logs.append)
    assert isinstance(lineage, Lineage)


def test_winogrande_answers_follow_what_the_animals_are_like_not_word_order():
    rows = tasks.winogrande_rows(400, random.Random(0))
    fits = {tail: kind for _, tail, kind in tasks.WINO_RULES}
    firsts = set()
    for row in rows:
        answer = row["option1"] if row["answer"] == "1" else row["option2"]
        tail = row["sentence"].split("because _ ")[1].removesuffix(" .")
        big = answer in tasks._WINO_BIG
        assert big == (fits[tail] == "big"), row
        firsts.add(row["answer"])
    assert firsts == {"1", "2"}  # the referent is first or second: order alone tells nothing


def test_every_tool_name_and_argument_number_is_in_the_copy_curriculum():
    facts = tasks.WorldFacts.generate(0)
    names = {fn.name for funcs in facts.tools.values() for fn in funcs}
    assert names <= set(tasks.TOOL_NAMES) <= set(tasks.COPY_WORDS)
    rows = tasks.tooluse_rows(facts, 50, random.Random(0))
    numbers = {
        str(v) for r in rows for c in r["golden_answer"]
        for v in json.loads(c["Action_Input"]).values() if isinstance(v, int)
    }  # fmt: skip
    assert numbers and numbers <= set(tasks.COPY_WORDS)


def test_off_path_answers_keep_the_right_tokens_in_order_and_never_train_a_stray_one():
    answer = list(range(100, 160))
    context = list(range(500, 520))
    assert off_path(answer, context, 1024, 0.0, random.Random(0)) == (answer, answer)
    ids, labels = off_path(answer, context, 1024, 0.3, random.Random(0))
    assert len(ids) == len(labels) and ids != answer
    trained = [t for t, y in zip(ids, labels, strict=True) if y != -100]
    assert all(y in (-100, t) for t, y in zip(ids, labels, strict=True))  # no shifted targets
    it = iter(answer)
    assert all(t in it for t in trained)  # the right tokens, in their order (some dropped)
    strays = [t for t, y in zip(ids, labels, strict=True) if y == -100]
    assert strays and len(trained) < len(answer)  # perturbed at this rate: strays and gaps
    assert any(t in context for t in strays)  # plausible wrong words from the prompt


def test_teacher_format_documents_are_perturbed_in_the_answer_only(tiny_tokenizer):
    shadows = (tasks.WorldFacts.generate(5),)
    text = "messages:" + json.dumps(tasks.task_demo_chat(random.Random(0), shadows))
    eos = [tiny_tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    clean, clean_labels = encode_document(tiny_tokenizer, text, random.Random(1), eos, False)
    assert clean == clean_labels
    messages = json.loads(text[9:])
    prompt = tiny_tokenizer.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True
    )
    n = len(tiny_tokenizer(prompt)["input_ids"])
    ids, labels = encode_document(tiny_tokenizer, text, random.Random(1), eos, False, noise=0.5)
    assert ids[:n] == labels[:n] == clean[:n]  # the teacher prompt, demonstration included
    assert ids[n:] != clean[n:] and -100 in labels[n:]
    assert ids[-1] == labels[-1] == eos[0]
    _, answer_only = encode_document(tiny_tokenizer, text, random.Random(1), eos, True, noise=0.5)
    assert set(answer_only[:n]) == {-100}


def test_pretraining_takes_padding_free_copy_batches_with_fewer_tokens(tiny_tokenizer):
    from sdftlab.world.config import PretrainConfig, TinyModelConfig
    from sdftlab.world.model import (
        build_tiny_model,
        padded_batches,
        padding_free_batches,
        pretrain,
    )

    eos = tiny_tokenizer.convert_tokens_to_ids("<|endoftext|>")

    def docs(seed):
        rng = random.Random(seed)
        while True:
            ids = [*tiny_tokenizer(tasks.copy_document(rng))["input_ids"][:127], eos]
            yield ids, ids

    packed = next(padding_free_batches(docs(0), 16, 128, eos))
    padded = next(padded_batches(docs(0), 16, eos))
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    assert int((packed["labels"] != -100).sum()) == int((padded["labels"][:, 1:] != -100).sum())
    model = build_tiny_model(
        TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                        intermediate_size=128),
        tiny_tokenizer, seed=0,
    )  # fmt: skip
    before = model.model.embed_tokens.weight.clone()
    stream = padding_free_batches(docs(1), 16, 128, eos)
    losses = pretrain(model, lambda _: next(stream), PretrainConfig(steps=3, warmup_steps=1),
                      log=lambda _: None)  # fmt: skip
    assert len(losses) == 3 and all(0 < x < 20 for x in losses)
    assert not torch.equal(before, model.model.embed_tokens.weight)
