"""Benchmark: throughput of the CKA actor pool (sdftlab.cka.pool) with 1 and 2 actors.

Run from the repository root:

    PYTHONPATH=platform .venv/bin/python benchmarks/cka_pool.py --out runs/bench/cka_pool.json
    PYTHONPATH=platform .venv/bin/python benchmarks/cka_pool.py --quick   # ~1 min

Two tiny random Qwen2 models (the same architecture, different seeds; hidden 128, 4 layers,
FFN 512 by default) and a byte-level BPE tokenizer are built in-process and saved to a
temporary lineage; the data are `--n` synthetic science prompts with their gold answers
from the tiny world's generator (no download). Each configuration runs
`cka_over_dataset` (diagonal layer pairs, answer_mean pooling, float32) on the same data:

- ``local``: `cka_local`, this process, no Ray (the reference), with 1 torch thread (what
  each actor gets); ``--local-default-threads`` also times torch's default thread count —
  on a 2-core machine shared with other work that was ~14× slower than 1 thread (thread
  oversubscription: 134 s vs 9.7 s for 512 sequences), so it is off by default;
- ``pool-1`` / ``pool-2``: the Ray actor pool with 1 and 2 actors (1 CPU each) on a local
  Ray cluster of `--cpus` CPUs (default 2).

Reported per configuration: end-to-end wall time and sequences/s (for the pool this includes
starting the actors and loading both models in each: one-time costs), the streaming
sequences/s between the first and the last merged partial (steady state; each actor
returns ~4 partials), and the largest
difference of any CKA column from ``local`` (it must be ~1e-16: the pool forwards the same
batches). A warm-up pool run first starts Ray and fills the OS file cache. The whole run
takes ~2–3 minutes on 2 cores; on a shared machine the numbers move with the other load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from sdftlab.cka.pool import CKAOptions, cka_local, cka_over_dataset
from sdftlab.data.loaders import row_to_example
from sdftlab.lineage import Lineage
from sdftlab.raycluster import ensure_ray
from sdftlab.world import tasks
from sdftlab.world.tokenizer import train_tokenizer

COLUMNS = ["cka", "cka_biased", "cka_debiased", "cka_standardized", "sequence_cka"]


def build_models(root: Path, hidden: int, layers: int) -> tuple[Lineage, list[Any]]:
    """A lineage with two random tiny Qwen2 states `a`, `b`, and the science examples."""
    facts = tasks.WorldFacts.generate(seed=0)
    rng = random.Random(0)
    rows = tasks.science_rows(facts, 2000, rng)
    texts = [tasks.copy_document(rng) for _ in range(200)]
    texts += ["\n".join(r["golden_response"]) for r in rows[:200]]
    tok = train_tokenizer(texts, vocab_size=512)
    lineage = Lineage(root)
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(
            Qwen2Config(
                vocab_size=len(tok),
                hidden_size=hidden,
                intermediate_size=4 * hidden,
                num_hidden_layers=layers,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=512,
                tie_word_embeddings=True,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        )
        lineage.save(name, model, tok, kind="bench")
    examples = [row_to_example("bench", "science", i, r) for i, r in enumerate(rows)]
    return lineage, examples


def timed_pool(lineage: Lineage, examples: list[Any], actors: int, batch_size: int) -> dict:
    """One `cka_over_dataset` run: the DataFrame, wall time and the streaming rate."""
    arrivals: list[tuple[float, int]] = []  # (time, model batches merged so far)

    def log(msg: str) -> None:
        done = re.search(r"cka: (\d+)/", msg)
        if done:
            arrivals.append((time.perf_counter(), int(done.group(1))))

    t0 = time.perf_counter()
    df = cka_over_dataset(
        lineage, "a", "b", examples, CKAOptions(batch_size=batch_size), actors=actors, log=log
    )
    wall = time.perf_counter() - t0
    rate = None
    if len(arrivals) > 1 and arrivals[-1][0] > arrivals[0][0]:
        (t_first, n_first), (t_last, n_last) = arrivals[0], arrivals[-1]
        rate = (n_last - n_first) * batch_size / (t_last - t_first)
    return {"df": df, "wall_s": wall, "stream_seq_per_s": rate}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=512, help="sequences (default 512)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    ap.add_argument("--quick", action="store_true", help="n = 128")
    ap.add_argument(
        "--local-default-threads",
        action="store_true",
        help="also time cka_local with torch's default thread count (slow on a busy machine)",
    )
    ap.add_argument("--out", default="runs/bench/cka_pool.json", help="JSON results file")
    args = ap.parse_args()
    n = 128 if args.quick else args.n

    with tempfile.TemporaryDirectory(prefix="cka-pool-bench-") as tmp:
        lineage, examples = build_models(Path(tmp) / "lineage", args.hidden, args.layers)
        examples = examples[:n]
        ensure_ray(num_cpus=args.cpus)
        timed_pool(lineage, examples[: 2 * args.batch_size], 1, args.batch_size)  # warm-up

        rows: list[dict[str, Any]] = []
        local = None
        threads = torch.get_num_threads()
        thread_counts = [1, threads] if args.local_default_threads and threads > 1 else [1]
        for n_threads in thread_counts:
            torch.set_num_threads(n_threads)
            t0 = time.perf_counter()
            df = cka_local(lineage, "a", "b", examples, CKAOptions(batch_size=args.batch_size))
            wall = time.perf_counter() - t0
            local = df if local is None else local
            diff = np.abs(df[COLUMNS].to_numpy() - local[COLUMNS].to_numpy())
            rows.append(
                {
                    "config": f"local, {n_threads} thread(s)",
                    "actors": 0,
                    "wall_s": wall,
                    "seq_per_s": n / wall,
                    "stream_seq_per_s": n / wall,
                    "max_abs_diff_vs_local": float(np.nanmax(diff)),
                }
            )
        torch.set_num_threads(threads)
        for actors in (1, 2):
            res = timed_pool(lineage, examples, actors, args.batch_size)
            diff = np.abs(res["df"][COLUMNS].to_numpy() - local[COLUMNS].to_numpy())
            rows.append(
                {
                    "config": f"pool-{actors}",
                    "actors": actors,
                    "wall_s": res["wall_s"],
                    "seq_per_s": n / res["wall_s"],
                    "stream_seq_per_s": res["stream_seq_per_s"],
                    "max_abs_diff_vs_local": float(np.nanmax(diff)),
                }
            )

    print(
        f"\nCKA actor pool: n={n} sequences, batch {args.batch_size}, tiny Qwen2 hidden "
        f"{args.hidden} × {args.layers} layers, diagonal pairs, answer_mean, float32, "
        f"Ray {args.cpus} CPUs, {os.cpu_count()} cores\n"
    )
    print("| config | actors | wall s | seq/s (end to end) | seq/s (streaming) | max Δ vs local |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['config']} | {r['actors']} | {r['wall_s']:.1f} | {r['seq_per_s']:.1f} | "
            f"{r['stream_seq_per_s'] or float('nan'):.1f} | {r['max_abs_diff_vs_local']:.1e} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "n": n,
        "batch_size": args.batch_size,
        "hidden": args.hidden,
        "layers": args.layers,
        "ray_cpus": args.cpus,
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "torch": torch.__version__,
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
