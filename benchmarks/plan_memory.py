"""Benchmark: `sdftlab plan`'s per-device memory against the measured peak of the same stage.

Each row runs a pipeline's training stage for a few steps through the stage itself (`run_sft`,
`recover`: one Ray Train worker on this CPU) and reads the worker's own peak resident memory
(`sft/peak_rss_gb`, `sdft/peak_rss_gb`: the kernel's high-water mark), beside what the plan
says for that stage's config, the state's architecture and — for SDFT — the data's longest
prompts (`plan.plan_sft`, `plan.plan_sdft`, `plan.prompt_tokens`), as `sdftlab plan`
gives them once the task files are built:

- tiny world: the `expert` SFT and `rec_expert` SDFT stages of `jobs/configs/forgetting.yaml`
  on a built default world (`--world-home`, a home where `sdftlab demo` or `sdftlab world
  build` has run);
- SmolLM2-135M-Instruct (imported from the packaged GGUF): the `expert` SFT and `rec_expert`
  SDFT stages of `jobs/configs/forgetting_smollm2.yaml` on the tiny world's task files, the
  SDFT teacher the imported state itself (a frozen copy, as `expert` would be).

    PYTHONPATH=platform .venv/bin/python benchmarks/plan_memory.py --world-home /tmp/demohome

The target is each prediction within 25% of the measured peak.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def stage(config: str, name: str, overrides: dict[str, Any]) -> Any:
    from sdftlab.config import load_config
    from sdftlab.pipelines.graph import PipelineConfig

    cfg = load_config(PipelineConfig, ROOT / "jobs" / "configs" / config, [])
    return cfg.stages[name].model_copy(update=overrides)


def run(kind: str, lineage: Any, src: str, spec: Any, data_dir: Path, arch: Any) -> dict:
    """Run the stage a few steps; its measured peak and its plan."""
    from sdftlab.pipelines.stages import options
    from sdftlab.plan import plan_sdft, plan_sft, prompt_tokens
    from sdftlab.specs import ResourcesSpec

    opts = options(spec)
    quiet = {"log": lambda _: None, "overwrite": True, "data_dir": data_dir}
    if kind == "sft":
        from sdftlab.degrade.sft import run_sft

        meta = run_sft(lineage, src, f"plan-{kind}", opts, **quiet)
        planned = plan_sft("x", spec, arch, ResourcesSpec())
    else:
        from sdftlab.distill.sdft import recover

        meta = recover(lineage, src, f"plan-{kind}", opts, **quiet)
        prompts = prompt_tokens(spec, data_dir, lineage.resolve(src))  # the data's longest
        planned = plan_sdft("x", spec, arch, ResourcesSpec(), prompts)
    measured = meta.metrics[f"{kind}/peak_rss_gb"]
    return {"planned": planned.total, "measured": measured, "parts": planned.parts,
            "error": planned.total / measured - 1}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world-home", required=True, help="a home with the default world built")
    ap.add_argument("--out", default="runs/bench/plan_memory.json")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from rollout import write_results
    from sdftlab.importer import import_model
    from sdftlab.lineage import Lineage
    from sdftlab.plan import Architecture
    from sdftlab.raycluster import ensure_ray
    from sdftlab.world.build import build_world_data, current_world
    from sdftlab.world.config import WorldConfig

    home = Path(args.world_home)
    world = current_world(home)
    tiny = Lineage(home / "lineage")
    tiny_arch = Architecture.from_hf(tiny.load_model("base").config)
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="plan-bench-") as tmp:
        os.environ["SDFTLAB_STORAGE"] = f"{tmp}/ray"
        ensure_ray()
        short = {"steps": 4, "checkpoint_every": 1000, "log_every": 1}
        rows["tiny world, SFT (forgetting.yaml expert)"] = run(
            "sft", tiny, "base", stage("forgetting.yaml", "expert", short), world.data_dir,
            tiny_arch,
        )  # fmt: skip
        rows["tiny world, SDFT (forgetting.yaml rec_expert)"] = run(
            "sdft", tiny, "base", stage("forgetting.yaml", "rec_expert",
                                        {**short, "teacher": "base", "steps": 3}),
            world.data_dir, tiny_arch,
        )  # fmt: skip
        real = Lineage(Path(tmp) / "lineage")
        import_model(real, "smollm2-135m", "smol", log=lambda _: None)
        real_arch = Architecture.from_hf(real.load_model("smol").config)
        data = build_world_data(WorldConfig(), Path(tmp))
        rows["SmolLM2, SFT (forgetting_smollm2.yaml expert)"] = run(
            "sft", real, "smol", stage("forgetting_smollm2.yaml", "expert", short), data,
            real_arch,
        )  # fmt: skip
        rows["SmolLM2, SDFT (forgetting_smollm2.yaml rec_expert)"] = run(
            "sdft", real, "smol", stage("forgetting_smollm2.yaml", "rec_expert",
                                        {**short, "teacher": "smol", "steps": 3}),
            data, real_arch,
        )  # fmt: skip
    print(f"\n{'stage':<52} {'planned GiB':>11} {'measured GiB':>12} {'error':>7}  within 25%")
    for label, r in rows.items():
        ok = "yes" if abs(r["error"]) <= 0.25 else "no"
        print(f"{label:<52} {r['planned']:>11.2f} {r['measured']:>12.2f} {r['error']:>+7.0%}  {ok}")
    for label, r in rows.items():
        print(f"{label}: " + ", ".join(f"{k} {v:.2f}" for k, v in r["parts"].items()))
    write_results(args.out, {"rows": rows})


if __name__ == "__main__":
    main()
