"""Ctrl-C as one line and exit 130, at any moment: also while torch (or matplotlib) is importing.

A ``KeyboardInterrupt`` raised inside a third-party import can be swallowed there (numpy's and
torch's start-up code catch broadly), which leaves a half-initialised module and a command that
carries on or fails with a confusing error. :func:`deferred_sigint` holds a SIGINT back while such
imports run and raises it right after; :class:`Interrupted` carries a Ctrl-C past click, whose own
handling would print an empty line first. Standard library only: the console script imports this
before anything else.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["Interrupted", "deferred_sigint"]


class Interrupted(BaseException):  # noqa: N818 - a KeyboardInterrupt under another name, not an error
    """A Ctrl-C on its way to ``ckptavg.cli.main.main``, which prints ``ckptavg: interrupted`` and exits 130."""


@contextlib.contextmanager
def deferred_sigint() -> Iterator[None]:
    """Hold SIGINT back for the body; a SIGINT that came meanwhile is raised as ``KeyboardInterrupt`` after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous in (signal.SIG_IGN, None):  # ignored (a background job), or not ours to touch
        yield
        return
    came: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        came.append(signum)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if came:
        raise KeyboardInterrupt
