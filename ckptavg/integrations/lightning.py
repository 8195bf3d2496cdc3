"""A Lightning ``Callback`` that pulls the module toward the elastic centre every ``every`` optimizer steps."""

from __future__ import annotations

import os
from typing import Any

try:
    from lightning.pytorch import Callback
except ImportError:  # the older package name
    from pytorch_lightning import Callback  # type: ignore[no-redef]

from ckptavg.integrations.pull import PullState, pull_toward_centre

__all__ = ["CentrePullLightningCallback"]


class CentrePullLightningCallback(Callback):
    """``Trainer(callbacks=[CentrePullLightningCallback("runs/centre", alpha=0.1, every=10)])``: after a batch
    that completed an ``every``-th optimizer step (``trainer.global_step``; gradient accumulation respected),
    ``x ← x − α (x − x̃)`` if a newer centre was published."""

    def __init__(self, centre_dir: str | os.PathLike, alpha: float, every: int = 1) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive number of steps, not {every!r}")
        self.centre_dir, self.alpha, self.every = centre_dir, alpha, every
        self.state = PullState()
        self._done_at: int | None = None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every == 0 and step != self._done_at:
            self._done_at = step
            pull_toward_centre(pl_module, self.centre_dir, self.alpha, last=self.state)
