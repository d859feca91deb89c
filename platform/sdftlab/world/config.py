"""The tiny world's configs: its data sizes, tokenizer, model shape and pretraining
(`WorldConfig`, the `world` stage's options; `jobs/configs/world.yaml`).

    >>> cfg = load_config(WorldConfig, None, ["pretrain.steps=800", "seed=3"])
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from sdftlab.config import StrictModel


class TinyModelConfig(StrictModel):
    """A Qwen2-architecture decoder (the real model family, at toy size)."""

    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int = Field(2, gt=0)
    intermediate_size: int = Field(512, gt=0)
    max_position_embeddings: int = Field(
        512, gt=0, description="teacher prompt + completion must fit (RoPE, no extra weights)"
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads="
                f"{self.num_heads}; pick num_heads that divides hidden_size"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not divisible by num_kv_heads="
                f"{self.num_kv_heads}; pick num_kv_heads that divides num_heads"
            )
        return self


# Document kinds of the pretraining mixture (see `world.build.pretrain_documents`).
DEFAULT_MIXTURE = {
    "knowledge": 0.10,  # world facts as plain statements
    "mmlu": 0.20,  # MMLU-format questions with their answer letter
    "winogrande": 0.10,  # Winogrande sentences with the right option filled in
    "demo": 0.10,  # novel multi-line text shown as a demonstration, then reproduced
    "task_demo": 0.25,  # shadow-world science/tool-use prompts in the SDFT teacher format
    "chat": 0.05,  # general-knowledge chat without a demonstration
    "copy": 0.20,  # repeated spans: keeps the copying circuit alive
}


class PretrainConfig(StrictModel):
    """Pretraining of the base model on the general mixture (plain PyTorch, one process)."""

    steps: int = Field(1400, gt=0)
    batch_size: int = Field(24, gt=0, description="mixture documents per step (one a row)")
    copy_batch_size: int = Field(32, gt=0, description="copy documents per step (one a row)")
    lr: float = Field(2e-3, gt=0)
    warmup_steps: int = Field(40, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    max_len: int = Field(256, gt=8, description="mixture documents are cut to this length")
    copy_curriculum_frac: float = Field(
        0.45, ge=0, lt=1, description="first fraction of steps on copy spans only"
    )
    copy_structured_frac: float = Field(
        0.5, ge=0, le=1, description="copy phase: share of structured (multi-line) copies"
    )
    copy_lookup_frac: float = Field(
        0.2, ge=0, le=1, description="copy phase: share of option-lookup documents"
    )
    copy_gap_words: int = Field(
        0, ge=0, description="mixture copy docs: up to this many words between repetitions"
    )
    demo_loss: Literal["all", "assistant"] = Field(
        "all", description="teacher-format documents: loss on every token or the answer only"
    )
    demo_off_path: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="teacher-format answers: per-token rate of stray/dropped tokens (no loss)",
    )
    demo_phase_frac: float = Field(
        0.2, ge=0, lt=1, description="fraction of steps after the copy phase on task_demo only"
    )
    padding_free: bool = Field(
        False, description="copy phase: documents end to end, each kept to itself (no padding)"
    )
    threads: int = Field(2, gt=0)
    bf16_autocast: bool = Field(True, description="bf16 autocast where the CPU supports it")
    mixture: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_MIXTURE),
        description="weights of the document kinds after the copy phase (normalised)",
    )

    @model_validator(mode="after")
    def _known_kinds(self) -> PretrainConfig:
        unknown = sorted(set(self.mixture) - set(DEFAULT_MIXTURE))
        if unknown:
            raise ValueError(
                f"mixture has unknown document kinds {unknown}; "
                f"use some of {sorted(DEFAULT_MIXTURE)}"
            )
        if any(w < 0 for w in self.mixture.values()) or sum(self.mixture.values()) <= 0:
            raise ValueError("mixture weights must be >= 0 with a positive sum")
        return self


class SplitSizes(StrictModel):
    train: int = Field(gt=0)
    eval: int = Field(gt=0)


class WorldConfig(StrictModel):
    """The embedded tiny world: data sizes, tokenizer, model shape, pretraining."""

    seed: int = 0
    n_compounds: int = Field(24, ge=4, description="science facts: compounds × 3 relations")
    science: SplitSizes = SplitSizes(train=3000, eval=200)
    tooluse: SplitSizes = SplitSizes(train=3000, eval=200)
    mmlu: SplitSizes = SplitSizes(train=3000, eval=300)
    winogrande: SplitSizes = SplitSizes(train=3000, eval=300)
    replay_rows: int = Field(2000, gt=0, description="general chat rows replayed during SFT")
    vocab_size: int = Field(1024, ge=300)
    model: TinyModelConfig = TinyModelConfig()
    pretrain: PretrainConfig = PretrainConfig()
