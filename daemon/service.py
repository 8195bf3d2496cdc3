"""The sidecar's loop: find ready checkpoints, keep them, fold them in step order exactly once,
persist, publish, report.

Exactly once: a checkpoint is identified by its step plus a header fingerprint.
The manifest (``ckptavg.writing.state``) records what was folded; after a crash the
daemon resumes from the last committed generation and re-folds, from the
retained copies, exactly the checkpoints after it. A checkpoint whose fold
fails part-way (NaN/Inf, a file changed or vanished) is rolled back and skipped
with a warning; the averages never hold half a checkpoint.

Signals only set flags (gunicorn's arbiter pattern): SIGTERM/SIGINT stop after
the current fold (state persisted, averages published, exit 0), SIGHUP reloads
the configuration's publishing and scanning knobs.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import platform
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ckptavg import hooks
from ckptavg.averaging.average import Average
from ckptavg.averaging.engine import Engine
from ckptavg.averaging.placement import ensure_placed
from ckptavg.daemon.config import WatchConfig, load_config
from ckptavg.daemon.evaluation import EvalRound, Evaluation, snapshot_model_folder
from ckptavg.daemon.notify import Notifier
from ckptavg.daemon.retain import Retainer, probe_link
from ckptavg.daemon.watcher import Watcher
from ckptavg.errors import CkptavgError, UsageError
from ckptavg.evaluators import Candidate
from ckptavg.oneshot import AverageSpec, average_checkpoints, build_averages
from ckptavg.progress import Progress
from ckptavg.reading.checkpoint import Checkpoint, open_checkpoint
from ckptavg.reading.discover import find_candidates
from ckptavg.reading.ready import check_ready
from ckptavg.reading.steps import step_from_name
from ckptavg.units import format_bytes
from ckptavg.writing.atomic import atomic_write_bytes, link_or_copy, remove_orphans
from ckptavg.writing.export import copy_meta_files, publish_average
from ckptavg.writing.state import StateStore

log = logging.getLogger(__name__)

__all__ = ["Service", "set_idle_io"]


def set_idle_io() -> bool:
    """Put this process in the idle I/O scheduling class (Linux ``ioprio_set``); False where unavailable."""
    numbers = {"x86_64": 251, "aarch64": 30, "ppc64le": 273, "s390x": 282}
    nr = numbers.get(platform.machine())
    if nr is None:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(nr, 1, 0, 3 << 13) == 0  # IOPRIO_WHO_PROCESS, self, IOPRIO_CLASS_IDLE
    except OSError:
        return False


class _Quiet(Progress):
    """The service logs one line per fold itself."""

    def checkpoint_done(self, ckpt: Checkpoint, nbytes: int, seconds: float) -> None:
        pass


def _written_at(ckpt: Checkpoint) -> float | None:
    """When the trainer wrote a checkpoint: its newest weight file's mtime (kept by hard links and copy2)."""
    try:
        return max(os.stat(f).st_mtime for f in ckpt.files)
    except (OSError, ValueError):
        return None


