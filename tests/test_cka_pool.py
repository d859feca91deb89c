"""The CKA actor pool on Ray Data, `compare_states` and the CKA plots.

The pool must reproduce the single-process result (`cka_local`) to 1e-10 — in the one-pass
and the two-pass (debiased + standardized) route — give CKA 1 for a state against itself,
and ship its partial statistics as Arrow binary (npz bytes), never as pickled objects.
`compare_states` must record its summary metrics in the lineage; the plots must write
real PNG files atomically.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from sdftlab.cka.capture import CKAAccumulator
from sdftlab.cka.plots import plot_cka_by_layer, plot_misalignment_vs_accuracy
from sdftlab.cka.pool import CKAOptions, CKAWorker, chunk_examples, cka_local, cka_over_dataset
from sdftlab.cka.run import (
    add_cli_arguments,
    compare_states,
    format_table,
    run_cli,
    summary_metrics,
)
from sdftlab.data.loaders import load_task_file
from sdftlab.errors import ConfigError

TOL = 1e-10
NUMERIC = ["cka", "cka_biased", "cka_debiased", "cka_standardized", "sequence_cka"]
NOISY = "base-noisy"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def world_pair(small_world):
    """(lineage, 24 science eval examples) with `base` and a noisy copy of it, `base-noisy`."""
    world, lineage, _ = small_world
    if not lineage.exists(NOISY):
        model = lineage.load_model("base")
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * p.std() * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        lineage.save(NOISY, model, lineage.load_tokenizer("base"), kind="test", parents=["base"])
    examples = load_task_file(world.task_file("science", "eval"), "science")
    assert len(examples) == 24
    return lineage, examples, small_world


@pytest.fixture(scope="module")
def ray_cluster():
    from sdftlab.raycluster import ensure_ray

    ensure_ray(num_cpus=2)


def assert_same(df1: pd.DataFrame, df2: pd.DataFrame, tol: float = TOL) -> None:
    assert df1[["layer_a", "layer_b", "n_samples", "n_sequences"]].equals(
        df2[["layer_a", "layer_b", "n_samples", "n_sequences"]]
    )
    a, b = df1[NUMERIC].to_numpy(float), df2[NUMERIC].to_numpy(float)
    assert np.array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(np.nan_to_num(a), np.nan_to_num(b), rtol=0, atol=tol)


@pytest.mark.slow
def test_pool_with_two_actors_equals_the_single_process_result(world_pair, ray_cluster):
    lineage, examples, _ = world_pair
    opts = CKAOptions(batch_size=5, dtype="float64")
    local = cka_local(lineage, NOISY, "base", examples, opts)
    pooled = cka_over_dataset(lineage, NOISY, "base", examples, opts, actors=2)
    assert_same(pooled, local)
    assert (pooled["n_samples"] == 24).all()
    assert list(pooled["layer_a"]) == list(pooled["layer_b"]) == [0, 1, 2]
    assert (pooled["cka"].iloc[1:] < 0.999).all()  # the noise really moved the states apart


@pytest.mark.slow
def test_pool_two_pass_debiased_standardized_equals_local(world_pair, ray_cluster):
    lineage, examples, _ = world_pair
    opts = CKAOptions(batch_size=7, dtype="float64", debiased=True, layers="last")
    local = cka_local(lineage, NOISY, "base", examples, opts)
    pooled = cka_over_dataset(lineage, NOISY, "base", examples, opts, actors=2)
    assert_same(pooled, local)
    assert not math.isnan(pooled["cka"].iloc[0])
    assert pooled["cka"].iloc[0] == pooled["cka_standardized"].iloc[0]


@pytest.mark.slow
def test_pool_state_against_itself_is_one(world_pair, ray_cluster):
    lineage, examples, _ = world_pair
    df = cka_over_dataset(lineage, "base", "base", examples, CKAOptions(batch_size=8), actors=2)
    for col in ("cka", "cka_biased", "cka_debiased", "sequence_cka"):
        np.testing.assert_allclose(df[col], 1.0, rtol=0, atol=TOL)


@pytest.mark.slow
def test_worker_returns_npz_bytes_as_arrow_binary(world_pair):
    lineage, examples, _ = world_pair
    opts = CKAOptions(batch_size=4)
    worker = CKAWorker(str(lineage.resolve(NOISY)), str(lineage.resolve("base")), opts.to_json())
    chunks = chunk_examples(examples[:8], 4)
    out = worker({"examples": np.array([json.dumps(c) for c in chunks], dtype=object)})
    assert out["stats"].shape == (1,) and isinstance(out["stats"][0], bytes)
    assert pa.array(list(out["stats"])).type == pa.binary()  # what Ray Data stores
    acc = CKAAccumulator.from_bytes(out["stats"][0])  # np.load(allow_pickle=False) inside
    assert acc.n_samples == int(out["n_samples"][0]) == 8


@pytest.mark.slow
def test_compare_states_records_summary_metrics(world_pair):
    lineage, examples, _ = world_pair
    df = compare_states(lineage, NOISY, "base", examples, CKAOptions(batch_size=8))
    metrics = lineage.meta(NOISY).metrics
    last = df[df["layer_a"] == 2].iloc[0]
    assert metrics["cka/base/last_layer"] == pytest.approx(last["cka"])
    assert metrics["cka/base/last_layer"] == pytest.approx(last["cka_standardized"])
    assert metrics["cka/base/mean_over_layers"] == pytest.approx(df["cka"].iloc[1:].mean())
    assert metrics["cka/base/sequence_last_layer"] == pytest.approx(last["sequence_cka"])
    assert "cka/base-noisy/last_layer" not in lineage.meta("base").metrics
    table = format_table(df, title="noisy vs base")
    assert table.count("\n| ") == 4  # header + 3 layers and "| 2 | 2 | 1.00 |" in table

    # record=False leaves the lineage alone; a layer set without the last layer cannot record.
    before = dict(lineage.meta(NOISY).metrics)
    compare_states(lineage, NOISY, "base", examples[:6], CKAOptions(batch_size=8), record=False)
    assert lineage.meta(NOISY).metrics == before
    with pytest.raises(ConfigError, match="last"):
        compare_states(lineage, NOISY, "base", examples[:6], CKAOptions(layers=[0, 1]))
    partial = compare_states(lineage, NOISY, "base", examples[:6], CKAOptions(layers=[0, 1]),
                             record=False)  # fmt: skip
    with pytest.raises(ConfigError, match="no \\(last, last\\) layer pair"):
        summary_metrics(partial, "base")


@pytest.mark.slow
def test_cli_helpers_run_a_comparison_and_plot(world_pair, tmp_path):
    world, lineage, _ = world_pair[2]
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    png = tmp_path / "cka.png"
    argv = ["--data", "science", "--limit", "8", "--no-record", "--layers", "last"]
    args = parser.parse_args(["--a", NOISY, "--b", "base", "--plot", str(png), *argv])
    before = dict(lineage.meta(NOISY).metrics)
    table = run_cli(args, lineage, world.data_dir)
    assert "| 2 | 2 | 1.00 |" in table and table.count("\n| ") == 2
    assert_png(png)
    assert lineage.meta(NOISY).metrics == before


# ------------------------------------------------------------------------------ plots


def fake_result(values: list[float], seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = len(values)
    return pd.DataFrame(
        {
            "layer_a": range(n),
            "layer_b": range(n),
            "relative_depth": np.arange(n) / (n - 1),
            "cka": values,
            "sequence_cka": np.clip(np.array(values) + rng.normal(0, 0.02, n), 0, 1),
            "sequence_cka_se": np.full(n, 0.01),
        }
    )


def assert_png(path) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in path.parent.iterdir() if p.name != path.name] == []


def test_cka_by_layer_plot_writes_a_png_atomically(tmp_path):
    out = tmp_path / "plots" / "by_layer.png"
    results = {
        "forgot": fake_result([1, 0.9, 0.7, 0.5, 0.4], 0),
        "sdft": fake_result([1, 1, 0.9, 0.8, 0.8], 1),
    }
    assert plot_cka_by_layer(results, "expert", out) == out
    assert_png(out)
    plot_cka_by_layer(results, "expert", out)  # overwriting is fine, still no temp files
    assert_png(out)
    dup = pd.concat([results["forgot"], results["forgot"]])
    with pytest.raises(ConfigError, match="several rows per layer_a"):
        plot_cka_by_layer({"x": dup}, "expert", tmp_path / "dup.png")
    assert not (tmp_path / "dup.png").exists()


def test_misalignment_plot_returns_pearson_and_handles_few_points(tmp_path):
    points = [
        ("forgot", 0.35, -0.30),
        ("sft", 0.20, -0.12),
        ("sdft", 0.05, -0.02),
        ("kd", 0.12, -0.1),
    ]
    out = tmp_path / "misalign.png"
    r = plot_misalignment_vs_accuracy(points, out)
    x, y = np.array([p[1] for p in points]), np.array([p[2] for p in points])
    assert r == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert r < -0.9
    assert_png(out)
    few = tmp_path / "few" / "two.png"
    assert math.isnan(plot_misalignment_vs_accuracy(points[:2], few))
    assert_png(few)
