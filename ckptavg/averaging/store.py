"""Where accumulators live: device memory, pinned CPU memory (GPU spill), or a disk store.

A model whose fp32 averages exceed RAM still averages: the accumulators of an
average that does not fit ``--memory-budget`` live in a :class:`DiskStore`, a
memory-mapped fp32 safetensors file (one per average, plus one more per batch
of tensors that appear later) under a scratch folder. Every accumulator is a
writable tensor view of the mapping (``torch.frombuffer``), so the methods'
arithmetic is unchanged and the result is bitwise that of memory. After each
tensor is folded its pages are dropped from the process
(``madvise(MADV_DONTNEED)``; the shared mapping keeps the data in the page
cache and the kernel writes it back), so the resident set stays about one
tensor's accumulators, not the model's.

On CUDA, averages whose accumulators do not fit the free GPU memory (less a
margin) spill to pinned CPU memory. :class:`Placement` makes both decisions
once, from the sizes known before the first fold (the first checkpoint's
header, or a saved state's manifest), and logs where each average lives.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import re
import secrets
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ckptavg.dtypes import TORCH_TO_SAFETENSORS
from ckptavg.errors import OutputError, UsageError
from ckptavg.units import format_bytes

if TYPE_CHECKING:
    from ckptavg.averaging.average import Average
    from ckptavg.averaging.methods import Slot
    from ckptavg.reading.formats.refs import TensorRef

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_GPU_MARGIN", "DiskStore", "Placement", "ensure_placed"]

PAGE = mmap.PAGESIZE
_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux >= 5.14; Python names it from 3.13 on
DEFAULT_GPU_MARGIN = 2 << 30  # left free on the GPU for the staging buffers, the scratch chunks and the trainer
_SUFFIX = ".safetensors"


@dataclass
class _Region:
    segment: _Segment
    offset: int  # absolute, in the file
    numel: int
    dtype: torch.dtype
    used: bool = False  # handed out before: zero it when handed out again

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class _Segment:
    """One fp32 (accumulator dtype) safetensors file, mapped shared and writable."""

    def __init__(self, path: Path, entries: Sequence[tuple[str, int, torch.dtype]], label: str) -> None:
        entries = sorted(entries, key=lambda e: -e[2].itemsize)  # widest first: every tensor aligned to its dtype
        header: dict[str, object] = {"__metadata__": {"format": "pt", "ckptavg.averaging.store": label}}
        offset = 0
        for key, numel, dtype in entries:
            nbytes = numel * dtype.itemsize
            header[key] = {"dtype": TORCH_TO_SAFETENSORS[dtype], "shape": [numel], "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % PAGE)  # the data section starts on a page: whole pages per tensor release cleanly
        self.path = path
        self.data_start = 8 + len(raw)
        self.size = self.data_start + offset
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
            try:
                os.write(fd, struct.pack("<Q", len(raw)) + raw)
                os.ftruncate(fd, self.size)  # the accumulators start as zeros without writing them
                try:  # reserve the blocks now: a full disk is an error here, not a SIGBUS in the middle of a fold
                    os.posix_fallocate(fd, 0, self.size)
                except OSError as e:
                    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                        raise
                self.mm = mmap.mmap(fd, self.size, access=mmap.ACCESS_WRITE)
            finally:
                os.close(fd)
        except OSError as e:
            path.unlink(missing_ok=True)
            raise OutputError(f"cannot create the disk store for the accumulators: {e.strerror or e}", path=path,
                              hint="free space there, or point --scratch-dir (daemon: state_dir) elsewhere") from e
        self.regions = {}
        offset = self.data_start
        for key, numel, dtype in entries:
            self.regions[key] = _Region(self, offset, numel, dtype)
            offset += numel * dtype.itemsize

    def tensor(self, r: _Region) -> torch.Tensor:
        return torch.frombuffer(self.mm, dtype=r.dtype, count=r.numel, offset=r.offset)

    populate = True  # class-wide: off once the kernel refuses MADV_POPULATE_WRITE

    def _pages(self, offset: int, nbytes: int) -> tuple[int, int]:
        lo = offset // PAGE * PAGE
        return lo, min(self.size, -(-(offset + nbytes) // PAGE) * PAGE) - lo

    def drop(self, offset: int, nbytes: int) -> None:
        """Unmap the pages of ``[offset, offset + nbytes)`` from this process; the data stays in the file."""
        lo, n = self._pages(offset, nbytes)
        if n > 0 and hasattr(self.mm, "madvise"):
            self.mm.madvise(mmap.MADV_DONTNEED, lo, n)

    def fault_in(self, offset: int, nbytes: int) -> None:
        """Map the pages of a range writable in one call (cheaper than a fault per page while folding)."""
        lo, n = self._pages(offset, nbytes)
        if n > 0 and _Segment.populate and hasattr(self.mm, "madvise"):
            try:
                self.mm.madvise(_POPULATE_WRITE, lo, n)
            except OSError:  # older kernel: pages fault in one by one
                _Segment.populate = False

    def close(self) -> None:
        try:
            self.mm.close()
        except BufferError:  # tensors still view it: the mapping goes when they do
            pass


class DiskStore:
    """Accumulators of one average in memory-mapped safetensors files under ``folder``.

    :meth:`reserve` lays out a file for the accumulators known in advance;
    :meth:`alloc` hands out a zeroed tensor for ``key`` (from the reserved
    layout, or from a new file for tensors that appear later or change shape).
    """

    def __init__(self, folder: Path, label: str) -> None:
        self.folder = Path(folder)
        self.label = label
        self.segments: list[_Segment] = []
        self._regions: dict[str, _Region] = {}
        self._by_ptr: dict[int, _Region] = {}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create the disk store folder: {e.strerror or e}", path=self.folder) from e
        own = re.compile(re.escape(label) + r"\.\d+-[0-9a-f]{6}" + re.escape(_SUFFIX))
        for stale in self.folder.iterdir():  # left by an earlier store of this average (a crash, a rollback)
            if own.fullmatch(stale.name):
                stale.unlink(missing_ok=True)

    @property
    def nbytes(self) -> int:
        return sum(s.size for s in self.segments)

    @property
    def files(self) -> list[Path]:
        return [s.path for s in self.segments]

    def reserve(self, entries: Sequence[tuple[str, int, torch.dtype]]) -> None:
        """A new file holding ``entries`` (key, numel, dtype); keys reserved before move to it."""
        entries = [e for e in entries if e[1] > 0]
        if not entries:
            return
        path = self.folder / f"{self.label}.{len(self.segments)}-{secrets.token_hex(3)}{_SUFFIX}"
        seg = _Segment(path, entries, self.label)
        self.segments.append(seg)
        self._regions.update(seg.regions)

    def alloc(self, key: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A zeroed flat tensor of ``numel`` ``dtype`` for ``key``, backed by a store file."""
        if numel == 0:
            return torch.zeros(0, dtype=dtype)
        r = self._regions.get(key)
        if r is None or r.numel != numel or r.dtype != dtype:
            self.reserve([(key, numel, dtype)])
            r = self._regions[key]
        t = r.segment.tensor(r)
        if r.used:
            t.zero_()
            r.segment.drop(r.offset, r.nbytes)
        r.used = True
        self._by_ptr[t.data_ptr()] = r
        return t

    def owns(self, t: torch.Tensor) -> bool:
        return t.data_ptr() in self._by_ptr

    def release(self, t: torch.Tensor) -> None:
        """Drop the pages of ``t`` (a tensor from :meth:`alloc`) from the process."""
        r = self._by_ptr.get(t.data_ptr())
        if r is not None:
            r.segment.drop(r.offset, r.nbytes)

    def acquire_slot(self, slot: Slot) -> None:
        """About to fold into ``slot``: map its pages in one go."""
        for t in slot.bufs.values():
            r = self._by_ptr.get(t.data_ptr())
            if r is not None:
                r.segment.fault_in(r.offset, r.nbytes)

    def release_slot(self, slot: Slot) -> None:
        for t in slot.bufs.values():
            self.release(t)

    def flush(self) -> None:
        for s in self.segments:
            s.mm.flush()

    def close(self) -> None:
        """Unmap and delete the store's files (call when its averages are no longer used)."""
        self._by_ptr.clear()
        self._regions.clear()
        for s in self.segments:
            s.close()
            s.path.unlink(missing_ok=True)
        self.segments.clear()


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

    def place(self, averages: Sequence[Average], need: Mapping[str, int], *, host_ok: bool = True) -> dict[str, str]:
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


def ensure_placed(averages: Sequence[Average], refs: Iterable[TensorRef], *, engine: object = None) -> None:
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

