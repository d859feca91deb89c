"""SDFT recovery: Ray Data → rollout actors → teacher scoring → Ray Train updates.

Self-distillation fine-tuning (Shenfeld et al. 2026, "Self-distillation enables continual
learning", arXiv 2601.19897). Each step:

1. Ray Data streams task rows (prompt, demonstration) from the task files; a `map_batches`
   stage renders and tokenizes the student view (bare prompt) and the teacher view (prompt
   with the demonstration in `DEMO_TEMPLATE`, or the bare prompt with `teacher_context=bare`).
2. The student samples completions of its own prompts (on-policy): on the vLLM rollout actors
   (`rollout.engine=vllm`) or with transformers `generate` beside the trainer (`hf`). With
   `rollout.overlap=1` the engines sample step t+1 while the workers train on step t
   (`RolloutStream`: one step off-policy, corrected by the importance ratio).
3. The teacher scores the student's tokens from its own prompt: exactly, with a forward beside
   the trainer (full vocabulary, `scoring=exact`), or on teacher vLLM actors (top-k prompt
   log-probs, `scoring=vllm`). Teachers: a lineage state or path, `ema` of the student
   (rate `ema_rate`), or `live` (the student itself, with the demonstration in context).
4. Ray Train workers run `distill.step.sdft_step`: the per-token divergence (forward KL by
   default, full vocabulary or top-k, first `mask_first_k` tokens masked, capped importance
   ratio engine → trainer), plus an optional CKA term, over micro-batches with the output
   layer chunked (`memory`); then the optimizer steps (full FT, LoRA, or QLoRA on an NF4
   student; DDP or FSDP2 over `num_workers`, `sharding`) and the teacher follows (`teachers`).
5. Rank 0 pushes the new weights (or LoRA-merged layers) to the rollout actors in memory
   (`rollout.sync.WeightSync`) and logs the sync time, so the next rollouts are on-policy (or
   one step behind, overlapped).
6. Every `live_cka.every` steps (and at the last) rank 0 measures CKA to the reference state
   on a fixed probe (`cka.live`); each measurement is a report, so a sweep's ASHA sees it.

This module is the Ray plumbing around those components — the data, the method the one
training loop runs (`SDFTMethod` under `train.loop.train_worker`: the student and its
teacher, rollouts, the step, the teacher's update and the weight push) and the driver
(`recover`: checks, engines, `train.trainer.fit_and_save`, the new state); the config is in
`distill/config.py`, the rows in `distill/batch.py`.

`mode=off_policy` is the two-stage small-model recipe's first stage: no rollouts; student and
an external (larger) teacher both see prompt + demonstration, KL on the demonstration tokens.

    sdftlab recover --student forgot --teacher expert --to recovered --data science tooluse
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdftlab import sharding
from sdftlab.cka.live import live_cka_text, live_probe
from sdftlab.config import trust_remote_code
from sdftlab.data.loaders import iter_jsonl, row_to_example, task_source
from sdftlab.data.templates import student_messages, teacher_messages
from sdftlab.distill.batch import (
    RolloutBatch,
    from_demonstrations,
    from_rollouts,
    rollout_counts,
)
from sdftlab.distill.config import SPECIAL_TEACHERS, RecoverConfig
from sdftlab.distill.step import StepResult, sdft_step
from sdftlab.distill.teachers import (
    ModelTeacher,
    Teacher,
    VLLMTeacher,
    adapters_off_teacher,
    ema_teacher,
    frozen_teacher,
    live_teacher,
)
from sdftlab.errors import ConfigError, DataError
from sdftlab.lineage import Lineage, StateMeta
from sdftlab.rollout.engines import HFEngine, RolloutEngine, SamplingSettings
from sdftlab.rollout.sync import WeightSync
from sdftlab.specs import LoraSpec
from sdftlab.train.batches import shard_batches
from sdftlab.train.loop import Parts, Phases, TrainJob, train_worker
from sdftlab.train.setup import prepare_for_training, use_training_attention, with_lora
from sdftlab.train.trainer import fit_and_save, run_name

# ----------------------------------------------------------------------------- data


def task_files(cfg: RecoverConfig, data_dir: Path | None) -> list[tuple[str, Path]]:
    return [task_source(entry, data_dir, "train") for entry in cfg.data]


def check_task_files(files: Sequence[tuple[str, Path]]) -> int:
    """Stream every row once: parse it and require a demonstration. Returns the row count."""
    total = 0
    for task, path in files:
        count = 0
        for lineno, row in iter_jsonl(path):
            example = row_to_example(f"{path}:{lineno}", task, lineno, row)
            if not example.demonstration.strip():
                raise DataError(
                    f"{path}:{lineno}: empty demonstration; SDFT's teacher needs one in its "
                    "prompt (give the row its golden response, or drop the row)"
                )
            count += 1
        if count == 0:
            raise DataError(f"{path}: no rows; SDFT needs prompts with demonstrations")
        total += count
    return total


class PromptEncoder:
    """Ray Data UDF: JSONL lines → student, teacher and demonstration token ids."""

    def __init__(self, tokenizer_dir: str, tasks: dict[str, str], cfg: dict[str, Any]) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_dir, trust_remote_code=trust_remote_code()
        )
        self.tasks = tasks
        self.cfg = RecoverConfig.model_validate(cfg)

    def _ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list[Any]] = {"uid": [], "student": [], "teacher": [], "demo": []}
        for line, path in zip(batch["text"], batch["path"], strict=True):
            task = self.tasks[Path(path).name]
            example = row_to_example(str(path), task, 0, json.loads(line))
            teacher_view = (
                teacher_messages(example, self.cfg.template)
                if self.cfg.teacher_context == "demonstration"
                else student_messages(example)
            )
            demo = self.tokenizer(example.demonstration, add_special_tokens=False)["input_ids"]
            out["uid"].append(f"{task}:{example.uid}")
            out["student"].append(np.asarray(self._ids(student_messages(example)), np.int64))
            out["teacher"].append(np.asarray(self._ids(teacher_view), np.int64))
            out["demo"].append(np.asarray([*demo, self.tokenizer.eos_token_id], np.int64))
        return {k: np.asarray(v, dtype=object) for k, v in out.items()}


def longest_prompts(
    files: Sequence[tuple[str, Path]], tokenizer_dir: str, cfg: RecoverConfig, limit: int = 20000
) -> dict[str, int]:
    """The longest student and teacher prompts in tokens (the teacher's with the
    demonstration in context), as `PromptEncoder` writes them, over the first `limit` rows of
    each task file: the lengths that size a step's activations (`sdftlab plan`)."""
    encode = PromptEncoder(tokenizer_dir, {p.name: t for t, p in files}, cfg.model_dump())
    longest = {"student": 0, "teacher": 0}
    for _, path in files:
        lines = [line for _, line in zip(range(limit), path.open(), strict=False) if line.strip()]
        for start in range(0, len(lines), 256):
            chunk = lines[start : start + 256]
            out = encode({"text": np.asarray(chunk), "path": np.asarray([str(path)] * len(chunk))})
            for side in longest:
                longest[side] = max([longest[side], *(len(ids) for ids in out[side])])
    return longest


