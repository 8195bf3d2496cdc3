"""``STATE/eval.json``: the daemon's evaluation settings, for readers of ``metrics.jsonl``.

Written (atomically, replaced whole) by the daemon at start and when it picks the
selection metric itself; read by ``ckptavg report`` to default ``--metric`` and
``--mode``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptavg.errors import MetricsError
from ckptavg.writing.atomic import atomic_write_bytes

__all__ = ["EVAL_FILE", "EvalSettings", "read_eval_settings", "write_eval_settings"]

EVAL_FILE = "eval.json"


@dataclass(frozen=True)
class EvalSettings:
    """The evaluation settings. A reader keeps the values as found (a hand-written file may omit any: ``None``)."""

    metric: str | None = None
    """The metric the best model is selected by; ``None`` until the daemon has seen a first result."""
    mode: str | None = None
    """``"min"`` (lower is better) or ``"max"`` (higher is better); a reader checks it before use."""
    every: int | None = None
    """An evaluation round every this many folds."""
    kind: str | None = None
    """The evaluator kind (``"command"``, ``"python"``...)."""

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "every": self.every, "kind": self.kind}


def write_eval_settings(path: str | Path, settings: EvalSettings) -> None:
    """Replace ``path`` atomically with ``settings`` (indented JSON)."""
    atomic_write_bytes(Path(path), json.dumps(settings.to_json(), indent=1).encode())


def read_eval_settings(path: str | Path) -> EvalSettings | None:
    """The settings in ``path``; ``None`` when there is no such file; :class:`MetricsError` when unreadable."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise MetricsError(f"cannot read the evaluation settings: {e}", path=path,
                           hint="pass --metric and --mode instead") from None
    if not isinstance(data, dict):
        raise MetricsError("expected a JSON object", path=path, hint="pass --metric and --mode instead")
    return EvalSettings(metric=data.get("metric"), mode=data.get("mode"), every=data.get("every"),
                        kind=data.get("kind"))
