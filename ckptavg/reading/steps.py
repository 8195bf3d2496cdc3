"""Training steps from checkpoint names.

Recognised: ``checkpoint-9000``, ``step-9000``, ``step_9000``, ``step=9000``,
``epoch=3-step=9000.ckpt``, ``ckpt_step_9000.pth``, ``global_step9000``,
``iter_0009000`` (Megatron). The last component that names a step wins, so
``runs/step-1/checkpoint-500`` is step 500.
"""

from __future__ import annotations

import re
from pathlib import Path

_PATTERNS = [
    re.compile(r"(?:^|[^a-z])step[-_=]?(\d+)(?!.*step)", re.IGNORECASE),
    re.compile(r"^checkpoint[-_](\d+)$", re.IGNORECASE),
    re.compile(r"^iter_(\d+)$", re.IGNORECASE),
    re.compile(r"^(?:ckpt|model|weights)[-_](\d+)$", re.IGNORECASE),
]


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
