"""The averaging math: one small class per method, no I/O.

A run yields checkpoints ``(s_1, θ_1), (s_2, θ_2), …`` with strictly increasing
steps. Each method keeps, per tensor, a :class:`Slot` of accumulators and folds
one checkpoint at a time in three phases:

``prepare``
    bookkeeping only: the coefficients for this fold, and which earlier
    checkpoint's tensor it needs (LAWA's leaving member);
``apply``
    elementwise arithmetic on one flat chunk ``[lo, hi)`` of the tensor; the
    engine calls it chunk by chunk with ``x`` already cast to the accumulator
    dtype (shared by every average: never modified) and ``tmp``, a scratch
    chunk the method may overwrite;
``commit``
    bookkeeping after every chunk was applied.

Every elementwise step is a single IEEE-754 operation (``mul``, ``add``, ``sub``,
``div``; no fused ``lerp``/``addcmul``), so the result does not depend on how a
tensor is chunked, on the number of CPU threads, or on CPU vs CUDA: the daemon,
the one-shot CLI and a resumed run agree bit for bit.

Methods (``METHODS`` is the registry; unknown names list the valid ones):

* ``uniform`` — mean of the given checkpoints, or a weighted mean
  ``Σ w_i θ_i / Σ w_i`` (weights per checkpoint).
* ``ema`` — half-life ``h`` in steps: ``β_i = 0.5 ** ((s_i − s_{i−1}) / h)``,
  ``ema_1 = θ_1``, ``ema_i = β_i · ema_{i−1} + (1 − β_i) · θ_i``; exact for
  irregular intervals. A per-step decay ``d`` gives ``h = ln 0.5 / ln d``.
* ``lawa`` — mean of the last ``k`` folded checkpoints. O(1) reads per fold
  (the new one and the one leaving the window) and bounded error: a running
  window sum ``S`` is updated by add/subtract, while a fresh sum ``F`` of the
  latest checkpoints is built with adds only; every ``k`` folds ``F`` holds
  exactly the window and replaces ``S``, so at most ``k − 1`` add/subtract
  pairs ever separate ``S`` from an exact sum. One-shot knows each tensor's
  final window (``Slot.final``): members that will leave it are added and
  later subtracted with NaN/Inf as 0, so a poisoned checkpoint outside the
  window cannot leave NaN in ``S``; finite inputs give the same bits as the
  daemon.
* ``swa`` — mean of every checkpoint with ``s_i ≥ s0``.
* ``latest`` — the newest value (non-float tensors, and the ``latest`` rule).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ckptavg.errors import UsageError

__all__ = ["EMA", "LAWA", "METHODS", "SWA", "FoldInfo", "Latest", "Method", "Slot", "Uniform", "make_method"]


@dataclass
class FoldInfo:
    """What a method knows about the checkpoint being folded."""

    ident: Hashable  # identifies the checkpoint (LAWA asks for it again when it leaves)
    step: int | None
    weight: float = 1.0


@dataclass
class Slot:
    """One tensor's accumulators within one average."""

    shape: tuple[int, ...]
    dtype: torch.dtype  # source dtype of the newest fold: the output dtype
    count: int = 0  # folds into this tensor
    last_step: int | None = None
    weight_sum: float = 0.0
    fresh: int = 0  # LAWA: folds in F since its last promotion
    window: deque = field(default_factory=deque)  # LAWA: idents in the window, oldest first
    bufs: dict[str, torch.Tensor] = field(default_factory=dict)  # flat accumulators
    # one-shot only: the idents that end in this tensor's LAWA window (None: unknown, as in the daemon)
    final: frozenset | None = None
    # where the buffers live when not in plain memory (a DiskStore); told after every fold
    store: Any = field(default=None, repr=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def meta(self) -> dict[str, Any]:
        """JSON-able bookkeeping (buffers are persisted separately)."""
        return {
            "shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch."), "count": self.count,
            "last_step": self.last_step, "weight_sum": self.weight_sum, "fresh": self.fresh,
            "window": list(self.window),
        }


@dataclass
class Plan:
    """Coefficients of one fold, computed once, applied to every chunk."""

    first: bool
    a: float = 1.0  # multiplier of the old accumulator (EMA β)
    b: float = 1.0  # multiplier of the new value (EMA 1 − β, weighted w)
    old: Hashable | None = None  # LAWA: checkpoint leaving the window
    clean: bool = False  # LAWA, one-shot: this member leaves the window later; fold NaN/Inf as 0
    skip: bool = False


def _div(t: torch.Tensor, d: float) -> torch.Tensor:
    """``t / d``, correctly rounded on every device.

    CUDA divides by a Python scalar as a multiplication by its reciprocal (one
    more rounding); a 0-dim tensor on the same device gets true division, so
    CPU and CUDA agree bit for bit.
    """
    return t / torch.tensor(d, dtype=t.dtype, device=t.device)