def prompt_dataset(files: Sequence[tuple[str, Path]], tokenizer_dir: str, cfg: RecoverConfig):
    """A streaming Ray Dataset of encoded prompts over the task files (never all in the driver)."""
    import ray.data

    tasks = {path.name: task for task, path in files}
    if len(tasks) != len(files):
        raise ConfigError("data: two task files share a file name; give them distinct names")
    paths = [str(p) for _, p in files]
    # Light reads: the CPUs belong to the train workers and rollout actors (0.2 + 0.2 beside
    # one worker and one 0.5-CPU engine leaves room on 2 CPUs for a sweep trial's driver).
    read = ray.data.read_text(paths, include_paths=True, num_cpus=0.2)
    return read.map_batches(
        PromptEncoder,
        fn_constructor_kwargs={
            "tokenizer_dir": tokenizer_dir,
            "tasks": tasks,
            "cfg": cfg.model_dump(mode="json"),
        },
        batch_size=64,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0.2,
    )


# ----------------------------------------------------------------------------- worker


@dataclass(frozen=True)
class RecoverJob(TrainJob):
    """An SDFT job: the teacher's state (None: `ema`/`live`), whether it is the student's own
    state, and the vLLM pools started beside the worker group (None: not used)."""

    teacher_dir: str | None = None
    teacher_is_student: bool = False
    rollout_pool: Any = None
    teacher_pool: Any = None


