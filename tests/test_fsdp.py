"""Sharded training (FSDP2 over Ray Train workers, gloo on CPU): 2 sharded workers follow 1
worker's trajectory on the same global batches, the saved states load in transformers and
vLLM, and a killed sharded worker resumes from its checkpoint to the unkilled run's weights.
The killed run is the unkilled sharded run of the trajectory test done again (one Ray Train
run fewer than a test of its own; the DDP variant shares this checkpoint path and is left out
of CI for its time)."""

from __future__ import annotations

import pytest
import torch

from sdftlab.config import load_config
from sdftlab.degrade.sft import SFTConfig, run_sft
from sdftlab.distill.config import RecoverConfig
from sdftlab.distill.sdft import recover
from sdftlab.errors import ConfigError
from sdftlab.train.trainer import read_report_log, report_log

pytestmark = pytest.mark.slow

SFT = {
    "data": ["science"], "steps": 4, "batch_size": 8, "max_len": 160, "lr": 3e-3,
    "log_every": 1, "checkpoint_every": 2, "cpus_per_worker": 0.5, "warmup_steps": 0,
    # fp32: the trajectories compared to float rounding; two micro-batches a worker's step:
    # sharded, the gradients are kept whole between them (fsdp_accumulate's default)
    "memory": {"bf16_autocast": False, "micro_batch_size": 2},
}  # fmt: skip


def _close_states(lineage, a: str, b: str, atol: float) -> None:
    sa, sb = lineage.load_model(a).state_dict(), lineage.load_model(b).state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.allclose(sa[name], sb[name], atol=atol), (
            name,
            (sa[name] - sb[name]).abs().max(),
        )


def test_two_sharded_sft_workers_follow_one_worker_and_a_killed_one_resumes_to_it(
    small_world, tmp_path, monkeypatch
):
    """One worker, two sharded workers, and two sharded workers of which one is killed after
    step 3 (Ray Train restarts the group from the step-2 checkpoint): the same trajectory and
    the same weights, and the killed run's state is whole."""
    import ray

    world, lineage, _ = small_world
    monkeypatch.setenv("SDFTLAB_STORAGE", str(tmp_path / "ray"))
    losses = {}
    sharded = {"num_workers": 2, "max_failures": 1, "memory": {**SFT["memory"], "fsdp": True}}
    for name, extra in (("one", {}), ("two", sharded)):
        cfg = SFTConfig(**{**SFT, **extra})
        path = tmp_path / f"{name}.jsonl"
        run_sft(lineage, "base", f"fsdp-sft-{name}", cfg, data_dir=world.data_dir,
                log=lambda _: None, overwrite=True, callbacks=[report_log(path)])  # fmt: skip
        losses[name] = [r["loss"] for r in read_report_log(path)]
    assert len(losses["one"]) == SFT["steps"]
    assert losses["two"] == pytest.approx(losses["one"], rel=1e-4), losses
    assert losses["one"][-1] < losses["one"][0]  # it trained
    _close_states(lineage, "fsdp-sft-one", "fsdp-sft-two", atol=1e-4)

    marker = tmp_path / "killed"
    ray.shutdown()  # workers of a fresh cluster inherit the kill switch from this process
    monkeypatch.setenv("SDFTLAB_KILL_AT_STEP", f"3:{marker}")
    try:
        run_sft(lineage, "base", "fsdp-sft-killed", SFTConfig(**{**SFT, **sharded}),
                data_dir=world.data_dir, log=lambda _: None, overwrite=True)  # fmt: skip
    finally:
        ray.shutdown()
        monkeypatch.delenv("SDFTLAB_KILL_AT_STEP")
    assert marker.read_text() == "killed after step 3\n"  # one of the two workers died
    _close_states(lineage, "fsdp-sft-two", "fsdp-sft-killed", atol=1e-5)
    lineage.verify("fsdp-sft-killed")  # the lineage holds a whole, verifiable state

    # the sharded run's state is a plain checkpoint: transformers and vLLM load it
    from sdftlab.rollout.engines import SamplingSettings, VLLMEngine

    engine = VLLMEngine(str(lineage.resolve("fsdp-sft-two")), seed=0)
    prompt = lineage.load_tokenizer("base")("the compound", add_special_tokens=False)["input_ids"]
    greedy = SamplingSettings(temperature=0.0, max_new_tokens=6)
    out = engine.generate([prompt], greedy)[0]
    model = lineage.load_model("fsdp-sft-two").eval()
    with torch.no_grad():
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0]
    assert out.token_ids == ids[len(prompt) :].tolist()[: len(out.token_ids)]


def test_two_sharded_sdft_workers_follow_one_workers_trajectory(small_world, tutor, tmp_path):
    """Greedy rollouts (transformers `generate`, synced across the sharded ranks) make the
    completions independent of how the prompts are split. The sharded workers take their
    rows one micro-batch at a time and reduce-scatter each (`memory.fsdp_accumulate=sharded`)."""
    world, lineage, _ = small_world
    base = [
        "steps=3", "prompts_per_step=4", "rollout.max_new_tokens=10", "log_every=1",
        "checkpoint_every=3", "warmup_steps=0", "lr=1e-2", "teacher=tutor", "data=[science]",
        "rollout.engine=hf", "rollout.temperature=0", "cpus_per_worker=0.5",
    ]  # fmt: skip
    runs = {}
    sharded = ["num_workers=2", "memory.fsdp=true", "memory.micro_batch_size=1",
               "memory.fsdp_accumulate=sharded"]  # fmt: skip
    for name, extra in (("one", []), ("two", sharded)):
        cfg = load_config(RecoverConfig, None, [*base, *extra])
        path = tmp_path / f"{name}.jsonl"
        recover(lineage, "base", f"fsdp-sdft-{name}", cfg, data_dir=world.data_dir,
                log=lambda _: None, overwrite=True, callbacks=[report_log(path)])  # fmt: skip
        runs[name] = read_report_log(path)
    for key in ("divergence", "loss"):
        one, two = [r[key] for r in runs["one"]], [r[key] for r in runs["two"]]
        assert two == pytest.approx(one, rel=1e-4), (key, one, two)
    _close_states(lineage, "fsdp-sdft-one", "fsdp-sdft-two", atol=1e-4)


def test_fsdp_refuses_what_it_cannot_shard():
    with pytest.raises(ConfigError, match=r"teacher=ema.*memory\.fsdp"):
        load_config(RecoverConfig, None, ["teacher=ema", "memory.fsdp=true"])
