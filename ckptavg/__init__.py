"""ckptavg: averaged weights (EMA, LAWA, SWA, uniform) from training checkpoints, without touching the trainer.

The core library. ``ckptavg.cli``, ``ckptavg.daemon`` and ``ckptavg.evaluators``
build on it; it imports none of them.

The public names are imported on first use (PEP 562), so that ``import ckptavg.cli.main`` — the
``ckptavg`` command's entry point — loads no torch before the CLI's error handling is in place: a
Ctrl-C while torch loads is then one line and exit 130, not a traceback.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ckptavg._version import __version__

if TYPE_CHECKING:
    from ckptavg.averaging.average import Average
    from ckptavg.averaging.engine import Engine, resolve_device
    from ckptavg.averaging.methods import EMA, LAWA, METHODS, SWA, PowerEMA, Uniform, make_method
    from ckptavg.averaging.rules import Rule, parse_rule
    from ckptavg.oneshot import AverageSpec, average_checkpoints, build_averages
    from ckptavg.reading.checkpoint import Checkpoint, CheckpointReader, open_checkpoint

_LAZY: dict[str, str] = {
    "Average": "ckptavg.averaging.average",
    "Engine": "ckptavg.averaging.engine",
    "resolve_device": "ckptavg.averaging.engine",
    "EMA": "ckptavg.averaging.methods",
    "LAWA": "ckptavg.averaging.methods",
    "METHODS": "ckptavg.averaging.methods",
    "SWA": "ckptavg.averaging.methods",
    "PowerEMA": "ckptavg.averaging.methods",
    "Uniform": "ckptavg.averaging.methods",
    "make_method": "ckptavg.averaging.methods",
    "Rule": "ckptavg.averaging.rules",
    "parse_rule": "ckptavg.averaging.rules",
    "AverageSpec": "ckptavg.oneshot",
    "average_checkpoints": "ckptavg.oneshot",
    "build_averages": "ckptavg.oneshot",
    "Checkpoint": "ckptavg.reading.checkpoint",
    "CheckpointReader": "ckptavg.reading.checkpoint",
    "open_checkpoint": "ckptavg.reading.checkpoint",
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ckptavg' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
