"""A real LLM through the platform: SmolLM2-135M-Instruct (the packaged GGUF, imported) takes
two SFT steps and two SDFT steps on Ray Train, with vLLM rollouts, and is evaluated on a
vLLM engine — short sequences, so the smoke run fits CI. The memory-lean options are on."""

from __future__ import annotations

import pytest

from sdftlab.config import load_config
from sdftlab.world.build import build_world_data
from sdftlab.world.config import WorldConfig

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

TASK_DATA = WorldConfig.model_validate(
    {"science": {"train": 64, "eval": 8}, "tooluse": {"train": 64, "eval": 8},
     "mmlu": {"train": 8, "eval": 4}, "winogrande": {"train": 8, "eval": 4}, "replay_rows": 32}
)  # fmt: skip
MEMORY = [
    "memory.micro_batch_size=2",
    "memory.chunk_tokens=256",
    "memory.gradient_checkpointing=true",
]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return build_world_data(TASK_DATA, tmp_path_factory.mktemp("home"))


def _max_change(lineage, a: str, b: str) -> float:
    sa, sb = lineage.load_model(a).state_dict(), lineage.load_model(b).state_dict()
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


def test_sft_then_sdft_on_vllm_rollouts_then_vllm_evaluation(
    smollm2, task_dir, monkeypatch, tmp_path
):
    from sdftlab.degrade.sft import SFTConfig, run_sft
    from sdftlab.distill.config import RecoverConfig
    from sdftlab.distill.sdft import recover
    from sdftlab.evaluate.run import default_task_files, evaluate_state
    from sdftlab.specs import EvalEngineSpec

    monkeypatch.setenv("SDFTLAB_STORAGE", str(tmp_path / "ray_results"))
    lineage, base = smollm2
    sft = load_config(
        SFTConfig, None,
        ["data=[science]", "steps=2", "batch_size=4", "max_len=160", "lr=1e-5", *MEMORY],
    )  # fmt: skip
    meta = run_sft(lineage, base, "smol_sft", sft, data_dir=task_dir, log=lambda _: None)
    assert meta.metrics["sft/loss"] > 0 and meta.metrics["sft/peak_rss_gb"] > 0
    assert _max_change(lineage, base, "smol_sft") > 0

    rollout = ["rollout.max_new_tokens=12", "rollout.kv_cache_gb=0.5", "rollout.max_model_len=1024"]
    sdft = load_config(
        RecoverConfig, None,
        [f"teacher={base}", "data=[science]", "steps=2", "prompts_per_step=4", "lr=1e-5",
         "warmup_steps=0", "loss.mask_first_k=1", *rollout, *MEMORY],
    )  # fmt: skip
    meta = recover(lineage, "smol_sft", "smol_sdft", sdft, data_dir=task_dir, log=lambda _: None)
    assert meta.parents == ["smol_sft", base]
    assert meta.metrics["sdft/divergence"] >= 0 and meta.metrics["sdft/tokens_per_s"] > 0
    assert _max_change(lineage, "smol_sft", "smol_sdft") > 0

    engine = EvalEngineSpec(engine="vllm", max_new_tokens=24, kv_cache_gb=0.5, max_model_len=1024)
    files = default_task_files(task_dir, ["science", "tooluse"])
    metrics = evaluate_state(
        lineage, "smol_sdft", files, with_demonstration=True, limit=4, engine=engine,
        log=lambda _: None,
    )  # fmt: skip
    assert {metrics[f"{t}/n{s}"] for t in ("science", "tooluse") for s in ("", "_demo")} == {4.0}
    assert all(0.0 <= metrics[k] <= 1.0 for k in metrics if "/acc" in k)
    assert lineage.meta("smol_sdft").metrics["science/acc_demo"] == metrics["science/acc_demo"]


def test_held_out_english_is_scored_in_bits_per_byte(smollm2):
    """lm-eval's rolling log-likelihood over the documentation passages: a real model reads
    English at about a bit per byte or less, far below a uniform guess over bytes (8)."""
    from sdftlab.evaluate.general import english_passages, general_capability
    from sdftlab.evaluate.run import default_task_files

    lineage, base = smollm2
    model, tok = lineage.load_model(base), lineage.load_tokenizer(base)
    files = default_task_files(lineage.local_path(base), ["english"])
    got = general_capability(model, tok, files, limit=4)
    assert got["english/n"] == 4 and 0.3 < got["english/bpb"] < 1.5
    assert len(english_passages()) == 64 and min(map(len, english_passages())) >= 1000
