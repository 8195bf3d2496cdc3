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

Which averages go to a disk store (or, on CUDA, to pinned CPU memory) is decided
by :class:`ckptavg.averaging.placement.Placement`.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ckptavg.errors import OutputError
from ckptavg.reading.formats.refs import TensorSpec
from ckptavg.reading.formats.safetensors_writer import encode_header

if TYPE_CHECKING:
    from ckptavg.averaging.methods import Slot

log = logging.getLogger(__name__)

__all__ = ["DiskStore"]

PAGE = mmap.PAGESIZE
_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux >= 5.14; Python names it from 3.13 on
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
        specs = [TensorSpec(key, dtype, (numel,)) for key, numel, dtype in entries]
        # the data section starts on a page: whole pages per tensor release cleanly
        head, _ = encode_header(specs, {"format": "pt", "ckptavg.store": label}, align=PAGE)
        self.path = path
        self.data_start = len(head)
        self.size = self.data_start + sum(s.nbytes for s in specs)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
            try:
                os.write(fd, head)
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
