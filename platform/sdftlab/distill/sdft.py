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
5. Rank 0 pushes the new weights (or LoRA-merged layers) to the rollout actors in memory and
   logs the sync time, so the next rollouts are on-policy (or one step behind, overlapped).
6. Every `live_cka.every` steps (and at the last) rank 0 measures CKA to the reference state
   on a fixed probe (`cka.live`); each measurement is a report, so a sweep's ASHA sees it.

This module is the Ray plumbing around those components — the data, the worker loop
(`recover_worker_loop`: shard, resume, rollouts, step, sync, reports, checkpoints) and the
driver (`recover`: checks, engines, the `TorchTrainer`, the new state); the config is in
`distill/config.py`, the rows in `distill/batch.py`.

`mode=off_policy` is the two-stage small-model recipe's first stage: no rollouts; student and
an external (larger) teacher both see prompt + demonstration, KL on the demonstration tokens.

    sdftlab recover --student forgot --teacher expert --to recovered --data science tooluse
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdftlab import sharding
from sdftlab.cka.live import due, live_cka_text
from sdftlab.config import trust_remote_code
from sdftlab.data.loaders import iter_jsonl, row_to_example, task_source
from sdftlab.data.templates import student_messages, teacher_messages
from sdftlab.distill.batch import RolloutBatch, from_demonstrations, from_rollouts
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
from sdftlab.rollout.engines import SamplingSettings
from sdftlab.rollout.pool import named_weights_for_sync
from sdftlab.specs import LoraSpec, gpu_share

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


def build_student(cfg: RecoverConfig, path: str, device: Any) -> Any:
    """The trained model: full weights in fp32, LoRA adapters, or QLoRA on an NF4 state."""
    from transformers import AutoModelForCausalLM

    from sdftlab import train_utils as tu

    model = AutoModelForCausalLM.from_pretrained(
        path, use_safetensors=True, trust_remote_code=trust_remote_code()
    )
    tu.use_training_attention(model, device)
    if cfg.memory.gradient_checkpointing:
        tu.enable_checkpointing(model)
    if getattr(model.config, "quantization_config", None) is not None:
        from sdftlab.models import qlora_model

        lora = cfg.lora or LoraSpec()
        return qlora_model(model, lora.r, lora.alpha, lora.dropout, lora.target_modules)
    return model.float() if cfg.lora is None else tu.with_lora(model, cfg.lora)


def build_teacher(
    cfg: RecoverConfig, student: Any, config: dict[str, Any], pad_id: int, device: Any
) -> Teacher:
    """The step's teacher for `cfg.teacher` and `cfg.scoring` (`teachers` has the table)."""
    from transformers import AutoModelForCausalLM

    from sdftlab import train_utils as tu

    ema = (
        ema_teacher(student, cfg.ema_rate, pad_id, cfg.loss.topk) if cfg.teacher == "ema" else None
    )
    if cfg.scoring == "vllm":
        pool = config["rollout_pool"] if cfg.teacher == "live" else config["teacher_pool"]
        return VLLMTeacher(pool, cfg.loss.topk or 0, ema)
    if ema is not None:
        return ema
    if cfg.teacher == "live":
        return live_teacher(student, pad_id, cfg.loss.topk)
    if config.get("teacher_is_student") and hasattr(student, "disable_adapter"):
        return adapters_off_teacher(student, pad_id, cfg.loss.topk)  # no second model
    model = AutoModelForCausalLM.from_pretrained(
        config["teacher_dir"], use_safetensors=True, trust_remote_code=trust_remote_code()
    ).to(device)
    tu.use_training_attention(model, device)
    return frozen_teacher(model, pad_id, cfg.loss.topk)


def teacher_modules(teacher: Teacher) -> dict[str, torch.nn.Module]:
    """The teacher's own weights a checkpoint must keep (the EMA average), by file name."""
    ema = teacher.ema if isinstance(teacher, VLLMTeacher) else teacher
    if isinstance(ema, ModelTeacher) and ema.update is not None:
        return {"ema": ema.model}
    return {}