def _finite(t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``t`` with NaN and ±Inf replaced by 0, written to ``out``; finite values are copied bit for bit."""
    return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0, out=out)


class Method:
    """Base class. Subclasses set ``name``, ``reference`` and the three phases."""

    name: ClassVar[str]
    reference: ClassVar[str]
    buffers: ClassVar[tuple[str, ...]]

    def options(self) -> dict[str, Any]:
        return {}

    def label(self) -> str:
        """Default name of an average using this method (``ema-2000``)."""
        return self.name

    def accepts(self, step: int | None) -> bool:
        return True

    def needs_steps(self) -> bool:
        return False

    def new_slot(self, shape: tuple[int, ...], dtype: torch.dtype, accum_dtype: torch.dtype, device: torch.device,
                 alloc: Callable[[str, int, torch.dtype], torch.Tensor] | None = None) -> Slot:
        """A slot of zeroed accumulators; ``alloc(buffer, numel, dtype)`` provides them (default: ``device`` memory)."""
        slot = Slot(shape=tuple(shape), dtype=dtype)
        n = math.prod(shape)
        for b in self.buffers:
            dt = accum_dtype if b != "value" else dtype
            slot.bufs[b] = alloc(b, n, dt) if alloc is not None else torch.zeros(n, dtype=dt, device=device)
        return slot

    def prepare(self, slot: Slot, info: FoldInfo) -> Plan:
        raise NotImplementedError

    def apply(self, slot: Slot, plan: Plan, x: torch.Tensor, old: torch.Tensor | None, lo: int, hi: int, tmp: torch.Tensor) -> None:
        raise NotImplementedError

    def commit(self, slot: Slot, plan: Plan, info: FoldInfo) -> None:
        """Bookkeeping after every chunk was applied; then a store may drop the tensor's pages."""
        self.bookkeep(slot, plan, info)
        if slot.store is not None:
            slot.store.release_slot(slot)

    def bookkeep(self, slot: Slot, plan: Plan, info: FoldInfo) -> None:
        slot.count += 1
        slot.last_step = info.step

    def value(self, slot: Slot) -> torch.Tensor:
        """The average, flat, in the accumulator dtype (``latest``: source dtype)."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.label()


class Uniform(Method):
    """Mean, or weighted mean Σ w_i θ_i / Σ w_i, of the given checkpoints."""

    name = "uniform"
    reference = "https://arxiv.org/abs/2203.05482 (model soups: uniform soup)"
    buffers = ("sum",)

    def __init__(self, weighted: bool = False) -> None:
        self.weighted = weighted

    def options(self) -> dict[str, Any]:
        return {"weighted": self.weighted}

    def label(self) -> str:
        return "weighted" if self.weighted else "uniform"

    def prepare(self, slot: Slot, info: FoldInfo) -> Plan:
        if self.weighted and not (info.weight >= 0 and math.isfinite(info.weight)):
            raise UsageError(f"weight {info.weight!r} must be a finite number >= 0")
        return Plan(first=slot.count == 0, b=info.weight if self.weighted else 1.0)

    def apply(self, slot: Slot, plan: Plan, x: torch.Tensor, old: torch.Tensor | None, lo: int, hi: int, tmp: torch.Tensor) -> None:
        if self.weighted:
            x = torch.mul(x, plan.b, out=tmp)
        slot.bufs["sum"][lo:hi].add_(x)

    def bookkeep(self, slot: Slot, plan: Plan, info: FoldInfo) -> None:
        super().bookkeep(slot, plan, info)
        slot.weight_sum += plan.b

    def value(self, slot: Slot) -> torch.Tensor:
        if slot.weight_sum == 0:
            raise UsageError("the weights of every checkpoint holding this tensor sum to zero")
        return _div(slot.bufs["sum"], slot.weight_sum)


class SWA(Uniform):
    """Uniform mean of every checkpoint from ``start_step`` on."""

    name = "swa"
    reference = "https://arxiv.org/abs/1803.05407 (Izmailov et al., Averaging Weights Leads to Wider Optima)"

    def __init__(self, start_step: int = 0) -> None:
        super().__init__(weighted=False)
        if start_step < 0:
            raise UsageError(f"--start-step must be >= 0, got {start_step}")
        self.start_step = int(start_step)

    def options(self) -> dict[str, Any]:
        return {"start_step": self.start_step}

    def label(self) -> str:
        return f"swa-{self.start_step}"

    def needs_steps(self) -> bool:
        return self.start_step > 0

    def accepts(self, step: int | None) -> bool:
        return step is None or step >= self.start_step


class EMA(Method):
    """Exponential moving average with a half-life in steps, exact for irregular intervals."""

    name = "ema"
    reference = "https://arxiv.org/abs/2312.02696 (Karras et al., EDM2: EMA in steps); AlgoPerf EMA/LAWA study"
    buffers = ("ema",)

    def __init__(self, half_life: float | None = None, decay: float | None = None) -> None:
        if (half_life is None) == (decay is None):
            raise UsageError("EMA needs exactly one of --half-life (steps) or --decay (per step)")
        if decay is not None:
            if not 0.0 < decay < 1.0:
                raise UsageError(f"--decay must be strictly between 0 and 1, got {decay}")
            half_life = math.log(0.5) / math.log(decay)
        assert half_life is not None
        if not (half_life > 0 and math.isfinite(half_life)):
            raise UsageError(f"--half-life must be a positive number of steps, got {half_life}")
        self.half_life = float(half_life)
        self.decay = decay

    def options(self) -> dict[str, Any]:
        return {"half_life": self.half_life} if self.decay is None else {"decay": self.decay, "half_life": self.half_life}

    def label(self) -> str:
        h = self.half_life
        return f"ema-{int(h)}" if h == int(h) else f"ema-{h:g}"

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

    def apply(self, slot: Slot, plan: Plan, x: torch.Tensor, old: torch.Tensor | None, lo: int, hi: int, tmp: torch.Tensor) -> None:
        ema = slot.bufs["ema"][lo:hi]
        if plan.first:
            ema.copy_(x)
        else:
            ema.mul_(plan.a).add_(torch.mul(x, plan.b, out=tmp))

    def value(self, slot: Slot) -> torch.Tensor:
        return slot.bufs["ema"]


class LAWA(Method):
    """Latest weight averaging: mean of the last ``window`` checkpoints, O(1) reads per fold."""

    name = "lawa"
    reference = "https://arxiv.org/abs/2209.14981 (Kaddour, Stop Wasting My Time! LAWA); AlgoPerf EMA/LAWA study"
    buffers = ("S", "F")

    def __init__(self, window: int = 5) -> None:
        if int(window) != window or window < 1:
            raise UsageError(f"--window must be a positive integer, got {window}")
        self.window = int(window)

    def options(self) -> dict[str, Any]:
        return {"window": self.window}

    def label(self) -> str:
        return f"lawa-{self.window}"

    def prepare(self, slot: Slot, info: FoldInfo) -> Plan:
        old = slot.window[0] if len(slot.window) == self.window else None
        clean = slot.final is not None and info.ident not in slot.final
        return Plan(first=slot.count == 0, old=old, clean=clean)

    def apply(self, slot: Slot, plan: Plan, x: torch.Tensor, old: torch.Tensor | None, lo: int, hi: int, tmp: torch.Tensor) -> None:
        # One-shot knows the future (``slot.final``): a member that will leave the window is folded, and
        # later subtracted, with NaN/Inf as 0, so a poisoned checkpoint that left the window cannot leave
        # NaN behind in S (NaN - NaN = NaN). Finite values are unchanged: the arithmetic, and so the
        # daemon's bitwise equality, is that of the plain method.
        S, F = slot.bufs["S"][lo:hi], slot.bufs["F"][lo:hi]
        if plan.old is not None:
            assert old is not None
            S.sub_(_finite(old, tmp) if slot.final is not None else old)
        if plan.clean:
            x = _finite(x, tmp)
        S.add_(x)
        F.add_(x)

    def bookkeep(self, slot: Slot, plan: Plan, info: FoldInfo) -> None:
        super().bookkeep(slot, plan, info)
        if plan.old is not None:
            slot.window.popleft()
        slot.window.append(info.ident)
        slot.fresh += 1
        if slot.fresh == self.window:  # F is now exactly the window: promote it
            slot.bufs["S"], slot.bufs["F"] = slot.bufs["F"], slot.bufs["S"]
            slot.bufs["F"].zero_()
            slot.fresh = 0

    def value(self, slot: Slot) -> torch.Tensor:
        return _div(slot.bufs["S"], len(slot.window))


class Latest(Method):
    """The newest value, unaveraged (integer buffers, and the ``latest`` rule)."""

    name = "latest"
    reference = "-"
    buffers = ("value",)

    def prepare(self, slot: Slot, info: FoldInfo) -> Plan:
        return Plan(first=slot.count == 0)

    def apply(self, slot: Slot, plan: Plan, x: torch.Tensor, old: torch.Tensor | None, lo: int, hi: int, tmp: torch.Tensor) -> None:
        slot.bufs["value"][lo:hi].copy_(x)

    def value(self, slot: Slot) -> torch.Tensor:
        return slot.bufs["value"]


METHODS: dict[str, type[Method]] = {"uniform": Uniform, "ema": EMA, "lawa": LAWA, "swa": SWA}


def make_method(name: str, **options: Any) -> Method:
    """Build a method by registry name; unknown names list the valid ones."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise UsageError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None
    return cls(**options)
