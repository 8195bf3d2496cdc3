"""torch.distributed.checkpoint (DCP) folders: ``.metadata`` plus ``__<rank>_<n>.distcp`` files.

What ``torch.distributed.checkpoint.save`` with its ``FileSystemWriter`` stores (torch 2.x): every rank
writes its shards into ``__<rank>_<n>.distcp`` files, each chunk being one ``torch.save`` of the chunk
tensor appended to the file (a small zip); then the coordinator pickles a ``Metadata`` object into
``.metadata.tmp`` and renames it to ``.metadata``. That rename is the commit: a folder with ``.distcp``
files and no ``.metadata`` is still being written and is never read. ``.metadata`` maps each flattened
state-dict key (``fqn``) to its dtype, full shape and chunks (offset and size in every dimension), and
each chunk to ``(file, byte offset, length)``.

``.metadata`` is a pickle. It is read by a restricted unpickler that admits only the DCP metadata
classes, ``torch.Size``, torch dtypes and layouts, the memory-format enum, ``collections.OrderedDict`` and
``pathlib`` paths (:data:`_ALLOWED`); any other global is refused with :class:`UnsafePickleError` before it
is touched, so nothing in the file can run code. Its size is bounded (:data:`MAX_METADATA_BYTES`). Chunk
bytes are read with ``pread`` (identity-checked, :class:`~ckptavg.reading.fileio.FileCache`) and decoded
with ``torch.load(weights_only=True)``; a tensor is assembled from its chunks (FSDP2 shards dim 0 across
ranks; any N-d tiling works), so reading holds one full tensor and one chunk. The chunks must tile each
tensor exactly (checked when the folder is indexed).

Which entries are the model (``_select``): tensor entries only (non-tensor "bytes" entries such as
param groups, step counters or dataloader state are skipped), and never those under an optimizer,
scheduler, dataloader, RNG or train-state entry (``optim*``, ``lr_scheduler*``, ``scheduler*``,
``dataloader*``, ``train_state``, ``trainer_state``, ``rng*``). Of the rest, the entries under a ``model``
entry are the model, with ``model.`` removed (accelerate's FSDP ``SHARDED_STATE_DICT`` in
``pytorch_model_fsdp_0/``, Lightning's sharded FSDP, the plain ``{"model": ..., "optim": ...}`` layout);
a lone wrapping entry (``{"app": {"model": ..., "optim": ...}}`` of the DCP tutorial) is looked through;
otherwise the top-level tensors are the model as named (torchtitan saves the model's keys at top level
beside ``optimizer``, ``lr_scheduler``, ``dataloader`` and ``train_state``). ``state_key`` picks an entry
explicitly, ``strip_prefix`` removes a further prefix, and DDP/``torch.compile`` wrapper prefixes are
removed as for pickles. The nesting is read from the writer's own flattening map (``planner_data``).

The step comes from the folder name (``step-N``); where the name carries none, from a ``train_state.step``
entry (torchtitan), loaded with ``weights_only=True``.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import logging
import os
import pickle
import re
import stat
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ckptavg.errors import (
    CkptavgError,
    IncompleteCheckpointError,
    MissingShardError,
    SpecialFileError,
    TruncatedFileError,
    UnknownFormatError,
    UnsafePathError,
    UnsafePickleError,
    UnsupportedCheckpointError,
)
from ckptavg.reading.fileio import FileCache, FileIdentity, ObjectIdentity, identify, open_regular
from ckptavg.reading.formats import pickle as pkl
from ckptavg.reading.formats.refs import FormatIndex, TensorRef

log = logging.getLogger(__name__)

__all__ = ["DCP_SUFFIX", "MAX_METADATA_BYTES", "METADATA", "find_dcp_folder", "index_dcp", "load_metadata"]

METADATA = ".metadata"
DCP_SUFFIX = ".distcp"
# accelerate (and the HF Trainer with FSDP SHARDED_STATE_DICT) save the model's DCP folder inside the checkpoint
ACCELERATE_MODEL_DIR = "pytorch_model_fsdp_0"
# .metadata holds ~100 bytes per chunk: a gigabyte is millions of chunks; more is refused unread
MAX_METADATA_BYTES = 1 << 30
# the torch.save zip of one chunk: its pickle part names one tensor (a few hundred bytes)
_CHUNK_PICKLE_LIMIT = 1 << 20
# a bytes entry read for the step (train_state.step): a torch.save of an int
_STEP_ENTRY_LIMIT = 1 << 20
_REMOTE_CHUNK_READS = 8  # object storage: one tensor's chunks fetched at once (each a round trip)

_NOT_MODEL = re.compile(r"^(optim|lr_sched|sched|dataloader|train_state$|trainer_state$|rng)", re.IGNORECASE)
_RANK_METADATA = re.compile(r"^__\d+\.metadata$")


# -- .metadata: a restricted unpickler ---------------------------------------------------------------------

def _allowed() -> dict[tuple[str, str], Any]:
    """The globals a DCP ``.metadata`` may name, mapped to the objects they are."""
    if not torch.distributed.is_available():
        raise UnsupportedCheckpointError("is a torch.distributed.checkpoint folder, and this torch build has no "
                                         "torch.distributed", hint="install a torch build with distributed support")
    import pathlib

    import torch.distributed.checkpoint.filesystem as fs
    import torch.distributed.checkpoint.metadata as md

    allowed: dict[tuple[str, str], Any] = {
        (md.__name__, n): getattr(md, n)
        for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                  "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
        if hasattr(md, n)
    }
    allowed[(fs.__name__, "_StorageInfo")] = fs._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    # torch.layout pickles as torch.serialization._get_layout("torch.strided"): a lookup among torch's layouts
    allowed[("torch.serialization", "_get_layout")] = _layout
    allowed[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    for n in ("PosixPath", "PurePosixPath", "PureWindowsPath"):  # StorageMeta.checkpoint_id
        allowed[("pathlib", n)] = getattr(pathlib, n)
    return allowed


def _layout(name: object) -> torch.layout:
    layouts = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}
    if not isinstance(name, str) or name not in layouts:
        raise UnsafePickleError(f"names an unknown torch layout {name!r}")
    return layouts[name]


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only :func:`_allowed` globals and torch's dtypes, layouts and memory formats."""

    def __init__(self, data: io.BytesIO, allowed: dict[tuple[str, str], Any]) -> None:
        super().__init__(data)
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get((module, name))
        if found is not None:
            return found
        if module == "torch" and not name.startswith("_"):
            value = vars(torch).get(name)  # never getattr: torch's module __getattr__ imports submodules
            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        raise UnsafePickleError(f"names the global {module}.{name}, which a DCP .metadata never needs; "
                                "refused and not loaded (nothing in it was run)")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("holds a persistent reference, which a DCP .metadata never does; refused")


