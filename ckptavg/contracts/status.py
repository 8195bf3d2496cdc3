"""``STATE/status.json``: what the daemon is doing, replaced whole after every change.

Written by the daemon (:func:`write_status`, atomically: a reader sees the old
document or the new one), read by ``ckptavg status`` (:func:`read_status`). A
reader tolerates keys it does not know (a newer daemon may add some); a file that
is not a JSON object of this shape is a :class:`~ckptavg.errors.StatusError`
naming the file and what is wrong. An optional section that is ``null`` (or empty)
reads as ``None``.

Sections whose writer lives elsewhere (``last_fold`` from the fold loop, the
evaluation's ``best`` record, ``hub`` from the Hub publisher) are written as
their owner made them; their dataclasses here name what a reader may rely on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ckptavg.errors import StatusError
from ckptavg.writing.atomic import atomic_write_bytes

__all__ = ["STATUS_FILE", "AverageStatus", "BestModel", "EvaluationStatus", "FoldStats", "HubStatus", "StatusDoc",
           "owned_section", "read_status", "write_status"]

STATUS_FILE = "status.json"


class _Shape:
    """Checks one section of a document being read; errors name the file and the key path."""

    def __init__(self, path: Path | None, where: str) -> None:
        self.path = path
        self.where = where

    def error(self, what: str) -> StatusError:
        return StatusError(f"{self.where}: {what}" if self.where else what, path=self.path,
                           hint="the daemon rewrites it at its next change; restart `ckptavg watch` if it is stopped")

    def mapping(self, data: Any) -> dict[str, Any]:
        if not isinstance(data, Mapping):
            raise self.error(f"expected a JSON object, found {_kind(data)}")
        return dict(data)

    def key(self, data: Mapping[str, Any], name: str, check: str | None = None, *, required: bool = False,
            nullable: bool = True, default: Any = None) -> Any:
        """``data[name]``, checked: absent is an error when ``required`` (else ``default``); ``null`` is
        accepted when ``nullable`` and not ``required``; any other value must pass ``check``."""
        if name not in data:
            if required:
                raise self.error(f"no {name!r}")
            return default
        value = data[name]
        if value is None and nullable and not required:
            return None
        ok = {None: True, "str": isinstance(value, str), "int": _is_int(value), "number": _is_number(value),
              "list": isinstance(value, list), "mapping": isinstance(value, Mapping)}[check]
        if not ok:
            raise self.error(f"{name!r} must be {_CHECKS[check]}, found {_kind(value)}")
        return value

    def sub(self, name: str) -> _Shape:
        return _Shape(self.path, f"{self.where}.{name}" if self.where else name)


_CHECKS = {"str": "a string", "int": "an integer", "number": "a number", "list": "a list", "mapping": "a JSON object"}


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if _is_number(value) else type(value).__name__)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class AverageStatus:
    """One average the daemon keeps (``averages[name]``)."""

    method: str
    """The method's name (``"ema"``, ``"lawa"``...)."""
    options: dict[str, Any]
    """The method's resolved options."""
    folded: int
    """How many checkpoints it has folded."""
    last_step: int | None
    """The newest step it has folded; ``None`` before the first."""

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "options": self.options, "folded": self.folded, "last_step": self.last_step}

    @classmethod
    def from_json(cls, data: Any, shape: _Shape) -> AverageStatus:
        d = shape.mapping(data)
        return cls(method=shape.key(d, "method", "str", required=True),
                   options=shape.key(d, "options", "mapping") or {},
                   folded=shape.key(d, "folded", "int", required=True), last_step=shape.key(d, "last_step", "int"))


