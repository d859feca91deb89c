"""Whether a model directory is a whole, loadable state: what the lineage checks before it
commits a state, and what `sdftlab lineage verify` checks of every committed one.

`check_state_dir(directory)` raises one `LineageError` naming the file and the fault, or
returns; in order:

1. `config.json` parses and names a `model_type` transformers knows;
2. every `.safetensors` file is whole: its header parses and its tensors' bytes end exactly
   at the end of the file (a truncated or padded file is refused), each tensor's byte count
   matching its dtype and shape; a sharded checkpoint's index names only files that exist;
3. the weights' names and shapes are those of the model `config.json` describes (built on
   the meta device, no memory): nothing missing but a tied output layer, nothing unexpected
   (a 4-bit state's packed weights are checked by loading instead);
4. the tokenizer loads;
5. the model loads and one forward pass on a few tokens gives finite logits.

    >>> check_state_dir(Path("/tmp/staging/expert"))   # raises LineageError, or returns
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from sdftlab.errors import LineageError

# bytes per element of each safetensors dtype
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip


def check_state_dir(directory: str | Path, *, forward: bool = True) -> None:
    """Raise a `LineageError` naming the file and the fault unless `directory` is a whole,
    loadable state (the module docstring lists the checks); `forward=False` skips loading
    the model and its forward pass."""
    directory = Path(directory)
    config = _config(directory)
    shapes = {}
    for path in sorted(directory.glob("*.safetensors")):
        shapes |= safetensors_shapes(path)
    if not shapes:
        raise LineageError(f"{directory}: no .safetensors weights; states are safetensors only")
    _check_index(directory)
    if not config.get("quantization_config"):
        _check_names_and_shapes(directory, config, shapes)
    tokenizer = _load(directory, "tokenizer", _tokenizer)
    if forward:
        _forward(directory, tokenizer)


def _config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise LineageError(f"{path}: missing; a state needs its model config") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LineageError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(config, dict) or not config.get("model_type"):
        raise LineageError(f"{path}: no `model_type`; save the model with save_pretrained")
    from transformers import CONFIG_MAPPING

    from sdftlab.config import trust_remote_code

    known = config["model_type"] in CONFIG_MAPPING
    if not known and not (config.get("auto_map") and trust_remote_code()):
        own = " that only the folder's own code defines" if config.get("auto_map") else ""
        raise LineageError(
            f"{path}: model_type {config['model_type']!r}{own} is unknown to transformers; "
            + ("let the folder run its code with trust_remote_code: true" if own else
               "import a model of a known architecture")
        )  # fmt: skip
    return config


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{tensor: shape} of a safetensors file, after checking the file is whole."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise LineageError(f"{path}: truncated ({size} bytes, no safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise LineageError(f"{path}: truncated (its header says {n} bytes, {size} there)")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise LineageError(f"{path}: corrupt safetensors header ({err})") from None
    header.pop("__metadata__", None)
    shapes, end = {}, 0
    for name, info in header.items():
        start, stop = info["data_offsets"]
        count = math.prod(info["shape"]) * _DTYPE_BYTES.get(info["dtype"], 0)
        if stop - start != count and info["dtype"] in _DTYPE_BYTES:
            raise LineageError(f"{path}: tensor {name!r} holds {stop - start} bytes, its "
                               f"{info['dtype']} {info['shape']} needs {count}")  # fmt: skip
        shapes[name] = tuple(info["shape"])
        end = max(end, stop)
    if 8 + n + end != size:
        what = "truncated" if 8 + n + end > size else "longer than its tensors"
        raise LineageError(f"{path}: {what} ({size} bytes; its header accounts for "
                           f"{8 + n + end})")  # fmt: skip
    return shapes


def _check_index(directory: Path) -> None:
    for index in directory.glob("*.safetensors.index.json"):
        files = set(json.loads(index.read_text()).get("weight_map", {}).values())
        missing = sorted(f for f in files if not (directory / f).is_file())
        if missing:
            raise LineageError(f"{index}: names {', '.join(missing)}, not in the folder")


def _check_names_and_shapes(
    directory: Path, config: dict[str, Any], shapes: dict[str, tuple[int, ...]]
) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sdftlab.config import trust_remote_code

    remote = trust_remote_code()
    hf_config = AutoConfig.from_pretrained(directory, trust_remote_code=remote)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=remote)
    wanted = {n: tuple(t.shape) for n, t in skeleton.state_dict().items()}
    tied = set()
    if getattr(hf_config, "tie_word_embeddings", False):  # the head is the embedding
        tied = {n for n in wanted if n.endswith("lm_head.weight")}
    missing = sorted(set(wanted) - set(shapes) - tied)
    unexpected = sorted(set(shapes) - set(wanted))
    wrong = sorted(n for n in set(wanted) & set(shapes) if wanted[n] != shapes[n])
    where = f"{directory}: the weights do not match config.json"
    if missing:
        raise LineageError(f"{where}: {len(missing)} missing, e.g. {missing[0]!r}")
    if unexpected:
        raise LineageError(f"{where}: {len(unexpected)} unexpected, e.g. {unexpected[0]!r}")
    if wrong:
        n = wrong[0]
        raise LineageError(f"{where}: {n!r} is {list(shapes[n])}, the config says "
                           f"{list(wanted[n])}")  # fmt: skip


def _tokenizer(directory: Path) -> Any:
    from sdftlab.models import load_tokenizer

    return load_tokenizer(directory)


def _load(directory: Path, what: str, loader: Any) -> Any:
    try:
        return loader(directory)
    except LineageError:
        raise
    except Exception as err:  # transformers raises many kinds; each means "does not load"
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise LineageError(f"{directory}: the {what} fails ({reason})") from None


def _forward(directory: Path, tokenizer: Any) -> None:
    import torch

    from sdftlab.models import load_model

    model = _load(directory, "model", load_model).eval()
    ids = tokenizer("The state loads.", return_tensors="pt")["input_ids"][:, :8]

    def forward(_: Path) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids.to(next(model.parameters()).device)).logits

    logits = _load(directory, "model's forward pass", forward)
    if not torch.isfinite(logits).all():
        raise LineageError(f"{directory}: the model's logits on a few tokens are not finite")
