"""safetensors files and sharded folders, indexed from their headers alone.

The header is validated as strictly as the reference implementation does
(``safetensors/src/tensor.rs``): size limit, UTF-8, JSON object, known dtypes,
byte ranges that tile the data section exactly (no overlap, no gap, nothing
out of bounds) and agree with dtype × shape. A bad header is rejected after
reading at most 100 MB, before any tensor byte is touched.

Tensor bytes are not read here: see :mod:`ckptavg.reading.fileio`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ckptavg.dtypes import BITS, SAFETENSORS_TO_TORCH
from ckptavg.errors import (
    IndexMismatchError,
    InvalidHeaderError,
    InvalidOffsetError,
    MissingShardError,
    TensorInvalidInfoError,
    TruncatedFileError,
    UnknownFormatError,
    UnsafePathError,
    UnsupportedCheckpointError,
)
from ckptavg.reading.fileio import FileIdentity, open_regular
from ckptavg.reading.formats.refs import TensorRef
from ckptavg.redact import warn_once

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit
_HEADER_LEN = struct.Struct("<Q")
_U64_MAX = (1 << 64) - 1
_I64_MAX = (1 << 63) - 1

__all__ = ["MAX_HEADER_BYTES", "SafetensorsHeader", "choose_weights", "index_file", "index_sharded", "read_header"]

INDEX_SUFFIX = ".safetensors.index.json"


def choose_weights(names: Sequence[str], where: Any) -> tuple[str, str, str] | None:
    """Which safetensors file of a folder holding ``names`` (on disk or in object storage) holds the model:
    ``("safetensors-sharded", index, weights_name)`` for a shard index (``model.safetensors.index.json`` first),
    else ``("safetensors", file, weights_name)`` for one file (``model.safetensors`` first); None without any.
    Several indexes, or several files and no index, without the standard name: :class:`UnknownFormatError`
    naming ``where``."""
    indexes = [n for n in names if n.endswith(INDEX_SUFFIX)]
    if indexes:
        chosen = "model.safetensors.index.json" if "model.safetensors.index.json" in indexes else indexes[0]
        if len(indexes) > 1 and chosen != "model.safetensors.index.json":
            raise UnknownFormatError(f"holds several safetensors indexes ({', '.join(indexes)})", path=where,
                                     hint="pass the index file you want instead of the folder")
        return "safetensors-sharded", chosen, chosen[: -len(INDEX_SUFFIX)]
    singles = [n for n in names if n.endswith(".safetensors")]
    if not singles:
        return None
    chosen = "model.safetensors" if "model.safetensors" in singles else (singles[0] if len(singles) == 1 else None)
    if chosen is None:
        raise UnknownFormatError(f"holds several .safetensors files and no index ({', '.join(singles)})", path=where,
                                 hint="pass the file you want instead of the folder")
    return "safetensors", chosen, chosen[: -len(".safetensors")]


class SafetensorsHeader:
    """A validated header: tensors in file order with absolute byte ranges."""

    def __init__(
        self,
        path: Path,
        identity: FileIdentity,
        header_len: int,
        tensors: dict[str, TensorRef],
        metadata: dict[str, str] | None,
        raw: bytes,
    ) -> None:
        self.path = path
        self.identity = identity
        self.header_len = header_len
        self.tensors = tensors
        self.metadata = metadata
        self.fingerprint = hashlib.sha256(raw + _HEADER_LEN.pack(identity.size)).hexdigest()

    @property
    def data_start(self) -> int:
        return 8 + self.header_len


def read_header(path: Path) -> SafetensorsHeader:
    """Read and validate the header of one ``.safetensors`` file."""
    path = Path(path)
    try:
        fd = open_regular(path)  # a FIFO is refused, never waited on
    except FileNotFoundError:
        raise MissingShardError("file not found", path=path) from None
    try:
        identity = FileIdentity.of(os.fstat(fd))
        size = identity.size
        if size < 8:
            raise TruncatedFileError(
                f"file is {size} bytes, too short for a safetensors header", path=path,
                hint="the file is empty or still being written",
            )
        (n,) = _HEADER_LEN.unpack(os.pread(fd, 8, 0))
        check_header_length(n, size, path)
        raw = os.pread(fd, n, 8)
        if len(raw) != n:
            raise TruncatedFileError("file shrank while its header was read", path=path)
    finally:
        os.close(fd)
    return header_from_bytes(path, identity, raw)


def check_header_length(n: int, size: int, path: Path) -> None:
    """The header length prefix ``n`` of a file of ``size`` bytes: within the limit and the file."""
    if n > MAX_HEADER_BYTES:
        raise InvalidHeaderError(
            f"header claims {n} bytes, over the {MAX_HEADER_BYTES}-byte limit", path=path,
            hint="not a safetensors file, or a corrupt/malicious one",
        )
    if 8 + n > size:
        raise TruncatedFileError(
            f"header claims {n} bytes but the file holds only {size - 8} after the length prefix",
            path=path, hint="the file is truncated or still being written",
        )


def header_from_bytes(path: Path, identity: FileIdentity, raw: bytes) -> SafetensorsHeader:
    """Validate a header already read (``raw``: the bytes after the 8-byte length) of the file ``identity``
    describes: the local reader above and the object-storage reader share it."""
    n, size = len(raw), identity.size
    header = _parse_json(raw, path)
    metadata = header.pop("__metadata__", None)
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise InvalidHeaderError("__metadata__ must map strings to strings", path=path)
    tensors = _validate_entries(header, path, data_start=8 + n, file_size=size, identity=identity)
    return SafetensorsHeader(path, identity, n, tensors, metadata, raw)


def _parse_json(raw: bytes, path: Path) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidHeaderError(f"header is not valid UTF-8 (byte {e.start})", path=path) from None
    if not text.startswith("{"):
        raise InvalidHeaderError("header does not start with '{': not a safetensors file", path=path)
    try:
        header = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidHeaderError(f"header is not valid JSON ({e.msg} at char {e.pos})", path=path) from None
    except (RecursionError, ValueError) as e:  # absurd nesting, a 5000-digit number
        raise InvalidHeaderError(f"header is not usable JSON ({type(e).__name__})", path=path) from None
    if not isinstance(header, dict):
        raise InvalidHeaderError("header is not a JSON object", path=path)
    return header


def _validate_entries(
    header: dict[str, Any], path: Path, *, data_start: int, file_size: int, identity: FileIdentity
) -> dict[str, TensorRef]:
    entries = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise InvalidHeaderError(
                "entry must have exactly 'dtype', 'shape' and 'data_offsets'", path=path, tensor=name
            )
        dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype_name, str) or dtype_name not in BITS:
            raise TensorInvalidInfoError(
                f"unknown dtype {dtype_name!r} (known: {', '.join(BITS)})", path=path, tensor=name
            )
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise TensorInvalidInfoError(f"shape {shape!r} is not a list of non-negative integers", path=path, tensor=name)
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and 0 <= o <= _U64_MAX for o in offsets)
            or offsets[1] < offsets[0]
        ):
            raise InvalidOffsetError(f"data_offsets {offsets!r} are not [begin, end] with begin <= end", path=path, tensor=name)
        nbytes = _tensor_bytes(dtype_name, shape, path, name)
        if offsets[1] - offsets[0] != nbytes:
            raise TensorInvalidInfoError(
                f"{dtype_name} {shape} needs {nbytes} bytes but data_offsets span {offsets[1] - offsets[0]}",
                path=path, tensor=name,
            )
        dtype = SAFETENSORS_TO_TORCH.get(dtype_name)
        if dtype is None:
            raise UnsupportedCheckpointError(
                f"dtype {dtype_name} ({BITS[dtype_name]}-bit, packed) has no torch dtype; ckptavg cannot average it",
                path=path, tensor=name, hint="dequantize the checkpoint, or leave this tensor out of it",
            )
        entries.append((offsets[0], offsets[1], name, dtype, tuple(shape)))
    entries.sort(key=lambda e: (e[0], e[1]))
    expected = 0
    tensors: dict[str, TensorRef] = {}
    for begin, end, name, dtype, shape in entries:
        if begin != expected:
            kind = "overlaps the previous tensor" if begin < expected else f"leaves a gap of {begin - expected} bytes"
            raise InvalidOffsetError(f"byte range [{begin}, {end}) {kind}", path=path, tensor=name)
        expected = end
        tensors[name] = TensorRef(
            name=name, dtype=dtype, shape=shape, file=path, identity=identity,
            offset=data_start + begin, nbytes=end - begin,
        )
    data_len = file_size - data_start
    if expected > data_len:
        raise TruncatedFileError(
            f"tensors need {expected} data bytes but the file holds {data_len}",
            path=path, tensor=entries[-1][2] if entries else None, hint="the file is truncated or still being written",
        )
    if expected < data_len:
        raise InvalidOffsetError(
            f"{data_len - expected} bytes after the last tensor are not described by the header", path=path
        )
    return tensors


def _tensor_bytes(dtype_name: str, shape: list[int], path: Path, name: str) -> int:
    """Bytes of a tensor, computed as the format does (``safetensors/src/tensor.rs``): every dimension
    is a 64-bit unsigned integer, the element count and then the bit count are multiplied out in order
    with overflow checked at every step (a zero later on does not excuse an overflow), and the bits
    must fill whole bytes. torch sizes are signed 64-bit, so a dimension of 2**63 or more is refused too."""
    count = 1
    for d in shape:
        if d > _U64_MAX:
            raise TensorInvalidInfoError(
                f"dimension {d} of shape {shape} does not fit in 64 bits, the safetensors format's limit",
                path=path, tensor=name, hint="a corrupt or crafted header",
            )
        if d > _I64_MAX:
            raise TensorInvalidInfoError(
                f"dimension {d} of shape {shape} is over 2**63 - 1, the largest torch can hold",
                path=path, tensor=name, hint="a corrupt or crafted header",
            )
        count *= d
        if count > _U64_MAX:
            raise TensorInvalidInfoError(
                f"shape {shape} overflows 64 bits when multiplied out", path=path, tensor=name,
                hint="a corrupt or crafted header",
            )
    bits = count * BITS[dtype_name]
    if bits > _U64_MAX:
        raise TensorInvalidInfoError(f"{dtype_name} {shape} overflows 64 bits of size", path=path, tensor=name,
                                     hint="a corrupt or crafted header")
    if bits % 8:
        raise TensorInvalidInfoError(f"{dtype_name} {shape} does not end on a byte boundary ({bits} bits)",
                                     path=path, tensor=name)
    return bits // 8


def index_file(path: Path) -> tuple[dict[str, TensorRef], list[SafetensorsHeader]]:
    header = read_header(path)
    return header.tensors, [header]


def _safe_member(folder: Path, name: Any, index_path: Path) -> Path:
    """Resolve a shard name from an index, refusing anything that leaves the folder."""
    if not isinstance(name, str) or not name:
        raise InvalidHeaderError(f"weight_map value {name!r} is not a file name", path=index_path)
    candidate = Path(name)
    if candidate.is_absolute() or ".." in candidate.parts or os.sep in name or (os.altsep and os.altsep in name):
        warn_once(log, ("index-out", str(index_path), name), "security: index %s points outside its folder: %r",
                  index_path, name)
        raise UnsafePathError(
            f"weight_map points to {name!r}, outside the checkpoint folder; refusing to open it",
            path=index_path, hint="shard names must be plain file names in the same folder",
        )
    full = folder / candidate
    root = folder.resolve()
    try:
        real = full.resolve()
    except OSError as e:  # symlink loop
        raise UnsafePathError(f"cannot resolve shard {name!r}: {e.strerror}", path=index_path) from None
    if real.parent != root and root not in real.parents:
        warn_once(log, ("shard-out", str(full), str(real)), "security: shard %s is a link out of %s (to %s)",
                  full, folder, real)
        raise UnsafePathError(
            f"shard {name!r} is a symbolic link to {real}, outside the checkpoint folder; refusing to open it",
            path=index_path,
        )
    return full


def read_index_json(index_path: Path) -> dict[str, str]:
    try:
        text = index_path.read_bytes()
    except FileNotFoundError:
        raise MissingShardError("index file not found", path=index_path) from None
    return parse_index_json(text, index_path)


def parse_index_json(text: bytes, index_path: Path) -> dict[str, str]:
    """The ``weight_map`` of a ``*.safetensors.index.json`` (its bytes), validated."""
    try:
        data = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidHeaderError(f"index is not valid JSON: {e}", path=index_path) from None
    except (RecursionError, ValueError) as e:
        raise InvalidHeaderError(f"index is not usable JSON ({type(e).__name__})", path=index_path) from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise UnknownFormatError("index has no 'weight_map' object", path=index_path)
    bad = next((k for k, v in weight_map.items() if not isinstance(v, str) or not v), None)
    if bad is not None:
        raise InvalidHeaderError(f"weight_map value {weight_map[bad]!r} is not a file name", path=index_path, tensor=bad)
    return weight_map


def resolve_shards(index_path: Path, weight_map: dict[str, str]) -> dict[str, Path]:
    """Shard file name -> path for every shard an index names; each must stay in the folder and exist."""
    shards = sorted(set(weight_map.values()))
    paths = {shard: _safe_member(index_path.parent, shard, index_path) for shard in shards}
    missing = [shard for shard, p in paths.items() if not p.is_file()]
    if missing:
        raise MissingShardError(
            f"index lists {len(paths)} shards but {len(missing)} are missing: {', '.join(missing)}",
            path=index_path, hint="the checkpoint is incomplete or still being written",
        )
    return paths


def check_shard_keys(listed: set[str], present: set[str], shard_path: Path, index_name: str) -> None:
    """An index and one of its shards must agree on exactly which tensors the shard holds."""
    for extra, what in ((listed - present, f"{index_name} assigns the tensor to this shard but the shard does not hold it"),
                        (present - listed, f"the shard holds a tensor that {index_name} does not list")):
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise IndexMismatchError(what + more, path=shard_path, tensor=min(extra))


def index_sharded(index_path: Path) -> tuple[dict[str, TensorRef], list[SafetensorsHeader]]:
    """Index a sharded safetensors checkpoint from its ``*.safetensors.index.json``.

    Every shard must exist, stay inside the folder, and hold exactly the tensors
    the index assigns to it.
    """
    weight_map = read_index_json(index_path)
    shard_paths = resolve_shards(index_path, weight_map)
    tensors: dict[str, TensorRef] = {}
    headers: list[SafetensorsHeader] = []
    for shard, path in shard_paths.items():
        header = read_header(path)
        headers.append(header)
        listed = {t for t, s in weight_map.items() if s == shard}
        check_shard_keys(listed, set(header.tensors), path, index_path.name)
        tensors.update(header.tensors)
    # keep the index's order (usually the model's parameter order)
    return {name: tensors[name] for name in weight_map}, headers
