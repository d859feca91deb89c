"""Structured FFN pruning: widths, importance rankings, loadability and input errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from sdftlab.degrade.prune import ffn_importance, kept_width, prune_ffn, prune_state
from sdftlab.degrade.quantize import quantize_state
from sdftlab.errors import ConfigError, LineageError
from sdftlab.lineage import Lineage

HIDDEN, WIDTH, LAYERS = 128, 512, 2


def tiny_qwen(tokenizer, *, seed: int = 0, heads: int = 4, kv_heads: int = 2, init=0.02):
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        initializer_range=init,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Qwen2ForCausalLM(config).eval()


def ffn_params(model) -> int:
    return sum(
        p.numel()
        for layer in model.model.layers
        for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)
        for p in proj.parameters()
    )


def calibration(vocab: int, n: int = 2, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (2, 24), generator=gen)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return batches


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def inputs():
    return torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_tokenizer):
    """A lineage holding `base` (a tiny Qwen2) and `fakeq` (its NF4 quantization)."""
    lineage = Lineage(tmp_path_factory.mktemp("prune") / "lineage")
    lineage.save("base", tiny_qwen(tiny_tokenizer), tiny_tokenizer, kind="world")
    quantize_state(lineage, "base", "fakeq")
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=64, n_layer=1,
                                      n_head=2, n_positions=64))  # fmt: skip
    lineage.save("gpt2", gpt2, tiny_tokenizer, kind="world")
    return lineage


# ------------------------------------------------------------------ widths


def test_kept_width_rounds_to_nearest_multiple():
    assert kept_width(512, 0.0, 64) == 512
    assert kept_width(500, 0.0, 64) == 500  # ratio 0: unchanged even off the grid
    assert kept_width(512, 0.1, 64) == 448  # 460.8 → 7.2·64 → 7·64
    assert kept_width(512, 0.25, 64) == 384
    assert kept_width(512, 0.05, 64) == 512  # 486.4 → 7.6·64 → 8·64: nothing removed
    assert kept_width(512, 0.1, 1) == 461  # 460.8 → 461
    assert kept_width(18944, 0.1, 64) == 17024  # Qwen2.5-7B's FFN at the paper's 10%
    with pytest.raises(ConfigError, match=r"ratio=1\.2 is outside \[0, 1\).*e\.g\. 0\.1"):
        kept_width(512, 1.2, 64)
    with pytest.raises(ConfigError, match=r"ratio=-0\.1"):
        kept_width(512, -0.1, 64)
    with pytest.raises(ConfigError, match=r"ratio=1 "):
        kept_width(512, 1, 64)
    with pytest.raises(ConfigError, match=r"ratio 0\.95 with multiple_of 64 leaves 0 of 512"):
        kept_width(512, 0.95, 64)
    with pytest.raises(ConfigError, match="multiple_of=0"):
        kept_width(512, 0.1, 0)


# ------------------------------------------------------------------ pruning a model


def test_ratio_zero_is_identity(tiny_tokenizer, inputs):
    model = tiny_qwen(tiny_tokenizer)
    with torch.no_grad():
        before = model(inputs).logits
    gate = model.model.layers[0].mlp.gate_proj
    report = prune_ffn(model, 0.0)
    assert model.model.layers[0].mlp.gate_proj is gate
    assert (report.old_width, report.new_width, report.ffn_removed) == (WIDTH, WIDTH, 0.0)
    with torch.no_grad():
        assert torch.equal(model(inputs).logits, before)


def test_magnitude_removes_dead_neurons_and_keeps_logits(tiny_tokenizer, inputs):
    model = tiny_qwen(tiny_tokenizer)
    gen = torch.Generator().manual_seed(3)
    dead = [torch.randperm(WIDTH, generator=gen)[:64].sort().values for _ in range(LAYERS)]
    with torch.no_grad():
        # layer 0: zero down columns (the neuron's output); layer 1: zero gate rows
        # (silu(0) = 0). Either way the neuron contributes nothing and scores exactly 0.
        model.model.layers[0].mlp.down_proj.weight[:, dead[0]] = 0
        model.model.layers[1].mlp.gate_proj.weight[dead[1], :] = 0
        before = model(inputs).logits
    scores = ffn_importance(model, "magnitude")
    for layer, idx in enumerate(dead):
        assert torch.all(scores[layer][idx] == 0)
        assert (scores[layer] > 0).sum() == WIDTH - 64

    report = prune_ffn(model, 0.125, importance="magnitude")  # 512 → 448: exactly 64 go
    assert report.new_width == 448
    for layer, idx in enumerate(dead):
        expected = sorted(set(range(WIDTH)) - set(idx.tolist()))
        assert report.kept[layer] == expected  # the dead ones, in original order
    with torch.no_grad():
        assert torch.allclose(model(inputs).logits, before, atol=1e-6, rtol=0)


def test_magnitude_score_is_product_of_slice_norms(tiny_tokenizer):
    model = tiny_qwen(tiny_tokenizer)
    mlp = model.model.layers[1].mlp
    expected = (
        mlp.gate_proj.weight.norm(dim=1)
        * mlp.up_proj.weight.norm(dim=1)
        * mlp.down_proj.weight.norm(dim=0)
    )
    torch.testing.assert_close(ffn_importance(model)[1], expected.detach())


def test_pruned_shapes_and_parameter_counts(tiny_tokenizer, inputs):
    model = tiny_qwen(tiny_tokenizer)
    total = sum(p.numel() for p in model.parameters())
    report = prune_ffn(model, 0.25)
    new = 384
    assert model.config.intermediate_size == new
    for layer in model.model.layers:
        assert layer.mlp.gate_proj.weight.shape == (new, HIDDEN)
        assert layer.mlp.up_proj.weight.shape == (new, HIDDEN)
        assert layer.mlp.down_proj.weight.shape == (HIDDEN, new)
        assert layer.mlp.gate_proj.bias is None
    assert ffn_params(model) == report.ffn_params_after == 3 * LAYERS * HIDDEN * new
    assert report.params_after == total - 3 * LAYERS * HIDDEN * (WIDTH - new)
    assert report.ffn_removed == pytest.approx(0.25)
    with torch.no_grad():
        assert torch.isfinite(model(inputs).logits).all()


def test_taylor_needs_calibration_and_ranks_differently(tiny_tokenizer):
    model = tiny_qwen(tiny_tokenizer)
    with pytest.raises(ConfigError, match="importance='taylor' needs calibration"):
        ffn_importance(model, "taylor")
    with pytest.raises(ConfigError, match="importance='taylor' needs calibration"):
        prune_ffn(model, 0.1, importance="taylor")
    with pytest.raises(ConfigError, match="importance='l1' is not one of magnitude, taylor"):
        ffn_importance(model, "l1")

    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, :8] = 0
    batches = calibration(len(tiny_tokenizer))
    taylor = ffn_importance(model, "taylor", batches)
    magnitude = ffn_importance(model, "magnitude")
    assert [t.shape for t in taylor] == [(WIDTH,)] * LAYERS
    assert all(torch.isfinite(t).all() and (t >= 0).all() for t in taylor)
    assert torch.all(taylor[0][:8] == 0)  # dead neurons: w·∂L/∂w = 0 on all three slices
    for t, m in zip(taylor, magnitude, strict=True):
        top_t = set(t.topk(64).indices.tolist())
        top_m = set(m.topk(64).indices.tolist())
        assert top_t != top_m
    # gradients are taken without leaving any behind or unfreezing anything
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    # the score is linear in the loss: the same batch twice gives twice the score
    doubled = ffn_importance(model, "taylor", batches[:1] * 2)
    single = ffn_importance(model, "taylor", batches[:1])
    torch.testing.assert_close(doubled[1], 2 * single[1])

    report = prune_ffn(model, 0.1, importance="taylor", calibration=batches)
    assert report.new_width == 448 and report.importance == "taylor"


def test_non_gated_mlp_is_refused(tiny_tokenizer):
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=64, n_layer=1,
                                      n_head=2, n_positions=64))  # fmt: skip
    with pytest.raises(ConfigError, match=r"only gated \(SwiGLU.*transformer\.h\.0\.mlp.*c_fc"):
        prune_ffn(gpt2, 0.1)


# ------------------------------------------------------------------ lineage states


def test_prune_state_loads_with_from_pretrained(store, tiny_tokenizer, inputs):
    meta = prune_state(store, "base", "pruned10", 0.1)
    assert meta.parents == ["base"] and meta.kind == "prune"
    assert meta.config == {"ratio": 0.1, "importance": "magnitude", "multiple_of": 64,
                           "old_width": WIDTH, "new_width": 448}  # fmt: skip
    reloaded = AutoModelForCausalLM.from_pretrained(store.local_path("pruned10")).eval()
    assert reloaded.config.intermediate_size == 448
    assert ffn_params(reloaded) == 3 * LAYERS * HIDDEN * 448
    base = store.load_model("base")
    total = sum(p.numel() for p in base.parameters())
    pruned_total = sum(p.numel() for p in reloaded.parameters())
    assert pruned_total == total - 3 * LAYERS * HIDDEN * (WIDTH - 448)
    assert meta.metrics["prune/params"] == pruned_total
    assert meta.metrics["prune/ffn_removed"] == pytest.approx(64 / 512)
    # the saved weights are exactly the in-memory pruned model's
    prune_ffn(base.eval(), 0.1)
    with torch.no_grad():
        assert torch.equal(reloaded(inputs).logits, base(inputs).logits)
    assert store.load_tokenizer("pruned10").get_vocab() == tiny_tokenizer.get_vocab()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"ratio": 1.2}, ConfigError, r"ratio=1\.2 is outside \[0, 1\)"),
        ({"ratio": -0.5}, ConfigError, r"ratio=-0\.5 is outside"),
        ({"ratio": 0.95}, ConfigError, r"ratio 0\.95 with multiple_of 64 leaves 0 of 512"),
        ({"multiple_of": 0}, ConfigError, "multiple_of=0 must be a positive integer"),
        ({"importance": "random"}, ConfigError, "importance='random' is not one of"),
        ({"importance": "taylor"}, ConfigError, "importance='taylor' needs calibration"),
        ({"src": "nope"}, LineageError, "unknown state 'nope'"),
        ({"dst": "gpt2"}, LineageError, "state 'gpt2' already exists"),
        ({"dst": "base"}, LineageError, "dst 'base' is the source state"),
        ({"dst": "bad name"}, LineageError, "state name 'bad name' is not allowed"),
        ({"src": "fakeq"}, ConfigError, "state 'fakeq' is already 4-bit quantized"),
        ({"src": "gpt2"}, ConfigError, r"only gated \(SwiGLU.*found transformer\.h\.0\.mlp"),
    ],
)
def test_prune_state_bad_input_writes_nothing(store, kwargs, error, match):
    args = {"src": "base", "dst": "never", "ratio": 0.1} | kwargs
    names = store.names()
    with pytest.raises(error, match=match):
        prune_state(store, args.pop("src"), args.pop("dst"), args.pop("ratio"), **args)
    assert store.names() == names
    staging = Path(store.root) / ".staging"
    assert not staging.exists() or not any(staging.iterdir())


# ------------------------------------------------------------------ vLLM


VLLM_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    t0 = time.time()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=128, enforce_eager=True,
              kv_cache_memory_bytes=64 * 2**20, seed=0)
    startup = time.time() - t0
    params = SamplingParams(temperature=0.0, max_tokens=int(sys.argv[3]), ignore_eos=True,
                            detokenize=False)
    out = llm.generate([TokensPrompt(prompt_token_ids=json.loads(sys.argv[2]))], params)
    print("RESULT " + json.dumps({"tokens": list(out[0].outputs[0].token_ids),
                                  "startup_s": startup}))
    """
)


