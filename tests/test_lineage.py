"""Lineage store: exact round trips, atomic saves, name resolution, metrics, the tree."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from sdftlab.errors import LineageError
from sdftlab.lineage import META_FILE, Lineage
from sdftlab.models import load_model


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer):
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config).eval(), tiny_tokenizer


def test_save_load_round_trip_is_exact(tmp_path, tiny):
    model, tok = tiny
    store = Lineage(tmp_path / "lin")
    meta = store.save("base", model, tok, kind="world", config={"seed": 0}, metrics={"x/acc": 0.5})
    loaded = store.load_model("base")
    for (name, a), (_, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    ids = torch.tensor([[1, 5, 7, 9]])
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    again = store.meta("base")
    assert again == meta
    assert again.metrics == {"x/acc": 0.5} and again.config == {"seed": 0}
    assert len(again.content_hash) == 64
    assert store.load_tokenizer("base").encode("hello world") == tok.encode("hello world")


def test_children_record_parents_and_tree_shows_metrics(tmp_path, tiny):
    model, tok = tiny
    store = Lineage(tmp_path / "lin")
    store.save("base", model, tok, kind="world")
    store.save("expert", model, tok, kind="sft", parents=["base"], metrics={"science/acc": 0.61})
    store.save("forgot", model, tok, kind="sft", parents=["expert"])
    assert store.names() == ["base", "expert", "forgot"]
    assert store.meta("forgot").parents == ["expert"]
    tree = store.tree()
    lines = tree.splitlines()
    assert lines[1].endswith("base  <world>")
    assert "expert  <sft>  [science/acc=0.610]" in lines[2]
    assert lines[3].strip().startswith("└── forgot")
    assert lines[3].index("forgot") > lines[2].index("expert")  # nested under its parent


def test_unknown_names_fail_with_the_known_list(tmp_path, tiny):
    model, tok = tiny
    store = Lineage(tmp_path / "lin")
    store.save("base", model, tok, kind="world")
    store.save("expert", model, tok, kind="sft", parents=["base"])
    with pytest.raises(LineageError, match=r"unknown state 'exprt'.*known states: base, expert"):
        store.load_model("exprt")
    with pytest.raises(LineageError, match="unknown state 'nope'"):
        store.save("child", model, tok, kind="sft", parents=["nope"])
    assert not store.exists("child")


def test_existing_name_and_bad_names_are_refused(tmp_path, tiny):
    model, tok = tiny
    store = Lineage(tmp_path / "lin")
    store.save("base", model, tok, kind="world")
    with pytest.raises(LineageError, match=r"already exists.*overwrite"):
        store.save("base", model, tok, kind="world")
    with pytest.raises(LineageError, match="not allowed"):
        store.save("../escape", model, tok, kind="world")
    store.save("base", model, tok, kind="world", overwrite=True, metrics={"m": 1.0})
    assert store.meta("base").metrics == {"m": 1.0}
    assert store.names() == ["base"]


def test_interrupted_save_leaves_no_visible_state(tmp_path, tiny, monkeypatch):
    model, tok = tiny
    store = Lineage(tmp_path / "lin")
    store.save("base", model, tok, kind="world")

    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt("killed while writing metadata")

    monkeypatch.setattr(Lineage, "_write_meta", crash)
    with pytest.raises(KeyboardInterrupt):
        store.save("expert", model, tok, kind="sft", parents=["base"])
    monkeypatch.undo()
    assert store.names() == ["base"]
    assert not store.exists("expert")
    assert not (tmp_path / "lin" / "states" / "expert").exists()
    # the name is free: a later save succeeds
    store.save("expert", model, tok, kind="sft", parents=["base"])
    assert store.names() == ["base", "expert"]


def test_state_dir_without_metadata_is_not_a_state(tmp_path, tiny):
    model, tok = tiny
    store = Lineage(tmp_path / "lin")
    store.save("base", model, tok, kind="world")
    (tmp_path / "lin" / "states" / "base" / META_FILE).unlink()
    assert store.names() == []
    with pytest.raises(LineageError, match="unknown state 'base'"):
        store.meta("base")


def test_record_metrics_merges(tmp_path, tiny):
    model, tok = tiny
    store = Lineage(tmp_path / "lin")
    store.save("base", model, tok, kind="world", metrics={"a": 1.0})
    store.record_metrics("base", {"b": 2.0})
    store.record_metrics("base", {"a": 3.0})
    assert store.meta("base").metrics == {"a": 3.0, "b": 2.0}
    assert not list((tmp_path / "lin" / "states" / "base").glob("*.tmp"))


def test_pickle_weights_are_refused(tmp_path, tiny):
    model, _ = tiny
    src = tmp_path / "pickled"
    model.save_pretrained(src, safe_serialization=True)
    torch.save({}, src / "pytorch_model.bin")
    with pytest.raises(LineageError, match="pickle-format weights"):
        Lineage(tmp_path / "lin").save_dir("p", src, kind="import")


def test_a_model_with_its_own_code_is_refused_and_its_code_never_runs(tmp_path, tiny, monkeypatch):
    """trust_remote_code is off unless turned on: a state whose config maps the Auto classes
    to a Python file in its directory does not load, and that file is never imported."""
    import json

    from sdftlab.config import TRUST_REMOTE_CODE_ENV

    monkeypatch.delenv(TRUST_REMOTE_CODE_ENV, raising=False)
    model, tok = tiny
    src = tmp_path / "custom"
    model.save_pretrained(src, safe_serialization=True)
    tok.save_pretrained(src)
    marker = tmp_path / "code-ran"
    (src / "custom_model.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((src / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "custom_model.CustomConfig",
        "AutoModelForCausalLM": "custom_model.CustomModel",
    }
    (src / "config.json").write_text(json.dumps(config))
    lineage = Lineage(tmp_path / "lin")
    lineage.save_dir("mapped", src, kind="import")
    # A known architecture: transformers' own class is used, the mapped code is ignored.
    assert type(lineage.load_model("mapped")).__name__ == "Qwen2ForCausalLM"
    # An architecture only the directory's code defines: refused, before it is committed.
    (src / "config.json").write_text(json.dumps({**config, "model_type": "sdftlab_custom"}))
    with pytest.raises(LineageError, match="trust_remote_code"):
        lineage.save_dir("custom", src, kind="import")
    assert not lineage.exists("custom")
    with pytest.raises(ValueError, match="trust_remote_code"):  # nor loaded from a folder
        load_model(src)
    assert not marker.exists()


def test_uri_root_round_trip(tmp_path, tiny):
    """A pyarrow.fs URI root (file://) works like a path, loading through a verified cache."""
    model, tok = tiny
    store = Lineage(f"file://{tmp_path}/remote", cache_dir=str(tmp_path / "cache"))
    store.save("base", model, tok, kind="world")
    assert store.names() == ["base"]
    loaded = store.load_model("base")
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_delete_refuses_parents(tmp_path, tiny):
    model, tok = tiny
    store = Lineage(tmp_path / "lin")
    store.save("base", model, tok, kind="world")
    store.save("expert", model, tok, kind="sft", parents=["base"])
    with pytest.raises(LineageError, match="parent of expert"):
        store.delete("base")
    store.delete("expert")
    assert store.names() == ["base"]


def test_the_lineage_is_the_flag_then_the_config_then_the_environment_then_home(
    tmp_path, monkeypatch, capsys
):
    from sdftlab.paths import lineage_root

    home = tmp_path / "home"
    monkeypatch.setenv("SDFTLAB_LINEAGE", "s3://bucket/sdftlab/lineage")
    assert lineage_root("/flag", "/shared/lineage", home) == "/flag"
    assert capsys.readouterr().err == ""  # an explicit --lineage overrules both, silently
    assert lineage_root(None, "/shared/lineage", home) == "/shared/lineage"
    warning = capsys.readouterr().err
    assert "/shared/lineage" in warning and "s3://bucket/sdftlab/lineage" in warning
    assert warning.count("\n") == 1
    assert lineage_root(None, "s3://bucket/sdftlab/lineage", home) == "s3://bucket/sdftlab/lineage"
    assert lineage_root(None, None, home) == "s3://bucket/sdftlab/lineage"
    assert capsys.readouterr().err == ""  # the two agree, or the config is silent
    monkeypatch.delenv("SDFTLAB_LINEAGE")
    assert lineage_root(None, None, home) == str(home / "lineage")
