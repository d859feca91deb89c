"""Hidden-state capture and the per-layer CKA accumulator (sdftlab.cka.capture), no Ray.

Tiny random Qwen2 models run in float64, so padding, batching and sharding must leave every
statistic unchanged to 1e-10; pooling is checked against a hand computation on each
sequence run alone, and every user error must raise the error that names it.
"""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from sdftlab.cka import CKAStats, cka, sequence_cka
from sdftlab.cka.capture import (
    CKAAccumulator,
    LayerPairs,
    capture_hidden_states,
    collate,
    encode_examples,
    pool_tokens,
    relative_depth_map,
)
from sdftlab.cka.pool import CKAOptions, PairRunner, chunk_examples, cka_local
from sdftlab.data.loaders import row_to_example
from sdftlab.errors import ConfigError, DataError
from sdftlab.lineage import Lineage
from sdftlab.world import tasks

TOL = 1e-10
NUMERIC = [
    "cka",
    "cka_biased",
    "cka_debiased",
    "cka_standardized",
    "sequence_cka",
    "sequence_cka_se",
]


def tiny_qwen(tok, hidden: int, layers: int, seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return Qwen2ForCausalLM(config).to(torch.float64).eval()


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def examples():
    facts = tasks.WorldFacts.generate(seed=0)
    rows = tasks.science_rows(facts, 12, random.Random(3))
    return [row_to_example("test", "science", i, r) for i, r in enumerate(rows)]


@pytest.fixture(scope="module")
def model64(tiny_tokenizer):
    return tiny_qwen(tiny_tokenizer, hidden=64, layers=2, seed=0)


@pytest.fixture(scope="module")
def model32(tiny_tokenizer):
    return tiny_qwen(tiny_tokenizer, hidden=32, layers=4, seed=1)


def run(model_a, model_b, tok, examples, **opts):
    """A CKAAccumulator over `examples` in chunks of batch_size (the cka_local loop)."""
    options = CKAOptions(**{"dtype": "float64", **opts})
    runner = PairRunner(model_a, model_b, tok, options)
    acc = runner.new_accumulator()
    for chunk in chunk_examples(examples, options.batch_size):
        runner.add_chunk(acc, chunk)
    return acc


def assert_same_results(df1, df2, tol: float = TOL) -> None:
    assert df1[["layer_a", "layer_b", "n_samples"]].equals(df2[["layer_a", "layer_b", "n_samples"]])
    a, b = df1[NUMERIC].to_numpy(float), df2[NUMERIC].to_numpy(float)
    assert np.array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(np.nan_to_num(a), np.nan_to_num(b), rtol=0, atol=tol)


def hidden_alone(model, tok, example, max_len: int = 512):
    """Hidden states (numpy, [T, D] per layer) of one example run alone, and its masks."""
    enc = encode_examples(tok, [example], max_len)[0]
    with torch.no_grad():
        out = model(torch.tensor([enc.input_ids]), output_hidden_states=True)
    return [h[0].double().numpy() for h in out.hidden_states], np.array(enc.answer_mask)


# ------------------------------------------------------------------------------ encoding


def test_encoding_is_chat_prompt_then_answer_then_eos(tiny_tokenizer, examples):
    tok = tiny_tokenizer
    ex = examples[0]
    enc = encode_examples(tok, [ex], max_len=512)[0]
    prompt = tok.apply_chat_template(ex.messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    n_prompt = len(prompt_ids)
    assert list(enc.input_ids[:n_prompt]) == prompt_ids
    assert enc.answer_mask == (False,) * n_prompt + (True,) * (len(enc) - n_prompt)
    assert enc.input_ids[-1] == tok.eos_token_id
    answer = [t for t, m in zip(enc.input_ids, enc.answer_mask, strict=True) if m]
    assert tok.decode(answer[:-1]) == ex.demonstration

    # Too long: prompt tokens go from the left, the answer stays whole.
    short = encode_examples(tok, [ex], max_len=enc.n_answer + 3)[0]
    assert len(short) == enc.n_answer + 3
    assert short.input_ids == enc.input_ids[-len(short) :]
    assert short.n_answer == enc.n_answer
    with pytest.raises(DataError, match="max_len"):
        encode_examples(tok, [ex], max_len=enc.n_answer - 1)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_never_enters_a_statistic(tiny_tokenizer, examples, model64, model32, side):
    """Each sequence alone vs the same sequences padded into one batch: same statistics."""
    tok = tiny_tokenizer
    enc = encode_examples(tok, examples[:5], max_len=512)
    assert len({len(e) for e in enc}) > 1  # some sequences really are padded
    b = collate(enc, tok.pad_token_id, padding_side=side)
    hs_a, hs_b = capture_hidden_states(model64, b), capture_hidden_states(model32, b)
    pad = ~b.attention_mask_BT
    assert pad.any() and all(float(h[pad].abs().max()) == 0.0 for h in hs_a + hs_b)
    singles = [collate([e], tok.pad_token_id) for e in enc]
    single_hs = [
        (capture_hidden_states(model64, s), capture_hidden_states(model32, s)) for s in singles
    ]
    for pooling in ("answer_mean", "last"):
        for seq_tokens in ("answer", "all"):
            setup = {"pooling": pooling, "sequence_tokens": seq_tokens}
            padded = CKAAccumulator(LayerPairs.build("all", 2, 4), **setup)
            padded.add_batch(hs_a, hs_b, b)
            alone = CKAAccumulator(LayerPairs.build("all", 2, 4), **setup)
            for s, (ha, hb) in zip(singles, single_hs, strict=True):
                alone.add_batch(ha, hb, s)
            assert_same_results(padded.results(), alone.results())
            for s_pad, s_one in zip(padded.stats, alone.stats, strict=True):
                c_pad, c_one = s_pad.centered(), s_one.centered()
                for name in ("xtx_DD", "yty_EE", "xty_DE", "x_qy_D", "y_qx_E"):
                    np.testing.assert_allclose(
                        getattr(c_pad, name), getattr(c_one, name), rtol=0, atol=TOL
                    )
                assert c_pad.sum_qx_qy == pytest.approx(c_one.sum_qx_qy, rel=TOL, abs=TOL)


# ------------------------------------------------------------------------------ CKA values


def test_a_model_against_itself_has_cka_one_at_every_layer(tiny_tokenizer, examples, model64):
    for seq_tokens in ("answer", "all"):
        acc = run(
            model64, model64, tiny_tokenizer, examples, batch_size=5, sequence_tokens=seq_tokens
        )
        df = acc.results()
        assert list(df["layer_a"]) == [0, 1, 2] and list(df["layer_b"]) == [0, 1, 2]
        for col in ("cka", "cka_biased", "cka_debiased", "cka_standardized", "sequence_cka"):
            np.testing.assert_allclose(df[col], 1.0, rtol=0, atol=TOL)
        assert (df["n_samples"] == len(examples)).all()
        assert (df["n_sequences"] == len(examples)).all()


def test_batch_size_and_shard_split_do_not_change_results(tiny_tokenizer, examples, model64):
    other = copy.deepcopy(model64)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.3 * p.std() * torch.randn_like(p))
    tok = tiny_tokenizer
    reference = run(model64, other, tok, examples, batch_size=1).results()
    assert (reference["cka"] < 0.999).all()  # the two models really differ
    for bs in (3, 5, 12):
        assert_same_results(run(model64, other, tok, examples, batch_size=bs).results(), reference)
    # Shards accumulated apart (as Ray actors do), serialized, merged in either order.
    s1 = run(model64, other, tok, examples[:7], batch_size=4)
    s2 = run(model64, other, tok, examples[7:], batch_size=2)
    s1b, s2b = (CKAAccumulator.from_bytes(s.to_bytes()) for s in (s1, s2))
    assert_same_results(s1b.merge(s2b).results(), reference)
    assert_same_results((s2 + s1).results(), reference)
    # Merging an empty accumulator changes nothing.
    assert_same_results(s1.merge(s2)._empty_like().merge(s1 + s2).results(), reference)


def test_answer_mean_pools_only_answer_tokens(tiny_tokenizer, examples, model64, model32):
    """The accumulator's CKA equals a hand computation from each sequence run alone."""
    tok = tiny_tokenizer
    xs, ys, seq = [], [], []
    for ex in examples:
        ha, mask = hidden_alone(model64, tok, ex)
        hb, _ = hidden_alone(model32, tok, ex)
        xs.append(ha[2][mask].mean(axis=0))  # last layer of a (2 layers) ...
        ys.append(hb[4][mask].mean(axis=0))  # ... at the same relative depth in b (4 layers)
        seq.append(sequence_cka(ha[2][mask], hb[4][mask]))
    x_ND, y_NE = np.array(xs), np.array(ys)
    stats = CKAStats.from_arrays(x_ND, y_NE)
    df = run(model64, model32, tok, examples, batch_size=5).results()
    last = df[df["layer_a"] == 2].iloc[0]
    assert last["layer_b"] == 4 and (last["dim_a"], last["dim_b"]) == (64, 32)
    assert last["cka_biased"] == pytest.approx(cka(stats), abs=TOL)
    assert last["cka"] == pytest.approx(cka(stats, standardize=True), abs=TOL)
    assert last["cka_debiased"] == pytest.approx(cka(stats, debiased=True), abs=TOL)
    assert last["sequence_cka"] == pytest.approx(np.mean(seq), abs=TOL)


def test_prompt_tokens_do_not_reach_answer_pooled_statistics(tiny_tokenizer, examples, model64):
    """Overwrite the prompt positions' hidden states: answer_mean and answer-only sequence
    CKA do not move; all-token sequence CKA and a changed answer token do."""
    tok = tiny_tokenizer
    b = collate(encode_examples(tok, examples[:6], 512), tok.pad_token_id)
    hs = capture_hidden_states(model64, b)
    prompt_BT = b.attention_mask_BT & ~b.answer_mask_BT
    noisy = [h.clone() for h in hs]
    gen = torch.Generator().manual_seed(0)
    for h in noisy:
        h[prompt_BT] = torch.randn(h[prompt_BT].shape, generator=gen, dtype=h.dtype) * 5

    def result(hs_b, seq_tokens="answer", pooling="answer_mean"):
        acc = CKAAccumulator(
            LayerPairs.build("diagonal", 2, 2), pooling=pooling, sequence_tokens=seq_tokens
        )
        return acc.add_batch(hs, hs_b, b).results()

    for pooling in ("answer_mean", "last"):
        assert_same_results(result(noisy, pooling=pooling), result(hs, pooling=pooling))
    assert not np.allclose(result(noisy, "all")["sequence_cka"], result(hs, "all")["sequence_cka"])
    answer_changed = [h.clone() for h in hs]
    first_answer_T = b.answer_mask_BT[0].nonzero()[0, 0]
    for h in answer_changed:
        h[0, first_answer_T] += 3.0
    assert not np.allclose(result(answer_changed)["cka_biased"], result(hs)["cka_biased"])
    # The pooled rows themselves: the mean of the answer tokens / the last real token.
    for h in hs:
        h_BTD = h.numpy()
        att, ans = b.attention_mask_BT.numpy(), b.answer_mask_BT.numpy()
        for i in range(b.size):
            np.testing.assert_allclose(
                pool_tokens(h_BTD, att, ans, "answer_mean")[i], h_BTD[i, ans[i]].mean(axis=0)
            )
            last_T = np.nonzero(att[i])[0][-1]
            np.testing.assert_array_equal(pool_tokens(h_BTD, att, ans, "last")[i], h_BTD[i, last_T])


# ------------------------------------------------------------------------------ layer pairs


def test_relative_depth_mapping_and_layer_specs():
    assert LayerPairs.build("diagonal", 2, 4).pairs == ((0, 0), (1, 2), (2, 4))
    assert LayerPairs.build("diagonal", 4, 2).pairs == ((0, 0), (1, 1), (2, 1), (3, 2), (4, 2))
    assert LayerPairs.build("diagonal", 3, 3).pairs == ((0, 0), (1, 1), (2, 2), (3, 3))
    assert LayerPairs.build("last", 2, 4).pairs == ((2, 4),)
    assert len(LayerPairs.build("all", 2, 4)) == 3 * 5
    assert LayerPairs.build([1, 2], 2, 4).pairs == ((1, 2), (2, 4))
    assert LayerPairs.build("0,2", 2, 4).pairs == ((0, 0), (2, 4))
    assert LayerPairs.build([(2, 3)], 2, 4).pairs == ((2, 3),)
    for la, lb in [(2, 4), (4, 2), (28, 36), (7, 3)]:
        assert relative_depth_map(0, la, lb) == 0 and relative_depth_map(la, la, lb) == lb
        mapped = [relative_depth_map(i, la, lb) for i in range(la + 1)]
        assert mapped == sorted(mapped)
        assert all(abs(m - i * lb / la) <= 0.5 for i, m in enumerate(mapped))


def test_different_hidden_sizes_and_depths_through_cka_local(
    tiny_tokenizer, examples, model64, model32, tmp_path
):
    lineage = Lineage(tmp_path / "lineage")
    lineage.save("wide", model64, tiny_tokenizer, kind="test")  # float64 weights
    lineage.save("narrow", model32, tiny_tokenizer, kind="test")
    df = cka_local(lineage, "wide", "narrow", examples, CKAOptions(batch_size=4, dtype="float64"))
    assert list(zip(df["layer_a"], df["layer_b"], strict=True)) == [(0, 0), (1, 2), (2, 4)]
    assert list(df["relative_depth"]) == [0.0, 0.5, 1.0]
    assert (df["dim_a"] == 64).all() and (df["dim_b"] == 32).all()
    assert ((df["cka"] > 0) & (df["cka"] < 1)).all()
    direct = run(model64, model32, tiny_tokenizer, examples, batch_size=4).results()
    assert_same_results(df, direct)
    flipped = cka_local(lineage, "narrow", "wide", examples,
                        CKAOptions(batch_size=4, dtype="float64"))  # fmt: skip
    assert list(flipped["layer_b"]) == [0, 1, 1, 2, 2]


def test_two_pass_debiased_standardized_matches_a_direct_computation(
    tiny_tokenizer, examples, model64, model32
):
    tok = tiny_tokenizer
    first = run(model64, model32, tok, examples, batch_size=5)
    with pytest.raises(DataError, match="two-pass"):
        first.results(debiased=True, standardize=True)
    runner = PairRunner(model64, model32, tok, CKAOptions(dtype="float64", batch_size=5))
    second = runner.new_accumulator(first.fit_standardizers())
    for chunk in chunk_examples(examples, 5):
        runner.add_chunk(second, chunk)
    second = CKAAccumulator.from_bytes(second.to_bytes())
    df = second.results(debiased=True, standardize=True)
    # Direct: standardize the pooled rows with numpy, debiased HSIC from the n×n Gram form.
    b = collate(encode_examples(tok, examples, 512), tok.pad_token_id)
    att, ans = b.attention_mask_BT.numpy(), b.answer_mask_BT.numpy()
    x = pool_tokens(capture_hidden_states(model64, b)[2].numpy(), att, ans, "answer_mean")
    y = pool_tokens(capture_hidden_states(model32, b)[4].numpy(), att, ans, "answer_mean")
    x, y = (x - x.mean(0)) / x.std(0), (y - y.mean(0)) / y.std(0)

    def hsic_u(k, m):
        n = k.shape[0]
        k, m = k.copy(), m.copy()
        np.fill_diagonal(k, 0)
        np.fill_diagonal(m, 0)
        one = np.ones(n)
        return (
            np.trace(k @ m)
            + (one @ k @ one) * (one @ m @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * (one @ k @ m @ one)
        ) / (n * (n - 3))

    kx, ky = x @ x.T, y @ y.T
    expected = hsic_u(kx, ky) / np.sqrt(hsic_u(kx, kx) * hsic_u(ky, ky))
    last = df[df["layer_a"] == 2].iloc[0]
    assert last["cka"] == pytest.approx(expected, abs=TOL)
    assert last["cka_standardized"] == pytest.approx(expected, abs=TOL)
    assert last["cka_biased"] == pytest.approx(first.results()["cka_biased"].iloc[-1], abs=TOL)


# ------------------------------------------------------------------------------ errors


def test_layer_out_of_range_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match=r"layer 3 of model a is out of range.*0\.\.2"):
        LayerPairs.build([3], 2, 4)
    with pytest.raises(ConfigError, match=r"layer 5 of model b is out of range.*0\.\.4"):
        LayerPairs.build([(1, 5)], 2, 4)
    with pytest.raises(ConfigError, match="layer -1"):
        LayerPairs.build([-1], 2, 4)
    with pytest.raises(ConfigError, match="diagonal"):
        LayerPairs.build("diagnal", 2, 4)


def test_nan_activations_are_a_data_error_naming_the_layer(tiny_tokenizer, examples, model64):
    tok = tiny_tokenizer
    b = collate(encode_examples(tok, examples[:3], 512), tok.pad_token_id)
    hs = capture_hidden_states(model64, b)
    bad = [h.clone() for h in hs]
    bad[1][0, 2, 5] = float("nan")
    acc = CKAAccumulator(LayerPairs.build("diagonal", 2, 2))
    with pytest.raises(DataError, match="model b at layer 1"):
        acc.add_batch(hs, bad, b)
    # NaN weights in decoder layer 2 (index 1 of model.layers): hidden state 2 is NaN.
    broken = copy.deepcopy(model64)
    with torch.no_grad():
        broken.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(DataError, match="model a at layer 2"):
        run(broken, model64, tok, examples[:3])
    # NaN in padding only is harmless: pad positions never reach a statistic.
    padded = [h.clone() for h in hs]
    pad_BT = ~b.attention_mask_BT
    assert pad_BT.any()
    for h in padded:
        h[pad_BT] = float("nan")
    assert_same_results(
        CKAAccumulator(LayerPairs.build("diagonal", 2, 2)).add_batch(hs, padded, b).results(),
        CKAAccumulator(LayerPairs.build("diagonal", 2, 2)).add_batch(hs, hs, b).results(),
    )


def test_empty_dataset_is_a_data_error(tiny_tokenizer, examples, model64, tmp_path):
    with pytest.raises(DataError, match="no examples"):
        encode_examples(tiny_tokenizer, [], 512)
    with pytest.raises(DataError, match="empty dataset"):
        CKAAccumulator(LayerPairs.build("diagonal", 2, 2)).results()
    lineage = Lineage(tmp_path / "lineage")
    lineage.save("m", model64, tiny_tokenizer, kind="test")
    with pytest.raises(DataError, match="empty dataset"):
        cka_local(lineage, "m", "m", [])
    no_answer = {"uid": "x", "messages": examples[0].messages, "demonstration": ""}
    with pytest.raises(DataError, match="'x' has an empty demonstration"):
        encode_examples(tiny_tokenizer, [no_answer], 512)


def test_merging_different_setups_is_refused():
    a = CKAAccumulator(LayerPairs.build("diagonal", 2, 2))
    with pytest.raises(DataError, match="different layer pairs"):
        a.merge(CKAAccumulator(LayerPairs.build("all", 2, 2)))
    with pytest.raises(DataError, match="different layer pairs"):
        a.merge(CKAAccumulator(LayerPairs.build("diagonal", 2, 2), pooling="last"))
    with pytest.raises(DataError, match="not a CKAAccumulator"):
        CKAAccumulator.from_dict({"format": "something else"})
