"""SmolLM2-135M-Instruct: peak memory and speed of the SFT and SDFT steps, today's way and the
memory-lean way, and the evaluation time on vLLM against transformers.

The model is the packaged GGUF (`sdftlab import smollm2-135m`, the `smollm2` extra), imported
into a scratch lineage. Every variant runs in a fresh process, so its peak resident memory is
that process's own high-water mark (what `/usr/bin/time -v` reports); a watchdog kills a
variant that passes `--rss-limit-gb` and records it as out of memory.

- **SFT**: one step of 8 rows × 600 tokens (the papers' science questions and answers in the
  chat template, packed), AdamW, bf16 autocast (the stage's default on a CPU with AMX).
  `whole logits` is the step before the memory-lean path: `model(**batch).loss` (the
  [8, 600, 49152] logits at once), eager attention (the CPU choice then); the rest run
  `degrade.sft.sft_step` with the chunked head and loss (`chunk_tokens=auto`: 320 tokens),
  SDPA, and the micro-batch and checkpointing options.
- **SDFT**: one step of 16 prompts (science questions; completions of 128 tokens; the teacher
  a frozen copy with the demonstration in its prompt), forward KL over the full vocabulary,
  mask_first_k 3. `whole logits`: the student's and the teacher's [16, 128, 49152] logits at
  once, in fp32 with eager attention (the step before); the rest run `distill.step.sdft_step`.
- **SFT in a Ray Train worker**: `run_sft` (4 steps) on the tiny world's science rows, 32 a
  step, packed padding-free into rows of 600 tokens; the worker's own peak (`sft/peak_rss_gb`)
  with the workers' allocator setting (`heap`) and with the C library's (`system`).
- **Live CKA**: beside the SDFT step above with the forgetting pipeline's memory settings
  (micro-batches of 8, bf16), a `cka.live.LiveCKA` against the frozen teacher on 16 further
  science rows: its set-up (the teacher's states captured once), one measurement, and its
  share of the time at the default interval (every 10 steps).
- **Teacher without a copy**: the SDFT step above (micro-batches of 8, bf16) with a LoRA
  student (r 16 on every projection) whose teacher is its own starting state: a frozen copy of
  that state beside it, or the student itself scoring with its adapters off.
- **Overlapped rollouts**: `recover` self-distilling SmolLM2 (teacher: its own starting state
  with the demonstration) on the tiny world's science prompts, 8 steps of 16 prompts, 96 new
  tokens, rollouts on one bf16 vLLM actor, synchronous and with `rollout.overlap=1`: step time
  and its phases (median after the first), weight sync's share, the policy drift, and the
  divergence curve step by step.
- **Evaluation**: the papers' science (507 rows) and tool-use (97 rows) sets, greedy, with and
  without the demonstration, on one vLLM engine actor (all rows) and with transformers
  `generate` (the first `--hf-rows` rows of each, timed and projected to all rows).

    python benchmarks/real_model.py                      # every part
    python benchmarks/real_model.py --parts sft,sdft --steps 2
    python benchmarks/real_model.py --parts live
    python benchmarks/real_model.py --parts teacher,overlap
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
EVAL_DATA = REPO.parent / "shared" / "data" / "sdft_reference_eval"

STEP_CHILD = r"""
import json, sys, time, statistics
import torch
from sdftlab.train import loop as train_loop
from sdftlab.train import setup as train_setup
from sdftlab.allocator import tune_cpu_allocator
tune_cpu_allocator()  # as the train workers do
kind, state_dir, data_dir, variant, steps = sys.argv[1:6]
variant, steps = json.loads(variant), int(steps)
torch.set_num_threads(2)
torch.manual_seed(0)
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(state_dir)
model = AutoModelForCausalLM.from_pretrained(state_dir, dtype=torch.float32)
cpu = torch.device("cpu")
from sdftlab.data.loaders import load_task_file
examples = load_task_file(data_dir + "/science_data/eval_data", "science")
from sdftlab.data.templates import student_messages, teacher_messages, DEMO_TEMPLATE
def ids(messages):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]
if variant.get("attention"):
    model.set_attn_implementation(variant["attention"])
