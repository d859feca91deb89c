"""Typed experiment configs: YAML files overridable with `key=value`, validated with clear errors.

Every config is a pydantic model that rejects unknown keys. `load_config` reads a YAML
file (or none: the defaults), applies dotted overrides from the command line, and turns any
validation failure into one `ConfigError` that names the field, what was wrong, and the fix:

    >>> cfg = load_config(WorldConfig, None, ["pretrain.steps=800", "seed=3"])
    >>> cfg.pretrain.steps
    800
    >>> load_config(WorldConfig, None, ["pretrain.steps=-1"])
    Traceback (most recent call last):
    ConfigError: pretrain.steps: Input should be greater than 0 (got -1). Fix: ...
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sdftlab.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


TRUST_REMOTE_CODE_ENV = "SDFTLAB_TRUST_REMOTE_CODE"


def trust_remote_code() -> bool:
    """Whether a model directory may run its own Python code (transformers and vLLM
    `trust_remote_code`). Off unless turned on explicitly: `trust_remote_code: true` in a
    pipeline config, or SDFTLAB_TRUST_REMOTE_CODE=1 in the environment of one command."""
    return os.environ.get(TRUST_REMOTE_CODE_ENV) == "1"


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    def stable_hash(self) -> str:
        """A short content hash of the config (key order independent): a cache key."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


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


# ----------------------------------------------------------------------------- loading


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(
                f"override {dotted}: '{key}' is a value, not a section; "
                f"write {'.'.join(keys[: keys.index(key) + 1])}=VALUE instead"
            )
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["a.b=3", "c=x"]` → `{"a": {"b": 3}, "c": "x"}` (values parsed as YAML scalars)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value; write e.g. pretrain.steps=800")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({err})") from err
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string; a number is meant
            with contextlib.suppress(ValueError):
                value = float(value)
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file and line.

    Top-level keys starting with `x-` are dropped after parsing: they hold YAML anchors that
    other sections merge in (`<<: *sft`), as in docker-compose files.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; pass the path of a YAML file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {p}{where}: invalid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: the top level must be a mapping of key: value")
    return {k: v for k, v in data.items() if not str(k).startswith("x-")}


def _user_path(loc: tuple[Any, ...], data: Any) -> str:
    """The dotted field path as the user writes it: pydantic puts a tagged union's tag (a
    stage's `kind`) into the location; the config file has no such level, so it is left out."""
    parts, node = [], data
    for part in loc:
        if isinstance(node, dict) and part not in node and node.get("kind") == part:
            continue
        parts.append(str(part))
        node = node.get(part) if isinstance(node, dict) else None
    return ".".join(parts) or "(top level)"


def format_validation_error(err: ValidationError, source: str = "config", data: Any = None) -> str:
    """One message per problem: `field: what (got value). Fix: ...`."""
    lines = []
    for problem in err.errors():
        field = _user_path(problem["loc"], data)
        got = problem.get("input")
        if problem["type"] == "extra_forbidden":
            lines.append(f"{field}: unknown key in {source}. Fix: remove it or check the spelling")
        elif problem["type"] == "missing":
            lines.append(f"{field}: required but missing in {source}. Fix: set {field}=VALUE")
        elif problem["type"] == "union_tag_invalid":
            ctx = problem.get("ctx", {})
            lines.append(
                f"{field}: unknown {ctx.get('discriminator', 'kind')} {ctx.get('tag')!r} in "
                f"{source}. Fix: use one of {ctx.get('expected_tags')}"
            )
        elif problem["type"] == "value_error" and isinstance(got, dict):
            # a check across fields: its message names the fields and the fix
            where = source if field == "(top level)" else field
            lines.append(f"{where}: {problem['msg'].removeprefix('Value error, ')}")
        else:
            shown = json.dumps(got, default=str)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            lines.append(
                f"{field}: {problem['msg']} (got {shown}). "
                f"Fix: set {field} to a valid value in {source} or with {field}=VALUE"
            )
    return "; ".join(lines)


def load_config(
    model: type[M],
    path: str | os.PathLike[str] | None = None,
    overrides: list[str] | None = None,
    *,
    section: str | None = None,
) -> M:
    """`model` from a YAML file (or one `section` of it) plus `key=value` overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        data = read_yaml(path)
        source = str(path)
        if section is not None:
            sub = data.get(section, {})
            if not isinstance(sub, dict):
                raise ConfigError(f"{source}: '{section}' must be a mapping")
            data = sub
    data = _merge(data, parse_overrides(overrides or []))
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, data)) from None
