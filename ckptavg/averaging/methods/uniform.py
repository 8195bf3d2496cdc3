"""Uniform: the mean of the given checkpoints, or a weighted mean ``Σ w_i θ_i / Σ w_i``."""

from __future__ import annotations

import math

import torch

from ckptavg.averaging.methods.base import FoldInfo, Method, Option, Plan, Slot, divide, fill
from ckptavg.errors import UsageError


class Uniform(Method):
    name = "uniform"
    summary = "mean of the checkpoints (weighted with --weights)"
    reference = "https://arxiv.org/abs/2203.05482 (model soups: uniform soup)"
    buffers = ("sum",)
    written_first = ("sum",)
    params = (Option("weighted", bool, "Weighted mean (one weight per checkpoint).", default=False, cli=False),)
    watch_flag = "--uniform"

    weighted: bool

    def label(self) -> str:
        return "weighted" if self.weighted else "uniform"

    def prepare(self, slot: Slot, info: FoldInfo) -> Plan:
        if self.weighted and not (info.weight >= 0 and math.isfinite(info.weight)):
            raise UsageError(f"weight {info.weight!r} must be a finite number >= 0")
        return Plan(first=slot.count == 0, b=info.weight if self.weighted else 1.0)

    def apply(self, slot: Slot, plan: Plan, x: torch.Tensor, old: torch.Tensor | None, lo: int, hi: int,
              tmp: torch.Tensor) -> None:
        if self.weighted:
            x = torch.mul(x, plan.b, out=tmp)
        if plan.first:
            fill(slot.bufs["sum"][lo:hi], x)
        else:
            slot.bufs["sum"][lo:hi].add_(x)

    def bookkeep(self, slot: Slot, plan: Plan, info: FoldInfo) -> None:
        super().bookkeep(slot, plan, info)
        slot.weight_sum += plan.b

    def value(self, slot: Slot) -> torch.Tensor:
        if slot.weight_sum == 0:
            raise UsageError("the weights of every checkpoint holding this tensor sum to zero")
        return divide(slot.bufs["sum"], slot.weight_sum)
