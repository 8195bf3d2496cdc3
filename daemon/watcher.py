"""File events as hints: watchdog wakes the scanner, a periodic full rescan is the authority.

Events are lost while the daemon is down and never arrive for writes made by
other hosts (NFS, Lustre, GPFS, FUSE mounts such as gcsfuse), so the daemon
always rescans on start and every ``poll_interval`` seconds. On such mounts, or
when inotify cannot be used (its watch limit reached), only the rescan runs,
with one warning. The handler only sets an event; it never does work.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["NETWORK_FILESYSTEMS", "Watcher", "mount_type"]

NETWORK_FILESYSTEMS = ("nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "beegfs",
                       "9p", "fuse", "afs", "wekafs")


def mount_type(path: Path) -> str:
    """The filesystem type of the mount holding ``path`` (``/proc/self/mounts``; "" if unknown)."""
    try:
        real = str(Path(path).resolve())
        best, kind = "", ""
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, kind = mnt, parts[2]
        return kind
    except OSError:
        return ""


def _is_network(kind: str) -> bool:
    return kind.startswith("fuse") or kind in NETWORK_FILESYSTEMS


class Watcher:
    """Wakes ``wake`` on any change under ``root`` (when events are usable)."""

    def __init__(self, root: Path, wake: threading.Event, *, poll: str = "auto") -> None:
        self.root = Path(root)
        self.wake = wake
        self.poll = poll
        self._observer = None
        self._armed_ino: tuple | None = None
        self._warned = False
        self.mode = "starting"

    def _use_events(self) -> bool:
        if self.poll == "always":
            return False
        if self.poll == "auto":
            kind = mount_type(self.root)
            if _is_network(kind):
                if not self._warned:
                    log.warning("%s is on a %s mount, where file events are unreliable; polling", self.root, kind)
                    self._warned = True
                return False
        return True

    def ensure(self) -> None:
        """(Re-)arm the observer if the root exists and is not watched (it may have been recreated)."""
        try:
            st = os.stat(self.root)
        except FileNotFoundError:
            self._watch_for_root()
            return
        ident = (st.st_dev, st.st_ino)
        if self._observer is not None and self._armed_ino == ident and self._observer.is_alive():
            return
        self.stop()
        if not self._use_events():
            self.mode = "polling"
            return
        try:
            observer = self._observe(self.root, recursive=True)
        except ImportError:
            self.mode = "polling"
            if not self._warned:
                log.warning("watchdog cannot be imported; polling (reinstall ckptavg: watchdog is one of its dependencies)")
                self._warned = True
            return
        except OSError as e:  # e.g. ENOSPC: the inotify watch limit
            if not self._warned:
                log.warning("cannot watch %s for events (%s); polling instead", self.root, e.strerror or e)
                self._warned = True
            self.mode = "polling"
            return
        self._observer, self._armed_ino, self.mode = observer, ident, "events"

    def _observe(self, folder: Path, *, recursive: bool) -> Any:
        """A started watchdog observer whose every event sets ``wake`` (ImportError / OSError propagate)."""
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        wake = self.wake

        class _Hint(FileSystemEventHandler):
            def on_any_event(self, event) -> None:  # type: ignore[no-untyped-def]
                wake.set()

        observer = Observer()
        observer.daemon = True
        observer.name = "ckptavg-watch"
        try:
            observer.schedule(_Hint(), str(folder), recursive=recursive)
            observer.start()
        except BaseException:
            observer.stop()
            raise
        return observer

    def _watch_for_root(self) -> None:
        """The root does not exist (yet): watch its nearest existing ancestor, not recursively, so that its
        creation wakes the daemon at once instead of at the next rescan."""
        self.mode = "waiting for the folder"
        ancestor = self.root.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        try:
            st = os.stat(ancestor)
        except OSError:
            return
        ident = (st.st_dev, st.st_ino, "parent")
        if self._observer is not None and self._armed_ino == ident and self._observer.is_alive():
            return
        self.stop()
        if not self._use_events():
            return
        try:
            observer = self._observe(ancestor, recursive=False)
        except (ImportError, OSError):
            return
        self._observer, self._armed_ino = observer, ident

    def stop(self) -> None:
        if self._observer is not None:
            try:
                self._observer.stop()
                self._observer.join(timeout=5)
            except Exception:  # a dying observer must not stop the daemon
                log.debug("observer stop failed", exc_info=True)
            self._observer, self._armed_ino = None, None
