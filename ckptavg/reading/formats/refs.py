"""Tensor records: :class:`TensorSpec` (what a tensor is: name, dtype, shape), :class:`TensorRef`
(a tensor known from a checkpoint's index: what it is and where its bytes are), and what a format
module hands the checkpoint index (:class:`FormatIndex`, with a :class:`TensorSource` where a tensor
is not one byte range)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import torch

from ckptavg.reading.fileio import FileCache, FileIdentity


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class TensorRef:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    identity: FileIdentity
    # safetensors: absolute byte offset and length in ``file``; pickles: None / size
    offset: int | None
    nbytes: int
    # pickles: the key inside the loaded object (before prefix stripping)
    key: str | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def narrow(self, lo: int, hi: int) -> TensorRef:
        """This tensor's flat elements ``[lo, hi)``: a 1-D tensor at its byte range (byte-range tensors only)."""
        assert self.offset is not None and 0 <= lo <= hi <= self.numel
        size = self.nbytes // self.numel if self.numel else self.dtype.itemsize
        return replace(self, shape=(hi - lo,), offset=self.offset + lo * size, nbytes=(hi - lo) * size)


class TensorSource(Protocol):
    """Reads the tensors of a checkpoint whose bytes are not one plain byte range each (``TensorRef.offset``
    is None): DCP chunks, DeepSpeed partitions. One source serves one reader; it may keep one file's worth of
    decoded data between reads and drops it on :meth:`release`."""

    def read(self, ref: TensorRef) -> torch.Tensor: ...

    def release(self) -> None: ...


@dataclass
class FormatIndex:
    """What a format module found in a checkpoint, before :mod:`ckptavg.reading.checkpoint` makes it a
    ``Checkpoint``: the tensors (``offset`` None where ``source`` reads them), every file whose bytes are read
    (they are what the daemon retains), a fingerprint of the content, and the step where the writer recorded it."""

    format: str
    tensors: dict[str, TensorRef]
    files: list[Path]
    fingerprint: str
    source: Callable[[FileCache], TensorSource] | None = None
    step: int | None = None
    step_source: str = ""
    meta_dir: Path | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    incomplete: str | None = None
    aliases: dict[str, str] = field(default_factory=dict)


def combine_fingerprints(parts: list[str]) -> str:
    """One fingerprint of a checkpoint from its files' (header) fingerprints."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
    return h.hexdigest()[:32]
