"""The elastic centre of Elastic Averaging SGD (Zhang, Choromanska, LeCun 2015, asynchronous form).

Each worker checkpoint that arrives moves the centre toward it: ``x̃ ← x̃ + α (x_i − x̃)``; the first one
initialises ``x̃``. Over the arrival sequence this is an EMA with the constant per-fold decay ``1 − α``,
but it needs no training steps (the workers' steps interleave), it accepts ``α = 1`` (the centre is the
newest arrival) and it is computed exactly as the paper writes it, in three IEEE-754 operations per
element (``sub``, ``mul``, ``add``), so a float64 reference of the recurrence reproduces it to the
accumulator's rounding and a re-fold after a crash reproduces it bit for bit.

Not in the registry (``METHODS``): it averages several runs, which ``ckptavg average``/``watch`` do not;
``ckptavg centre`` (``ckptavg.daemon.centre``) builds it directly.
"""

from __future__ import annotations

import torch

from ckptavg.averaging.methods.base import FoldInfo, Method, Option, Plan, Slot

__all__ = ["Elastic"]


class Elastic(Method):
    name = "elastic"
    summary = "the elastic centre of asynchronous EASGD: x̃ ← x̃ + α (x − x̃) per arriving checkpoint"
    reference = "https://arxiv.org/abs/1412.6651 (Zhang, Choromanska, LeCun: Deep learning with Elastic Averaging SGD)"
    buffers = ("centre",)
    written_first = ("centre",)
    params = (
        Option("alpha", float, "Moving rate of the centre toward each arriving worker checkpoint.", metavar="A",
               low=0, low_open=True, high=1, expect="a number in (0, 1]"),
    )
    main_option = "alpha"

    alpha: float

    def label(self) -> str:
        return "centre"

    def prepare(self, slot: Slot, info: FoldInfo) -> Plan:
        return Plan(first=slot.count == 0, a=1.0, b=self.alpha)

    def apply(self, slot: Slot, plan: Plan, x: torch.Tensor, old: torch.Tensor | None, lo: int, hi: int,
              tmp: torch.Tensor) -> None:
        centre = slot.bufs["centre"][lo:hi]
        if plan.first:
            centre.copy_(x)
            return
        torch.sub(x, centre, out=tmp)  # x − x̃
        tmp.mul_(plan.b)  # α (x − x̃)
        centre.add_(tmp)  # x̃ + α (x − x̃)

    def value(self, slot: Slot) -> torch.Tensor:
        return slot.bufs["centre"]
