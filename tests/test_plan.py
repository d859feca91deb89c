"""`sdftlab plan`: the architecture read without weights, each stage's memory per device, the
refusal of a stage that cannot fit, and the shipped configs planned as fitting."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdftlab.cli import main
from sdftlab.config import load_config
from sdftlab.pipelines.graph import PipelineConfig, order, run_pipeline
from sdftlab.plan import KNOWN, Architecture, PlanError, check, import_architecture, plan_pipeline

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"
PIPELINES = sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith(("sweep", "world")))
KINDS = ("sft", "sdft")  # the rows of the training stages themselves


def test_the_parameter_count_is_the_models_own(small_world, smollm2):
    _, lineage, _ = small_world
    model = lineage.load_model("base")
    arch = Architecture.from_hf(model.config)
    assert arch.params == sum(p.numel() for p in model.parameters())
    real_lineage, name = smollm2
    real = real_lineage.load_model(name)
    assert sum(p.numel() for p in real.parameters()) == KNOWN["smollm2-135m"].params
    # the packaged GGUF's header gives the same architecture, without loading its weights
    assert import_architecture("smollm2-135m") == KNOWN["smollm2-135m"]


def test_a_7b_full_fine_tune_on_one_48gb_gpu_is_refused_with_the_fix():
    cfg = load_config(PipelineConfig, CONFIGS / "forgetting_qwen7b.yaml", [
        "stages.expert.memory.fsdp=false", "stages.expert.num_workers=1",
    ])  # fmt: skip
    plans = plan_pipeline(cfg, order(cfg.stages))
    expert = next(p for p in plans if p.name == "expert")
    assert expert.total > 100 and not expert.fits  # 7.6B × 16 bytes of state alone
    with pytest.raises(PlanError, match=r"'expert'.*per GPU.*48\.0 GiB.*memory\.fsdp=true"):
        check(plans, cfg.resources)
    # sharded over 4 workers it fits: 1/4 of the weights, gradients and AdamW state
    sharded = load_config(PipelineConfig, CONFIGS / "forgetting_qwen7b.yaml", [])
    plan = next(p for p in plan_pipeline(sharded, order(sharded.stages)) if p.name == "expert")
    assert plan.fits and plan.parts["weights"] == pytest.approx(expert.parts["weights"] / 4)


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.stem)
def test_every_shipped_pipeline_plans_as_fitting(path):
    cfg = load_config(PipelineConfig, path, [])
    plans = plan_pipeline(cfg, order(cfg.stages))
    assert plans  # every pipeline trains something
    check(plans, cfg.resources)


def test_too_many_gpus_for_the_cluster_is_refused():
    cfg = load_config(PipelineConfig, CONFIGS / "forgetting_qwen7b.yaml", ["resources.gpus=4"])
    with pytest.raises(PlanError, match=r"holds 8 GPUs at once but the cluster has 4"):
        check(plan_pipeline(cfg, order(cfg.stages)), cfg.resources)


def test_plan_command_prints_the_table_and_fails_on_a_stage_that_cannot_fit(capsys):
    assert main(["plan", str(CONFIGS / "forgetting_smollm2.yaml")]) == 0
    out = capsys.readouterr().out
    assert "rec_expert" in out and "every stage fits" in out
    small = "resources.cpu_memory_gb=2"
    assert main(["plan", str(CONFIGS / "forgetting_smollm2.yaml"), small]) == 2
    assert "needs" in capsys.readouterr().err


def test_a_pipeline_that_cannot_fit_is_refused_before_any_work(tmp_path):
    from sdftlab.lineage import Lineage

    cfg = load_config(PipelineConfig, CONFIGS / "forgetting.yaml", ["resources.cpu_memory_gb=1"])
    lineage = Lineage(tmp_path / "lineage")
    with pytest.raises(PlanError, match=r"stage 'expert' \(sft\) needs .* GiB per CPU"):
        run_pipeline(cfg, lineage, tmp_path, log=lambda _: None)
    assert lineage.names() == []  # nothing was made


def test_sdft_stages_are_planned_at_their_datas_longest_prompt(small_world):
    """With the task files and a tokenizer here, an SDFT stage's step is sized by its rows'
    longest prompts (the student's; the teacher's has the demonstration), not the assumed 512
    tokens."""
    import numpy as np

    from sdftlab.distill.sdft import PromptEncoder, task_files
    from sdftlab.pipelines.stages import options
    from sdftlab.plan import SDFT_PROMPT_TOKENS

    world, lineage, _ = small_world
    cfg = load_config(PipelineConfig, CONFIGS / "forgetting.yaml", [])
    # a stage's own row (its engines and hosts have rows of their own under its name)
    assumed = {p.name: p for p in plan_pipeline(cfg, order(cfg.stages)) if p.kind in KINDS}
    measured = {p.name: p for p in plan_pipeline(cfg, order(cfg.stages), lineage, world.data_dir)
                if p.kind in KINDS}  # fmt: skip
    stage = cfg.stages["rec_expert"]
    (task, path), = task_files(options(stage), world.data_dir)  # fmt: skip
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    encode = PromptEncoder(str(lineage.resolve("base")), {path.name: task},
                           options(stage).model_dump())  # fmt: skip
    out = encode({"text": np.asarray(lines), "path": np.asarray([str(path)] * len(lines))})
    student, teacher = (max(len(ids) for ids in out[side]) for side in ("student", "teacher"))
    assert 0 < student < teacher < SDFT_PROMPT_TOKENS
    note = f"prompts up to {student} tokens, {teacher} with the demonstration"
    assert note in measured["rec_expert"].notes[0]
    new = stage.rollout.max_new_tokens
    ratio = measured["rec_expert"].parts["activations"] / assumed["rec_expert"].parts["activations"]
    assert ratio == pytest.approx((student + new) / (SDFT_PROMPT_TOKENS + new))
    assert measured["expert"].parts == assumed["expert"].parts  # SFT: sized by max_len


QWEN7B = CONFIGS / "forgetting_qwen7b.yaml"


def test_a_7b_cka_pair_in_fp32_on_a_48gb_gpu_is_refused_and_fits_in_bf16():
    cfg = load_config(PipelineConfig, QWEN7B, ["cka.dtype=float32"])
    plans = plan_pipeline(cfg, order(cfg.stages))
    cka = next(p for p in plans if p.name == "cka" and p.device == "gpu")
    assert cka.parts["two models"] == pytest.approx(2 * 4 * KNOWN["qwen2.5-7b-instruct"].params
                                                    / 2**30)  # fmt: skip
    with pytest.raises(PlanError, match=r"'cka' \(cka\) needs 6\d\.\d GiB per GPU.*cka\.dtype=bf"):
        check(plans, cfg.resources)
    auto = load_config(PipelineConfig, QWEN7B, [])  # cka.dtype auto: bf16 on GPU actors
    bf16 = next(p for p in plan_pipeline(auto, order(auto.stages)) if p.name == "cka")
    assert bf16.fits and bf16.parts["two models"] == pytest.approx(cka.parts["two models"] / 2)


def test_a_7b_training_worker_on_a_32gb_host_is_refused_naming_the_host():
    cfg = load_config(PipelineConfig, QWEN7B, ["resources.host_memory_gb=32"])
    plans = plan_pipeline(cfg, order(cfg.stages))
    host = next(p for p in plans if p.name == "expert" and p.device == "host")
    assert host.parts["fp32 model, as loaded"] == pytest.approx(
        4 * KNOWN["qwen2.5-7b-instruct"].params / 2**30
    )
    refusal = r"'expert' \(host\) needs .* GPU node's host .*host_memory_gb.*live_cka\.every=0"
    with pytest.raises(PlanError, match=refusal):
        check(plans, cfg.resources)
    # two GPUs a node: two workers load their copies on one host
    two = load_config(PipelineConfig, QWEN7B, ["resources.gpus_per_node=2"])
    doubled = next(p for p in plan_pipeline(two, order(two.stages))
                   if p.name == "expert" and p.device == "host")  # fmt: skip
    assert doubled.total == pytest.approx(2 * host.total)


def test_fsdp_accumulation_that_keeps_whole_gradients_is_refused_with_the_sharded_fix():
    cfg = load_config(PipelineConfig, QWEN7B, ["stages.expert.memory.fsdp_accumulate=unsharded"])
    plans = plan_pipeline(cfg, order(cfg.stages))
    expert = next(p for p in plans if p.name == "expert" and p.kind == "sft")
    trainable = KNOWN["qwen2.5-7b-instruct"].params
    assert expert.parts["whole gradients"] == pytest.approx(4 * trainable / 2**30)
    with pytest.raises(PlanError, match=r"'expert' \(sft\).*memory\.fsdp_accumulate=sharded"):
        check(plans, cfg.resources)
    # one micro-batch a step (no accumulation) keeps no whole gradients
    memory = "stages.expert.memory"
    whole = load_config(PipelineConfig, QWEN7B, [f"{memory}.fsdp_accumulate=unsharded",
                                                 f"{memory}.micro_batch_size=8"])  # fmt: skip
    plan = next(p for p in plan_pipeline(whole, order(whole.stages)) if p.name == "expert")
    assert "whole gradients" not in plan.parts


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.stem)
def test_the_plan_counts_the_gpus_the_runtime_asks_ray_for(path):
    """Each stage's GPUs in the plan are those of the Ray requests its runner makes: Ray
    Train's ScalingConfig (`make_trainer`), the vLLM pools (`start_engines`), the evaluation
    task and the CKA actors — all built by `sdftlab.placement` from the stage's own config."""
    from sdftlab import placement
    from sdftlab.pipelines.stages import options

    cfg = load_config(PipelineConfig, path, [])
    plans = {(p.name, p.kind): p for p in plan_pipeline(cfg, order(cfg.stages))}
    for name, stage in cfg.stages.items():
        if stage.kind not in ("sft", "sdft"):
            continue
        runtime = options(stage)  # the SFTConfig / RecoverConfig the stage runs with
        scaling = placement.scaling_config(runtime)
        gpus = scaling.num_workers * scaling.num_gpus_per_worker
        if stage.kind == "sdft":
            gpus += sum(r.count * r.gpus for r in placement.engines(runtime))
        assert plans[(name, stage.kind)].devices == gpus, name
        assert scaling.num_cpus_per_worker == stage.cpus_per_worker
    evaluation = placement.evaluation(cfg.eval.generation)
    assert plans[("eval", "generate")].devices == evaluation.gpus
    pool = placement.cka_actors(cfg.cka)
    assert plans[("cka", "cka")].devices == (pool.count * pool.gpus if pool else 0)
