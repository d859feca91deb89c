"""The training loop every stage runs on its Ray Train workers (`train_worker`).

A method (SFT, SDFT) implements `Method`: its model and teacher, its batches, its step, what
follows a step, its metrics. `train_worker` owns everything else, in this order — threads
and seed; the method's model; the CPU allocator and the live CKA probe; resuming the trained
weights, sharding (DDP or FSDP2), AdamW and its resumed state; then each step: the learning
rate (warm-up, cosine), the method's batch and step, clipping, the optimizer, what follows the
step, live CKA when due, the progress line, a report (with a checkpoint every
`checkpoint_every` steps and at the last), a kill point.

    trainer = make_trainer(partial(train_worker, SFTMethod), SFTJob(spec, init_dir, probe), ...)
"""

from __future__ import annotations

import logging
import math
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from sdftlab import sharding
from sdftlab.cka.live import LiveProbe, due, start_live_cka
from sdftlab.train.checkpoint import resume_optimizer, resume_weights, save_checkpoint
from sdftlab.train.setup import use_cpu_allocator


@dataclass(frozen=True)
class TrainJob:
    """What a training stage's driver sends its workers: the stage's spec (`SFTConfig`,
    `RecoverConfig`), the state it starts from, and the live CKA probe (None: off)."""

    spec: Any
    init_dir: str
    probe: LiveProbe | None


@dataclass
class Parts:
    """A method's models: the one trained (before sharding), its tokenizer, modules a
    checkpoint keeps beside it (an EMA teacher), and the models that hold a state's weights
    as they are, by directory (live CKA captures its reference from one instead of loading)."""

    model: torch.nn.Module
    tokenizer: Any
    extra: dict[str, torch.nn.Module] = field(default_factory=dict)
    resident: dict[str, torch.nn.Module] = field(default_factory=dict)


class Phases:
    """Seconds of a step's phases (`data_s`, `rollout_s`, `train_s`, `sync_s`, `cka_s`)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._phase, self._t0 = "", 0.0

    def start(self, phase: str) -> None:
        """End the running phase (if any; a phase run twice in a step adds up) and start
        `phase`."""
        now = time.perf_counter()
        if self._phase:
            self.seconds[self._phase] = self.seconds.get(self._phase, 0.0) + now - self._t0
        self._phase, self._t0 = phase, now

    def stop(self) -> dict[str, float]:
        """End the running phase; this step's seconds by phase (then a new step starts)."""
        self.start("")
        out, self.seconds = self.seconds, {}
        return out


class Method(Protocol):
    """What a training method gives `train_worker`."""

    tag: str  # the progress line's prefix: `[sft]`, `[sdft]`
    cpu_autocast: bool  # bf16 autocast on a CPU where `memory.bf16_autocast` is None

    def build(self) -> Parts: ...

    def begin(self, model: torch.nn.Module, start: int) -> None:
        """After sharding and resuming: the batches from step `start` on, engines ready."""

    def batch(self, step: int, phases: Phases) -> Any:
        """Step `step`'s batch (its data and rollouts, timed in `phases`)."""

    def step(self, batch: Any, model: torch.nn.Module) -> Any:
        """Forward and backward: the step's gradients, and what `metrics` reads of it."""

    def after_step(self, bare: torch.nn.Module, rank: int) -> None:
        """After the optimizer: the teacher's update, the new weights to the engines."""

    def metrics(
        self, done: int, batch: Any, result: Any, seconds: dict[str, float]
    ) -> dict[str, Any]: ...

    def progress(self, metrics: dict[str, Any]) -> str: ...


