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
every layer pair. Memory: the reference's states, (L+1) × rows × tokens × d floats (about
0.3 GB for SmolLM2-135M on 16 rows of 300 tokens) and one batch's states in float64 while
they are added.

    >>> live = LiveCKA(reference_model, tokenizer, probe_rows, label="expert", every=10)
    >>> if due(10, step, last=steps): metrics |= live.measure(student)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
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
