"""Benchmark: padded vs padding-free training steps on the tiny world's real batches.

Run from the repository root, after `sdftlab world build` (about two minutes on 2 cores):

    PYTHONPATH=platform .venv/bin/python benchmarks/experiments/padding_free.py \
        --out runs/bench/padding_free.json

Two kinds of batch the project trains on, drawn from the current world (`sdftlab world
info`) with its tokenizer, each timed both ways over the same batches in one run:

- **copy curriculum** (the first 45% of pretraining): 32 copy documents a step, from a dozen
  tokens to 256, as `world.build` draws them;
- **SFT** (the expert stage): 32 science rows with 25% replay, as `sdftlab degrade sft`
  tokenizes them.

"padded" is one document a row, padded to the batch's longest; "padding-free" lays the same
documents end to end in rows of 256 with their own positions (`train.batches.pack_documents`),
which gives the same loss and gradients (tests/test_sft.py). Full training steps (forward
with labels, backward, gradient clipping, AdamW), the default model, bf16 autocast where the
CPU has native bf16, eager attention, `--threads` torch threads, after `--warmup` steps.
Prints the table: seconds per step, computed tokens per step, and the speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # benchmarks/
sys.path.insert(0, str(Path(__file__).parent))

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollout import write_results
from sdftlab.data.chat import pad_batch, tokenize_chat
from sdftlab.degrade.sft import SFTConfig, sft_rows
from sdftlab.lineage import Lineage
from sdftlab.paths import sdftlab_home
from sdftlab.train.batches import pack_documents
from sdftlab.train.setup import cpu_supports_bf16, use_training_attention
from sdftlab.world.build import copy_curriculum_text, current_world
from sdftlab.world.config import PretrainConfig


def copy_documents(tokenizer, n: int, max_len: int, seed: int) -> list[tuple[list, list]]:
    """Copy-curriculum documents as `world.build` draws them, at the default shares."""
    rng = random.Random(seed)
    eos = [tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    docs = []
    for _ in range(n):
        text = copy_curriculum_text(rng, PretrainConfig())
        ids = (tokenizer(text)["input_ids"] + eos)[:max_len]
        docs.append((ids, ids))
    return docs


def sft_documents(tokenizer, data_dir: Path, n: int, seed: int) -> list[tuple[list, list]]:
    rows = sft_rows("science", SFTConfig(data=["science"], seed=seed), data_dir)[:n]
    out = []
    for row in rows:
        enc = tokenize_chat(tokenizer, json.loads(row["messages"]), row["response"], 256)
        out.append((enc["input_ids"], enc["labels"]))
    return out


def padded(docs: list[tuple[list, list]], pad_id: int) -> dict[str, torch.Tensor]:
    rows = [{"input_ids": ids, "labels": labels} for ids, labels in docs]
    return {k: torch.from_numpy(v) for k, v in pad_batch(rows, pad_id).items()}


def time_steps(model, batches: list[dict[str, torch.Tensor]], warmup: int) -> tuple[float, float]:
    """Seconds and minor page faults per full training step over `batches` (the first
    `warmup` not counted)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    use_bf16 = cpu_supports_bf16()
    for i, batch in enumerate(batches):
        if i == warmup:
            t0, faults = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(**batch, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    timed = len(batches) - warmup
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return (time.perf_counter() - t0) / timed, faults / timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    world = current_world()
    root = os.environ.get("SDFTLAB_LINEAGE") or str(sdftlab_home() / "lineage")
    base = Lineage(root).resolve("base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    pad = tokenizer.pad_token_id
    n = args.steps + args.warmup
    kinds = {
        "copy curriculum": copy_documents(tokenizer, 32 * n, 256, seed=0),
        "SFT (science + replay)": sft_documents(tokenizer, world.data_dir, 32 * n, seed=0),
    }
    results = []
    for kind, docs in kinds.items():
        steps = [docs[i : i + 32] for i in range(0, len(docs), 32)]
        forms = {
            "padded": [padded(step, pad) for step in steps],
            "padding-free": [pack_documents(step, 256, pad) for step in steps],
        }
        row = {"batch": kind}
        for form, batches in forms.items():
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            use_training_attention(model, torch.device("cpu"))
            row[f"{form} s/step"] = time_steps(model, batches, args.warmup)[0]
            row[f"{form} tokens/step"] = sum(b["input_ids"].numel() for b in batches) / n
        row["speed-up"] = row["padded s/step"] / row["padding-free s/step"]
        results.append(row)

    print(f"\n{args.steps} timed steps of 32 documents, {args.threads} threads\n")
    print("| batch | padded s/step | tokens | padding-free s/step | tokens | speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['batch']} | {r['padded s/step']:.3f} | {r['padded tokens/step']:.0f} | "
            f"{r['padding-free s/step']:.3f} | {r['padding-free tokens/step']:.0f} | "
            f"{r['speed-up']:.2f}× |"
        )
    if args.out:
        write_results(args.out, {"steps": args.steps, "threads": args.threads, "rows": results})


if __name__ == "__main__":
    main()
