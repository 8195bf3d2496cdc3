"""Durable, atomic file-system changes: a crash leaves the old state or the new one.

* :func:`fsync_path` / :func:`fsync_dir`: a failed fsync is a failed write.
* :class:`AtomicDir`: build a folder in a temporary sibling, fsync every file and
  the folder, then rename it into place. Nothing ever appears half-written at
  the destination.
* :func:`atomic_write_bytes`: the same for one file (temp file, fsync, rename,
  fsync of the folder).
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
from pathlib import Path

from ckptavg.errors import OutputError

log = logging.getLogger(__name__)

__all__ = ["AtomicDir", "atomic_write_bytes", "fsync_dir", "fsync_path", "is_orphan", "link_or_copy", "remove_orphans", "TMP_MARK"]

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
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
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
        self.tmp = self.final.with_name(f".{self.final.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")

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
