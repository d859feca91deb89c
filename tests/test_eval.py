"""Evaluation: lm-eval scores our files as MMLU/Winogrande are scored; generation scoring; CLI."""

from __future__ import annotations

import json

import pytest
import torch

from sdftlab.cli import main
from sdftlab.data.loaders import load_task_file
from sdftlab.errors import DataError
from sdftlab.evaluate.general import general_capability
from sdftlab.evaluate.run import parse_tasks
from sdftlab.evaluate.tasks import HFGenerator, task_accuracy

pytestmark = pytest.mark.slow


@torch.no_grad()
def _logprob(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context), tokenized the way lm-eval does (whole, then split)."""
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    n_cont = len(whole) - len(ctx)
    ids = torch.tensor([whole])
    logp_TV = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    targets = ids[0, -n_cont:]
    return logp_TV[-n_cont - 1 : -1].gather(-1, targets[:, None]).sum().item()


def test_lm_eval_mmlu_and_winogrande_match_a_hand_computed_score(small_world):
    """The harness scores our local files with MMLU's and Winogrande's own rules."""
    world, lineage, _ = small_world
    model, tok = lineage.load_model("base").eval(), lineage.load_tokenizer("base")
    files = {t: world.task_file(t, "eval") for t in ("mmlu", "winogrande")}
    got = general_capability(model, tok, files, batch_size=8)

    mmlu = [json.loads(line) for line in files["mmlu"].read_text().splitlines()]
    hits = 0
    for row in mmlu:
        prompt = (
            row["question"]
            + "".join(f"\n{ltr}. {c}" for ltr, c in zip("ABCD", row["choices"], strict=True))
            + "\nAnswer:"
        )
        scores = [_logprob(model, tok, prompt, f" {ltr}") for ltr in "ABCD"]
        hits += int(max(range(4), key=scores.__getitem__) == row["answer"])
    assert got["mmlu/acc"] == pytest.approx(hits / len(mmlu))
    assert got["mmlu/n"] == len(mmlu)  # rows scored, recorded beside the accuracy

    hits = 0  # the cloze formulation (lm-eval's mmlu_continuation): each option's own text
    for row in mmlu:
        prompt = f"Question: {row['question'].strip()}\nAnswer:"
        scores = [_logprob(model, tok, prompt, f" {choice}") for choice in row["choices"]]
        hits += int(max(range(4), key=scores.__getitem__) == row["answer"])
    assert got["mmlu/acc_cloze"] == pytest.approx(hits / len(mmlu))

    wino = [json.loads(line) for line in files["winogrande"].read_text().splitlines()]
    hits = 0
    for row in wino:  # partial scoring: option substituted, shared continuation scored
        i = row["sentence"].index("_")
        tail = " " + row["sentence"][i + 1 :].strip()
        scores = [
            _logprob(model, tok, row["sentence"][:i] + opt, tail)
            for opt in (row["option1"], row["option2"])
        ]
        hits += int(str(1 + max(range(2), key=scores.__getitem__)) == row["answer"])
    assert got["winogrande/acc"] == pytest.approx(hits / len(wino))


def test_task_accuracy_scores_generations_with_the_reference_rules(small_world):
    world, lineage, _ = small_world
    model, tok = lineage.load_model("base").eval(), lineage.load_tokenizer("base")
    examples = load_task_file(world.task_file("science", "eval"), "science", limit=8)
    result = task_accuracy(HFGenerator(model, tok, batch_size=4), examples, max_new_tokens=24)
    assert result.n == 8 and len(result.responses) == 8
    from sdftlab.evaluate.scorers import score

    assert result.correct == [score(e, r) for e, r in zip(examples, result.responses, strict=True)]
    assert result.accuracy == sum(result.correct) / 8
    # batching (left padding) does not change greedy outputs
    single = task_accuracy(HFGenerator(model, tok, batch_size=1), examples[:3], max_new_tokens=24)
    assert single.responses == result.responses[:3]


def test_cli_eval_prints_a_table_and_records_metrics(small_world, capsys):
    _, lineage, home = small_world
    code = main(
        [
            "--home",
            str(home),
            "--lineage",
            lineage.root,
            "eval",
            "base",
            "--tasks",
            "science,tooluse,mmlu",
            "--demo",
            "--limit",
            "6",
            "--json",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "| state | science/acc | science/acc_demo | tooluse/acc |" in out
    printed = json.loads(out.strip().splitlines()[-1])
    recorded = lineage.meta("base").metrics
    keys = ("science/acc", "science/acc_demo", "tooluse/acc", "tooluse/acc_demo", "mmlu/acc")
    for key in (*keys, "mmlu/acc_cloze"):
        assert 0.0 <= printed[key] <= 1.0
        assert recorded[key] == printed[key]

    code = main(["--home", str(home), "--lineage", lineage.root, "lineage"])
    assert code == 0 and "base  <world>" in capsys.readouterr().out


def test_vllm_greedy_answers_equal_the_transformers_answers(small_world):
    """Every greedy answer on both tasks, with and without the demonstration, is the same
    text from the vLLM engine actor as from transformers `generate`; so are the metrics."""
    from sdftlab.evaluate.run import default_task_files, evaluate_generation, generator_for
    from sdftlab.specs import EvalEngineSpec

    world, lineage, _ = small_world
    tok = lineage.load_tokenizer("base")
    files = default_task_files(world.data_dir, ["science", "tooluse"])
    examples = {t: load_task_file(p, t, limit=12) for t, p in files.items()}
    answers, metrics = {}, {}
    for engine in ("hf", "vllm"):
        spec = EvalEngineSpec(engine=engine, max_new_tokens=48, kv_cache_gb=0.0625)
        with generator_for(lineage, "base", tok, spec) as generate:
            answers[engine] = [
                task_accuracy(generate, ex, with_demonstration=demo, max_new_tokens=48).responses
                for ex in examples.values()
                for demo in (False, True)
            ]
            metrics[engine], _ = evaluate_generation(
                generate, files, with_demonstration=True, limit=12, max_new_tokens=48,
                log=lambda _: None,
            )  # fmt: skip
    assert answers["vllm"] == answers["hf"]
    assert metrics["vllm"] == metrics["hf"] and metrics["hf"]["science/n_demo"] == 12


def test_an_nf4_state_on_vllm_answers_as_the_nf4_model_does(small_world):
    """vLLM serves an NF4 state from its dequantized copy: every greedy answer on both tasks,
    with and without the demonstration, is the NF4 model's own under transformers and
    bitsandbytes; the copy is removed afterwards."""
    import tempfile
    from pathlib import Path

    from sdftlab.degrade.quantize import quantize_state
    from sdftlab.evaluate.run import default_task_files, generator_for
    from sdftlab.specs import EvalEngineSpec

    world, lineage, _ = small_world
    if not lineage.exists("base-nf4"):
        quantize_state(lineage, "base", "base-nf4")
    tok = lineage.load_tokenizer("base-nf4")
    files = default_task_files(world.data_dir, ["science", "tooluse"])
    examples = [load_task_file(p, t, limit=12) for t, p in files.items()]
    answers = {}
    for engine in ("hf", "vllm"):
        spec = EvalEngineSpec(engine=engine, dtype="float32", max_new_tokens=48,
                              kv_cache_gb=0.0625)  # fmt: skip
        with generator_for(lineage, "base-nf4", tok, spec) as generate:
            answers[engine] = [
                answer
                for ex in examples
                for demo in (False, True)
                for answer in task_accuracy(
                    generate, ex, with_demonstration=demo, max_new_tokens=48
                ).responses
            ]
    differ = [i for i, (a, b) in enumerate(zip(answers["hf"], answers["vllm"], strict=True))
              if a != b]  # fmt: skip
    assert len(answers["hf"]) == 48 and differ == []
    assert not list(Path(tempfile.gettempdir()).glob("sdftlab-dequantized-*"))


def test_a_state_evaluated_on_a_ray_worker_gets_the_figures_of_this_process(small_world):
    """A pipeline evaluates each state in Ray tasks (the vLLM engine in the generation task,
    the lm-eval model in another), not in its driver: the figures equal those computed here,
    the task's log lines come back, and the state records them."""
    import os

    from sdftlab.evaluate.run import default_task_files, evaluate_on_worker, evaluate_state
    from sdftlab.lineage import Lineage
    from sdftlab.specs import EvalEngineSpec

    world, lineage, _ = small_world
    files = default_task_files(world.data_dir, ["science", "mmlu"])
    spec = EvalEngineSpec(engine="vllm", max_new_tokens=48, kv_cache_gb=0.0625)
    here = evaluate_state(lineage, "base", files, limit=8, engine=spec, record=False,
                          log=lambda _: None)  # fmt: skip
    lines: list[str] = []
    copy = Lineage(lineage.root)
    there = evaluate_on_worker(copy, "base", files, limit=8, engine=spec, log=lines.append)
    assert there == here and {"science/acc", "mmlu/acc"} <= there.keys()
    assert any("science" in line for line in lines) and any("lm-eval" in line for line in lines)
    assert {k: copy.meta("base").metrics[k] for k in there} == there
    # the tasks ran in Ray worker processes, not this one (Ray reports task events to its
    # state API about once a second: the last task's may not be there yet)
    import time

    from ray.util.state import list_tasks

    deadline = time.monotonic() + 60
    while True:
        ran = list_tasks(filters=[("func_or_class_name", "=", "_evaluate_task")], detail=True)
        if len(ran) >= 2 and all(t.worker_pid is not None for t in ran):
            break
        assert time.monotonic() < deadline, ran
        time.sleep(1)
    assert all(t.worker_pid != os.getpid() for t in ran)