def train_worker(method_type: type, config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: `method_type(job, device)` trained by the one loop."""
    import ray.train
    import ray.train.torch

    job: TrainJob = config["job"]
    spec = job.spec
    ray_train_logs_to_files()
    torch.set_num_threads(spec.threads_per_worker)
    torch.manual_seed(spec.seed)
    rank, _ = sharding.world()
    device = ray.train.torch.get_device()
    method: Method = method_type(job, device)
    parts = method.build()
    use_cpu_allocator(spec.memory, parts.model, device)  # the same arithmetic either way
    live = start_live_cka(job.probe, parts.tokenizer, device, parts.resident,
                          everywhere=spec.memory.fsdp)  # fmt: skip
    checkpoint = ray.train.get_checkpoint()
    start, live_history = resume_weights(checkpoint, parts.model, parts.extra)  # unsharded
    bf16 = spec.memory.autocast_on(spec.use_gpu, method.cpu_autocast)
    model = sharding.prepare(parts.model, spec.memory.fsdp, bf16)
    bare = sharding.unwrap(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    resume_optimizer(checkpoint, model, optimizer)
    method.begin(model, start)
    phases = Phases()
    model.train()
    for step in range(start, spec.steps):
        done = step + 1
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(step, spec.steps, spec.warmup_steps, spec.lr)
        batch = method.batch(step, phases)
        phases.start("train_s")
        optimizer.zero_grad(set_to_none=True)
        result = method.step(batch, model)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        phases.start("sync_s")
        method.after_step(bare, rank)
        phases.start("cka_s")
        measure = due(spec.live_cka.every, done, spec.steps)  # asked on every rank
        cka = live.measure(bare) if measure and live is not None else {}
        if cka:
            live_history.append({"step": done, **cka})
        metrics = {"step": done, **method.metrics(done, batch, result, phases.stop()),
                   "lr": optimizer.param_groups[0]["lr"], "peak_rss_gb": peak_rss_gb(),
                   **cka}  # fmt: skip
        if rank == 0 and (done % spec.log_every == 0 or done in (start + 1, spec.steps)):
            print(method.progress(metrics), flush=True)
        if done % spec.checkpoint_every == 0 or done == spec.steps:
            report_checkpoint(metrics, model, parts, optimizer, done, spec.steps, live_history)
        elif done % spec.log_every == 0 or measure:  # a report: a controller round trip
            ray.train.report(metrics)
        kill_point(done)


def report_checkpoint(
    metrics: dict[str, Any], model: torch.nn.Module, parts: Parts, optimizer: Any, done: int,
    steps: int, live_history: list[dict[str, float]],
) -> None:  # fmt: skip
    """Report with a checkpoint (every rank gathers a sharded state, rank 0 writes it)."""
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        wrote = save_checkpoint(
            model, parts.tokenizer, optimizer, Path(d), done,
            final=done == steps, extra=parts.extra, live_cka=live_history,
        )  # fmt: skip
        checkpoint = ray.train.Checkpoint.from_directory(d) if wrote else None
        ray.train.report(metrics, checkpoint=checkpoint)


def warmup_cosine(step: int, total: int, warmup: int, peak: float, floor: float = 0.1) -> float:
    """Linear warm-up to `peak`, cosine decay to `floor · peak` at `total`."""
    if step < warmup:
        return peak * (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def peak_rss_gb() -> float:
    """This process's peak resident memory so far, in GB (the kernel's high-water mark)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)  # bytes on macOS, KiB on Linux


def kill_point(step: int) -> None:
    """Fault injection for drills and the fault-tolerance tests.

    With `SDFTLAB_KILL_AT_STEP="N:MARKER"`, the first worker process to finish step N creates
    the file MARKER and dies at once (`os._exit`, no cleanup), as a killed worker would; the
    marker keeps the restarted run from dying again. Unset, this does nothing.
    """
    spec = os.environ.get("SDFTLAB_KILL_AT_STEP")
    if not spec:
        return
    at, marker = spec.split(":", 1)
    if step == int(at) and not Path(marker).exists():
        Path(marker).write_text(f"killed after step {step}\n")
        os._exit(1)


class _RayTrainRecords(logging.Filter):
    """Drops the records of Ray Train's own modules (some log under their file's path, not
    under `ray.train`, and so reach the root logger's console handler)."""

    def filter(self, record: logging.LogRecord) -> bool:
        inside = record.name.startswith("ray.train") or f"{os.sep}ray{os.sep}train{os.sep}" in (
            record.pathname or ""
        )
        return not inside


def ray_train_logs_to_files() -> None:
    """In a Ray Train worker: Ray Train's own records go to its log files only.

    `ray.train`'s console handler already filters them at the run's level (`LoggingConfig`
    in `make_trainer`); the root logger's console handler, which Ray Train also configures,
    gets a filter for the ones logged under a file path ("Reporting training result …" at
    every report), while its file handler keeps them."""
    logging.getLogger("ray.train").propagate = False
    for handler in logging.getLogger().handlers:
        if type(handler).__name__ == "PlainRayHandler":  # the console, not the log files
            handler.addFilter(_RayTrainRecords())
