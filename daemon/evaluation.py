"""Evaluation rounds, best-model selection and publishing, beside the fold loop.

The fold loop never waits for an evaluation. When a round is due it only takes
a *snapshot* of the candidates (hard links of the freshly published average
folders and of the raw newest checkpoint's model files under
``STATE/eval/round-N/``; copies where links are impossible) and hands it to the
``ckptavg-eval`` worker thread. If the worker is still busy when the next round
comes, the waiting round is replaced by the newer one and the skip is logged:
evaluation always runs on the newest state it can.

Every evaluation (or its error) is appended to ``OUT/.ckptavg/metrics.jsonl``
(one JSON object per candidate per round). The best candidate by ``metric`` /
``mode`` across all rounds is published to ``OUT/best``: a symlink to a
versioned folder ``OUT/.best-versions/vNNNN-step<S>-<candidate>/``, swapped with
one atomic ``rename`` of a new symlink, so a reader sees the old model or the new
one, never a mix. Replaced versions are removed after ``best_grace`` seconds.
The Hub publisher, when configured, gets each new best version.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptavg.averaging.engine import Engine
from ckptavg.contracts.evalsettings import EVAL_FILE, EvalSettings, write_eval_settings
from ckptavg.contracts.metrics import METRICS_FILE, MetricsRow, append_row, is_better
from ckptavg.contracts.status import BestModel, EvaluationStatus, owned_section
from ckptavg.daemon.config import EvalConfig
from ckptavg.errors import CkptavgError, OutputError
from ckptavg.evaluators import Candidate, make_evaluator
from ckptavg.oneshot import AverageSpec, average_checkpoints, build_averages
from ckptavg.progress import Progress
from ckptavg.reading.checkpoint import Checkpoint
from ckptavg.writing.atomic import AtomicDir, atomic_write_bytes, fsync_dir, link_or_copy
from ckptavg.writing.export import copy_meta_files

log = logging.getLogger(__name__)

__all__ = ["BEST_LINK", "VERSIONS_DIR", "EvalRound", "Evaluation", "snapshot_checkpoint", "snapshot_model_folder"]

BEST_LINK = "best"
VERSIONS_DIR = ".best-versions"
_WEIGHT_SUFFIXES = (".safetensors",)


@dataclass
class EvalRound:
    round: int
    step: int
    written_at: float | None
    wall_time: float | None
    folder: Path  # STATE/eval/round-N
    candidates: list[Candidate] = field(default_factory=list)


def snapshot_model_folder(src: Path, dst: Path) -> None:
    """Hard-link (or copy) a model folder's weights, index, config and tokenizer files into ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and (f.name.endswith(_WEIGHT_SUFFIXES) or f.name.endswith(".safetensors.index.json")
                            or f.name in ("ckptavg.json", "README.md")):
            link_or_copy(f, dst / f.name)
    copy_meta_files(src, dst)


def snapshot_checkpoint(ckpt: Checkpoint, dst: Path, *, progress: Progress | None = None) -> None:
    """A raw checkpoint as a loadable model folder ``dst`` for an evaluator: a safetensors checkpoint folder's
    files hard-linked (or copied), anything else (a pickle, a bare file) exported as safetensors (the mean of one
    checkpoint is itself). Never writes into the trainer's folder."""
    if ckpt.format.startswith("safetensors") and ckpt.path.is_dir():
        dst.mkdir(parents=True)
        for f in ckpt.files:
            link_or_copy(f, dst / f.name)
        for index in ckpt.path.glob("*.safetensors.index.json"):
            link_or_copy(index, dst / index.name)
        copy_meta_files(ckpt.meta_dir or ckpt.path, dst)
        return
    raw = build_averages([AverageSpec("uniform", name="raw")], device="cpu")
    with Engine(device="cpu", progress=progress) as engine:
        average_checkpoints([ckpt], raw, dst, engine=engine)