if variant.get("checkpointing"):
    train_setup.enable_checkpointing(model)
if variant.get("lora"):
    from sdftlab.specs import LoraSpec
    model = train_setup.with_lora(model, LoraSpec(r=variant["lora"], alpha=2 * variant["lora"]))
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=1e-5)
model.train()  # as in the workers (checkpointing is active in training mode only)
times, tokens = [], 0
if kind == "sft":
    from sdftlab.degrade.sft import SFTConfig, sft_step
    stream = []
    for ex in examples:
        answer = tok(ex.demonstration, add_special_tokens=False)["input_ids"]
        stream += ids(student_messages(ex)) + answer
    rows, width = 8, 600
    input_ids = torch.tensor(stream[: rows * width]).view(rows, width)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "labels": input_ids.clone()}
    cfg = SFTConfig(memory=variant.get("memory", {}))
    tokens = rows * width
    for step in range(steps + 1):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        if variant["path"] == "whole":
            with train_setup.autocast(cpu, True):
                loss = model(**batch, use_cache=False).loss
            loss.backward()
        else:
            sft_step(model, batch, cfg, cpu)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step:
            times.append(time.perf_counter() - t0)
else:
    import torch.nn.functional as F
    from sdftlab.distill.batch import RolloutBatch, completion_hidden
    sys.path.insert(0, sys.argv[6])  # tests/: the unchunked loss, the "before" of this step
    from reference_losses import sdft_loss
    from sdftlab.distill.config import RecoverConfig
    from sdftlab.distill.step import sdft_step
    from sdftlab.distill.teachers import adapters_off_teacher, frozen_teacher
    rows = examples[:16]
    completions = [(tok(ex.demonstration, add_special_tokens=False)["input_ids"] * 8)[:128]
                   for ex in rows]
    batch = RolloutBatch([ids(student_messages(ex)) for ex in rows],
                         [ids(teacher_messages(ex, DEMO_TEMPLATE)) for ex in rows], completions)
    if variant.get("teacher") == "adapters_off":  # the LoRA student's own state: no copy
        teacher = teacher_model = adapters_off_teacher(model, tok.pad_token_id, None)
    else:  # a frozen copy of the starting state
        teacher_model = AutoModelForCausalLM.from_pretrained(state_dir, dtype=torch.float32)
        teacher_model.eval().requires_grad_(False)
        teacher = frozen_teacher(teacher_model, tok.pad_token_id, None)
    cfg = RecoverConfig(memory=variant.get("memory", {}))
    tokens = sum(len(c) for c in completions)
    pad = tok.pad_token_id
    for step in range(steps + 1):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        if variant["path"] == "whole":
            with torch.no_grad():
                t = completion_hidden(teacher_model, batch.teacher_prompts, completions, pad, cpu)
                teacher_logp = F.log_softmax(teacher_model.lm_head(t.last_BCD).float(), -1)
            s = completion_hidden(model, batch.student_prompts, completions, pad, cpu)
            loss, _ = sdft_loss(model.lm_head(s.last_BCD), teacher_logp, s.valid_BC,
                                mask_first_k=3)
            loss.backward()
        else:
            sdft_step(batch, model, teacher, cfg, pad_id=pad, device=cpu)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step:
            times.append(time.perf_counter() - t0)
step_s = statistics.median(times)
out = {"step_s": step_s, "tokens_per_s": tokens / step_s}
if variant.get("live"):  # live CKA against the frozen teacher on `live` science rows
    from sdftlab.cka.live import LiveCKA
    t0 = time.perf_counter()
    live = LiveCKA(teacher_model, tok, examples[16:16 + variant["live"]], label="teacher",
                   every=10)
    out["live_setup_s"] = time.perf_counter() - t0
    measured = [live.measure(model) for _ in range(steps)]
    out["live_s"] = statistics.median(m["live_cka/seconds"] for m in measured)
    out["live_cka"] = measured[-1]["live_cka/teacher/last_layer"]
    out["share_every_10"] = out["live_s"] / (10 * step_s + out["live_s"])