class RolloutStream:
    """A worker's batch for each step: its prompts (`prompt_batches`) and the student's
    completions of them, sampled on the vLLM pool or with transformers `generate` beside the
    trainer (`engine`), or the demonstrations (off-policy).

    Synchronous by default: step t's completions are sampled on the weights step t trains.
    With `rollout.overlap=1`, step t+1's completions are asked for before step t trains, so
    the engines sample them on step t's weights while the worker trains (one step
    off-policy, as verl, OpenRLHF and NeMo-RL overlap; the importance ratio engine → trainer
    corrects it, and `policy_drift` shows it)."""

    def __init__(
        self, cfg: RecoverConfig, engine: Any, batches: Iterator[dict[str, Any]], rank: int,
        log: StepLog,
    ) -> None:  # fmt: skip
        self.cfg, self.engine, self.batches, self.rank, self.log = cfg, engine, batches, rank, log
        self.pending: Callable[[], RolloutBatch] | None = None

    def take(self, step: int) -> RolloutBatch:
        current = self.pending or self._ask(step)
        ahead = self.cfg.rollout.overlap and step + 1 < self.cfg.steps
        self.pending = self._ask(step + 1) if ahead else None
        self.log.start("rollout_s")
        return current()

    def _ask(self, step: int) -> Callable[[], RolloutBatch]:
        """Step `step`'s prompts now; its batch when called (the vLLM pool starts sampling
        at once, `generate` beside the trainer when called)."""
        cfg = self.cfg
        self.log.start("data_s")
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
        if hasattr(self.engine, "submit"):
            pending = self.engine.submit(student, sampling)
            return lambda: from_rollouts(student, teacher, pending.result(), cfg.rollout.n)
        return lambda: from_rollouts(
            student, teacher, self.engine.generate(student, sampling), cfg.rollout.n
        )