class Service:
    def __init__(self, cfg: WatchConfig, *, config_path: Path | None = None, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.clock = clock
        self.store = StateStore(cfg.state_path)
        self.notifier = Notifier()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.reload = threading.Event()
        self.watcher = Watcher(cfg.watch, self.wake, poll=cfg.poll)
        self.queue: dict[int, tuple[str, Path]] = {}  # step -> (fingerprint, retained path)
        self.folded: dict[int, str] = {}  # step -> fingerprint
        self.skipped: dict[int, str] = {}
        self.unpersisted: list[int] = []
        self.since_publish = 0
        self.last_step: int | None = None
        self.newest_seen: int | None = None
        self.last_error: str | None = None
        self.last_fold: dict[str, Any] | None = None
        self.folding: int | None = None
        self._warned: set[tuple[int, str]] = set()
        self.state = "starting"
        self.evaluation: Evaluation | None = None
        self.hub: Any = None
        self.since_eval = 0

    # -- set-up --------------------------------------------------------------------------------
    def _new_averages(self) -> list[Average]:
        specs = [AverageSpec(a.method, a.options, a.name) for a in self.cfg.averages]
        averages = build_averages(specs, rules=self.cfg.rules, accum_dtype=getattr(torch, self.cfg.accum_dtype),
                                  on_shape_change=self.cfg.on_shape_change, device=self.engine.device,
                                  memory_budget=self.cfg.memory_budget, store_dir=self.cfg.state_path / "store")
        for avg, a in zip(averages, self.cfg.averages):
            avg.rules = tuple(a.rules) + tuple(self.cfg.rules)
        return averages

    def _close_stores(self) -> None:
        for avg in getattr(self, "averages", []):
            if avg.store is not None:
                avg.slots.clear()
                avg.store.close()

    def _load_state(self) -> None:
        self._close_stores()  # a rollback replaces the averages: their disk stores are closed first
        self.averages = self._new_averages()
        extra = self.store.load(self.averages) or {}
        self.folded = {int(k): v for k, v in extra.get("folded", {}).items()}
        self.skipped = {int(k): v for k, v in extra.get("skipped", {}).items()}
        self.last_step = extra.get("last_step")
        self.unpersisted = []

    def _install_signals(self) -> None:
        def stop(signum: int, frame: Any) -> None:
            self.stopping.set()
            self.wake.set()

        def hup(signum: int, frame: Any) -> None:
            self.reload.set()
            self.wake.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, hup)

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> int:
        self.store.lock()
        try:
            return self._run()
        finally:
            self.watcher.stop()
            self.store.unlock()

    def _run(self) -> int:
        if self.cfg.nice:
            os.nice(self.cfg.nice)
        torch.set_num_threads(self.cfg.threads)
        if self.cfg.ionice_idle and not set_idle_io():
            log.info("idle I/O priority is not available here; reading at normal priority")
        keep = self.cfg.state_path / "keep"
        mode = self.cfg.keep_for_lawa
        if mode != "copy" and self.cfg.watch.exists():
            try:
                probe_link(self.cfg.watch, keep)
                mode = "link"
            except UsageError:
                if mode == "link":
                    raise
                log.warning("state folder %s is on another filesystem than %s: checkpoints LAWA still needs are "
                            "copied, not hard-linked", keep, self.cfg.watch)
                mode = "copy"
        self.retainer = Retainer(keep, mode="copy" if mode == "copy" else "link")
        self.engine = Engine(device=self.cfg.device, progress=_Quiet())
        self._remove_orphans()
        self._load_state()
        if any(self._published_step(a) != a.folded[-1].step for a in self.averages if a.folded):
            log.info("publishing the averages: the published folders lag the saved state (interrupted publish)")
            self._publish()
        self._start_publishing()
        self._release_unneeded()
        if threading.current_thread() is threading.main_thread():
            self._install_signals()
        watchdog_usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        ping = watchdog_usec / 2e6 if watchdog_usec else None
        log.info("watching %s: %s; state in %s (%d checkpoint(s) already folded)", self.cfg.watch,
                 ", ".join(a.name for a in self.averages), self.cfg.state_path, len(self.folded))
        self.state = "watching"
        self.notifier.ready(f"watching {self.cfg.watch}")
        last_ping = 0.0
        try:
            while not self.stopping.is_set():
                if self.reload.is_set():
                    self.reload.clear()
                    self._reload()
                self.wake.clear()
                self.watcher.ensure()
                self._scan()
                if ping is not None and time.monotonic() - last_ping >= ping:
                    self.notifier.watchdog()
                    last_ping = time.monotonic()
                if self.queue:
                    self._fold(min(self.queue))
                    continue
                self._write_status()
                timeout = self.cfg.poll_interval if ping is None else min(self.cfg.poll_interval, ping)
                self.wake.wait(timeout)
                if self.wake.is_set() and not self.stopping.is_set():
                    self.stopping.wait(min(0.5, self.cfg.settle))  # let a burst of events settle
        finally:
            self.state = "stopping"
            self.notifier.stopping("persisting and publishing before exit")
            if self.unpersisted:
                self._persist()
            if self.since_publish:
                self._publish()
            if self.evaluation is not None:
                self.evaluation.close()
            if self.hub is not None:
                self.hub.close()
            self.state = "stopped"
            self._write_status()
            self.engine.close()
            self._close_stores()
        log.info("stopped after folding %d checkpoint(s)", len(self.folded))
        return 0

    def _remove_orphans(self) -> None:
        """Staging folders a crash left beside the published averages (they never replaced anything)."""
        for p in remove_orphans(self.cfg.output):
            log.warning("removed %s, left by an interrupted publish", p)

    def _reload(self) -> None:
        if self.config_path is None:
            log.warning("SIGHUP: no config file to reload (started with flags)")
            return
        try:
            new = load_config(self.config_path)
        except CkptavgError as e:
            log.warning("SIGHUP: keeping the running configuration: %s", e)
            return
        if new.averages != self.cfg.averages or new.watch != self.cfg.watch or new.state_path != self.cfg.state_path:
            log.warning("SIGHUP: averages, watch and state_dir only change on restart; reloading the other keys")
            new = WatchConfig(**{**new.__dict__, "averages": self.cfg.averages, "watch": self.cfg.watch,
                                 "state_dir": self.cfg.state_dir, "output": self.cfg.output})
        self.cfg = new
        self.watcher.poll = new.poll
        log.info("SIGHUP: configuration reloaded from %s", self.config_path)

    # -- discovery -----------------------------------------------------------------------------
    def _warn_once(self, step: int, what: str, *args: Any) -> None:
        if (step, what) not in self._warned:
            self._warned.add((step, what))
            log.warning(what, *args)

    def _scan(self) -> None:
        if not self.cfg.watch.is_dir():
            return
        try:
            candidates = find_candidates(self.cfg.watch)
        except CkptavgError:
            return
        for path in candidates:
            named = step_from_name(path.name)
            if named is not None and (named in self.folded or named in self.queue or named in self.skipped):
                continue
            ready = check_ready(path, settle=self.cfg.settle, marker=self.cfg.marker, clock=self.clock)
            if not ready.ready:
                if ready.state == "bad":
                    self._warn_once(named or -1, "not folding %s: %s", path, ready.reason)
                continue
            try:
                ckpt = ready.checkpoint or open_checkpoint(path)  # marker/DCP rules do not open it
            except CkptavgError as e:
                self._warn_once(named or -1, "not folding %s: %s", path, e)
                continue
            if ckpt.step is None:
                self._warn_once(-1, "not folding %s: no training step in its name", path)
                continue
            step = ckpt.step
            self.newest_seen = step if self.newest_seen is None else max(self.newest_seen, step)
            if step in self.folded or step in self.queue:
                if self.folded.get(step, self.queue.get(step, ("",))[0]) != ckpt.fingerprint:
                    self._warn_once(step, "step %d at %s differs from the one already taken; ignored", step, path)
                continue
            if self.last_step is not None and step <= self.last_step:
                self._warn_once(step, "late checkpoint %s (step %d <= %d, already folded past it): skipped",
                                path, step, self.last_step)
                continue
            try:
                kept = self.retainer.retain(ckpt, step)
            except CkptavgError as e:
                self._warn_once(step, "skipping step %d: %s", step, e)
                continue
            self.queue[step] = (ckpt.fingerprint, kept)
            log.debug("queued step %d (%s)", step, path)

    # -- folding ------------------------------------------------------------------------------
    def _history(self, step: int) -> Checkpoint:
        return open_checkpoint(self.retainer.path(step), step=step)

    def _fold(self, step: int) -> None:
        fingerprint, path = self.queue.pop(step)
        self.state, self.folding = "folding", step
        self._write_status()
        started = time.perf_counter()
        try:
            ckpt = open_checkpoint(path, step=step)
            if ckpt.fingerprint != fingerprint:
                raise CkptavgError("changed after it was queued", path=path)
            hooks.point("fold.start", step=step, path=path, watch=self.cfg.watch)
            ensure_placed(self.averages, ckpt.tensors.values(), engine=self.engine)
            nbytes = self.engine.fold(ckpt, self.averages, ident=step, history=self._history)
        except CkptavgError as e:
            self.last_error = f"step {step}: {e}"
            log.warning("skipping checkpoint step %d: %s", step, e)
            self._rollback()
            self.skipped[step] = fingerprint
            self.state, self.folding = "watching", None
            self.retainer.release(step)
            self._persist()  # the skip is part of the state: never retried after a restart
            return
        seconds = time.perf_counter() - started
        self.folded[step] = fingerprint
        self.last_step = step
        self.unpersisted.append(step)
        self.since_publish += 1
        self.last_fold = {"step": step, "bytes": nbytes, "seconds": round(seconds, 3),
                          "gbps": round(nbytes / seconds / 1e9, 3) if seconds else None}
        log.info("folded step %d: %s in %.2f s into %s", step, format_bytes(nbytes), seconds,
                 ", ".join(a.name for a in self.averages if a.method.accepts(step)))
        if len(self.unpersisted) >= self.cfg.persist_every:
            self._persist()
        if self.since_publish >= self.cfg.publish_every:
            self._publish()
        if self.evaluation is not None:
            self.evaluation.note_checkpoint(_written_at(ckpt))
            self.since_eval += 1
            if self.since_eval >= self.evaluation.cfg.every:
                self._schedule_eval(ckpt)
        self._release_unneeded()
        self.state, self.folding = "watching", None
        self._write_status()
        self.notifier.status(f"folded step {step}; {len(self.queue)} queued")

    def _rollback(self) -> None:
        """Back to the last committed state, then re-fold what had been folded since."""
        redo, folded, skipped = list(self.unpersisted), dict(self.folded), dict(self.skipped)
        self._load_state()
        for step in redo:
            ckpt = self._history(step)
            ensure_placed(self.averages, ckpt.tensors.values(), engine=self.engine)
            self.engine.fold(ckpt, self.averages, ident=step, history=self._history)
        self.folded, self.skipped, self.unpersisted = folded, skipped, redo
        if redo:
            self.last_step = redo[-1]

    def _persist(self) -> None:
        hooks.point("state.before-persist", generation=self.store.next_generation())
        extra = {"folded": {str(k): v for k, v in sorted(self.folded.items())},
                 "skipped": {str(k): v for k, v in sorted(self.skipped.items())},
                 "last_step": self.last_step}
        self.store.save(self.averages, extra)
        self.unpersisted = []

    def _publish(self) -> None:
        if self.last_step is None:
            return
        newest = self._history(self.last_step)
        for avg in self.averages:
            if not avg.slots:
                continue  # e.g. SWA before its start step
            publish_average(avg, self.cfg.output / avg.name, newest=newest, aliases=newest.aliases,
                            extra={"daemon": True})
        self.since_publish = 0

    # -- evaluation and the best model -----------------------------------------------------------
    def _start_publishing(self) -> None:
        if self.cfg.hub is not None:
            from huggingface_hub.utils import disable_progress_bars

            from ckptavg.publishing.hub import HubPublisher, HubTarget

            disable_progress_bars()  # tqdm bars would flood the journal
            h = self.cfg.hub
            self.hub = HubPublisher(HubTarget(h.repo, revision=h.revision, private=h.private, endpoint=h.endpoint),
                                    state_dir=self.cfg.state_path)
            self.hub.start()
        if self.cfg.evaluate is not None:
            self.evaluation = Evaluation(self.cfg.evaluate, output=self.cfg.output, state_path=self.cfg.state_path,
                                         on_best=self._on_best, clock=self.clock)
            self.evaluation.start()
            self.evaluation.expire()
            if self.last_step is not None and self.evaluation.needs_round(self.last_step):
                log.info("evaluating step %d: not evaluated (successfully) before the last stop", self.last_step)
                self._schedule_eval()

    def _on_best(self, folder: Path, best: dict[str, Any]) -> None:
        if self.hub is not None:
            self.hub.submit(folder, step=best["step"],
                            message=f"ckptavg: best model {best['candidate']} at step {best['step']} "
                                    f"({best['metric']}={best['value']:.6g})")

    def _schedule_eval(self, newest: Checkpoint | None = None) -> None:
        """Snapshot the candidates of the current state and hand them to the eval worker (never waits for it)."""
        assert self.evaluation is not None and self.last_step is not None
        self.since_eval = 0
        if self.since_publish:
            self._publish()
        step = self.last_step
        newest = newest or self._history(step)  # the fold's own (retained) checkpoint: not opened again
        rnd: EvalRound = self.evaluation.new_round(step, _written_at(newest))
        try:
            if self.evaluation.cfg.raw:
                self._snapshot_raw(newest, rnd.folder / "raw")
                rnd.candidates.append(Candidate("raw", step, rnd.folder / "raw", kind="raw",
                                                info={"method": None, "options": None, "steps": [step]}))
            for avg in self.averages:
                src = self.cfg.output / avg.name
                if not avg.slots or not src.is_dir():
                    continue
                dst = rnd.folder / avg.name
                snapshot_model_folder(src, dst)
                rnd.candidates.append(Candidate(avg.name, step, dst, kind="average",
                                                info={"method": avg.method.name, "options": avg.method.options(),
                                                      "steps": [f.step for f in avg.folded]}))
        except (OSError, CkptavgError) as e:
            log.warning("cannot snapshot the candidates of step %d for evaluation: %s", step, e)
            shutil.rmtree(rnd.folder, ignore_errors=True)
            return
        self.evaluation.submit(rnd)

    def _snapshot_raw(self, ckpt: Checkpoint, dst: Path) -> None:
        if ckpt.format.startswith("safetensors") and ckpt.path.is_dir():
            dst.mkdir(parents=True)
            for f in ckpt.files:
                link_or_copy(f, dst / f.name)
            for index in ckpt.path.glob("*.safetensors.index.json"):
                link_or_copy(index, dst / index.name)
            copy_meta_files(ckpt.meta_dir or ckpt.path, dst)
            return
        # a pickle or a bare file: export it as a safetensors model folder (a mean of one checkpoint is itself)
        raw = build_averages([AverageSpec("uniform", name="raw")], device="cpu")
        with Engine(device="cpu", progress=_Quiet()) as engine:
            average_checkpoints([ckpt], raw, dst, engine=engine)

    def _published_step(self, avg: Average) -> int | None:
        try:
            steps = json.loads((self.cfg.output / avg.name / "ckptavg.json").read_text())["steps"]
            return steps[-1] if steps else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _needed(self) -> set[int]:
        needed = set(self.queue) | set(self.unpersisted)
        if self.last_step is not None:
            needed.add(self.last_step)
        for avg in self.averages:  # what each method will still read (LAWA: the members it must subtract)
            needed.update(avg.needs())
        return needed

    def _release_unneeded(self) -> None:
        needed = self._needed()
        for step in self.retainer.steps():
            if step not in needed:
                self.retainer.release(step)

    # -- status -------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        lag = (self.newest_seen - self.last_step) if self.newest_seen is not None and self.last_step is not None else None
        return {
            "pid": os.getpid(), "state": self.state, "watch": str(self.cfg.watch), "output": str(self.cfg.output),
            "watcher": self.watcher.mode, "updated": self.clock(),
            "averages": {a.name: {"method": a.method.name, "options": a.method.options(), "folded": len(a.folded),
                                  "last_step": a.folded[-1].step if a.folded else None} for a in self.averages},
            "folding_step": self.folding, "last_folded_step": self.last_step, "newest_seen_step": self.newest_seen,
            "lag_steps": lag,
            "queued": sorted(self.queue), "skipped": sorted(self.skipped), "last_error": self.last_error,
            "last_fold": self.last_fold,
            "evaluation": self.evaluation.status() if self.evaluation is not None else None,
            "hub": self.hub.status() if self.hub is not None else None,
        }

    def _write_status(self) -> None:
        try:
            atomic_write_bytes(self.cfg.state_path / "status.json", json.dumps(self.status(), indent=1).encode())
        except CkptavgError as e:
            log.warning("cannot write status: %s", e)
