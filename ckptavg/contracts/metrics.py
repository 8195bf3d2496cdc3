"""``STATE/metrics.jsonl``: one JSON object per candidate per evaluation round.

Written by the daemon's evaluation worker (:func:`append_row`, one line per
evaluation, fsynced), read by ``ckptavg report`` (:func:`read_rows`). The file
only grows; a daemon stopped mid-write can leave a truncated last line, which a
reader skips with a warning. Any other bad line is an error naming the file and
the line.

A row holds either ``metrics`` (the evaluation succeeded) or ``error`` (it
failed), never both as written by the daemon.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptavg.errors import MetricsError, UsageError

log = logging.getLogger(__name__)

__all__ = ["METRICS_FILE", "NO_METRICS_HINT", "MetricsRow", "append_row", "is_better", "read_rows"]

METRICS_FILE = "metrics.jsonl"
NO_METRICS_HINT = ("the daemon writes OUT/.ckptavg/metrics.jsonl only when it runs with an evaluator, one line "
                   "per candidate every eval_every folds; pass that OUT folder or the file itself")


def is_better(value: float, best: float | None, mode: str) -> bool:
    """Is ``value`` strictly better than ``best`` under ``mode`` ("min": lower is better, "max": higher)?
    Anything beats no value (``best is None``)."""
    return best is None or (value < best if mode == "min" else value > best)


@dataclass(frozen=True)
class MetricsRow:
    """One line of ``metrics.jsonl``: one candidate evaluated in one round.

    Fields are written in this order; ``metrics`` and ``error`` only when set.
    A reader validates ``candidate``, ``step``, ``wall_time`` and ``metrics``/``error``;
    the other fields are kept as found (a hand-written file may omit them: ``None``).
    """

    step: int
    """The training step evaluated (the newest folded checkpoint's step)."""
    candidate: str
    """The candidate's name: ``"raw"`` for the newest raw checkpoint, else the average's name."""
    round: int | None = None
    """The evaluation round (1, 2, ...; counted across restarts)."""
    written_at: float | None = None
    """When the trainer wrote that checkpoint (Unix time, the trainer's clock), if known."""
    wall_time: float | None = None
    """Seconds since the run's first checkpoint was written (the trainer's clock), if known."""
    kind: str | None = None
    """``"raw"`` or ``"average"``."""
    method: str | None = None
    """The averaging method (``"ema"``, ``"lawa"``...; ``None`` or ``"raw"`` for the raw checkpoint)."""
    options: dict[str, Any] | None = None
    """The method's options, as the average resolved them."""
    evaluator: str | None = None
    """Which evaluator scored it (its label, e.g. ``python:pkg.mod:func``)."""
    metrics: dict[str, float] | None = None
    """Metric name to value, exactly as the evaluator returned them; absent when the evaluation failed."""
    error: str | None = None
    """Why the evaluation failed (one line); absent when it succeeded."""
    evaluated_at: float | None = None
    """When the evaluation started (Unix time, the daemon's clock)."""
    eval_seconds: float | None = None
    """How long the evaluation took, in seconds (4 decimals)."""

    @property
    def failed(self) -> bool:
        """The evaluation ended with an error and has no metrics."""
        return self.error is not None and self.metrics is None

    def to_json(self) -> dict[str, Any]:
        """The JSON object as the daemon writes it (this key order)."""
        out: dict[str, Any] = {"round": self.round, "step": self.step, "written_at": self.written_at,
                               "wall_time": self.wall_time, "candidate": self.candidate, "kind": self.kind,
                               "method": self.method, "options": self.options, "evaluator": self.evaluator}
        if self.metrics is not None:
            out["metrics"] = self.metrics
        if self.error is not None:
            out["error"] = self.error
        out["evaluated_at"] = self.evaluated_at
        out["eval_seconds"] = self.eval_seconds
        return out

    @classmethod
    def from_json(cls, record: Any, path: Path, lineno: int) -> MetricsRow:
        """Validate one parsed line; :class:`MetricsError` naming the file and line when it is unusable."""

        def bad(what: str) -> MetricsError:
            return MetricsError(f"line {lineno}: {what}", path=path, hint="fix or delete that line")

        if not isinstance(record, dict):
            raise bad(f"expected a JSON object, found {type(record).__name__}")
        if not isinstance(record.get("candidate"), str) or not record["candidate"]:
            raise bad("no \"candidate\" name")
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise bad(f"\"step\" must be an integer, found {step!r}")
        wall = record.get("wall_time")
        if wall is not None and not _is_number(wall):
            raise bad(f"\"wall_time\" must be a number or null, found {wall!r}")
        has_error = "error" in record
        if not (has_error and "metrics" not in record):
            metrics = record.get("metrics")
            if not isinstance(metrics, dict):
                raise bad("neither \"metrics\" (an object) nor \"error\"")
            for name, value in metrics.items():
                if not _is_number(value):
                    raise bad(f"metric {name!r} is not a number: {value!r}")
        return cls(step=step, candidate=record["candidate"], round=record.get("round"),
                   written_at=record.get("written_at"), wall_time=wall, kind=record.get("kind"),
                   method=record.get("method"), options=record.get("options"), evaluator=record.get("evaluator"),
                   metrics=record.get("metrics"), error=str(record["error"]) if has_error else None,
                   evaluated_at=record.get("evaluated_at"), eval_seconds=record.get("eval_seconds"))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def append_row(path: str | Path, row: MetricsRow) -> None:
    """Append ``row`` as one JSON line (a single ``write`` in append mode) and fsync the file."""
    line = (json.dumps(row.to_json(), sort_keys=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_rows(path: str | Path) -> list[MetricsRow]:
    """The rows of a ``metrics.jsonl`` file, in file order.

    A last line that does not parse (the daemon was stopped mid-write) is
    skipped with a warning; any other bad line is a :class:`MetricsError`
    naming the file and the line number. A missing file is a :class:`UsageError`.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        raise UsageError(f"no {METRICS_FILE} here", path=path, hint=NO_METRICS_HINT) from None
    except OSError as e:
        raise MetricsError(f"cannot read: {e.strerror or e}", path=path) from None
    numbered = [(i + 1, line) for i, line in enumerate(text.split("\n")) if line.strip()]
    rows = []
    for k, (lineno, line) in enumerate(numbered):
        try:
            record = json.loads(line)
        except ValueError as e:
            if k == len(numbered) - 1:
                log.warning("%s: ignoring line %d: it does not parse (%s); the daemon was probably stopped "
                            "while writing it", path, lineno, getattr(e, "msg", e))
                break
            raise MetricsError(f"line {lineno} is not valid JSON ({getattr(e, 'msg', e)})", path=path,
                               hint="fix or delete that line") from None
        rows.append(MetricsRow.from_json(record, path, lineno))
    return rows