def test_cli_errors_are_one_line_with_the_fix(small_world, capsys):
    _, lineage, home = small_world
    base = ["--home", str(home), "--lineage", lineage.root]
    assert main([*base, "eval", "nosuch", "--tasks", "science"]) == 2
    err = capsys.readouterr().err
    assert "unknown state 'nosuch'" in err and "known states: base" in err
    assert main([*base, "eval", "base", "--tasks", "science,chess"]) == 2
    assert "unknown task(s) ['chess']" in capsys.readouterr().err
    assert main([*base, "eval", "base", "--tasks", "science", "--data", "science"]) == 2
    assert "write TASK=PATH" in capsys.readouterr().err
    assert main([*base, "world", "build", "pretrain.steps=0"]) == 2
    assert "pretrain.steps" in capsys.readouterr().err


def test_general_task_file_errors(tmp_path):
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"question": "q", "choices": ["a","b","c","d"]}\n')
    with pytest.raises(DataError, match=r"m\.jsonl line 1: missing field\(s\) \['answer'\]"):
        general_capability(None, None, {"mmlu": bad})
    with pytest.raises(DataError, match="does not exist"):
        general_capability(None, None, {"winogrande": tmp_path / "none.jsonl"})
    with pytest.raises(DataError, match="unknown general task 'chess'"):
        general_capability(None, None, {"chess": bad})
    with pytest.raises(DataError, match="known: science, tooluse, mmlu, winogrande"):
        parse_tasks("science,,chess")
