"""Task accuracy by greedy generation, scored with the reference rules.

The model answers each prompt (chat template, greedy, up to `max_new_tokens`); the
response is scored by `scorers.score`. With `with_demonstration=True` the prompt carries
the expert demonstration in the SDFT teacher template — the figure that says whether a
state can serve as an SDFT teacher.

Answers come from a `Generator`: `HFGenerator` runs transformers `generate` on a model in
this process (left-padded batches); `VLLMGenerator` sends the same token ids to vLLM engines
(`rollout.pool.RolloutPool`: Ray actors, on GPUs on a cluster) at temperature 0. Both decode
the completion without special tokens, so their answers are equal where their greedy tokens
are (tested on the tiny world).

    >>> generate = HFGenerator(model, tokenizer)
    >>> task_accuracy(generate, examples)                           # student view
    >>> task_accuracy(generate, examples, with_demonstration=True)  # teacher view
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

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


Conversation = list[dict[str, str]]


class Generator(Protocol):
    def __call__(self, conversations: Sequence[Conversation], max_new_tokens: int) -> list[str]:
        """Greedy completions of chat prompts, decoded without special tokens."""
        ...


def chat_ids(tokenizer: Any, conversation: Conversation) -> list[int]:
    """The prompt's token ids: chat template with the assistant turn opened, no extra specials."""
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class HFGenerator:
    """transformers `generate` on a model in this process, `batch_size` prompts at a time."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 32) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    @torch.no_grad()
    def __call__(self, conversations: Sequence[Conversation], max_new_tokens: int) -> list[str]:
        self.model.eval()
        tokenizer = self.tokenizer
        tokenizer.padding_side = "left"
        device = next(self.model.parameters()).device
        out: list[str] = []
        for start in range(0, len(conversations), self.batch_size):
            chunk = conversations[start : start + self.batch_size]
            texts = [
                tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                for c in chunk
            ]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            ids_BT = self.model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            completion_BT = ids_BT[:, enc["input_ids"].shape[1] :]
            out += tokenizer.batch_decode(completion_BT, skip_special_tokens=True)
        return out


class VLLMGenerator:
    """Greedy answers from vLLM engines (a `RolloutPool`), all prompts in one call."""

    def __init__(self, pool: Any, tokenizer: Any) -> None:
        self.pool, self.tokenizer = pool, tokenizer

    def __call__(self, conversations: Sequence[Conversation], max_new_tokens: int) -> list[str]:
        from sdftlab.rollout.engines import SamplingSettings

        prompts = [chat_ids(self.tokenizer, c) for c in conversations]
        greedy = SamplingSettings(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
        completions = self.pool.generate(prompts, greedy)
        return self.tokenizer.batch_decode(
            [c.token_ids for c in completions], skip_special_tokens=True
        )


def task_accuracy(
    generate: Generator,
    examples: Sequence[TaskExample],
    *,
    with_demonstration: bool = False,
    template: str = DEMO_TEMPLATE,
    max_new_tokens: int = 96,
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
    responses = generate(conversations, max_new_tokens)
    correct = [score(ex, r) for ex, r in zip(examples, responses, strict=True)]
    return TaskResult(
        task=examples[0].task,
        accuracy=sum(correct) / len(correct),
        n=len(correct),
        responses=responses,
        correct=correct,
    )