print("RESULT " + json.dumps({**out, "peak_rss_gb": train_loop.peak_rss_gb()}))
"""

EVAL_CHILD = r"""
import json, sys, time
from sdftlab.lineage import Lineage
from sdftlab.evaluate.run import evaluate_generation, generator_for
from sdftlab.specs import EvalEngineSpec
root, name, data_dir, spec, limit = sys.argv[1:6]
limit = int(limit) or None
lineage = Lineage(root)
files = {"science": data_dir + "/science_data/eval_data",
         "tooluse": data_dir + "/tooluse_data/eval_data"}
spec = EvalEngineSpec.model_validate(json.loads(spec))
tok = lineage.load_tokenizer(name)
t0 = time.perf_counter()
with generator_for(lineage, name, tok, spec) as generate:
    up = time.perf_counter() - t0
    t1 = time.perf_counter()
    metrics, _ = evaluate_generation(generate, files, with_demonstration=True, limit=limit,
                                     max_new_tokens=spec.max_new_tokens, log=lambda _: None)
    gen = time.perf_counter() - t1
rows = sum(metrics[f"{t}/n"] + metrics[f"{t}/n_demo"] for t in ("science", "tooluse"))
print("RESULT " + json.dumps({"startup_s": up, "generate_s": gen, "rows": rows, **metrics}))
"""

WORKER_CHILD = r"""
import json, sys, time
from sdftlab.raycluster import ensure_ray
ensure_ray()
from sdftlab.degrade.sft import SFTConfig, run_sft
from sdftlab.lineage import Lineage
from sdftlab.world.build import build_world_data
from sdftlab.world.config import WorldConfig
root, name, home, memory = sys.argv[1:5]
data = build_world_data(WorldConfig(), __import__("pathlib").Path(home))
cfg = SFTConfig(data=["science"], steps=4, batch_size=32, max_len=600, padding_free=True,
                replay_frac=0.0, lr=1e-5, log_every=1, memory=json.loads(memory))
meta = run_sft(Lineage(root), "smol", name, cfg, data_dir=data, log=lambda _: None,
               overwrite=True)
print("RESULT " + json.dumps(meta.metrics))
"""
RECOVER_CHILD = r"""
import json, sys, time
from pathlib import Path
from sdftlab.raycluster import ensure_ray
ensure_ray()
from sdftlab.config import load_config
from sdftlab.world.config import WorldConfig
from sdftlab.distill.config import RecoverConfig
from sdftlab.distill.sdft import recover
from sdftlab.lineage import Lineage
from sdftlab.train.trainer import read_report_log, report_log
from sdftlab.world.build import build_world_data
root, name, home, overrides = sys.argv[1:5]
data = build_world_data(WorldConfig(), Path(home))
cfg = load_config(RecoverConfig, None, json.loads(overrides))
path = Path(home) / f"{name}.jsonl"
t0 = time.perf_counter()
meta = recover(Lineage(root), "smol", name, cfg, data_dir=data, log=lambda _: None,
               overwrite=True, callbacks=[report_log(path)])
print("RESULT " + json.dumps({"wall_s": time.perf_counter() - t0, "metrics": meta.metrics,
                              "steps": read_report_log(path)}))
