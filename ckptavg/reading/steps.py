"""Training steps from checkpoint names.

Recognised: ``checkpoint-9000``, ``step-9000``, ``step_9000``, ``step=9000``,
``epoch=3-step=9000.ckpt``, ``ckpt_step_9000.pth``, ``global_step9000``,
``iter_0009000`` (Megatron), fairseq's ``checkpoint_<E>_<U>.pt`` (U updates). The last
component that names a step wins, so ``runs/step-1/checkpoint-500`` is step 500.

fairseq's epoch checkpoints ``checkpoint<E>.pt`` name an epoch, not a step
(:func:`epoch_from_name`): their step is the ``num_updates`` recorded inside. accelerate's
automatic ``checkpoint_<i>`` counts saves, not steps; the checkpoint reader says so where it
knows the folder is accelerate's.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

_PATTERNS = [
    re.compile(r"(?:^|[^a-z])step[-_=]?(\d+)(?!.*step)", re.IGNORECASE),
    re.compile(r"^checkpoint_\d+_(\d+)$"),  # fairseq: checkpoint_<epoch>_<updates>
    re.compile(r"^checkpoint[-_](\d+)$", re.IGNORECASE),
    re.compile(r"^iter_(\d+)$", re.IGNORECASE),
    re.compile(r"^(?:ckpt|model|weights)[-_](\d+)$", re.IGNORECASE),
]
_FAIRSEQ_EPOCH = re.compile(r"^checkpoint(\d+)$")
_FAIRSEQ_UPDATE = re.compile(r"^checkpoint_(\d+)_(\d+)$")


def _stem(name: str) -> str:
    for suffix in (".safetensors", ".ckpt", ".pth", ".pt", ".bin"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def step_from_name(path: str | Path) -> int | None:
    """The step a path names, or None. Looks at the last components first."""
    for part in reversed(Path(path).parts[-3:]):
        stem = _stem(part)
        for pattern in _PATTERNS:
            m = pattern.search(stem)
            if m:
                return int(m.group(1))
    return None


def epoch_from_name(path: str | Path) -> int | None:
    """The epoch of a fairseq epoch checkpoint ``checkpoint<E>.pt``, or None."""
    name = Path(path).name
    m = _FAIRSEQ_EPOCH.match(_stem(name)) if name.endswith(".pt") else None
    return int(m.group(1)) if m else None


def checkpoint_kind(path: str | Path) -> str | None:
    """fairseq's two kinds: ``"epoch"`` (``checkpoint<E>.pt``) or ``"update"`` (``checkpoint_<E>_<U>.pt``); else None."""
    if epoch_from_name(path) is not None:
        return "epoch"
    name = Path(path).name
    return "update" if name.endswith(".pt") and _FAIRSEQ_UPDATE.match(_stem(name)) else None


def order_key(path: str | Path) -> tuple[int, float, float] | None:
    """Where a checkpoint name sits in training order, or None when it names no step.

    fairseq names order on (epoch, updates): an update checkpoint ``checkpoint_<E>_<U>`` is written
    mid-epoch, before the end of epoch E, so the epoch checkpoint ``checkpoint<E>`` follows every update
    checkpoint of epoch E and precedes those of epoch E+1, without opening either file."""
    name = Path(path).name
    if (epoch := epoch_from_name(name)) is not None:
        return (1, epoch, math.inf)
    if name.endswith(".pt") and (m := _FAIRSEQ_UPDATE.match(_stem(name))):
        return (1, int(m.group(1)), int(m.group(2)))
    step = step_from_name(name)
    return None if step is None else (0, step, 0)
