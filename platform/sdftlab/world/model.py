"""The tiny Qwen2-architecture base model and its pretraining loop.

The model is `transformers.Qwen2ForCausalLM` — the architecture of the paper's
Qwen2.5 models — at toy size (≈ 1 M parameters by default: hidden 128, 4 layers, 4 heads /
2 KV heads, FFN 512, tied embeddings), so every later stage (SFT, NF4, FFN pruning, vLLM
rollouts, CKA) runs the same code it would on Qwen2.5-7B.

Pretraining is next-token prediction, one document a row, with a curriculum built in
`world.build`: copies first (plain, structured, option lookups), then teacher-format
demonstrations, then the general mixture — in-context copying does not emerge from the
plain mixture at this size, and SDFT needs a teacher that copies from the demonstration in
its prompt (docs/WORLD.md, docs/LOG.md).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator

import torch
from transformers import PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

from sdftlab.allocator import tune_cpu_allocator
from sdftlab.modes import evaluating
from sdftlab.train.setup import cpu_supports_bf16, use_training_attention
from sdftlab.world.config import PretrainConfig, TinyModelConfig


def tiny_qwen2_config(
    cfg: TinyModelConfig,
    vocab_size: int,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> Qwen2Config:
    """The tiny world's Qwen2 architecture for a vocabulary of `vocab_size` tokens."""
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        torch_dtype="float32",
    )


def build_tiny_model(
    cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int
) -> Qwen2ForCausalLM:
    """A freshly initialised tiny Qwen2 whose vocabulary is the tokenizer's."""
    torch.manual_seed(seed)
    config = tiny_qwen2_config(cfg, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


Batch = dict[str, torch.Tensor]  # model inputs: input_ids, labels [B, T] (and position_ids)
Doc = tuple[list[int], list[int]]  # (input ids, labels; -100 = no loss)


def padded_batches(documents: Iterator[Doc], batch_size: int, pad_id: int) -> Iterator[Batch]:
    """One document per row, right-padded (labels -100 on padding), each starting at position 0.

    The copy curriculum uses these by default. Not packed windows: those put earlier
    documents' words in context, which gives induction wrong targets and delays in-context
    copying by hundreds of steps.
    """
    while True:
        rows = [next(documents) for _ in range(batch_size)]
        width = max(len(ids) for ids, _ in rows)
        ids_BT = torch.full((batch_size, width), pad_id, dtype=torch.long)
        labels_BT = torch.full((batch_size, width), -100, dtype=torch.long)
        for i, (ids, labels) in enumerate(rows):
            ids_BT[i, : len(ids)] = torch.tensor(ids)
            labels_BT[i, : len(labels)] = torch.tensor(labels)
        yield {"input_ids": ids_BT, "labels": labels_BT}


def padding_free_batches(
    documents: Iterator[Doc], batch_size: int, width: int, pad_id: int
) -> Iterator[Batch]:
    """`batch_size` documents a step, as `padded_batches` draws them, laid end to end in rows
    of `width` tokens with their own positions and a mask that keeps each to itself
    (`train.batches.pack_documents`): the same loss, without the padding. The copy curriculum
    uses these with `pretrain.padding_free`: its documents run from a dozen tokens to the full
    window, and padded one a row, half of a step is padding."""
    from sdftlab.train.batches import pack_documents

    while True:
        yield pack_documents([next(documents) for _ in range(batch_size)], width, pad_id)


def length_bucketed_batches(
    documents: Iterator[Doc],
    batch_size: int,
    pad_id: int,
    rng: random.Random,
    pool_batches: int = 8,
) -> Iterator[Batch]:
    """`padded_batches` over a pool of documents sorted by length, batches yielded shuffled.

    A mixture of 40-token questions and 250-token teacher prompts padded together wastes most
    of a step on padding; grouping similar lengths cuts the cost without changing the data.
    """
    while True:
        pool = sorted(
            (next(documents) for _ in range(batch_size * pool_batches)), key=lambda d: len(d[0])
        )
        chunks = [pool[i : i + batch_size] for i in range(0, len(pool), batch_size)]
        rng.shuffle(chunks)
        for chunk in chunks:
            yield next(padded_batches(iter(chunk), batch_size, pad_id))


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def copy_accuracy(
    model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerBase, probes: list[tuple[str, str]]
) -> float:
    """Greedy next-token accuracy on the repeated half of copy probes (1.0 = perfect copying)."""
    hits = total = 0
    with evaluating(model):
        for prefix, full in probes:
            ids = tokenizer(full, add_special_tokens=False)["input_ids"]
            k = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
            logits_TV = model(input_ids=torch.tensor([ids])).logits[0]
            predicted = logits_TV[k - 1 : -1].argmax(-1)
            hits += int((predicted == torch.tensor(ids[k:])).sum())
            total += len(ids) - k
    return hits / max(1, total)


def pretrain(
    model: Qwen2ForCausalLM,
    batch_for_step: Callable[[int], Batch],
    cfg: PretrainConfig,
    log: Callable[[str], None] = print,
    probe: Callable[[], float] | None = None,
) -> list[float]:
    """Next-token pretraining; `batch_for_step(step)` gives the model inputs. Returns losses."""
    torch.set_num_threads(cfg.threads)
    tune_cpu_allocator()  # reuse freed activations: the same arithmetic, faster steps
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    use_bf16 = cfg.bf16_autocast and cpu_supports_bf16()
    use_training_attention(model, torch.device("cpu"))
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = batch_for_step(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(**batch, use_cache=False).loss  # no cache: packed rows keep apart
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step == cfg.steps - 1:
            window = losses[-50:]
            copying = f"  copy-acc {probe():.2f}" if probe is not None else ""
            log(
                f"  pretrain step {step + 1:5d}/{cfg.steps}  loss {sum(window) / len(window):.3f}"
                f"{copying}  {time.perf_counter() - start:6.1f}s"
            )
    model.eval()
    return losses
