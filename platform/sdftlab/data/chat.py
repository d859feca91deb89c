"""Chat examples → token ids with the loss on the assistant tokens only.

An SFT row is `{"messages": [...prompt messages...], "response": "..."}`. It is rendered
with the tokenizer's chat template; labels are -100 on the prompt and on padding, the token
ids on the response and its end-of-turn token.

    >>> tokenize_chat(tok, [{"role": "user", "content": "Q"}], "A", max_len=64)
    {'input_ids': [...], 'labels': [-100, ..., id('A'), id('<|im_end|>')]}
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any

import numpy as np

from sdftlab.config import trust_remote_code
from sdftlab.data.records import TaskExample
from sdftlab.errors import DataError

IGNORE = -100


def example_to_row(example: TaskExample) -> dict[str, str]:
    """A task example as an SFT row (messages JSON-encoded so Ray Data keeps one column type)."""
    return {"messages": json.dumps(example.messages), "response": example.demonstration}


def answers_from_demonstration(messages: Sequence[dict[str, str]], response: str) -> bool:
    """Whether a row is in the SDFT teacher's format: its response is a demonstration shown
    in its last user message."""
    users = [m["content"] for m in messages if m.get("role") == "user"]
    return bool(response.strip()) and bool(users) and response.strip() in users[-1]


def tokenize_chat(
    tokenizer: Any,
    messages: Sequence[dict[str, str]],
    response: str,
    max_len: int,
    *,
    demo_off_path: float = 0.0,
    rng: random.Random | None = None,
) -> dict[str, list[int]]:
    """Prompt and response ids, the loss on the response and its end of turn. With
    `demo_off_path` > 0, a response answered from a demonstration in the prompt is perturbed
    off the demonstration's path (`off_path`, strays without loss); other rows are untouched."""
    prompt = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(response, add_special_tokens=False)["input_ids"] if response else []
    answer_labels = list(answer_ids)
    if demo_off_path > 0 and answers_from_demonstration(messages, response):
        rng = rng if rng is not None else random.Random(0)
        answer_ids, answer_labels = off_path(
            answer_ids, prompt_ids, len(tokenizer), demo_off_path, rng
        )
    if answer_ids:
        answer_ids = [*answer_ids, tokenizer.eos_token_id]
        answer_labels = [*answer_labels, tokenizer.eos_token_id]
    ids = (prompt_ids + answer_ids)[:max_len]
    labels = ([IGNORE] * len(prompt_ids) + answer_labels)[:max_len]
    return {"input_ids": ids, "labels": labels}


def off_path(
    answer: list[int], context: list[int], vocab: int, rate: float, rng: random.Random
) -> tuple[list[int], list[int]]:
    """`answer` with each token, at probability `rate`, replaced by a stray token, preceded by
    one, or dropped; stray tokens get no loss (label `IGNORE`).

    A student's on-policy sample leaves the demonstration's path (a wrong fact, a misspelt
    name, a skipped line), and SDFT scores every later token with the teacher. A model that
    only learned to copy the demonstration position by position then predicts the wrong
    continuation; trained on perturbed answers it learns to find its place in the
    demonstration by content and continue from there. Stray tokens come from the prompt (a
    plausible wrong word) or, half the time, from the whole vocabulary.
    """
    if rate <= 0:
        return list(answer), list(answer)
    ids: list[int] = []
    labels: list[int] = []

    def stray() -> int:
        return rng.choice(context) if rng.random() < 0.5 else rng.randrange(vocab)

    for token in answer:
        if rng.random() >= rate:
            ids.append(token)
            labels.append(token)
            continue
        op = rng.randrange(3)
        if op == 0:  # replaced
            ids.append(stray())
            labels.append(IGNORE)
        elif op == 1:  # a stray token first, then the right one
            ids += [stray(), token]
            labels += [IGNORE, token]
        # op == 2: dropped; the next token is still the target after the gap
    return ids, labels


def pad_batch(
    rows: Sequence[dict[str, list[int]]], pad_id: int, width: int | None = None
) -> dict[str, np.ndarray]:
    """Right-pad to `width` (default: the longest row): input_ids, attention_mask, labels [B, T]."""
    width = width or max(len(r["input_ids"]) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = r["input_ids"]
        labels[i, :n] = r["labels"]
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class ChatTokenizer:
    """Ray Data `map_batches` UDF: SFT rows → fixed-width padded arrays (a tokenizer per actor)."""

    def __init__(
        self, tokenizer_dir: str, max_len: int, demo_off_path: float = 0.0, seed: int = 0
    ) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_dir, trust_remote_code=trust_remote_code()
        )
        self.max_len = max_len
        self.demo_off_path = demo_off_path
        self.rng = random.Random(seed)  # batches arrive in order: the same strays every run

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        noise = {"demo_off_path": self.demo_off_path, "rng": self.rng}
        rows = [
            tokenize_chat(self.tokenizer, json.loads(m), str(r), self.max_len, **noise)
            for m, r in zip(batch["messages"], batch["response"], strict=True)
        ]
        rows = [r for r in rows if any(label != IGNORE for label in r["labels"])]
        if not rows:
            empty = np.zeros((0, self.max_len), np.int64)
            return {"input_ids": empty, "attention_mask": empty, "labels": empty}
        return pad_batch(rows, self.tokenizer.pad_token_id, width=self.max_len)


def count_assistant_tokens(
    tokenizer: Any, rows: Sequence[dict[str, str]], max_len: int, source: str
) -> int:
    """Assistant (loss) tokens over `rows`; a `DataError` if there are none at all."""
    total = 0
    for row in rows:
        labels = tokenize_chat(tokenizer, json.loads(row["messages"]), row["response"], max_len)[
            "labels"
        ]
        total += sum(1 for label in labels if label != IGNORE)
    if total == 0:
        raise DataError(
            f"{source}: the SFT data has no assistant tokens to train on (every response is "
            f"empty or cut off by max_len={max_len}); give rows a non-empty demonstration "
            "or raise max_len"
        )
    return total
