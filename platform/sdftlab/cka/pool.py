"""The CKA actor pool: linear CKA between two lineage states over a dataset, on Ray Data.

Linear CKA (Kornblith et al. 2019) between a student's and a teacher's hidden states on the
same inputs — prompt plus ground-truth answer — at every compared layer pair ("CKA as a lens
on self-distillation recovery"; capture and statistics in `sdftlab.cka.capture` and
`sdftlab.cka.stats`). `cka_over_dataset` streams the examples through a pool of Ray actors
(`CKAWorker`, used with ``ds.map_batches(CKAWorker, ...)``); each actor loads the two models
and the tokenizer once, from local directories (``lineage.resolve(ref)``), and turns each
batch of rows into partial `CKAAccumulator` statistics, returned as one output row of
``np.savez`` bytes (an Arrow binary column: no pickle). The driver merges the partials as
they arrive (``iter_rows``); the merge is exact, so the result is the single-process
`cka_local` result to float64 rounding (~1e-13).

Batches are fixed before Ray sees them: the examples are cut, in order, into chunks of
``batch_size`` (one chunk = one padded model batch), and each dataset row is one chunk; a
Ray batch is a few such rows (``calls_per_actor`` calls per actor, so that few partial
statistics — O(pairs·d²) floats each — cross the object store), forwarded chunk by chunk.
Every path therefore forwards exactly the same model batches, with the same padding; only
the order of the (exact) merges differs. In float32
the remaining differences come from thread counts inside the forward pass (~1e-7 at worst);
``dtype="float64"`` makes the pool agree with `cka_local` to ~1e-13.

Debiased + standardized CKA takes two passes (decided here, see `sdftlab.cka.stats`): the
first pass accumulates the raw pooled rows and fits a per-pair `Standardizer`; the second
pass forwards the same chunks again and accumulates standardized rows. The default headline
form — biased, standardized, as in the paper's per-sample comparison — is exact from one
pass and costs nothing extra.

    sdftlab cka --a forgot --b expert --data science

    >>> df = cka_over_dataset(lineage, "forgot", "expert", examples, CKAOptions(), actors=2)
    >>> df[["layer_a", "layer_b", "cka", "sequence_cka"]]
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import ConfigDict, Field, field_validator

from sdftlab.cka.capture import (
    CKAAccumulator,
    LayerPairs,
    Pair,
    capture_hidden_states,
    collate,
    encode_examples,
    example_record,
    pack_arrays,
    unpack_arrays,
)
from sdftlab.cka.stats import Standardizer
from sdftlab.config import StrictModel
from sdftlab.errors import ConfigError, DataError
from sdftlab.lineage import Lineage
from sdftlab.models import load_model, load_model_config, load_tokenizer, local_device

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class CKAOptions(StrictModel):
    """How to run one CKA comparison, and the form of its headline value (JSON-serializable,
    sent to every actor): one object every entry point takes (`cka_local`,
    `cka_over_dataset`, `cka.run.compare_states`).

    ``batch_size``: examples per padded model batch. ``dtype``: the models' compute dtype
    (statistics are always float64). See `LayerPairs.build` for ``layers``. ``standardize``
    and ``debiased`` choose the headline ``cka`` (biased + standardized by default;
    debiased + standardized takes two passes).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: Any = "diagonal"
    pooling: Literal["last", "answer_mean"] = "answer_mean"
    standardize: bool = True
    debiased: bool = False
    sequence_tokens: Literal["answer", "all"] = "answer"
    sequence_debiased: bool = False
    batch_size: int = Field(8, gt=0)
    max_len: int = Field(512, gt=0)
    padding_side: Literal["right", "left"] = "right"
    dtype: Literal["float32", "float64", "bfloat16", "float16"] = "float32"

    @field_validator("layers")
    @classmethod
    def _hashable(cls, layers: Any) -> Any:
        """Lists become tuples: the options stay hashable and round-trip through JSON."""
        if isinstance(layers, list | tuple):
            return tuple(tuple(x) if isinstance(x, list | tuple) else x for x in layers)
        return layers

    @property
    def two_pass(self) -> bool:
        """Debiased + standardized CKA needs a first pass to fit the standardizers."""
        return self.debiased and self.standardize

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> CKAOptions:
        return cls.model_validate(json.loads(text))


