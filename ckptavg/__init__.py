"""ckptavg: averaged weights (EMA, LAWA, SWA, uniform) from training checkpoints, without touching the trainer.

The core library. ``ckptavg.cli``, ``ckptavg.daemon`` and ``ckptavg.evaluators``
build on it; it imports none of them.
"""

from ckptavg._version import __version__
from ckptavg.averaging.average import Average
from ckptavg.averaging.engine import Engine, resolve_device
from ckptavg.averaging.methods import EMA, LAWA, METHODS, SWA, Uniform, make_method
from ckptavg.averaging.rules import Rule, parse_rule
from ckptavg.oneshot import AverageSpec, average_checkpoints, build_averages
from ckptavg.reading.checkpoint import Checkpoint, CheckpointReader, open_checkpoint

__all__ = [
    "__version__",
    "Average",
    "AverageSpec",
    "Checkpoint",
    "CheckpointReader",
    "EMA",
    "Engine",
    "LAWA",
    "METHODS",
    "Rule",
    "SWA",
    "Uniform",
    "average_checkpoints",
    "build_averages",
    "make_method",
    "open_checkpoint",
    "parse_rule",
    "resolve_device",
]
