"""Task accuracy by greedy generation, scored with the reference rules.

The model answers each prompt (chat template, greedy, up to `max_new_tokens`); the
response is scored by `scorers.score`. With `with_demonstration=True` the prompt carries
the expert demonstration in the SDFT teacher template — the figure that says whether a
state can serve as an SDFT teacher.

    >>> task_accuracy(model, tokenizer, examples)                        # student view
    >>> task_accuracy(model, tokenizer, examples, with_demonstration=True)  # teacher view
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sdftlab.data.records import TaskExample
from sdftlab.data.templates import DEMO_TEMPLATE, student_messages, teacher_messages
from sdftlab.evaluate.scorers import score


@dataclass(frozen=True)
class TaskResult:
    task: str
    accuracy: float
    n: int
    responses: list[str]
    correct: list[bool]


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[list[dict[str, str]]],
    *,
    max_new_tokens: int = 96,
    batch_size: int = 32,
) -> list[str]:
    """Greedy completions of chat prompts (left-padded batches), decoded without specials."""
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    out: list[str] = []
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start : start + batch_size]
        texts = [
            tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
            for c in chunk
        ]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(device) for k, v in enc.items()}
        ids_BT = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        completion_BT = ids_BT[:, enc["input_ids"].shape[1] :]
        out += tokenizer.batch_decode(completion_BT, skip_special_tokens=True)
    return out


def task_accuracy(
    model: Any,
    tokenizer: Any,
    examples: Sequence[TaskExample],
    *,
    with_demonstration: bool = False,
    template: str = DEMO_TEMPLATE,
    max_new_tokens: int = 96,
    batch_size: int = 32,
) -> TaskResult:
    """Fraction of `examples` answered correctly (greedy), all of one task."""
    if not examples:
        raise ValueError("task_accuracy needs at least one example")
    tasks = {ex.task for ex in examples}
    if len(tasks) != 1:
        raise ValueError(f"task_accuracy takes one task at a time, got {sorted(tasks)}")
    conversations = [
        teacher_messages(ex, template) if with_demonstration else student_messages(ex)
        for ex in examples
    ]
    responses = generate(
        model, tokenizer, conversations, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    correct = [score(ex, r) for ex, r in zip(examples, responses, strict=True)]
    return TaskResult(
        task=examples[0].task,
        accuracy=sum(correct) / len(correct),
        n=len(correct),
        responses=responses,
        correct=correct,
    )