@dataclass(frozen=True)
class FoldStats:
    """The last fold (``last_fold``; written by the fold loop)."""

    step: int
    """The step folded."""
    bytes: float
    """Bytes read to fold it."""
    seconds: float
    """How long it took."""
    gbps: float | None
    """Bytes / seconds / 1e9; ``None`` when the time was 0."""
    data: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The section as written (kept whole, with keys this version does not know)."""

    def to_json(self) -> dict[str, Any]:
        return dict(self.data)

    @classmethod
    def from_json(cls, data: Any, shape: _Shape) -> FoldStats:
        d = shape.mapping(data)
        return cls(step=shape.key(d, "step", "int", required=True),
                   bytes=shape.key(d, "bytes", "number", required=True),
                   seconds=shape.key(d, "seconds", "number", required=True), gbps=shape.key(d, "gbps", "number"),
                   data=d)


@dataclass(frozen=True)
class BestModel:
    """The best model so far (``evaluation.best``; the daemon's selection record, also in ``eval/best.json``).

    The record holds more (``kind``, ``method``, ``options``, ``round``, ``metrics``,
    ``raw_metrics_same_step``, ``version``, ``steps_folded``, ``published_at``,
    ``folder``); those travel in :attr:`data`.
    """

    candidate: str
    """The candidate's name (``"raw"`` or an average's name)."""
    step: int
    """The training step it was evaluated at."""
    metric: str
    """The selection metric."""
    value: float
    """Its value of the selection metric."""
    mode: str
    """``"min"`` or ``"max"``."""
    data: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The record as written (kept whole)."""

    def to_json(self) -> dict[str, Any]:
        return dict(self.data)

    @classmethod
    def from_json(cls, data: Any, shape: _Shape) -> BestModel:
        d = shape.mapping(data)
        return cls(candidate=shape.key(d, "candidate", "str", required=True),
                   step=shape.key(d, "step", "int", required=True), metric=shape.key(d, "metric", "str", required=True),
                   value=shape.key(d, "value", "number", required=True),
                   mode=shape.key(d, "mode", "str", required=True), data=d)


@dataclass(frozen=True)
class EvaluationStatus:
    """Where evaluation stands (``evaluation``; ``null`` without an evaluator)."""

    kind: str
    """The evaluator kind."""
    metric: str | None = None
    """The selection metric; ``None`` until known."""
    mode: str | None = None
    """``"min"`` or ``"max"``."""
    rounds: int = 0
    """Evaluation rounds started so far (across restarts)."""
    last_evaluated_step: int | None = None
    """The newest step fully evaluated."""
    running_step: int | None = None
    """The step being evaluated now, if any."""
    pending_step: int | None = None
    """The step waiting for the evaluator, if any."""
    skipped_rounds: int = 0
    """Rounds dropped because a newer one replaced them while the evaluator was busy."""
    failures: int = 0
    """Evaluations that failed."""
    last_error: str | None = None
    """The last evaluation error."""
    best: BestModel | None = None
    """The best model so far."""

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "metric": self.metric, "mode": self.mode, "rounds": self.rounds,
                "last_evaluated_step": self.last_evaluated_step, "running_step": self.running_step,
                "pending_step": self.pending_step, "skipped_rounds": self.skipped_rounds, "failures": self.failures,
                "last_error": self.last_error, "best": self.best.to_json() if self.best is not None else None}

    @classmethod
    def from_json(cls, data: Any, shape: _Shape) -> EvaluationStatus:
        d = shape.mapping(data)
        best = d.get("best")
        return cls(kind=shape.key(d, "kind", "str", required=True), metric=shape.key(d, "metric"),
                   mode=shape.key(d, "mode"), rounds=shape.key(d, "rounds", "int", default=0),
                   last_evaluated_step=shape.key(d, "last_evaluated_step"), running_step=shape.key(d, "running_step"),
                   pending_step=shape.key(d, "pending_step"),
                   skipped_rounds=shape.key(d, "skipped_rounds", "int", default=0),
                   failures=shape.key(d, "failures", "int", default=0), last_error=shape.key(d, "last_error"),
                   best=BestModel.from_json(best, shape.sub("best")) if best else None)


