"""LAWA: latest weight averaging, the mean of the last ``k`` folded checkpoints, O(1) reads per fold.

A running window sum ``S`` is updated by add/subtract (the new checkpoint and the
one leaving the window), while a fresh sum ``F`` of the latest checkpoints is
built with adds only; every ``k`` folds ``F`` holds exactly the window and
replaces ``S``, so at most ``k − 1`` add/subtract pairs ever separate ``S`` from
an exact sum. One-shot knows each tensor's final window (``Slot.final``):
members that will leave it are added and later subtracted with NaN/Inf as 0, so
a poisoned checkpoint outside the window cannot leave NaN in ``S``; finite
inputs give the same bits as the daemon.

One-shot also knows how many inputs a tensor folds (``Slot.folds``), and so the last promotion ``p``:
only ``F``'s adds of the ``k`` folds up to ``p`` and ``S``'s updates after ``p`` reach the final state. The
others are skipped (``Plan.dead``), and the first live update of a buffer writes ``0.0 + x`` into it
(``Plan.fresh``), so the result has the bits of running them all from zeroed buffers, at about a third of
the passes for a short run.

Per tensor it keeps ``window`` (the idents in the window, oldest first: the
daemon retains those checkpoints) and ``fresh`` (folds in ``F`` since its last
promotion).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import torch

from ckptavg.averaging.methods.base import FoldInfo, Method, Option, Plan, Slot, divide, fill, finite


class LAWA(Method):
    name = "lawa"
    summary = "mean of the latest K checkpoints; O(1) reads per fold"
    reference = "https://arxiv.org/abs/2209.14981 (Kaddour, Stop Wasting My Time! LAWA); AlgoPerf EMA/LAWA study"
    buffers = ("S", "F")
    written_first = ("S", "F")
    params = (Option("window", int, "LAWA window: the number of latest checkpoints averaged.", unit="checkpoints",
                     metavar="K", low=0, low_open=True, high=1_000_000, default=5,
                     expect="a positive integer, at most 1000000"),)
    main_option = "window"

    window: int

    def slot_state(self) -> dict[str, Any]:
        return {"fresh": 0, "window": deque()}

    def needs(self, slot: Slot) -> Iterable[Hashable]:
        return slot.state["window"]

    def inputs_warning(self, count: int) -> str | None:
        if self.window <= count:
            return None
        return f"window {self.window} is larger than the {count} input(s); the result is the mean of all {count}"

    def final_members(self, idents: Sequence[Hashable]) -> frozenset:
        return frozenset(idents[-self.window:])

    def liveness(self, slot: Slot) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The buffers the next fold need not update (one-shot: it never reaches the final state) and those
        it writes anew (nothing folded into them yet)."""
        if slot.folds is None:
            return (), (("S", "F") if slot.count == 0 else ())
        i = slot.count + 1  # this fold, of slot.folds
        last = slot.folds - slot.folds % self.window  # the last promotion (0: none, S sums every input)
        dead = tuple(b for b, live in (("S", i > last), ("F", last - self.window < i <= last)) if not live)
        fresh = ("S",) if last == 0 and i == 1 else ("F",) if last and i == last - self.window + 1 else ()
        return dead, fresh

    def prepare(self, slot: Slot, info: FoldInfo) -> Plan:
        window = slot.state["window"]
        dead, fresh = self.liveness(slot)
        old = window[0] if len(window) == self.window and "S" not in dead else None
        clean = slot.final is not None and info.ident not in slot.final
        return Plan(first=slot.count == 0, old=old, clean=clean, dead=dead, fresh=fresh)

    def apply(self, slot: Slot, plan: Plan, x: torch.Tensor, old: torch.Tensor | None, lo: int, hi: int,
              tmp: torch.Tensor) -> None:
        # One-shot knows the future (``slot.final``): a member that will leave the window is folded, and
        # later subtracted, with NaN/Inf as 0, so a poisoned checkpoint that left the window cannot leave
        # NaN behind in S (NaN - NaN = NaN). Finite values are unchanged: the arithmetic, and so the
        # daemon's bitwise equality, is that of the plain method.
        if len(plan.dead) == len(self.buffers):  # one-shot: nothing of this fold reaches the final state
            return
        S, F = slot.bufs["S"][lo:hi], slot.bufs["F"][lo:hi]
        if plan.old is not None:
            assert old is not None
            S.sub_(finite(old, tmp) if slot.final is not None else old)
        if plan.clean:
            x = finite(x, tmp)
        for buf, name in ((S, "S"), (F, "F")):
            if name in plan.fresh:
                fill(buf, x)
            elif name not in plan.dead:
                buf.add_(x)

    def bookkeep(self, slot: Slot, plan: Plan, info: FoldInfo) -> None:
        super().bookkeep(slot, plan, info)
        window = slot.state["window"]
        if len(window) == self.window:
            window.popleft()
        window.append(info.ident)
        slot.state["fresh"] += 1
        if slot.state["fresh"] == self.window:  # F is now exactly the window: promote it
            slot.bufs["S"], slot.bufs["F"] = slot.bufs["F"], slot.bufs["S"]
            if slot.folds is None:  # one-shot: the new F is dead, or written anew (Plan.fresh) before it is read
                slot.bufs["F"].zero_()
            slot.state["fresh"] = 0

    def value(self, slot: Slot) -> torch.Tensor:
        return divide(slot.bufs["S"], len(slot.state["window"]))