def build_student(cfg: RecoverConfig, path: str, device: Any) -> Any:
    """The trained model: full weights in fp32, LoRA adapters, or QLoRA on an NF4 state."""
    from sdftlab.models import load_model, qlora_model

    model = load_model(path)
    prepare_for_training(model, cfg.memory, device)
    if getattr(model.config, "quantization_config", None) is not None:
        lora = cfg.lora or LoraSpec()
        return qlora_model(model, lora.r, lora.alpha, lora.dropout, lora.target_modules)
    return model.float() if cfg.lora is None else with_lora(model, cfg.lora)


def build_teacher(
    cfg: RecoverConfig, student: Any, job: RecoverJob, pad_id: int, device: Any
) -> Teacher:
    """The step's teacher for `cfg.teacher` and `cfg.scoring` (`teachers` has the table)."""
    from sdftlab.models import load_model

    ema = (
        ema_teacher(student, cfg.ema_rate, pad_id, cfg.loss.topk) if cfg.teacher == "ema" else None
    )
    if cfg.scoring == "vllm":
        pool = job.rollout_pool if cfg.teacher == "live" else job.teacher_pool
        return VLLMTeacher(WeightSync(pool), cfg.loss.topk or 0, ema)
    if ema is not None:
        return ema
    if cfg.teacher == "live":
        return live_teacher(student, pad_id, cfg.loss.topk)
    if job.teacher_is_student and hasattr(student, "disable_adapter"):
        return adapters_off_teacher(student, pad_id, cfg.loss.topk)  # no second model
    model = load_model(job.teacher_dir).to(device)
    use_training_attention(model, device)
    return frozen_teacher(model, pad_id, cfg.loss.topk)


def teacher_modules(teacher: Teacher) -> dict[str, torch.nn.Module]:
    """The teacher's own weights a checkpoint must keep (the EMA average), by file name."""
    ema = teacher.ema if isinstance(teacher, VLLMTeacher) else teacher
    if isinstance(ema, ModelTeacher) and ema.update is not None:
        return {"ema": ema.model}
    return {}


def resident_models(job: RecoverJob, student: Any, teacher: Teacher) -> dict[str, Any]:
    """The models in this worker that hold a state's weights, by directory: the student before
    its first step, a frozen teacher (live CKA captures its reference from them; a teacher
    that is the LoRA student's own state is the student, adapters still zero)."""
    out = {job.init_dir: student}
    if isinstance(teacher, ModelTeacher) and teacher.update is None and job.teacher_dir:
        out[job.teacher_dir] = teacher.model
    return out


