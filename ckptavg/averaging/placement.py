"""Where each average's accumulators live: device memory, pinned CPU memory (GPU spill), or a disk store.

On CUDA, averages whose accumulators do not fit the free GPU memory (less a
margin) spill to pinned CPU memory; averages beyond ``--memory-budget`` go to a
:class:`~ckptavg.averaging.store.DiskStore`. :class:`Placement` makes both
decisions once, from the sizes known before the first fold (the first
checkpoint's header, or a saved state's manifest), and logs where each average
lives.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ckptavg.averaging.store import DiskStore
from ckptavg.errors import UsageError
from ckptavg.reading.formats.refs import TensorRef
from ckptavg.units import format_bytes

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_GPU_MARGIN", "Placeable", "Placement", "ensure_placed"]

DEFAULT_GPU_MARGIN = 2 << 30  # left free on the GPU for the staging buffers, the scratch chunks and the trainer


class Placeable(Protocol):
    """What placement needs of an average (:class:`~ckptavg.averaging.average.Average`)."""

    name: str
    device: torch.device
    pinned: bool
    store: DiskStore | None
    placement: Placement | None
    slots: dict[str, Any]

    def accumulator_bytes(self, refs: Iterable[TensorRef]) -> int: ...

    def store_layout(self, refs: Iterable[TensorRef]) -> list[tuple[str, int, torch.dtype]]: ...


def _free_gpu_bytes(device: torch.device) -> int:
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


@dataclass
class Placement:
    """Decides, once per set of averages, where each one's accumulators live.

    ``memory_budget`` bounds the host memory of the accumulators (None: no
    bound); averages beyond it, in order, go to a :class:`DiskStore` under
    ``store_dir``. On a CUDA device, averages beyond the free GPU memory less
    ``gpu_margin`` live in pinned CPU memory (or on disk, beyond the budget).
    ``free_gpu`` gives the free GPU memory (injectable for tests).
    """

    memory_budget: int | None = None
    store_dir: Path | None = None
    gpu_margin: int = DEFAULT_GPU_MARGIN
    free_gpu: Callable[[torch.device], int] = _free_gpu_bytes
    decided: bool = False
    where: dict[str, str] = field(default_factory=dict)

    def place(self, averages: Sequence[Placeable], need: Mapping[str, int], *, host_ok: bool = True) -> dict[str, str]:
        """Place ``averages`` given their accumulator bytes ``need``; returns, per average, ``"cuda:N"``
        (or ``"cuda"``), ``"cpu"``, ``"pinned"`` or ``"disk"``, and logs one line saying so.

        ``host_ok``: the engine can fold a CUDA run into CPU accumulators (pinned or disk)."""
        self.decided = True
        if not averages:
            return {}
        device = averages[0].device
        host = list(averages)
        if device.type == "cuda":
            room = self.free_gpu(device) - self.gpu_margin if host_ok else None  # None: everything stays there
            used, host = 0, []
            for avg in averages:
                if room is None or used + need.get(avg.name, 0) <= room:
                    used += need.get(avg.name, 0)
                    self.where[avg.name] = str(device)
                else:
                    host.append(avg)
        used = 0
        for avg in host:
            n = need.get(avg.name, 0)
            if self.memory_budget is None or used + n <= self.memory_budget:
                used += n
                avg.pinned = device.type == "cuda"
                avg.device = torch.device("cpu")
                self.where[avg.name] = "pinned" if avg.pinned else "cpu"
                continue
            if self.store_dir is None:
                raise UsageError(f"the {avg.name} average needs {format_bytes(n)} of accumulators, over --memory-budget "
                                 f"{format_bytes(self.memory_budget)}, and no folder was given for the disk store",
                                 hint="pass --scratch-dir")
            avg.device, avg.pinned = torch.device("cpu"), False
            avg.store = DiskStore(self.store_dir, avg.name)
            self.where[avg.name] = "disk"
        if device.type == "cuda" or any(self.where[a.name] != "cpu" for a in averages):
            log.info("accumulators: %s", "; ".join(f"{a.name} ({format_bytes(need.get(a.name, 0))}) "
                                                   f"{self._phrase(self.where[a.name])}" for a in averages))
        return {a.name: self.where[a.name] for a in averages}

    def _phrase(self, where: str) -> str:
        if where == "disk":
            budget = format_bytes(self.memory_budget or 0)
            return f"on disk in {self.store_dir} (safetensors, over --memory-budget {budget})"
        if where == "pinned":
            return "in pinned CPU memory (it does not fit the free GPU memory)"
        return f"in {where} memory" if where != "cpu" else "in CPU memory"


def ensure_placed(averages: Sequence[Placeable], refs: Iterable[TensorRef], *, engine: object = None) -> None:
    """Before a checkpoint-major fold: place averages that have a :class:`Placement` and no slots yet,
    sizing their accumulators from ``refs`` (the first checkpoint's tensors). A no-op afterwards.

    On a CUDA ``engine`` averages leave the GPU only if it folds into host accumulators
    (``engine.host_accumulators``)."""
    pending = [a for a in averages if a.placement is not None and not a.placement.decided and not a.slots]
    if not pending:
        return
    refs = list(refs)
    device = getattr(engine, "device", None)
    host_ok = device is None or device.type != "cuda" or bool(getattr(engine, "host_accumulators", False))
    for placement in {id(a.placement): a.placement for a in pending}.values():
        group = [a for a in pending if a.placement is placement]
        placement.place(group, {a.name: a.accumulator_bytes(refs) for a in group}, host_ok=host_ok)
        for avg in group:
            if avg.store is not None:
                avg.store.reserve(avg.store_layout(refs))