def load_metadata(path: Path) -> tuple[Any, bytes]:
    """The ``Metadata`` object of a DCP ``.metadata`` file and its raw bytes, through the restricted unpickler."""
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO is refused unopened: an open could block or be seen
        raise SpecialFileError("is not a regular file (a FIFO, socket or device?); it is never opened", path=path)
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > MAX_METADATA_BYTES:
            raise UnsafePickleError(f"is {size} bytes, over the {MAX_METADATA_BYTES}-byte limit for a DCP .metadata; "
                                    "refused unread", path=path)
        raw = bytearray()
        while len(raw) < size:
            got = os.pread(fd, size - len(raw), len(raw))
            if not got:
                break
            raw += got
    finally:
        os.close(fd)
    return parse_metadata(bytes(raw), path)


def parse_metadata(data: bytes, path: Path) -> tuple[Any, bytes]:
    """:func:`load_metadata` of bytes already read (a ``.metadata`` in object storage)."""
    if len(data) > MAX_METADATA_BYTES:
        raise UnsafePickleError(f"is {len(data)} bytes, over the {MAX_METADATA_BYTES}-byte limit for a DCP "
                                ".metadata; refused unread", path=path)
    allowed = _allowed()
    try:
        meta = _MetadataUnpickler(io.BytesIO(data), allowed).load()
    except UnsafePickleError as e:
        raise UnsafePickleError(e.message, path=path, hint="not a .metadata written by torch.distributed.checkpoint; "
                                "do not load it with pickle") from None
    except Exception as e:  # noqa: BLE001 - any failure of a corrupt pickle is one clear error
        raise UnknownFormatError(f"cannot read as a DCP .metadata: {type(e).__name__}: {str(e)[:200]}", path=path,
                                 hint="the file is corrupt or not written by torch.distributed.checkpoint") from None
    if not isinstance(meta, allowed[("torch.distributed.checkpoint.metadata", "Metadata")]):
        raise UnknownFormatError(f"holds a {type(meta).__name__}, not DCP Metadata", path=path)
    return meta, data


