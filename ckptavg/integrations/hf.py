"""A ``transformers.TrainerCallback`` that pulls the model toward the elastic centre every ``every`` steps."""

from __future__ import annotations

import os
from typing import Any

from transformers import TrainerCallback

from ckptavg.integrations.pull import PullState, pull_toward_centre

__all__ = ["CentrePullCallback"]


class CentrePullCallback(TrainerCallback):
    """``Trainer(..., callbacks=[CentrePullCallback("runs/centre", alpha=0.1, every=10)])``: after every
    ``every``-th optimizer step (``on_step_end``), ``x ← x − α (x − x̃)`` if a newer centre was published."""

    def __init__(self, centre_dir: str | os.PathLike, alpha: float, every: int = 1) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive number of steps, not {every!r}")
        self.centre_dir, self.alpha, self.every = centre_dir, alpha, every
        self.state = PullState()

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None and state.global_step % self.every == 0:
            pull_toward_centre(model, self.centre_dir, self.alpha, last=self.state)