class RolloutStream:
    """A worker's batch for each step: its prompts (`shard_batches`) and the student's
    completions of them from the rollout engine (`rollout.engines.RolloutEngine`: the vLLM
    pool, or transformers `generate` beside the trainer), or the demonstrations (off-policy).

    Synchronous by default: step t's completions are sampled on the weights step t trains.
    With `rollout.overlap=1`, step t+1's completions are asked for before step t trains, so
    the engines sample them on step t's weights while the worker trains (one step
    off-policy, as verl, OpenRLHF and NeMo-RL overlap; the importance ratio engine → trainer
    corrects it, and `policy_drift` shows it)."""

    def __init__(
        self, cfg: RecoverConfig, engine: RolloutEngine, batches: Iterator[dict[str, Any]],
        rank: int,
    ) -> None:  # fmt: skip
        self.cfg, self.engine, self.batches, self.rank = cfg, engine, batches, rank
        self.pending: Callable[[], RolloutBatch] | None = None

    def take(self, step: int, phases: Phases) -> RolloutBatch:
        current = self.pending or self._ask(step, phases)
        ahead = self.cfg.rollout.overlap and step + 1 < self.cfg.steps
        self.pending = self._ask(step + 1, phases) if ahead else None
        phases.start("rollout_s")
        return current()

    def _ask(self, step: int, phases: Phases) -> Callable[[], RolloutBatch]:
        """Step `step`'s prompts now; its batch when called (the vLLM pool starts sampling
        at once, `generate` beside the trainer when called)."""
        cfg = self.cfg
        phases.start("data_s")
        prompts = next(self.batches)
        student = [list(x) for x in prompts["student"]]
        teacher = [list(x) for x in prompts["teacher"]]
        if cfg.mode == "off_policy":
            demos = [list(x) for x in prompts["demo"]]
            return lambda: from_demonstrations(teacher, demos)
        sampling = SamplingSettings(
            n=cfg.rollout.n,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            max_new_tokens=cfg.rollout.max_new_tokens,
            seed=cfg.seed + step * 997 + self.rank,
        )
        pending = self.engine.submit(student, sampling)
        return lambda: from_rollouts(student, teacher, pending.result(), cfg.rollout.n)


