"""``ckptavg centre``: the elastic centre of asynchronous Elastic Averaging SGD, as a sidecar.

Several workers train on their own, each writing checkpoints into its own run folder. Each time a
worker's checkpoint is finished (``ckptavg.reading.ready``), the centre moves toward it,
``x̃ ← x̃ + α (x_i − x̃)`` (:class:`~ckptavg.averaging.methods.elastic.Elastic`; the first checkpoint
initialises it), and the centre is published at ``OUT/centre`` (versioned folders behind one symlink,
:func:`~ckptavg.writing.export.publish_average`), where workers may pull toward it
(:mod:`ckptavg.integrations`).

Order and exactly-once:

* each worker's checkpoints are folded in that worker's step order: a later step that is ready while an
  earlier one of the same worker is still being written waits for it (at most ``order_wait`` seconds;
  then the earlier one, when it lands, is skipped with a warning, never folded out of order);
* across workers, ready checkpoints are folded in arrival order (the trainer's write time, then the
  worker's position, then the step);
* every fold is persisted at once (:class:`~ckptavg.writing.state.StateStore`): the accumulator and,
  in the same generation's manifest (``extra``), every worker's folded steps and the whole fold order.
  A ready checkpoint is hard-linked into ``STATE/keep/<worker>/<step>/`` before it is queued
  (:class:`~ckptavg.daemon.retain.Retainer`), so a worker that rotates it away loses nothing, and that
  copy is released only once its fold is durable: a crash between fold and persist re-folds it from
  the copy at the next start, exactly once; one between persist and release only releases it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ckptavg import hooks
from ckptavg.averaging.average import Average
from ckptavg.averaging.engine import Engine
from ckptavg.averaging.methods.elastic import Elastic
from ckptavg.averaging.placement import ensure_placed
from ckptavg.daemon.retain import Retainer
from ckptavg.errors import CheckpointVanishedError, CkptavgError, OutputError, UsageError
from ckptavg.progress import Progress
from ckptavg.reading.checkpoint import Checkpoint, open_checkpoint
from ckptavg.reading.discover import find_candidates
from ckptavg.reading.ready import check_ready
from ckptavg.reading.steps import step_from_name
from ckptavg.writing.atomic import atomic_write_bytes
from ckptavg.writing.export import lock_publisher, publish_average, remove_publish_orphans
from ckptavg.writing.state import StateStore

log = logging.getLogger(__name__)

__all__ = ["STATUS_FILE", "CentreConfig", "CentreService", "check_config"]

STATUS_FILE = "centre-status.json"  # in the state folder, beside (not instead of) the watch daemon's status.json
METRICS_FILE = "centre-metrics.jsonl"
NAME = "centre"  # OUT/centre


@dataclass(frozen=True)
class CentreConfig:
    workers: tuple[Path, ...]
    output: Path
    alpha: float
    state_dir: Path | None = None  # default OUT/.ckptavg
    poll: float = 2.0  # seconds between scans of the worker folders
    settle: float = 5.0  # seconds a bare file must stay unmodified (ready.py)
    marker: str | None = None
    order_wait: float = 60.0  # seconds a worker's later step waits for an earlier one still being written
    device: str = "cpu"
    threads: int = 1
    eval_python: str | None = None  # MOD:FUNC, called on each published centre
    eval_every: int = 1
    keep_generations: int = 2

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir) if self.state_dir is not None else Path(self.output) / ".ckptavg"


def _inside(a: Path, b: Path) -> bool:
    """Whether ``a`` is ``b`` or lies inside it (both resolved)."""
    return a == b or b in a.parents


def check_config(cfg: CentreConfig) -> CentreConfig:
    """``cfg`` with α checked and the folders resolved, or a clear error naming the option or folder."""
    alpha = Elastic.param("alpha").check(cfg.alpha, method="centre")  # OptionError: "a number in (0, 1]"
    if not cfg.workers:
        raise UsageError("give at least one worker run folder")
    workers = []
    for w in cfg.workers:
        w = Path(w)
        if w.exists() and not w.is_dir():
            raise UsageError("is not a folder; each WORKER_DIR is a worker's run folder (where it writes its "
                             "checkpoint-<step>/ folders or step files)", path=w)
        workers.append(w)
    real = [w.resolve() for w in workers]
    for i, a in enumerate(real):
        for j, b in enumerate(real):
            if i < j and a == b:
                same = (f"worker folder {workers[i]} is given twice" if workers[i] == workers[j] else
                        f"worker folders {workers[i]} and {workers[j]} are the same folder")
                raise UsageError(f"{same}; give each worker its own run folder (each checkpoint is folded once)")
            if i != j and a != b and _inside(a, b):
                raise UsageError(f"worker folder {workers[i]} lies inside worker folder {workers[j]}: its "
                                 "checkpoints would be found as both workers'; give the workers separate folders")
    for what, p in (("state folder", cfg.state_path), ("output folder", Path(cfg.output))):
        for w, r in zip(workers, real):
            if _inside(p.resolve(), r):
                raise UsageError(f"the {what} {p} is inside worker folder {w}; ckptavg never writes into a "
                                 "trainer's folders", hint="put -o (and --state) outside every worker folder")
    if not cfg.poll > 0 or not cfg.settle >= 0 or not cfg.order_wait >= 0:
        raise UsageError("--poll must be > 0 seconds, --settle and --order-wait >= 0 seconds")
    if cfg.eval_every < 1:
        raise UsageError("--eval-every must be a positive number of folds")
    return CentreConfig(**{**cfg.__dict__, "workers": tuple(workers), "alpha": alpha, "output": Path(cfg.output)})


@dataclass
class _Queued:
    worker: int
    step: int
    fingerprint: str
    kept: Path
    arrival: tuple[int, int, int]  # (newest mtime ns of its files, worker, step)


@dataclass
class _Blocker:
    step: int  # the smallest step of this worker that is not ready yet
    since: float = field(default_factory=time.monotonic)


class _Quiet(Progress):
    def checkpoint_done(self, ckpt: Checkpoint, nbytes: int, seconds: float) -> None:
        pass


def _newest_mtime_ns(files: list[Path]) -> int:
    try:
        return max(os.stat(f).st_mtime_ns for f in files)
    except (OSError, ValueError):
        return 0


class CentreService:
    """The loop: scan every worker → retain → fold one → persist → publish → (evaluate) → status."""

    def __init__(self, cfg: CentreConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.cfg = check_config(cfg)
        self.clock = clock
        self.store = StateStore(self.cfg.state_path, keep=self.cfg.keep_generations)
        self.stopping = threading.Event()
        self.state = "starting"
        self.paths: list[str] = []  # every worker ever folded (resolved), in the order first given: indexes
        self.active: list[int] = []  # indexes of this run's workers
        self.folded: dict[int, list[int]] = {}
        self.order: list[list[int]] = []  # [worker index, step] per fold, in fold order
        self.skipped: dict[int, dict[int, str]] = {}
        self.vanished: list[dict[str, Any]] = []
        self.queue: dict[tuple[int, int], _Queued] = {}
        self.blockers: dict[int, _Blocker] = {}
        self.last_error: str | None = None
        self.version: str | None = None
        self.metrics: dict[str, float] | None = None
        self._warned: set[Any] = set()
        self._ready_seen: dict[Path, Any] = {}
        self._lock_fd: int | None = None
        self.evaluator: Any = None

    # -- state ---------------------------------------------------------------------------------
    def _new_average(self) -> Average:
        return Average(NAME, Elastic(alpha=self.cfg.alpha), accum_dtype=torch.float32, device=self.engine.device)

    def _load(self) -> None:
        self.avg = self._new_average()
        extra = self.store.load([self.avg]) or {}
        self.paths = list(extra.get("workers", []))
        self.folded = {int(k): list(v) for k, v in extra.get("folded", {}).items()}
        self.order = [list(x) for x in extra.get("order", [])]
        self.skipped = {int(k): {int(s): why for s, why in v.items()} for k, v in extra.get("skipped", {}).items()}
        given = [str(w.resolve()) for w in self.cfg.workers]
        gone = [p for p in self.paths if p not in given]
        if gone:
            log.warning("the saved centre also folded worker(s) not given now: %s; their folds stay in it",
                        ", ".join(gone))
        for p in given:
            if p not in self.paths:
                self.paths.append(p)
        self.active = [self.paths.index(p) for p in given]
        for i in self.active:
            self.folded.setdefault(i, [])
            self.skipped.setdefault(i, {})

    def _persist(self) -> None:
        hooks.point("state.before-persist", generation=self.store.next_generation())
        extra = {"workers": self.paths, "alpha": self.cfg.alpha,
                 "folded": {str(i): steps for i, steps in sorted(self.folded.items())},
                 "order": self.order,
                 "skipped": {str(i): {str(s): w for s, w in sorted(v.items())} for i, v in sorted(self.skipped.items())}}
        self.store.save([self.avg], extra)

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> int:
        self.store.lock()
        try:
            self._lock_output()
            return self._run()
        finally:
            self.store.unlock()
            if self._lock_fd is not None:
                os.close(self._lock_fd)

    def _lock_output(self) -> None:
        """One daemon publishes into an output folder: a second one (another state folder) is refused."""
        self._lock_fd = lock_publisher(self.cfg.output, self.cfg.state_path)

    def _run(self) -> int:
        torch.set_num_threads(self.cfg.threads)
        self.engine = Engine(device=self.cfg.device, progress=_Quiet())
        for p in remove_publish_orphans(self.cfg.output):
            log.warning("removed %s, left by an interrupted publish", p)
        self._load()
        keep = self.cfg.state_path / "keep"
        self.retainers = {i: Retainer(keep / str(i), mode="link") for i in self.active}
        self._requeue_retained()
        if self.avg.slots and self._published_folds() != len(self.order):
            log.info("publishing the centre: the published folder lags the saved state (interrupted publish)")
            self._publish(self._newest_checkpoint())
        if self.cfg.eval_python:
            from ckptavg.evaluators.python import PythonEvaluator

            self.evaluator = PythonEvaluator(self.cfg.eval_python)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stopping.set())
        log.info("centre of %d worker(s), alpha %g: %s; %d fold(s) already in it; publishing %s",
                 len(self.active), self.cfg.alpha, ", ".join(str(w) for w in self.cfg.workers), len(self.order),
                 self.cfg.output / NAME)
        self.state = "watching"
        try:
            while not self.stopping.is_set():
                self._scan()
                nxt = self._next()
                if nxt is not None:
                    self._fold(nxt)
                    continue
                self._write_status()
                self.stopping.wait(self.cfg.poll)
        finally:
            self.state = "stopped"
            self._write_status()
            self.engine.close()
        log.info("stopped; the centre holds %d fold(s)", len(self.order))
        return 0

    def _requeue_retained(self) -> None:
        """Copies retained before the last stop: folded (durably) ones are released, the others queued again."""
        for i in self.active:
            r = self.retainers[i]
            for step in r.steps():
                if step in self.folded[i] or step in self.skipped[i]:
                    r.release(step)
                    continue
                try:
                    ckpt = open_checkpoint(r.path(step), step=step)
                except CkptavgError as e:
                    log.warning("the retained copy of worker %d step %d is unusable (%s); released", i, step, e)
                    r.release(step)
                    continue
                self.queue[(i, step)] = _Queued(i, step, ckpt.fingerprint, r.path(step),
                                                (_newest_mtime_ns(list(ckpt.files)), i, step))
                log.info("worker %d step %d was retained but not folded before the last stop: queued again", i, step)

    def _warn_once(self, key: Any, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    def _scan(self) -> None:
        for i, root in zip(self.active, self.cfg.workers):
            if not root.is_dir():
                self._warn_once(("missing", i), "worker folder %s does not exist (yet); waiting for it", root)
                continue
            try:
                candidates = find_candidates(root)
            except CkptavgError:
                continue
            last = self.folded[i][-1] if self.folded[i] else None
            waiting: int | None = None
            for path in candidates:
                step = step_from_name(path.name)
                if step is None or step in self.skipped[i] or (i, step) in self.queue or step in self.folded[i]:
                    continue
                if last is not None and step < last:
                    why = f"arrived after step {last} of the same worker was folded (steps are folded in order)"
                    self._warn_once(("late", i, step), "not folding %s (worker %d step %d): %s", path, i, step, why)
                    continue
                try:
                    ready = check_ready(path, settle=self.cfg.settle, marker=self.cfg.marker, clock=self.clock,
                                        seen=self._ready_seen)
                except OSError:
                    continue
                if not ready.ready:
                    if ready.state == "bad":
                        self._warn_once(("bad", i, step), "not folding %s: %s", path, ready.reason)
                    elif waiting is None:
                        waiting = step
                    continue
                try:
                    ckpt = ready.checkpoint or open_checkpoint(path)
                except CkptavgError as e:
                    self._warn_once(("open", i, step), "not folding %s: %s", path, e)
                    continue
                try:
                    kept = self.retainers[i].retain(ckpt, step)
                except CheckpointVanishedError as e:
                    self._vanish(i, step, path, str(e))
                    continue
                except (CkptavgError, OSError) as e:
                    self._warn_once(("retain", i, step), "cannot keep worker %d step %d (%s): %s", i, step, path, e)
                    continue
                self.queue[(i, step)] = _Queued(i, step, ckpt.fingerprint, kept,
                                                (_newest_mtime_ns(list(ckpt.files)), i, step))
                log.debug("queued worker %d step %d (%s)", i, step, path)
            b = self.blockers.get(i)
            if waiting is None:
                self.blockers.pop(i, None)
            elif b is None or b.step != waiting:
                self.blockers[i] = _Blocker(waiting)

    def _vanish(self, i: int, step: int, path: Path, why: str) -> None:
        """A ready checkpoint deleted before it could be kept: said once, and in the status (never silent)."""
        if ("vanished", i, step) in self._warned:
            return
        self._warn_once(("vanished", i, step), "worker %d step %d vanished before it could be kept (%s); the "
                        "centre goes on without it", i, step, why)
        self.vanished.append({"worker": i, "step": step, "path": str(path), "time": self.clock()})
        self.last_error = f"worker {i} step {step} vanished before it was kept"

    def _next(self) -> _Queued | None:
        """The next checkpoint to fold: of each worker's smallest queued step (unless an earlier step of that
        worker is still being written, for at most ``order_wait`` seconds), the earliest arrival."""
        heads: dict[int, _Queued] = {}
        for q in self.queue.values():
            if q.worker not in heads or q.step < heads[q.worker].step:
                heads[q.worker] = q
        eligible = []
        for i, q in heads.items():
            b = self.blockers.get(i)
            if b is not None and b.step < q.step:
                if time.monotonic() - b.since < self.cfg.order_wait:
                    continue
                self._warn_once(("order-wait", i, b.step), "worker %d step %d is still not finished after %g s; "
                                "folding its later step %d (step %d will be skipped if it lands)", i, b.step,
                                self.cfg.order_wait, q.step, b.step)
            eligible.append(q)
        return min(eligible, key=lambda q: q.arrival) if eligible else None

    def _fold(self, q: _Queued) -> None:
        i, step = q.worker, q.step
        del self.queue[(i, step)]
        self.state = "folding"
        started = time.perf_counter()
        try:
            ckpt = open_checkpoint(q.kept, step=step)
            if ckpt.fingerprint != q.fingerprint:
                raise CkptavgError("changed after it was queued", path=q.kept)
            hooks.point("fold.start", step=step, path=q.kept, watch=self.cfg.workers[self.active.index(i)])
            ensure_placed([self.avg], ckpt.tensors.values(), engine=self.engine)
            self.engine.fold(ckpt, [self.avg], ident=(i, step))
        except Exception as e:  # noqa: BLE001 - a checkpoint that cannot be folded never stops the daemon
            text = str(e) if isinstance(e, CkptavgError) else f"{type(e).__name__}: {str(e).strip()[:300]}"
            self.last_error = f"worker {i} step {step}: {text}"
            log.warning("skipping worker %d step %d: %s", i, step, text)
            self.avg = self._new_average()  # back to the last committed centre (every fold is committed)
            self.store.load([self.avg])
            self.skipped[i][step] = text
            self._persist()
            self.retainers[i].release(step)
            self.state = "watching"
            return
        self.folded[i].append(step)
        self.order.append([i, step])
        self._persist()  # the fold, the folded steps and the order: one generation, committed together
        log.info("folded worker %d step %d into the centre (fold %d) in %.2f s", i, step, len(self.order),
                 time.perf_counter() - started)
        self._publish(ckpt)
        self.retainers[i].release(step)  # durable and published: the copy is no longer needed
        if self.evaluator is not None and len(self.order) % self.cfg.eval_every == 0:
            self._evaluate()
        self.state = "watching"
        self._write_status()

    # -- publishing ----------------------------------------------------------------------------
    def _newest_checkpoint(self) -> Checkpoint | None:
        """A checkpoint to take config files from when publishing at start: a queued or a worker's newest one."""
        for q in self.queue.values():
            return open_checkpoint(q.kept, step=q.step)
        if self.order:
            i = self.order[-1][0]
            for w in self.cfg.workers:
                if str(w.resolve()) == self.paths[i]:
                    for path in reversed(find_candidates(w) if w.is_dir() else []):
                        try:
                            return open_checkpoint(path)
                        except CkptavgError:
                            continue
        return None

    def _published_folds(self) -> int | None:
        try:
            return int(json.loads((self.cfg.output / NAME / "ckptavg.json").read_text())["folds"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _publish(self, newest: Checkpoint | None) -> None:
        if newest is None:
            log.warning("cannot publish the centre: no checkpoint to take its config files from yet")
            return
        try:
            version = publish_average(self.avg, self.cfg.output / NAME, newest=newest, aliases=newest.aliases,
                                      extra={"daemon": "centre", "alpha": self.cfg.alpha, "folds": len(self.order),
                                             "order": self.order[-1] if self.order else None})
        except (OutputError, OSError) as e:
            self.last_error = f"cannot publish into {self.cfg.output}: {e}"
            log.warning("%s; published again after the next fold", self.last_error)
            return
        self.version = version.name

    def _evaluate(self) -> None:
        from ckptavg.evaluators import Candidate

        folder = Path(os.path.realpath(self.cfg.output / NAME))
        try:
            metrics = self.evaluator.evaluate(Candidate(NAME, len(self.order), folder, info={"alpha": self.cfg.alpha}))
        except Exception as e:  # noqa: BLE001 - an evaluation never stops the centre
            log.warning("evaluating the centre after fold %d failed: %s", len(self.order), e)
            return
        self.metrics = dict(metrics)
        line = {"fold": len(self.order), "worker": self.order[-1][0], "step": self.order[-1][1],
                "time": self.clock(), "version": self.version, **self.metrics}
        with open(self.cfg.state_path / METRICS_FILE, "a") as f:
            f.write(json.dumps(line) + "\n")

    # -- status --------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(), "state": self.state, "updated": self.clock(), "alpha": self.cfg.alpha,
            "output": str(self.cfg.output), "published": str(self.cfg.output / NAME), "version": self.version,
            "workers": self.paths, "active": self.active,
            "folds": len(self.order), "order": self.order,
            "folded": {str(i): v for i, v in sorted(self.folded.items())},
            "queued": sorted([q.worker, q.step] for q in self.queue.values()),
            "waiting_for": {str(i): b.step for i, b in sorted(self.blockers.items())},
            "skipped": {str(i): {str(s): w for s, w in v.items()} for i, v in sorted(self.skipped.items()) if v},
            "vanished": self.vanished[-50:], "last_error": self.last_error, "metrics": self.metrics,
        }

    def _write_status(self) -> None:
        try:
            atomic_write_bytes(self.cfg.state_path / STATUS_FILE, (json.dumps(self.status(), indent=1) + "\n").encode())
        except OSError as e:
            log.warning("cannot write status: %s", e)