DEFAULT = CKAOptions()  # the paper's per-sample form: diagonal layers, answer-mean pooling


def chunk_examples(examples: Sequence[Any], batch_size: int) -> list[list[dict[str, Any]]]:
    """The examples, in order, as chunks of `batch_size` JSON-ready records (model batches)."""
    records = [example_record(e) for e in examples]
    return [records[i : i + batch_size] for i in range(0, len(records), batch_size)]


def _check_same_vocab(tok_a: Any, tok_b: Any) -> None:
    if tok_a.get_vocab() != tok_b.get_vocab():
        raise ConfigError(
            "the two models' tokenizers differ; CKA runs both models on the same token ids, "
            "so they must share one vocabulary"
        )


class PairRunner:
    """Two models and one tokenizer in one process: chunks of examples → statistics."""

    def __init__(
        self, model_a: torch.nn.Module, model_b: torch.nn.Module, tokenizer: Any, opts: CKAOptions
    ) -> None:
        self.model_a = model_a.eval()
        self.model_b = model_b.eval()
        self.tokenizer = tokenizer
        self.opts = opts
        for side, m in (("a", model_a), ("b", model_b)):
            vocab = getattr(m.config, "vocab_size", None)
            if vocab is not None and len(tokenizer) > vocab:
                raise ConfigError(
                    f"model {side} has vocab_size={vocab} but the tokenizer has "
                    f"{len(tokenizer)} tokens; compare models that share the tokenizer"
                )
        self.pairs = LayerPairs.build(
            opts.layers,
            int(model_a.config.num_hidden_layers),
            int(model_b.config.num_hidden_layers),
        )

    @classmethod
    def from_dirs(cls, dir_a: str, dir_b: str, opts: CKAOptions) -> PairRunner:
        """Load both models (safetensors, no remote code) and model a's tokenizer, on this
        process's GPU when it has one (a pool actor given `gpus_per_actor`), else the CPU."""
        device = local_device()

        def load(d: str) -> torch.nn.Module:
            return load_model(d, dtype=DTYPES[opts.dtype]).to(device)

        tok_a = load_tokenizer(dir_a)
        model_a = load(dir_a)
        if dir_b == dir_a:  # a state against itself: one copy of the weights is enough
            return cls(model_a, model_a, tok_a, opts)
        _check_same_vocab(tok_a, load_tokenizer(dir_b))
        return cls(model_a, load(dir_b), tok_a, opts)

    def new_accumulator(
        self, standardizers: Mapping[Pair, Standardizer] | None = None
    ) -> CKAAccumulator:
        return CKAAccumulator(
            self.pairs,
            pooling=self.opts.pooling,
            sequence_tokens=self.opts.sequence_tokens,
            sequence_debiased=self.opts.sequence_debiased,
            standardizers=standardizers,
        )

    def add_chunk(self, acc: CKAAccumulator, examples: Sequence[Any]) -> None:
        """Forward one chunk as one padded batch through both models; add it to `acc`."""
        encoded = encode_examples(self.tokenizer, examples, self.opts.max_len)
        batch = collate(encoded, self.tokenizer.pad_token_id, self.opts.padding_side)
        acc.add_batch(
            capture_hidden_states(self.model_a, batch),
            capture_hidden_states(self.model_b, batch),
            batch,
        )


def standardizers_to_bytes(standardizers: Mapping[Pair, Standardizer]) -> bytes:
    """Per-pair Standardizers as ``np.savez`` bytes (for the actors of a second pass)."""
    pairs = list(standardizers)
    return pack_arrays(
        {
            "pairs": np.array(pairs, dtype=np.int64).reshape(-1, 2),
            "st": {str(k): standardizers[p].to_dict() for k, p in enumerate(pairs)},
        }
    )


def standardizers_from_bytes(data: bytes) -> dict[Pair, Standardizer]:
    d = unpack_arrays(data)
    pairs = [(int(a), int(b)) for a, b in np.asarray(d["pairs"]).reshape(-1, 2)]
    return {p: Standardizer.from_dict(d["st"][str(k)]) for k, p in enumerate(pairs)}


