"""Post-hoc sweeps of averaging horizons: many averages of one run's checkpoints from one read of each.

``ckptavg sweep`` answers "which average is best?" after (or during) a run. A *grid*
(``ema:100,200,500``, ``lawa:3,5,10``, ``swa:START,...``, ``uniform:LAST_N,...``) names averages
through the method registry: for a method with a ``main_option`` the values are that option's
(EMA half-life, LAWA window, SWA start step, and any method registered later, e.g.
``power-ema:SIGMA``); for a method without one (``uniform``) a value ``N`` is "over the newest ``N``
checkpoints". Every average of the grid is folded in one pass of the one-shot
(:func:`~ckptavg.oneshot.average_checkpoints` with several averages): each checkpoint tensor is
read once and folded into all of them; LAWA's leaving members come from the engine's kept copy of
the tensor piece (tensor-major) instead of a second read; averages that accept only later
checkpoints (SWA's start, the newest-``N`` means) simply skip the earlier ones of the same read.
A sweep's time is its arithmetic (its one read mostly waits on storage), so ``ckptavg sweep`` gives it
every core (``--threads``, default all; ``ckptavg average`` leaves one to the reader). The averages of a
tensor piece are also independent: the engine's fold workers (``--fold-workers``) can each fold their share
of them while the piece is in cache, with the same operations as one thread (the bits do not change); on
the machines measured, one fold thread with every core on each operation was quicker (the per-piece
bookkeeping in Python holds the interpreter lock).
Pickle inputs fold checkpoint-major into long-lived accumulators, through the memory budget and the
disk store when they do not fit.

The core does not evaluate: the caller (``ckptavg.cli.sweep``, where evaluators and the daemon's
``Evaluation`` are importable) scores each :class:`Entry` and hands the metrics back to
:func:`rank`, which builds the :class:`SweepReport` (table rows, JSON, CSV, the plot, and whether
any average beat the best raw checkpoint).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ckptavg.averaging.average import Average
from ckptavg.averaging.engine import Engine
from ckptavg.averaging.methods import make_method, method_class
from ckptavg.contracts.metrics import is_better
from ckptavg.errors import EvaluationError, OptionError, StepError, UsageError
from ckptavg.oneshot import AverageSpec, Result, average_checkpoints, build_averages
from ckptavg.progress import Progress
from ckptavg.reading.checkpoint import Checkpoint
from ckptavg.writing.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

__all__ = ["LAST", "NOT_HELPED", "Entry", "GridPoint", "SweepFold", "SweepReport", "available_cpus", "average_entries", "fold_grid",
           "grid_averages", "parse_grid", "rank", "raw_entries"]

LAST = "last"  # the option swept by a method without a main option: the newest N checkpoints
NOT_HELPED = "averaging did not help on this run"


@dataclass(frozen=True)
class GridPoint:
    """One average of a grid: a registry method and the value of the option swept."""

    method: str
    option: str  # the method's main option (``half_life``, ``window``, ``start_step``, ...) or LAST
    horizon: float | int
    name: str  # the average's name and output folder: ema-100, lawa-5, swa-600, uniform-last4

    def spec(self) -> AverageSpec:
        options = {} if self.option == LAST else {self.option: self.horizon}
        return AverageSpec(self.method, options, name=self.name)


def parse_grid(texts: Sequence[str]) -> list[GridPoint]:
    """Grid points from ``METHOD:V1,V2,...`` texts, built from the method registry (so a method registered
    later joins the sweep with no change here). Bad names and values are :class:`UsageError` naming ``--grid``."""
    points: list[GridPoint] = []
    for text in texts:
        method, sep, values = (part.strip() for part in str(text).partition(":"))
        cls = method_class(method)
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not items:
            what = f"{cls.main_option} values" if cls.main_option else "numbers of newest checkpoints"
            raise UsageError(f"--grid {text!r}: expected {method}:V1,V2,... ({what}), e.g. "
                             f"{method}:{'100,200,500' if cls.main_option else '3,5,10'}")
        for item in items:
            if cls.main_option is not None:
                value = cls.param(cls.main_option).parse_text(item, method=method)
                try:
                    name = make_method(method, **{cls.main_option: value}).label()
                except OptionError as e:
                    raise UsageError(f"--grid {text!r}: {e}",
                                     hint=f"method {method} needs more than its {cls.main_option} to be swept") from None
                points.append(GridPoint(method, cls.main_option, value, name))
            else:
                try:
                    n = int(item)
                except ValueError:
                    n = 0
                if n < 1 or str(n) != item.lstrip("+"):
                    raise UsageError(f"--grid {text!r}: {item!r} is not a positive number of newest checkpoints")
                points.append(GridPoint(method, LAST, n, f"{method}-last{n}"))
    names = [p.name for p in points]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UsageError(f"--grid names the average {dup[0]} twice; give each value once")
    if not points:
        raise UsageError("give at least one --grid METHOD:V1,V2,... (e.g. --grid ema:100,200,500 --grid lawa:3,5,10)")
    return points


def _newest_only(avg: Average, ckpts: Sequence[Checkpoint], n: int) -> None:
    """Restrict ``avg`` to the newest ``n`` of ``ckpts`` (by step), over the same read as the others."""
    if any(c.step is None for c in ckpts):
        bad = next(c for c in ckpts if c.step is None)
        raise StepError(f"{avg.name} needs the checkpoints' steps to take the newest {n}, and this one has none",
                        path=bad.path, hint="name checkpoints like checkpoint-<N> or step-<N>")
    steps = sorted(c.step for c in ckpts)  # type: ignore[type-var]
    if n > len(steps):
        log.warning("%s: the run has %d checkpoint(s); the result is the mean of all %d", avg.name, len(steps), len(steps))
    first = steps[-min(n, len(steps))]
    base_accepts, method = avg.method.accepts, avg.method
    method.accepts = lambda step: step is not None and step >= first and base_accepts(step)  # type: ignore[method-assign]
    method.needs_steps = lambda: True  # type: ignore[method-assign]


def grid_averages(points: Sequence[GridPoint], ckpts: Sequence[Checkpoint], **kw: Any) -> list[Average]:
    """The :class:`Average` of every grid point over ``ckpts`` (``kw``: :func:`build_averages`'s options)."""
    averages = build_averages([p.spec() for p in points], **kw)
    for p, avg in zip(points, averages):
        if p.option == LAST:
            _newest_only(avg, ckpts, int(p.horizon))
    return averages


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity, as a container or ``taskset`` sets it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


# a piece's accumulators of every average together: about a last-level cache. Measured at 12 averages of
# 5 x 256 MB bf16 on 2 vCPUs (32 MiB L3), pieces of 512K elements folded in 0.7-0.75x the time of 128K
# (8 MiB: fewer, longer torch calls), 1-2M as quick again, 4M slower
PIECE_CACHE_BYTES = 32 << 20


def piece_elems_for(averages: Sequence[Average], piece_elems: int) -> int:
    """Tensor-major piece size for many averages at once: small enough that one piece's accumulators of all
    of them stay in the last-level cache across the inputs (as one average's do at the default piece), at
    least 64K elements so per-piece overheads stay small. Every method is elementwise: the bits do not
    depend on it."""
    per_elem = sum(len(a.method.buffers) * a.accum_dtype.itemsize for a in averages)
    fit = PIECE_CACHE_BYTES // max(1, per_elem)
    return max(1 << 16, min(piece_elems, 1 << max(0, fit.bit_length() - 1)))


@dataclass
class SweepFold:
    """What the one pass produced: one model folder per grid point, and the read accounting."""

    points: list[GridPoint]
    averages: list[Average]
    outputs: dict[str, Path]
    result: Result
    bytes_read: dict[Path, int]  # per file, every byte the engine read (new reads and re-reads)
    checkpoint_bytes: dict[Path, int]  # per file, the tensor bytes the checkpoints hold

    @property
    def read_ratio(self) -> float:
        """Bytes read over the checkpoints' tensor bytes: 1.0 when every byte was read exactly once."""
        total = sum(self.checkpoint_bytes.values())
        return sum(self.bytes_read.values()) / total if total else 0.0


def checkpoint_bytes(ckpts: Sequence[Checkpoint]) -> dict[Path, int]:
    out: dict[Path, int] = {}
    for c in ckpts:
        for ref in c.tensors.values():
            out[ref.file] = out.get(ref.file, 0) + ref.nbytes
    return out


def fold_grid(
    ckpts: Sequence[Checkpoint],
    points: Sequence[GridPoint],
    folder: Path,
    *,
    engine: Engine | None = None,
    accum_dtype: torch.dtype = torch.float32,
    memory_budget: int | None = None,
    scratch_dir: Path | None = None,
    protected: Sequence[Path] = (),
    max_shard_bytes: int | None = None,
    progress: Progress | None = None,
    force: bool = False,
) -> SweepFold:
    """Fold every average of ``points`` from one read of ``ckpts`` into ``folder/<name>/`` (one model folder
    each, the same bits ``ckptavg average`` writes for that average alone)."""
    if not ckpts:
        raise UsageError("no checkpoints to sweep")
    own = engine is None
    engine = engine or Engine(device="cpu", progress=progress)
    try:
        averages = grid_averages(points, ckpts, accum_dtype=accum_dtype, device=engine.device,
                                 memory_budget=memory_budget)
        before = engine.bytes_read()
        kw: dict[str, Any] = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
        pieces = engine.piece_elems
        engine.piece_elems = piece_elems_for(averages, pieces)
        try:
            result = average_checkpoints(ckpts, averages, Path(folder), engine=engine, subfolders=True, force=force,
                                         protected=protected, progress=progress, memory_budget=memory_budget,
                                         scratch_dir=scratch_dir, **kw)
        finally:
            engine.piece_elems = pieces
        after = engine.bytes_read()
        read = {p: n - before.get(p, 0) for p, n in after.items() if n - before.get(p, 0)}
    finally:
        if own:
            engine.close()
    fold = SweepFold(list(points), averages, dict(result.outputs), result, read, checkpoint_bytes(ckpts))
    log.info("swept %d averages over %d checkpoint(s) in %.2f s; read %.2fx the checkpoints' bytes",
             len(points), len(ckpts), result.seconds, fold.read_ratio)
    return fold


# -- evaluation results --------------------------------------------------------------------------
@dataclass
class Entry:
    """One candidate of a sweep: a raw checkpoint (the baseline) or one average of the grid."""

    name: str  # "raw-<step>" or the average's name
    kind: str  # "raw" | "average"
    step: int | None  # the raw checkpoint's step; an average's newest folded step
    model_dir: Path
    method: str | None = None
    option: str | None = None
    horizon: float | int | None = None
    steps: list[int | None] = field(default_factory=list)  # the steps in the final average (raw: its own)
    metrics: dict[str, float] | None = None
    error: str | None = None

    def value(self, metric: str) -> float | None:
        return None if self.metrics is None else self.metrics.get(metric)

    def row(self, metric: str) -> dict[str, Any]:
        return {"candidate": self.name, "kind": self.kind, "method": self.method, "option": self.option,
                "horizon": self.horizon, "step": self.step, "metric": metric, "value": self.value(metric),
                "metrics": self.metrics, "error": self.error}


def raw_entries(ckpts: Sequence[Checkpoint]) -> list[Entry]:
    """The baseline: one entry per raw checkpoint (named ``raw-<step>``, or ``raw-<position>`` without a step)."""
    return [Entry(f"raw-{c.step if c.step is not None else i}", "raw", c.step, c.path, steps=[c.step])
            for i, c in enumerate(ckpts)]


def average_entries(fold: SweepFold) -> list[Entry]:
    out = []
    for p, avg in zip(fold.points, fold.averages):
        steps = [f.step for f in avg.folded]
        members = avg.method.final_members(list(range(len(steps))))  # LAWA: its last window; None: all of them
        if members is not None:
            steps = [steps[i] for i in sorted(members)]
        out.append(Entry(p.name, "average", steps[-1] if steps else None, fold.outputs[p.name], method=p.method,
                         option=p.option, horizon=p.horizon, steps=steps))
    return out


@dataclass
class SweepReport:
    """The scored sweep: every entry, the best average and the best raw checkpoint by ``metric``."""

    entries: list[Entry]
    metric: str
    mode: str
    best_average: Entry | None
    best_raw: Entry | None
    read_ratio: float | None = None

    @property
    def helped(self) -> bool:
        """Did the best average beat the best raw checkpoint (strictly)?"""
        if self.best_average is None:
            return False
        if self.best_raw is None:
            return True
        return is_better(self.best_average.value(self.metric), self.best_raw.value(self.metric), self.mode)  # type: ignore[arg-type]

    def verdict(self) -> str:
        """One plain sentence: which average won, and by how much against the best raw checkpoint."""
        m = self.metric
        avg, raw = self.best_average, self.best_raw
        if avg is None:
            return f"no average could be scored by {m}"
        a = avg.value(m)
        if raw is None:
            return f"best average: {avg.name} ({m} = {a:.6g}); no raw checkpoint was scored"
        r = raw.value(m)
        if not self.helped:
            return (f"{NOT_HELPED}: the best average, {avg.name} ({m} = {a:.6g}), did not beat the best raw "
                    f"checkpoint, step {raw.step} ({m} = {r:.6g}).")
        return (f"best average: {avg.name} ({m} = {a:.6g}), better than the best raw checkpoint, step {raw.step} "
                f"({m} = {r:.6g}).")

    def by_method(self) -> dict[str, list[Entry]]:
        out: dict[str, list[Entry]] = {}
        for e in self.entries:
            if e.kind == "average":
                out.setdefault(e.method or e.name, []).append(e)
        for rows in out.values():
            rows.sort(key=lambda e: float(e.horizon or 0))
        return out

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "helped": self.helped, "verdict": self.verdict(),
                "best_average": None if self.best_average is None else self.best_average.row(self.metric),
                "best_raw": None if self.best_raw is None else self.best_raw.row(self.metric),
                "read_ratio": self.read_ratio,
                "rows": [e.row(self.metric) for e in self.entries]}

    def csv_text(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["candidate", "kind", "method", "option", "horizon", "step", "metric", "value", "error"])
        for e in self.entries:
            r = e.row(self.metric)
            w.writerow([r["candidate"], r["kind"], r["method"] or "", r["option"] or "",
                        "" if r["horizon"] is None else r["horizon"], "" if r["step"] is None else r["step"],
                        self.metric, "" if r["value"] is None else repr(r["value"]), r["error"] or ""])
        return buf.getvalue()

    def write(self, out: Path) -> dict[str, Path]:
        """``sweep.json``, ``sweep.csv`` and ``sweep.png`` in ``out`` (each written atomically)."""
        out = Path(out)
        paths = {"json": out / "sweep.json", "csv": out / "sweep.csv", "png": out / "sweep.png"}
        atomic_write_bytes(paths["json"], (json.dumps(self.to_json(), indent=1) + "\n").encode())
        atomic_write_bytes(paths["csv"], self.csv_text().encode())
        atomic_write_bytes(paths["png"], self.png_bytes())
        return paths

    def png_bytes(self) -> bytes:
        """The metric against the horizon, one panel per method, the best raw checkpoint as a dashed line."""
        from ckptavg.publishing.report import _label, _matplotlib

        Figure, FigureCanvasAgg = _matplotlib()
        groups = self.by_method()
        n = max(1, len(groups))
        fig = Figure(figsize=(4.2 * n, 3.6), dpi=100)
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, n, sharey=True, squeeze=False)[0]
        raw = None if self.best_raw is None else self.best_raw.value(self.metric)
        for ax, (method, rows) in zip(axes, groups.items()):
            pts = [(float(e.horizon), e.value(self.metric)) for e in rows if e.value(self.metric) is not None]  # type: ignore[arg-type]
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", label=_label(method))
            if raw is not None:
                ax.axhline(raw, color="gray", linestyle="--", label=_label(f"best raw (step {self.best_raw.step})"))  # type: ignore[union-attr]
            if self.best_average is not None and self.best_average in rows:
                b = self.best_average
                ax.plot([float(b.horizon)], [b.value(self.metric)], "*", markersize=14, color="C3",  # type: ignore[arg-type]
                        label=_label(f"best: {b.name}"))
            option = rows[0].option or ""
            ax.set_xlabel(_label("newest N checkpoints" if option == LAST else option.replace("_", " ")))
            if pts and min(x for x, _ in pts) > 0 and max(x for x, _ in pts) / min(x for x, _ in pts) >= 20:
                ax.set_xscale("log")
            ax.set_title(_label(method))
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        axes[0].set_ylabel(_label(f"{self.metric} ({'lower' if self.mode == 'min' else 'higher'} is better)"))
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()