class SDFTMethod:
    """SDFT (and off-policy distillation) for the one training loop (`train.loop.Method`):
    the student and its teacher, rollouts, `sdft_step`, the teacher's update and the weight
    push after each step."""

    tag = "sdft"
    cpu_autocast = False  # SDFT's documented tiny-world figures are fp32

    def __init__(self, job: RecoverJob, device: torch.device) -> None:
        self.job, self.cfg, self.device = job, job.spec, device
        self.rank, self.world = sharding.world()

    def build(self) -> Parts:
        from sdftlab.models import load_tokenizer

        tokenizer = load_tokenizer(self.job.init_dir)
        self.pad_id, self.eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        self.decode = partial(tokenizer.batch_decode, skip_special_tokens=True)
        model = build_student(self.cfg, self.job.init_dir, self.device)
        self.teacher = build_teacher(self.cfg, model, self.job, self.pad_id, self.device)
        return Parts(model, tokenizer, teacher_modules(self.teacher),
                     resident_models(self.job, model, self.teacher))  # fmt: skip

    def begin(self, model: torch.nn.Module, start: int) -> None:
        """The engines up (after a resume, holding the trained weights), the rollouts."""
        cfg, job = self.cfg, self.job
        bare = sharding.unwrap(model)
        self.rollout_sync = WeightSync(job.rollout_pool)
        for pool in (job.rollout_pool, job.teacher_pool):
            up_s = pool.wait_ready() if pool is not None else 0.0
            if self.rank == 0 and up_s:
                print(f"[sdft] vLLM engines up ({up_s:.0f}s to load)", flush=True)
        if start > 0:  # resumed: the engines still hold the starting state
            self.rollout_sync.push(bare, self.rank)
            for module in teacher_modules(self.teacher).values():
                WeightSync(job.teacher_pool).push(module, self.rank)
        engine = job.rollout_pool or HFEngine(bare, self.eos_id, self.pad_id,
                                              synced=cfg.memory.fsdp)  # fmt: skip
        batches = shard_batches(cfg.prompts_per_step, seed=cfg.seed, skip=start,
                                shuffle_buffer=8 * cfg.prompts_per_step, tensors=False)  # fmt: skip
        self.rollouts = RolloutStream(cfg, engine, batches, self.rank)
        self.first, self.busy_s, self.sync_s, self.tokens = start, 0.0, 0.0, 0
        self.losses: list[float] = []
        self.counts: list[list[int]] = []  # rollout diagnostics per step (`rollout_counts`)

    def batch(self, step: int, phases: Phases) -> RolloutBatch:
        return self.rollouts.take(step, phases)

    def step(self, batch: RolloutBatch, model: torch.nn.Module) -> StepResult:
        return sdft_step(batch, model, self.teacher, self.cfg, pad_id=self.pad_id,
                         device=self.device)  # fmt: skip

    def after_step(self, bare: torch.nn.Module, rank: int) -> None:
        """The teacher follows (EMA; its engines), the rollout engines get the new weights
        (the next rollouts are on-policy, or one behind), and every worker waits for them."""
        self.teacher.after_step(bare, rank)
        self.rollout_sync.push(bare, rank)
        if self.world > 1:
            torch.distributed.barrier()

    def metrics(
        self, done: int, batch: RolloutBatch, result: StepResult, seconds: dict[str, float]
    ) -> dict[str, Any]:
        """The running figures: loss (last 10 steps), completion tokens a second over the
        phases' busy time, the share of it spent syncing weights; the step's statistics and
        phase times (the teacher's forward is inside `train_s`, shown as `teacher_s`); the
        rollout diagnostics over the last 10 steps of every worker: the shares truncated at
        the token budget and reaching the answer format."""
        seconds = {**seconds, "teacher_s": result.stats["teacher_s"]}
        self.busy_s += sum(v for k, v in seconds.items() if k != "teacher_s")
        self.sync_s += seconds["sync_s"]
        self.tokens += sum(len(c) for c in batch.completions)
        self.losses.append(result.loss)
        self.counts.append(self._rollout_counts(batch))
        rows, truncated, formatted = np.sum(self.counts[-10:], axis=0)
        return {
            "loss": float(np.mean(self.losses[-10:])),
            "tokens_per_s": self.tokens * self.world / max(self.busy_s, 1e-9),
            "step_s_mean": self.busy_s / (done - self.first),
            "sync_fraction": self.sync_s / max(self.busy_s, 1e-9),  # of the step time
            "completion_len": float(np.mean([len(c) for c in batch.completions])),
            "truncated": truncated / rows,
            "answer_format": formatted / rows,
            **result.stats,
            **seconds,
        }

    def _rollout_counts(self, batch: RolloutBatch) -> list[int]:
        """This step's `rollout_counts`, summed over the workers."""
        counts = rollout_counts(batch.completions, eos_id=self.eos_id, decode=self.decode,
                                max_new_tokens=self.cfg.rollout.max_new_tokens)  # fmt: skip
        if self.world > 1:  # every rank reports each step, so every rank reaches this
            summed = torch.tensor(counts, dtype=torch.int64, device=self.device)
            torch.distributed.all_reduce(summed)
            counts = summed.tolist()
        return counts

    def progress(self, m: dict[str, Any]) -> str:
        """One progress line: step, loss, divergence, live CKA, throughput, importance ratio,
        phase times."""
        drift = f" drift {m['policy_drift']:.3f}" if "policy_drift" in m else ""
        return (
            f"[sdft] step {m['step']:4d}/{self.cfg.steps}  loss {m['loss']:.4f}  "
            f"kl {m['divergence']:.4f}{live_cka_text(m)}  {m['tokens_per_s']:6.0f} tok/s  "
            f"len {m['completion_len']:.0f} trunc {m['truncated']:.0%} "
            f"fmt {m['answer_format']:.0%}  "
            f"ratio {m.get('importance_ratio', 1.0):.3f}{drift}  rollout {m['rollout_s']:.2f}s  "
            f"teacher {m['teacher_s']:.2f}s  train {m['train_s']:.2f}s  "
            f"sync {m['sync_s'] * 1e3:.0f}ms  data {m.get('data_s', 0.0):.2f}s  "
            f"peak {m['peak_rss_gb']:.1f}GB"
        )


