"""Hidden-state capture and per-layer CKA accumulation for a student/teacher pair.

Linear CKA (Kornblith et al. 2019, "Similarity of Neural Network Representations
Revisited"; the math is in `sdftlab.cka.stats`) compares the hidden states of two models —
a degraded or self-distilled student and its teacher, the question of "CKA as a lens on
self-distillation recovery" — on *identical inputs*: each example's prompt (chat template,
generation prompt) followed by its ground-truth answer (the demonstration) and EOS. Two
forms, at every compared pair of layers:

- **per-sample** (the evaluation-set form): one row per sequence, pooled over tokens
  (``pooling="answer_mean"``: the mean over the answer tokens; ``"last"``: the last
  non-pad token, i.e. the EOS), giving n×d matrices for `CKAStats` (biased, debiased,
  standardized per dimension — the paper's per-sample form is standardized);
- **per-sequence** (the token-trajectory form): the tokens of one sequence (the answer
  tokens, or all tokens with ``sequence_tokens="all"``) are the samples, an L×L kernel;
  `sequence_cka` per sequence, averaged over the set with `MeanStat`.

Layers are hidden-state indices as transformers returns them with
``output_hidden_states=True``: 0 is the embedding output, i the output of decoder layer i,
and the last index L (= ``num_hidden_layers``) is the final decoder layer's output *after*
the model's final norm (transformers ties ``hidden_states[-1]`` to ``last_hidden_state``).
`LayerPairs` says which (layer_a, layer_b) pairs to compare; hidden sizes may differ between
the models (CKA compares kernels, not features).

Padding never enters a statistic: right padding (default) or left padding with explicit
position ids, pad positions zeroed in the captured states and excluded by the masks. With a
float64 forward pass, one sequence alone and the same sequence padded in a batch give the
same statistics to ~1e-15; in float32 the batch shape changes the forward pass's rounding
(~1e-7), which is why `sdftlab.cka.pool` forwards identical batches in every path.

`CKAAccumulator` keeps the additive statistics of every pair, merges exactly across shards
(Ray actors) and serializes to plain numpy arrays (``to_bytes``: an ``np.savez`` archive,
loaded with ``allow_pickle=False``).

    sdftlab cka --a forgot --b expert --data science

    >>> batch = collate(encode_examples(tok, examples, max_len=512), tok.pad_token_id)
    >>> acc = CKAAccumulator(LayerPairs.build("diagonal", 4, 4))
    >>> acc.add_batch(capture_hidden_states(student, batch),
    ...               capture_hidden_states(teacher, batch), batch)
    >>> acc.results()          # a DataFrame: one row per layer pair
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from sdftlab.cka.stats import CKAStats, MeanStat, Standardizer, cka, sequence_cka
from sdftlab.errors import ConfigError, DataError

POOLINGS: tuple[str, ...] = ("last", "answer_mean")
SEQUENCE_TOKENS: tuple[str, ...] = ("answer", "all")
PADDING_SIDES: tuple[str, ...] = ("right", "left")
LAYER_SPECS: tuple[str, ...] = ("diagonal", "all", "last")
RESULT_COLUMNS: tuple[str, ...] = (
    "layer_a",
    "layer_b",
    "relative_depth",
    "cka",
    "cka_biased",
    "cka_debiased",
    "cka_standardized",
    "sequence_cka",
    "sequence_cka_se",
    "n_samples",
    "n_sequences",
    "dim_a",
    "dim_b",
)
_ACC_FORMAT = "sdftlab.cka.CKAAccumulator/1"
_NONE_KEY = "__none__"

Pair = tuple[int, int]


# ------------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class Encoded:
    """One example as token ids: prompt (chat template + generation prompt), answer, EOS.

    ``answer_mask`` is True on the demonstration tokens and the final EOS.
    """

    uid: str
    input_ids: tuple[int, ...]
    answer_mask: tuple[bool, ...]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_answer(self) -> int:
        return sum(self.answer_mask)


def _field(example: Any, name: str, default: Any = None) -> Any:
    """`example.name` for a TaskExample-like object, `example[name]` for a mapping."""
    if isinstance(example, Mapping):
        return example.get(name, default)
    return getattr(example, name, default)


def example_record(example: Any) -> dict[str, Any]:
    """The fields CKA needs from a TaskExample (or a mapping), JSON-ready."""
    get = example.get if isinstance(example, Mapping) else lambda k: getattr(example, k, None)
    messages = get("messages")
    return {
        "uid": get("uid"),
        "messages": [dict(m) for m in messages] if messages else messages,
        "demonstration": get("demonstration"),
    }


def encode_examples(tokenizer: Any, examples: Sequence[Any], max_len: int) -> list[Encoded]:
    """Token ids and answer masks of `examples` (TaskExamples, or mappings with `messages`,
    `demonstration` and optionally `uid`).

    Each sequence is ``apply_chat_template(messages, add_generation_prompt=True)``, then the
    demonstration's tokens, then EOS — the same rendering as SFT (`sdftlab.data.chat`). If
    the whole is longer than `max_len`, prompt tokens are dropped *from the left* so that
    the answer stays intact (it is what both CKA forms look at); an answer (with EOS) longer
    than `max_len` is a `DataError`, as is an empty demonstration.
    """
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
        raise ConfigError(f"max_len must be an integer ≥ 2, got {max_len!r}")
    if len(examples) == 0:
        raise DataError("no examples: CKA needs at least one (prompt, answer) example")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no eos_token_id; CKA appends EOS to each answer")
    out: list[Encoded] = []
    for i, ex in enumerate(examples):
        uid = str(_field(ex, "uid", None) or f"example-{i}")
        messages = _field(ex, "messages")
        demonstration = _field(ex, "demonstration")
        if not messages:
            raise DataError(f"example {uid!r} has no prompt messages")
        if not demonstration:
            raise DataError(
                f"example {uid!r} has an empty demonstration; CKA runs both models on the "
                "prompt plus the ground-truth answer, so every example needs one"
            )
        prompt = tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=True
        )
        prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        answer_ids = [*tokenizer(demonstration, add_special_tokens=False)["input_ids"], eos]
        if len(answer_ids) > max_len:
            raise DataError(
                f"example {uid!r}: the answer is {len(answer_ids)} tokens with EOS, more than "
                f"max_len={max_len}; raise max_len"
            )
        keep = min(len(prompt_ids), max_len - len(answer_ids))
        prompt_ids = prompt_ids[len(prompt_ids) - keep :]
        out.append(
            Encoded(
                uid=uid,
                input_ids=tuple(prompt_ids + answer_ids),
                answer_mask=(False,) * len(prompt_ids) + (True,) * len(answer_ids),
            )
        )
    return out


@dataclass(frozen=True)
class Batch:
    """Padded model inputs and the token masks every statistic uses ([B, T] each)."""

    input_ids_BT: torch.Tensor
    attention_mask_BT: torch.Tensor  # bool: True on real tokens
    answer_mask_BT: torch.Tensor  # bool: True on answer tokens (demonstration + EOS)
    position_ids_BT: torch.Tensor
    uids: tuple[str, ...]

    @property
    def size(self) -> int:
        return int(self.input_ids_BT.shape[0])


def collate(encoded: Sequence[Encoded], pad_id: int, padding_side: str = "right") -> Batch:
    """Pad `encoded` to its longest sequence on `padding_side`.

    Position ids count real tokens only (0, 1, … from each sequence's first token), so a
    left-padded sequence sees the positions it would see alone.
    """
    if padding_side not in PADDING_SIDES:
        raise ConfigError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    if len(encoded) == 0:
        raise DataError("cannot collate an empty batch")
    if pad_id is None:
        raise ConfigError("the tokenizer has no pad_token_id; set one to batch sequences")
    width = max(len(e) for e in encoded)
    ids_BT = torch.full((len(encoded), width), int(pad_id), dtype=torch.long)
    mask_BT = torch.zeros((len(encoded), width), dtype=torch.bool)
    answer_BT = torch.zeros((len(encoded), width), dtype=torch.bool)
    for i, e in enumerate(encoded):
        n = len(e)
        cols = slice(0, n) if padding_side == "right" else slice(width - n, width)
        ids_BT[i, cols] = torch.tensor(e.input_ids, dtype=torch.long)
        mask_BT[i, cols] = True
        answer_BT[i, cols] = torch.tensor(e.answer_mask, dtype=torch.bool)
    pos_BT = (mask_BT.long().cumsum(dim=1) - 1).clamp(min=0)
    return Batch(ids_BT, mask_BT, answer_BT, pos_BT, tuple(e.uid for e in encoded))


def capture_hidden_states(
    model: torch.nn.Module, batch: Batch, *, dtype: torch.dtype = torch.float64
) -> list[torch.Tensor]:
    """All hidden states of `model` on `batch`: a list of L+1 tensors [B, T, D] in `dtype`.

    Index 0 is the embedding output, i the output of decoder layer i (the last one after the
    final norm). The forward pass runs in the model's own dtype on its device, without
    gradients and without the LM head; pad positions are set to 0 in the returned tensors.
    """
    bare = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    core = getattr(bare, "base_model", bare)  # the decoder, without the LM head
    device = next(model.parameters()).device
    # An FSDP2 root (`sharding`) gathers its own shards (embeddings, final norm) only when it
    # is called itself: gather them for the decoder's forward, free them after.
    sharded = hasattr(model, "unshard") and hasattr(model, "reshard")
    if sharded:
        model.unshard()
    try:
        with torch.no_grad() if sharded else torch.inference_mode():
            out = core(
                input_ids=batch.input_ids_BT.to(device),
                attention_mask=batch.attention_mask_BT.long().to(device),
                position_ids=batch.position_ids_BT.to(device),
                output_hidden_states=True,
                use_cache=False,
            )
    finally:
        if sharded:
            model.reshard()
    hidden = out.hidden_states
    depth = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if hidden is None or (depth is not None and len(hidden) != depth + 1):
        raise RuntimeError(
            f"{type(model).__name__} returned {0 if hidden is None else len(hidden)} hidden "
            f"states, expected num_hidden_layers + 1 = {depth + 1 if depth else '?'}"
        )
    pad_BT1 = ~batch.attention_mask_BT.to(device)[..., None]
    return [h.to(dtype).masked_fill(pad_BT1, 0.0) for h in hidden]


# ------------------------------------------------------------------------------- layer pairs


def relative_depth_map(layer: int, depth_a: int, depth_b: int) -> int:
    """The layer of model b at the same relative depth as `layer` of model a.

    layer_b = round(layer · L_b / L_a), rounding halves *up*, in exact integer arithmetic:
    ⌊(2·layer·L_b + L_a) / (2·L_a)⌋. Embeddings map to embeddings (0 → 0) and the last layer
    to the last layer (L_a → L_b). E.g. L_a = 2, L_b = 4: 0→0, 1→2, 2→4; L_a = 4, L_b = 2:
    0→0, 1→1, 2→1, 3→2, 4→2.
    """
    return (2 * layer * depth_b + depth_a) // (2 * depth_a)


def _check_layer(layer: Any, depth: int, side: str) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int | np.integer):
        raise ConfigError(f"layer {layer!r} of model {side} is not an integer layer index")
    if not 0 <= int(layer) <= depth:
        raise ConfigError(
            f"layer {int(layer)} of model {side} is out of range: valid layers are 0..{depth} "
            f"(0 = embeddings, {depth} = the last of its {depth} decoder layers)"
        )
    return int(layer)


@dataclass(frozen=True)
class LayerPairs:
    """Which (layer_a, layer_b) hidden-state indices to compare, for depths L_a and L_b.

    Build with `LayerPairs.build(spec, depth_a, depth_b)`; ``spec`` is

    - ``"diagonal"``: i ↔ i for every i in 0..L_a when L_a = L_b; for different depths
      i ↔ `relative_depth_map`(i) (same relative depth, halves rounded up);
    - ``"last"``: only (L_a, L_b);
    - ``"all"``: the full (L_a+1) × (L_b+1) matrix;
    - a list of layers of model a (ints, or a string like ``"0,2,4"``), each paired by the
      diagonal rule; or a list of explicit ``(layer_a, layer_b)`` pairs.
    """

    pairs: tuple[Pair, ...]
    depth_a: int
    depth_b: int

    @classmethod
    def build(cls, spec: Any, depth_a: int, depth_b: int) -> LayerPairs:
        if depth_a < 1 or depth_b < 1:
            raise ConfigError(f"models need ≥ 1 layer, got depths {depth_a} and {depth_b}")
        diag = lambda i: relative_depth_map(i, depth_a, depth_b)  # noqa: E731
        if isinstance(spec, str) and spec.strip() in LAYER_SPECS:
            kind = spec.strip()
            if kind == "diagonal":
                pairs = [(i, diag(i)) for i in range(depth_a + 1)]
            elif kind == "last":
                pairs = [(depth_a, depth_b)]
            else:
                pairs = [(i, j) for i in range(depth_a + 1) for j in range(depth_b + 1)]
            return cls(tuple(pairs), depth_a, depth_b)
        if isinstance(spec, str):
            try:
                spec = [int(s) for s in spec.split(",") if s.strip()]
            except ValueError:
                raise ConfigError(
                    f"layers={spec!r}: use 'diagonal', 'last', 'all', or a comma-separated "
                    "list of layer indices such as '0,2,4'"
                ) from None
        if not isinstance(spec, Sequence) or len(spec) == 0:
            raise ConfigError(
                f"layers={spec!r}: use 'diagonal', 'last', 'all', a non-empty list of layers "
                "of model a, or a list of (layer_a, layer_b) pairs"
            )
        out: list[Pair] = []
        for item in spec:
            if isinstance(item, Sequence) and not isinstance(item, str):
                if len(item) != 2:
                    raise ConfigError(f"layer pair {item!r} must be (layer_a, layer_b)")
                out.append(
                    (_check_layer(item[0], depth_a, "a"), _check_layer(item[1], depth_b, "b"))
                )
            else:
                la = _check_layer(item, depth_a, "a")
                out.append((la, diag(la)))
        if len(set(out)) != len(out):
            raise ConfigError(f"layers={spec!r} names a layer pair twice")
        return cls(tuple(out), depth_a, depth_b)

    @property
    def layers_a(self) -> list[int]:
        return sorted({a for a, _ in self.pairs})

    @property
    def layers_b(self) -> list[int]:
        return sorted({b for _, b in self.pairs})

    def __len__(self) -> int:
        return len(self.pairs)


# ------------------------------------------------------------------------------- pooling


# ------------------------------------------------------------------------------- summaries


def _depths(df: pd.DataFrame) -> tuple[int, int]:
    try:
        meta = json.loads(df.attrs["cka"])
        return int(meta["depth_a"]), int(meta["depth_b"])
    except (KeyError, TypeError, ValueError):
        raise DataError(
            "this DataFrame lacks the CKA metadata (df.attrs['cka']); pass the DataFrame "
            "returned by compare_states / cka_local / cka_over_dataset"
        ) from None


def diagonal_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows whose layer_b is layer_a's diagonal (same relative depth) partner."""
    depth_a, depth_b = _depths(df)
    partner = df["layer_a"].map(lambda i: relative_depth_map(int(i), depth_a, depth_b))
    return df[df["layer_b"] == partner]


def summary_metrics(df: pd.DataFrame, label: str, prefix: str = "cka") -> dict[str, float]:
    """``<prefix>/<label>/{last_layer, mean_over_layers, sequence_last_layer}`` of a result:
    the diagonal pair at the last layer, the mean over the decoder layers' diagonal pairs
    (index 0, the embedding lookup, left out), and the per-sequence form at the last layer."""
    depth_a, depth_b = _depths(df)
    diag = diagonal_rows(df)
    last = diag[(diag["layer_a"] == depth_a) & (diag["layer_b"] == depth_b)]
    if last.empty:
        raise ConfigError(
            f"the comparison has no (last, last) layer pair ({depth_a}, {depth_b}); use "
            "layers='diagonal' (or include the last layer) to record summary metrics"
        )
    decoder = diag[diag["layer_a"] >= 1]
    metrics = {
        f"{prefix}/{label}/last_layer": float(last["cka"].iloc[0]),
        f"{prefix}/{label}/mean_over_layers": float(decoder["cka"].mean()),
        f"{prefix}/{label}/sequence_last_layer": float(last["sequence_cka"].iloc[0]),
    }
    undefined = [k for k, v in metrics.items() if not math.isfinite(v)]
    if undefined:
        raise DataError(
            f"{', '.join(undefined)} undefined (NaN) on this data — e.g. fewer than 4 examples "
            "for debiased CKA; use more examples or record=False"
        )
    return metrics


def _token_masks(masks: Any) -> tuple[np.ndarray, np.ndarray]:
    """(attention_BT, answer_BT) as numpy bool arrays from a `Batch` (or a pair of masks)."""
    if isinstance(masks, Batch):
        att, ans = masks.attention_mask_BT, masks.answer_mask_BT
    else:
        att, ans = masks
    att_BT = np.asarray(att.cpu() if isinstance(att, torch.Tensor) else att).astype(bool)
    ans_BT = np.asarray(ans.cpu() if isinstance(ans, torch.Tensor) else ans).astype(bool)
    if att_BT.shape != ans_BT.shape or att_BT.ndim != 2:
        raise DataError(
            f"attention and answer masks must both be [B, T], got {att_BT.shape} and {ans_BT.shape}"
        )
    if (ans_BT & ~att_BT).any():
        raise DataError("the answer mask marks pad tokens; answer tokens must be real tokens")
    return att_BT, ans_BT


def pool_tokens(
    hs_BTD: np.ndarray, attention_BT: np.ndarray, answer_BT: np.ndarray, pooling: str
) -> np.ndarray:
    """Per-sequence rows [B, D] in float64: the mean over answer tokens, or the last real token."""
    if pooling == "answer_mean":
        count_B = answer_BT.sum(axis=1)
        if (count_B == 0).any():
            raise DataError(
                f"{int((count_B == 0).sum())} sequence(s) in the batch have no answer tokens; "
                "answer_mean pooling needs at least one"
            )
        sum_BD = np.einsum("btd,bt->bd", hs_BTD, answer_BT.astype(np.float64))
        return sum_BD / count_B[:, None]
    if pooling == "last":
        if (~attention_BT.any(axis=1)).any():
            raise DataError("a sequence in the batch has no real tokens")
        width = attention_BT.shape[1]
        last_B = width - 1 - np.argmax(attention_BT[:, ::-1], axis=1)
        return hs_BTD[np.arange(hs_BTD.shape[0]), last_B].astype(np.float64)
    raise ConfigError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


# ------------------------------------------------------------------------------- npz packing


def _flatten(d: Mapping[str, Any], prefix: str, out: dict[str, np.ndarray], nones: list) -> None:
    for key, value in d.items():
        if "/" in key:
            raise ValueError(f"key {key!r} contains '/'")
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            if not value:
                nones.append(f"{path}/")  # an empty dict
            _flatten(value, f"{path}/", out, nones)
        elif value is None:
            nones.append(path)
        else:
            arr = np.asarray(value)
            if arr.dtype == object:
                raise TypeError(f"{path}: object arrays are not serializable without pickle")
            out[path] = arr


def pack_arrays(d: Mapping[str, Any]) -> bytes:
    """A nested dict of numpy arrays / scalars / strings / None → ``np.savez`` bytes."""
    flat: dict[str, np.ndarray] = {}
    nones: list[str] = []
    _flatten(d, "", flat, nones)
    flat[_NONE_KEY] = np.array(nones, dtype=np.str_)
    buf = io.BytesIO()
    np.savez(buf, **flat)  # type: ignore[arg-type]
    return buf.getvalue()


def _set_path(root: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split("/")
    node = root
    for p in parents:
        node = node.setdefault(p, {})
    if leaf:
        node[leaf] = value


def unpack_arrays(data: bytes) -> dict[str, Any]:
    """Inverse of `pack_arrays` (loaded with ``allow_pickle=False``); 0-d arrays → scalars."""
    root: dict[str, Any] = {}
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        for key in npz.files:
            if key == _NONE_KEY:
                continue
            arr = npz[key]
            _set_path(root, key, arr.item() if arr.ndim == 0 else arr)
        for path in npz[_NONE_KEY].tolist() if _NONE_KEY in npz.files else []:
            _set_path(root, path, {} if path.endswith("/") else None)
    return root


# ------------------------------------------------------------------------------- accumulator


def _nan_if_undefined(fn: Any) -> float:
    try:
        return float(fn())
    except DataError:
        return math.nan


class CKAAccumulator:
    """Per-layer-pair CKA statistics of one (model a, model b) comparison, mergeable.

    For each pair: a `CKAStats` of the pooled per-sample rows, a `MeanStat` of the
    per-sequence token-trajectory CKA, and — in the second pass of the two-pass route for
    debiased + standardized CKA — a `CKAStats` of standardized rows (``standardizers`` from
    `fit_standardizers` on a first pass over the same examples).
    """

    def __init__(
        self,
        pairs: LayerPairs,
        *,
        pooling: str = "answer_mean",
        sequence_tokens: str = "answer",
        sequence_debiased: bool = False,
        standardizers: Mapping[Pair, Standardizer] | None = None,
    ) -> None:
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if sequence_tokens not in SEQUENCE_TOKENS:
            raise ConfigError(
                f"sequence_tokens must be one of {SEQUENCE_TOKENS}, got {sequence_tokens!r}"
            )
        if standardizers is not None and set(standardizers) != set(pairs.pairs):
            raise ConfigError("standardizers must be given for exactly the compared layer pairs")
        self.pairs = pairs
        self.pooling = pooling
        self.sequence_tokens = sequence_tokens
        self.sequence_debiased = bool(sequence_debiased)
        self.standardizers = dict(standardizers) if standardizers is not None else None
        self.stats: list[CKAStats | None] = [None] * len(pairs)
        self.second: list[CKAStats | None] | None = (
            [None] * len(pairs) if standardizers is not None else None
        )
        self.sequences: list[MeanStat] = [MeanStat() for _ in pairs.pairs]

    # ---- accumulation ----

    @property
    def n_samples(self) -> int:
        s = self.stats[0]
        return 0 if s is None else s.n

    @property
    def n_sequences(self) -> int:
        return self.sequences[0].count

    def _layer_rows(
        self, hs: Sequence[torch.Tensor], layers: list[int], depth: int, side: str, att_BT: Any
    ) -> dict[int, np.ndarray]:
        if len(hs) != depth + 1:
            raise DataError(
                f"model {side} gave {len(hs)} hidden states; these layer pairs are for a "
                f"model with {depth} layers ({depth + 1} hidden states)"
            )
        out: dict[int, np.ndarray] = {}
        for layer in layers:
            h = hs[layer]
            arr = (
                h.detach().to(device="cpu", dtype=torch.float64).numpy()
                if isinstance(h, torch.Tensor)
                else np.asarray(h, dtype=np.float64)
            )
            if arr.ndim != 3 or arr.shape[:2] != att_BT.shape:
                raise DataError(
                    f"hidden state {layer} of model {side} has shape {arr.shape}; expected "
                    f"[B, T, D] with [B, T] = {att_BT.shape} (the masks' shape)"
                )
            bad = ~np.isfinite(arr[att_BT])
            if bad.any():
                raise DataError(
                    f"NaN or inf activations in model {side} at layer {layer} (hidden-state "
                    f"index {layer} of 0..{depth}) on {int(bad.any(axis=1).sum())} real "
                    "token(s); check the model (e.g. an overflowing fp16 layer)"
                )
            if not att_BT.all():
                arr = np.where(att_BT[..., None], arr, 0.0)  # pads never reach a sum
            out[layer] = arr
        return out

    def add_batch(
        self, hs_a: Sequence[torch.Tensor], hs_b: Sequence[torch.Tensor], masks: Any
    ) -> CKAAccumulator:
        """Add one batch: hidden states of both models (lists of [B, T, D]) on the same
        inputs, and its masks (a `Batch`, or an (attention_BT, answer_BT) pair). In place."""
        att_BT, ans_BT = _token_masks(masks)
        if att_BT.shape[0] == 0:
            return self
        xs = self._layer_rows(hs_a, self.pairs.layers_a, self.pairs.depth_a, "a", att_BT)
        ys = self._layer_rows(hs_b, self.pairs.layers_b, self.pairs.depth_b, "b", att_BT)
        px = {la: pool_tokens(x, att_BT, ans_BT, self.pooling) for la, x in xs.items()}
        py = {lb: pool_tokens(y, att_BT, ans_BT, self.pooling) for lb, y in ys.items()}
        tok_BT = ans_BT if self.sequence_tokens == "answer" else att_BT
        for k, (la, lb) in enumerate(self.pairs.pairs):
            x_ND, y_NE = px[la], py[lb]
            if self.stats[k] is None:
                self.stats[k] = CKAStats.empty(x_ND.shape[1], y_NE.shape[1])
            self.stats[k].update(x_ND, y_NE)  # type: ignore[union-attr]
            if self.second is not None and self.standardizers is not None:
                if self.second[k] is None:
                    self.second[k] = CKAStats.empty(
                        x_ND.shape[1], y_NE.shape[1], standardizer=self.standardizers[(la, lb)]
                    )
                self.second[k].update(x_ND, y_NE)  # type: ignore[union-attr]
            for i in range(att_BT.shape[0]):
                sel = tok_BT[i]
                self.sequences[k].add(
                    sequence_cka(xs[la][i, sel], ys[lb][i, sel], debiased=self.sequence_debiased)
                )
        return self

    # ---- merging ----

    def _same_setup(self, other: CKAAccumulator) -> None:
        mine = (self.pairs, self.pooling, self.sequence_tokens, self.sequence_debiased)
        theirs = (other.pairs, other.pooling, other.sequence_tokens, other.sequence_debiased)
        if mine != theirs:
            raise DataError(
                "cannot merge CKA accumulators with different layer pairs, pooling or "
                f"sequence options: {mine[1:]} vs {theirs[1:]}"
            )
        if (self.standardizers is None) != (other.standardizers is None) or (
            self.standardizers is not None
            and other.standardizers is not None
            and not all(
                self.standardizers[p].same_as(other.standardizers[p]) for p in self.pairs.pairs
            )
        ):
            raise DataError("cannot merge CKA accumulators with different standardizers")

    def _empty_like(self) -> CKAAccumulator:
        return CKAAccumulator(
            self.pairs,
            pooling=self.pooling,
            sequence_tokens=self.sequence_tokens,
            sequence_debiased=self.sequence_debiased,
            standardizers=self.standardizers,
        )

    def merge(self, other: CKAAccumulator) -> CKAAccumulator:
        """The statistics of both accumulators' examples (pure; exact in any order)."""
        if not isinstance(other, CKAAccumulator):
            raise DataError(f"cannot merge a CKAAccumulator with {type(other).__name__}")
        self._same_setup(other)
        out = self._empty_like()

        def join(a: CKAStats | None, b: CKAStats | None) -> CKAStats | None:
            if a is None:
                return None if b is None else b.copy()
            return a.copy() if b is None else a.merge(b)

        out.stats = [join(a, b) for a, b in zip(self.stats, other.stats, strict=True)]
        if self.second is not None and other.second is not None:
            out.second = [join(a, b) for a, b in zip(self.second, other.second, strict=True)]
        out.sequences = [a.merge(b) for a, b in zip(self.sequences, other.sequences, strict=True)]
        return out

    def __add__(self, other: CKAAccumulator) -> CKAAccumulator:
        return self.merge(other)

    def fit_standardizers(self) -> dict[Pair, Standardizer]:
        """Per-pair `Standardizer`s from these (first-pass) statistics."""
        if self.n_samples == 0:
            raise DataError("no examples accumulated: nothing to fit standardizers on")
        return {
            p: Standardizer.fit(s)  # type: ignore[arg-type]
            for p, s in zip(self.pairs.pairs, self.stats, strict=True)
        }

    # ---- serialization (numpy arrays, scalars and strings only; no pickle) ----

    def to_dict(self) -> dict[str, Any]:
        def by_index(items: Sequence[Any]) -> dict[str, Any]:
            return {str(k): None if v is None else v.to_dict() for k, v in enumerate(items)}

        return {
            "format": _ACC_FORMAT,
            "pairs": np.array(self.pairs.pairs, dtype=np.int64).reshape(-1, 2),
            "depth_a": self.pairs.depth_a,
            "depth_b": self.pairs.depth_b,
            "pooling": self.pooling,
            "sequence_tokens": self.sequence_tokens,
            "sequence_debiased": self.sequence_debiased,
            "stats": by_index(self.stats),
            "second": None if self.second is None else by_index(self.second),
            "standardizers": None
            if self.standardizers is None
            else by_index([self.standardizers[p] for p in self.pairs.pairs]),
            "sequences": by_index(self.sequences),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CKAAccumulator:
        if d.get("format") != _ACC_FORMAT:
            raise DataError(
                f"not a CKAAccumulator dict: format is {d.get('format')!r}, "
                f"expected {_ACC_FORMAT!r}"
            )
        try:
            pairs = LayerPairs(
                tuple((int(a), int(b)) for a, b in np.asarray(d["pairs"]).reshape(-1, 2)),
                int(d["depth_a"]),
                int(d["depth_b"]),
            )
            n = len(pairs)

            def items(key: str) -> list[Any]:
                sub = d[key]
                return [sub[str(k)] for k in range(n)]

            st_dicts = None if d["standardizers"] is None else items("standardizers")
            standardizers = (
                None
                if st_dicts is None
                else {
                    p: Standardizer.from_dict(s) for p, s in zip(pairs.pairs, st_dicts, strict=True)
                }
            )
            out = cls(
                pairs,
                pooling=str(d["pooling"]),
                sequence_tokens=str(d["sequence_tokens"]),
                sequence_debiased=bool(d["sequence_debiased"]),
                standardizers=standardizers,
            )
            out.stats = [None if s is None else CKAStats.from_dict(s) for s in items("stats")]
            if d["second"] is not None:
                out.second = [None if s is None else CKAStats.from_dict(s) for s in items("second")]
            out.sequences = [MeanStat.from_dict(s) for s in items("sequences")]
        except KeyError as e:
            raise DataError(f"CKAAccumulator dict lacks the field {e.args[0]!r}") from None
        return out

    def to_bytes(self) -> bytes:
        """An ``np.savez`` archive of `to_dict` (read back with ``allow_pickle=False``)."""
        return pack_arrays(self.to_dict())

    @classmethod
    def from_bytes(cls, data: bytes) -> CKAAccumulator:
        return cls.from_dict(unpack_arrays(data))

    # ---- results ----

    def results(self, *, debiased: bool = False, standardize: bool = True) -> pd.DataFrame:
        """One row per layer pair.

        Columns: ``cka_biased`` / ``cka_debiased`` on the raw pooled rows;
        ``cka_standardized`` on rows standardized per dimension, in the biased form unless
        ``debiased=True`` (then from the second-pass statistics of the two-pass route);
        ``cka`` the headline value of the requested form (``standardize``, ``debiased``);
        ``sequence_cka`` the mean per-sequence CKA and ``sequence_cka_se`` its standard
        error; ``n_samples``, ``n_sequences``; ``dim_a``, ``dim_b`` the hidden sizes.

        A value undefined for one pair is NaN rather than an error for the whole table: e.g.
        debiased CKA with n < 4, or "last" pooling at the embeddings (every sequence ends in
        the same EOS embedding: zero variance). An empty accumulator, and debiased +
        standardized without a second pass, raise `DataError`.
        """
        if self.n_samples == 0:
            raise DataError("no examples accumulated: CKA of an empty dataset is undefined")
        if debiased and standardize and self.second is None:
            raise DataError(
                "debiased + standardized CKA needs the two-pass route: fit standardizers on "
                "this accumulator (fit_standardizers) and accumulate a second pass over the "
                "same examples with CKAAccumulator(..., standardizers=...)"
            )
        rows = []
        for k, (la, lb) in enumerate(self.pairs.pairs):
            s = self.stats[k]
            assert s is not None
            second = self.second[k] if self.second is not None else None
            biased = _nan_if_undefined(lambda s=s: cka(s))
            unbiased = _nan_if_undefined(lambda s=s: cka(s, debiased=True))
            if not debiased:
                std = _nan_if_undefined(lambda s=s: cka(s, standardize=True))
            elif second is not None:
                std = _nan_if_undefined(lambda t=second: cka(t, debiased=True, standardize=True))
            else:
                std = math.nan
            headline = std if standardize else (unbiased if debiased else biased)
            seq = self.sequences[k]
            rows.append(
                {
                    "layer_a": la,
                    "layer_b": lb,
                    "relative_depth": la / self.pairs.depth_a,
                    "cka": headline,
                    "cka_biased": biased,
                    "cka_debiased": unbiased,
                    "cka_standardized": std,
                    "sequence_cka": seq.mean,
                    "sequence_cka_se": seq.std_error if seq.count >= 2 else math.nan,
                    "n_samples": s.n,
                    "n_sequences": seq.count,
                    "dim_a": s.dx,
                    "dim_b": s.dy,
                }
            )
        df = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
        df.attrs["cka"] = json.dumps(
            {
                "pooling": self.pooling,
                "sequence_tokens": self.sequence_tokens,
                "sequence_debiased": self.sequence_debiased,
                "debiased": debiased,
                "standardize": standardize,
                "depth_a": self.pairs.depth_a,
                "depth_b": self.pairs.depth_b,
            }
        )
        return df

    def __repr__(self) -> str:
        return (
            f"CKAAccumulator({len(self.pairs)} pairs, n={self.n_samples}, "
            f"pooling={self.pooling!r}, two_pass={self.second is not None})"
        )