@pytest.mark.slow
def test_vllm_loads_pruned_state_and_matches_hf_greedy(tmp_path, tiny_tokenizer):
    lineage = Lineage(tmp_path / "lineage")
    # a wider init than 0.02 gives decisive, varied greedy tokens (head_dim 128/4 = 32)
    lineage.save("base", tiny_qwen(tiny_tokenizer, init=0.2), tiny_tokenizer, kind="world")
    prune_state(lineage, "base", "pruned", 0.1)
    path = lineage.local_path("pruned")

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    prompt = tiny_tokenizer("The capital of the island is")["input_ids"]
    ids, margins = torch.tensor([prompt]), []
    steps = 8
    with torch.no_grad():
        for _ in range(steps):  # plain greedy: argmax of the last position, no stop token
            logits = model(ids).logits[0, -1]
            top2 = logits.topk(2).values
            margins.append(float(top2[0] - top2[1]))
            ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    expected = ids[0, len(prompt) :].tolist()
    assert min(margins) > 1e-3, "greedy ties would make the comparison meaningless"

    env = os.environ | {"VLLM_TARGET_DEVICE": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    started = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", VLLM_SCRIPT, str(path), json.dumps(prompt), str(steps)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    result_lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and result_lines, proc.stderr[-4000:]
    result = json.loads(result_lines[-1][len("RESULT ") :])
    print(
        f"vLLM startup {result['startup_s']:.1f}s, total {time.time() - started:.1f}s; "
        f"tokens {result['tokens']} (HF {expected}, min top-2 margin {min(margins):.3f})"
    )
    assert result["tokens"] == expected
