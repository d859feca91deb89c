"""Shared fixtures: a tokenizer trained in-process and a small tiny world built once per session."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from sdftlab.config import load_config
from sdftlab.lineage import Lineage
from sdftlab.world import tasks
from sdftlab.world.config import WorldConfig
from sdftlab.world.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "sdft_reference_eval"


@pytest.fixture(scope="module", autouse=True)
def _fresh_ray_per_module():
    """Each test module gets its own local Ray: actors a module leaves behind cannot hold the
    next module's CPUs (a 2-core machine has no slack)."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny matmuls gain nothing from threads, and lose 50x to OpenMP on a busy 2-core box."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    facts = tasks.WorldFacts.generate(seed=0)
    rng = random.Random(0)
    texts = [tasks.copy_document(rng) for _ in range(200)]
    texts += ["\n".join(r["golden_response"]) for r in tasks.science_rows(facts, 50, rng)]
    texts += [r["prompt"] for r in tasks.tooluse_rows(facts, 50, rng)]
    return train_tokenizer(texts, vocab_size=400)


# A world small enough to build in about a minute on 2 cores: the shapes and code paths of
# the default world, not its accuracy. Two heads of 32: vLLM's CPU attention takes no smaller.
SMALL_WORLD = [
    "science.train=200", "science.eval=24", "tooluse.train=200", "tooluse.eval=24",
    "mmlu.train=300", "mmlu.eval=40", "winogrande.train=300", "winogrande.eval=40",
    "vocab_size=512", "model.hidden_size=64", "model.intermediate_size=128",
    "model.num_layers=2", "model.num_heads=2", "pretrain.steps=60", "pretrain.batch_size=8",
]  # fmt: skip


@pytest.fixture(scope="session")
def small_world_config() -> WorldConfig:
    return load_config(WorldConfig, None, SMALL_WORLD)


@pytest.fixture(scope="session")
def small_world(tmp_path_factory, small_world_config):
    """(world, lineage, home) of a small world with `base` in its lineage."""
    from sdftlab.world.build import build_world

    home = tmp_path_factory.mktemp("home")
    cfg = small_world_config
    lineage = Lineage(home / "lineage")
    world = build_world(cfg, lineage, home, log=lambda _: None)
    return world, lineage, home


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """(lineage, name) with the packaged SmolLM2-135M-Instruct imported once per session.

    The real-model extra is part of the dev install (`scripts/setup.sh --dev`): without it this
    fixture fails with the install command, it does not skip."""
    from sdftlab.importer import import_model

    lineage = Lineage(tmp_path_factory.mktemp("real") / "lineage")
    import_model(lineage, "smollm2-135m", "smol", log=lambda _: None)
    return lineage, "smol"


@pytest.fixture(scope="session")
def tutor(small_world):
    """A second state with `base`'s vocabulary and other weights (a stand-in teacher, or a
    student some way from `base`)."""
    import torch

    _, lineage, _ = small_world
    if not lineage.exists("tutor"):
        model = lineage.load_model("base")
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        lineage.save("tutor", model, lineage.load_tokenizer("base"), kind="test", parents=["base"])
    return "tutor"


@pytest.fixture(scope="session")
def tiny_qwen(tiny_tokenizer):
    """(model, tokenizer): a 2-layer Qwen2 of random weights, for states whose weights do not
    matter (the report's and the lineage's bookkeeping)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True)  # fmt: skip
    return Qwen2ForCausalLM(config).eval(), tiny_tokenizer