def rank(entries: Sequence[Entry], *, metric: str | None, mode: str = "min", read_ratio: float | None = None) -> SweepReport:
    """The :class:`SweepReport` of scored ``entries``; ``metric`` None: the first metric an entry returned."""
    if mode not in ("min", "max"):
        raise UsageError(f"--mode {mode!r}: expected min or max")
    scored = [e for e in entries if e.metrics]
    if not scored:
        errors = [e.error for e in entries if e.error]
        raise EvaluationError(f"no candidate could be evaluated ({len(entries)} tried)" +
                              (f"; the first error: {errors[0]}" if errors else ""),
                              hint="check the evaluator on one model folder first")
    metric = metric or next(iter(scored[0].metrics))  # type: ignore[arg-type]
    if not any(metric in (e.metrics or {}) for e in scored):
        raise EvaluationError(f"the evaluator returned no {metric!r} (it returned {', '.join(scored[0].metrics)})",  # type: ignore[arg-type]
                              hint="pass --metric with one of those")

    def best(kind: str) -> Entry | None:
        have = [e for e in scored if e.kind == kind and e.value(metric) is not None]
        if not have:
            return None
        key = lambda e: e.value(metric)
        return min(have, key=key) if mode == "min" else max(have, key=key)

    return SweepReport(list(entries), metric, mode, best("average"), best("raw"), read_ratio)