# -- the index -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: Path
    identity: FileIdentity | None  # None: an empty chunk, never read
    start: int
    length: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.sizes:
            n *= s
        return n


@dataclass(frozen=True)
class _Tensor:
    fqn: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: tuple[_Chunk, ...]


def find_dcp_folder(folder: Path) -> Path | None:
    """The DCP folder of a checkpoint folder: itself (``.metadata``/``.distcp`` files), accelerate's
    ``pytorch_model_fsdp_0/`` inside it, or None."""
    try:
        names = os.listdir(folder)
    except OSError:
        return None
    if METADATA in names or f"{METADATA}.tmp" in names or any(n.endswith(DCP_SUFFIX) or _RANK_METADATA.match(n)
                                                              for n in names):
        return folder
    if ACCELERATE_MODEL_DIR in names and (folder / ACCELERATE_MODEL_DIR).is_dir():
        return folder / ACCELERATE_MODEL_DIR
    return None


def _ints(value: Any, what: str, path: Path, fqn: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int and v >= 0 for v in value):
        raise UnknownFormatError(f"{what} is {value!r}, not a list of non-negative integers", path=path, tensor=fqn)
    return tuple(value)


def _check_tiling(fqn: str, shape: tuple[int, ...], chunks: Sequence[_Chunk], path: Path) -> None:
    """The chunks must cover the tensor exactly: inside it, not overlapping, their sizes adding up."""
    total = 1
    for s in shape:
        total *= s
    for c in chunks:
        if len(c.offsets) != len(shape) or len(c.sizes) != len(shape):
            raise UnknownFormatError(f"a chunk at {list(c.offsets)} has {len(c.sizes)} dimensions, the tensor "
                                     f"{len(shape)}", path=path, tensor=fqn)
        if c.numel and any(o + s > d for o, s, d in zip(c.offsets, c.sizes, shape)):
            raise UnknownFormatError(f"the chunk at {list(c.offsets)} of size {list(c.sizes)} reaches outside the "
                                     f"tensor's shape {list(shape)}", path=path, tensor=fqn)
    covered = sum(c.numel for c in chunks)
    full = sorted((c for c in chunks if c.numel), key=lambda c: c.offsets)
    for i, a in enumerate(full):  # sorted by offset: only chunks starting before ``a`` ends along dim 0 can overlap it
        for b in full[i + 1:]:
            if shape and b.offsets[0] >= a.offsets[0] + a.sizes[0]:
                break
            if all(bo < ao + as_ and ao < bo + bs for ao, as_, bo, bs in zip(a.offsets, a.sizes, b.offsets, b.sizes)):
                raise UnknownFormatError(f"chunks at {list(a.offsets)} and {list(b.offsets)} overlap", path=path,
                                         tensor=fqn, hint="the checkpoint's .metadata is corrupt")
    if covered != total:
        raise UnknownFormatError(f"its chunks cover {covered} of its {total} elements (a gap)", path=path, tensor=fqn,
                                 hint="the checkpoint's .metadata is corrupt, or chunks are missing")


