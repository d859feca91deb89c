"""A model's train/eval mode for the length of a block.

Every measurement, generation and teacher forward in the library runs a model in eval mode
(no dropout) and must hand it back in the mode it had: a training loop's student is
measured mid-run and keeps training after. `evaluating` is that one rule, used by all.
"""

from __future__ import annotations

import torch


class evaluating:
    """Eval mode inside the block (no dropout), the model's own mode restored after, also
    when the block raises."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self) -> torch.nn.Module:
        return self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)
