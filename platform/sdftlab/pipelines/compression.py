"""The compression pipeline (paper Fig. 2/5, Tables 2–4): compress the expert, recover it with
SDFT from the uncompressed expert as teacher.

    base ──SFT science──▶ expert ──NF4──────▶ nf4 ────SDFT (QLoRA)──▶ nf4_rec
                                 └─FFN prune─▶ pruned ─SDFT (full)──▶ pruned_rec

then every state is evaluated and compared to the expert with CKA; stages already done with
the same config are skipped (as in the forgetting pipeline).

    python jobs/compression.py --config jobs/configs/compression.yaml
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import Field

from sdftlab.config import StrictModel, WorldConfig
from sdftlab.degrade.sft import LoraSpec, SFTConfig
from sdftlab.distill.sdft import RecoverConfig, RolloutSpec
from sdftlab.lineage import Lineage
from sdftlab.pipelines.forgetting import (
    CKASpec,
    EvalSpec,
    Log,
    _same,
    pipeline_main,
    prepare_base,
    run_stage,
)


class QuantizeSpec(StrictModel):
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "float32"


class PruneSpec(StrictModel):
    ratio: float = Field(0.1, gt=0, lt=1)
    importance: str = "magnitude"
    multiple_of: int = Field(16, gt=0)


class CompressionConfig(StrictModel):
    name: str = "compression"
    world: WorldConfig | None = WorldConfig()
    model: str | None = Field(None, description="paper scale: a local HF directory as `base`")
    data_dir: str | None = None
    lineage: str | None = None
    expert: SFTConfig = SFTConfig(data=["science"], steps=300)
    quantize: QuantizeSpec | None = QuantizeSpec()
    prune: PruneSpec | None = PruneSpec()
    recover_nf4: RecoverConfig = RecoverConfig(
        teacher="expert", rollout=RolloutSpec(engine="hf"), lora=LoraSpec(r=16, alpha=32)
    )
    recover_pruned: RecoverConfig = RecoverConfig(teacher="expert")
    eval: EvalSpec = EvalSpec(demonstration_for=[])
    cka: CKASpec = CKASpec()
    report_dir: str = "runs/compression"


def run_compression(
    cfg: CompressionConfig, lineage: Lineage, home: Path, log: Log = print
) -> dict[str, Any]:
    from sdftlab.cka.run import compare_states, load_examples
    from sdftlab.degrade.prune import prune_state
    from sdftlab.degrade.quantize import quantize_state
    from sdftlab.degrade.sft import run_sft
    from sdftlab.distill.sdft import recover
    from sdftlab.evaluate.run import default_task_files, evaluate_state
    from sdftlab.report import write_report

    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    log("── world: base")
    data_dir = prepare_base(cfg.model, cfg.world, cfg.data_dir, lineage, home, log)
    sub = lambda m: log("   " + m)  # noqa: E731 — one indented logger for every stage

    run_stage(
        "SFT science expert", "expert", _same(lineage, "expert", "sft", cfg.expert, "base"),
        lambda: run_sft(lineage, "base", "expert", cfg.expert, data_dir=data_dir, log=sub,
                        overwrite=True),
        log, timings,
    )  # fmt: skip
    states = ["expert"]
    if cfg.quantize is not None:
        q = cfg.quantize
        done = (
            lineage.exists("nf4") and lineage.meta("nf4").config.get("quant_type") == q.quant_type
        )
        run_stage(
            "NF4 quantization", "nf4", done and "expert" in lineage.meta("nf4").parents,
            lambda: quantize_state(lineage, "expert", "nf4", quant_type=q.quant_type,
                                   double_quant=q.double_quant, compute_dtype=q.compute_dtype,
                                   overwrite=True),
            log, timings,
        )  # fmt: skip
        run_stage(
            "SDFT recovery of NF4 (QLoRA)", "nf4_rec",
            _same(lineage, "nf4_rec", "recover", cfg.recover_nf4, "nf4"),
            lambda: recover(lineage, "nf4", "nf4_rec", cfg.recover_nf4, data_dir=data_dir,
                            log=sub, overwrite=True),
            log, timings,
        )  # fmt: skip
        states += ["nf4", "nf4_rec"]
    if cfg.prune is not None:
        p = cfg.prune
        done = lineage.exists("pruned") and lineage.meta("pruned").config.get("ratio") == p.ratio
        run_stage(
            f"FFN pruning ({p.ratio:.0%}, {p.importance})", "pruned", done,
            lambda: prune_state(lineage, "expert", "pruned", p.ratio, importance=p.importance,
                                multiple_of=p.multiple_of, overwrite=True),
            log, timings,
        )  # fmt: skip
        run_stage(
            "SDFT recovery of the pruned model (full FT)", "pruned_rec",
            _same(lineage, "pruned_rec", "recover", cfg.recover_pruned, "pruned"),
            lambda: recover(lineage, "pruned", "pruned_rec", cfg.recover_pruned,
                            data_dir=data_dir, log=sub, overwrite=True),
            log, timings,
        )  # fmt: skip
        states += ["pruned", "pruned_rec"]

    assert data_dir is not None
    log(f"── evaluation ({', '.join(cfg.eval.tasks)}, limit {cfg.eval.limit})")
    t0 = time.perf_counter()
    files = default_task_files(data_dir, cfg.eval.tasks)
    for state in states:
        if not all(f"{t}/acc" in lineage.meta(state).metrics for t in cfg.eval.tasks):
            evaluate_state(lineage, state, files, limit=cfg.eval.limit, log=sub)
    timings["evaluation"] = time.perf_counter() - t0
    log(f"── CKA against {cfg.cka.reference}")
    t0 = time.perf_counter()
    examples = load_examples(cfg.cka.data, data_dir, limit=cfg.cka.limit)
    frames = {
        s: compare_states(lineage, s, cfg.cka.reference, examples, actors=cfg.cka.actors)
        for s in states
        if s != cfg.cka.reference
    }
    timings["cka"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all
    report = write_report(
        Path(cfg.report_dir), lineage, states, frames, reference=cfg.cka.reference,
        degraded=states[1] if len(states) > 1 else "expert", timings=timings,
        title=f"{cfg.name}: compression and SDFT recovery",
    )  # fmt: skip
    log(f"report: {report}")
    return {"timings": timings, "report": report}


def main(argv: list[str] | None = None) -> int:
    """`python jobs/compression.py --config FILE [key=value ...]`."""
    return pipeline_main(CompressionConfig, run_compression, argv, __doc__ or "")
