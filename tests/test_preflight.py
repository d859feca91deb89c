"""The SDFT teacher's pre-flight: its accuracy without and with the demonstration on the
recovery's own rows, engine and budget, in a Ray task, equals evaluating it directly; a
teacher that does not gain from the demonstration gets one warning line."""

from __future__ import annotations

import pytest

from sdftlab.config import load_config
from sdftlab.data.loaders import world_task_file
from sdftlab.distill.config import RecoverConfig
from sdftlab.evaluate.run import evaluate_state
from sdftlab.pipelines.preflight import preflight_engine, teacher_preflight


@pytest.mark.slow
def test_the_preflight_is_the_teachers_accuracy_on_the_recoverys_rows(small_world, capsys):
    world, lineage, _ = small_world
    overrides = ["teacher=base", "data=[science]", "rollout.engine=hf",
                 "rollout.max_new_tokens=48"]  # fmt: skip
    cfg = load_config(RecoverConfig, None, overrides)
    lines: list[str] = []
    got = teacher_preflight(lineage, "base", cfg, world.data_dir, 6, lines.append)
    train = {"science": world_task_file(world.data_dir, "science", "train")}
    engine = preflight_engine(cfg)
    direct = evaluate_state(lineage, "base", train, with_demonstration=True, limit=6,
                            engine=engine, record=False, log=lambda _: None)  # fmt: skip
    assert got == {
        "preflight/science/acc": direct["science/acc"],
        "preflight/science/acc_demo": direct["science/acc_demo"],
        "preflight/science/n": 6.0,
    }
    assert lines[0].startswith("pre-flight: teacher base on science: ")
    warned = "does not gain from the demonstration" in capsys.readouterr().err
    assert warned == (direct["science/acc_demo"] <= direct["science/acc"])
    assert "preflight/science/acc" not in lineage.meta("base").metrics  # nothing recorded


def test_no_preflight_when_off_or_off_policy(small_world):
    world, lineage, _ = small_world
    cfg = load_config(RecoverConfig, None, ["teacher=base"])
    assert teacher_preflight(lineage, "base", cfg, world.data_dir, 0, print) == {}
    off = load_config(RecoverConfig, None, ["teacher=base", "mode=off_policy"])
    assert teacher_preflight(lineage, "base", off, world.data_dir, 8, print) == {}
