"""Live CKA: measured while training, on a fixed probe, equal to an offline `sdftlab cka`."""

from __future__ import annotations

import json

import pytest
import torch

from sdftlab.cka.live import LiveCKA, due
from sdftlab.cka.run import compare_states, load_examples, summary_metrics
from sdftlab.config import load_config
from sdftlab.errors import ConfigError

KEYS = ("last_layer", "mean_over_layers", "sequence_last_layer")


def offline(lineage, state, reference, data_dir, rows):
    """`sdftlab cka --a STATE --b REFERENCE --limit ROWS --no-record`'s summary."""
    examples = load_examples("science", data_dir, rows)
    df = compare_states(lineage, state, reference, examples, record=False)
    return summary_metrics(df, reference)


def test_measurement_equals_offline_cka_and_leaves_the_model_training(
    small_world, tutor, torch_one_thread
):
    world, lineage, _ = small_world
    rows = load_examples("science", world.data_dir, 12)
    live = LiveCKA(lineage.load_model("base"), lineage.load_tokenizer("base"), rows,
                   label="base", every=5)  # fmt: skip
    student = lineage.load_model(tutor).train()
    got = live.measure(student)
    want = offline(lineage, tutor, "base", world.data_dir, 12)
    for key in KEYS:
        assert got[f"live_cka/base/{key}"] == pytest.approx(want[f"cka/base/{key}"], abs=1e-9)
    assert 0 < got["live_cka/base/last_layer"] < 0.9999  # a real difference is measured
    assert student.training and got["live_cka/seconds"] > 0
    same = live.measure(lineage.load_model("base"))
    assert same["live_cka/base/last_layer"] == pytest.approx(1.0, abs=1e-9)


def test_a_lora_student_is_measured_as_its_merged_weights(small_world, torch_one_thread):
    from peft import LoraConfig, get_peft_model

    world, lineage, _ = small_world
    rows = load_examples("science", world.data_dir, 8)
    live = LiveCKA(lineage.load_model("base"), lineage.load_tokenizer("base"), rows,
                   label="base", every=1)  # fmt: skip
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    student = get_peft_model(lineage.load_model("base"), config)
    for name, p in student.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    got = live.measure(student)["live_cka/base/last_layer"]
    merged = live.measure(student.merge_and_unload())["live_cka/base/last_layer"]
    assert got == pytest.approx(merged, abs=1e-6) and got < 0.9999


def test_measurements_fall_every_n_steps_and_on_the_last():
    assert [s for s in range(1, 26) if due(10, s, last=25)] == [10, 20, 25]
    assert not any(due(0, s, last=25) for s in range(1, 26))


@pytest.mark.slow
def test_sdft_reports_live_cka_that_equals_offline_cka_of_the_saved_state(small_world, tutor):
    """SDFT from `tutor` towards `base`: measured at steps 2 and 4, saved with the state
    (`live_cka.json`, the metrics), the last equal to `sdftlab cka` of the saved weights."""
    from sdftlab.distill.config import RecoverConfig
    from sdftlab.distill.sdft import recover

    world, lineage, _ = small_world
    cfg = load_config(RecoverConfig, None, [
        "teacher=base", "data=[science]", "steps=4", "prompts_per_step=4", "lr=3e-3",
        "rollout={engine: hf, max_new_tokens: 8}", "live_cka={every: 2, rows: 8}",
    ])  # fmt: skip
    meta = recover(lineage, tutor, "live-rec", cfg, data_dir=world.data_dir, overwrite=True)
    history = json.loads((lineage.local_path("live-rec") / "live_cka.json").read_text())
    assert [h["step"] for h in history] == [2, 4]
    want = offline(lineage, "live-rec", "base", world.data_dir, 8)
    for key in KEYS:
        recorded = meta.metrics[f"live_cka/base/{key}"]
        assert recorded == history[-1][f"live_cka/base/{key}"]
        assert recorded == pytest.approx(want[f"cka/base/{key}"], abs=1e-5)
    before = offline(lineage, tutor, "base", world.data_dir, 8)["cka/base/last_layer"]
    assert history[-1]["live_cka/base/last_layer"] != pytest.approx(before, abs=1e-6)


@pytest.mark.slow
def test_sft_measures_against_its_starting_state(small_world):
    from sdftlab.degrade.sft import SFTConfig, run_sft

    world, lineage, _ = small_world
    cfg = load_config(SFTConfig, None, [
        "data=[science]", "steps=3", "batch_size=4", "lr=3e-3", "live_cka={every: 2, rows: 8}",
    ])  # fmt: skip
    meta = run_sft(lineage, "base", "live-sft", cfg, data_dir=world.data_dir, overwrite=True,
                   log=lambda _: None)  # fmt: skip
    history = json.loads((lineage.local_path("live-sft") / "live_cka.json").read_text())
    assert [h["step"] for h in history] == [2, 3]
    want = offline(lineage, "live-sft", "base", world.data_dir, 8)["cka/base/last_layer"]
    assert meta.metrics["live_cka/base/last_layer"] == pytest.approx(want, abs=1e-5)
    assert want < 0.9999


def test_a_probe_without_data_is_one_clear_error_before_any_work(small_world):
    from sdftlab.cka.live import live_probe
    from sdftlab.specs import LiveCKASpec

    _, lineage, _ = small_world
    with pytest.raises(ConfigError, match=r"live_cka: .*no tiny world.*live_cka\.every=0"):
        live_probe(lineage, LiveCKASpec(), reference="base", data="science", data_dir=None)
    assert live_probe(lineage, LiveCKASpec(every=0), reference="base", data="science",
                      data_dir=None) is None  # fmt: skip
