"""The evaluator protocol: ``evaluate(candidate) -> dict[str, float]``.

A :class:`Candidate` is one model to validate in an evaluation round: the raw
newest checkpoint or one of the averages, at a training step. It offers both
an exported, loadable model folder (``model_dir``: safetensors + config +
tokenizer, what ``from_pretrained`` reads; command evaluators get its path) and
its tensors (``state_dict()``, loaded lazily from that folder, for in-process
evaluators). Evaluators return a flat mapping of metric names to finite floats;
anything else is an :class:`EvaluationError` naming the evaluator and candidate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from ckptavg.errors import EvaluationError

__all__ = ["Candidate", "EvaluationError", "Evaluator", "check_metrics"]


@dataclass
class Candidate:
    name: str  # "raw" for the newest checkpoint, else the average's name ("ema-2000", "lawa-5", ...)
    step: int
    model_dir: Path  # a loadable model folder (never the trainer's checkpoint folder for an average)
    kind: str = "average"  # "raw" | "average"
    info: dict[str, Any] = field(default_factory=dict)  # method, options, steps folded, ...
    _state: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The candidate's tensors (CPU), read once from ``model_dir``'s safetensors files."""
        if self._state is None:
            from safetensors.torch import load_file

            files = sorted(Path(self.model_dir).glob("*.safetensors"))
            if not files:
                raise EvaluationError("no .safetensors files to load", path=self.model_dir)
            state: dict[str, torch.Tensor] = {}
            for f in files:
                state.update(load_file(str(f)))
            self._state = state
        return self._state

    def release(self) -> None:
        self._state = None


@runtime_checkable
class Evaluator(Protocol):
    name: str

    def evaluate(self, candidate: Candidate) -> dict[str, float]: ...

    def close(self) -> None: ...


def check_metrics(result: Any, *, evaluator: str, candidate: str) -> dict[str, float]:
    """Validate an evaluator's result: a non-empty mapping of names to finite numbers."""
    where = f"evaluator {evaluator!r} on {candidate}"
    if not isinstance(result, Mapping) or not result:
        raise EvaluationError(f"{where} returned {type(result).__name__} {str(result)[:80]!r}, expected a non-empty "
                              "mapping of metric names to numbers", hint='return e.g. {"val_loss": 2.31}')
    out: dict[str, float] = {}
    for k, v in result.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)):
            raise EvaluationError(f"{where}: metric {k!r} = {v!r} is not a number",
                                  hint='return e.g. {"val_loss": 2.31}')
        out[k] = float(v)
        if not math.isfinite(out[k]):
            raise EvaluationError(f"{where}: metric {k!r} is {v!r}", hint="the model diverged or the evaluator is broken")
    return out
