"""A step's batch on its way to the loss: micro-batches, padding trimmed or packed away,
epochs of the data shard, and the last hidden states the chunked losses start from."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import torch

from sdftlab.sharding import unwrap


def output_layer(model: torch.nn.Module) -> torch.nn.Module:
    """The LM head of a model, under any DDP or PEFT wrapper."""
    return unwrap(model).get_output_embeddings()


def last_hidden(model: torch.nn.Module, **inputs: Any) -> tuple[torch.Tensor, tuple]:
    """The last hidden states [B, T, D] (after the final norm: what the LM head reads) and all
    layers' hidden states, from a forward that runs the LM head on one position only.

    The call goes through `model` itself (DDP's hooks, PEFT's adapters); the chunked losses
    then run the head on the tokens that have a loss."""
    out = model(**inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False)
    return out.hidden_states[-1], out.hidden_states


def micro_batches(n: int, size: int | None) -> list[slice]:
    """Row ranges of `size` (the last one shorter) covering n rows; one range for None."""
    step = n if size is None else size
    return [slice(i, min(i + step, n)) for i in range(0, n, max(step, 1))]


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut right padding common to the whole batch (fixed-width rows → the longest row)."""
    width = int(batch["attention_mask"].sum(dim=1).max().item())
    return {k: v[:, :width] for k, v in batch.items()}


def pack_documents(
    documents: Sequence[tuple[Sequence[int], Sequence[int]]], width: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """A padding-free batch: (input ids, labels) documents laid end to end in rows of at most
    `width` tokens (first fit, longest first), each with its own positions from 0.

    Given `position_ids` and no `attention_mask`, transformers builds a causal mask that
    keeps every document to itself (`find_packed_sequence_indices`), so the loss is the one
    the documents give padded one a row — the same (context, target) pairs — while far
    fewer pad tokens are computed (TRL's `padding_free`). Each document's first label is
    -100: it would otherwise be predicted from the document before it. The rows' padding
    forms a sequence of its own, with no loss.
    """
    order = sorted(range(len(documents)), key=lambda i: -len(documents[i][0]))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(documents[i][0])
        if n > width:
            raise ValueError(f"a document of {n} tokens does not fit a row of {width}")
        slot = next((r for r, free in enumerate(room) if free >= n), None)
        if slot is None:
            rows.append([])
            room.append(width)
            slot = len(rows) - 1
        rows[slot].append(i)
        room[slot] -= n
    used = max(width - free for free in room)
    ids = torch.full((len(rows), used), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), used), -100, dtype=torch.long)
    positions = torch.zeros((len(rows), used), dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            doc_ids, doc_labels = documents[i]
            n = len(doc_ids)
            ids[r, at : at + n] = torch.as_tensor(doc_ids)
            labels[r, at : at + n] = torch.as_tensor(doc_labels)
            labels[r, at] = -100
            positions[r, at : at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(used - at)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def pack_padded(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`pack_documents` over a right-padded batch (`input_ids`, `attention_mask`, `labels`
    [B, T]), in rows of T tokens, on the batch's device."""
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    ids, labels = batch["input_ids"].cpu(), batch["labels"].cpu()
    documents = [(ids[i, :n].tolist(), labels[i, :n].tolist()) for i, n in enumerate(lengths)]
    packed = pack_documents(documents, ids.shape[1], pad_id=0)
    return {k: v.to(batch["input_ids"].device) for k, v in packed.items()}


def cycle_epochs(make_iter: Any, skip: int = 0) -> Iterator[Any]:
    """Iterate `make_iter()` again and again (one pass per epoch), leaving out the first
    `skip` items: a resumed worker passes the steps it had done, so it goes on with the
    batches the killed run would have trained on next."""
    while True:
        empty = True
        for item in make_iter():
            empty = False
            if skip:
                skip -= 1
                continue
            yield item
        if empty:
            raise RuntimeError("the training data shard is empty: give more rows or fewer workers")


def shard_batches(
    batch_size: int, *, seed: int, skip: int, shuffle_buffer: int, tensors: bool
) -> Iterator[dict[str, Any]]:
    """This worker's rows of each global batch of the `train` dataset shard (torch tensors,
    or numpy arrays with `tensors=False`), epoch after epoch. Every worker reads every row in
    the same order (the same shuffle everywhere) and takes rows `rank::world` of each batch,
    so a step's batch is the same for 1 or N workers; a resumed run leaves out the `skip`
    batches it had trained on."""
    import ray.train

    from sdftlab.sharding import rank_rows, world

    rank, size = world()
    shard = ray.train.get_dataset_shard("train")
    read = shard.iter_torch_batches if tensors else partial(shard.iter_batches,
                                                            batch_format="numpy")  # fmt: skip
    batches = cycle_epochs(
        lambda: read(batch_size=batch_size, drop_last=True,
                     local_shuffle_buffer_size=shuffle_buffer, local_shuffle_seed=seed),
        skip=skip,
    )  # fmt: skip
    return (rank_rows(batch, rank, size) for batch in batches)
