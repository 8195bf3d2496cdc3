"""Checkpoints in object storage: ``s3://``, ``gs://``, ``memory://`` — any URL fsspec knows.

Bytes are read through the fsspec implementation of the store (s3fs for S3 and S3-compatible servers, gcsfs
for GCS), never a hand-written client, and only the bytes that are needed: every safetensors file's 8-byte
length and header first (ranged reads, all shards at once), then, as the engine asks, each tensor's byte
range (:meth:`ObjectStore.read`, called by :class:`~ckptavg.reading.fileio.FileCache` for an
:class:`~ckptavg.reading.fileio.ObjectIdentity`). A read larger than ``part_bytes`` is fetched as parts in
parallel (``fs.cat_ranges``: s3fs issues them concurrently on its event loop). A part that fails with a
transient error (a dropped connection, a short body, a timeout, a 5xx) is fetched again whole, up to
``retries`` times with exponential backoff; the caller only ever gets complete ranges, so the fold never
sees half a tensor and never folds one twice. A vanished object (the trainer rotated it) is
:class:`CheckpointVanishedError`, never retried.

Credentials come from the store's own chain (for S3: botocore's environment variables, ``~/.aws``, instance
roles; ``AWS_ENDPOINT_URL`` for an S3-compatible server); ``storage_options`` (``--storage-option KEY=VALUE``,
the config's ``[storage]`` table) go to the fsspec filesystem as keyword arguments. Their secret values are
remembered by :mod:`ckptavg.redact`, so no log line or error carries them.

Read here: safetensors checkpoints (``model.safetensors``, sharded with ``*.safetensors.index.json``; HF Trainer
``checkpoint-N/`` folders and ``save_pretrained`` folders), torch.distributed.checkpoint folders (``.metadata``
fetched whole and read by the restricted unpickler, chunks as byte ranges of the ``.distcp`` objects), and run
folders of them. Pickles and DeepSpeed folders are refused with a clear error by the one-shot (copy them
locally); the daemon mirrors them (:mod:`ckptavg.daemon.remote`).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from ckptavg.errors import (
    CheckpointChangedError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointVanishedError,
    IncompleteCheckpointError,
    MissingShardError,
    TruncatedFileError,
    UnknownFormatError,
    UnsafePathError,
    UnsafePickleError,
    UnsupportedCheckpointError,
    UsageError,
)
from ckptavg.reading.fileio import ObjectIdentity
from ckptavg.reading.formats import dcp
from ckptavg.reading.formats import pickle as pkl
from ckptavg.reading.formats import safetensors as st
from ckptavg.reading.formats.refs import FormatIndex, TensorRef, combine_fingerprints
from ckptavg.reading.names import PICKLE_SUFFIXES, is_noise
from ckptavg.reading.steps import order_key, step_from_name
from ckptavg.redact import remember_secret, scrub

log = logging.getLogger(__name__)

__all__ = ["ObjectPath", "ObjectStore", "index_remote", "is_run_folder", "is_url", "list_run", "parse_storage_options",
           "redact_url", "store_for"]

DEFAULT_PART_BYTES = 16 << 20  # a read larger than this is fetched as parallel parts
DEFAULT_RETRIES = 5  # per part, after the first try
DEFAULT_BACKOFF = 0.2  # seconds before the first retry; doubled each time, at most MAX_BACKOFF
MAX_BACKOFF = 5.0
SIDE_FILE_BYTES = 16 << 20  # config/tokenizer files fetched beside the weights (for the output's config.json)

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)[^/@]*@")
_SECRET_WORDS = ("secret", "token", "password", "key", "credential", "signature")
# written by the HF Trainer beside the weights; their presence means trainer_state.json marks completion
TRAINER_FILES = ("optimizer.pt", "optimizer.bin", "scheduler.pt", "training_args.bin", "scaler.pt")
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}


def looks_like_url(path: object) -> bool:
    """Whether a path (already made a ``Path``, which folds ``s3://`` into ``s3:/``) was written as a URL."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*:/", str(path)) is not None and not str(path).startswith("file:")


def is_url(text: object) -> bool:
    """Whether ``text`` names object storage (``scheme://...``; ``file://`` is a local path)."""
    if not isinstance(text, str):
        return False
    m = _SCHEME.match(text)
    return m is not None and m.group(1).lower() != "file"


def redact_url(url: str) -> str:
    """``url`` without any ``user:password@`` part, and without any secret ckptavg knows."""
    return scrub(_USERINFO.sub(r"\1***@", url))


class ObjectPath(PurePosixPath):
    """A location in object storage, printed as its URL (``s3://bucket/run/checkpoint-500``).

    Only pure path operations apply (``name``, ``parent``, ``/``): it is never opened as a local file, and
    code that must tell it from a local path checks ``isinstance(p, pathlib.Path)``."""

    def __str__(self) -> str:
        head, *rest = self.parts
        return redact_url(f"{head}//{'/'.join(rest)}")

    @property
    def url(self) -> str:
        head, *rest = self.parts
        return f"{head}//{'/'.join(rest)}"


def parse_storage_options(pairs: Iterable[str], *, option: str = "--storage-option") -> dict[str, Any]:
    """``KEY=VALUE`` strings into fsspec keyword arguments; a value that parses as JSON (``true``, ``3``,
    ``{"region_name": "eu-west-1"}``) is taken as such, any other as a string. Secret values are
    remembered by :mod:`ckptavg.redact` so that no message shows them."""
    out: dict[str, Any] = {}
    for text in pairs:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{option} {text.split('=')[0]!r}...: expected KEY=VALUE (e.g. endpoint_url=http://host:9000)")
        out[key.strip()] = _typed_value(value)
    remember_option_secrets(out)
    return out


def _typed_value(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def remember_option_secrets(options: Mapping[str, Any]) -> None:
    """Register every secret-looking value (keys naming a secret, token, password or key) with the redactor."""
    for key, value in options.items():
        if isinstance(value, Mapping):
            remember_option_secrets(value)
        elif isinstance(value, str) and any(w in key.lower() for w in _SECRET_WORDS):
            remember_secret(value)
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS_JSON"):
        remember_secret(os.environ.get(var))


def _filesystem(url: str, options: Mapping[str, Any]) -> tuple[Any, str]:
    scheme = _SCHEME.match(url).group(1).lower()  # type: ignore[union-attr]
    try:
        import fsspec
    except ImportError:
        raise UsageError(f"reading {scheme}:// needs fsspec and its {_PACKAGES.get(scheme, scheme)} implementation",
                         hint="pip install 'ckptavg[s3]'") from None
    remember_option_secrets(options)
    try:
        fs, path = fsspec.core.url_to_fs(url, **dict(options))
    except ImportError:
        package = _PACKAGES.get(scheme)
        raise UsageError(f"reading {scheme}:// needs the {package or 'fsspec implementation of it'}"
                         + (" package" if package else ""),
                         hint="pip install 'ckptavg[s3]'" if package == "s3fs" else
                         "pip install 'ckptavg[gcs]'" if package == "gcsfs" else
                         f"pip install {package}" if package else f"install fsspec's {scheme} implementation") from None
    except ValueError as e:
        raise UsageError(f"{redact_url(url)}: {scrub(str(e))}", hint="a storage URL fsspec knows: s3://, gs://, ...") from None
    except TypeError as e:  # an unknown storage option
        raise UsageError(f"storage options for {scheme}://: {scrub(str(e))}",
                         hint="check the --storage-option / [storage] keys against the fsspec implementation") from None
    return fs, path


def store_for(url: str, storage_options: Mapping[str, Any] | None = None, **tuning: Any) -> tuple[ObjectStore, str]:
    """The store serving ``url`` and the path inside it (no protocol)."""
    fs, path = _filesystem(url, storage_options or {})
    scheme = _SCHEME.match(url).group(1)  # type: ignore[union-attr]
    return ObjectStore(fs, scheme=scheme, **tuning), path.rstrip("/")


def _transient(error: BaseException) -> bool:
    """Whether a failed ranged read is worth another try (not: gone, forbidden, a bad request)."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    return isinstance(error, Exception)


class ObjectStore:
    """One fsspec filesystem and how its bytes are fetched: ranged reads, in parallel parts, retried."""

    def __init__(self, fs: Any, *, scheme: str, part_bytes: int = DEFAULT_PART_BYTES, retries: int = DEFAULT_RETRIES,
                 backoff: float = DEFAULT_BACKOFF) -> None:
        self.fs = fs
        self.scheme = scheme
        self.part_bytes = max(1, int(part_bytes))
        self.retries = max(0, int(retries))
        self.backoff = backoff
        self.retried = 0  # parts fetched again after a failure (tests and the benchmark read it)

    def location(self, path: str) -> ObjectPath:
        return ObjectPath(f"{self.scheme}://{path}")

    # -- bytes ---------------------------------------------------------------------------------------------
    def fetch(self, path: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """The bytes of each ``[start, end)`` of object ``path``, every range whole. Failed ranges are fetched
        again (backoff doubling from ``backoff``), at most ``retries`` times."""
        results: list[Any] = [None] * len(ranges)
        pending = list(range(len(ranges)))
        where = self.location(path)
        error: BaseException | None = None
        for attempt in range(self.retries + 1):
            got = self.fs.cat_ranges([path] * len(pending), [ranges[i][0] for i in pending],
                                     [ranges[i][1] for i in pending], on_error="return")
            failed = []
            for i, data in zip(pending, got):
                want = ranges[i][1] - ranges[i][0]
                if isinstance(data, (bytes, bytearray, memoryview)) and len(data) == want:
                    results[i] = data
                    continue
                if isinstance(data, BaseException):
                    if not _transient(data):
                        raise _permanent(data, where)
                    error = data
                else:
                    error = TruncatedFileError(f"got {len(data)} of the {want} bytes at offset {ranges[i][0]}",
                                               path=where)
                failed.append(i)
            if not failed:
                return results
            pending = failed
            if attempt == self.retries:
                break
            delay = min(self.backoff * 2 ** attempt, MAX_BACKOFF)
            self.retried += len(failed)
            log.warning("%s: %d byte range(s) failed (%s); fetching them again in %.1f s (retry %d of %d)", where,
                        len(failed), scrub(_describe(error)), delay, attempt + 1, self.retries)
            time.sleep(delay)
        raise CheckpointChangedError(f"reading failed after {self.retries} retries: {scrub(_describe(error))}",
                                     path=where, hint="the storage server or the network kept failing; try again")

    def read(self, ident: ObjectIdentity, offset: int, n: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """``n`` bytes of the object at ``offset`` into a private uint8 tensor (``out`` if given)."""
        buf = out if out is not None else torch.empty(n, dtype=torch.uint8)
        if n == 0:
            return buf
        if offset + n > ident.size:
            raise TruncatedFileError(f"a read of [{offset}, {offset + n}) is past the object's {ident.size} bytes",
                                     path=self.location(_path_of(ident.url)))
        view = memoryview(buf.numpy()).cast("B")
        parts = [(lo, min(lo + self.part_bytes, n)) for lo in range(0, n, self.part_bytes)]
        for (lo, hi), data in zip(parts, self.fetch(_path_of(ident.url), [(offset + lo, offset + hi) for lo, hi in parts])):
            view[lo:hi] = data
        return buf

    def read_whole(self, path: str, size: int) -> bytes:
        if size == 0:
            return b""
        parts = [(lo, min(lo + self.part_bytes, size)) for lo in range(0, size, self.part_bytes)]
        return b"".join(bytes(d) for d in self.fetch(path, parts))

    # -- listing -------------------------------------------------------------------------------------------
    def info(self, path: str) -> dict[str, Any]:
        self.fs.invalidate_cache(path)
        try:
            return self.fs.info(path)
        except FileNotFoundError:
            raise
        except Exception as e:  # the client's errors (network, credentials, options): one line
            raise self._unreachable(e, path) from e

    def listing(self, path: str) -> dict[str, dict[str, Any]]:
        """The entries directly under ``path``, by name, listed afresh (no cached listing: polling relies on it)."""
        entries = self._list(self.fs.ls, path)
        out = {}
        for e in entries:
            name = str(e["name"]).rstrip("/").rsplit("/", 1)[-1]
            if name and str(e["name"]).rstrip("/") != path.rstrip("/"):
                out[name] = e
        return out

    def _list(self, call: Any, path: str) -> Any:
        """``call(path, detail=True)`` (``fs.ls``, ``fs.find``) on a fresh listing: nothing there is empty, the
        client's errors (network, credentials, options) are one line."""
        self.fs.invalidate_cache(path)
        try:
            return call(path, detail=True)
        except FileNotFoundError:
            return {}
        except Exception as e:  # the client's errors (network, credentials, options): one line
            raise self._unreachable(e, path) from e

    def _unreachable(self, error: BaseException, path: str) -> CheckpointError:
        if isinstance(error, PermissionError):
            return _permanent(error, self.location(path))
        hint = ("an option the storage client does not take? (--storage-option, [storage])"
                if isinstance(error, TypeError) else
                "check the endpoint (AWS_ENDPOINT_URL, --storage-option endpoint_url=...), the credentials and the network")
        return CheckpointError(f"cannot list it: {scrub(_describe(error))}", path=self.location(path), hint=hint)

    def tree(self, path: str) -> dict[str, dict[str, dict[str, Any]]]:
        """Every object under ``path`` in one paginated listing (``fs.find``), grouped by the entry directly under
        ``path``: ``{"checkpoint-500": {"model.safetensors": {...}, ...}, "step_9.safetensors": {"": {...}}}``."""
        found = self._list(self.fs.find, path)
        prefix = path.rstrip("/") + "/"
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for full, entry in found.items():
            if full.startswith(prefix) and entry.get("type") != "directory":
                head, _, rest = full[len(prefix):].partition("/")
                if head:
                    out.setdefault(head, {})[rest] = entry
        return out

    def identity(self, path: str, entry: Mapping[str, Any]) -> ObjectIdentity:
        url = f"{self.scheme}://{path}"
        return ObjectIdentity(dev=0, ino=int(hashlib.sha256(url.encode()).hexdigest()[:15], 16),
                              size=int(entry.get("size") or 0), mtime_ns=int(modified(entry) * 1e9),
                              url=url, etag=str(entry.get("ETag") or entry.get("etag") or entry.get("md5Hash") or ""),
                              store=self)


def _path_of(url: str) -> str:
    return url.split("://", 1)[1]


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "no data"
    text = str(error) or type(error).__name__
    return f"{type(error).__name__}: {text}" if type(error).__name__ not in text else text


def _permanent(error: BaseException, where: ObjectPath) -> CheckpointError:
    if isinstance(error, FileNotFoundError):
        return CheckpointVanishedError("was deleted before it could be read", path=where, hint="checkpoint rotation?")
    if isinstance(error, PermissionError):
        return CheckpointError(f"access denied ({scrub(_describe(error))})", path=where,
                               hint="check the credentials (AWS_* variables, ~/.aws, --storage-option)")
    return CheckpointError(scrub(_describe(error)), path=where)


def modified(entry: Mapping[str, Any]) -> float:
    """An entry's last-modified time (seconds since the epoch; 0 when the store gives none)."""
    for key in ("LastModified", "mtime", "updated", "last_modified", "created"):
        value = entry.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return 0.0


# -- checkpoints ---------------------------------------------------------------------------------------------
def is_dir(entry: Mapping[str, Any]) -> bool:
    return entry.get("type") == "directory"


HEAD_BYTES = 64 << 10  # read first from every safetensors object: its length prefix and, mostly, its whole header


def _headers(store: ObjectStore, files: Sequence[tuple[str, Mapping[str, Any]]]) -> list[st.SafetensorsHeader]:
    """Every file's safetensors header: the first ``HEAD_BYTES`` of every file in one batch of ranged reads (the
    length prefix and, for all but the largest headers, the whole header: one round trip), then the rest of any
    header longer than that in a second batch."""
    idents = [store.identity(path, entry) for path, entry in files]
    for (path, _), ident in zip(files, idents):
        if ident.size < 8:
            raise TruncatedFileError(f"object is {ident.size} bytes, too short for a safetensors header",
                                     path=store.location(path), hint="the upload is incomplete")
    heads = [bytes(h) for h in _fetch_many(store, [(path, 0, min(ident.size, HEAD_BYTES))
                                                   for (path, _), ident in zip(files, idents)])]
    lengths = []
    for (path, _), ident, head in zip(files, idents, heads):
        (n,) = struct.unpack("<Q", head[:8])
        st.check_header_length(n, ident.size, store.location(path))
        lengths.append(n)
    rest = [(path, len(head), 8 + n) for (path, _), head, n in zip(files, heads, lengths) if 8 + n > len(head)]
    more = iter(_fetch_many(store, rest) if rest else ())
    raws = [head[8:8 + n] if 8 + n <= len(head) else head[8:] + bytes(next(more)) for head, n in zip(heads, lengths)]
    return [st.header_from_bytes(store.location(path), ident, raw)
            for (path, _), ident, raw in zip(files, idents, raws)]


def _fetch_many(store: ObjectStore, ranges: Sequence[tuple[str, int, int]]) -> list[bytes]:
    """One range of each of several objects, fetched concurrently (one ``cat_ranges`` per object would serialise)."""
    by_path: dict[str, list[int]] = {}
    for i, (path, _, _) in enumerate(ranges):
        by_path.setdefault(path, []).append(i)
    out: list[Any] = [None] * len(ranges)
    if len(by_path) == len(ranges):  # one range per object: a single batch across objects
        got = store.fs.cat_ranges([p for p, _, _ in ranges], [s for _, s, _ in ranges], [e for _, _, e in ranges],
                                  on_error="return")
        for i, data in enumerate(got):
            path, s, e = ranges[i]
            if isinstance(data, (bytes, bytearray, memoryview)) and len(data) == e - s:
                out[i] = data
            elif isinstance(data, BaseException) and not _transient(data):
                raise _permanent(data, store.location(path))
            else:  # retried one by one, with the store's backoff
                out[i] = store.fetch(path, [(s, e)])[0]
        return out
    for path, idx in by_path.items():
        for i, data in zip(idx, store.fetch(path, [(ranges[i][1], ranges[i][2]) for i in idx])):
            out[i] = data
    return out


def _safe_shard(name: str, where: ObjectPath) -> str:
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        log.warning("security: index %s points outside its folder: %r", where, name)
        raise UnsafePathError(f"weight_map points to {name!r}, outside the checkpoint folder; refusing to open it",
                              path=where, hint="shard names must be plain file names in the same folder")
    return name


def _side_files(store: ObjectStore, folder: str, entries: Mapping[str, Mapping[str, Any]]) -> str | None:
    """Fetch the small config/tokenizer files beside the weights into a private temporary folder (removed when
    the checkpoint is garbage-collected); None when there are none."""
    wanted = [n for n, e in sorted(entries.items())
              if not is_dir(e) and not is_noise(n) and int(e.get("size") or 0) <= SIDE_FILE_BYTES
              and n.endswith((".json", ".txt", ".model", ".jinja", ".py", ".tiktoken"))
              and not n.endswith(".index.json") and not n.startswith(("rng_state", "optimizer", "scheduler",
                                                                       "training_args", "trainer_state"))]
    if not wanted:
        return None
    tmp = tempfile.mkdtemp(prefix="ckptavg-meta-")
    try:
        sized = [(name, int(entries[name].get("size") or 0)) for name in wanted]
        datas = _fetch_many(store, [(f"{folder}/{name}", 0, size) for name, size in sized if size])
        for name, size in sized:
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(datas.pop(0) if size else b"")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def index_remote(url: str, *, storage_options: Mapping[str, Any] | None = None,
                 store: ObjectStore | None = None, side_files: bool = True, state_key: str | None = None,
                 strip_prefix: str | None = None) -> tuple[ObjectPath, FormatIndex, str]:
    """Index the safetensors checkpoint at ``url`` (a folder or a file in object storage) from its headers:
    its location, what was found (``meta_dir``: a private temporary folder of its config/tokenizer files, which
    the caller removes) and the weights' base name. :func:`ckptavg.reading.checkpoint.open_checkpoint` makes it a
    ``Checkpoint``."""
    if store is None:
        store, path = store_for(url, storage_options)
    else:
        path = _path_of(url).rstrip("/")
    where = store.location(path)
    entries = store.listing(path)  # a folder's entries; empty for an object (one request where info + ls take two)
    if not entries:
        try:
            top = store.info(path)
        except FileNotFoundError:
            raise CheckpointNotFoundError("no such object or folder", path=where) from None
    else:
        top = {"type": "directory"}
    names = sorted(n for n in entries if not is_noise(n))
    if is_dir(top) and (".metadata" in names or any(n.endswith(".distcp") for n in names)):
        return _index_dcp(store, path, where, entries, state_key=state_key, strip_prefix=strip_prefix,
                          side_files=side_files)
    # the config/tokenizer files are fetched while the headers are (one round trip fewer per checkpoint)
    pool = side = None
    if side_files and is_dir(top) and any(n.endswith(".safetensors") for n in names):
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckptavg-side")
        side = pool.submit(_side_files, store, path, entries)
    try:
        found = _index_entries(store, path, where, top, entries, names, side)
    except BaseException:
        if side is not None and side.exception() is None and side.result() is not None:
            shutil.rmtree(side.result(), ignore_errors=True)
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    return found


def _index_dcp(store: ObjectStore, path: str, where: ObjectPath, entries: dict[str, dict[str, Any]], *,
               state_key: str | None, strip_prefix: str | None, side_files: bool) -> tuple[ObjectPath, FormatIndex, str]:
    """A torch.distributed.checkpoint folder: ``.metadata`` fetched whole (through the restricted unpickler, as
    locally), each chunk then read as a byte range of its ``.distcp`` object."""
    if ".metadata" not in entries:
        raise IncompleteCheckpointError(
            "is a torch.distributed.checkpoint folder without .metadata: the writer has not committed it yet "
            "(it renames .metadata.tmp to .metadata last)", path=where, hint="wait until the save has finished")
    meta_where = store.location(f"{path}/.metadata")
    size = int(entries[".metadata"].get("size") or 0)
    if size > dcp.MAX_METADATA_BYTES:
        raise UnsafePickleError(f"is {size} bytes, over the {dcp.MAX_METADATA_BYTES}-byte limit for a DCP .metadata; "
                                "refused unread", path=meta_where)
    pkl._check_torch(meta_where)  # type: ignore[arg-type]
    meta, raw = dcp.parse_metadata(store.read_whole(f"{path}/.metadata", size), meta_where)  # type: ignore[arg-type]

    def lookup(p: Any) -> ObjectIdentity | None:
        entry = entries.get(p.name)
        return None if entry is None or is_dir(entry) else store.identity(f"{path}/{p.name}", entry)

    meta_dir = _side_files(store, path, entries) if side_files else None
    try:
        found = dcp._index(where, meta, raw, state_key=state_key, strip_prefix=strip_prefix,  # type: ignore[arg-type]
                           meta_dir=None if meta_dir is None else Path(meta_dir), lookup=lookup)
    except BaseException as e:
        if meta_dir is not None:
            shutil.rmtree(meta_dir, ignore_errors=True)
        if isinstance(e, (AttributeError, TypeError, ValueError, KeyError)) and not isinstance(e, CheckpointError):
            raise UnknownFormatError(f"its .metadata is malformed ({type(e).__name__}: {str(e)[:160]})",
                                     path=meta_where, hint="not a .metadata written by torch.distributed.checkpoint"
                                     ) from None
        raise
    if found.step is None and (named := step_from_name(where)) is not None:
        found.step, found.step_source = named, "name"
    return where, found, "model"


def _index_entries(store: ObjectStore, path: str, where: ObjectPath, top: Mapping[str, Any],
                   entries: dict[str, dict[str, Any]], names: list[str],
                   side: concurrent.futures.Future | None) -> tuple[ObjectPath, FormatIndex, str]:
    if is_dir(top):
        weights = st.choose_weights(names, where)
        kind, chosen, weights_name = weights if weights is not None else ("", "", "")
        if kind == "safetensors-sharded":
            index_where = store.location(f"{path}/{chosen}")
            weight_map = st.parse_index_json(store.read_whole(f"{path}/{chosen}", int(entries[chosen]["size"])),
                                             index_where)
            shards = sorted({_safe_shard(s, index_where) for s in weight_map.values()})
            missing = [s for s in shards if s not in entries]
            if missing:
                raise MissingShardError(f"index lists {len(shards)} shards but {len(missing)} are missing: "
                                        f"{', '.join(missing)}", path=index_where,
                                        hint="the checkpoint is incomplete or still being uploaded")
            headers = _headers(store, [(f"{path}/{s}", entries[s]) for s in shards])
            tensors: dict[str, TensorRef] = {}
            for shard, header in zip(shards, headers):
                st.check_shard_keys({t for t, s in weight_map.items() if s == shard}, set(header.tensors),
                                    header.path, chosen)
                tensors.update(header.tensors)
            tensors = {name: tensors[name] for name in weight_map}
        elif kind == "safetensors":
            headers = _headers(store, [(f"{path}/{chosen}", entries[chosen])])
            tensors = dict(headers[0].tensors)
        elif any(n.endswith(PICKLE_SUFFIXES) for n in names):
            raise UnsupportedCheckpointError(
                "holds pickle weights (.bin/.pt/.ckpt); they are not read from object storage (a pickle is "
                "loaded whole)", path=where,
                hint="copy the checkpoint locally first (e.g. aws s3 cp --recursive), or save it as safetensors")
        else:
            subdirs = [n for n in names if is_dir(entries[n])]
            raise CheckpointNotFoundError(
                "holds no safetensors weights", path=where,
                hint="this looks like a run folder: pass it with --last N" if subdirs else None)
        meta_dir = side.result() if side is not None else None
        folder_entries = entries
        ckpt_path = where
    else:
        name = path.rsplit("/", 1)[-1]
        if name.endswith(PICKLE_SUFFIXES):
            raise UnsupportedCheckpointError("is a pickle; pickles are not read from object storage (loaded whole)",
                                             path=where, hint="copy it locally first, or save it as safetensors")
        if not name.endswith(".safetensors"):
            raise UnknownFormatError("not a checkpoint ckptavg reads from object storage", path=where,
                                     hint="expected a .safetensors file or a folder of them")
        headers = _headers(store, [(path, top)])
        tensors = dict(headers[0].tensors)
        kind, weights_name, folder_entries, ckpt_path, meta_dir = "safetensors", "model", {}, where, None
    if not tensors:
        if meta_dir is not None:
            shutil.rmtree(meta_dir, ignore_errors=True)
        raise CheckpointNotFoundError("holds no tensors", path=where)
    metadata = headers[0].metadata or {} if len(headers) == 1 else {}
    found = FormatIndex(format=kind, tensors=tensors, files=[h.path for h in headers],  # type: ignore[misc]
                        fingerprint=combine_fingerprints([h.fingerprint for h in headers]),
                        meta_dir=None if meta_dir is None else Path(meta_dir), metadata=dict(metadata),
                        incomplete=trainer_pending(folder_entries))
    if (named := step_from_name(ckpt_path)) is not None:
        found.step, found.step_source = named, "name"
    elif "trainer_state.json" in folder_entries:
        try:
            state = json.loads(store.read_whole(f"{path}/trainer_state.json",
                                                int(folder_entries["trainer_state.json"].get("size") or 0)))
            if isinstance(state, dict) and isinstance(state.get("global_step"), int):
                found.step, found.step_source = state["global_step"], "trainer_state.json"
        except (CheckpointError, ValueError):
            pass
    return ckpt_path, found, weights_name


def trainer_pending(entries: Mapping[str, Any]) -> str | None:
    """An HF Trainer folder (Trainer files present) is finished once ``trainer_state.json`` (written last) is there."""
    if not entries or "trainer_state.json" in entries:
        return None
    if any(n in entries for n in TRAINER_FILES) or any(n.startswith("rng_state") for n in entries):
        return "trainer_state.json not written yet (the HF Trainer writes it last)"
    return None


# -- runs ----------------------------------------------------------------------------------------------------
def list_run(store: ObjectStore, path: str) -> list[tuple[str, dict[str, Any]]]:
    """The candidate checkpoints of a run folder in object storage, in training order: entries whose name
    carries a step (``checkpoint-500/``, ``step_500.safetensors``), staging and hidden names left out."""
    found = []
    for name, entry in store.listing(path).items():
        if is_noise(name) or order_key(name) is None:
            continue
        if is_dir(entry) or name.endswith((".safetensors", *PICKLE_SUFFIXES)):
            found.append((name, entry))
    found.sort(key=lambda t: order_key(t[0]))  # type: ignore[arg-type,return-value]
    return [(f"{path}/{name}", entry) for name, entry in found]


def is_run_folder(url: str, *, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether ``url`` is a folder of checkpoints (rather than one checkpoint)."""
    store, path = store_for(url, storage_options)
    entries = store.listing(path)
    if any(n.endswith((".safetensors", ".distcp", ".metadata", *PICKLE_SUFFIXES)) for n in entries):
        return False
    return bool(list_run(store, path))