def _path_of(fqn: str, planner: Any) -> tuple[str, ...] | None:
    """The state-dict nesting of ``fqn`` as DCP's flattening recorded it (``("model", "layer.weight")``)."""
    if not isinstance(planner, dict):
        return None
    p = planner.get(fqn)
    if isinstance(p, (tuple, list)) and p and all(isinstance(x, (str, int)) for x in p):
        return tuple(str(x) for x in p)
    return None


def _select(fqns: Sequence[str], planner: Any, *, state_key: str | None) -> dict[str, str]:
    """Model tensor name -> fqn, by the rule in the module docstring."""
    if state_key is not None:
        prefix = state_key.replace("/", ".").rstrip(".") + "."
        return {f[len(prefix):]: f for f in fqns if f.startswith(prefix)}
    paths = {f: _path_of(f, planner) for f in fqns}
    if any(p is None for p in paths.values()):  # no flattening map: judge by the first part of the names
        kept = [f for f in fqns if not _NOT_MODEL.match(f.split(".", 1)[0]) or "." not in f]
        if len(kept) < len(fqns) and kept and all(f.startswith("model.") for f in kept):
            return {f[len("model."):]: f for f in kept}
        return {f: f for f in kept}
    entries: list[tuple[str, tuple[str, ...]]] = [(f, p) for f, p in paths.items() if p]  # type: ignore[misc]
    for _ in range(4):
        entries = [(f, p) for f, p in entries if len(p) == 1 or not _NOT_MODEL.match(p[0])]
        heads = {p[0] for _, p in entries if len(p) > 1}
        if "model" in heads:
            entries = [(f, p[1:]) for f, p in entries if p[0] == "model" and len(p) > 1]
            break
        if len(heads) != 1 or any(len(p) == 1 for _, p in entries):
            break
        entries = [(f, p[1:]) for f, p in entries]  # one wrapping entry ({"app": {...}}): look inside
    return {".".join(p): f for f, p in entries}


def index_dcp(folder: Path, *, state_key: str | None = None, strip_prefix: str | None = None,
              meta_dir: Path | None = None) -> FormatIndex:
    """Index the DCP checkpoint in ``folder`` from its ``.metadata`` (no tensor data is read)."""
    meta_path = folder / METADATA
    if not meta_path.exists():
        names = os.listdir(folder)
        if any(_RANK_METADATA.match(n) for n in names):
            raise UnsupportedCheckpointError(
                "holds per-rank __<rank>.metadata files (saved with no_dist or use_collectives=False) and no global "
                ".metadata; ckptavg reads only checkpoints with one .metadata", path=folder,
                hint="save with the default FileSystemWriter in a process group")
        raise IncompleteCheckpointError(
            "is a torch.distributed.checkpoint folder without .metadata: the writer has not committed it yet "
            "(it renames .metadata.tmp to .metadata last)", path=folder, hint="wait until the save has finished")
    pkl._check_torch(meta_path)
    meta, raw = load_metadata(meta_path)
    try:
        return _index(folder, meta, raw, state_key=state_key, strip_prefix=strip_prefix, meta_dir=meta_dir)
    except (AttributeError, TypeError, ValueError, KeyError) as e:
        if isinstance(e, CkptavgError):
            raise
        raise UnknownFormatError(f"its .metadata is malformed ({type(e).__name__}: {str(e)[:160]})", path=meta_path,
                                 hint="not a .metadata written by torch.distributed.checkpoint") from None


