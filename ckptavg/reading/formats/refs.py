"""Tensor records: :class:`TensorSpec` (what a tensor is: name, dtype, shape) and :class:`TensorRef`
(a tensor known from a checkpoint's index: what it is and where its bytes are)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ckptavg.reading.fileio import FileIdentity


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
