"""Latest: the newest value, unaveraged (integer buffers, and the ``latest`` rule). Not a registered method."""

from __future__ import annotations

import torch

from ckptavg.averaging.methods.base import FoldInfo, Method, Plan, Slot


class Latest(Method):
    name = "latest"
    summary = "the newest value, unaveraged"
    buffers = ("value",)
    written_first = ("value",)

    def prepare(self, slot: Slot, info: FoldInfo) -> Plan:
        return Plan(first=slot.count == 0)

    def apply(self, slot: Slot, plan: Plan, x: torch.Tensor, old: torch.Tensor | None, lo: int, hi: int,
              tmp: torch.Tensor) -> None:
        slot.bufs["value"][lo:hi].copy_(x)

    def value(self, slot: Slot) -> torch.Tensor:
        return slot.bufs["value"]