def _index(folder: Path, meta: Any, raw: bytes, *, state_key: str | None, strip_prefix: str | None,
           meta_dir: Path | None, lookup: Callable[[Path], FileIdentity | None] | None = None) -> FormatIndex:
    """``lookup``: a file's identity, None when it is not there (default: ``stat`` of a local file; object
    storage gives its listing's)."""
    meta_path = folder / METADATA
    import torch.distributed.checkpoint.filesystem as fs
    import torch.distributed.checkpoint.metadata as md

    sd_meta = meta.state_dict_metadata
    storage = meta.storage_data
    if not isinstance(sd_meta, dict) or not isinstance(storage, dict):
        raise UnknownFormatError("its .metadata has no state_dict_metadata/storage_data maps", path=meta_path)
    where: dict[tuple[str, tuple[int, ...]], Any] = {}
    for key, info in storage.items():
        if not isinstance(key, md.MetadataIndex) or not isinstance(info, fs._StorageInfo):
            raise UnknownFormatError(f"its storage map holds a {type(key).__name__} -> {type(info).__name__}",
                                     path=meta_path)
        if key.offset is not None:
            where[(key.fqn, tuple(key.offset))] = info
    tensor_fqns = [f for f, v in sd_meta.items() if isinstance(f, str) and isinstance(v, md.TensorStorageMetadata)]
    chosen = _select(tensor_fqns, meta.planner_data, state_key=state_key)
    renamed: dict[str, str] = {}
    for name, fqn in chosen.items():
        out = name[len(strip_prefix):] if strip_prefix and name.startswith(strip_prefix) else name
        out = pkl._unwrap(out)
        if out in renamed:
            raise UnknownFormatError(f"two tensors are both named {out!r} after prefix stripping", path=folder,
                                     hint="pass --strip-prefix none or --state-key")
        renamed[out] = fqn

    identities: dict[str, FileIdentity] = {}

    def file_of(rel: Any, fqn: str) -> tuple[Path, FileIdentity]:
        if not isinstance(rel, str) or not rel or "/" in rel or "\\" in rel or rel in (".", "..") or "\0" in rel:
            raise UnsafePathError(f"names the chunk file {rel!r}, which is not a plain name in the checkpoint folder",
                                  path=meta_path, tensor=fqn, hint="refused; DCP writes its files beside .metadata")
        p = folder / rel
        if rel not in identities:
            ident = lookup(p) if lookup is not None else (identify(p) if p.exists() else None)
            if ident is None:
                raise MissingShardError(f"its .metadata lists {rel}, which is not there", path=folder, tensor=fqn,
                                        hint="a rank's file is missing: the checkpoint is incomplete or was "
                                        "partly deleted")
            identities[rel] = ident
        return p, identities[rel]

    specs: dict[str, _Tensor] = {}
    tensors: dict[str, TensorRef] = {}
    for name, fqn in renamed.items():
        tmeta = sd_meta[fqn]
        dtype = getattr(tmeta.properties, "dtype", None)
        if not isinstance(dtype, torch.dtype):
            raise UnknownFormatError(f"its dtype is {dtype!r}", path=meta_path, tensor=fqn)
        shape = _ints(tmeta.size, "its size", meta_path, fqn)
        chunks = []
        for cm in tmeta.chunks or []:
            if not isinstance(cm, md.ChunkStorageMetadata):
                raise UnknownFormatError(f"lists a {type(cm).__name__} as a chunk", path=meta_path, tensor=fqn)
            offsets = _ints(cm.offsets, "a chunk offset", meta_path, fqn)
            sizes = _ints(cm.sizes, "a chunk size", meta_path, fqn)
            empty = any(s == 0 for s in sizes)
            info = where.get((fqn, offsets))
            if info is None:
                if empty:
                    continue
                raise UnknownFormatError(f"its chunk at {list(offsets)} has no storage entry", path=meta_path,
                                         tensor=fqn, hint="the checkpoint's .metadata is corrupt")
            if info.transform_descriptors:
                raise UnsupportedCheckpointError(
                    f"its chunk at {list(offsets)} is stored through transforms {list(info.transform_descriptors)} "
                    "(DCP's experimental _extensions, e.g. compression), which ckptavg does not decode",
                    path=folder, tensor=fqn, hint="save without _extensions")
            if empty:
                chunks.append(_Chunk(offsets, sizes, folder, None, 0, 0))
                continue
            start, length = info.offset, info.length
            if type(start) is not int or type(length) is not int or start < 0 or length <= 0:
                raise UnknownFormatError(f"its chunk at {list(offsets)} has byte range {start!r}+{length!r}",
                                         path=meta_path, tensor=fqn)
            path, ident = file_of(info.relative_path, fqn)
            if start + length > ident.size:
                raise TruncatedFileError(f"ends after {ident.size} bytes, but the chunk at {list(offsets)} of "
                                         f"{fqn!r} needs bytes up to {start + length}", path=path,
                                         hint="the file was truncated or is still being written")
            chunks.append(_Chunk(offsets, sizes, path, ident, start, length))
        _check_tiling(fqn, shape, chunks, meta_path)
        specs[fqn] = _Tensor(fqn, dtype, shape, tuple(chunks))
        first = next((c for c in chunks if c.identity is not None), None)
        numel = 1
        for s in shape:
            numel *= s
        tensors[name] = TensorRef(
            name=name, dtype=dtype, shape=shape, file=first.file if first else meta_path,
            identity=first.identity if first and first.identity else
            (lookup(meta_path) if lookup is not None else identify(meta_path)),  # type: ignore[arg-type]
            offset=None, nbytes=numel * dtype.itemsize, key=fqn,
        )
    if not tensors:
        kinds = sorted({(_path_of(f, meta.planner_data) or (f.split(".", 1)[0],))[0] for f in tensor_fqns})
        raise UnknownFormatError(
            "holds no model tensors" + (f" (its tensor entries are under: {', '.join(kinds[:8])})" if kinds else ""),
            path=folder, hint="pass --state-key ENTRY to say which entry holds the model")

    model_files = sorted({c.file for s in specs.values() for c in s.chunks if c.identity is not None})
    fp = hashlib.sha256(raw)
    for f in model_files:
        fp.update(f"{f.name}:{identities[f.name].size};".encode())
    step, step_source = _train_state_step(folder, meta, sd_meta, where, storage, file_of)
    return FormatIndex(
        format="dcp", tensors=tensors, files=[meta_path, *model_files], fingerprint=fp.hexdigest()[:32],
        source=lambda files: _ChunkSource(specs, files), step=step, step_source=step_source,
        meta_dir=meta_dir, metadata={"dcp_version": str(getattr(meta, "version", "") or "")},
    )