class Evaluation:
    """Owns the eval worker, ``metrics.jsonl``, ``eval.json``, selection state and ``OUT/best``."""

    def __init__(self, cfg: EvalConfig, *, output: Path, state_path: Path,
                 on_best: Callable[[Path, dict[str, Any]], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.output = output
        self.state_path = state_path
        self.dir = state_path / "eval"
        self.metrics_path = state_path / METRICS_FILE
        self.on_best = on_best
        self.clock = clock
        self.dir.mkdir(parents=True, exist_ok=True)
        self._cond = threading.Condition()
        self._pending: EvalRound | None = None
        self._running: EvalRound | None = None
        self._stop = False
        self._thread: threading.Thread | None = None
        self.evaluator: Any = None
        self.skipped_rounds = 0
        self.failures = 0
        self.last_error: str | None = None
        progress = self._read_json(self.dir / "progress.json") or {}
        self.round = int(progress.get("round", 0))  # rounds numbered, skipped ones included
        self.rounds_run = int(progress.get("rounds_run", self._rounds_in_metrics()))  # rounds that ran to the end
        self.last_step: int | None = progress.get("last_step")
        self.run_start: float | None = progress.get("run_start")
        self.last_ok: bool = bool(progress.get("last_ok", True))
        self.best: dict[str, Any] | None = self._read_json(self.dir / "best.json")
        if self.best and (self.best.get("metric") != cfg.metric and cfg.metric is not None
                          or self.best.get("mode") != cfg.mode):
            log.warning("evaluation metric/mode changed (%s %s -> %s %s): the best model is chosen afresh",
                        self.best.get("metric"), self.best.get("mode"), cfg.metric, cfg.mode)
            self.best = None
        self.metric = cfg.metric or (self.best or {}).get("metric")
        self._write_eval_json()
        for stale in self.dir.glob("round-*"):  # snapshots a crash or a stop left behind
            shutil.rmtree(stale, ignore_errors=True)

    # -- small persistence helpers --------------------------------------------------------------
    @staticmethod
    def _read_json(path: Path) -> Any:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def _rounds_in_metrics(self) -> int:
        """Rounds with rows in metrics.jsonl: the count for a progress.json written before ``rounds_run``."""
        try:
            lines = self.metrics_path.read_text().splitlines()
        except OSError:
            return 0
        rounds = set()
        for line in lines:
            try:
                rounds.add(json.loads(line).get("round"))
            except (ValueError, AttributeError):
                continue
        return len(rounds - {None})

    def _write_eval_json(self) -> None:
        settings = EvalSettings(metric=self.metric, mode=self.cfg.mode, every=self.cfg.every, kind=self.cfg.kind)
        write_eval_settings(self.state_path / EVAL_FILE, settings)

    def _save_progress(self) -> None:
        data = {"round": self.round, "rounds_run": self.rounds_run, "last_step": self.last_step, "run_start": self.run_start, "last_ok": self.last_ok}
        atomic_write_bytes(self.dir / "progress.json", json.dumps(data).encode())

    # -- the fold loop's side -------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ckptavg-eval", daemon=True)
        self._thread.start()

    def note_checkpoint(self, written_at: float | None) -> None:
        """The trainer's clock: the first checkpoint's write time is the run's time zero."""
        if written_at is not None and (self.run_start is None or written_at < self.run_start):
            self.run_start = written_at
            self._save_progress()

    def new_round(self, step: int, written_at: float | None) -> EvalRound:
        self.round += 1
        folder = self.dir / f"round-{self.round}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        wall = written_at - self.run_start if written_at is not None and self.run_start is not None else None
        return EvalRound(self.round, step, written_at, wall, folder)

    def submit(self, rnd: EvalRound) -> None:
        """Queue a round; a round still waiting is replaced (and its snapshot dropped)."""
        with self._cond:
            old, self._pending = self._pending, rnd
            self._cond.notify_all()
        self._save_progress()
        if old is not None:
            self.skipped_rounds += 1
            log.info("evaluation round %d (step %d) skipped: round %d (step %d) is newer and evaluation is behind",
                      old.round, old.step, rnd.round, rnd.step)
            shutil.rmtree(old.folder, ignore_errors=True)

    def needs_round(self, step: int) -> bool:
        """At start: is ``step`` (the newest folded) still to evaluate (never done, or every candidate failed)?"""
        return self.last_step != step or not self.last_ok

    def wait_idle(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending is not None or self._running is not None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Let a running evaluation finish (up to ``timeout``), drop a waiting one, stop the worker."""
        with self._cond:
            dropped, self._pending = self._pending, None
            self._stop = True
            self._cond.notify_all()
        if dropped is not None:
            log.info("evaluation round %d (step %d) not run: stopping (it runs again at the next start)",
                     dropped.round, dropped.step)
            shutil.rmtree(dropped.folder, ignore_errors=True)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive() and self.evaluator is not None and hasattr(self.evaluator, "cancel"):
                log.warning("evaluation still running after %.0f s: cancelling it", timeout)
                self.evaluator.cancel()
                self._thread.join(10)
            self._thread = None
        if getattr(self, "_own_evaluator", False):  # built by run_round: no worker closes it
            self._own_evaluator = False
            self.evaluator.close()

    def status(self) -> EvaluationStatus:
        with self._cond:
            running = self._running.step if self._running is not None else None
            pending = self._pending.step if self._pending is not None else None
        return EvaluationStatus(kind=self.cfg.kind, metric=self.metric, mode=self.cfg.mode, rounds=self.round,
                                last_evaluated_step=self.last_step, running_step=running, pending_step=pending,
                                skipped_rounds=self.skipped_rounds, failures=self.failures,
                                last_error=self.last_error,
                                best=owned_section(BestModel, self.best) if self.best is not None else None)

    # -- the worker -----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.evaluator = make_evaluator(self.cfg.kind, self.cfg.options, log_dir=self.dir / "logs")
        except CkptavgError as e:
            self.last_error = str(e)
            log.error("evaluation disabled: %s", e)
            with self._cond:
                self._stop = True
                self._pending = None
                self._cond.notify_all()
            return
        try:
            while True:
                with self._cond:
                    while self._pending is None and not self._stop:
                        self._cond.wait()
                    if self._stop:
                        return
                    rnd, self._pending = self._pending, None
                    self._running = rnd
                try:
                    self._evaluate_round(rnd)
                except Exception as e:  # never kill the worker: log, count, go on
                    self.failures += 1
                    self.last_error = f"round {rnd.round}: {e}"
                    log.exception("evaluation round %d failed", rnd.round)
                finally:
                    shutil.rmtree(rnd.folder, ignore_errors=True)
                    with self._cond:
                        self._running = None
                        self._cond.notify_all()
        finally:
            try:
                self.evaluator.close()
            except Exception:
                log.debug("closing the evaluator failed", exc_info=True)

    def run_round(self, rnd: EvalRound, *, select: bool = True) -> list[MetricsRow]:
        """Evaluate ``rnd`` on the calling thread, exactly as the worker does (metrics.jsonl, and with ``select``
        the best candidate so far published to ``OUT/best``); ``ckptavg sweep`` has no fold loop to stay beside.
        The evaluator is built on first use and closed by :meth:`close`."""
        if self.evaluator is None:
            self.evaluator = make_evaluator(self.cfg.kind, self.cfg.options, log_dir=self.dir / "logs")
            self._own_evaluator = True
        try:
            return self._evaluate_round(rnd, select=select)
        finally:
            shutil.rmtree(rnd.folder, ignore_errors=True)

    def _evaluate_round(self, rnd: EvalRound, *, select: bool = True) -> list[MetricsRow]:
        label = getattr(self.evaluator, "label", self.cfg.kind)
        rows: list[MetricsRow] = []
        for cand in rnd.candidates:
            if self._stop:  # stopping: the round runs again at the next start
                log.info("evaluation round %d interrupted by the stop", rnd.round)
                return rows
            started = self.clock()
            t0 = time.perf_counter()
            metrics: dict[str, float] | None = None
            error: str | None = None
            try:
                metrics = self.evaluator.evaluate(cand)
            except CkptavgError as e:
                self.failures += 1
                self.last_error = f"step {rnd.step} {cand.name}: {e}"
                error = str(e)
                log.warning("evaluation of %s at step %d failed: %s", cand.name, rnd.step, e)
            finally:
                cand.release()
            row = MetricsRow(round=rnd.round, step=rnd.step, written_at=rnd.written_at, wall_time=rnd.wall_time,
                             candidate=cand.name, kind=cand.kind, method=cand.info.get("method"),
                             options=cand.info.get("options"), evaluator=label, metrics=metrics, error=error,
                             evaluated_at=started, eval_seconds=round(time.perf_counter() - t0, 4))
            rows.append(row)
            self._append(row)
        self.last_step = rnd.step
        self.last_ok = any(r.metrics is not None for r in rows)
        self.rounds_run += 1
        self._save_progress()
        if select:
            self._select(rnd, rows)
        return rows

    def _append(self, row: MetricsRow) -> None:
        append_row(self.metrics_path, row)
        if row.metrics is not None:
            shown = ", ".join(f"{k}={v:.5g}" for k, v in row.metrics.items())
            log.info("eval step %d %s: %s (%.1f s)", row.step, row.candidate, shown, row.eval_seconds)

    # -- selection and OUT/best ----------------------------------------------------------------
    def _select(self, rnd: EvalRound, rows: list[MetricsRow]) -> None:
        scored = [(r, r.metrics) for r in rows if r.metrics is not None]
        if not scored:
            return
        if self.metric is None:
            self.metric = next(iter(scored[0][1]))
            log.info("selecting the best model by %s (%s); set metric = ... in [evaluate] to choose", self.metric,
                     self.cfg.mode)
            self._write_eval_json()
        metric = self.metric
        have = [(r, m) for r, m in scored if metric in m]
        if not have:
            self.last_error = (f"the evaluator returned no {metric!r} (it returned "
                               f"{', '.join(scored[0][1])}); set metric = ... in [evaluate]")
            log.warning("%s", self.last_error)
            return
        pick, pick_metrics = min(have, key=lambda rm: rm[1][metric]) if self.cfg.mode == "min" else \
            max(have, key=lambda rm: rm[1][metric])
        value = pick_metrics[metric]
        if not is_better(value, (self.best or {}).get("value"), self.cfg.mode):
            return
        raw = next((m for r, m in scored if r.kind == "raw"), None)
        cand = next(c for c in rnd.candidates if c.name == pick.candidate)
        version = int((self.best or {}).get("version", 0)) + 1
        best = {"candidate": cand.name, "kind": cand.kind, "method": cand.info.get("method"),
                "options": cand.info.get("options"), "step": rnd.step, "round": rnd.round,
                "rounds_run": self.rounds_run,
                "metric": self.metric, "mode": self.cfg.mode, "value": value, "metrics": pick_metrics,
                "raw_metrics_same_step": raw, "version": version,
                "steps_folded": cand.info.get("steps"), "published_at": self.clock()}
        folder = self._publish_best(cand, best)
        best["folder"] = str(folder)
        previous = self.best
        self.best = best
        atomic_write_bytes(self.dir / "best.json", json.dumps(best, indent=1).encode())
        log.info("new best model: %s at step %d, %s = %.6g%s -> %s", cand.name, rnd.step, self.metric, value,
                 f" (was {previous['candidate']} at step {previous['step']}: {previous['value']:.6g})" if previous
                 else "", self.output / BEST_LINK)
        if self.on_best is not None:
            self.on_best(folder, best)

    def _publish_best(self, cand: Candidate, best: dict[str, Any]) -> Path:
        versions = self.output / VERSIONS_DIR
        versions.mkdir(parents=True, exist_ok=True)
        name = f"v{best['version']:04d}-step{best['step']}-{cand.name}"
        final = versions / name
        with AtomicDir(final, replace=True) as tmp:  # temp folder, fsync of each file and the folder, rename
            for f in sorted(Path(cand.model_dir).iterdir()):
                if f.is_file() and f.name not in ("README.md", "ckptavg.json"):
                    link_or_copy(f, tmp / f.name)
            prov = self._read_json(Path(cand.model_dir) / "ckptavg.json") or {}
            prov["selection"] = {k: v for k, v in best.items() if k != "folder"}
            (tmp / "ckptavg.json").write_text(json.dumps(prov, indent=2) + "\n")
            (tmp / "README.md").write_text(best_model_card(best))
        link = self.output / BEST_LINK
        if link.exists() and not link.is_symlink():
            raise OutputError(f"{link} exists and is not a symlink ckptavg made; not replacing it",
                              path=link, hint="move it away: ckptavg publishes the best model there")
        tmp_link = self.output / f".{BEST_LINK}.ckptavg-tmp-{os.getpid()}"
        if tmp_link.is_symlink() or tmp_link.exists():
            tmp_link.unlink()
        os.symlink(Path(VERSIONS_DIR) / name, tmp_link)
        os.replace(tmp_link, link)  # the atomic swap
        fsync_dir(self.output)
        self._expire_versions(keep=name)
        return final

    def _expire_versions(self, keep: str) -> None:
        """Remove replaced versions older than ``best_grace`` seconds (a reader may still hold one open)."""
        versions = self.output / VERSIONS_DIR
        now = time.time()
        marks = self._read_json(self.dir / "replaced.json") or {}
        for v in versions.iterdir():
            if v.name == keep or v.name.startswith("."):
                continue
            since = marks.setdefault(v.name, now)
            if now - since >= self.cfg.best_grace:
                shutil.rmtree(v, ignore_errors=True)
                marks.pop(v.name, None)
        marks = {k: t for k, t in marks.items() if (versions / k).exists()}
        atomic_write_bytes(self.dir / "replaced.json", json.dumps(marks).encode())

    def expire(self) -> None:
        if self.best and (self.output / VERSIONS_DIR).is_dir():
            self._expire_versions(keep=Path(self.best.get("folder", "")).name)


def best_model_card(best: dict[str, Any]) -> str:
    metric, value = best["metric"], best["value"]
    raw = best.get("raw_metrics_same_step") or {}
    lines = ["---", "tags:", "- ckptavg", "- checkpoint-averaging", "---", "",
             f"# Best model so far: `{best['candidate']}` at step {best['step']}", "",
             (f"Chosen by ckptavg's daemon as the best candidate by **{metric}** ({best['mode']}) across "
              f"{_rounds_text(best)}."), ""]
    if best["kind"] == "raw":
        lines.append("This is the raw training checkpoint (no average did better so far).")
    else:
        opts = ", ".join(f"{k}={v}" for k, v in (best.get("options") or {}).items())
        steps = best.get("steps_folded") or []
        span = f"{len(steps)} checkpoint(s), steps {steps[0]}–{steps[-1]}" if steps else "its checkpoints"
        lines.append(f"Method: **{best.get('method')}** ({opts or 'no options'}), folded from {span}.")
    lines += ["", "| metric | this model | raw checkpoint, same step |", "|---|---|---|"]
    for k, v in best["metrics"].items():
        r = raw.get(k)
        lines.append(f"| {k} | {v:.6g} | {'' if r is None else f'{r:.6g}'} |")
    if metric in raw and best["kind"] != "raw":
        gain = value / raw[metric] if raw[metric] else float("nan")
        lines += ["", f"{metric}: {value:.6g} vs {raw[metric]:.6g} for the raw checkpoint ({gain:.3f}×)."]
    lines += ["", "Provenance (inputs, options, ckptavg version) is in `ckptavg.json`.", ""]
    return "\n".join(lines)


def _rounds_text(best: dict[str, Any]) -> str:
    """How many evaluation rounds ran (skipped and interrupted rounds are numbered but never ran)."""
    n = best.get("rounds_run")
    if n is None:  # a best.json written before rounds_run: only the round's number is known
        return f"the evaluation rounds up to round {best['round']}"
    return f"{n} evaluation round{'' if n == 1 else 's'}"