"""
# SDFT on SmolLM2 as the forgetting pipeline runs it (16 prompts, 96 new tokens, bf16 engine,
# micro-batches of 8 in bf16), self-distillation: teacher = the starting state + demonstration.
OVERLAP_RUN = [
    "teacher=smol", "data=[science]", "steps=8", "prompts_per_step=16", "lr=2e-5",
    "warmup_steps=0", "log_every=1", "checkpoint_every=1000", "memory.micro_batch_size=8",
    "memory.bf16_autocast=true", "rollout.max_new_tokens=96", "rollout.dtype=bfloat16",
    "rollout.kv_cache_gb=1.0", "rollout.max_model_len=2048",
]  # fmt: skip
OVERLAP_VARIANTS: dict[str, list[str]] = {
    "synchronous (rollout.overlap=0)": [*OVERLAP_RUN, "rollout.overlap=0"],
    "overlapped (rollout.overlap=1)": [*OVERLAP_RUN, "rollout.overlap=1"],
}
TEACHER_VARIANTS: dict[str, dict[str, Any]] = {  # LoRA student, teacher = its own state
    "LoRA r16, teacher a frozen copy": {
        "path": "lean", "lora": 16, "memory": {"micro_batch_size": 8, "bf16_autocast": True},
    },
    "LoRA r16, teacher = the student, adapters off": {
        "path": "lean", "lora": 16, "teacher": "adapters_off",
        "memory": {"micro_batch_size": 8, "bf16_autocast": True},
    },
}  # fmt: skip
WORKER_VARIANTS: dict[str, tuple[dict[str, Any], str]] = {
    "micro-batch 2, checkpointing": ({"micro_batch_size": 2, "gradient_checkpointing": True},
                                     "heap"),
    "micro-batch 1, checkpointing": ({"micro_batch_size": 1, "gradient_checkpointing": True},
                                     "heap"),
    "micro-batch 1, checkpointing, allocator: system": (
        {"micro_batch_size": 1, "gradient_checkpointing": True}, "system"),
}  # fmt: skip
SFT_VARIANTS: dict[str, dict[str, Any]] = {
    "whole logits, eager (before)": {"path": "whole", "attention": "eager"},
    "chunked": {"path": "lean"},
    "chunked, micro-batch 2": {"path": "lean", "memory": {"micro_batch_size": 2}},
    "chunked, micro-batch 2, checkpointing": {
        "path": "lean", "checkpointing": True, "memory": {"micro_batch_size": 2},
    },
    "chunked, micro-batch 8, checkpointing": {
        "path": "lean", "checkpointing": True, "memory": {"micro_batch_size": 8},
    },
}  # fmt: skip
SDFT_VARIANTS: dict[str, dict[str, Any]] = {
    "whole logits, fp32, eager (before)": {"path": "whole", "attention": "eager"},
    "chunked, micro-batch 4": {"path": "lean", "memory": {"micro_batch_size": 4}},
    "chunked, micro-batch 4, checkpointing": {
        "path": "lean", "checkpointing": True, "memory": {"micro_batch_size": 4},
    },
    "chunked, micro-batch 4, checkpointing, bf16": {
        "path": "lean", "checkpointing": True,
        "memory": {"micro_batch_size": 4, "bf16_autocast": True},
    },
    "chunked, micro-batch 16, checkpointing, bf16": {
        "path": "lean", "checkpointing": True,
        "memory": {"micro_batch_size": 16, "bf16_autocast": True},
    },
}  # fmt: skip
LIVE_VARIANTS: dict[str, dict[str, Any]] = {  # the forgetting_smollm2 pipeline's SDFT memory
    "SDFT step, micro-batch 8, bf16": {
        "path": "lean", "memory": {"micro_batch_size": 8, "bf16_autocast": True},
    },
    "the same, and live CKA on 16 rows": {
        "path": "lean", "memory": {"micro_batch_size": 8, "bf16_autocast": True}, "live": 16,
    },
}  # fmt: skip


def run_child(
    code: str, args: list[str], rss_limit_gb: float, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """A fresh process; its RESULT line, or {'oom': True} if it passed the RSS limit."""
    import psutil

    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1", **(env or {})},
    )
    killed = threading.Event()

    def watch() -> None:
        try:
            ps = psutil.Process(proc.pid)
            while proc.poll() is None:
                rss = ps.memory_info().rss + sum(
                    c.memory_info().rss for c in ps.children(recursive=True)
                )
                if rss > rss_limit_gb * 2**30:
                    killed.set()
                    proc.kill()
                time.sleep(0.2)
        except psutil.NoSuchProcess:
            return

    threading.Thread(target=watch, daemon=True).start()
    out, err = proc.communicate()
    if killed.is_set():
        return {"oom": True}
    lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child failed:\n{err[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def overlap_summary(run: dict[str, Any]) -> dict[str, Any]:
    """A recovery's per-step figures: step time (its phases: data, rollout wait, train with
    the teacher, weight sync), median over the steps after the first, the divergence curve,
    the policy drift, and the run's wall time."""
    import statistics

    steps = run["steps"]
    step_s = [r["data_s"] + r["rollout_s"] + r["train_s"] + r["sync_s"] for r in steps]
    timed = steps[1:] or steps
    return {
        "step_s": statistics.median(step_s[1:] or step_s),
        "rollout_wait_s": statistics.median(r["rollout_s"] for r in timed),
        "train_s": statistics.median(r["train_s"] for r in timed),
        "sync_s": statistics.median(r["sync_s"] for r in timed),
        "sync_share": statistics.median(r["sync_s"] for r in timed)
        / statistics.median(step_s[1:] or step_s),
        "drift": statistics.median(r.get("policy_drift", 0.0) for r in timed),
        "divergence_first": steps[0]["divergence"],
        "divergence_last": steps[-1]["divergence"],
        "divergence": [round(r["divergence"], 4) for r in steps],
        "wall_s": run["wall_s"],
        "peak_rss_gb": max(r["peak_rss_gb"] for r in steps),
    }


