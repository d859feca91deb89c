"""`sdftlab import`: the packaged GGUF, an HF folder, bad sources (one error, nothing written)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdftlab.cli import main
from sdftlab.importer import (
    PACKAGED,
    ImportSourceError,
    PackagedModel,
    file_sha256,
    import_model,
    packaged_path,
)
from sdftlab.lineage import Lineage


def _nothing_written(lineage: Lineage) -> bool:
    """No state, and nothing staged, under the lineage root."""
    staging = Path(lineage.root) / ".staging"
    return lineage.names() == [] and not (staging.exists() and any(staging.iterdir()))


@pytest.mark.real_model
def test_packaged_gguf_imports_as_float32_with_its_chat_template_and_provenance(smollm2):
    lineage, name = smollm2
    meta = lineage.meta(name)
    gguf = packaged_path("smollm2-135m")
    assert meta.kind == "import" and meta.parents == []
    assert meta.config["format"] == "packaged" and meta.config["source"] == "smollm2-135m"
    assert meta.config["sha256"] == file_sha256(gguf)
    assert "model.safetensors" in meta.files and "chat_template.jinja" in meta.files

    model = lineage.load_model(name)
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 30
    assert getattr(model.config, "quantization_config", None) is None
    tokenizer = lineage.load_tokenizer(name)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n") and tokenizer.pad_token is not None

    # The saved weights are the GGUF's, dequantised: the same logits as loading the GGUF itself.
    from transformers import AutoModelForCausalLM

    direct = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)


@pytest.mark.real_model
def test_cli_imports_an_hf_folder_exactly(smollm2, tmp_path, capsys):
    lineage, name = smollm2
    target = Lineage(tmp_path / "lineage")
    folder = lineage.local_path(name)
    code = main(["--lineage", target.root, "import", str(folder), "--to", "copy"])
    assert code == 0, capsys.readouterr().err
    meta = target.meta("copy")
    assert meta.config["format"] == "hf" and meta.content_hash == lineage.meta(name).content_hash


def test_hf_folder_import_of_the_tiny_base(small_world, tmp_path):
    _, lineage, _ = small_world
    target = Lineage(tmp_path / "lineage")
    meta = import_model(target, str(lineage.local_path("base")), "again", log=lambda _: None)
    assert meta.content_hash == lineage.meta("base").content_hash
    assert meta.config == {
        "source": str(lineage.local_path("base")),
        "format": "hf",
        "sha256": meta.content_hash,
    }


def test_bad_sources_are_one_clear_error_and_write_nothing(tmp_path, capsys):
    lineage = Lineage(tmp_path / "lineage")
    cases = {
        str(tmp_path / "missing.gguf"): "no such file or folder",
        str(tmp_path / "notes.txt"): "must be a .gguf model",
        str(tmp_path / "not_gguf.gguf"): "not a GGUF file",
        str(tmp_path / "empty_dir"): "no config.json",
        str(tmp_path / "pickled"): "pickle-format weights",
    }
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "not_gguf.gguf").write_bytes(b"PK\x03\x04" + b"\0" * 64)
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text("{}")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"\0")
    for source, message in cases.items():
        code = main(["--lineage", lineage.root, "import", source, "--to", "x"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert _nothing_written(lineage)


def test_a_cut_off_gguf_is_refused_before_anything_is_written(tmp_path):
    """The packaged file's first megabyte: a valid header whose tensors run past the end."""
    try:
        gguf = packaged_path("smollm2-135m")
    except ImportSourceError:
        pytest.fail("the real-model extra is part of the dev install: bash scripts/setup.sh --dev")
    cut = tmp_path / "cut.gguf"
    with gguf.open("rb") as src, cut.open("wb") as dst:
        dst.write(src.read(1 << 20))
    lineage = Lineage(tmp_path / "lineage")
    with pytest.raises(ImportSourceError, match="corrupt or cut off"):
        import_model(lineage, str(cut), "cut", log=lambda _: None)
    assert _nothing_written(lineage)


def test_a_packaged_model_without_its_package_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setitem(
        PACKAGED, "ghost", PackagedModel("no_such_pkg_here", "x.gguf", "pip install ghost", "")
    )
    lineage = Lineage(tmp_path / "lineage")
    with pytest.raises(ImportSourceError, match="pip install ghost"):
        import_model(lineage, "ghost", "g", log=lambda _: None)
    assert _nothing_written(lineage)


def test_an_existing_name_is_refused_before_the_source_is_read(small_world, tmp_path):
    _, lineage, _ = small_world
    with pytest.raises(Exception, match="already exists"):
        import_model(lineage, str(tmp_path / "missing"), "base", log=lambda _: None)
    assert lineage.meta("base").kind == "world"