def recover_worker_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: Ray Train plumbing around `sdft_step` — the data shard,
    resume, rollouts, weight sync, reports and checkpoints."""
    import ray.train
    import ray.train.torch
    from transformers import AutoTokenizer

    from sdftlab import train_utils as tu
    from sdftlab.rollout.engines import HFEngine

    cfg = RecoverConfig.model_validate(config["recover"])
    tu.ray_train_logs_to_files()
    torch.set_num_threads(cfg.threads_per_worker)
    torch.manual_seed(cfg.seed)
    rank, world = sharding.world()
    device = ray.train.torch.get_device()
    tokenizer = AutoTokenizer.from_pretrained(config["student_dir"])
    model = build_student(cfg, config["student_dir"], device)
    tu.use_cpu_allocator(cfg.memory, model, device)  # the same arithmetic either way
    teacher = build_teacher(cfg, model, config, tokenizer.pad_token_id, device)
    live = tu.live_cka(
        config["live_cka"], tokenizer, device, resident_models(config, model, teacher),
        everywhere=cfg.memory.fsdp,
    )  # fmt: skip
    start, checkpoint, live_history = 0, ray.train.get_checkpoint(), []
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            tu.load_parameters(model, Path(d) / "trainable.safetensors")
            for file, module in teacher_modules(teacher).items():
                tu.load_parameters(module, Path(d) / f"{file}.safetensors")
            start, live_history = tu.read_train_state(Path(d))["step"], tu.read_live_cka(Path(d))
    model = sharding.prepare(model, cfg.memory.fsdp, cfg.memory.autocast_on(cfg.use_gpu, False))
    bare = tu.unwrap(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            tu.load_optimizer(model, optimizer, Path(d))
    pool = config.get("rollout_pool")
    engine = pool or HFEngine(bare, tokenizer.eos_token_id, tokenizer.pad_token_id,
                              synced=cfg.memory.fsdp)  # fmt: skip
    wait_for_engines(config, cfg, teacher, bare, rank, resumed=start > 0)
    log = StepLog(cfg, world, start, live_history)
    rollouts = RolloutStream(cfg, engine, prompt_batches(cfg, skip=start), rank, log)
    model.train()
    for step in range(start, cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = tu.warmup_cosine(step, cfg.steps, cfg.warmup_steps, cfg.lr)
        batch = rollouts.take(step)
        log.start("train_s")
        optimizer.zero_grad(set_to_none=True)
        result = sdft_step(batch, model, teacher, cfg, pad_id=tokenizer.pad_token_id, device=device)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        sync_s = teacher.after_step(bare, rank)
        log.start("sync_s")
        push_weights(pool, bare, rank)  # the next rollouts are on-policy (or one behind)
        if world > 1:
            torch.distributed.barrier()
        log.start("cka_s")  # the live CKA probe: its own phase, not the weight sync's
        measure = due(cfg.live_cka.every, step + 1, cfg.steps)  # asked on every rank
        cka = live.measure(bare) if measure and live is not None else {}
        metrics = log.finish(step, result, batch, optimizer, extra_sync_s=sync_s, live=cka)
        save = (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps
        if save:
            report_checkpoint(metrics, bare, tokenizer, optimizer, teacher, step + 1, cfg,
                              log.live_history)  # fmt: skip
        elif (step + 1) % cfg.log_every == 0 or measure:  # a report: a controller round trip
            ray.train.report(metrics)
        tu.kill_point(step + 1)


def resident_models(config: dict[str, Any], student: Any, teacher: Teacher) -> dict[str, Any]:
    """The models in this worker that hold a state's weights, by directory: the student before
    its first step, a frozen teacher (live CKA captures its reference from them; a teacher
    that is the LoRA student's own state is the student, adapters still zero)."""
    out = {config["student_dir"]: student}
    if isinstance(teacher, ModelTeacher) and teacher.update is None and config["teacher_dir"]:
        out[config["teacher_dir"]] = teacher.model
    return out


def wait_for_engines(
    config: dict[str, Any],
    cfg: RecoverConfig,
    teacher: Teacher,
    bare: Any,
    rank: int,
    resumed: bool,
) -> None:
    """Block until the vLLM engines (started beside the worker group) are up; after a resume,
    give them the trained weights (and the EMA average) before the first rollout."""
    pools = [p for p in (config.get("rollout_pool"), config.get("teacher_pool")) if p is not None]
    for pool in pools:
        up_s = pool.wait_ready()
        if rank == 0 and up_s:
            print(f"[sdft] vLLM engines up ({up_s:.0f}s to load)", flush=True)
    if not resumed:
        return
    push_weights(config.get("rollout_pool"), bare, rank)
    if rank == 0 and config.get("teacher_pool") is not None:
        for module in teacher_modules(teacher).values():
            config["teacher_pool"].sync(named_weights_for_sync(module))


def prompt_batches(cfg: RecoverConfig, skip: int) -> Iterator[dict[str, Any]]:
    """This worker's prompts, `prompts_per_step / world` a step — its rows of each global
    batch, which every worker reads in the same order — epoch after epoch; a resumed run skips
    the `skip` steps it had done, so it continues with the prompts it had not seen."""
    import ray.train

    from sdftlab import train_utils as tu

    rank, size = sharding.world()
    shard = ray.train.get_dataset_shard("train")
    batches = tu.cycle_epochs(
        lambda: shard.iter_batches(
            batch_size=cfg.prompts_per_step,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=8 * cfg.prompts_per_step,  # the same order on every worker
            local_shuffle_seed=cfg.seed,
        ),
        skip=skip,
    )
    return (sharding.rank_rows(batch, rank, size) for batch in batches)


def push_weights(pool: Any, model: Any, rank: int) -> None:
    """The student's weights to the rollout engines (none: nothing). A sharded student is
    gathered first, on every rank; rank 0 sends."""
    if pool is None:
        return
    state = sharding.full_state(model) if sharding.is_sharded(model) else None
    if rank == 0:
        pool.sync(named_weights_for_sync(model, state))


class StepLog:
    """Timings of a step's phases, the run's running figures, and the progress line."""

    def __init__(
        self, cfg: RecoverConfig, world: int, start: int, live_history: list[dict[str, float]]
    ) -> None:
        self.cfg, self.world, self.first = cfg, world, start
        self.live_history = live_history  # the live CKA measurements, step by step
        self.busy_s = self.sync_total_s = 0.0
        self.tokens, self.history = 0, []
        self.timings: dict[str, float] = {}
        self._phase, self._t0 = "", 0.0

    def start(self, phase: str) -> None:
        """End the running phase and start `phase`."""
        now = time.perf_counter()
        if self._phase:
            self.timings[self._phase] = now - self._t0
        self._phase, self._t0 = phase, now

    def finish(
        self,
        step: int,
        result: StepResult,
        batch: RolloutBatch,
        optimizer: Any,
        extra_sync_s: float,
        live: dict[str, float],
    ) -> dict[str, Any]:
        from sdftlab import train_utils as tu

        self.start("")
        t = self.timings
        t["sync_s"] += extra_sync_s  # the EMA teacher's engines
        t["train_s"] -= extra_sync_s
        t["teacher_s"] = result.stats["teacher_s"]
        self.busy_s += sum(v for k, v in t.items() if k != "teacher_s")
        self.sync_total_s += t["sync_s"]
        self.tokens += sum(len(c) for c in batch.completions)
        self.history.append(result.loss)
        done = step + 1
        metrics = {
            "step": done,
            "loss": float(np.mean(self.history[-10:])),
            "tokens_per_s": self.tokens * self.world / max(self.busy_s, 1e-9),  # completions
            "step_s_mean": self.busy_s / (done - self.first),
            "sync_fraction": self.sync_total_s / max(self.busy_s, 1e-9),  # of the step time
            "lr": optimizer.param_groups[0]["lr"],
            "completion_len": float(np.mean([len(c) for c in batch.completions])),
            "peak_rss_gb": tu.peak_rss_gb(),
            **result.stats,
            **t,
            **live,
        }
        if live:
            self.live_history.append({"step": done, **live})
        first_or_last = done in (self.first + 1, self.cfg.steps)
        if done % self.cfg.log_every == 0 or first_or_last:
            print(progress_line(metrics, self.cfg.steps), flush=True)
        return metrics


def report_checkpoint(
    metrics: dict[str, Any],
    bare: Any,
    tokenizer: Any,
    optimizer: Any,
    teacher: Teacher,
    done: int,
    cfg: RecoverConfig,
    live_history: list[dict[str, float]],
) -> None:
    """Report with a checkpoint (every rank gathers a sharded state, rank 0 writes it:
    safetensors, the EMA average beside, the live CKA measurements so far)."""
    import ray.train

    from sdftlab import train_utils as tu

    with tempfile.TemporaryDirectory() as d:
        wrote = tu.save_checkpoint(
            bare, tokenizer, optimizer, Path(d), done,
            final=done == cfg.steps, extra=teacher_modules(teacher), live_cka=live_history,
        )  # fmt: skip
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if wrote
                         else None)  # fmt: skip


