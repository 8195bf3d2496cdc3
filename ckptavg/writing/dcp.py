"""Write an average as a torch.distributed.checkpoint (DCP) folder that ``torch.distributed.checkpoint.load``
reads into a model's state dict (a torchtitan or FSDP2 run resuming from an average).

The folder is what ``FileSystemWriter`` writes from one process: one ``__0_0.distcp`` file holding every
tensor as one whole chunk (a ``torch.save`` of the tensor, appended, exactly as DCP stores a chunk), and a
``.metadata`` pickle of torch's own ``Metadata`` classes, written last (``.metadata.tmp`` renamed, DCP's
commit). Keys are the model's own tensor names at the top level, as torchtitan saves its model and as
``dcp.load(model.state_dict(), ...)`` expects; a tied name (``lm_head.weight`` sharing the embedding) is a
second key pointing at the same bytes. Tensors are written as they are finished, so the writer holds at most
one tensor (assembled from consecutive flat parts when the engine finishes it piece by piece).
"""

from __future__ import annotations

import os
import pickle
import uuid
from collections.abc import Sequence
from pathlib import Path

import torch

from ckptavg.errors import OutputError
from ckptavg.reading.formats.refs import TensorRef, TensorSpec

__all__ = ["DCP_FILE", "DcpWriter"]

DCP_FILE = "__0_0.distcp"


class DcpWriter:
    """Writes one average as a DCP folder into ``folder`` (a temporary folder from AtomicDir), with the
    interface of :class:`~ckptavg.writing.export.ModelWriter`: :meth:`write` every planned tensor (whole or as
    consecutive flat parts), then :meth:`finish`; on failure, :meth:`abort`."""

    def __init__(self, folder: Path, refs: Sequence[TensorRef | TensorSpec], *, aliases: dict[str, str] | None = None,
                 **_: object) -> None:
        self.folder = Path(folder)
        self._specs = {r.name: TensorSpec(r.name, r.dtype, tuple(r.shape)) for r in refs}
        if not self._specs:
            raise OutputError("no tensors to write (every tensor was excluded?)", path=self.folder)
        self.aliases = {a: t for a, t in (aliases or {}).items() if t in self._specs and a not in self._specs}
        self.files = [DCP_FILE]
        self.weight_map = {n: DCP_FILE for n in self._specs}
        self.total_bytes = sum(s.nbytes for s in self._specs.values())
        self._stored: dict[str, tuple[int, int]] = {}  # name -> (byte offset, length) in the .distcp file
        self._pending: tuple[str, torch.Tensor, int] | None = None  # a tensor arriving in flat parts
        self._f = open(self.folder / DCP_FILE, "wb")  # noqa: SIM115 - closed by finish/abort

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self._specs.get(name)
        if spec is None or name in self._stored:
            raise OutputError(f"internal: tensor {name!r} was not planned, or written twice", path=self.folder)
        if self._pending is not None and self._pending[0] != name:
            raise OutputError(f"internal: tensor {self._pending[0]!r} was left unfinished", path=self.folder)
        if tensor.dtype != spec.dtype:
            raise OutputError(f"internal: tensor {name!r} is {tensor.dtype}, planned {spec.dtype}", path=self.folder)
        if self._pending is None and tensor.numel() == spec.numel:
            self._store(name, tensor.detach().cpu().reshape(spec.shape))
            return
        if self._pending is None:
            self._pending = (name, torch.empty(spec.numel, dtype=spec.dtype), 0)
        _, buf, done = self._pending
        part = tensor.detach().reshape(-1)
        if done + part.numel() > spec.numel:
            raise OutputError(f"internal: more elements of {name!r} than its shape holds", path=self.folder)
        buf[done:done + part.numel()].copy_(part)
        done += part.numel()
        self._pending = (name, buf, done)
        if done == spec.numel:
            self._pending = None
            self._store(name, buf.reshape(spec.shape))

    def _store(self, name: str, tensor: torch.Tensor) -> None:
        start = self._f.tell()
        whole = tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        torch.save(tensor if whole else tensor.contiguous().clone(), self._f)  # a view would save its whole storage
        self._stored[name] = (start, self._f.tell() - start)

    def finish(self) -> None:
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        from torch.distributed.checkpoint.metadata import (
            ChunkStorageMetadata,
            Metadata,
            MetadataIndex,
            StorageMeta,
            TensorProperties,
            TensorStorageMetadata,
        )

        missing = [n for n in self._specs if n not in self._stored]
        if missing or self._pending is not None:
            self.abort()
            raise OutputError(f"internal: output ended before every planned tensor was written ({len(missing)} "
                              "missing)", path=self.folder)
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        state: dict = {}
        storage: dict = {}
        for name, target in [*((n, n) for n in self._specs), *self.aliases.items()]:
            spec = self._specs[target]
            zeros = torch.Size([0] * len(spec.shape))
            state[name] = TensorStorageMetadata(
                properties=TensorProperties(dtype=spec.dtype), size=torch.Size(spec.shape),
                chunks=[ChunkStorageMetadata(offsets=zeros, sizes=torch.Size(spec.shape))])
            start, length = self._stored[target]
            storage[MetadataIndex(name, zeros, 0)] = _StorageInfo(DCP_FILE, start, length)
        meta = Metadata(state_dict_metadata=state, planner_data={n: (n,) for n in state}, storage_data=storage,
                        storage_meta=StorageMeta(checkpoint_id=None, save_id=str(uuid.uuid4())), version="1.0.0")
        tmp = self.folder / ".metadata.tmp"
        with open(tmp, "wb") as f:
            pickle.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.folder / ".metadata")  # DCP's commit, as FileSystemWriter makes it

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
