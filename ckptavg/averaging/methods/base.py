"""The method plug-in interface: what a method declares about itself, and the per-tensor :class:`Slot`.

A method is one class (one file in this folder) that declares, once:

* ``name``, ``summary`` and ``reference`` (the paper);
* ``params``: its options as :class:`Option` records (name, type, unit, range,
  help); ``main_option``, the one written inline (``ema:2000``); ``one_of``,
  groups of which exactly one must be given (``half_life`` / ``decay``). The
  ``ckptavg average`` flags, the ``ckptavg watch`` flags, the TOML keys of an
  ``[[average]]`` table, their validation and their error messages, and the
  README's method table are all derived from this declaration;
* ``buffers``: its per-tensor accumulators, and ``slot_state()``: its per-tensor
  bookkeeping (JSON-able; persisted with the daemon's state);
* the math, in three phases — ``prepare`` (coefficients for one fold, and which
  earlier checkpoint's tensor it needs), ``apply`` (elementwise, on one flat chunk)
  and ``bookkeep``;
* ``needs(slot)``: the earlier checkpoints it will still read (the daemon keeps
  those), and ``final_members``: which inputs end in its final state (one-shot).

Every elementwise step is a single IEEE-754 operation (``mul``, ``add``, ``sub``,
``div``; no fused ``lerp``/``addcmul``), so the result does not depend on how a
tensor is chunked, on the number of CPU threads, or on CPU vs CUDA: the daemon,
the one-shot CLI and a resumed run agree bit for bit.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ckptavg.dtypes import cast_back
from ckptavg.errors import OptionError

__all__ = ["FoldInfo", "Method", "Option", "Plan", "Slot", "divide", "fill", "finite"]


@dataclass(frozen=True)
class Option:
    """One option of a method, declared once.

    ``low``/``high`` bound the value (``*_open``: strictly); ``default`` None means
    the option must be given (or, in a ``one_of`` group, one of the group).
    ``cli=False`` options are not flags of ``ckptavg average`` (uniform's
    ``weighted`` follows from ``--weights``).
    """

    name: str
    kind: type
    help: str
    unit: str = ""
    metavar: str = "VALUE"
    low: float | None = None
    low_open: bool = False
    high: float | None = None
    high_open: bool = False
    default: Any = None
    cli: bool = True
    expect: str | None = None  # what a valid value is, in words, where the bounds do not say it well

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def expected(self) -> str:
        """What a valid value is, in words (``a positive number of steps``)."""
        if self.expect:
            return self.expect
        noun = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[self.kind]
        if self.kind in (int, float):
            if self.low == 0 and self.low_open and self.high is None:
                noun = "a positive integer" if self.kind is int else "a positive number"
            elif self.low is not None and self.high is not None:
                if self.low_open and self.high_open:
                    noun += f" strictly between {self.low:g} and {self.high:g}"
                else:
                    noun += f" in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{']' if not self.high_open else ')'}"
            elif self.low is not None:
                noun += f" {'>' if self.low_open else '>='} {self.low:g}"
            elif self.high is not None:
                noun += f" {'<' if self.high_open else '<='} {self.high:g}"
        return noun

    def check(self, value: Any, *, method: str | None = None) -> Any:
        """``value`` if valid (an int is taken for a float option), else :class:`OptionError`."""
        bad = OptionError.invalid(method, self.name, value, self.expected())
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if self.kind is int and isinstance(value, float) and value.is_integer() and math.isfinite(value):
            value = int(value)
        if not isinstance(value, self.kind) or (self.kind is not bool and isinstance(value, bool)):
            raise bad
        if self.kind in (int, float):
            if not math.isfinite(value):
                raise bad
            if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
                raise bad
            if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
                raise bad
        return value

    def parse_text(self, text: str, *, method: str | None = None) -> Any:
        """A value written as text (``ema:2000``), checked."""
        try:
            value: Any = {int: int, float: float, str: str}[self.kind](text)
        except (KeyError, ValueError):
            raise OptionError.invalid(method, self.name, text, self.expected()) from None
        return self.check(value, method=method)


@dataclass
class FoldInfo:
    """What a method knows about the checkpoint being folded."""

    ident: Hashable  # identifies the checkpoint (a method that reads it again asks for it by this)
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
    state: dict[str, Any] = field(default_factory=dict)  # the method's own bookkeeping (Method.slot_state)
    bufs: dict[str, torch.Tensor] = field(default_factory=dict)  # flat accumulators
    # one-shot only: the idents of the inputs that end in this tensor's final state (Method.final_members)
    final: frozenset | None = None
    # one-shot only: how many inputs this slot will fold in all (a method may skip the operations that never
    # reach the final state, LAWA's; None: unknown, every operation runs)
    folds: int | None = None
    # where the buffers live when not in plain memory (a DiskStore); told after every fold
    store: Any = field(default=None, repr=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def meta(self) -> dict[str, Any]:
        """JSON-able bookkeeping (buffers are persisted separately)."""
        return {
            "shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch."), "count": self.count,
            "last_step": self.last_step, "weight_sum": self.weight_sum,
            **{k: list(v) if isinstance(v, deque) else v for k, v in self.state.items()},
        }


@dataclass
class Plan:
    """Coefficients of one fold, computed once, applied to every chunk."""

    first: bool
    a: float = 1.0  # multiplier of the old accumulator (EMA β)
    b: float = 1.0  # multiplier of the new value (EMA 1 − β, weighted w)
    old: Hashable | None = None  # an earlier checkpoint whose tensor ``apply`` needs (LAWA: the leaving member)
    clean: bool = False  # one-shot: this input leaves the final state later; fold NaN/Inf as 0
    # one-shot: the buffers whose update in this fold never reaches the final state (skipped; the result's
    # bits are those of running them)
    dead: tuple[str, ...] = ()
    # the buffers this fold writes anew (they hold nothing yet, maybe not even zeros): ``0.0 + x`` (:func:`fill`)
    fresh: tuple[str, ...] = ()


def divide(t: torch.Tensor, d: float) -> torch.Tensor:
    """``t / d``, correctly rounded on every device.

    CUDA divides by a Python scalar as a multiplication by its reciprocal (one
    more rounding); a 0-dim tensor on the same device gets true division, so
    CPU and CUDA agree bit for bit.
    """
    return t / torch.tensor(d, dtype=t.dtype, device=t.device)


def fill(dst: torch.Tensor, x: torch.Tensor) -> None:
    """``dst ← 0.0 + x`` in one pass, without reading ``dst``: the bits of adding ``x`` to a zeroed ``dst``
    (``-0.0`` becomes ``+0.0`` as ``0.0 + -0.0`` does; a copy would keep it), so a method whose first fold
    adds into zeros needs no zeroed buffer (see :attr:`Method.written_first`)."""
    torch.add(x, 0.0, out=dst)


def finite(t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``t`` with NaN and ±Inf replaced by 0, written to ``out``; finite values are copied bit for bit."""
    return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0, out=out)