def progress_line(m: dict[str, Any], steps: int) -> str:
    """One progress line: step, loss, divergence, live CKA, throughput, importance ratio,
    phase times."""
    drift = f" drift {m['policy_drift']:.3f}" if "policy_drift" in m else ""
    return (
        f"[sdft] step {m['step']:4d}/{steps}  loss {m['loss']:.4f}  "
        f"kl {m['divergence']:.4f}{live_cka_text(m)}  {m['tokens_per_s']:6.0f} tok/s  "
        f"ratio {m.get('importance_ratio', 1.0):.3f}{drift}  rollout {m['rollout_s']:.2f}s  "
        f"teacher {m['teacher_s']:.2f}s  train {m['train_s']:.2f}s  "
        f"sync {m['sync_s'] * 1e3:.0f}ms  data {m['data_s']:.2f}s  "
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
    from transformers import AutoConfig, AutoTokenizer

    s_tok = lineage.load_tokenizer(student)
    t_tok = AutoTokenizer.from_pretrained(teacher_dir, trust_remote_code=trust_remote_code())
    s_cfg = AutoConfig.from_pretrained(
        lineage.resolve(student), trust_remote_code=trust_remote_code()
    )
    t_cfg = AutoConfig.from_pretrained(teacher_dir, trust_remote_code=trust_remote_code())
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
    from sdftlab.rollout.pool import RolloutPool

    engine_kwargs = {
        "max_logprobs": max(20, cfg.loss.topk or 0),  # top-k scoring
        "dtype": cfg.rollout.dtype,
        "kv_cache_bytes": int(cfg.rollout.kv_cache_gb * 2**30),
        "max_model_len": cfg.rollout.max_model_len,
        "gpu_memory_utilization": gpu_share(
            cfg.rollout.gpu_memory_utilization, cfg.rollout.gpus_per_actor
        ),
    }

    def pool(path: Path, seed: int) -> RolloutPool:
        return RolloutPool.start(
            path, actors=cfg.rollout.actors, cpus_per_actor=cfg.rollout.cpus_per_actor,
            gpus_per_actor=cfg.rollout.gpus_per_actor, seed=seed, engine_kwargs=engine_kwargs,
            weight_transfer=cfg.weight_transfer(), wait=False,
        )  # fmt: skip

    rollout_pool = teacher_pool = None
    if cfg.mode == "on_policy" and cfg.rollout.engine == "vllm":
        rollout_pool = pool(student_dir, cfg.seed)
    if cfg.scoring == "vllm" and cfg.teacher != "live":
        teacher_pool = pool(teacher_dir or student_dir, cfg.seed + 1000)  # ema: the student
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
    from sdftlab import train_utils as tu
    from sdftlab.raycluster import ensure_ray

    teacher_dir, parents = check_recovery(lineage, student, dst, cfg, overwrite)
    student_dir = lineage.resolve(student)
    files = task_files(cfg, data_dir)
    n_rows = check_task_files(files)
    probe = tu.live_cka_probe(
        lineage, cfg.live_cka, reference=student if teacher_dir is None else cfg.teacher,
        data=cfg.data[0], data_dir=data_dir,
    )  # fmt: skip
    log(f"SDFT {student} → {dst}: {describe(cfg, n_rows, [t for t, _ in files])}")
    ensure_ray()
    pools = start_engines(cfg, student_dir, teacher_dir)
    teacher_hash = (
        lineage.meta(cfg.teacher).content_hash if lineage.exists(cfg.teacher) else cfg.teacher
    )
    try:
        trainer = tu.make_trainer(
            recover_worker_loop,
            {
                "recover": cfg.model_dump(mode="json"),
                "student_dir": str(student_dir),
                "teacher_dir": str(teacher_dir) if teacher_dir else None,
                "teacher_is_student": teacher_hash == lineage.meta(student).content_hash,
                "rollout_pool": pools[0],
                "teacher_pool": pools[1],
                "live_cka": probe,
            },
            run_name=tu.run_name(
                "sdft", dst, cfg, lineage.meta(student).content_hash, teacher_hash
            ),
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            cpus_per_worker=cfg.cpus_per_worker,
            max_failures=cfg.max_failures,
            datasets={"train": prompt_dataset(files, str(student_dir), cfg)},
            callbacks=callbacks,
        )
        t0 = time.perf_counter()
        result = trainer.fit()
        seconds = time.perf_counter() - t0
    finally:
        for pool in pools:
            if pool is not None:
                pool.shutdown()
    if result.checkpoint is None:
        raise RuntimeError(f"SDFT finished without a checkpoint: {result.error}")
    m = result.metrics
    with result.checkpoint.as_directory() as d:
        meta = lineage.save_dir(
            dst, Path(d) / "model", kind="sdft", parents=parents, overwrite=overwrite,
            config={"recover": cfg.model_dump(mode="json"), "student": student},
            metrics={
                "sdft/loss": m["loss"], "sdft/divergence": m["divergence"],
                "sdft/seconds": seconds, "sdft/tokens_per_s": m["tokens_per_s"],
                "sdft/sync_s": m.get("sync_s", 0.0), "sdft/step_s": m["step_s_mean"],
                "sdft/sync_fraction": m["sync_fraction"], "sdft/peak_rss_gb": m["peak_rss_gb"],
                **tu.live_cka_metrics(m),
            },
        )  # fmt: skip
    log(f"  saved {dst}: loss {m['loss']:.4f}, {seconds:.0f}s ({m['tokens_per_s']:.0f} tok/s)")
    return meta
