"""Writing safetensors files as a stream: the header first, then each tensor's bytes in order.

The reader of the same format is :mod:`ckptavg.reading.formats.safetensors`. :func:`encode_header`
is the one place a safetensors header is built (model shards, the daemon's state, the disk store);
:class:`ShardWriter` streams one file with early writeback and an fsync at the end.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import torch

from ckptavg.dtypes import TORCH_TO_SAFETENSORS, short_name
from ckptavg.errors import OutputError
from ckptavg.reading.formats.refs import TensorSpec

__all__ = ["ShardWriter", "encode_header"]

WRITEBACK_BYTES = 32 << 20  # start the kernel's writeback every this many bytes written


def encode_header(specs: Sequence[TensorSpec], metadata: dict[str, str], *, align: int = 8,
                  start: int = 0) -> tuple[bytes, list[int]]:
    """The 8-byte length and JSON header of a safetensors file holding ``specs`` in order, padded with spaces so
    the data section starts at a multiple of ``align`` (8, as safetensors writes; a page, for mapped files);
    and each tensor's offset in the data section."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offsets, offset = [], start
    for s in specs:
        header[s.name] = {"dtype": TORCH_TO_SAFETENSORS[s.dtype], "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offsets.append(offset)
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % align)
    return struct.pack("<Q", len(raw)) + raw, offsets


def _libc_sync_file_range() -> Any:
    """``sync_file_range(2)`` through ctypes (Python has no binding), or None where missing."""
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range: Any = None
_SFR_WAIT_BEFORE, _SFR_WRITE, _SFR_WAIT_AFTER = 1, 2, 4


class _WriteBehind:
    """Starts writeback of a file's written bytes early and keeps at most two windows dirty.

    Without it the kernel writes back late and the final fsync waits for the whole
    file; with it, writeback runs while the next tensors are averaged.
    """

    def __init__(self, fd: int) -> None:
        global _sync_file_range
        if _sync_file_range is None:
            _sync_file_range = _libc_sync_file_range() or False
        self.fd = fd
        self.started = 0  # bytes whose writeback was started
        self.prev: tuple[int, int] | None = None

    def advance(self, written: int) -> None:
        if not _sync_file_range or written - self.started < WRITEBACK_BYTES:
            return
        start, n = self.started, written - self.started
        _sync_file_range(self.fd, start, n, _SFR_WRITE)
        if self.prev is not None:  # bound dirty memory: wait for the window before this one
            _sync_file_range(self.fd, self.prev[0], self.prev[1], _SFR_WAIT_BEFORE | _SFR_WRITE | _SFR_WAIT_AFTER)
        self.prev = (start, n)
        self.started = written


class ShardWriter:
    """One safetensors file written as a stream: header first, then tensors in planned order.

    A tensor comes whole or as consecutive flat parts of its dtype, in element order.
    """

    def __init__(self, path: Path, entries: Sequence[TensorSpec], metadata: dict[str, str]) -> None:
        self.path = path
        self.entries = list(entries)
        self.next = 0
        self._part = 0  # bytes of entries[next] written so far (parts)
        head, _ = encode_header(self.entries, metadata)
        self.f: IO[bytes] = open(path, "wb")  # noqa: SIM115 - stays open across write() calls
        self.f.write(head)
        self._written = len(head)
        self._behind = _WriteBehind(self.f.fileno())

    def write(self, name: str, tensor: torch.Tensor) -> None:
        e = self.entries[self.next] if self.next < len(self.entries) else None
        nbytes = tensor.numel() * tensor.element_size()
        whole = e is not None and self._part == 0 and tuple(tensor.shape) == e.shape
        part = e is not None and tensor.dim() == 1 and self._part + nbytes <= e.nbytes
        if e is None or e.name != name or tensor.dtype != e.dtype or not (whole or part):
            want = "nothing more" if e is None else f"{e.name} {short_name(e.dtype)} {list(e.shape)}"
            raise OutputError(
                f"internal: expected {want}, got {name} {short_name(tensor.dtype)} {list(tensor.shape)}", path=self.path,
            )
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
        if data.numel():
            self.f.write(memoryview(data.numpy()))
            self._written += nbytes
            if self._written - self._behind.started >= WRITEBACK_BYTES:
                self.f.flush()
                self._behind.advance(self._written)
        self._part += nbytes
        if self._part == e.nbytes:
            self.next += 1
            self._part = 0

    @property
    def done(self) -> bool:
        return self.next == len(self.entries)

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


