"""Chat examples → token ids with the loss on the assistant tokens only.

An SFT row is `{"messages": [...prompt messages...], "response": "..."}`. It is rendered
with the tokenizer's chat template; labels are -100 on the prompt and on padding, the token
ids on the response and its end-of-turn token.

    >>> tokenize_chat(tok, [{"role": "user", "content": "Q"}], "A", max_len=64)
    {'input_ids': [...], 'labels': [-100, ..., id('A'), id('<|im_end|>')]}
"""

from __future__ import annotations

import json
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


def tokenize_chat(
    tokenizer: Any, messages: Sequence[dict[str, str]], response: str, max_len: int
) -> dict[str, list[int]]:
    prompt = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(response, add_special_tokens=False)["input_ids"] if response else []
    answer_ids = [*answer_ids, tokenizer.eos_token_id] if answer_ids else []
    ids = (prompt_ids + answer_ids)[:max_len]
    labels = ([IGNORE] * len(prompt_ids) + answer_ids)[:max_len]
    return {"input_ids": ids, "labels": labels}


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

    def __init__(self, tokenizer_dir: str, max_len: int) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_dir, trust_remote_code=trust_remote_code()
        )
        self.max_len = max_len

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [
            tokenize_chat(self.tokenizer, json.loads(m), str(r), self.max_len)
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