class CKAWorker:
    """Ray Data callable class: rows of example chunks → one row of partial statistics.

    Input columns: ``examples`` (each a JSON list of ``{uid, messages, demonstration}``, one
    model batch). Output: one row per call, ``stats`` (`CKAAccumulator.to_bytes`, binary),
    ``n_chunks``, ``n_samples`` and ``seconds`` (forward + statistics time).
    """

    def __init__(
        self,
        model_a_dir: str,
        model_b_dir: str,
        options: str,
        standardizers: bytes | None = None,
    ) -> None:
        self.runner = PairRunner.from_dirs(model_a_dir, model_b_dir, CKAOptions.from_json(options))
        self.standardizers = (
            standardizers_from_bytes(standardizers) if standardizers is not None else None
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        acc = self.runner.new_accumulator(self.standardizers)
        for chunk in batch["examples"]:
            self.runner.add_chunk(acc, json.loads(str(chunk)))
        return {
            "stats": np.array([acc.to_bytes()], dtype=object),
            "n_chunks": np.array([len(batch["examples"])], dtype=np.int64),
            "n_samples": np.array([acc.n_samples], dtype=np.int64),
            "seconds": np.array([time.perf_counter() - t0], dtype=np.float64),
        }


# ------------------------------------------------------------------------------- drivers


def _precheck(lineage: Lineage, a: str, b: str, examples: Sequence[Any], opts: CKAOptions) -> None:
    """Fail before any model loads or actor starts: empty data, bad examples, bad layers."""
    if len(examples) == 0:
        raise DataError("no examples: CKA of an empty dataset is undefined")
    tokenizer = lineage.load_tokenizer(a)
    encode_examples(tokenizer, examples, opts.max_len)
    depths = [int(load_model_config(lineage.resolve(r)).num_hidden_layers) for r in (a, b)]
    LayerPairs.build(opts.layers, *depths)


def accumulate_local(
    lineage: Lineage,
    a: str,
    b: str,
    examples: Sequence[Any],
    opts: CKAOptions,
    *,
    two_pass: bool = False,
) -> CKAAccumulator:
    """The statistics of `examples` in this process (the reference for the pool)."""
    _precheck(lineage, a, b, examples, opts)
    runner = PairRunner.from_dirs(str(lineage.resolve(a)), str(lineage.resolve(b)), opts)
    chunks = chunk_examples(examples, opts.batch_size)
    acc = runner.new_accumulator()
    for chunk in chunks:
        runner.add_chunk(acc, chunk)
    if two_pass:
        acc2 = runner.new_accumulator(acc.fit_standardizers())
        for chunk in chunks:
            runner.add_chunk(acc2, chunk)
        acc = acc2
    return acc


def cka_local(
    lineage: Lineage, a: str, b: str, examples: Sequence[Any], opts: CKAOptions = DEFAULT
) -> pd.DataFrame:
    """Per-layer-pair CKA of states `a` and `b` on `examples`, in this process: the result of
    `cka_over_dataset`, without Ray."""
    acc = accumulate_local(lineage, a, b, examples, opts, two_pass=opts.two_pass)
    return acc.results(debiased=opts.debiased, standardize=opts.standardize)


def _pool_pass(
    dir_a: str,
    dir_b: str,
    opts: CKAOptions,
    chunks: Iterable[list[dict[str, Any]]],
    *,
    actors: int,
    cpus_per_actor: float,
    gpus_per_actor: float,
    calls_per_actor: int,
    standardizers: bytes | None,
    log: Callable[[str], None] | None,
) -> CKAAccumulator:
    import ray.data

    items = [
        {"chunk": i, "examples": json.dumps(c, ensure_ascii=False)} for i, c in enumerate(chunks)
    ]
    rows_per_call = max(1, math.ceil(len(items) / (actors * calls_per_actor)))
    n_calls = math.ceil(len(items) / rows_per_call)
    ds = ray.data.from_items(items, override_num_blocks=n_calls)
    # Results cross as Arrow binary; never fall back to pickled Python-object columns.
    ds.context.enable_fallback_to_arrow_object_ext_type = False
    ds = ds.map_batches(
        CKAWorker,
        fn_constructor_kwargs={
            "model_a_dir": dir_a,
            "model_b_dir": dir_b,
            "options": opts.to_json(),
            "standardizers": standardizers,
        },
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_size=rows_per_call,  # rows = chunks, each forwarded as one model batch
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor,  # a cluster's GPU workers; 0: the CPU
    )
    acc: CKAAccumulator | None = None
    done = 0
    for row in ds.iter_rows():
        part = CKAAccumulator.from_bytes(bytes(row["stats"]))
        acc = part if acc is None else acc.merge(part)
        done += int(row["n_chunks"])
        if log is not None:
            log(f"  cka: {done}/{len(items)} batches merged ({acc.n_samples} samples)")
    if acc is None or done != len(items):
        raise RuntimeError(f"the CKA pool returned {done} of {len(items)} batches")
    return acc


def accumulate_over_dataset(
    lineage: Lineage,
    a: str,
    b: str,
    examples: Sequence[Any],
    opts: CKAOptions,
    *,
    actors: int = 1,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    calls_per_actor: int = 4,
    two_pass: bool = False,
    log: Callable[[str], None] | None = None,
) -> CKAAccumulator:
    """The statistics of `examples`, computed by a pool of `actors` Ray actors, each with
    `cpus_per_actor` CPUs and `gpus_per_actor` GPUs (its models on the GPU)."""
    import ray

    from sdftlab.raycluster import ensure_ray

    if isinstance(actors, bool) or not isinstance(actors, int) or actors < 1:
        raise ConfigError(f"actors must be a positive integer, got {actors!r}")
    _precheck(lineage, a, b, examples, opts)
    ensure_ray()
    for kind, each in (("CPU", cpus_per_actor), ("GPU", gpus_per_actor)):
        have = float(ray.cluster_resources().get(kind, 0.0))
        if actors * each > have:
            raise ConfigError(
                f"actors={actors} × {each:g} {kind} each needs {actors * each:g} {kind}s but "
                f"the Ray cluster has {have:g}; use fewer actors"
                + (" or gpus_per_actor=0 (the CPU)" if kind == "GPU" else "")
            )
    dir_a, dir_b = str(lineage.resolve(a)), str(lineage.resolve(b))
    chunks = chunk_examples(examples, opts.batch_size)
    if (
        isinstance(calls_per_actor, bool)
        or not isinstance(calls_per_actor, int)
        or calls_per_actor < 1
    ):
        raise ConfigError(f"calls_per_actor must be a positive integer, got {calls_per_actor!r}")
    kw: dict[str, Any] = {
        "actors": actors,
        "cpus_per_actor": cpus_per_actor,
        "gpus_per_actor": gpus_per_actor,
        "calls_per_actor": calls_per_actor,
        "log": log,
    }
    acc = _pool_pass(dir_a, dir_b, opts, chunks, standardizers=None, **kw)
    if two_pass:
        st = standardizers_to_bytes(acc.fit_standardizers())
        acc = _pool_pass(dir_a, dir_b, opts, chunks, standardizers=st, **kw)
    return acc


def cka_over_dataset(
    lineage: Lineage,
    a: str,
    b: str,
    examples: Sequence[Any],
    opts: CKAOptions = DEFAULT,
    *,
    actors: int = 1,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    calls_per_actor: int = 4,
    log: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """Per-layer-pair CKA of states (or model dirs) `a` and `b` on `examples`, on Ray.

    Returns `CKAAccumulator.results`: one row per layer pair with ``cka`` (the headline form
    `opts` asks for), ``cka_biased``, ``cka_debiased``, ``cka_standardized``,
    ``sequence_cka`` and counts. ``opts.batch_size`` examples make one padded model batch;
    each actor gets about ``calls_per_actor`` Ray batches of such chunks and returns one
    partial accumulator per call. Calls `ensure_ray()` first.
    """
    acc = accumulate_over_dataset(
        lineage, a, b, examples, opts, actors=actors, cpus_per_actor=cpus_per_actor,
        gpus_per_actor=gpus_per_actor, calls_per_actor=calls_per_actor, two_pass=opts.two_pass,
        log=log,
    )  # fmt: skip
    return acc.results(debiased=opts.debiased, standardize=opts.standardize)
