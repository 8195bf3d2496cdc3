"""The gain report: raw checkpoints against each average, from the daemon's ``metrics.jsonl``.

The daemon appends one JSON object per candidate per evaluation round to
``OUT/.ckptavg/metrics.jsonl`` and names its selection metric in
``OUT/.ckptavg/eval.json``. :func:`build_report` turns those into a
:class:`Report`: per candidate the best value and its step, the final value,
the step and trainer time at which a target was first reached (by default the
raw run's best value), and the gain against the raw checkpoint. Every number
shown is copied from the file, never rounded, so a reader can grep for it.

Outputs: an aligned text table (:meth:`Report.table_text`), JSON
(:meth:`Report.to_json`), a two-panel PNG (:meth:`Report.write_png`; metric vs
step and vs trainer wall clock; matplotlib is imported lazily with the Agg
canvas, never pyplot, so no global state changes) and one self-contained HTML
page (:meth:`Report.write_html`; the PNG inline as a data URI, no external assets).
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptavg.contracts.evalsettings import EVAL_FILE, EvalSettings, read_eval_settings
from ckptavg.contracts.metrics import METRICS_FILE, NO_METRICS_HINT, MetricsRow, is_better, read_rows
from ckptavg.errors import MetricsError, OutputError, UsageError
from ckptavg.writing.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

__all__ = ["PLOT_SKIPPED", "CandidateSummary", "MetricsError", "MetricsRow", "Point", "Report", "build_report",
           "load_metrics"]

# The one line `ckptavg report` and `ckptavg demo` print (exit 0) when the plot cannot be drawn.
PLOT_SKIPPED = "ckptavg: plot skipped: matplotlib cannot be imported (pip install matplotlib)"


# --------------------------------------------------------------------------- reading


def load_metrics(path: str | Path) -> list[MetricsRow]:
    """The evaluation records of a ``metrics.jsonl`` file, in file order (see
    :func:`ckptavg.contracts.metrics.read_rows`).

    A last line that does not parse (the daemon crashed mid-write) is skipped
    with a warning; any other bad line is a :class:`MetricsError` naming the
    file and the line number.
    """
    return read_rows(path)


def _locate(path: Path) -> tuple[Path, Path]:
    """(metrics.jsonl, the daemon's output folder) for an output folder, its state folder, or the file."""
    if path.is_dir():
        for candidate in (path / ".ckptavg" / METRICS_FILE, path / METRICS_FILE):
            if candidate.is_file():
                source = candidate
                break
        else:
            raise UsageError(f"no {METRICS_FILE} here (looked in {path / '.ckptavg'})", path=path,
                             hint=NO_METRICS_HINT)
    elif path.exists() or path.name.endswith(".jsonl"):
        source = path
    else:
        raise UsageError("no such folder", path=path, hint=NO_METRICS_HINT)
    out = source.parent.parent if source.parent.name == ".ckptavg" else source.parent
    return source, out


# --------------------------------------------------------------------------- numbers


@dataclass(frozen=True)
class Point:
    step: int
    wall_time: float | None  # seconds since the run's first checkpoint, on the trainer's clock
    value: float  # exactly as in metrics.jsonl


@dataclass
class CandidateSummary:
    """One candidate's curve and what it achieved, alone and against the raw checkpoint."""

    name: str
    kind: str  # "raw" | "average"
    method: str
    options: dict[str, Any]
    points: list[Point] = field(default_factory=list)
    failed: int = 0  # evaluations that ended with an error
    missing: int = 0  # successful evaluations without a finite value of the metric
    best: Point | None = None
    final: Point | None = None
    target: Point | None = None  # the first evaluation at or past the target
    best_ratio: float | None = None  # best / raw best
    steps_saved: int | None = None  # raw's step to target minus this one's (negative: later)
    steps_saved_pct: float | None = None
    seconds_saved: float | None = None
    wins: int | None = None  # rounds (steps evaluated for both) where this one beat raw
    rounds: int | None = None
    helped: bool | None = None  # beat raw's best, or reached the target sooner; None without raw

    def to_json(self) -> dict[str, Any]:
        def pt(p: Point | None) -> dict[str, Any] | None:
            return None if p is None else {"step": p.step, "wall_time": p.wall_time, "value": p.value}

        return {
            "name": self.name, "kind": self.kind, "method": self.method, "options": self.options,
            "evaluations": len(self.points), "failed": self.failed, "missing": self.missing,
            "best": pt(self.best), "final": pt(self.final), "target_reached": pt(self.target),
            "best_ratio_vs_raw": self.best_ratio, "steps_saved": self.steps_saved,
            "steps_saved_pct": self.steps_saved_pct, "seconds_saved": self.seconds_saved,
            "rounds_beating_raw": self.wins, "rounds_compared": self.rounds, "helped": self.helped,
            "points": [pt(p) for p in self.points],
        }


def _reached(value: float, target: float, mode: str) -> bool:
    return value <= target if mode == "min" else value >= target


def build_report(out_dir: str | Path, *, metric: str | None = None, mode: str | None = None,
                 target: float | None = None) -> Report:
    """Read ``OUT/.ckptavg/metrics.jsonl`` (or the file given) and summarise it.

    ``metric``/``mode`` default to the daemon's ``eval.json``, else the first
    metric in the file and ``"min"``; ``target`` defaults to the raw run's best.
    """
    source, out = _locate(Path(out_dir))
    records = load_metrics(source)
    if not records:
        raise MetricsError("holds no evaluations yet", path=source, hint=NO_METRICS_HINT)
    settings = (read_eval_settings(source.parent / EVAL_FILE) if metric is None or mode is None else None) \
        or EvalSettings()
    from_file = mode is None and settings.mode is not None
    mode = mode or settings.mode or "min"
    if mode not in ("min", "max"):
        raise UsageError(f"mode {mode!r}: choose min (lower is better) or max (higher is better)",
                         path=source.parent / EVAL_FILE if from_file else None,
                         hint="pass --mode min or --mode max" if from_file else None)
    if target is not None and not math.isfinite(target):
        raise UsageError(f"--target {target!r}: must be a finite number")
    known: dict[str, None] = {}
    for r in records:
        known.update(dict.fromkeys(r.metrics or {}))
    if not known:
        first = next(r.error for r in records if r.error is not None)
        raise MetricsError(f"all {len(records)} evaluations failed; the first said: {first}", path=source,
                           hint="check the evaluator; nothing to report yet")
    metric = metric or settings.metric or next(iter(known))
    if metric not in known:
        where = f" (the metric named in {EVAL_FILE})" if settings.metric == metric else ""
        raise UsageError(f"unknown metric {metric!r}{where}; this file has: {', '.join(known)}", path=source,
                         hint="pass --metric with one of those")

    cands: dict[str, CandidateSummary] = {}
    by_step: dict[str, dict[int, Point]] = {}
    for r in records:
        # every raw checkpoint is one curve, "raw", whatever its row is called (`ckptavg sweep` names them raw-<step>)
        name = "raw" if r.kind == "raw" else r.candidate
        if name not in cands:
            kind = r.kind or ("raw" if name == "raw" else "average")
            options = r.options
            cands[name] = CandidateSummary(name, str(kind), str(r.method or kind),
                                           dict(options) if isinstance(options, dict) else {})
            by_step[name] = {}
        c = cands[name]
        if r.metrics is None:  # the evaluation failed (it has an error instead)
            c.failed += 1
            continue
        value = r.metrics.get(metric)
        if value is None or not math.isfinite(value):
            c.missing += 1
            continue
        by_step[name][r.step] = Point(r.step, r.wall_time, value)  # a re-evaluation replaces
    for name, c in cands.items():
        c.points = [by_step[name][s] for s in sorted(by_step[name])]
        if c.missing:
            log.warning("%s: %s: skipped %d evaluation(s) with no finite %s", source, name, c.missing, metric)
    ordered = [c for c in cands.values() if c.kind == "raw"] + [c for c in cands.values() if c.kind != "raw"]
    raw = next((c for c in ordered if c.kind == "raw"), None)

    for c in ordered:
        if c.points:
            c.final = c.points[-1]
            c.best = c.points[0]
            for p in c.points[1:]:
                if is_better(p.value, c.best.value, mode):
                    c.best = p
    target_source = "--target"
    if target is None and raw is not None and raw.best is not None:
        target, target_source = raw.best.value, "the raw checkpoint's best"
    for c in ordered:
        if target is not None:
            c.target = next((p for p in c.points if _reached(p.value, target, mode)), None)
    if raw is not None and raw.best is not None:
        raw_steps = by_step[raw.name]
        for c in ordered:
            if c is raw or c.best is None:
                continue
            c.best_ratio = c.best.value / raw.best.value if raw.best.value else None
            common = [s for s in by_step[c.name] if s in raw_steps]
            c.rounds = len(common)
            c.wins = sum(is_better(by_step[c.name][s].value, raw_steps[s].value, mode) for s in common)
            if c.target is not None and raw.target is not None:
                c.steps_saved = raw.target.step - c.target.step
                c.steps_saved_pct = 100.0 * c.steps_saved / raw.target.step if raw.target.step else None
                if c.target.wall_time is not None and raw.target.wall_time is not None:
                    c.seconds_saved = raw.target.wall_time - c.target.wall_time
            sooner = c.target is not None and (raw.target is None or c.target.step < raw.target.step)
            c.helped = is_better(c.best.value, raw.best.value, mode) or sooner
    return Report(source=source, out_dir=out, metric=metric, mode=mode, target=target,
                  target_source=target_source if target is not None else None, metrics_known=list(known),
                  records=len(records), failed=sum(c.failed for c in ordered), candidates=ordered, raw=raw,
                  evaluators=sorted({str(r.evaluator) for r in records if r.evaluator}))


# --------------------------------------------------------------------------- presenting


def _num(value: float | None) -> str:
    """A number for people: 6 significant digits (``--json`` and metrics.jsonl keep every digit)."""
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.6g}"


