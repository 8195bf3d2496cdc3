"""Named points where the test suite injects faults (a crash, a delay, a deleted file) into a real process.

A few moments matter for crash safety and are named here; the code at each calls
:func:`point`. Nothing is installed outside the tests, so every point is a dictionary
lookup that finds nothing. The test suite starts a daemon through its launcher
(``tests/faultinject.py``), which installs the faults a test asks for with
:func:`install` in that process and then runs the CLI: shipped code never reads a
test's environment and never crashes itself on purpose.

Points (``context`` keyword arguments in brackets):

``fold.start`` [step, path, watch]
    the daemon is about to read a queued checkpoint (from its retained copy ``path``);
``state.before-persist`` [generation]
    the daemon is about to save a state generation;
``state.before-manifest`` [generation]
    a generation's accumulators are durable, its manifest (the commit) is not written yet;
``publish.before-rename`` [target]
    a published average is complete in its version folder; ``OUT/<name>`` is not swapped to it yet.
``rank.write`` [rank, world_size, tensor]
    a rank of a distributed one-shot (torchrun) has averaged one of its tensors and is about to write it.
``rank.fold`` [rank, world_size, step]
    a rank of the distributed daemon (torchrun) is about to fold its tensors of the checkpoint ``step``;
``ranks.before-commit`` [rank, world_size, generation]
    every rank's part of a distributed daemon's state generation is durable; rank 0 has not written the
    commit record that makes the generation valid.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["POINTS", "clear", "install", "point"]

POINTS = ("fold.start", "state.before-persist", "state.before-manifest", "publish.before-rename", "rank.write",
          "rank.fold", "ranks.before-commit")

_installed: dict[str, Callable[..., None]] = {}


def install(name: str, action: Callable[..., None]) -> None:
    """Run ``action(**context)`` whenever the code reaches point ``name``."""
    if name not in POINTS:
        raise ValueError(f"unknown hook point {name!r}; known: {', '.join(POINTS)}")
    _installed[name] = action


def clear() -> None:
    _installed.clear()


def point(name: str, **context: Any) -> None:
    """A named moment; does nothing unless a test installed an action for it."""
    action = _installed.get(name)
    if action is not None:
        action(**context)
