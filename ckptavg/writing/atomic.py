"""Durable, atomic file-system changes: a crash leaves the old state or the new one.

* :func:`fsync_path` / :func:`fsync_dir`: a failed fsync is a failed write.
* :class:`AtomicDir`: build a folder in a temporary sibling, fsync every file and
  the folder, then rename it into place. Nothing ever appears half-written at
  the destination.
* :func:`atomic_write_bytes`: the same for one file (temp file, fsync, rename,
  fsync of the folder).
* :func:`swap_symlink`: point a link at a new target with one ``rename()`` of a freshly
  made link, so a reader always finds the old target or the new one, never nothing.
* :func:`exchange_paths`: swap two names atomically (``renameat2(RENAME_EXCHANGE)``, Linux).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import secrets
import shutil
from pathlib import Path

from ckptavg.errors import OutputError

log = logging.getLogger(__name__)

__all__ = [
    "TMP_MARK",
    "AtomicDir",
    "atomic_write_bytes",
    "exchange_paths",
    "fsync_dir",
    "fsync_path",
    "is_orphan",
    "link_or_copy",
    "remove_orphans",
    "swap_symlink",
    "temp_name",
]

TMP_MARK = ".ckptavg-tmp-"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # some filesystems cannot fsync folders
            raise
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(final: Path) -> Path:
    """A staging name beside ``final`` that :func:`remove_orphans` recognises."""
    final = Path(final)
    return final.with_name(f".{final.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def swap_symlink(link: Path, target: str | Path) -> None:
    """Make ``link`` a symlink to ``target`` (stored as given: pass a relative path) with one atomic
    ``rename()`` of a new link over the old one, then fsync the folder. ``link`` must not be a folder."""
    link = Path(link)
    tmp = temp_name(link)
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(link.parent)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_renameat2_fn: object = None


def _renameat2():  # a ctypes function, or None
    global _renameat2_fn
    if _renameat2_fn is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2_fn = fn
        except (OSError, AttributeError):
            _renameat2_fn = False
    return _renameat2_fn or None


def exchange_paths(a: Path, b: Path) -> None:
    """Swap the names ``a`` and ``b`` in one atomic step (``renameat2(RENAME_EXCHANGE)``): both must
    exist, and may be of different kinds (a folder and a symlink). Raises OSError (ENOSYS, EINVAL,
    ENOTSUP) where the C library, kernel or filesystem cannot."""
    fn = _renameat2()
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available", str(a))
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(a), None, str(b))


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (free, and immune to later replacement of ``src``); copy where links
    are impossible (another filesystem, no permission), keeping the mtime."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def is_orphan(name: str) -> bool:
    """A temporary or replaced folder or file that an interrupted write of ckptavg left behind."""
    return TMP_MARK in name or ".ckptavg-old-" in name


def remove_orphans(folder: Path) -> list[Path]:
    """Remove what interrupted atomic writes left in ``folder`` (never a finished entry); returns what went."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for p in entries:
        if p.name.startswith(".") and is_orphan(p.name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"could not write: {e.strerror or e}", path=path) from e


class AtomicDir:
    """Context manager: ``with AtomicDir(out, replace=True) as tmp: write into tmp``.

    On success the temporary folder is fsynced and renamed to ``out`` (an
    existing ``out`` is replaced only with ``replace=True``). On any exception
    the temporary folder is removed and ``out`` is left as it was.
    """

    def __init__(self, final: Path, *, replace: bool = False) -> None:
        self.final = Path(final)
        self.replace = replace
        self.tmp = temp_name(self.final)

    def __enter__(self) -> Path:
        if self.final.exists() and not self.replace:
            raise OutputError("already exists", path=self.final, hint="pass --force to replace it")
        self._created = []  # parents made here, deepest first: removed again if the write fails
        parent = self.final.parent
        while not parent.exists():
            self._created.append(parent)
            parent = parent.parent
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir()
        except OSError as e:
            raise OutputError(f"cannot create the output folder: {e.strerror or e}", path=self.final) from e
        return self.tmp

    def _remove_created(self) -> None:
        for folder in self._created:
            try:
                folder.rmdir()  # only if empty: a sibling average may still be writing there
            except OSError:
                return

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self._remove_created()
            return
        old = None
        try:
            for p in self.tmp.rglob("*"):
                if p.is_file():
                    fsync_path(p)
            fsync_dir(self.tmp)
            if self.final.exists():
                old = self.final.with_name(f".{self.final.name}.ckptavg-old-{secrets.token_hex(4)}")
                os.rename(self.final, old)
            os.rename(self.tmp, self.final)
            fsync_dir(self.final.parent)
        except OSError as e:
            if old is not None and not self.final.exists():
                os.rename(old, self.final)  # put the previous output back
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise OutputError(f"could not finish writing: {e.strerror or e}", path=self.final) from e
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
