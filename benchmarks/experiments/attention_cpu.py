"""Benchmark: SDPA vs eager attention for a training step of the tiny world's model on CPU.

Run from the repository root (about a minute on 2 cores):

    PYTHONPATH=platform .venv/bin/python benchmarks/experiments/attention_cpu.py \
        --out runs/bench/attention_cpu.json

The tiny Qwen2 of the default world (`WorldConfig()`: hidden 128, 4 layers, vocab 1024) takes
full training steps (forward with labels, backward, AdamW) on random token batches of the shapes the
project trains on: a pretraining mixture batch [24, 256], a copy-curriculum batch [32, 96],
and an SFT batch [32, 200] with right padding (an attention mask). Each combination of
attention implementation and precision (bf16 autocast where the CPU has native bf16, else
float32 only) is timed over the same batches in one run, after warm-up steps. This is the
measurement behind `train.setup.use_training_attention`, which picks eager on CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import Qwen2ForCausalLM

from sdftlab.train.setup import cpu_supports_bf16
from sdftlab.world.config import WorldConfig
from sdftlab.world.model import tiny_qwen2_config

SHAPES = {  # name: (batch, length, padded)
    "pretrain mixture": (24, 256, False),
    "copy curriculum": (32, 96, False),
    "SFT (padded)": (32, 200, True),
}


def tiny_model(attn: str) -> Qwen2ForCausalLM:
    """The default world's model shape (`WorldConfig()`), freshly initialised."""
    world = WorldConfig()
    torch.manual_seed(0)
    config = tiny_qwen2_config(world.model, world.vocab_size)
    model = Qwen2ForCausalLM(config)
    model.set_attn_implementation(attn)
    return model.train()


def step_seconds(attn: str, bf16: bool, batch: int, length: int, padded: bool, steps: int) -> float:
    model = tiny_model(attn)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, WorldConfig().vocab_size, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    if padded:  # rows of decreasing length, right-padded
        for i in range(batch):
            mask[i, length - (i * length) // (2 * batch) :] = 0
    labels = ids.masked_fill(mask == 0, -100)

    # As the project trains: pretraining passes no attention mask, SFT its padding mask.
    inputs = {"input_ids": ids, "labels": labels}
    if padded:
        inputs["attention_mask"] = mask

    def one() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**inputs).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        one()
    start = time.perf_counter()
    for _ in range(steps):
        one()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per combination")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    precisions = [True, False] if cpu_supports_bf16() else [False]
    rows = []
    for name, (batch, length, padded) in SHAPES.items():
        for bf16 in precisions:
            sdpa = step_seconds("sdpa", bf16, batch, length, padded, args.steps)
            eager = step_seconds("eager", bf16, batch, length, padded, args.steps)
            rows.append(
                {
                    "shape": f"{name} [{batch}, {length}]",
                    "precision": "bf16 autocast" if bf16 else "float32",
                    "sdpa_s": sdpa,
                    "eager_s": eager,
                    "speedup": sdpa / eager,
                }
            )
    print("| shape | precision | SDPA s/step | eager s/step | eager speed-up |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['precision']} | {r['sdpa_s']:.3f} | {r['eager_s']:.3f} "
            f"| {r['speedup']:.2f}× |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=2))
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