# ----------------------------------------------------------------------------- driver


def resolve_teacher(lineage: Lineage, ref: str) -> Path | None:
    """The teacher's directory (None for `ema`/`live`); unknown refs list the known states."""
    if ref in SPECIAL_TEACHERS:
        return None
    return lineage.resolve(ref)


def check_same_vocabulary(lineage: Lineage, student: str, teacher_dir: Path | None) -> None:
    if teacher_dir is None:
        return
    from sdftlab.models import load_model_config, load_tokenizer

    s_tok, t_tok = lineage.load_tokenizer(student), load_tokenizer(teacher_dir)
    s_cfg = load_model_config(lineage.resolve(student))
    t_cfg = load_model_config(teacher_dir)
    if s_tok.get_vocab() != t_tok.get_vocab() or s_cfg.vocab_size != t_cfg.vocab_size:
        raise ConfigError(
            f"teacher {teacher_dir} has another vocabulary than student {student!r} "
            f"({t_cfg.vocab_size} vs {s_cfg.vocab_size} logits, tokenizers differ): per-token "
            "distillation needs one tokenizer; pick a teacher from the same model family"
        )


def check_recovery(
    lineage: Lineage, student: str, dst: str, cfg: RecoverConfig, overwrite: bool
) -> tuple[Path | None, list[str]]:
    """Everything a user can get wrong, before any actor starts: the states, the teacher's
    vocabulary, an NF4 student's engine and scoring. Returns (teacher dir, parents)."""
    from sdftlab.models import is_quantized

    lineage.require(student)
    teacher_dir = resolve_teacher(lineage, cfg.teacher)
    parents = [student]
    if lineage.exists(cfg.teacher) and cfg.teacher != student:
        parents.append(cfg.teacher)
    lineage.check_new(dst, parents=parents, overwrite=overwrite)
    check_same_vocabulary(lineage, student, teacher_dir)
    if is_quantized(lineage.resolve(student)):
        if cfg.rollout.engine == "vllm" and cfg.mode == "on_policy":
            raise ConfigError(
                f"rollout.engine=vllm: student {student!r} is NF4 (bitsandbytes), which the "
                "vLLM rollout engine does not serve here; set rollout.engine=hf"
            )
        if cfg.memory.fsdp:
            raise ConfigError(
                f"memory.fsdp: student {student!r} is NF4 (bitsandbytes), whose 4-bit weights "
                "are not sharded here; set memory.fsdp=false (QLoRA keeps one replica a worker)"
            )
        if cfg.teacher == "live" or cfg.scoring == "vllm":
            raise ConfigError(
                "an NF4 student is distilled from an unquantized teacher state with "
                "scoring=exact: set teacher to a state (e.g. the original) and scoring=exact"
            )
    return teacher_dir, parents


def start_engines(cfg: RecoverConfig, student_dir: Path, teacher_dir: Path | None) -> tuple:
    """The vLLM pools the run needs — student rollouts, teacher scoring — loading in the
    background while the Ray Train worker group starts: (rollout pool, teacher pool)."""
    from sdftlab.placement import engines
    from sdftlab.rollout.pool import RolloutPool

    engine_kwargs = {
        **cfg.rollout.engine_kwargs(cfg.rollout.gpus_per_actor),
        "max_logprobs": max(20, cfg.loss.topk or 0),  # top-k scoring
    }

    def pool(path: Path, seed: int, request: Any) -> RolloutPool:
        return RolloutPool.start(
            path, actors=request.count, cpus_per_actor=request.cpus,
            gpus_per_actor=request.gpus, seed=seed, engine_kwargs=engine_kwargs,
            weight_transfer=cfg.weight_transfer(), wait=False,
        )  # fmt: skip

    # the pools `sdftlab plan` counts (`placement.engines`): student rollouts, teacher scoring
    pools = {request.role: request for request in engines(cfg)}
    rollout_pool = teacher_pool = None
    if "rollout engine" in pools:
        rollout_pool = pool(student_dir, cfg.seed, pools["rollout engine"])
    if "teacher engine" in pools:  # ema: the student's own weights, then synced
        teacher_pool = pool(teacher_dir or student_dir, cfg.seed + 1000, pools["teacher engine"])
    return rollout_pool, teacher_pool


