"""Progress reporting through a callback object; the CLI renders it, the daemon logs it."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ckptavg.units import format_bytes

if TYPE_CHECKING:
    from ckptavg.reading.checkpoint import Checkpoint

log = logging.getLogger(__name__)

__all__ = ["Progress"]


class Progress:
    """Receives progress events. The default logs one INFO line per checkpoint."""

    def start(self, total_bytes: int, n_checkpoints: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def checkpoint_done(self, ckpt: Checkpoint, nbytes: int, seconds: float) -> None:
        rate = nbytes / seconds / 1e9 if seconds > 0 else float("inf")
        log.info("read %s: %s in %.2f s (%.2f GB/s)", ckpt.label, format_bytes(nbytes), seconds, rate)

    def finish(self) -> None:
        pass
