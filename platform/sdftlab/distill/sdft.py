"""SDFT recovery: Ray Data → rollout actors → teacher scoring → Ray Train updates.

Self-distillation fine-tuning (Shenfeld et al. 2026, "Self-distillation enables continual
learning", arXiv 2601.19897). Each step:

1. Ray Data streams task rows (prompt, demonstration) from the task files; a `map_batches`
   stage renders and tokenizes the student view (bare prompt) and the teacher view (prompt
   with the demonstration in `DEMO_TEMPLATE`, or the bare prompt with `teacher_context=bare`).
2. The student samples completions of its own prompts (on-policy): on the vLLM rollout actors
   (`rollout.engine=vllm`) or with transformers `generate` beside the trainer (`hf`).
3. The teacher scores the student's tokens from its own prompt: exactly, with a forward beside
   the trainer (full vocabulary, `scoring=exact`), or on teacher vLLM actors (top-k prompt
   log-probs, `scoring=vllm`). Teachers: a lineage state or path, `ema` of the student
   (rate `ema_rate`), or `live` (the student itself, with the demonstration in context).
4. Ray Train workers compute the per-token divergence (forward KL by default, full vocabulary
   or top-k, first `mask_first_k` tokens masked, capped importance ratio engine → trainer),
   plus an optional CKA term, and step (full FT, LoRA, or QLoRA on an NF4 student; DDP over
   `num_workers`).
5. Rank 0 pushes the new weights (or LoRA-merged layers) to the rollout actors in memory and
   logs the sync time, so the next rollouts are on-policy.

`mode=off_policy` is the two-stage small-model recipe's first stage: no rollouts; student and
an external (larger) teacher both see prompt + demonstration, KL on the demonstration tokens.

    sdftlab recover --student forgot --teacher expert --to recovered --data science tooluse
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator

from sdftlab.config import StrictModel, trust_remote_code
from sdftlab.data.loaders import iter_jsonl, row_to_example, task_source
from sdftlab.data.templates import DEMO_TEMPLATE, student_messages, teacher_messages
from sdftlab.degrade.sft import LoraSpec
from sdftlab.distill.losses import TopK, importance_weights, sdft_loss
from sdftlab.errors import ConfigError, DataError
from sdftlab.lineage import Lineage, StateMeta

SPECIAL_TEACHERS = ("ema", "live")


class RolloutSpec(StrictModel):
    engine: Literal["vllm", "hf"] = "vllm"
    actors: int = Field(1, gt=0, description="vLLM rollout actors")
    cpus_per_actor: float = Field(0.5, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    n: int = Field(1, gt=0, description="completions per prompt")
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(64, description="completion budget per rollout")

    @field_validator("max_new_tokens")
    @classmethod
    def _budget(cls, value: int) -> int:
        if value <= 0:
            raise ValueError(
                "the completion budget must be at least 1 token (the reference uses up to "
                "2048 on real models; 64 fits the tiny world)"
            )
        return value


class LossSpec(StrictModel):
    kind: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = Field(0.5, ge=0, le=1, description="JSD interpolation (0 = forward KL)")
    topk: int | None = Field(None, gt=0, description="top-k teacher tokens; None = full vocab")
    mask_first_k: int = Field(3, ge=0, description="completion tokens left out of the loss")
    importance_cap: float | None = Field(2.0, gt=0, description="None switches the ratio off")
    cka_weight: float = Field(0.0, ge=0, description="weight of (1 − CKA) in the loss")
    cka_layers: list[int] = Field([-1], description="hidden-state layers for the CKA term")


class RecoverConfig(StrictModel):
    """One recovery run: student state → new state, distilled from `teacher`."""

    teacher: str = Field("expert", description="lineage state, model path, `ema` or `live`")
    teacher_context: Literal["demonstration", "bare"] = "demonstration"
    template: str = DEMO_TEMPLATE
    ema_rate: float = Field(0.01, gt=0, le=1)
    mode: Literal["on_policy", "off_policy"] = "on_policy"
    data: list[str] = Field(["science", "tooluse"], min_length=1)
    scoring: Literal["exact", "vllm"] = "exact"
    rollout: RolloutSpec = RolloutSpec()
    loss: LossSpec = LossSpec()
    steps: int = Field(100, gt=0)
    prompts_per_step: int = Field(16, gt=0, description="global (split across workers)")
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(5, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    lora: LoraSpec | None = Field(None, description="adapters on the student (QLoRA if NF4)")
    num_workers: int = Field(1, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    threads_per_worker: int = Field(2, gt=0)
    checkpoint_every: int = Field(50, gt=0)
    log_every: int = Field(10, gt=0, description="progress line every this many steps")
    max_failures: int = Field(1, ge=-1)
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> RecoverConfig:
        if self.prompts_per_step % self.num_workers:
            raise ValueError(
                f"prompts_per_step={self.prompts_per_step} does not split over num_workers="
                f"{self.num_workers}; make it a multiple"
            )
        if "{demonstration}" not in self.template or "{prompt}" not in self.template:
            raise ValueError("template must contain {prompt} and {demonstration}")
        if self.scoring == "vllm" and self.loss.topk is None:
            raise ValueError("scoring=vllm gives top-k teacher log-probs: set loss.topk (e.g. 20)")
        if self.loss.cka_weight > 0 and self.scoring != "exact":
            raise ValueError("loss.cka_weight needs teacher hidden states: use scoring=exact")
        if self.teacher == "ema" and self.lora is not None:
            raise ValueError("teacher=ema averages full weights: use it without lora")
        if self.mode == "off_policy" and self.teacher in SPECIAL_TEACHERS:
            raise ValueError("mode=off_policy distils from another model: teacher must be a state")
        return self


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


def prompt_dataset(files: Sequence[tuple[str, Path]], tokenizer_dir: str, cfg: RecoverConfig):
    """A streaming Ray Dataset of encoded prompts over the task files (never all in the driver)."""
    import ray.data

    tasks = {path.name: task for task, path in files}
    if len(tasks) != len(files):
        raise ConfigError("data: two task files share a file name; give them distinct names")
    paths = [str(p) for _, p in files]
    # Light reads: the CPUs belong to the train workers and rollout actors.
    read = ray.data.read_text(paths, include_paths=True, num_cpus=0.25)
    return read.map_batches(
        PromptEncoder,
        fn_constructor_kwargs={
            "tokenizer_dir": tokenizer_dir,
            "tasks": tasks,
            "cfg": cfg.model_dump(mode="json"),
        },
        batch_size=64,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0.25,
    )


# ----------------------------------------------------------------------------- model passes


def pack(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Prompts left-padded to the longest and completions right-padded after them, so every
    row's completion starts in the same column: ids [B, P+C], attention mask [B, P+C], the
    completion mask [B, C], and P. The positions predicting completion tokens are then one
    slice, [P − 1, P − 1 + C), shared by the batch."""
    p_max = max(len(p) for p in prompts)
    c_max = max(1, max(len(c) for c in completions))
    ids_BL = torch.full((len(prompts), p_max + c_max), pad_id, dtype=torch.long)
    attn_BL = torch.zeros((len(prompts), p_max + c_max), dtype=torch.long)
    valid_BC = torch.zeros((len(prompts), c_max), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids_BL[i, p_max - len(p) : p_max + len(c)] = torch.tensor([*p, *c])
        attn_BL[i, p_max - len(p) : p_max + len(c)] = 1
        valid_BC[i, : len(c)] = True
    return ids_BL, attn_BL, valid_BC, p_max


def completion_forward(
    model: Any,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device,
    hidden_layers: Sequence[int] = (),
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Logits predicting each completion token [B, C, V], their mask [B, C], and the hidden
    states at those positions for `hidden_layers` ([B, C, d] each).

    The output layer runs on the completion positions only (`logits_to_keep`): a prompt's
    logits would cost B × P × V floats for nothing (1.2 GB a row for a 2k-token prompt over
    Qwen's 152k vocabulary)."""
    ids_BL, attn_BL, valid_BC, p_max = pack(prompts, completions, pad_id)
    c_max = valid_BC.shape[1]
    ids_BL, attn_BL = ids_BL.to(device), attn_BL.to(device)
    position_ids_BL = (attn_BL.cumsum(-1) - 1).clamp(min=0)  # left padding: count real tokens
    out = model(
        input_ids=ids_BL,
        attention_mask=attn_BL,
        position_ids=position_ids_BL,
        output_hidden_states=bool(hidden_layers),
        logits_to_keep=c_max + 1,  # positions P − 1 … P + C − 1; the last predicts nothing
    )
    logits_BCV = out.logits[:, :c_max]
    hidden = [out.hidden_states[layer][:, p_max - 1 : p_max - 1 + c_max] for layer in hidden_layers]
    return logits_BCV, valid_BC.to(device), hidden


def topk_tensors(rows: list[list[tuple[list[int], list[float]]]], c_max: int, k: int) -> TopK:
    """vLLM top-k rows → TopK [B, C, k] (padding positions get a harmless uniform filler)."""
    idx = torch.zeros((len(rows), c_max, k), dtype=torch.long)
    val = torch.full((len(rows), c_max, k), -float(np.log(k + 1)))
    for b, seq in enumerate(rows):
        for c, (ids, logps) in enumerate(seq[:c_max]):
            n = min(k, len(ids))
            idx[b, c, :n] = torch.tensor(ids[:n])
            val[b, c, :n] = torch.tensor(logps[:n])
    return TopK(idx, val)


def named_weights_for_sync(model: Any) -> dict[str, torch.Tensor]:
    """What the rollout engines need after a step, under Hugging Face parameter names.

    Full fine-tuning: every tensor of the state dict. LoRA: only the adapted layers, merged
    (W + (α/r)·B A) — the adapter's effect, without a round trip through disk.
    """
    try:
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        PeftModel = LoraLayer = ()

    if isinstance(model, PeftModel):
        out = {}
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and module.active_adapters:
                base = module.get_base_layer()
                delta = sum(module.get_delta_weight(a) for a in module.active_adapters)
                clean = name.removeprefix("base_model.model.")
                out[f"{clean}.weight"] = (base.weight.detach() + delta.detach()).float()
        return out
    # The tied head is sent too: vLLM's in-place reload re-creates the embedding tensor, and a
    # head left out would keep the old weights (measured: |Δ log p| 0.03 after a sync).
    return {n: p.detach() for n, p in model.state_dict().items()}


# ----------------------------------------------------------------------------- worker


def _build_student(cfg: RecoverConfig, path: str) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, use_safetensors=True, trust_remote_code=trust_remote_code()
    )
    quantized = getattr(model.config, "quantization_config", None) is not None
    if quantized:
        from sdftlab.degrade.quantize import qlora_model

        lora = cfg.lora or LoraSpec()
        return qlora_model(model, lora.r, lora.alpha, lora.dropout, lora.target_modules)
    if cfg.lora is not None:
        from peft import LoraConfig, get_peft_model

        return get_peft_model(
            model,
            LoraConfig(
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                target_modules=cfg.lora.target_modules,
                task_type="CAUSAL_LM",
            ),
        )
    return model.float()


def recover_worker_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: the SDFT loop, checkpoints and resume."""
    import ray.train
    import ray.train.torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sdftlab import train_utils as tu
    from sdftlab.allocator import tune_cpu_allocator
    from sdftlab.cka.stats import linear_cka_torch
    from sdftlab.rollout.engines import HFEngine, SamplingSettings

    cfg = RecoverConfig.model_validate(config["recover"])
    torch.set_num_threads(cfg.threads_per_worker)
    if not cfg.use_gpu:
        tune_cpu_allocator()  # reuse freed activations (the same arithmetic, faster steps)
    torch.manual_seed(cfg.seed)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tokenizer = AutoTokenizer.from_pretrained(config["student_dir"])
    pad_id = tokenizer.pad_token_id
    model = _build_student(cfg, config["student_dir"])
    device = ray.train.torch.get_device()
    tu.use_training_attention(model, device)

    teacher_model = None
    if cfg.scoring == "exact" and cfg.teacher not in SPECIAL_TEACHERS:
        teacher_model = AutoModelForCausalLM.from_pretrained(
            config["teacher_dir"], use_safetensors=True, trust_remote_code=trust_remote_code()
        ).to(device)
    if cfg.teacher == "ema":
        teacher_model = copy.deepcopy(model).to(device)
    if teacher_model is not None:
        teacher_model.eval().requires_grad_(False)
        tu.use_training_attention(teacher_model, device)

    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            tu.load_parameters(model, Path(d) / "trainable.safetensors")
            if cfg.teacher == "ema" and teacher_model is not None:
                tu.load_parameters(teacher_model, Path(d) / "ema.safetensors")
            start = tu.read_train_state(Path(d))["step"]
    model = ray.train.torch.prepare_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            tu.load_optimizer(optimizer, Path(d))

    rollout_pool = config.get("rollout_pool")
    teacher_pool = config.get("teacher_pool")
    bare = tu.unwrap(model)
    hf_engine = HFEngine(bare, tokenizer.eos_token_id, pad_id)
    for pool in (rollout_pool, teacher_pool):  # started while this worker group came up
        if pool is not None:
            up_s = pool.wait_ready()
            if rank == 0 and up_s:
                print(f"[sdft] vLLM engines up ({up_s:.0f}s to load)", flush=True)
    if rollout_pool is not None and start > 0 and rank == 0:
        rollout_pool.sync(named_weights_for_sync(bare))  # resumed: engines get trained weights
        if cfg.teacher == "ema" and teacher_pool is not None and teacher_model is not None:
            teacher_pool.sync(named_weights_for_sync(teacher_model))

    per_worker = cfg.prompts_per_step // world
    shard = ray.train.get_dataset_shard("train")
    batches = tu.cycle_epochs(
        lambda: shard.iter_batches(
            batch_size=per_worker,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=8 * per_worker,
            local_shuffle_seed=cfg.seed,
        )
    )
    for _ in range(start):  # a resumed run continues with the prompts it had not seen
        next(batches)
    sampling = SamplingSettings(
        n=cfg.rollout.n,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        max_new_tokens=cfg.rollout.max_new_tokens,
    )
    hidden_layers = cfg.loss.cka_layers if cfg.loss.cka_weight > 0 else []
    busy_s, sync_total_s, tokens_seen, history = 0.0, 0.0, 0, []
    model.train()
    for step in range(start, cfg.steps):
        timings: dict[str, float] = {}
        for group in optimizer.param_groups:
            group["lr"] = tu.warmup_cosine(step, cfg.steps, cfg.warmup_steps, cfg.lr)
        t0 = time.perf_counter()
        batch = next(batches)
        timings["data_s"] = time.perf_counter() - t0
        student_prompts = [list(x) for x in batch["student"]]
        teacher_prompts = [list(x) for x in batch["teacher"]]

        # 1. completions: on-policy samples of the student, or the demonstrations (off-policy)
        t0 = time.perf_counter()
        if cfg.mode == "off_policy":
            completions = [list(x) for x in batch["demo"]]
            engine_logp = None
            student_prompts = teacher_prompts  # both sides see prompt + demonstration
        else:
            sampling_step = SamplingSettings(
                **{**sampling.__dict__, "seed": cfg.seed + step * 997 + rank}
            )
            rollouts = (
                rollout_pool.generate(student_prompts, sampling_step)
                if rollout_pool is not None
                else hf_engine.generate(student_prompts, sampling_step)
            )
            repeat = cfg.rollout.n
            student_prompts = [p for p in student_prompts for _ in range(repeat)]
            teacher_prompts = [p for p in teacher_prompts for _ in range(repeat)]
            completions = [r.token_ids for r in rollouts]
            engine_logp = [r.logprobs for r in rollouts]
        keep = [i for i, c in enumerate(completions) if c]
        if not keep:
            raise RuntimeError("every rollout was empty; raise rollout.max_new_tokens")
        student_prompts = [student_prompts[i] for i in keep]
        teacher_prompts = [teacher_prompts[i] for i in keep]
        completions = [completions[i] for i in keep]
        timings["rollout_s"] = time.perf_counter() - t0

        # 2. teacher log-probs of the same completion tokens, from the teacher's own prompt
        t0 = time.perf_counter()
        teacher_hidden: list[torch.Tensor] = []
        with torch.no_grad():
            if cfg.scoring == "vllm":
                pool = teacher_pool if cfg.teacher != "live" else rollout_pool
                rows = pool.score(
                    [p + c for p, c in zip(teacher_prompts, completions, strict=True)],
                    [len(p) for p in teacher_prompts],
                    cfg.loss.topk,
                )
                c_max = max(len(c) for c in completions)
                top = topk_tensors(rows, c_max, cfg.loss.topk)
                teacher: torch.Tensor | TopK = TopK(
                    top.indices_BTK.to(device), top.logprobs_BTK.to(device)
                )
            else:
                scorer = teacher_model if teacher_model is not None else bare
                was_training = scorer.training
                scorer.eval()
                t_logits_BCV, _, teacher_hidden = completion_forward(
                    scorer, teacher_prompts, completions, pad_id, device, hidden_layers
                )
                scorer.train(was_training)
                teacher = F.log_softmax(t_logits_BCV.float(), -1)
                if cfg.loss.topk is not None:
                    values, indices = teacher.topk(cfg.loss.topk, dim=-1)
                    teacher = TopK(indices, values)
        timings["teacher_s"] = time.perf_counter() - t0

        # 3. student forward on its own prompt + completion; loss; step
        t0 = time.perf_counter()
        logits_BCV, valid_BC, student_hidden = completion_forward(
            model, student_prompts, completions, pad_id, device, hidden_layers
        )
        weights_BT = None
        if engine_logp is not None and cfg.loss.importance_cap is not None:
            logp_sampled = (
                F.log_softmax(logits_BCV.float(), -1)
                .gather(-1, _completion_ids(completions, logits_BCV.shape[1], device).unsqueeze(-1))
                .squeeze(-1)
            )
            engine_BC = _pad_floats([engine_logp[i] for i in keep], logits_BCV.shape[1], device)
            weights_BT = importance_weights(logp_sampled, engine_BC, cfg.loss.importance_cap)
        loss, stats = sdft_loss(
            logits_BCV,
            teacher,
            valid_BC,
            kind=cfg.loss.kind,
            beta=cfg.loss.beta,
            mask_first_k=cfg.loss.mask_first_k if cfg.mode == "on_policy" else 0,
            weights_BT=weights_BT,
        )
        if hidden_layers:
            ckas = [
                linear_cka_torch(s[valid_BC].float(), t[valid_BC].float())
                for s, t in zip(student_hidden, teacher_hidden, strict=True)
            ]
            cka = torch.stack(ckas).mean()
            loss = loss + cfg.loss.cka_weight * (1 - cka)
            stats["cka"] = float(cka)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if cfg.teacher == "ema" and teacher_model is not None:
            with torch.no_grad():  # θ_T ← (1 − r) θ_T + r θ_S
                for p_t, p_s in zip(teacher_model.parameters(), bare.parameters(), strict=True):
                    p_t.lerp_(p_s, cfg.ema_rate)
        timings["train_s"] = time.perf_counter() - t0

        # 4. new weights to the rollout (and EMA teacher) engines, in memory
        timings["sync_s"] = 0.0
        if rank == 0 and rollout_pool is not None:
            timings["sync_s"] = rollout_pool.sync(named_weights_for_sync(bare))
            if cfg.teacher == "ema" and teacher_pool is not None and teacher_model is not None:
                timings["sync_s"] += teacher_pool.sync(named_weights_for_sync(teacher_model))
        if world > 1:
            torch.distributed.barrier()

        tokens_seen += int(valid_BC.sum())
        busy_s += sum(timings.values())
        sync_total_s += timings["sync_s"]
        history.append(float(loss))
        done = step + 1
        metrics = {
            "step": done,
            "loss": float(np.mean(history[-10:])),
            "tokens_per_s": tokens_seen * world / max(busy_s, 1e-9),  # completion tokens
            "step_s_mean": busy_s / (done - start),
            "sync_fraction": sync_total_s / max(busy_s, 1e-9),  # of the step time, this run
            "lr": optimizer.param_groups[0]["lr"],
            "completion_len": float(np.mean([len(c) for c in completions])),
            **stats,
            **timings,
        }
        if rank == 0 and (done % cfg.log_every == 0 or done == cfg.steps or done == start + 1):
            print(progress_line(metrics, cfg.steps), flush=True)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            with tempfile.TemporaryDirectory() as d:
                if rank == 0:
                    ema = (
                        {"ema": teacher_model}
                        if cfg.teacher == "ema" and teacher_model is not None
                        else {}
                    )
                    tu.save_checkpoint(
                        bare, tokenizer, optimizer, Path(d), done,
                        final=done == cfg.steps, extra=ema,
                    )  # fmt: skip
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
                else:
                    ray.train.report(metrics)
        elif done % cfg.log_every == 0:  # a report is a round trip to the controller
            ray.train.report(metrics)
        tu.kill_point(done)


def progress_line(m: dict[str, Any], steps: int) -> str:
    """One progress line: step, loss, divergence, throughput, importance ratio, sync time."""
    return (
        f"[sdft] step {m['step']:4d}/{steps}  loss {m['loss']:.4f}  "
        f"kl {m['divergence']:.4f}  {m['tokens_per_s']:6.0f} tok/s  "
        f"ratio {m.get('importance_ratio', 1.0):.3f}  rollout {m['rollout_s']:.2f}s  "
        f"teacher {m['teacher_s']:.2f}s  train {m['train_s']:.2f}s  "
        f"sync {m['sync_s'] * 1e3:.0f}ms  data {m['data_s']:.2f}s"
    )


def _completion_ids(completions: Sequence[Sequence[int]], c_max: int, device) -> torch.Tensor:
    ids = torch.zeros((len(completions), c_max), dtype=torch.long)
    for i, c in enumerate(completions):
        ids[i, : len(c)] = torch.tensor(c)
    return ids.to(device)


def _pad_floats(rows: Sequence[Sequence[float]], width: int, device) -> torch.Tensor:
    out = torch.zeros((len(rows), width))
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out.to(device)


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


def recover(
    lineage: Lineage,
    student: str,
    dst: str,
    cfg: RecoverConfig,
    *,
    data_dir: Path | None = None,
    log: Callable[[str], None] = print,
    overwrite: bool = False,
) -> StateMeta:
    """Run SDFT from `student` and save the result as `dst`; returns its lineage metadata."""
    from sdftlab import train_utils as tu
    from sdftlab.degrade.quantize import is_quantized
    from sdftlab.raycluster import ensure_ray
    from sdftlab.rollout.pool import RolloutPool

    # Everything a user can get wrong is checked before any actor starts.
    lineage.require(student)
    teacher_dir = resolve_teacher(lineage, cfg.teacher)
    parents = [student]
    if lineage.exists(cfg.teacher) and cfg.teacher != student:
        parents.append(cfg.teacher)
    lineage.check_new(dst, parents=parents, overwrite=overwrite)
    check_same_vocabulary(lineage, student, teacher_dir)
    student_dir = lineage.resolve(student)
    if is_quantized(student_dir):
        if cfg.rollout.engine == "vllm" and cfg.mode == "on_policy":
            raise ConfigError(
                f"rollout.engine=vllm: student {student!r} is NF4 (bitsandbytes), which the "
                "vLLM rollout engine does not serve here; set rollout.engine=hf"
            )
        if cfg.teacher == "live" or cfg.scoring == "vllm":
            raise ConfigError(
                "an NF4 student is distilled from an unquantized teacher state with "
                "scoring=exact: set teacher to a state (e.g. the original) and scoring=exact"
            )
    files = task_files(cfg, data_dir)
    n_rows = check_task_files(files)
    log(
        f"SDFT {student} → {dst}: teacher {cfg.teacher} ({cfg.teacher_context}), {cfg.mode}, "
        f"{n_rows} prompts from {', '.join(t for t, _ in files)}; {cfg.steps} steps × "
        f"{cfg.prompts_per_step} prompts, loss {cfg.loss.kind}"
        f"{'' if cfg.loss.topk is None else f' top-{cfg.loss.topk}'}"
    )

    ensure_ray()
    rollout_pool = teacher_pool = None
    try:
        if cfg.mode == "on_policy" and cfg.rollout.engine == "vllm":
            rollout_pool = RolloutPool.start(
                student_dir,
                actors=cfg.rollout.actors,
                cpus_per_actor=cfg.rollout.cpus_per_actor,
                gpus_per_actor=cfg.rollout.gpus_per_actor,
                seed=cfg.seed,
                engine_kwargs={"max_logprobs": max(20, cfg.loss.topk or 0)},  # live scoring
                wait=False,  # the engines load while the worker group starts
            )
        if cfg.scoring == "vllm" and cfg.teacher != "live":
            teacher_pool = RolloutPool.start(
                teacher_dir or student_dir,  # ema starts from the student
                actors=cfg.rollout.actors,
                cpus_per_actor=cfg.rollout.cpus_per_actor,
                gpus_per_actor=cfg.rollout.gpus_per_actor,
                seed=cfg.seed + 1000,
                engine_kwargs={"max_logprobs": max(20, cfg.loss.topk or 0)},
                wait=False,
            )
        trainer = tu.make_trainer(
            recover_worker_loop,
            {
                "recover": cfg.model_dump(mode="json"),
                "student_dir": str(student_dir),
                "teacher_dir": str(teacher_dir) if teacher_dir else None,
                "rollout_pool": rollout_pool,
                "teacher_pool": teacher_pool,
            },
            run_name=tu.run_name(
                "sdft",
                dst,
                cfg,
                lineage.meta(student).content_hash,
                lineage.meta(cfg.teacher).content_hash
                if lineage.exists(cfg.teacher)
                else cfg.teacher,
            ),
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            cpus_per_worker=cfg.cpus_per_worker,
            max_failures=cfg.max_failures,
            datasets={"train": prompt_dataset(files, str(student_dir), cfg)},
        )
        t0 = time.perf_counter()
        result = trainer.fit()
        seconds = time.perf_counter() - t0
    finally:
        for pool in (rollout_pool, teacher_pool):
            if pool is not None:
                pool.shutdown()
    if result.checkpoint is None:
        raise RuntimeError(f"SDFT finished without a checkpoint: {result.error}")
    m = result.metrics
    with result.checkpoint.as_directory() as d:
        meta = lineage.save_dir(
            dst,
            Path(d) / "model",
            kind="sdft",
            parents=parents,
            overwrite=overwrite,
            config={"recover": cfg.model_dump(mode="json"), "student": student},
            metrics={
                "sdft/loss": m["loss"],
                "sdft/divergence": m["divergence"],
                "sdft/seconds": seconds,
                "sdft/tokens_per_s": m["tokens_per_s"],
                "sdft/sync_s": m.get("sync_s", 0.0),
                "sdft/step_s": m["step_s_mean"],
                "sdft/sync_fraction": m["sync_fraction"],
            },
        )
    log(f"  saved {dst}: loss {m['loss']:.4f}, {seconds:.0f}s ({m['tokens_per_s']:.0f} tok/s)")
    return meta
