"""The configuration of an SDFT (or off-policy distillation) run: `RecoverConfig`, with its
rollout, loss and memory sections. Every field is validated on load, and the combinations
that cannot run are refused with one message naming the fields and the fix.

    >>> load_config(RecoverConfig, "recover.yaml", ["teacher=expert", "loss.topk=20"])
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from sdftlab.config import StrictModel
from sdftlab.data.templates import DEMO_TEMPLATE
from sdftlab.rollout.transfer import choose
from sdftlab.specs import LiveCKASpec, TrainSpec, VLLMEngineSpec

SPECIAL_TEACHERS = ("ema", "live")


class RolloutSpec(VLLMEngineSpec):
    engine: Literal["vllm", "hf"] = "vllm"
    actors: int = Field(1, gt=0, description="vLLM rollout actors")
    cpus_per_actor: float = Field(0.5, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    n: int = Field(1, gt=0, description="completions per prompt")
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(64, description="completion budget per rollout")
    kv_cache_gb: float = Field(0.0625, gt=0, description="KV cache per engine, on CPU")
    overlap: int = Field(
        0,
        ge=0,
        le=1,
        description="1: the engines sample step t+1 while the workers train on step t (one "
        "step off-policy, corrected by the importance ratio); 0: synchronous",
    )
    weight_transfer: Literal["auto", "ray", "nccl", "ipc"] = Field(
        "auto",
        description="how new weights reach the engines: ray (object store; CPU or GPU), nccl "
        "(engines on GPUs of their own), ipc (engines on the trainer's GPU); auto picks",
    )

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


class RecoverConfig(TrainSpec):
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
    prompts_per_step: int = Field(16, gt=0, description="global (split across workers)")
    live_cka: LiveCKASpec = Field(
        LiveCKASpec(), description="CKA to the teacher's state on a probe, while training"
    )

    @model_validator(mode="after")
    def _consistent(self) -> RecoverConfig:
        self.check_splits("prompts_per_step", self.prompts_per_step)
        if "{demonstration}" not in self.template or "{prompt}" not in self.template:
            raise ValueError("template must contain {prompt} and {demonstration}")
        if self.scoring == "vllm" and self.loss.topk is None:
            raise ValueError("scoring=vllm gives top-k teacher log-probs: set loss.topk (e.g. 20)")
        if self.loss.cka_weight > 0 and self.scoring != "exact":
            raise ValueError("loss.cka_weight needs teacher hidden states: use scoring=exact")
        if self.teacher == "ema" and self.memory.fsdp:
            raise ValueError(
                "teacher=ema averages the student's full weights beside it: use it without "
                "memory.fsdp (or a frozen state as teacher with memory.fsdp=true)"
            )
        if self.teacher == "ema" and self.lora is not None:
            raise ValueError("teacher=ema averages full weights: use it without lora")
        if self.rollout.overlap and (self.mode == "off_policy" or self.rollout.engine != "vllm"):
            raise ValueError(
                "rollout.overlap=1 overlaps the vLLM engines' sampling with training: it needs "
                "mode=on_policy and rollout.engine=vllm (set rollout.overlap=0 otherwise)"
            )
        if self.mode == "off_policy" and self.teacher in SPECIAL_TEACHERS:
            raise ValueError("mode=off_policy distils from another model: teacher must be a state")
        self.weight_transfer()  # a native transfer that cannot run: refused here
        return self

    def weight_transfer(self) -> str:
        """How the trainer's weights reach the vLLM engines (`rollout.weight_transfer`, `auto`
        resolved by `sdftlab.rollout.transfer.choose`)."""
        return choose(
            self.rollout.weight_transfer, use_gpu=self.use_gpu,
            gpus_per_actor=self.rollout.gpus_per_actor, num_workers=self.num_workers,
        )  # fmt: skip