def describe(cfg: RecoverConfig, n_rows: int, tasks: list[str]) -> str:
    """The run in a line: teacher, mode, prompts, steps, loss, overlap."""
    return (
        f"teacher {cfg.teacher} ({cfg.teacher_context}), {cfg.mode}, {n_rows} prompts from "
        f"{', '.join(tasks)}; {cfg.steps} steps × {cfg.prompts_per_step} prompts, loss "
        f"{cfg.loss.kind}{'' if cfg.loss.topk is None else f' top-{cfg.loss.topk}'}"
        f"{', rollouts overlapped' if cfg.rollout.overlap else ''}"
    )


def recover(
    lineage: Lineage,
    student: str,
    dst: str,
    cfg: RecoverConfig,
    *,
    data_dir: Path | None = None,
    log: Callable[[str], None] = print,
    overwrite: bool = False,
    callbacks: Sequence[Any] = (),
) -> StateMeta:
    """Run SDFT from `student` and save the result as `dst`; returns its lineage metadata.
    `callbacks`: Ray Train callbacks (a sweep's trial passes Tune's, to see every report)."""
    from sdftlab.raycluster import ensure_ray

    teacher_dir, parents = check_recovery(lineage, student, dst, cfg, overwrite)
    student_dir = lineage.resolve(student)
    files = task_files(cfg, data_dir)
    n_rows = check_task_files(files)
    probe = live_probe(
        lineage, cfg.live_cka, reference=student if teacher_dir is None else cfg.teacher,
        data=cfg.data[0], data_dir=data_dir,
    )  # fmt: skip
    log(f"SDFT {student} → {dst}: {describe(cfg, n_rows, [t for t, _ in files])}")
    ensure_ray()
    rollout_pool, teacher_pool = start_engines(cfg, student_dir, teacher_dir)
    student_hash = lineage.meta(student).content_hash
    teacher_hash = (
        lineage.meta(cfg.teacher).content_hash if lineage.exists(cfg.teacher) else cfg.teacher
    )
    job = RecoverJob(cfg, str(student_dir), probe, str(teacher_dir) if teacher_dir else None,
                     teacher_hash == student_hash, rollout_pool, teacher_pool)  # fmt: skip
    try:
        meta, final, seconds = fit_and_save(
            partial(train_worker, SDFTMethod), job,
            run_name=run_name("sdft", dst, cfg, student_hash, teacher_hash),
            datasets={"train": prompt_dataset(files, str(student_dir), cfg)},
            callbacks=callbacks, lineage=lineage, name=dst, kind="sdft", parents=parents,
            overwrite=overwrite,
            config={"recover": cfg.model_dump(mode="json"), "student": student},
            metrics=lambda m, seconds: {
                "sdft/loss": m["loss"], "sdft/divergence": m["divergence"],
                "sdft/seconds": seconds, "sdft/tokens_per_s": m["tokens_per_s"],
                "sdft/sync_s": m.get("sync_s", 0.0), "sdft/step_s": m["step_s_mean"],
                "sdft/sync_fraction": m["sync_fraction"], "sdft/peak_rss_gb": m["peak_rss_gb"],
                "sdft/truncated": m["truncated"], "sdft/answer_format": m["answer_format"],
                "sdft/completion_len": m["completion_len"],
            },
        )  # fmt: skip
    finally:
        for pool in (rollout_pool, teacher_pool):
            if pool is not None:
                pool.shutdown()
    log(f"  saved {dst}: loss {final['loss']:.4f}, {seconds:.0f}s "
        f"({final['tokens_per_s']:.0f} tok/s)")  # fmt: skip
    return meta
