"""Config sections that more than one stage or command shares: LoRA adapters, the memory of a
training step, evaluation (tasks, rows, the engine answers are generated with), CKA, the
CKA measured during training, and the resources a pipeline runs on.

`MemorySpec` sets how a training step (SFT, SDFT, off-policy distillation) holds its
activations — never the model or the arithmetic of the step:

- `micro_batch_size`: sequences per forward + backward. A step's micro-batches each add
  their share of the step's loss gradient (every loss is normalised by the whole step's
  token count), so the step is the same whatever the micro-batch; `prompts_per_step` and
  `batch_size` then no longer set the memory.
- `chunk_tokens`: the output layer and the loss run this many tokens at a time
  (`sdftlab.chunked`), so the [tokens, vocabulary] logits are never whole. `auto` sizes the
  chunk to 2^24 logits (320 tokens of SmolLM2's 49,152 words, 64 of Qwen2.5's 152k; the
  whole batch at once for the tiny world's vocabulary of about a thousand): the loss keeps
  about a dozen tensors of that size alive while it runs.
- `gradient_checkpointing`: keep each decoder layer's input only and recompute the layer in
  the backward pass (transformers' non-reentrant checkpointing; active in training mode):
  about a third more compute for activations that no longer grow with depth.
- `cpu_allocator`: on CPU, `heap` has glibc reuse freed memory instead of returning it
  (`sdftlab.allocator`: faster steps on the tiny world, whose steps are dominated by page
  faults); on a real model's variable-length steps its heap fragments and grows step after
  step (docs/BENCHMARKS.md, "CPU allocator").
  `auto` takes `heap` for models up to 256 wide and `system` beyond;
  `SDFTLAB_CPU_ALLOC=system` in the environment wins.
- `bf16_autocast`: bf16 matmuls where the hardware has them (CUDA; CPUs with AVX512-BF16 /
  AMX), fp32 weights and optimizer state. `None` means on for GPU workers, and off on CPU for
  SDFT (its documented tiny-world figures are fp32); SFT's default is on.
- `fsdp`: shard weights, gradients and optimizer state over the stage's workers (FSDP2,
  `sdftlab.sharding`) instead of a whole replica on each (DDP). With several micro-batches a
  step, `fsdp_accumulate` chooses between keeping the gradients whole until the last one
  (one reduce-scatter a step; `sdftlab plan` counts the whole gradients) and reducing them
  into their shards after each (more communication, no whole gradients).

`TrainSpec` holds what every training stage shares — steps, optimizer and schedule, LoRA,
memory, live CKA, workers, checkpoint and report cadence, seed — once: `SFTConfig` and
`RecoverConfig` extend it with their data and method (`sdftlab.train` runs both).

`ResourcesSpec` says what a pipeline runs on (GPUs, their memory, the CPU machine's memory):
`sdftlab plan` and the check before a pipeline runs hold each stage against it.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field

from sdftlab.config import StrictModel


class LoraSpec(StrictModel):
    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]


AUTO_CHUNK_LOGITS = 2**24  # logits per chunk with chunk_tokens=auto


class MemorySpec(StrictModel):
    micro_batch_size: int | None = Field(
        None, gt=0, description="sequences per forward/backward (None: a worker's whole batch)"
    )
    chunk_tokens: int | Literal["auto"] | None = Field(
        "auto",
        description="tokens per output-layer + loss chunk; auto: 2^24 logits a chunk (64 MB in "
        "fp32: 320 tokens of a 49k vocabulary), None: all at once",
    )
    gradient_checkpointing: bool = Field(False, description="recompute layers in backward")
    bf16_autocast: bool | None = Field(
        None, description="bf16 matmuls where supported; None: on for GPU, stage default on CPU"
    )
    fsdp: bool = Field(
        False,
        description="shard weights, gradients and optimizer state over the workers (FSDP2, a "
        "group per decoder layer); off: every worker holds the whole model (DDP)",
    )
    fsdp_accumulate: Literal["unsharded", "sharded"] = Field(
        "unsharded",
        description="FSDP with micro-batches: unsharded (gradients kept whole until the step's "
        "last micro-batch, one reduce-scatter a step, 4 bytes a trainable parameter more per "
        "worker) or sharded (a reduce-scatter after every micro-batch, no whole gradients)",
    )
    cpu_allocator: Literal["auto", "heap", "system"] = Field(
        "auto",
        description="CPU workers: heap (reuse freed memory), system (the C library's), auto: "
        "heap for the tiny worlds, system for real models",
    )

    def chunk_for(self, vocab_size: int) -> int | None:
        """Tokens per chunk for a vocabulary of `vocab_size` words."""
        if self.chunk_tokens != "auto":
            return self.chunk_tokens
        return max(64, (AUTO_CHUNK_LOGITS // vocab_size) // 64 * 64)

    def autocast_on(self, use_gpu: bool, cpu_default: bool) -> bool:
        """Whether this stage asks for bf16 autocast (`train.setup.autocast` still checks that
        the device has bf16 matmuls)."""
        if self.bf16_autocast is not None:
            return self.bf16_autocast
        return use_gpu or cpu_default


def gpu_share(asked: float | None, gpus: float) -> float:
    """The GPU memory share a vLLM engine takes: `asked`, else 0.85 of what its actor holds
    (vLLM's own default on a GPU of its own, less beside a trainer sharing it)."""
    if asked is not None:
        return asked
    return round(0.85 * min(gpus, 1.0), 3) if gpus > 0 else 0.85


DType = Literal["auto", "float32", "bfloat16", "float16"]


def resolve_dtype(dtype: str, gpus: float) -> str:
    """A model's dtype where it runs: `auto` is bfloat16 on a GPU, float32 on a CPU."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if gpus > 0 else "float32"


class VLLMEngineSpec(StrictModel):
    """The vLLM engine options rollout pools and evaluation engines share."""

    dtype: DType = Field(
        "float32", description="the engine's weights and activations (auto: bf16 on a GPU)"
    )
    kv_cache_gb: float = Field(1.0, gt=0, description="KV cache per engine, on CPU")
    gpu_memory_utilization: float | None = Field(
        None,
        gt=0,
        le=1,
        description="on a GPU: the engine's share for weights and KV cache (None: 0.85 × the "
        "GPUs its actor or worker holds)",
    )
    max_model_len: int | None = Field(
        None, gt=0, description="longest prompt + completion (None: the model's own limit)"
    )

    def engine_kwargs(self, gpus: float) -> dict[str, Any]:
        """`VLLMEngine` keyword arguments, for an engine holding `gpus` GPUs."""
        return {
            "dtype": resolve_dtype(self.dtype, gpus),
            "kv_cache_bytes": int(self.kv_cache_gb * 2**30),
            "max_model_len": self.max_model_len,
            "gpu_memory_utilization": gpu_share(self.gpu_memory_utilization, gpus),
        }


class EvalEngineSpec(VLLMEngineSpec):
    """Where generation-based evaluation (science, tool use) runs.

    `hf`: transformers `generate` in the evaluating process. `vllm`: one vLLM engine, all
    prompts in one call. A pipeline evaluates each state in a Ray task of `cpus` CPUs and
    `gpus` GPUs (on a cluster give it a GPU), the engine and the lm-eval model inside it;
    `sdftlab eval` runs in its own process, a vLLM engine as an actor with these resources.
    An NF4 state is served by vLLM from its dequantized copy (`evaluate.run.generator_for`)."""

    engine: Literal["hf", "vllm"] = "hf"
    dtype: DType = Field(
        "auto",
        description="the model's weights and activations, on either engine and in "
        "lm-eval: auto is bf16 where the evaluation has a GPU, fp32 on a CPU",
    )
    max_new_tokens: int = Field(96, gt=0, description="answer budget per prompt")
    batch_size: int = Field(32, gt=0, description="hf: prompts per generate call")
    cpus: float = Field(1.0, gt=0, description="CPUs of the evaluation worker (or engine actor)")
    gpus: float = Field(0.0, ge=0, description="GPUs of the evaluation worker (or engine actor)")


class EvalSpec(StrictModel):
    """What each state is evaluated on: tasks, rows, the teachers' view, the engine."""

    tasks: list[str] = ["science", "tooluse", "mmlu", "winogrande"]
    limit: int | None = Field(100, gt=0, description="first N eval rows per task")
    demonstration_for: list[str] = Field(
        [], description="states also scored with the demonstration in the prompt (teachers)"
    )
    preflight_rows: int = Field(
        16,
        ge=0,
        description="before each SDFT stage: its teacher's accuracy without and with the "
        "demonstration on the first N rows of each training task (0: off)",
    )
    generation: EvalEngineSpec = Field(
        EvalEngineSpec(), description="where answers are generated: transformers or a vLLM actor"
    )


class CKASpec(StrictModel):
    """CKA of every state against `reference` on the first `limit` rows of `data`."""

    reference: str = Field(description="the state every other state is compared with")
    data: str = "science"
    limit: int = Field(64, ge=4)
    actors: int | None = Field(
        1, description="the Ray actor pool's size (None: in the calling process)"
    )
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs of each CKA actor")
    gpus_per_actor: float = Field(
        0.0, ge=0, description="GPUs of each CKA actor (its two models on it); 0: the CPU"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float64"] = Field(
        "auto",
        description="both models' weights and hidden states (the statistics are fp64 "
        "whatever this is): auto is bf16 on GPU actors, fp32 on a CPU",
    )

    def model_dtype(self) -> str:
        return resolve_dtype(self.dtype, self.gpus_per_actor if self.actors else 0.0)


class LiveCKASpec(StrictModel):
    """CKA measured while a model trains (`sdftlab.cka.live`): the student against `reference`
    on a fixed probe, every `every` steps and at the last; reported with the training metrics
    as ``live_cka/<reference>/{last_layer, mean_over_layers, sequence_last_layer}``."""

    every: int = Field(10, ge=0, description="steps between measurements; 0 switches it off")
    reference: str | None = Field(
        None,
        description="a lineage state or model path; None: the teacher's state (SDFT with an "
        "ema or live teacher, and SFT: the state the run starts from)",
    )
    data: str | None = Field(
        None, description="TASK (its eval split) or TASK=PATH; None: the run's first data entry"
    )
    rows: int = Field(16, ge=4, description="the probe: the first `rows` rows of `data`")
    batch_size: int = Field(8, gt=0, description="probe rows per forward (as `sdftlab cka`)")


class TrainSpec(StrictModel):
    """The fields of a training stage that the one training loop (`sdftlab.train`) reads."""

    steps: int = Field(100, gt=0, description="optimizer steps (per round, for SFT)")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (warm-up, then cosine)")
    warmup_steps: int = Field(5, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    lora: LoraSpec | None = Field(None, description="adapters on the model (QLoRA if NF4)")
    memory: MemorySpec = MemorySpec()
    live_cka: LiveCKASpec = Field(LiveCKASpec(), description="CKA to a reference, while training")
    num_workers: int = Field(1, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    threads_per_worker: int = Field(2, gt=0)
    checkpoint_every: int = Field(50, gt=0)
    log_every: int = Field(10, gt=0, description="progress line every this many steps")
    max_failures: int = Field(1, ge=-1)
    seed: int = 0

    def check_splits(self, field: str, rows: int) -> None:
        """A step's global batch (`field`, `rows` of it) must split evenly over the workers."""
        if rows % self.num_workers:
            raise ValueError(
                f"{field}={rows} does not split over num_workers={self.num_workers}; make "
                f"{field} a multiple of num_workers"
            )


class ResourcesSpec(StrictModel):
    """What the pipeline runs on, for `sdftlab plan` and the check before a run."""

    gpus: int | None = Field(None, ge=0, description="GPUs of the cluster (None: not checked)")
    gpu_memory_gb: float | None = Field(None, gt=0, description="memory of one GPU")
    cpu_memory_gb: float | None = Field(
        None, gt=0, description="memory of the machine the CPU stages run on (None: this one's)"
    )
    host_memory_gb: float | None = Field(
        None, gt=0, description="host memory of each GPU node (None: not checked)"
    )
    gpus_per_node: int = Field(
        1, gt=0, description="GPUs of each GPU node: the workers that share one host"
    )

    def cpu_budget(self) -> float:
        if self.cpu_memory_gb is not None:
            return self.cpu_memory_gb
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