class Method:
    """Base class of every averaging method: see the module docstring for what a subclass declares."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    reference: ClassVar[str] = "-"
    buffers: ClassVar[tuple[str, ...]]
    # buffers whose first fold overwrites them whole (EMA's copy of θ, a sum's first :func:`fill`): allocated
    # without zeroing
    written_first: ClassVar[tuple[str, ...]] = ()
    params: ClassVar[tuple[Option, ...]] = ()
    main_option: ClassVar[str | None] = None  # written inline: ``NAME:VALUE``
    one_of: ClassVar[tuple[tuple[str, ...], ...]] = ()  # exactly one option of each group
    # ``ckptavg watch`` flag for one average: with a main option it takes its value (default ``--NAME``);
    # a method without one has a plain on/off flag only when it declares it here (uniform: ``--uniform``)
    watch_flag: ClassVar[str | None] = None

    def __init__(self, *args: Any, **values: Any) -> None:
        if len(args) > len(self.params):
            raise TypeError(f"{type(self).__name__} takes at most {len(self.params)} positional option(s)")
        for p, value in zip(self.params, args):
            if p.name in values:
                raise TypeError(f"{type(self).__name__} got {p.name} twice")
            values[p.name] = value
        for key, value in self.validate(values).items():
            setattr(self, key, value)
        self.setup()

    # -- the declaration ----------------------------------------------------------------------
    @classmethod
    def param(cls, name: str) -> Option:
        for p in cls.params:
            if p.name == name:
                return p
        raise KeyError(name)

    @classmethod
    def flag_for_watch(cls) -> str | None:
        if cls.main_option is None:
            return cls.watch_flag
        return cls.watch_flag or f"--{cls.name}"

    @classmethod
    def main_group(cls) -> tuple[str, ...]:
        """The main option and the options it is exclusive with (``half_life``, ``decay``)."""
        if cls.main_option is None:
            return ()
        return next((g for g in cls.one_of if cls.main_option in g), (cls.main_option,))

    @classmethod
    def validate(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        """Checked option values with the defaults filled in, or :class:`OptionError`."""
        known = {p.name for p in cls.params}
        for key in values:
            if key not in known:
                raise OptionError.unknown(cls.name, key, tuple(p.name for p in cls.params))
        given = {k: v for k, v in values.items() if v is not None}
        for group in cls.one_of:
            present = [k for k in group if k in given]
            if len(present) > 1:
                raise OptionError.conflict(cls.name, tuple(present))
            if not present:
                raise OptionError.missing(cls.name, group)
        grouped = {k for g in cls.one_of for k in g}
        out: dict[str, Any] = {}
        for p in cls.params:
            if p.name in given:
                out[p.name] = p.check(given[p.name], method=cls.name)
            elif p.name in grouped:
                out[p.name] = None
            elif p.default is None:
                raise OptionError.missing(cls.name, (p.name,))
            else:
                out[p.name] = p.default
        return out

    def setup(self) -> None:
        """Derived values, after the options were checked and set as attributes."""

    def options(self) -> dict[str, Any]:
        """The options that define this average (provenance, the daemon's state, ``status``)."""
        return {p.name: getattr(self, p.name) for p in self.params if getattr(self, p.name) is not None}

    def label(self) -> str:
        """Default name of an average using this method (``ema-2000``)."""
        if self.main_option is None:
            return self.name
        value = getattr(self, self.main_option)
        return f"{self.name}-{int(value)}" if float(value).is_integer() else f"{self.name}-{value:g}"

    def describe(self) -> str:
        return self.label()

    # -- which checkpoints ---------------------------------------------------------------------
    def accepts(self, step: int | None) -> bool:
        return True

    def needs_steps(self) -> bool:
        return False

    def needs(self, slot: Slot) -> Iterable[Hashable]:
        """Idents of earlier checkpoints whose tensor a later fold of ``slot`` will read (the daemon keeps them)."""
        return ()

    def inputs_warning(self, count: int) -> str | None:
        """One-shot: a warning about averaging ``count`` inputs with these options (LAWA: a window
        larger than the inputs), or None."""
        return None

    def final_members(self, idents: Sequence[Hashable]) -> frozenset | None:
        """One-shot: of the inputs holding a tensor (``idents``, in fold order), those in its final state;
        the others are folded with NaN/Inf as 0 (see :attr:`Plan.clean`), and a method may skip the
        operations that never reach the final state (:attr:`Plan.dead`, knowing :attr:`Slot.folds`).
        None: all of them (and every operation runs)."""
        return None

    # -- per-tensor state ------------------------------------------------------------------------
    def slot_state(self) -> dict[str, Any]:
        """Fresh per-tensor bookkeeping of this method (JSON-able values, or deques of them)."""
        return {}

    def restore_state(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        """Per-tensor bookkeeping from a saved :meth:`Slot.meta`."""
        fresh = self.slot_state()
        return {k: (type(v)(meta[k]) if k in meta else v) for k, v in fresh.items()}

    def new_slot(self, shape: tuple[int, ...], dtype: torch.dtype, accum_dtype: torch.dtype, device: torch.device,
                 alloc: Callable[[str, int, torch.dtype], torch.Tensor] | None = None) -> Slot:
        """A slot of zeroed accumulators (those in :attr:`written_first` maybe not); ``alloc(buffer, numel,
        dtype)`` provides them (default: ``device`` memory)."""
        slot = Slot(shape=tuple(shape), dtype=dtype, state=self.slot_state())
        n = math.prod(shape)
        for b in self.buffers:
            dt = accum_dtype if b != "value" else dtype
            if alloc is not None:
                slot.bufs[b] = alloc(b, n, dt)
            else:
                slot.bufs[b] = (torch.empty if b in self.written_first else torch.zeros)(n, dtype=dt, device=device)
        return slot

    # -- the math ------------------------------------------------------------------------------
    def prepare(self, slot: Slot, info: FoldInfo) -> Plan:
        raise NotImplementedError

    def apply(self, slot: Slot, plan: Plan, x: torch.Tensor, old: torch.Tensor | None, lo: int, hi: int,
              tmp: torch.Tensor) -> None:
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

    def value_as(self, slot: Slot, dtype: torch.dtype) -> torch.Tensor:
        """The average, flat, in ``dtype`` (the source dtype): :meth:`value` cast back. A method may give the
        same bits in fewer passes. (Dividing straight into a bf16 output was measured: no quicker on CPU
        than dividing, then casting.)"""
        return cast_back(self.value(slot), dtype)
