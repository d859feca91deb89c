"""NF4 quantization: reloadable 4-bit states, logit drift, QLoRA on CPU, and input errors."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from sdftlab.degrade.prune import prune_ffn
from sdftlab.degrade.quantize import (
    LORA_TARGETS,
    is_quantized,
    load_quantized,
    prepare_4bit_for_cpu,
    qlora_model,
    quantize_state,
)
from sdftlab.errors import ConfigError, LineageError
from sdftlab.lineage import Lineage

HIDDEN, WIDTH, LAYERS = 128, 512, 2


def tiny_qwen(tokenizer, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Qwen2ForCausalLM(config).eval()


def targeted(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in LORA_TARGETS}


def mean_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """KL(p‖q) = Σ_v p_v (log p_v − log q_v), averaged over token positions."""
    log_p, log_q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def inputs():
    return torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_tokenizer):
    """A lineage with `base` (a tiny Qwen2) and `nf4` (base quantized)."""
    lineage = Lineage(tmp_path_factory.mktemp("quant") / "lineage")
    lineage.save("base", tiny_qwen(tiny_tokenizer), tiny_tokenizer, kind="world")
    quantize_state(lineage, "base", "nf4")
    return lineage


def train_step(model, inputs, lr: float = 1e-2) -> float:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    loss = model(input_ids=inputs, labels=inputs).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return float(loss.detach())


# ------------------------------------------------------------------ the quantized state


def test_quantized_state_reloads_as_nf4(store):
    meta = store.meta("nf4")
    assert (meta.kind, meta.parents) == ("quantize", ["base"])
    assert meta.config["quant_type"] == "nf4" and meta.config["double_quant"] is True
    model = AutoModelForCausalLM.from_pretrained(store.local_path("nf4"))
    assert model.config.quantization_config.bnb_4bit_quant_type == "nf4"
    layers = targeted(model)
    assert len(layers) == 7 * LAYERS == meta.metrics["quantize/layers_4bit"]
    for name, layer in layers.items():
        assert isinstance(layer, bnb.nn.Linear4bit), name
        assert layer.weight.quant_state.quant_type == "nf4", name
        assert layer.weight.quant_state.nested, name  # double quantization
    assert is_quantized(model) and is_quantized(store.local_path("nf4"))
    assert not is_quantized(store.local_path("base"))
    assert isinstance(model.lm_head, torch.nn.Linear)  # tied to the fp32 embeddings


def test_nf4_logits_close_to_original(store, inputs):
    base = store.load_model("base").eval()
    quant = load_quantized(store, "nf4").eval()
    with torch.no_grad():
        p, q = base(inputs).logits, quant(inputs).logits
    kl = mean_kl(p, q)
    print(f"KL(original‖nf4) = {kl:.6f} nats/token")
    assert 0 < kl < 0.01 and torch.isfinite(q).all()
    assert (p.argmax(-1) == q.argmax(-1)).float().mean() > 0.9


def test_nf4_beats_fp4_on_gaussian_weights(store, inputs):
    """NF4's levels sit at N(0,1) quantiles, so it loses less than FP4 (QLoRA, Table 2)."""
    quantize_state(store, "base", "fp4", quant_type="fp4", double_quant=False)
    base = store.load_model("base").eval()
    with torch.no_grad():
        p = base(inputs).logits
        kl = {
            name: mean_kl(p, load_quantized(store, name).eval()(inputs).logits)
            for name in ("nf4", "fp4")
        }
    assert 0 < kl["nf4"] < kl["fp4"]


# ------------------------------------------------------------------ QLoRA on CPU


def test_qlora_step_trains_only_lora(store, inputs):
    model = qlora_model(load_quantized(store, "nf4"), r=8, alpha=16)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 7 * LAYERS  # A and B for each targeted layer
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    quant_states = {
        n: m.weight.quant_state.absmax.clone()
        for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)
    }  # fmt: skip

    losses = [train_step(model, inputs), train_step(model, inputs)]
    assert all(torch.isfinite(torch.tensor(losses)))
    # a third backward: after one step B ≠ 0, so every LoRA matrix gets a gradient
    model(input_ids=inputs, labels=inputs).loss.backward()
    for name, param in model.named_parameters():
        if name in trainable:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == trainable  # 4-bit weights, norms, embeddings untouched
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            assert module.weight.dtype == torch.uint8
            assert torch.equal(module.weight.quant_state.absmax, quant_states[name])


def test_eval_forward_before_training_changes_nothing(store, inputs):
    """The AVX512-BF16 pitfall: a no-grad eval forward must not repack the 4-bit weights."""
    runs = []
    for eval_first in (False, True):
        model = load_quantized(store, "nf4")
        if eval_first:
            model.eval()
            with torch.no_grad():
                model(inputs)
            for module in model.modules():
                if isinstance(module, bnb.nn.Linear4bit):
                    assert not getattr(module.weight.quant_state, "packing_format_for_cpu", False)
        torch.manual_seed(0)
        peft_model = qlora_model(model)
        loss = train_step(peft_model, inputs)
        peft_model.eval()
        with torch.no_grad():
            runs.append((loss, peft_model(inputs).logits))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])


def test_prepare_unpacks_layers_packed_by_an_earlier_eval(store, inputs):
    model = AutoModelForCausalLM.from_pretrained(store.local_path("nf4")).eval()
    with torch.no_grad():
        model(inputs)  # on an AVX512-BF16 CPU this repacks every Linear4bit
    packed = sum(
        getattr(m.weight.quant_state, "packing_format_for_cpu", False)
        for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)
    )  # fmt: skip
    if packed:
        with pytest.warns(UserWarning, match="already been repacked"):
            assert prepare_4bit_for_cpu(model) == 7 * LAYERS
    else:
        assert prepare_4bit_for_cpu(model) == 7 * LAYERS
    peft_model = qlora_model(model)
    assert torch.isfinite(torch.tensor(train_step(peft_model, inputs)))
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # trained from B = 0


def test_qlora_rejects_bad_options(store):
    model = load_quantized(store, "nf4")
    with pytest.raises(ConfigError, match=r"r=0 must be a positive integer"):
        qlora_model(model, r=0)
    with pytest.raises(ConfigError, match=r"target_modules.*\['w1'\] not found"):
        qlora_model(model, target_modules=("q_proj", "w1"))


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"src": "nf4"}, ConfigError,
         r"state 'nf4' is already 4-bit quantized \(bitsandbytes nf4\); quantize its "
         r"unquantized parent instead"),
        ({"quant_type": "int3"}, ConfigError, r"quant_type='int3' is not one of nf4, fp4"),
        ({"compute_dtype": "float8"}, ConfigError, r"compute_dtype='float8' is not one of"),
        ({"src": "nope"}, LineageError, "unknown state 'nope'"),
        ({"dst": "nf4"}, LineageError, "state 'nf4' already exists"),
        ({"dst": "a/b"}, LineageError, "state name 'a/b' is not allowed"),
    ],
)  # fmt: skip
def test_quantize_bad_input_writes_nothing(store, kwargs, error, match):
    args = {"src": "base", "dst": "never"} | kwargs
    names = store.names()
    with pytest.raises(error, match=match):
        quantize_state(store, args.pop("src"), args.pop("dst"), **args)
    assert store.names() == names
    staging = Path(store.root) / ".staging"
    assert not staging.exists() or not any(staging.iterdir())


def test_pruning_a_quantized_model_is_refused(store):
    with pytest.raises(ConfigError, match="already 4-bit quantized; prune its unquantized"):
        prune_ffn(load_quantized(store, "nf4"), 0.1)
