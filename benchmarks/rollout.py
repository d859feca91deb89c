"""Benchmark: rollout generation — the vLLM rollout actor vs transformers `generate`.

Run from the repository root:

    PYTHONPATH=platform .venv/bin/python benchmarks/rollout.py --out runs/bench/rollout.json
    PYTHONPATH=platform .venv/bin/python benchmarks/rollout.py --quick      # batch 1 and 32

The same model, prompts and sampling settings for both engines: a tiny Qwen2 (hidden 128,
4 layers, 4 heads of 32, FFN 512; random weights, seeded — or `--lineage PATH --state NAME`
for a trained state) with a byte-level BPE tokenizer trained in-process; the prompts are
tiny-world science questions in the state's chat template (~100–150 tokens); temperature
1.0, top-p 1.0, `--max-new-tokens` (default 64) per completion, one completion per prompt.
On the real model (SmolLM2-135M-Instruct, imported into the default home):

    PYTHONPATH=platform .venv/bin/python benchmarks/rollout.py --lineage .sdftlab/lineage \
        --state base --batches 16,32,64 --max-new-tokens 128 --kv-cache-gb 2 --repeats 2

- ``vllm``: one `RolloutServer` Ray actor (`sdftlab.rollout.pool`, vLLM-CPU in-process
  engine, `--dtype` float32 by default, eager) — what `sdftlab recover` uses; timed from the
  driver, so Ray's call overhead is included.
- ``hf``: `HFEngine` (transformers `generate`, left-padded batches of up to 256, raw
  log-probs from the returned logits) in this process with 2 torch threads.

Each engine gets one untimed warm-up call per batch size, then `--repeats` timed calls; the
table shows generated tokens/s (tokens actually produced, EOS included) and the vLLM/HF
ratio. On a shared 2-core machine the absolute numbers move with other load; the ratio is
what the target (≥ 5× at batch 32) is about.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from sdftlab.data.loaders import row_to_example
from sdftlab.data.templates import student_messages
from sdftlab.lineage import Lineage
from sdftlab.raycluster import ensure_ray
from sdftlab.rollout.engines import HFEngine, SamplingSettings
from sdftlab.rollout.pool import RolloutPool
from sdftlab.world import tasks
from sdftlab.world.tokenizer import train_tokenizer


def write_results(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write a benchmark's JSON with the date, machine and CPU count, atomically (temp file,
    then rename); every benchmark script here uses it."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(),
            "cpus": os.cpu_count()}  # fmt: skip
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps({**meta, **payload}, indent=2))
    os.replace(tmp, out)
    print(f"results: {out}")
    return out


def build_state(root: Path) -> tuple[Lineage, str, list[Any]]:
    """A lineage holding a random tiny Qwen2 state `bench`, and science examples."""
    facts = tasks.WorldFacts.generate(seed=0)
    rng = random.Random(0)
    rows = tasks.science_rows(facts, 600, rng)
    texts = [tasks.copy_document(rng) for _ in range(300)]
    texts += [m["content"] for r in rows[:300] for m in r["prompt"]]
    texts += ["\n".join(r["golden_response"]) for r in rows[:300]]
    tok = train_tokenizer(texts, vocab_size=1024)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tok), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )  # fmt: skip
    lineage = Lineage(root)
    lineage.save("bench", model, tok, kind="bench")
    return lineage, "bench", [row_to_example("bench", "science", i, r) for i, r in enumerate(rows)]


def prompt_ids(
    lineage: Lineage, state: str, examples: list[Any], n: int, view: Any = student_messages
) -> list[list[int]]:
    """Token ids of the first `n` examples' prompts as `view` renders them (the student's
    messages by default; `teacher_messages` for the teacher's)."""
    tok = lineage.load_tokenizer(state)
    out = []
    for ex in examples[:n]:
        text = tok.apply_chat_template(view(ex), tokenize=False, add_generation_prompt=True)
        out.append(tok(text, add_special_tokens=False)["input_ids"])
    return out


