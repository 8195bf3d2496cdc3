"""ckptavg: averaged weights (EMA, LAWA, SWA, uniform) from training checkpoints, without touching the trainer.

The core library. ``ckptavg.cli``, ``ckptavg.daemon`` and ``ckptavg.evaluators``
build on it; it imports none of them.
"""

__version__ = "0.1.0"

from .average import Average  # noqa: E402
from .checkpoint import Checkpoint, CheckpointReader, open_checkpoint  # noqa: E402
from .engine import Engine, resolve_device  # noqa: E402
from .methods import EMA, LAWA, METHODS, SWA, Uniform, make_method  # noqa: E402
from .oneshot import AverageSpec, average_checkpoints, build_averages  # noqa: E402
from .rules import Rule, parse_rule  # noqa: E402

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