@dataclass(frozen=True)
class HubStatus:
    """Where publishing to the Hub stands (``hub``; ``null`` without a Hub target; written by the publisher)."""

    repo: str | None = None
    """The repository id."""
    revision: str | None = None
    """The branch (``None``: main)."""
    state: str | None = None
    """The publisher's state (``"idle"``, ``"uploading"``...)."""
    last_commit: str | None = None
    """The last commit made."""
    last_step: int | None = None
    """The step of the last commit."""
    pending_step: int | None = None
    """The step waiting or being uploaded, if any."""
    last_error: str | None = None
    """The last upload error."""
    data: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The section as written (kept whole: e.g. ``attempts``)."""

    def to_json(self) -> dict[str, Any]:
        return dict(self.data)

    @classmethod
    def from_json(cls, data: Any, shape: _Shape) -> HubStatus:
        d = shape.mapping(data)
        return cls(repo=d.get("repo"), revision=d.get("revision"), state=d.get("state"),
                   last_commit=d.get("last_commit"), last_step=d.get("last_step"), pending_step=d.get("pending_step"),
                   last_error=d.get("last_error"), data=d)


@dataclass(frozen=True)
class StatusDoc:
    """The whole ``status.json`` document."""

    pid: int
    """The daemon's process id."""
    state: str
    """``"starting"``, ``"watching"``, ``"folding"``, ``"stopped"``..."""
    watch: str
    """The folder watched for checkpoints."""
    output: str
    """The output folder (averages, ``best``)."""
    watcher: str
    """How the folder is watched (``"inotify"``, ``"polling"``)."""
    updated: float
    """When this document was written (Unix time, the daemon's clock)."""
    averages: dict[str, AverageStatus]
    """Each average, by name, in configuration order."""
    folding_step: int | None = None
    """The step being folded now, if any."""
    last_folded_step: int | None = None
    """The newest step folded."""
    newest_seen_step: int | None = None
    """The newest checkpoint step seen in the watched folder."""
    lag_steps: int | None = None
    """``newest_seen_step - last_folded_step`` when both are known."""
    queued: list[int] = field(default_factory=list)
    """Steps waiting to be folded."""
    skipped: list[int] = field(default_factory=list)
    """Steps skipped (unusable checkpoints)."""
    last_error: str | None = None
    """The last fold error."""
    last_fold: FoldStats | None = None
    """The last fold's size and speed."""
    evaluation: EvaluationStatus | None = None
    """Evaluation, when configured."""
    hub: HubStatus | None = None
    """Hub publishing, when configured."""
    degraded: str | None = None
    """Why the output (state or published folders) cannot be written now; saving and publishing are retried."""
    halted: str | None = None
    """Why folding stopped (a rewind beyond the kept generations with ``rewind_too_far = "stop"``)."""
    rewinds: list[dict[str, Any]] = field(default_factory=list)
    """Each trainer rewind handled: ``at`` (the re-written step), ``back_to`` (the step the averages were
    rolled back to; null: empty), ``abandoned`` (steps of the old trajectory dropped), ``why``, ``time``."""
    missed: list[dict[str, Any]] = field(default_factory=list)
    """Checkpoints that came and went unseen: ``after``, ``before`` (the folded steps around the gap; ``after``
    null: before the first), ``every`` (the save interval), ``source`` (``save_steps`` or ``cadence``), ``count``."""
    data: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    """The document as read (``None`` for one built to be written)."""

    def to_json(self) -> dict[str, Any]:
        """The document: as read (every key kept), or as the daemon writes it (this key order)."""
        if self.data is not None:
            return dict(self.data)
        return {"pid": self.pid, "state": self.state, "watch": self.watch, "output": self.output,
                "watcher": self.watcher, "updated": self.updated,
                "averages": {name: a.to_json() for name, a in self.averages.items()},
                "folding_step": self.folding_step, "last_folded_step": self.last_folded_step,
                "newest_seen_step": self.newest_seen_step, "lag_steps": self.lag_steps, "queued": self.queued,
                "skipped": self.skipped, "last_error": self.last_error,
                "last_fold": self.last_fold.to_json() if self.last_fold is not None else None,
                "evaluation": self.evaluation.to_json() if self.evaluation is not None else None,
                "hub": self.hub.to_json() if self.hub is not None else None,
                "degraded": self.degraded, "halted": self.halted, "rewinds": self.rewinds, "missed": self.missed}

    @classmethod
    def from_json(cls, data: Any, path: Path | None = None) -> StatusDoc:
        """Validate a parsed document; :class:`StatusError` naming ``path`` and the bad key when it is unusable."""
        shape = _Shape(path, "")
        d = shape.mapping(data)
        averages = shape.key(d, "averages", "mapping", required=True)
        sub = shape.sub("averages")
        fold, ev, hub = d.get("last_fold"), d.get("evaluation"), d.get("hub")
        return cls(
            pid=shape.key(d, "pid", "int", required=True), state=shape.key(d, "state", "str", required=True),
            watch=shape.key(d, "watch", "str", required=True), output=shape.key(d, "output", "str", required=True),
            watcher=shape.key(d, "watcher", "str", default="?"),
            updated=shape.key(d, "updated", "number", nullable=False, default=0),
            averages={name: AverageStatus.from_json(a, sub.sub(name)) for name, a in averages.items()},
            folding_step=shape.key(d, "folding_step"), last_folded_step=shape.key(d, "last_folded_step"),
            newest_seen_step=shape.key(d, "newest_seen_step"), lag_steps=shape.key(d, "lag_steps"),
            queued=shape.key(d, "queued", "list", nullable=False, default=[]),
            skipped=shape.key(d, "skipped", "list", default=[]),
            last_error=shape.key(d, "last_error"),
            last_fold=FoldStats.from_json(fold, shape.sub("last_fold")) if fold else None,
            evaluation=EvaluationStatus.from_json(ev, shape.sub("evaluation")) if ev else None,
            hub=HubStatus.from_json(hub, shape.sub("hub")) if hub else None,
            degraded=shape.key(d, "degraded", "str"), halted=shape.key(d, "halted", "str"),
            rewinds=shape.key(d, "rewinds", "list", default=[]) or [],
            missed=shape.key(d, "missed", "list", default=[]) or [],
            data=d)