def _duration(seconds: float) -> str:
    seconds = abs(seconds)
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.2f} h"
    if seconds >= 120:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"


@dataclass
class Report:
    """Everything ``ckptavg report`` shows; build it with :func:`build_report`."""

    source: Path
    out_dir: Path
    metric: str
    mode: str
    target: float | None
    target_source: str | None
    metrics_known: list[str]
    records: int
    failed: int
    candidates: list[CandidateSummary]
    raw: CandidateSummary | None
    evaluators: list[str] = field(default_factory=list)
    _png: bytes | None = field(default=None, repr=False)

    # ---- time axis

    def time_unit(self) -> tuple[str, float] | None:
        """("h", 3600) or ("min", 60) for the wall-clock axis; None when no wall times were recorded."""
        walls = [p.wall_time for c in self.candidates for p in c.points if p.wall_time is not None]
        if not walls:
            return None
        return ("h", 3600.0) if max(walls) >= 2 * 3600 else ("min", 60.0)

    # ---- table

    def rows(self) -> tuple[list[str], list[list[str]]]:
        """The table's header and rows as strings (shared by the text and HTML tables)."""
        unit = self.time_unit()
        unit_name = "time" if unit is None else ("hours" if unit[0] == "h" else "minutes")
        header = ["candidate", "method", "evals", "failed", f"best {self.metric}", "at step", "final",
                  "target at step", f"target at ({unit_name})", "best / raw", "target vs raw"]
        rows = []
        for c in self.candidates:
            t = c.target
            when = "-" if t is None or t.wall_time is None or unit is None else f"{t.wall_time / unit[1]:.2f}"
            if c is self.raw or self.raw is None:
                vs = "-"
            elif c.target is None:
                vs = "never reached"
            elif self.raw.target is None:
                vs = "raw never did"
            elif c.steps_saved == 0:
                vs = "same step"
            else:
                word = "sooner" if (c.steps_saved or 0) > 0 else "later"
                pct = "" if c.steps_saved_pct is None else f" ({abs(c.steps_saved_pct):.1f}%)"
                vs = f"{abs(c.steps_saved or 0)} steps {word}{pct}"
            rows.append([
                c.name, c.method, str(len(c.points)), str(c.failed), _num(c.best.value if c.best else None),
                _num(c.best.step if c.best else None), _num(c.final.value if c.final else None),
                _num(t.step if t else None), when, "-" if c.best_ratio is None else f"{c.best_ratio:.4f}", vs,
            ])
        return header, rows

    def settings(self) -> list[tuple[str, str]]:
        better = "lower is better" if self.mode == "min" else "higher is better"
        target = "none (no raw checkpoint evaluated)" if self.target is None else (
            f"{_num(self.target)} ({self.target_source})")
        rows = [("metric", f"{self.metric} ({self.mode}: {better})"), ("target", target),
                ("metrics file", str(self.source)),
                ("evaluations", f"{self.records} lines, {self.failed} failed (not counted in the numbers)")]
        if self.evaluators:
            rows.append(("evaluator", ", ".join(self.evaluators)))
        return rows

    def summary_lines(self) -> list[str]:
        """Plain sentences: what each average gained, and which ones did not help."""
        lines: list[str] = []
        raw = self.raw
        for c in self.candidates:
            if c is raw:
                continue
            if c.best is None:
                lines.append(f"{c.name} has no successful evaluation of {self.metric}.")
                continue
            if raw is None or raw.best is None:
                continue
            if c.helped:
                if c.target is None:
                    lines.append(f"{c.name} beat the raw checkpoint's best ({_num(c.best.value)} vs "
                                 f"{_num(raw.best.value)}) but never reached the target.")
                elif raw.target is None:
                    lines.append(f"{c.name} reached the target at step {c.target.step}; the raw checkpoint never did.")
                elif c.steps_saved and c.steps_saved > 0:
                    pct = "" if c.steps_saved_pct is None else f" ({c.steps_saved_pct:.1f}%)"
                    saved = "" if c.seconds_saved is None else f", saving {_duration(c.seconds_saved)} of trainer time"
                    lines.append(f"{c.name} reached the target {c.steps_saved} steps{pct} earlier than raw{saved}.")
                else:
                    when = "at the same step as" if c.steps_saved == 0 else f"{-(c.steps_saved or 0)} steps later than"
                    lines.append(f"{c.name} beat the raw checkpoint's best ({_num(c.best.value)} vs "
                                 f"{_num(raw.best.value)}); it reached the target {when} raw.")
        not_helped = [c for c in self.candidates if c.helped is False]
        for c in not_helped:
            if c.best is None or raw is None or raw.best is None:  # helped is False only when both exist
                continue
            if c.rounds and not c.wins:
                lines.append(f"{c.name} never beat the raw checkpoint (worse or equal in all {c.rounds} rounds "
                             f"compared); it did not help.")
            else:
                rounds = f"it beat the raw checkpoint in {c.wins} of {c.rounds} rounds, but " if c.rounds else ""
                lines.append(f"{c.name} did not help: {rounds}its best ({_num(c.best.value)}) did not beat the raw "
                             f"checkpoint's best ({_num(raw.best.value)}), nor reach the target sooner.")
        if raw is None or raw.best is None:
            lines.append("No raw checkpoint was evaluated, so there is nothing to compare the averages against.")
        elif not not_helped and any(c is not raw for c in self.candidates):
            lines.append("Every average beat the raw checkpoint.")
        return lines

    def table_text(self) -> str:
        header, rows = self.rows()
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

        def line(cells: list[str]) -> str:
            pairs = enumerate(zip(cells, widths, strict=True))
            return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in pairs)

        out = [f"{k}: {v}" for k, v in self.settings()]
        out += ["", line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows), ""]
        out += self.summary_lines()
        return "\n".join(x.rstrip() for x in out) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {
            "metrics_file": str(self.source), "metric": self.metric, "mode": self.mode, "target": self.target,
            "target_source": self.target_source, "metrics": self.metrics_known, "records": self.records,
            "failed": self.failed, "evaluators": self.evaluators,
            "raw": self.raw.name if self.raw else None,
            "candidates": [c.to_json() for c in self.candidates],
            "did_not_help": [c.name for c in self.candidates if c.helped is False],
            "summary": self.summary_lines(),
        }

    # ---- plot

    def figure(self) -> Any:
        """A matplotlib Figure with two panels: the metric vs training step and vs trainer wall clock."""
        Figure, FigureCanvasAgg = _matplotlib()
        fig = Figure(figsize=(12, 4.8), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        ax_step, ax_time = fig.subplots(1, 2, sharey=True)
        unit = self.time_unit()
        colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22",
                  "#17becf"]
        averages = 0
        for c in self.candidates:
            if c.kind == "raw":
                style = {"color": "black", "linewidth": 2.2, "marker": "o", "markersize": 3.5, "zorder": 3,
                         "label": _label(f"{c.name} (newest checkpoint)")}
            else:
                style = {"color": colors[averages % len(colors)], "linewidth": 1.5, "marker": ".", "zorder": 2,
                         "label": _label(c.name)}
                averages += 1
            ax_step.plot([p.step for p in c.points], [p.value for p in c.points], **style)
            timed = [p for p in c.points if p.wall_time is not None]
            if unit is not None and timed:
                ax_time.plot([p.wall_time / unit[1] for p in timed], [p.value for p in timed], **style)
            if c.target is not None:  # a ring where the target was first reached
                ring = {"s": 90, "facecolors": "none", "edgecolors": style["color"], "linewidths": 1.5, "zorder": 4}
                ax_step.scatter([c.target.step], [c.target.value], **ring)
                if unit is not None and c.target.wall_time is not None:
                    ax_time.scatter([c.target.wall_time / unit[1]], [c.target.value], **ring)
        if self.target is not None:
            for ax in (ax_step, ax_time):
                ax.axhline(self.target, linestyle="--", color="grey", linewidth=1,
                           label=_label(f"target {_num(self.target)}"))
        ax_step.set_xlabel("training step")
        ax_step.set_ylabel(_label(self.metric))
        ax_step.set_title("vs training step")
        ax_time.set_title("vs trainer wall clock")
        if unit is None:
            ax_time.set_xlabel("trainer wall clock")
            ax_time.text(0.5, 0.5, "no wall-clock times in metrics.jsonl", transform=ax_time.transAxes,
                         ha="center", va="center", color="grey")
        else:
            hours_or_minutes = "hours" if unit[0] == "h" else "minutes"
            ax_time.set_xlabel(f"trainer wall clock ({hours_or_minutes} since the first checkpoint)")
        for ax in (ax_step, ax_time):
            ax.grid(True, alpha=0.3)
        ax_step.legend(fontsize="small", loc="best")
        better = "lower" if self.mode == "min" else "higher"
        fig.suptitle(_label(f"{self.metric} ({better} is better): raw checkpoint vs averages"))
        return fig

    def png_bytes(self) -> bytes:
        """The plot as PNG bytes (drawn once). OutputError when matplotlib is missing."""
        if self._png is None:
            buf = io.BytesIO()
            self.figure().savefig(buf, format="png")
            self._png = buf.getvalue()
        return self._png

    def write_png(self, path: str | Path) -> Path:
        path = Path(path)
        try:
            data = self.png_bytes()
        except OutputError as e:
            raise OutputError(e.message, path=path, hint=e.hint) from None
        atomic_write_bytes(path, data)
        return path

    # ---- HTML

    def to_html(self) -> str:
        """One self-contained page: settings, the plot inline (data URI), the table, the summary."""
        esc = html.escape
        try:
            png = self.png_bytes()
            plot = (f'<img alt="{esc(self.metric)} vs step and vs wall clock" '
                    f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">')
        except OutputError as e:
            log.debug("the HTML report has no plot: %s", e)  # the CLI says so in one line
            plot = f'<p class="note">No plot: {esc(str(e))}</p>'
        header, rows = self.rows()
        raw_name = self.raw.name if self.raw else None
        settings = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in self.settings())
        thead = "".join(f"<th>{esc(h)}</th>" for h in header)
        raw_row = ' class="raw"'
        tbody = "".join(
            f"<tr{raw_row if c.name == raw_name else ''}>" + "".join(f"<td>{esc(x)}</td>" for x in r) + "</tr>"
            for c, r in zip(self.candidates, rows, strict=True))
        summary = "".join(f"<li>{esc(s)}</li>" for s in self.summary_lines())
        generated = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>ckptavg report: {esc(self.metric)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
dl {{ display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }}
dt {{ font-weight: 600; }} dd {{ margin: 0; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; font-variant-numeric: tabular-nums; }}
th:nth-child(-n+2), td:nth-child(-n+2) {{ text-align: left; }}
tr.raw {{ font-weight: 600; background: #f4f4f4; }}
.note {{ color: #a33; }}
</style>
</head>
<body>
<h1>ckptavg report: {esc(self.metric)}</h1>
<dl>{settings}<dt>generated</dt><dd>{esc(generated)}</dd></dl>
{plot}
<table>
<thead><tr>{thead}</tr></thead>
<tbody>{tbody}</tbody>
</table>
<ul>{summary}</ul>
</body>
</html>
"""

    def write_html(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write_bytes(path, self.to_html().encode("utf-8"))
        return path


def _label(text: str) -> str:
    """Text for matplotlib: no mathtext from '$', and a leading '_' would hide a legend entry."""
    text = text.replace("$", r"\$")
    return "\u200b" + text if text.startswith("_") else text


def _matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise OutputError("matplotlib is not installed, so the plot was not drawn",
                          hint="pip install matplotlib; the table is complete without it") from None
    return Figure, FigureCanvasAgg
