"""EMA: exponential moving average with a half-life in training steps, exact for irregular intervals.

``β_i = 0.5 ** ((s_i − s_{i−1}) / h)``, ``ema_1 = θ_1``, ``ema_i = β_i · ema_{i−1} + (1 − β_i) · θ_i``.
A per-step decay ``d`` gives ``h = ln 0.5 / ln d``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ckptavg.averaging.methods.base import FoldInfo, Method, Option, Plan, Slot
from ckptavg.errors import UsageError

MAX_HALF_LIFE = 1e15  # steps: far beyond any run, and its label (``ema-<H>``) stays a short folder name


class MovingAverage(Method):
    """What every exponential moving average shares: one ``ema`` buffer, ``ema ← a · ema + b · θ`` in two
    IEEE-754 operations per element (the first fold copies θ). Subclasses choose ``a`` and ``b`` in
    ``prepare``."""

    buffers = ("ema",)
    written_first = ("ema",)

    def apply(self, slot: Slot, plan: Plan, x: torch.Tensor, old: torch.Tensor | None, lo: int, hi: int,
              tmp: torch.Tensor) -> None:
        ema = slot.bufs["ema"][lo:hi]
        if plan.first:
            ema.copy_(x)
        else:
            ema.mul_(plan.a).add_(torch.mul(x, plan.b, out=tmp))

    def value(self, slot: Slot) -> torch.Tensor:
        return slot.bufs["ema"]


class EMA(MovingAverage):
    name = "ema"
    summary = "exponential moving average; irregular checkpoint intervals handled exactly"
    reference = "https://arxiv.org/abs/2312.02696 (Karras et al., EDM2: EMA in steps); AlgoPerf EMA/LAWA study"
    params = (
        Option("half_life", float, "EMA half-life in training steps.", unit="steps", metavar="H",
               low=0, low_open=True, high=MAX_HALF_LIFE, expect=f"a positive number of steps, at most {MAX_HALF_LIFE:g}"),
        Option("decay", float, "EMA decay per step (instead of --half-life): h = ln 0.5 / ln d.", unit="per step",
               metavar="D", low=0, low_open=True, high=1, high_open=True),
    )
    main_option = "half_life"
    one_of = (("half_life", "decay"),)

    half_life: float
    decay: float | None

    def setup(self) -> None:
        if self.decay is not None:
            self.half_life = math.log(0.5) / math.log(self.decay)
        self.half_life = float(self.half_life)

    def options(self) -> dict[str, Any]:
        return {"half_life": self.half_life} if self.decay is None else {"decay": self.decay, "half_life": self.half_life}

    def needs_steps(self) -> bool:
        return True

    def beta(self, delta_steps: int) -> float:
        return 0.5 ** (delta_steps / self.half_life)

    def prepare(self, slot: Slot, info: FoldInfo) -> Plan:
        if slot.count == 0:
            return Plan(first=True)
        assert info.step is not None and slot.last_step is not None
        delta = info.step - slot.last_step
        if delta <= 0:
            raise UsageError(f"EMA needs increasing steps; got step {info.step} after {slot.last_step}")
        beta = self.beta(delta)
        return Plan(first=False, a=beta, b=1.0 - beta)
