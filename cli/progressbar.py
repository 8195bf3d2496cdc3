"""The CLI's rendering of engine progress: a rich progress bar on a terminal, log lines otherwise."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ckptavg.progress import Progress
from ckptavg.reading.checkpoint import Checkpoint


class BarProgress(Progress):
    """Bytes read, GB/s and ETA on stderr."""

    def __init__(self) -> None:
        # rich is imported here, only when a bar is shown: ~0.1 s off every `ckptavg average` start-up
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(
            TextColumn("[bold]averaging[/]"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TimeRemainingColumn(), console=Console(stderr=True), transient=False,
        )
        self._task = None

    def start(self, total_bytes: int, n_checkpoints: int) -> None:
        self._bar.start()
        self._task = self._bar.add_task("average", total=total_bytes)

    def advance(self, nbytes: int) -> None:
        if self._task is not None:
            self._bar.advance(self._task, nbytes)

    def checkpoint_done(self, ckpt: Checkpoint, nbytes: int, seconds: float) -> None:
        pass  # the bar says it all

    def finish(self) -> None:
        self._bar.stop()


@contextlib.contextmanager
def make_progress(show_bar: bool) -> Iterator[Progress]:
    progress: Progress = BarProgress() if show_bar else Progress()
    try:
        yield progress
    finally:
        progress.finish()
