"""Keeping the checkpoints the averages still need, after the trainer rotates them away.

Trainers delete old checkpoints (``save_total_limit``, ``keep_latest_k``), but EMA
needs every checkpoint that is queued, LAWA needs the one leaving its window,
and a crash must be able to re-fold what was not yet persisted. As soon as a
checkpoint is ready, its weight files (plus index and config files) are hard
linked into ``<state>/keep/<step>/`` — no bytes copied, and the trainer can
delete its own names freely — or copied where links are impossible (another
filesystem, ``keep_for_lawa = "copy"``). The daemon reads only from these
retained copies, and releases each one when no average needs it any more.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

from ckptavg.errors import CheckpointVanishedError, UsageError
from ckptavg.reading.checkpoint import Checkpoint
from ckptavg.writing.atomic import AtomicDir, remove_orphans
from ckptavg.writing.export import copy_meta_files

log = logging.getLogger(__name__)

__all__ = ["Retainer", "probe_link"]


def probe_link(source_dir: Path, keep_dir: Path) -> None:
    """Fail at start-up, naming both paths, when hard links from the watched folder cannot work."""
    keep_dir.mkdir(parents=True, exist_ok=True)
    if os.stat(source_dir).st_dev != os.stat(keep_dir).st_dev:
        raise UsageError(
            f"keep_for_lawa = \"link\" needs the state folder {keep_dir} on the same filesystem as {source_dir}",
            hint="set state_dir on that filesystem, or keep_for_lawa = \"copy\"",
        )


class Retainer:
    def __init__(self, keep_dir: Path, *, mode: str = "link") -> None:
        self.keep_dir = Path(keep_dir)
        self.mode = mode
        self.keep_dir.mkdir(parents=True, exist_ok=True)
        self._warned_copy = False
        remove_orphans(self.keep_dir)  # a retain interrupted by a crash

    def steps(self) -> list[int]:
        return sorted(int(p.name) for p in self.keep_dir.iterdir() if p.name.isdigit())

    def path(self, step: int) -> Path:
        """The retained checkpoint of ``step`` (a folder, or the single file inside it)."""
        folder = self.keep_dir / str(step)
        single = folder / ".single"
        return folder / single.read_text() if single.exists() else folder

    def retain(self, ckpt: Checkpoint, step: int) -> Path:
        dest = self.keep_dir / str(step)
        if dest.exists():
            return self.path(step)
        try:
            with AtomicDir(dest) as tmp:  # links made durable, then renamed into place: never half a checkpoint
                sources = list(ckpt.files)
                if ckpt.path.is_dir():
                    sources += [p for p in ckpt.path.iterdir()
                                if p.name.endswith(".index.json") or p.name in ("trainer_state.json", "zero_to_fp32.py")]
                for src in sources:
                    self._keep(src, tmp / src.name)
                if ckpt.path.is_dir():
                    copy_meta_files(ckpt.path, tmp)
                else:
                    (tmp / ".single").write_text(ckpt.path.name)
        except FileNotFoundError as e:
            raise CheckpointVanishedError("was deleted before ckptavg could keep it", path=e.filename or ckpt.path,
                                          hint="checkpoint rotation; it is skipped") from None
        return self.path(step)

    def _keep(self, src: Path, dst: Path) -> None:
        if self.mode == "link":
            try:
                os.link(src, dst, follow_symlinks=True)
                return
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
                    raise
                if not self._warned_copy:
                    log.warning("cannot hard-link %s into %s (%s); copying instead", src, self.keep_dir, e.strerror)
                    self._warned_copy = True
        shutil.copy2(src, dst)  # keeps the mtime: the trainer's clock for reports

    def release(self, step: int) -> None:
        shutil.rmtree(self.keep_dir / str(step), ignore_errors=True)
