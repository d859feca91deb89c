"""The stage kinds a pipeline config may use, each declared in one place.

A `StageKind` says everything the pipeline runner needs of a kind: the options its operator
takes (a config model), the stage as the YAML writes it (those options plus `kind` and, for
stages made from another state, `from`), which states it reads, what its operator records in
the new state's config (compared on resume, to skip a stage already done), a one-line
description, and how to run it. `graph.py` iterates over `KINDS`; a new kind is one entry
here.

| kind       | options          | made from            | runs                              |
|------------|------------------|----------------------|-----------------------------------|
| `world`    | `WorldConfig`    | —                    | `world.build.build_world` (cached) |
| `import`   | `ImportSpec`     | —                    | `importer.import_model`           |
| `sft`      | `SFTConfig`      | `from`               | `degrade.sft.run_sft`             |
| `sdft`     | `RecoverConfig`  | `from` (+ `teacher`) | `distill.sdft.recover`            |
| `quantize` | `QuantizeSpec`   | `from`               | `degrade.quantize.quantize_state` |
| `prune`    | `PruneSpec`      | `from`               | `degrade.prune.prune_state`       |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from sdftlab.config import StrictModel
from sdftlab.degrade.prune import PruneSpec
from sdftlab.degrade.quantize import QuantizeSpec
from sdftlab.degrade.sft import SFTConfig
from sdftlab.distill.config import SPECIAL_TEACHERS, RecoverConfig
from sdftlab.lineage import Lineage
from sdftlab.world.config import WorldConfig

Log = Callable[[str], None]


class ImportSpec(StrictModel):
    path: str = Field(
        description="an HF model folder, a .gguf file, a hub id (org/name) or a packaged model "
        "(smollm2-135m); see `sdftlab.importer`"
    )


def _input(description: str) -> Any:
    return Field(alias="from", description=description)


class WorldStage(WorldConfig):
    kind: Literal["world"]


class ImportStage(ImportSpec):
    kind: Literal["import"]


class SFTStage(SFTConfig):
    kind: Literal["sft"]
    source: str = _input("the state fine-tuned")


class SDFTStage(RecoverConfig):
    kind: Literal["sdft"]
    source: str = _input("the student state")


class QuantizeStage(QuantizeSpec):
    kind: Literal["quantize"]
    source: str = _input("the state quantized")


class PruneStage(PruneSpec):
    kind: Literal["prune"]
    source: str = _input("the state pruned")


@dataclass(frozen=True)
class Job:
    """What a stage runs with: the new state's name, the stage, its options, the store."""

    name: str
    stage: Any
    options: Any
    lineage: Lineage
    data_dir: Path | None
    home: Path
    log: Log
    callbacks: tuple[Any, ...] = ()  # Ray Train callbacks of a training stage (tracking)
    preflight_rows: int = 0  # an SDFT stage's teacher pre-flight (`pipelines.preflight`)


def outside_teacher(teacher: str) -> bool:
    """`ema`, `live` or a model path: a teacher no stage has to make."""
    return teacher in SPECIAL_TEACHERS or "/" in teacher or teacher.startswith(".")


def _from(stage: Any) -> list[str]:
    return [stage.source]


def _sdft_reads(stage: Any) -> list[str]:
    """An SDFT stage reads its student and a teacher that names a state."""
    named = not outside_teacher(stage.teacher) and stage.teacher != stage.source
    return [stage.source, stage.teacher] if named else [stage.source]


def _run_world(job: Job) -> Path:
    from sdftlab.world.build import build_world

    world = build_world(job.options, job.lineage, job.home, name=job.name, log=job.log)
    return world.data_dir


def _run_import(job: Job) -> None:
    from sdftlab.importer import import_model

    import_model(job.lineage, job.options.path, job.name, overwrite=True, log=job.log)


def _run_sft(job: Job) -> None:
    from sdftlab.degrade.sft import run_sft

    run_sft(job.lineage, job.stage.source, job.name, job.options, data_dir=job.data_dir,
            log=job.log, overwrite=True, callbacks=job.callbacks)  # fmt: skip


def _run_sdft(job: Job) -> None:
    from sdftlab.distill.sdft import check_recovery, recover
    from sdftlab.pipelines.preflight import teacher_preflight

    if job.preflight_rows:  # a stage `recover` would refuse is refused before the pre-flight
        check_recovery(job.lineage, job.stage.source, job.name, job.options, overwrite=True)
    checked = teacher_preflight(job.lineage, job.stage.source, job.options, job.data_dir,
                                job.preflight_rows, job.log)  # fmt: skip
    recover(job.lineage, job.stage.source, job.name, job.options, data_dir=job.data_dir,
            log=job.log, overwrite=True, callbacks=job.callbacks)  # fmt: skip
    if checked:
        job.lineage.record_metrics(job.name, checked)


def _run_quantize(job: Job) -> None:
    from sdftlab.degrade.quantize import quantize_state

    quantize_state(job.lineage, job.stage.source, job.name, overwrite=True,
                   **job.options.model_dump())  # fmt: skip


def _run_prune(job: Job) -> None:
    from sdftlab.degrade.prune import run_prune

    run_prune(job.lineage, job.stage.source, job.name, job.options, data_dir=job.data_dir,
              overwrite=True)  # fmt: skip


@dataclass(frozen=True)
class StageKind:
    options: type[StrictModel]  # what the operator takes
    stage: type[StrictModel]  # the options + `kind` (+ `from`), as the YAML writes it
    describe: Callable[[Any], str]
    run: Callable[[Job], Path | None]  # a world returns its data folder
    reads: Callable[[Any], list[str]] = _from
    # what the operator records in the state's config, from the options (compared on resume)
    recorded: Callable[[dict[str, Any]], dict[str, Any]] = lambda options: options
    caches_itself: bool = False  # the world is built or reused by its own content hash


KINDS: dict[str, StageKind] = {
    "world": StageKind(
        WorldConfig, WorldStage,
        lambda s: f"tiny world (hidden {s.model.hidden_size}, {s.model.num_layers} layers)",
        _run_world, reads=lambda s: [], caches_itself=True,
    ),
    "import": StageKind(
        ImportSpec, ImportStage, lambda s: f"import {s.path}", _run_import,
        reads=lambda s: [], recorded=lambda o: {"source": o["path"]},  # provenance key
    ),
    "sft": StageKind(
        SFTConfig, SFTStage, lambda s: f"SFT {s.source} on {' then '.join(s.data)}", _run_sft,
        recorded=lambda o: {"sft": o},
    ),
    "sdft": StageKind(
        RecoverConfig, SDFTStage,
        lambda s: f"SDFT {s.mode} from {s.source}, teacher {s.teacher}", _run_sdft,
        reads=_sdft_reads, recorded=lambda o: {"recover": o},
    ),
    "quantize": StageKind(
        QuantizeSpec, QuantizeStage,
        lambda s: f"{s.quant_type.upper()} quantization of {s.source}", _run_quantize,
    ),
    "prune": StageKind(
        PruneSpec, PruneStage,
        lambda s: f"FFN pruning {s.ratio:.0%} ({s.importance}) of {s.source}", _run_prune,
        # the calibration is not recorded (magnitude needs none)
        recorded=lambda o: {k: o[k] for k in ("ratio", "importance", "multiple_of")},
    ),
}  # fmt: skip


def kind_of(stage: Any) -> StageKind:
    return KINDS[stage.kind]


def options(stage: Any) -> Any:
    """The stage's options without `kind` and `from`: the config its operator takes."""
    return kind_of(stage).options.model_validate(stage.model_dump(exclude={"kind", "source"}))