def _train_state_step(folder: Path, meta: Any, sd_meta: dict, where: dict, storage: dict,
                      file_of: Any) -> tuple[int | None, str]:
    """torchtitan's ``train_state.step`` (a bytes entry holding a ``torch.save``\\ d int, or a 0-d tensor)."""
    fqn = next((f for f in sd_meta if _path_of(f, meta.planner_data) == ("train_state", "step")),
               "train_state.step" if "train_state.step" in sd_meta else None)
    if fqn is None:
        return None, ""
    info = where.get((fqn, ())) or next((v for k, v in storage.items() if k.fqn == fqn), None)
    if info is None or info.transform_descriptors or not isinstance(info.length, int) or info.length > _STEP_ENTRY_LIMIT:
        return None, ""
    try:
        path, ident = file_of(info.relative_path, fqn)
        with FileCache(max_open=1) as files:
            raw = files.read(path, ident, info.offset, info.length)
        value = _decode(raw, path, fqn)
    except Exception as e:  # noqa: BLE001 - the step is a nicety; the name or --steps can give it
        log.info("%s: cannot read train_state.step (%s); no step from it", folder, e)
        return None, ""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value.item())
    if type(value) is int and value >= 0:
        return value, "train_state.step in the DCP checkpoint"
    return None, ""


