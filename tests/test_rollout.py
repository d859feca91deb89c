"""The transformers rollout engine: batched, left-padded generation whose log-probs are the
model's own (what the trainer computes), per prompt and per sample; which vLLM reload warnings
the rollout actors drop."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from sdftlab.rollout.engines import HFEngine, SamplingSettings
from sdftlab.rollout.vllm_ext import RELOAD_LOGGER, ComputedCacheReloadFilter

EOS, PAD = 1, 0


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
        eos_token_id=EOS, pad_token_id=PAD,
    )  # fmt: skip
    return Qwen2ForCausalLM(cfg).eval()


PROMPTS = [[5, 9, 12], [7, 3, 3, 20, 41, 8, 2], [30]]


def _forward_logp(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0]
    logp = F.log_softmax(logits.float(), -1)
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(tokens) - 1)
    return logp[pos, torch.tensor(tokens)]


@pytest.mark.parametrize("max_batch", [1, 2, 32])
def test_engine_logprobs_are_the_models_own_for_every_prompt(model, max_batch):
    engine = HFEngine(model, EOS, PAD, max_batch=max_batch)
    out = engine.generate(PROMPTS, SamplingSettings(n=2, max_new_tokens=6, seed=0))
    assert [c.prompt_ids for c in out] == [p for p in PROMPTS for _ in range(2)]
    for c in out:
        assert 1 <= len(c.token_ids) <= 6 and len(c.logprobs) == len(c.token_ids)
        expected = _forward_logp(model, c.prompt_ids, c.token_ids)
        assert torch.allclose(torch.tensor(c.logprobs), expected, atol=1e-4)


def test_greedy_generation_does_not_depend_on_the_batch(model):
    greedy = SamplingSettings(temperature=0.0, max_new_tokens=8)
    alone = [HFEngine(model, EOS, PAD, max_batch=1).generate([p], greedy)[0] for p in PROMPTS]
    batched = HFEngine(model, EOS, PAD, max_batch=8).generate(PROMPTS, greedy)
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]


def test_a_seed_makes_sampling_repeatable(model):
    engine = HFEngine(model, EOS, PAD)
    settings = SamplingSettings(max_new_tokens=8, seed=7)
    first = [c.token_ids for c in engine.generate(PROMPTS, settings)]
    assert first == [c.token_ids for c in engine.generate(PROMPTS, settings)]


def _reload_warning(layer: str) -> logging.LogRecord:
    return logging.LogRecord(
        RELOAD_LOGGER, logging.WARNING, __file__, 0, "%s: Failed to load weights", (layer,), None
    )


def test_only_the_rotary_caches_reload_warning_is_dropped():
    """The rotary cos/sin cache is computed, never loaded: vLLM's per-sync warning about it
    is dropped. A layer with real weights that failed to load still warns."""
    keep = ComputedCacheReloadFilter()
    assert not keep.filter(_reload_warning("RotaryEmbedding"))
    assert not keep.filter(_reload_warning("Llama3RotaryEmbedding"))
    assert keep.filter(_reload_warning("QKVParallelLinear"))
    other = logging.LogRecord(RELOAD_LOGGER, logging.WARNING, "", 0, "reload %s", ("x",), None)
    assert keep.filter(other)
    assert keep.dropped == 2
