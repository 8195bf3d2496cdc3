"""An :class:`Average`: a named method with its per-tensor rules and accumulators.

It decides, tensor by tensor, which method applies (rules, integer tensors),
owns the :class:`~ckptavg.averaging.methods.Slot` of every tensor, and handles models
that grow: a tensor seen for the first time starts its average at that
checkpoint; one whose shape or dtype changes restarts (policy ``reset``, logged)
or stops the run (policy ``error``). Counts are kept per tensor, so LAWA and
SWA means stay right for tensors that joined late.

Accumulators live on ``device``, in pinned CPU memory (``pinned``: spilled
from a GPU), or in a :class:`~ckptavg.averaging.store.DiskStore` (``store``), as a
:class:`~ckptavg.averaging.store.Placement` decides; the arithmetic is the same in
every case.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ckptavg.averaging.methods.base import Method, Slot
from ckptavg.averaging.methods.ema import EMA
from ckptavg.averaging.methods.latest import Latest
from ckptavg.averaging.placement import Placement
from ckptavg.averaging.rules import Rule, match_rule
from ckptavg.averaging.store import DiskStore
from ckptavg.dtypes import is_averageable, short_name
from ckptavg.errors import OptionError, TensorMismatchError
from ckptavg.reading.formats.refs import TensorRef

log = logging.getLogger(__name__)

__all__ = ["ON_SHAPE_CHANGE", "Average"]

ON_SHAPE_CHANGE = ("error", "reset")
_LATEST = Latest()


@dataclass
class FoldRecord:
    path: str
    step: int | None
    fingerprint: str
    weight: float | None = None
    model: str | None = None  # the checkpoint's config.json identity (Checkpoint.model)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "step": self.step, "fingerprint": self.fingerprint}
        if self.weight is not None:
            d["weight"] = self.weight
        if self.model is not None:
            d["model"] = self.model
        return d


@dataclass
class Average:
    name: str
    method: Method
    rules: Sequence[Rule] = ()
    accum_dtype: torch.dtype = torch.float32
    on_shape_change: str = "error"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    slots: dict[str, Slot] = field(default_factory=dict)
    folded: list[FoldRecord] = field(default_factory=list)
    placement: Placement | None = field(default=None, repr=False)  # decides device / pinned / store, once
    store: DiskStore | None = field(default=None, repr=False)  # the accumulators are on disk
    pinned: bool = False  # CPU accumulators in pinned memory (spilled from a GPU)
    # one-shot only: per tensor, the idents of the inputs that end in its final state (Method.final_members)
    # and how many inputs fold into it
    final_members: dict[str, tuple[frozenset, int]] | None = field(default=None, repr=False)
    _rule_methods: dict[float, Method] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.on_shape_change not in ON_SHAPE_CHANGE:
            raise OptionError.invalid(None, "on_shape_change", self.on_shape_change, f"one of {', '.join(ON_SHAPE_CHANGE)}")
        if self.accum_dtype not in (torch.float32, torch.float64):
            raise OptionError.invalid(None, "accum_dtype", short_name(self.accum_dtype), "float32 or float64")
        self.device = torch.device(self.device)

    # -- which method a tensor gets ------------------------------------------------
    def method_for(self, name: str, dtype: torch.dtype) -> Method | None:
        """The method for tensor ``name``, or None if a rule excludes it."""
        rule = match_rule(self.rules, name)
        if rule is not None and rule.action == "exclude":
            return None
        if not is_averageable(dtype) or (rule is not None and rule.action == "latest"):
            return _LATEST
        if rule is not None and rule.action == "ema":
            assert rule.half_life is not None
            if isinstance(self.method, EMA) and self.method.half_life == rule.half_life:
                return self.method
            return self._rule_methods.setdefault(rule.half_life, EMA(half_life=rule.half_life))
        return self.method

    def needs_steps(self) -> bool:
        return self.method.needs_steps() or any(r.action == "ema" for r in self.rules)

    def needs(self) -> set:
        """Idents of the earlier checkpoints a later fold will read again (LAWA: each tensor's window)."""
        out: set = set()
        for name, slot in self.slots.items():
            method = self.method_for(name, slot.dtype)
            if method is not None:
                out.update(method.needs(slot))
        return out

    # -- growth and shape checks ------------------------------------------------------
    def check(self, ref: TensorRef, *, path: Any = None, zero3: bool = False) -> bool:
        """Check a tensor against its slot. True if its slot must restart (policy reset).

        Raises :class:`TensorMismatchError` under policy ``error``; ``zero3``: the checkpoint was saved
        by DeepSpeed, so a tensor that became empty is named as a ZeRO-3 placeholder. Never mutates.
        """
        slot = self.slots.get(ref.name)
        if slot is None:
            return False
        if slot.shape == ref.shape and slot.dtype == ref.dtype:
            return False
        if ref.numel == 0 and slot.numel > 0 and zero3:
            what = f"is empty (shape {list(ref.shape)}) where earlier checkpoints had {list(slot.shape)}"
            hint = ("a DeepSpeed ZeRO-3 partitioned placeholder? pass its DeepSpeed global_step folder instead, "
                    "which ckptavg gathers")
        elif slot.shape != ref.shape:
            what = f"changed shape from {list(slot.shape)} to {list(ref.shape)}"
            hint = "use --on-shape-change reset to restart its average (progressive training)"
        else:
            what = f"changed dtype from {short_name(slot.dtype)} to {short_name(ref.dtype)}"
            hint = "use --on-shape-change reset to restart its average"
        if self.on_shape_change == "error":
            raise TensorMismatchError(what, path=path or ref.file, tensor=ref.name, hint=hint)
        return True

    def slot_for(self, ref: TensorRef, method: Method, *, path: Any = None) -> Slot:
        """The slot of ``ref``, created (new tensor) or restarted (shape change, policy reset)."""
        slot = self.slots.get(ref.name)
        restarted = slot is not None and self.check(ref, path=path)
        if restarted:
            log.warning("%s: tensor %r %s; its %s average restarts here",
                        path or ref.file, ref.name,
                        f"changed from {list(slot.shape)} {short_name(slot.dtype)} to {list(ref.shape)} {short_name(ref.dtype)}",
                        self.name)
        if slot is None or restarted:
            slot = self.new_slot(ref.name, ref.shape, ref.dtype, method)
            if restarted:  # it folds fewer inputs than the tensor's: run every operation
                slot.folds = None
            self.slots[ref.name] = slot
        else:
            slot.dtype = ref.dtype
        if slot.store is not None:  # a fold follows: map the tensor's accumulators in one go
            slot.store.acquire_slot(slot)
        return slot

    # -- where the accumulators live --------------------------------------------------------
    def alloc(self, tensor: str, buf: str, numel: int, dtype: torch.dtype, *, zero: bool = True) -> torch.Tensor:
        """A flat accumulator for ``tensor``'s buffer ``buf``, where this average keeps them: zeroed, unless
        ``zero`` is off (a buffer the first fold overwrites) and it is in memory."""
        if self.store is not None and buf != "value":  # ``latest`` values (integer buffers) stay in memory
            return self.store.alloc(f"{tensor}/{buf}", numel, dtype)
        new = torch.zeros if zero else torch.empty
        if self.pinned:
            return new(numel, dtype=dtype, pin_memory=True)
        return new(numel, dtype=dtype, device=self.device)

    def new_slot(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, method: Method) -> Slot:
        slot = method.new_slot(shape, dtype, self.accum_dtype, self.device,
                               alloc=lambda buf, n, dt: self.alloc(name, buf, n, dt, zero=buf not in method.written_first))
        slot.store = self.store
        if self.final_members is not None:
            slot.final, slot.folds = self.final_members.get(name, (frozenset(), None))
        return slot

    def buffer_dtypes(self, method: Method, dtype: torch.dtype) -> list[tuple[str, torch.dtype]]:
        return [(b, dtype if b == "value" else self.accum_dtype) for b in method.buffers]

    def _buffers(self, refs: Iterable[TensorRef]) -> list[tuple[str, str, int, torch.dtype]]:
        out = []
        for ref in refs:
            method = self.method_for(ref.name, ref.dtype)
            if method is not None:
                out += [(ref.name, b, ref.numel, dt) for b, dt in self.buffer_dtypes(method, ref.dtype)]
        return out

    def store_layout(self, refs: Iterable[TensorRef]) -> list[tuple[str, int, torch.dtype]]:
        """The accumulators of ``refs`` that a disk store holds, as (store key, numel, dtype)."""
        return [(f"{name}/{b}", n, dt) for name, b, n, dt in self._buffers(refs) if b != "value"]

    def accumulator_bytes(self, refs: Iterable[TensorRef]) -> int:
        """Bytes of accumulators (and ``latest`` values) this average keeps for the tensors ``refs``."""
        return sum(n * dt.itemsize for _, _, n, dt in self._buffers(refs))

    # -- results ---------------------------------------------------------------------
    def value(self, name: str) -> torch.Tensor:
        """The average of tensor ``name``, flat, in the accumulator dtype (``latest``: source dtype).

        From a disk store it is a private copy (the tensor's pages are dropped again)."""
        return self._value(name, None)

    def output(self, name: str) -> torch.Tensor:
        """The average of tensor ``name``, flat, in its source dtype (:meth:`Method.value_as`)."""
        return self._value(name, self.slots[name].dtype)

    def _value(self, name: str, dtype: torch.dtype | None) -> torch.Tensor:
        slot = self.slots[name]
        method = self.method_for(name, slot.dtype)
        assert method is not None
        value = method.value(slot) if dtype is None else method.value_as(slot, dtype)
        if slot.store is not None:
            if slot.store.owns(value):
                value = value.clone()
            slot.store.release_slot(slot)
        return value

    def result(self, name: str) -> torch.Tensor:
        """The average of tensor ``name`` in its source dtype and shape."""
        return self.output(name).reshape(self.slots[name].shape)

    def drop(self, name: str) -> None:
        self.slots.pop(name, None)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "method": self.method.name,
            "options": self.method.options(),
            "reference": self.method.reference,
            "rules": [str(r) for r in self.rules],
            "accum_dtype": short_name(self.accum_dtype),
            "on_shape_change": self.on_shape_change,
        }
