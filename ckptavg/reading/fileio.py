"""Where checkpoint bytes are read.

Checkpoint files belong to a trainer that may rewrite, truncate or delete them
at any moment. A memory map of such a file kills the reader with SIGBUS (or
silently yields zeros), so ckptavg never maps them: bytes are copied into
private memory with ``pread``. Every file is identified by
``(st_dev, st_ino, st_size, st_mtime_ns)`` when it is indexed; the identity is
checked again when the file is opened for reading and after every read, so a
file that was replaced, truncated or rewritten in between is rejected instead
of being half-read.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ckptavg.errors import CheckpointChangedError, CheckpointVanishedError, SpecialFileError, TruncatedFileError

__all__ = ["FileCache", "FileIdentity", "ObjectIdentity", "identify", "open_regular", "read_exact", "require_regular",
           "zip_finished"]


def open_regular(path: Path) -> int:
    """``os.open(path)`` for reading, refusing anything but a regular file *before* a read could block on it.

    The open is non-blocking, so a FIFO where a weight file should be does not hang the caller (and
    SIGTERM still works); the descriptor's type is checked with ``fstat``. FileNotFoundError propagates."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        kind = os.fstat(fd).st_mode
        os.close(fd)
        what = "a FIFO" if stat.S_ISFIFO(kind) else "a device" if stat.S_ISCHR(kind) or stat.S_ISBLK(kind) else \
            "a socket" if stat.S_ISSOCK(kind) else "not a regular file"
        raise SpecialFileError(f"is {what}, not a weight file; it is not read", path=path,
                               hint="checkpoint files must be regular files")
    return fd


def zip_finished(path: Path) -> bool:
    """Whether a zip (a ``torch.save`` file) has its end-of-central-directory record: a torch zip written in
    place lacks it until the writer is done. Reads the last 64 KiB only."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - 65_558))  # EOCD (22 bytes) + the longest zip comment
        return b"PK\x05\x06" in f.read()


def require_regular(path: Path) -> None:
    """Refuse a path that is not a regular file, without blocking (see :func:`open_regular`)."""
    try:
        os.close(open_regular(path))
    except FileNotFoundError:
        pass


@dataclass(frozen=True)
class FileIdentity:
    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class ObjectIdentity(FileIdentity):
    """An object in remote storage (``s3://``, ``gs://``, any fsspec URL), as indexed: its URL, size and ETag
    (``dev`` is 0 and ``ino`` a hash of the URL, so two names of one object are still one input). Its bytes
    are fetched by ``store`` (:class:`ckptavg.reading.remote.ObjectStore`: ranged reads, retried)."""

    url: str = ""
    etag: str = ""
    store: Any = field(default=None, compare=False, hash=False, repr=False)


def identify(path: Path) -> FileIdentity:
    try:
        return FileIdentity.of(os.stat(path))
    except FileNotFoundError:
        raise CheckpointVanishedError("file disappeared", path=path) from None


def read_exact(fd: int, n: int, offset: int, *, path: Path, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read ``n`` bytes at ``offset`` into a private uint8 tensor (``out`` if given).

    Short reads are retried; end of file before ``n`` bytes is a truncated file.
    """
    buf = out if out is not None else torch.empty(n, dtype=torch.uint8)
    if n == 0:
        return buf
    view = memoryview(buf.numpy()).cast("B")[:n]
    done = 0
    while done < n:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise TruncatedFileError(
                f"file ended after {offset + done} bytes while {offset + n} were expected",
                path=path,
                hint="the file was truncated or is still being written",
            )
        done += got
    return buf


class _Open:
    __slots__ = ("fd", "identity")

    def __init__(self, fd: int, identity: FileIdentity) -> None:
        self.fd = fd
        self.identity = identity


class FileCache:
    """A small LRU of open file descriptors, each checked against the identity
    recorded when its checkpoint was indexed.

    Holding the descriptor keeps an unlinked file readable, so a rotation that
    deletes a checkpoint after its files were opened cannot produce a partial
    read; a file that is deleted before it is opened raises
    :class:`CheckpointVanishedError`.
    """

    def __init__(self, max_open: int = 64) -> None:
        self._max = max_open
        self._open: OrderedDict[Path, _Open] = OrderedDict()
        self._lock = threading.Lock()
        # bytes read through this cache, per file: the read accounting (``ckptavg sweep`` reports, and its tests
        # check, that each checkpoint byte is read once)
        self.bytes_read: Counter[Path] = Counter()

    def read(
        self, path: Path, expected: FileIdentity, offset: int, n: int, *, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        if isinstance(expected, ObjectIdentity):  # object storage: a ranged read of exactly these bytes
            buf = expected.store.read(expected, offset, n, out=out)
            with self._lock:
                self.bytes_read[path] += n
            return buf
        fd = self._fd(path, expected)
        try:
            buf = read_exact(fd, n, offset, path=path, out=out)
        except OSError as e:
            raise CheckpointChangedError(f"read failed: {os.strerror(e.errno or errno.EIO)}", path=path) from e
        self._check(path, fd, expected)
        with self._lock:
            self.bytes_read[path] += n
        return buf

    def _fd(self, path: Path, expected: FileIdentity) -> int:
        with self._lock:
            entry = self._open.get(path)
            if entry is not None and entry.identity == expected:
                self._open.move_to_end(path)
                return entry.fd
            if entry is not None:  # the path names another file now (a newer checkpoint at the same name)
                del self._open[path]
                os.close(entry.fd)
        try:
            fd = open_regular(path)
        except FileNotFoundError:
            raise CheckpointVanishedError(
                "file was deleted before it could be read", path=path, hint="checkpoint rotation?"
            ) from None
        try:
            self._check(path, fd, expected)
        except BaseException:
            os.close(fd)
            raise
        with self._lock:
            self._open[path] = _Open(fd, expected)
            while len(self._open) > self._max:
                _, old = self._open.popitem(last=False)
                os.close(old.fd)
        return fd

    @staticmethod
    def _check(path: Path, fd: int, expected: FileIdentity) -> None:
        now = FileIdentity.of(os.fstat(fd))
        if now != expected:
            what = []
            if (now.dev, now.ino) != (expected.dev, expected.ino):
                what.append("it was replaced by another file")
            if now.size != expected.size:
                what.append(f"its size changed from {expected.size} to {now.size} bytes")
            if now.mtime_ns != expected.mtime_ns and not what:
                what.append("it was rewritten")
            raise CheckpointChangedError(
                "file changed while ckptavg was reading it: " + ", ".join(what),
                path=path,
                hint="the checkpoint is skipped; it is read again only if it becomes stable",
            )

    def close(self) -> None:
        with self._lock:
            for entry in self._open.values():
                os.close(entry.fd)
            self._open.clear()

    def __enter__(self) -> FileCache:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