def owned_section(kind: type, data: Mapping[str, Any]) -> Any:
    """For the writer: a section made by another owner (``FoldStats``, ``BestModel``, ``HubStatus``) from the
    mapping it made, written back whole and unchecked (a reader checks it)."""
    names = [f.name for f in fields(kind) if f.name != "data"]
    return kind(**{n: data.get(n) for n in names}, data=dict(data))


def write_status(path: str | Path, doc: StatusDoc) -> None:
    """Replace ``path`` atomically with ``doc`` (indented JSON)."""
    atomic_write_bytes(Path(path), json.dumps(doc.to_json(), indent=1).encode())


def read_status(path: str | Path) -> StatusDoc:
    """The document in ``path``. ``FileNotFoundError`` when there is none (no daemon ever ran there);
    :class:`StatusError` naming the file when it cannot be read, is not JSON, or is not of this shape."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:  # ValueError: not UTF-8
        raise StatusError(f"cannot read: {getattr(e, 'strerror', None) or e}", path=path) from None
    try:
        data = json.loads(text)
    except ValueError as e:
        what = "is empty" if not text.strip() else f"is not valid JSON ({getattr(e, 'msg', e)})"
        raise StatusError(f"{what}; it may be truncated", path=path,
                          hint="the daemon rewrites it at its next change; restart `ckptavg watch` if it is stopped") \
            from None
    return StatusDoc.from_json(data, path)
