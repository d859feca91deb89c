"""Live CKA: alignment measured while a model trains, on a fixed probe, exactly as `sdftlab cka`.

`LiveCKA` holds a probe — the first rows of a task (prompt plus ground-truth answer), encoded
and padded once into the batches `sdftlab cka` forms (`batch_size` rows, in order) — and the
reference's hidden states on it, captured once when the run starts (float32, pads zeroed), so
the reference need not stay in memory. `measure(model)` runs the training model on the same
batches (eval mode, no gradients, the LM head skipped; then back to train mode) and
accumulates the same exact, mergeable statistics (`CKAAccumulator`: diagonal layer pairs,
answer-mean pooling, standardized biased CKA). The value at a step is therefore the value an
offline `sdftlab cka` of that step's weights gives on the same rows, to the rounding of the
attention kernel. It returns ``live_cka/<label>/{last_layer, mean_over_layers,
sequence_last_layer}`` and ``live_cka/seconds``.

Cost per measurement: one forward of the probe and the statistics over the d×d matrices of
every layer pair. Memory: the reference's states, (L+1) × rows × tokens × d floats, and one
batch's states in float64 while they are added (measured costs: docs/SDFT.md#live-cka).

Its two halves in a training stage: the driver checks the probe before any worker starts
(`live_probe`: the rows, the reference's directory and label, a `LiveProbe` the job carries);
each worker captures the reference once (`start_live_cka`: from a model it already holds with
the reference's weights, else loaded and let go) and measures when `due`.

    >>> probe = live_probe(lineage, cfg.live_cka, reference="expert", data="science",
    ...                    data_dir=data_dir)
    >>> live = start_live_cka(probe, tokenizer, device, resident={})
    >>> if due(10, step, last=steps): metrics |= live.measure(student)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdftlab.cka.capture import (
    CKAAccumulator,
    LayerPairs,
    capture_hidden_states,
    collate,
    encode_examples,
    summary_metrics,
)
from sdftlab.modes import evaluating

PREFIX = "live_cka"


def due(every: int, step: int, last: int) -> bool:
    """Whether `step` (steps done) is a measurement: every `every` steps, and the last one.
    Every worker asks (a measurement is a report, and reports are collective)."""
    return every > 0 and (step % every == 0 or step == last)


class LiveCKA:
    """A fixed probe and a reference's hidden states on it; `measure` a training model."""

    def __init__(
        self,
        reference: torch.nn.Module,
        tokenizer: Any,
        rows: Sequence[Any],
        *,
        label: str,
        every: int,
        batch_size: int = 8,
        max_len: int = 512,
    ) -> None:
        self.label, self.every = label, every
        encoded = encode_examples(tokenizer, rows, max_len)
        self.batches = [
            collate(encoded[i : i + batch_size], tokenizer.pad_token_id)
            for i in range(0, len(encoded), batch_size)
        ]
        self.depth = int(reference.config.num_hidden_layers)
        with evaluating(reference):
            self.reference_states = [
                [h.cpu() for h in capture_hidden_states(reference, b, dtype=torch.float32)]
                for b in self.batches
            ]

    def measure(self, model: torch.nn.Module) -> dict[str, float]:
        """CKA of `model` against the reference on the probe: the summary metrics."""
        t0 = time.perf_counter()
        depth = int(model.config.num_hidden_layers)
        acc = CKAAccumulator(LayerPairs.build("diagonal", depth, self.depth))
        with evaluating(model):
            for batch, reference in zip(self.batches, self.reference_states, strict=True):
                acc.add_batch(capture_hidden_states(model, batch, dtype=torch.float32),
                              reference, batch)  # fmt: skip
        metrics = summary_metrics(acc.results(), self.label, prefix=PREFIX)
        return {**metrics, f"{PREFIX}/seconds": time.perf_counter() - t0}


def live_cka_text(metrics: dict[str, float]) -> str:
    """``  cka 0.912`` for a progress line when `metrics` hold a measurement (last layer)."""
    for key, value in metrics.items():
        if key.startswith(f"{PREFIX}/") and key.endswith("/last_layer"):
            return f"  cka {value:.3f}"
    return ""


def live_cka_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The last live CKA measurement among a run's final metrics (its time left out)."""
    return {k: float(v) for k, v in metrics.items()
            if k.startswith(f"{PREFIX}/") and k != f"{PREFIX}/seconds"}  # fmt: skip


@dataclass(frozen=True)
class LiveProbe:
    """What a training job carries to its workers for live CKA (`live_probe` checks it)."""

    every: int
    label: str  # the reference as metric names spell it
    reference_dir: str
    rows: list[Any]
    batch_size: int


def live_probe(
    lineage: Any, spec: Any, *, reference: str, data: str, data_dir: Path | None
) -> LiveProbe | None:
    """The driver's half (`specs.LiveCKASpec`; None when it is off): the probe's rows and the
    reference's directory and label, checked before any worker starts. `reference` and `data`
    are the run's defaults (the spec's own values win)."""
    if spec.every == 0:
        return None
    from sdftlab.cka.capture import example_record
    from sdftlab.data.loaders import load_task_file, task_source
    from sdftlab.errors import SdftlabError

    ref, entry = spec.reference or reference, spec.data or data.split("+")[0]
    try:
        task, path = task_source(entry, data_dir, "eval")
        rows = [example_record(e) for e in load_task_file(path, task, limit=spec.rows)]
        reference_dir = lineage.resolve(ref)
    except SdftlabError as err:
        raise type(err)(
            f"live_cka: {err} (set live_cka.reference / live_cka.data, or live_cka.every=0)"
        ) from None
    return LiveProbe(spec.every, lineage.label(ref), str(reference_dir), rows, spec.batch_size)


def start_live_cka(
    probe: LiveProbe | None,
    tokenizer: Any,
    device: torch.device,
    resident: dict[str, torch.nn.Module],
    everywhere: bool = False,
) -> LiveCKA | None:
    """The worker's half: on rank 0, a `LiveCKA` with the reference's states captured (from a
    `resident` model that holds the reference's weights — the frozen teacher, the student
    before its first step — or else loaded and let go); None elsewhere or when off.
    `everywhere`: on every rank (a sharded student's forward is a collective; rank 0's
    measurement is the one reported)."""
    from sdftlab.sharding import world

    if probe is None or (world()[0] != 0 and not everywhere):
        return None
    model = resident.get(probe.reference_dir)
    if model is None:
        from sdftlab.models import load_model

        model = load_model(probe.reference_dir, dtype=torch.float32).to(device)
    return LiveCKA(model, tokenizer, probe.rows, label=probe.label, every=probe.every,
                   batch_size=probe.batch_size)  # fmt: skip
