"""Typed experiment configs: YAML files overridable with `key=value`, validated with clear errors.

Every config is a pydantic model that rejects unknown keys. `load_config` reads a YAML
file (or none: the defaults), applies dotted overrides from the command line, and turns any
validation failure into one `ConfigError` that names the field, what was wrong, and the fix:

    >>> from sdftlab.world.config import WorldConfig
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
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

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


class _DeepMergeLoader(yaml.SafeLoader):
    """YAML whose merge key (`<<: *shared`) merges sections deeply: a mapping that also sets
    some keys of a merged section keeps the section's other keys. YAML's own merge is
    shallow — `rollout: {engine: hf}` beside `<<: *sdft` would drop every other rollout
    setting of `*sdft` without a word. To drop a merged key, set it (to null, or another
    value)."""

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        super().flatten_mapping(node)  # merged pairs first, the mapping's own after them
        node.value = self._deep(node.value)

    def _deep(self, pairs: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        out: list[tuple[Any, Any]] = []
        where: dict[str, int] = {}
        for key, value in pairs:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            if name is None or name not in where:
                if name is not None:
                    where[name] = len(out)
                out.append((key, value))
                continue
            earlier = out[where[name]][1]
            if isinstance(earlier, yaml.MappingNode) and isinstance(value, yaml.MappingNode):
                self.flatten_mapping(earlier)
                self.flatten_mapping(value)
                value = yaml.MappingNode(
                    value.tag, self._deep(earlier.value + value.value),
                    value.start_mark, value.end_mark, value.flow_style,
                )  # fmt: skip
            out[where[name]] = (key, value)
        return out


def load_yaml(text: str) -> Any:
    """Parse YAML text with deep merges (`_DeepMergeLoader`); otherwise `yaml.safe_load`."""
    return yaml.load(text, Loader=_DeepMergeLoader)  # a SafeLoader: no Python objects


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file and line.

    Top-level keys starting with `x-` are dropped after parsing: they hold YAML anchors that
    other sections merge in (`<<: *sft`), as in docker-compose files. Merges are deep
    (`load_yaml`): a stage that sets one key of a shared section keeps the rest of it.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; pass the path of a YAML file")
    try:
        data = load_yaml(p.read_text()) or {}
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


DEFAULTS = "defaults"  # the source of a config built from defaults and key=value alone


def format_validation_error(err: ValidationError, source: str = "config", data: Any = None) -> str:
    """One message per problem: `field: what (got value). Fix: ...`."""
    lines = []
    where = "" if source == DEFAULTS else f" in {source}"
    for problem in err.errors():
        field = _user_path(problem["loc"], data)
        got = problem.get("input")
        if problem["type"] == "extra_forbidden":
            lines.append(f"{field}: unknown key{where}. Fix: remove it or check the spelling "
                         "(`sdftlab config show` lists the keys)")  # fmt: skip
        elif problem["type"] == "missing":
            lines.append(f"{field}: required but missing{where}. Fix: set {field}=VALUE")
        elif problem["type"] == "union_tag_invalid":
            ctx = problem.get("ctx", {})
            lines.append(
                f"{field}: unknown {ctx.get('discriminator', 'kind')} {ctx.get('tag')!r}{where}. "
                f"Fix: use one of {ctx.get('expected_tags')}"
            )
        elif problem["type"] == "value_error" and isinstance(got, dict):
            # a check across fields: its message names the fields and the fix
            at = source if field == "(top level)" else field
            lines.append(f"{at}: {problem['msg'].removeprefix('Value error, ')}")
        else:
            shown = json.dumps(got, default=str)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            fix = f"{field}=VALUE" if source == DEFAULTS else f"in {source} or with {field}=VALUE"
            lines.append(f"{field}: {problem['msg']} (got {shown}). Fix: set {fix}")
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
    source = DEFAULTS
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
