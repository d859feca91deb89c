"""`sdftlab plan CONFIG`: each stage's memory per device and the devices it needs, before any
work; a stage that cannot fit is refused with one message naming it, the figure and a fix.

The plan reads the model's architecture, never its weights: the tiny world's config, an
imported model's `config.json` (or its GGUF header), or — for a model not on this machine, as
a cluster's paths are not — the published configs of the models the project's configs name
(`KNOWN`). Each training worker is planned as the sum of what it holds at its peak:

| part | bytes |
|---|---|
| weights (fp32 masters; NF4 layers of a quantized state: ½ byte + scales) | 4 P / S |
| bf16 weights | autocast: 2 T (its cast cache); FSDP: two layers gathered |
| gradients, AdamW moments, the step's temporaries | (4 + 8 + 4) T / S |
| activations, a micro-batch of n tokens | n · L · a (checkpointing: n · (L · 4h + a)) |
| logits, one chunk | 3 · 4 · chunk · V (chunk ≤ the head's tokens: SDFT's completions alone) |
| live CKA probe (`live_cka.every` > 0; host memory) | (L+1) h t (4 rows + 12 batch) + 24 (L+1) h² |
| teacher | a frozen copy: 4 P (not sharded); live / adapters off / vLLM scoring: 0 |
| runtime | 1.0 GiB on CPU (Python, torch, transformers, a Ray worker), 1.5 GiB on a GPU |

An SDFT micro-batch's tokens are its rows × (the student's prompt + `max_new_tokens`): the
longest prompts of the stage's task files, tokenized (`prompt_tokens`), where the files and a
tokenizer are on this machine, else 512. The probe's rows are t ≤ 512 tokens each.
P parameters, T trainable ones, S = workers when `memory.fsdp` (else 1), L layers, h hidden,
a = 16 h + e (4 h + 2 kv + 4 I) bytes of activations per token and layer (the fp32 residual
stream and norms, then q/k/v/o inputs and outputs and the gated MLP's at e bytes: 2 in bf16,
4 in fp32). The sum is the right figure for a CPU, where freed pages are kept by the
allocator rather than reused by the next phase. Attention runs through SDPA kernels that
keep no [t, t] scores (measured: a term for them overestimated SmolLM2's SFT peak by 36%).
`benchmarks/plan_memory.py` compares the plan with measured peaks.

Under FSDP with several micro-batches a step, `memory.fsdp_accumulate=unsharded` (the default)
keeps every trainable parameter's gradient whole until the last micro-batch: 4 T bytes more
on each worker ("whole gradients"); `sharded` reduce-scatters each micro-batch and adds none.

Every other process a pipeline starts is planned too, in the dtype it runs in, each against
the device it runs on and the GPUs it asks Ray for (`sdftlab.placement`, the requests the
runtime makes):

- `<stage>` host — a GPU node's host memory (`resources.host_memory_gb`, `gpus_per_node`
  workers on each): the fp32 model each worker loads whole before it moves or shards it, the
  live CKA probe, the runtime;
- `<stage>` rollout / teacher engine — a GPU (within vLLM's share of it) or the CPU machine:
  weights in the engine's dtype, one sequence's KV cache (GPU) or `kv_cache_gb` (CPU);
- eval generate — `eval.generation`'s device: weights in its dtype, `generate`'s KV cache for
  a batch (hf) or vLLM's share (vllm); eval lm-eval — the same device: weights, a batch's
  logits and log-probabilities;
- cka — a CKA actor's device (`cka.gpus_per_actor`): both models in `cka.dtype`, a batch of
  every layer's hidden states; the fp64 statistics on the host.

Evaluation and CKA are planned for the largest state a pipeline makes. Rows of tokens whose
length the plan cannot read are taken as `LONG_ROW_TOKENS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sdftlab import placement
from sdftlab.errors import ConfigError, SdftlabError
from sdftlab.specs import ResourcesSpec, gpu_share, resolve_dtype

GiB = 2**30
RUNTIME_GIB = {"cpu": 1.0, "gpu": 1.5}
# The prompt of an SDFT row as planned when its task files or tokenizer are not on this
# machine yet (the teacher's view: the question and the demonstration), capped by
# rollout.max_model_len; otherwise the data's longest (`prompt_tokens`).
SDFT_PROMPT_TOKENS = 512
# The live CKA probe's rows are encoded up to this many tokens (`LiveCKA`'s max_len).
LIVE_CKA_TOKENS = 512
# An evaluation prompt, an lm-eval request or a CKA row as planned (CKAOptions.max_len).
LONG_ROW_TOKENS = 512


class PlanError(ConfigError):
    """A stage that does not fit its devices."""


@dataclass(frozen=True)
class Architecture:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool = True
    nf4: bool = False  # the decoder layers' linear weights in 4 bits (a quantized state)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    @property
    def layer_params(self) -> int:
        h, kv = self.hidden, self.kv_dim
        bias = h + 2 * kv if self.qkv_bias else 0
        return 2 * h * h + 2 * h * kv + bias + 3 * h * self.intermediate + 2 * h

    @property
    def params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * self.layer_params + embeddings + self.hidden  # + the final norm

    def activation_bytes(self, element: int) -> int:
        """Activations one token leaves per decoder layer for the backward pass."""
        h = self.hidden
        return 16 * h + element * (4 * h + 2 * self.kv_dim + 4 * self.intermediate)

    @classmethod
    def from_hf(cls, config: Any) -> Architecture:
        return cls(
            hidden=config.hidden_size, layers=config.num_hidden_layers,
            heads=config.num_attention_heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            intermediate=config.intermediate_size, vocab=config.vocab_size,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=bool(getattr(config, "attention_bias", config.model_type == "qwen2")),
        )  # fmt: skip


# Published configs (config.json on the hub) of the models the project's configs name.
KNOWN = {
    "qwen2.5-7b-instruct": Architecture(3584, 28, 28, 4, 18944, 152064, tied=False),
    "qwen2.5-3b-instruct": Architecture(2048, 36, 16, 2, 11008, 151936, tied=True),
    "qwen2.5-0.5b-instruct": Architecture(896, 24, 14, 2, 4864, 151936, tied=True),
    "smollm2-135m": Architecture(576, 30, 9, 3, 1536, 49152, tied=True, qkv_bias=False),
}


def import_architecture(path: str) -> Architecture:
    """The architecture an import stage brings in, from its config (never its weights)."""
    from transformers import AutoConfig

    from sdftlab.importer import PACKAGED, packaged_path

    local = packaged_path(path) if path in PACKAGED else Path(path).expanduser()
    if local.is_dir() and (local / "config.json").is_file():
        return Architecture.from_hf(AutoConfig.from_pretrained(local))
    if local.is_file() and local.suffix.lower() == ".gguf":
        return Architecture.from_hf(AutoConfig.from_pretrained(local.parent, gguf_file=local.name))
    key = Path(path.rstrip("/")).name.lower()
    if key in KNOWN:
        return KNOWN[key]
    raise PlanError(
        f"plan: the architecture of import {path!r} is unknown here (no config.json on this "
        f"machine, and not one of {', '.join(KNOWN)}); plan where the model's folder is readable"
    )


@dataclass
class StagePlan:
    name: str
    kind: str
    device: str  # "cpu", "gpu" or "host" (a GPU node's host memory)
    parts: dict[str, float]  # GiB per device of the stage's largest process
    budget: float  # GiB of that device
    devices: int = 0  # GPUs the stage holds at once (0 on CPU)
    fix: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.budget


def weight_bytes(arch: Architecture) -> float:
    """The model's weights as a worker holds them: fp32, or NF4 decoder layers (4 bits and a
    scale per 64) beside fp32 embeddings and norms."""
    if not arch.nf4:
        return 4 * arch.params
    linear = arch.layers * (arch.layer_params - 2 * arch.hidden)
    return 4 * (arch.params - linear) + linear * (0.5 + 4 / 64)


def trainer_parts(
    arch: Architecture,
    *,
    trainable: int,
    shards: int,
    rows: int,
    seq: int,
    checkpointing: bool,
    bf16: bool,
    chunk: int | None,
    device: str,
    head_tokens: int | None = None,
) -> dict[str, float]:
    """A training worker's memory at its peak, by part, in GiB (the module's table).
    `head_tokens`: the tokens the output layer sees (SDFT: the completions'; default all)."""
    t = trainable
    element = 2 if bf16 else 4
    parts = {"weights": weight_bytes(arch) / shards}
    if bf16:
        parts["bf16 weights"] = 2 * 2 * arch.layer_params if shards > 1 else 2 * t
    parts["gradients + AdamW"] = 16 * t / shards
    tokens = rows * seq
    per_token = arch.activation_bytes(element)
    parts["activations"] = tokens * (
        arch.layers * 4 * arch.hidden + per_token if checkpointing else arch.layers * per_token
    )
    head = tokens if head_tokens is None else head_tokens
    parts["logits"] = 3 * 4 * min(chunk or head, head) * arch.vocab
    parts = {k: v / GiB for k, v in parts.items()}
    parts["runtime"] = RUNTIME_GIB[device]
    return parts


def lora_params(arch: Architecture, r: int, targets: list[str]) -> int:
    """Trainable parameters of rank-r adapters on the named projections of every layer."""
    h, kv, i = arch.hidden, arch.kv_dim, arch.intermediate
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # fmt: skip
    return arch.layers * sum(r * (a + b) for name, (a, b) in shapes.items() if name in targets)


def live_cka_bytes(arch: Architecture, spec: Any, tokens: int) -> float:
    """The live CKA probe (`cka.live.LiveCKA`): the reference's states on `spec.rows` rows
    of `tokens` (fp32, every layer), one batch of the student's in fp32 and fp64 while they
    are added, and the three d×d fp64 sums of every layer pair. 0 when it is off."""
    if spec.every == 0:
        return 0.0
    states = (arch.layers + 1) * arch.hidden * tokens
    batch = min(spec.batch_size, spec.rows)
    return states * (4 * spec.rows + 12 * batch) + (arch.layers + 1) * 3 * arch.hidden**2 * 8


def _memory(
    stage: Any, arch: Architecture, rows: int, seq: int, device: str, **kwargs: Any
) -> dict[str, float]:
    mem = stage.memory
    trainable = _trainable(stage, arch)
    micro = min(mem.micro_batch_size or rows, rows)
    parts = trainer_parts(
        arch, trainable=trainable, shards=stage.num_workers if mem.fsdp else 1,
        rows=micro, seq=seq, checkpointing=mem.gradient_checkpointing,
        bf16=mem.autocast_on(stage.use_gpu, cpu_default=stage.kind == "sft"),
        chunk=mem.chunk_for(arch.vocab), device=device, **kwargs,
    )  # fmt: skip
    sharded = mem.fsdp and stage.num_workers > 1
    if sharded and micro < rows and mem.fsdp_accumulate == "unsharded":
        parts["whole gradients"] = 4 * trainable / GiB  # kept between micro-batches
    if device == "gpu":  # the probe's states and sums live in host memory, not the GPU's
        return parts
    live = live_cka_bytes(arch, stage.live_cka, min(seq, LIVE_CKA_TOKENS)) / GiB
    return parts | ({"live CKA": live} if live else {})


def _trainable(stage: Any, arch: Architecture) -> int:
    if stage.lora is None:
        return arch.params
    return lora_params(arch, stage.lora.r, stage.lora.target_modules)


def plan_sft(name: str, stage: Any, arch: Architecture, res: ResourcesSpec) -> StagePlan:
    device = "gpu" if stage.use_gpu else "cpu"
    rows = stage.batch_size // stage.num_workers
    parts = _memory(stage, arch, rows, stage.max_len, device)
    gpus = int(placement.gpus(placement.stage_requests(stage)))
    return _finish(StagePlan(name, "sft", device, parts, _budget(res, device), gpus), stage)


def plan_sdft(
    name: str,
    stage: Any,
    arch: Architecture,
    res: ResourcesSpec,
    prompts: dict[str, int] | None = None,
) -> StagePlan:
    """`prompts`: the longest student and teacher prompts of the stage's rows in tokens
    (`prompt_tokens`); None assumes `SDFT_PROMPT_TOKENS` for both, and the plan says so. The
    student's activations are sized by its own prompt and the completion; the output layer
    sees the completions alone."""
    device = "gpu" if stage.use_gpu else "cpu"
    rows = stage.prompts_per_step * stage.rollout.n // stage.num_workers
    new = stage.rollout.max_new_tokens
    student = (prompts["student"] if prompts else SDFT_PROMPT_TOKENS) + new
    seq = min(student, stage.rollout.max_model_len or student)
    micro = min(stage.memory.micro_batch_size or rows, rows)
    parts = _memory(stage, arch, rows, seq, device, head_tokens=micro * new)
    frozen_copy = stage.scoring == "exact" and stage.teacher != "live"
    if frozen_copy:  # a frozen teacher state or the EMA average, beside every worker
        parts["teacher copy"] = 4 * arch.params / GiB
    if stage.rollout.engine == "hf" and stage.mode == "on_policy":  # generate's KV cache
        parts["rollout KV cache"] = rows * seq * kv_bytes_per_token(arch, "float32") / GiB
    gpus = int(placement.gpus(placement.stage_requests(stage)))
    plan = StagePlan(name, "sdft", device, parts, _budget(res, device), gpus)
    plan.notes.append(
        f"prompts up to {prompts['student']} tokens, {prompts['teacher']} with the "
        "demonstration (the data's longest)" if prompts
        else f"prompts of {SDFT_PROMPT_TOKENS} tokens assumed (no task files or tokenizer yet)"
    )  # fmt: skip
    return _finish(plan, stage)


def element_bytes(dtype: str) -> int:
    return {"float64": 8, "float32": 4}.get(dtype, 2)


def engine_weights(arch: Architecture, dtype: str) -> float:
    return arch.params * element_bytes(dtype) / GiB


def kv_bytes_per_token(arch: Architecture, dtype: str) -> int:
    return arch.layers * 2 * arch.kv_dim * element_bytes(dtype)


def vllm_on_gpu(arch: Architecture, dtype: str, seq: int) -> dict[str, float]:
    """What must fit in vLLM's share of a GPU: the weights and one sequence's KV cache."""
    return {"weights": engine_weights(arch, dtype),
            "KV cache, one sequence": seq * kv_bytes_per_token(arch, dtype) / GiB}  # fmt: skip


def plan_engines(
    name: str, stage: Any, arch: Architecture, res: ResourcesSpec, seq: int
) -> list[StagePlan]:
    """An SDFT stage's vLLM engines (`placement.engines`), one row per pool: on a GPU within
    vLLM's share of it (`gpu_memory_utilization`), on a CPU beside the training workers."""
    r = stage.rollout
    plans = []
    for request in placement.engines(stage):
        dtype = resolve_dtype(r.dtype, request.gpus)
        if request.gpus > 0:
            share = gpu_share(r.gpu_memory_utilization, request.gpus)
            parts = vllm_on_gpu(arch, dtype, seq)
            plan = StagePlan(name, request.role, "gpu", parts,
                             share * _budget(res, "gpu"), 0)  # fmt: skip
            plan.notes.append(f"vLLM's share: {share:.2f} of a GPU ({dtype})")
            plan.fix = ("give each engine more GPUs (rollout.gpus_per_actor, tensor "
                        "parallelism), engines in bf16 (rollout.dtype=bfloat16) or a GPU with "
                        "more memory")  # fmt: skip
        else:
            parts = {"weights": engine_weights(arch, dtype), "KV cache": r.kv_cache_gb,
                     "runtime": RUNTIME_GIB["cpu"]}  # fmt: skip
            plan = StagePlan(name, request.role, "cpu", parts, _budget(res, "cpu"), 0)
            plan.fix = "a smaller KV cache (rollout.kv_cache_gb) or a machine with more memory"
        plans.append(plan)
    return plans


def plan_host(name: str, stage: Any, arch: Architecture, res: ResourcesSpec) -> StagePlan | None:
    """A GPU stage's node: each of its workers there loads the whole model in fp32 in host
    memory (before it moves or shards it) and keeps the live CKA probe there. None when the
    stage trains on CPUs or `resources.host_memory_gb` is not given."""
    if not stage.use_gpu or res.host_memory_gb is None:
        return None
    workers = min(stage.num_workers, res.gpus_per_node)
    tokens = min(stage.max_len if stage.kind == "sft" else SDFT_PROMPT_TOKENS, LIVE_CKA_TOKENS)
    one = {
        "fp32 model, as loaded": weight_bytes(arch) / GiB,
        "live CKA": live_cka_bytes(arch, stage.live_cka, tokens) / GiB,
        "runtime": RUNTIME_GIB["cpu"],
    }
    parts = {k: v * workers for k, v in one.items() if v}
    plan = StagePlan(name, "host", "host", parts, res.host_memory_gb, 0)
    plan.notes.append(f"{workers} worker(s) a node (resources.gpus_per_node)")
    if not plan.fits:
        need = plan.total
        plan.fix = (f"nodes with {need:.0f} GiB of host memory or more (resources."
                    "host_memory_gb, the worker instance type of cluster.yaml)")  # fmt: skip
        if parts.get("live CKA", 0) > plan.total - plan.budget:
            plan.fix += ", or the live CKA probe off (live_cka.every=0)"
        if workers > 1:
            plan.fix += ", or one GPU per node (resources.gpus_per_node=1)"
    return plan


def plan_evaluation(cfg: Any, arch: Architecture, res: ResourcesSpec) -> list[StagePlan]:
    """Evaluation of the largest state: the generation task (its engine) and the lm-eval task
    (`evaluate.run.evaluate_on_worker` runs them one after the other, each in its own task)."""
    from sdftlab.evaluate.general import GENERAL_TASKS
    from sdftlab.evaluate.run import GENERATION_TASKS

    spec = cfg.eval.generation
    request = placement.evaluation(spec)
    device = "gpu" if request.gpus > 0 else "cpu"
    dtype = resolve_dtype(spec.dtype, request.gpus)
    budget = _budget(res, device)
    weights = engine_weights(arch, dtype)
    seq = LONG_ROW_TOKENS + spec.max_new_tokens
    plans = []
    if any(t in GENERATION_TASKS for t in cfg.eval.tasks):
        if spec.engine == "vllm" and device == "gpu":
            share = gpu_share(spec.gpu_memory_utilization, request.gpus)
            parts = vllm_on_gpu(arch, dtype, seq)
            plan = StagePlan("eval", "generate", device, parts, share * budget,
                             int(request.gpus))  # fmt: skip
        else:
            kv = spec.kv_cache_gb if spec.engine == "vllm" else (
                spec.batch_size * seq * kv_bytes_per_token(arch, dtype) / GiB
            )  # fmt: skip
            parts = {"weights": weights, "KV cache": kv, "runtime": RUNTIME_GIB[device]}
            plan = StagePlan("eval", "generate", device, parts, budget, int(request.gpus))
        plan.notes.append(f"{spec.engine} in {dtype}, the largest state")
        plan.fix = ("evaluate in bf16 (eval.generation.dtype=bfloat16), fewer prompts a call "
                    "(eval.generation.batch_size) or a device with more memory")  # fmt: skip
        plans.append(plan)
    if any(t in GENERAL_TASKS for t in cfg.eval.tasks):
        logits = spec.batch_size * LONG_ROW_TOKENS * arch.vocab * 4 * 2 / GiB
        parts = {"weights": weights, "logits + log-probs": logits, "runtime": RUNTIME_GIB[device]}
        plan = StagePlan("eval", "lm-eval", device, parts, budget, int(request.gpus))
        plan.fix = ("fewer requests a batch (eval.generation.batch_size) or bf16 "
                    "(eval.generation.dtype=bfloat16)")  # fmt: skip
        plans.append(plan)
    return plans


def plan_cka(cfg: Any, arch: Architecture, res: ResourcesSpec) -> list[StagePlan]:
    """A CKA actor (or the calling process): the state and the reference in `cka.dtype`, a
    batch of every layer's hidden states of both; the fp64 statistics of every layer pair
    (the diagonal), on the host."""
    from sdftlab.cka.pool import DEFAULT

    spec = cfg.cka
    request = placement.cka_actors(spec)
    gpus = request.gpus if request else 0.0
    device = "gpu" if gpus > 0 else "cpu"
    dtype = spec.model_dtype()
    size = element_bytes(dtype)
    states = 2 * (arch.layers + 1) * DEFAULT.batch_size * DEFAULT.max_len * arch.hidden * size
    statistics = (arch.layers + 1) * 3 * arch.hidden**2 * 8 / GiB
    parts = {"two models": 2 * engine_weights(arch, dtype), "hidden states": states / GiB}
    if device == "cpu":
        parts["statistics (fp64)"] = statistics
    parts["runtime"] = RUNTIME_GIB[device]
    devices = int(request.count * gpus) if request else 0
    plan = StagePlan("cka", "cka", device, parts, _budget(res, device), devices)
    plan.notes.append(f"both models in {dtype}, the largest state")
    plan.fix = ("CKA in bf16 (cka.dtype=bfloat16)" if size > 2
                else "a GPU with more memory for the pair")  # fmt: skip
    plans = [plan]
    if device == "gpu" and res.host_memory_gb is not None:
        one = engine_weights(arch, dtype)
        host = {"one model, as loaded": one, "statistics (fp64)": statistics, "runtime": 1.0}
        row = StagePlan("cka", "host", "host", host, res.host_memory_gb, 0)
        row.fix = "nodes with more host memory (resources.host_memory_gb) or fewer layers"
        plans.append(row)
    return plans


def _budget(res: ResourcesSpec, device: str) -> float:
    if device == "cpu":
        return res.cpu_budget()
    if res.gpu_memory_gb is None:
        raise PlanError(
            "plan: a stage trains on GPUs (use_gpu: true) but the config gives no "
            "resources.gpu_memory_gb; set it to one GPU's memory (e.g. 48 for an L40S)"
        )
    return res.gpu_memory_gb


def _finish(plan: StagePlan, stage: Any) -> StagePlan:
    """The fix to print when the stage does not fit: the largest part's remedy."""
    if plan.fits:
        return plan
    parts = plan.parts
    largest = max(parts, key=parts.get)
    need = _workers_needed(plan, stage)
    if "whole gradients" in parts and parts["whole gradients"] > plan.total - plan.budget:
        plan.fix = ("reduce-scatter the gradients after each micro-batch "
                    "(memory.fsdp_accumulate=sharded), or micro-batches of a worker's whole "
                    "batch (memory.micro_batch_size)")  # fmt: skip
    elif largest in ("weights", "gradients + AdamW") and need == 0:
        plan.fix = ("even sharded, the rest of the step does not fit one device: train LoRA "
                    "(lora.r=16), smaller micro-batches (memory.micro_batch_size) with "
                    "checkpointing, or a device with more memory")  # fmt: skip
    elif largest in ("weights", "gradients + AdamW") and not stage.memory.fsdp:
        plan.fix = (f"shard it over {need} workers or more (memory.fsdp=true num_workers={need}, "
                    "and as many GPUs in resources.gpus) or train LoRA (lora.r=16)")  # fmt: skip
    elif largest in ("weights", "gradients + AdamW"):
        plan.fix = (f"shard it over {need} workers or more (num_workers={need}, and as many GPUs "
                    "in resources.gpus) or train LoRA (lora.r=16)")  # fmt: skip
    elif largest == "teacher copy":
        plan.fix = "score the teacher on vLLM actors (scoring=vllm, loss.topk=20)"
    elif largest in ("activations", "logits"):
        plan.fix = "smaller micro-batches (memory.micro_batch_size) with checkpointing"
    else:
        plan.fix = "a device with more memory"
    return plan


def _workers_needed(plan: StagePlan, stage: Any) -> int:
    # what sharding divides (the bf16 cast cache becomes two gathered layers: left out)
    sharded = sum(plan.parts.get(k, 0.0) for k in ("weights", "gradients + AdamW", "bf16 weights"))
    whole = sharded * (stage.num_workers if stage.memory.fsdp else 1)
    rest = plan.total - sharded
    room = plan.budget - rest
    return max(2, int(whole // room) + 1) if room > 0 else 0


def architectures(stages: dict[str, Any], in_order: list[str]) -> dict[str, Architecture]:
    """Every state's architecture, the stages taken `in_order` (inputs first; a pruned state
    has its narrower FFN)."""
    from sdftlab.degrade.prune import kept_width

    out: dict[str, Architecture] = {}
    for name in in_order:
        stage = stages[name]
        if stage.kind == "world":
            m = stage.model
            out[name] = Architecture(m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads,
                                     m.intermediate_size, stage.vocab_size, tied=True)  # fmt: skip
        elif stage.kind == "import":
            out[name] = import_architecture(stage.path)
        elif stage.kind == "quantize":
            out[name] = replace(out[stage.source], nf4=True)
        elif stage.kind == "prune":
            src = out[stage.source]
            width = kept_width(src.intermediate, stage.ratio, stage.multiple_of)
            out[name] = replace(src, intermediate=width)
        else:
            out[name] = out[stage.source]
    return out


def prompt_tokens(
    stage: Any, data_dir: Path | None, tokenizer_dir: Path | None
) -> dict[str, int] | None:
    """The longest student and teacher prompts of an SDFT stage's rows, in tokens, when its
    task files and its states' tokenizer are on this machine; else None."""
    from sdftlab.distill.config import RecoverConfig
    from sdftlab.distill.sdft import longest_prompts, task_files

    if tokenizer_dir is None:
        return None
    cfg = RecoverConfig.model_validate(stage.model_dump(exclude={"kind", "source"}))
    try:
        files = task_files(cfg, data_dir)
    except SdftlabError:  # not built yet
        return None
    if not all(path.is_file() for _, path in files):
        return None
    return longest_prompts(files, str(tokenizer_dir), cfg)


def plan_pipeline(
    cfg: Any, in_order: list[str], lineage: Any = None, data_dir: Path | None = None
) -> list[StagePlan]:
    """The plan of a pipeline config (`pipelines.graph.order` gives `in_order`): every
    training stage, its GPU nodes' host memory and its vLLM engines, then the evaluation and
    the CKA of the largest state. With the `lineage` and the task files' `data_dir`, SDFT
    stages are planned at their data's longest prompt (the tokenizer of the first built
    state up their sources)."""
    arch = architectures(cfg.stages, in_order)
    res = cfg.resources
    plans = []
    measured: dict[tuple, dict[str, int] | None] = {}  # stages on the same rows: read once
    for name in in_order:
        stage = cfg.stages[name]
        if stage.kind not in ("sft", "sdft"):
            continue
        source = arch[stage.source]
        if stage.kind == "sft":
            plans.append(plan_sft(name, stage, source, res))
        else:
            tokenizer = _built_ancestor(cfg.stages, name, lineage)
            key = (tokenizer, tuple(stage.data), stage.teacher_context, stage.template)
            if key not in measured:
                measured[key] = prompt_tokens(stage, data_dir, tokenizer)
            prompts = measured[key]
            plans.append(plan_sdft(name, stage, source, res, prompts))
            seq = (prompts["teacher"] if prompts else SDFT_PROMPT_TOKENS) + (
                stage.rollout.max_new_tokens
            )  # fmt: skip
            plans += plan_engines(name, stage, source, res, stage.rollout.max_model_len or seq)
        host = plan_host(name, stage, source, res)
        plans += [host] if host else []
    largest = max(arch.values(), key=lambda a: a.params)
    return plans + plan_evaluation(cfg, largest, res) + plan_cka(cfg, largest, res)


def _built_ancestor(stages: dict[str, Any], name: str, lineage: Any) -> Path | None:
    """The folder of the first state up `name`'s sources that a local lineage holds (its
    tokenizer is the stage's), or None (a remote lineage is not downloaded for a plan)."""
    while lineage is not None and lineage.is_local and name in stages:
        name = stages[name].source if hasattr(stages[name], "source") else None
        if name is not None and lineage.exists(name):
            return lineage.resolve(name)
    return None


def check(plans: list[StagePlan], res: ResourcesSpec) -> None:
    """One error for the first stage that does not fit (its figure and the fix)."""
    for plan in plans:
        if not plan.fits:
            where = "GPU node's host" if plan.device == "host" else plan.device.upper()
            raise PlanError(
                f"stage {plan.name!r} ({plan.kind}) needs {plan.total:.1f} GiB per "
                f"{where} ({_largest(plan)}) but one has {plan.budget:.1f} GiB: {plan.fix}"
            )
        if res.gpus is not None and plan.devices > res.gpus:
            raise PlanError(
                f"stage {plan.name!r} ({plan.kind}) holds {plan.devices} GPUs at once but the "
                f"cluster has {res.gpus}: fewer workers or actors, or a larger cluster"
            )


def _largest(plan: StagePlan) -> str:
    parts = sorted(plan.parts.items(), key=lambda kv: -kv[1])[:2]
    return ", ".join(f"{k} {v:.1f}" for k, v in parts)


def table(plans: list[StagePlan]) -> str:
    """The plan as a text table: per stage, device, GPUs, each part, total and budget."""
    lines = [f"{'stage':<16} {'kind':<14} {'dev':<4} {'GPUs':>4} {'GiB':>7} {'of':>7}  parts"]
    for p in plans:
        parts = ", ".join(f"{k} {v:.3g}" for k, v in p.parts.items())
        mark = "" if p.fits else "  ← does not fit: " + p.fix
        lines.append(f"{p.name:<16} {p.kind:<14} {p.device:<4} {p.devices:>4} {p.total:>7.2f} "
                     f"{p.budget:>7.1f}  {parts}{mark}")  # fmt: skip
        lines += [f"{'':<16} {note}" for note in p.notes]
    lines += ["", "kind: the stage, or one of its processes (engines, a GPU node's host) and the "
              "evaluation and CKA of the largest state; dev: where that process runs (host: a "
              "GPU node's host memory); GPUs: held at once, as Ray is asked for them; GiB: its "
              "peak on one device; of: one device's memory (resources; vLLM: its share); "
              "parts: the peak's terms, GiB"]  # fmt: skip
    return "\n".join(lines)
