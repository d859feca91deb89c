"""Profile sdftlab's SDFT step phase by phase with torch.profiler: where a step's time goes.

Run from the repository root:

    PYTHONPATH=platform .venv/bin/python benchmarks/sdft_step_profile.py [--batch 16] [--steps 5]

The step is the one a Ray Train worker runs (`sdftlab.distill.sdft.recover_worker_loop`),
called in this process without Ray so that only the step's own work is measured: benchmarks/
rollout.py's random tiny Qwen2 and science prompts, `--batch` prompts a step, one rollout each
with transformers `generate` (`HFEngine`, temperature 1, `--max-new-tokens`), the frozen initial
model as teacher with the demonstration in its prompt (`completion_forward`, exact scoring),
the student's forward on prompt + completion, full-vocabulary forward KL (`sdft_loss`), backward,
gradient clipping and AdamW. One warm-up step, then `--steps` profiled steps on 2 torch threads.

Prints, per phase, the wall time per step and the torch operators' self CPU time (what is not
in operators is Python and framework overhead), then the top operators of the whole step.
`--out FILE` also writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from rollout import build_state, prompt_ids, write_results
from sdftlab.data.templates import teacher_messages
from sdftlab.distill.losses import sdft_loss
from sdftlab.distill.sdft import completion_forward
from sdftlab.rollout.engines import HFEngine, SamplingSettings

PHASES = ("rollout", "teacher", "student_forward", "loss", "backward", "optimizer")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="sdft-profile-") as tmp:
        lineage, state, examples = build_state(Path(tmp) / "lineage")
        tok = lineage.load_tokenizer(state)
        student = lineage.load_model(state).float().train()
        teacher = lineage.load_model(state).float().eval().requires_grad_(False)
        # Encoded ahead, as Ray Data does for the worker.
        used = (args.steps + 1) * args.batch
        student_ids = prompt_ids(lineage, state, examples, used)
        teacher_ids = prompt_ids(lineage, state, examples, used, teacher_messages)
    engine = HFEngine(student, tok.eos_token_id, tok.pad_token_id)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    device = torch.device("cpu")

    def step(i: int, timings: dict[str, float]) -> int:
        s_prompts = student_ids[i * args.batch : (i + 1) * args.batch]
        t_prompts = teacher_ids[i * args.batch : (i + 1) * args.batch]

        def phase(name: str):
            return _Phase(name, timings)

        with phase("rollout"):
            sampling = SamplingSettings(max_new_tokens=args.max_new_tokens, seed=i + 1)
            rollouts = engine.generate(s_prompts, sampling)
            completions = [r.token_ids or [tok.eos_token_id] for r in rollouts]
        pad = tok.pad_token_id
        with phase("teacher"), torch.no_grad():
            t_logits, _, _ = completion_forward(teacher, t_prompts, completions, pad, device)
            t_logp = torch.log_softmax(t_logits.float(), -1)
        with phase("student_forward"):
            logits, valid, _ = completion_forward(student, s_prompts, completions, pad, device)
        with phase("loss"):
            loss, _ = sdft_loss(logits, t_logp, valid, kind="forward_kl")
        with phase("backward"):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with phase("optimizer"):
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
        return sum(len(c) for c in completions)

    step(0, defaultdict(float))  # warm-up
    timings: dict[str, float] = defaultdict(float)
    tokens = 0
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(1, args.steps + 1):
            tokens += step(i, timings)
        wall = (time.perf_counter() - t0) / args.steps  # before the profiler's teardown

    events = prof.key_averages()
    op_self: dict[str, float] = {}
    for name in PHASES:  # operator self time inside each phase's record_function range
        op_self[name] = _ops_within(prof, f"phase:{name}") / args.steps
    print(f"\nsdftlab SDFT step, batch {args.batch}, ≤ {args.max_new_tokens} new tokens, "
          f"{args.threads} threads, {args.steps} profiled steps: {wall:.3f} s/step (profiled), "
          f"{tokens / args.steps:.0f} completion tokens/step")  # fmt: skip
    print("\n| phase | s / step | share | torch operators s / step | outside operators |")
    print("|---|---:|---:|---:|---:|")
    rows = []
    for name in PHASES:
        s = timings[name] / args.steps
        ops = op_self[name]
        rows.append({"phase": name, "s_per_step": s, "share": s / wall, "ops_s": ops})
        print(f"| {name} | {s:.3f} | {s / wall:.0%} | {ops:.3f} | {max(0.0, 1 - ops / s):.0%} |")
    print("\ntop operators, whole step (self CPU):")
    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))
    if args.out:
        write_results(args.out, {"benchmark": "sdft_step_profile", "args": vars(args),
                                 "s_per_step": wall, "phases": rows})  # fmt: skip


class _Phase:
    """Wall time of a phase (added to `timings`) and a profiler range named `phase:<name>`."""

    def __init__(self, name: str, timings: dict[str, float]) -> None:
        self.name, self.timings = name, timings
        self.range = record_function(f"phase:{name}")

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()
        self.range.__enter__()

    def __exit__(self, *exc) -> None:
        self.range.__exit__(*exc)
        self.timings[self.name] += time.perf_counter() - self.t0


def _ops_within(prof, range_name: str) -> float:
    """Seconds of operator self CPU time inside every occurrence of a record_function range."""
    events = prof.events()
    spans = [(e.time_range.start, e.time_range.end) for e in events if e.name == range_name]
    total = 0
    for e in events:
        if e.name.startswith("phase:"):
            continue
        if any(s <= e.time_range.start and e.time_range.end <= t for s, t in spans):
            total += e.self_cpu_time_total
    return total / 1e6


if __name__ == "__main__":
    main()