def timed(generate: Any, prompts: list[list[int]], sampling: SamplingSettings, repeats: int):
    generate(prompts, sampling)  # warm-up
    walls, tokens = [], []
    for r in range(repeats):
        t0 = time.perf_counter()
        out = generate(prompts, SamplingSettings(**{**sampling.__dict__, "seed": r + 1}))
        walls.append(time.perf_counter() - t0)
        tokens.append(sum(len(c.token_ids) for c in out))
    wall = statistics.median(walls)
    return {"wall_s": wall, "tokens": statistics.median(tokens),
            "tokens_per_s": statistics.median(tokens) / wall}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,32,256", help="prompts per call")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lineage", help="use a trained state of this lineage ...")
    ap.add_argument("--state", help="... with this name")
    ap.add_argument("--dtype", default="float32", help="the vLLM engine's (HF: float32)")
    ap.add_argument("--kv-cache-gb", type=float, default=0.5, help="the vLLM engine's KV cache")
    ap.add_argument("--quick", action="store_true", help="batches 1 and 32, one repeat")
    ap.add_argument("--out", default="runs/bench/rollout.json")
    args = ap.parse_args()
    batches = [1, 32] if args.quick else [int(b) for b in args.batches.split(",")]
    repeats = 1 if args.quick else args.repeats
    sampling = SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens)

    with tempfile.TemporaryDirectory(prefix="rollout-bench-") as tmp:
        lineage, state, examples = build_state(Path(tmp) / "lineage")
        if args.lineage:
            lineage, state = Lineage(args.lineage), args.state or "base"
        prompts = prompt_ids(lineage, state, examples, max(batches))

        ensure_ray(num_cpus=2)
        t0 = time.perf_counter()
        pool = RolloutPool.start(
            lineage.resolve(state), cpus_per_actor=1,
            engine_kwargs={"kv_cache_bytes": int(args.kv_cache_gb * 2**30), "dtype": args.dtype},
        )  # fmt: skip
        startup = time.perf_counter() - t0
        results: list[dict[str, Any]] = []
        for b in batches:
            results.append({"engine": "vllm", "batch": b, **timed(pool.generate, prompts[:b],
                                                                   sampling, repeats)})  # fmt: skip
        pool.shutdown()

        torch.set_num_threads(2)
        model = lineage.load_model(state).float().eval()
        tok = lineage.load_tokenizer(state)
        hf = HFEngine(model, tok.eos_token_id, tok.pad_token_id, max_batch=256)
        for b in batches:
            results.append({"engine": "hf", "batch": b, **timed(hf.generate, prompts[:b],
                                                                 sampling, repeats)})  # fmt: skip

    print(f"\nrollout generation, {args.max_new_tokens} new tokens per prompt, "
          f"prompts {min(map(len, prompts))}–{max(map(len, prompts))} tokens; "
          f"vLLM actor ({args.dtype}) start-up {startup:.1f}s (once)")  # fmt: skip
    print(
        f"{'batch':>6} {'vLLM tok/s':>11} {'HF tok/s':>9} {'vLLM/HF':>8} {'vLLM s':>7} {'HF s':>7}"
    )
    table = []
    for b in batches:
        v = next(r for r in results if r["engine"] == "vllm" and r["batch"] == b)
        h = next(r for r in results if r["engine"] == "hf" and r["batch"] == b)
        ratio = v["tokens_per_s"] / h["tokens_per_s"]
        table.append({"batch": b, "vllm": v, "hf": h, "ratio": ratio})
        print(f"{b:>6} {v['tokens_per_s']:>11.0f} {h['tokens_per_s']:>9.0f} {ratio:>7.1f}x "
              f"{v['wall_s']:>7.2f} {h['wall_s']:>7.2f}")  # fmt: skip
    write_results(args.out, {"vllm_startup_s": startup, "max_new_tokens": args.max_new_tokens,
                             "state": args.state or "random tiny", "vllm_dtype": args.dtype,
                             "rows": table})  # fmt: skip


if __name__ == "__main__":
    main()
