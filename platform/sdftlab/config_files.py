"""Config files as a user meets them: which kind a YAML is, the packaged defaults, and every
field shown with its value, default and meaning (`sdftlab config show`).

Kinds: `pipeline` (has `stages`), `sweep` (has `space`), `world` (a `WorldConfig`), and the
single-stage sections `sft`, `recover` (a file with such a section, or `--kind` for the
defaults), `prune`, `quantize`. The pipeline configs of `jobs/configs/` ship inside the
package (`sdftlab/configs/` in a wheel), so `sdftlab demo` runs from a non-editable install.

    sdftlab config show jobs/configs/forgetting.yaml stages.expert.steps=100
    sdftlab config show --kind recover
    sdftlab config validate jobs/configs/sweep_teacher_lr.yaml
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from sdftlab.config import load_config, load_yaml
from sdftlab.errors import ConfigError

CHECKOUT_CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"


def models() -> dict[str, type[BaseModel]]:
    """Each kind of config and the model that validates it."""
    from sdftlab.degrade.prune import PruneSpec
    from sdftlab.degrade.quantize import QuantizeSpec
    from sdftlab.degrade.sft import SFTConfig
    from sdftlab.distill.config import RecoverConfig
    from sdftlab.pipelines.graph import PipelineConfig
    from sdftlab.sweep import SweepConfig
    from sdftlab.world.config import WorldConfig

    return {
        "pipeline": PipelineConfig, "sweep": SweepConfig, "world": WorldConfig,
        "sft": SFTConfig, "recover": RecoverConfig, "prune": PruneSpec, "quantize": QuantizeSpec,
    }  # fmt: skip


SECTIONS = ("sft", "recover")
REQUIRED = "(required)"  # kinds a file gives as a section of its own


def packaged_config(name: str) -> Path:
    """The packaged `<name>.yaml` (inside a wheel), else the checkout's `jobs/configs/`."""
    shipped = resources.files("sdftlab") / "configs" / f"{name}.yaml"
    if shipped.is_file():
        return Path(str(shipped))
    path = CHECKOUT_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no packaged config {name!r}: reinstall sdftlab, or pass a YAML file")
    return path


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    data = load_yaml(path.read_text()) or {}
    if not isinstance(data, dict):
        what = type(data).__name__
        raise ConfigError(f"{path}: a config is a YAML mapping of keys, not a {what}")
    return data


def kind_of_file(path: Path) -> str:
    """The kind of config a YAML file holds, from its keys."""
    data = _read(path)
    if "stages" in data:
        return "pipeline"
    if "space" in data:
        return "sweep"
    for section in SECTIONS:
        if section in data:
            return section
    world_keys = set(models()["world"].model_fields)
    if set(data) and set(data) <= world_keys:
        return "world"
    raise ConfigError(
        f"{path}: not a config sdftlab knows (no `stages`, `space`, `sft:` or `recover:`, "
        "nor only world fields); give --kind"
    )


def load_any(path: str | None, kind: str | None, overrides: list[str]) -> tuple[str, BaseModel]:
    """(kind, the validated config) of a file (kind from its keys unless given), or of the
    defaults of `kind`."""
    kinds = models()
    if kind is not None and kind not in kinds:
        raise ConfigError(f"--kind {kind!r}: one of {', '.join(kinds)}")
    if path is None and kind is None:
        raise ConfigError("sdftlab config: give a CONFIG file, or --kind for the defaults")
    file = Path(path) if path else None
    kind = kind or kind_of_file(file)  # type: ignore[arg-type]
    section = kind if file is not None and kind in SECTIONS else None
    return kind, load_config(kinds[kind], file, overrides, section=section)


def rows(
    model: BaseModel, prefix: str = "", defaults: BaseModel | None = None
) -> list[tuple[str, Any, Any, str]]:
    """(dotted key, value, default, description) of every field, nested sections unfolded;
    a nested section's defaults are its parent's default for it (`defaults`)."""
    out = []
    for name, field in type(model).model_fields.items():
        key = f"{prefix}{field.alias or name}"
        value = getattr(model, name)
        if defaults is not None:
            default = getattr(defaults, name)
        elif field.is_required():
            default = REQUIRED
        else:
            default = field.get_default(call_default_factory=True)
        if isinstance(value, BaseModel):
            nested = default if isinstance(default, type(value)) else None
            out += rows(value, f"{key}.", nested)
        elif (
            isinstance(value, dict)
            and value
            and all(isinstance(v, BaseModel) for v in value.values())
        ):
            for item, sub in value.items():
                out += rows(sub, f"{key}.{item}.")
        else:
            out.append((key, value, default, field.description or ""))
    return out


def _text(value: Any) -> str:
    if value is REQUIRED:
        return REQUIRED
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    try:
        return json.dumps(value, default=str)
    except TypeError:
        return str(value)


def show(model: BaseModel, title: str) -> str:
    """The resolved config as a table: key, value, default (`=` when the value is it), meaning."""
    lines = [title, "", "| key | value | default | meaning |", "|---|---|---|---|"]
    for key, value, default, description in rows(model):
        shown = "=" if _text(value) == _text(default) else _text(default)
        lines.append(f"| {key} | {_text(value)} | {shown} | {description} |")
    return "\n".join(lines)