def table(title: str, rows: dict[str, dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """A markdown table: one row per variant; columns are (header, result key, format)."""
    lines = [f"### {title}", "", "| variant | " + " | ".join(c[0] for c in columns) + " |"]
    lines.append("|---|" + "---:|" * len(columns))
    for label, r in rows.items():
        if r.get("oom"):
            cells = ["out of memory"] + [""] * (len(columns) - 1)
        else:
            cells = [fmt.format(r[key]) if key in r else "–" for _, key, fmt in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="sft,sdft,live,teacher,worker,overlap,eval")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up")
    parser.add_argument("--rss-limit-gb", type=float, default=20.0)
    parser.add_argument("--hf-rows", type=int, default=24, help="transformers: rows per task")
    parser.add_argument("--out", default="runs/bench/real_model.json")
    args = parser.parse_args()
    from sdftlab.importer import import_model
    from sdftlab.lineage import Lineage

    parts = args.parts.split(",")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-real-") as tmp:
        lineage = Lineage(Path(tmp) / "lineage")
        import_model(lineage, "smollm2-135m", "smol", log=lambda _: None)
        state = str(lineage.local_path("smol"))
        for part, variants in (("sft", SFT_VARIANTS), ("sdft", SDFT_VARIANTS),
                               ("live", LIVE_VARIANTS), ("teacher", TEACHER_VARIANTS)):  # fmt: skip
            if part not in parts:
                continue
            kind = "sft" if part == "sft" else "sdft"
            results[part] = {}
            for label, variant in variants.items():
                argv = [kind, state, str(EVAL_DATA), json.dumps(variant), str(args.steps),
                        str(REPO / "tests")]  # fmt: skip
                results[part][label] = run_child(STEP_CHILD, argv, args.rss_limit_gb)
                print(f"{part} {label}: {results[part][label]}", flush=True)
        if "worker" in parts:
            results["worker"] = {}
            for i, (label, (memory, alloc)) in enumerate(WORKER_VARIANTS.items()):
                env = {"SDFTLAB_CPU_ALLOC": alloc, "SDFTLAB_STORAGE": f"{tmp}/ray{i}"}
                argv = [str(lineage.root), f"sft{i}", tmp, json.dumps(memory)]
                r = run_child(WORKER_CHILD, argv, args.rss_limit_gb, env)
                results["worker"][label] = r
                print(f"worker {label}: {r}", flush=True)
        if "overlap" in parts:
            results["overlap"] = {}
            for i, (label, overrides) in enumerate(OVERLAP_VARIANTS.items()):
                env = {"SDFTLAB_STORAGE": f"{tmp}/ray-overlap{i}"}
                argv = [str(lineage.root), f"overlap{i}", tmp, json.dumps(overrides)]
                r = run_child(RECOVER_CHILD, argv, args.rss_limit_gb, env)
                results["overlap"][label] = overlap_summary(r)
                print(f"overlap {label}: {results['overlap'][label]}", flush=True)
        if "eval" in parts:
            results["eval"] = {}
            engines = {
                "vLLM actor, fp32 (all rows)": ({"engine": "vllm", "cpus": 2.0,
                                                 "kv_cache_gb": 2.0, "max_model_len": 4096}, 0),
                "vLLM actor, bf16 (all rows)": ({"engine": "vllm", "cpus": 2.0, "dtype": "bfloat16",
                                                 "kv_cache_gb": 2.0, "max_model_len": 4096}, 0),
                f"transformers (first {args.hf_rows} rows)": ({"engine": "hf"}, args.hf_rows),
            }  # fmt: skip
            for label, (spec, limit) in engines.items():
                argv = [str(lineage.root), "smol", str(EVAL_DATA), json.dumps(spec), str(limit)]
                r = run_child(EVAL_CHILD, argv, args.rss_limit_gb)
                r["s_per_row"] = r["generate_s"] / r["rows"]
                r["all_rows_s"] = r["s_per_row"] * 2 * (507 + 97) + r["startup_s"]
                results["eval"][label] = r
                print(f"eval {label}: {r}", flush=True)
    step_cols = [("s/step", "step_s", "{:.1f}"), ("tokens/s", "tokens_per_s", "{:.0f}"),
                 ("peak RSS GB", "peak_rss_gb", "{:.2f}")]  # fmt: skip
    eval_cols = [("start-up s", "startup_s", "{:.0f}"), ("s/row", "s_per_row", "{:.3f}"),
                 ("all 1208 rows, s", "all_rows_s", "{:.0f}"),
                 ("science", "science/acc", "{:.3f}"),
                 ("science+demo", "science/acc_demo", "{:.3f}"),
                 ("tool use", "tooluse/acc", "{:.3f}"),
                 ("tool use+demo", "tooluse/acc_demo", "{:.3f}")]  # fmt: skip
    worker_cols = [("tokens/s", "sft/tokens_per_s", "{:.0f}"),
                   ("peak RSS GB (worker)", "sft/peak_rss_gb", "{:.2f}")]  # fmt: skip
    titles = {
        "sft": "SFT step, 8 × 600 tokens",
        "sdft": "SDFT step, 16 prompts × 128 tokens",
        "worker": "`run_sft` in a Ray Train worker: 32 rows packed into rows of 600 tokens",
        "eval": "Evaluation, science 507 + tool use 97, with and without the demonstration",
        "live": "Live CKA beside the SDFT step (16 prompts × 128 tokens)",
        "teacher": "SDFT step with a LoRA student whose teacher is its own starting state",
        "overlap": "SDFT on vLLM rollouts, synchronous and overlapped (8 steps of 16 prompts)",
    }
    overlap_cols = [("s/step", "step_s", "{:.1f}"), ("rollout wait s", "rollout_wait_s", "{:.1f}"),
                    ("train s", "train_s", "{:.1f}"), ("sync s", "sync_s", "{:.2f}"),
                    ("sync share", "sync_share", "{:.1%}"), ("drift", "drift", "{:.3f}"),
                    ("KL step 1", "divergence_first", "{:.3f}"),
                    ("KL step 8", "divergence_last", "{:.3f}"), ("run s", "wall_s", "{:.0f}"),
                    ("peak RSS GB", "peak_rss_gb", "{:.2f}")]  # fmt: skip
    live_cols = [("s/step", "step_s", "{:.1f}"), ("CKA set-up s", "live_setup_s", "{:.1f}"),
                 ("s/measurement", "live_s", "{:.2f}"),
                 ("share of time, every 10 steps", "share_every_10", "{:.1%}"),
                 ("peak RSS GB", "peak_rss_gb", "{:.2f}")]  # fmt: skip
    for kind, rows in results.items():
        print()
        cols = {"eval": eval_cols, "worker": worker_cols, "live": live_cols,
                "overlap": overlap_cols}.get(kind, step_cols)  # fmt: skip
        print(table(titles[kind], rows, cols))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