class _BufferReader(io.RawIOBase):
    """A seekable file over bytes already in memory, read with ``readinto``: ``torch.load`` copies a chunk's
    data straight into its tensor (``io.BytesIO`` would first copy the whole range once more)."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view = view
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), len(self._view) - self._pos))
        memoryview(buffer).cast("B")[:n] = self._view[self._pos:self._pos + n]
        self._pos += n
        return n


def _decode(raw: torch.Tensor, path: Path, fqn: str) -> Any:
    """A ``torch.save`` byte range, loaded with ``weights_only=True`` after checking its zip is plain."""
    data = _BufferReader(memoryview(raw.numpy()).cast("B"))
    try:
        with zipfile.ZipFile(data) as zf:
            members = zf.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError):
        raise UnknownFormatError("a chunk is not a torch.save zip", path=path, tensor=fqn,
                                 hint="the file is corrupt, or DCP stored it in a format ckptavg does not read") from None
    for m in members:
        if m.compress_type != zipfile.ZIP_STORED or (m.filename.endswith("data.pkl") and m.file_size > _CHUNK_PICKLE_LIMIT):
            raise UnsafePickleError(f"a chunk's zip member {m.filename} is compressed or oversized; refused before "
                                    "loading", path=path, tensor=fqn)
    data.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(data, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafePickleError(f"a chunk needs more than tensors to load and was not executed "
                                f"({str(e).strip().splitlines()[0][:160] if str(e).strip() else ''})",
                                path=path, tensor=fqn) from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise UnknownFormatError(f"a chunk cannot be read: {str(e).strip()[:160]}", path=path, tensor=fqn,
                                 hint="the file is truncated or corrupt") from None


class _ChunkSource:
    """Reads a DCP tensor: its chunks copied into one full tensor (on disk one at a time; in object storage,
    where each is a round trip, up to ``_REMOTE_CHUNK_READS`` fetched at once). Keeps nothing between reads."""

    def __init__(self, specs: dict[str, _Tensor], files: FileCache) -> None:
        self._specs = specs
        self._files = files

    def _chunk(self, spec: _Tensor, c: _Chunk) -> torch.Tensor:
        raw = self._files.read(c.file, c.identity, c.start, c.length)  # type: ignore[arg-type]
        t = _decode(raw, c.file, spec.fqn)
        del raw
        if not isinstance(t, torch.Tensor) or t.dtype != spec.dtype or tuple(t.shape) != c.sizes:
            what = f"a {t.dtype} tensor of shape {list(t.shape)}" if isinstance(t, torch.Tensor) else f"a {type(t).__name__}"
            raise UnknownFormatError(f"the chunk at {list(c.offsets)} holds {what}, the .metadata says {spec.dtype} "
                                     f"{list(c.sizes)}", path=c.file, tensor=spec.fqn)
        return t

    def read(self, ref: TensorRef) -> torch.Tensor:
        spec = self._specs[ref.key]  # type: ignore[index]
        full = [c for c in spec.chunks if c.identity is not None]
        if len(full) == 1 and full[0].sizes == spec.shape:
            return self._chunk(spec, full[0]).contiguous()
        out = torch.empty(spec.shape, dtype=spec.dtype)
        if len(full) > 1 and any(isinstance(c.identity, ObjectIdentity) for c in full):
            with concurrent.futures.ThreadPoolExecutor(min(_REMOTE_CHUNK_READS, len(full)),
                                                       thread_name_prefix="ckptavg-dcp-chunk") as pool:
                chunks = zip(full, pool.map(lambda c: self._chunk(spec, c), full))
                for c, t in chunks:
                    out[tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes))] = t
            return out
        for c in full:
            out[tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes))] = self._chunk(spec, c)
        return out

    def release(self) -> None:
        pass
