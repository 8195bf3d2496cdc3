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
from ckptavg.daemon.evaluation import EvalRound, Evaluation, snapshot_checkpoint, snapshot_model_folder
from ckptavg.daemon.notify import Notifier
from ckptavg.daemon.remote import start_mirror, stop_mirror
from ckptavg.daemon.retain import Retainer, probe_link
from ckptavg.daemon.trajectory import Trajectory, file_ids, save_steps_of
from ckptavg.daemon.watcher import Watcher
from ckptavg.errors import CheckpointChangedError, CkptavgError, OutputError, UsageError
from ckptavg.evaluators import Candidate
from ckptavg.oneshot import AverageSpec, build_averages
from ckptavg.progress import Progress
from ckptavg.reading.checkpoint import Checkpoint, open_checkpoint
from ckptavg.reading.discover import find_candidates
from ckptavg.reading.ready import check_ready
from ckptavg.reading.steps import step_from_name
from ckptavg.redact import warn_once
from ckptavg.units import format_bytes
from ckptavg.writing.export import lock_publisher, publish_average, remove_publish_orphans
from ckptavg.writing.state import StateStore

log = logging.getLogger(__name__)

__all__ = ["Service", "set_idle_io"]


def _newest_mtime_ns(path: Path) -> int | None:
    """The newest mtime of a checkpoint's files (a folder's entries, or the file), or None if it is gone."""
    try:
        files = [f for f in Path(path).iterdir() if f.is_file()] if Path(path).is_dir() else [Path(path)]
        return max(f.stat().st_mtime_ns for f in files)
    except (OSError, ValueError):
        return None


def _retained_files(ckpt: Checkpoint, kept: Path) -> list[Path]:
    """The retained copies of ``ckpt``'s weight files (``kept``: its retained folder, or the single file)."""
    return [kept / f.name for f in ckpt.files] if kept.is_dir() else [kept]


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
        self.store = StateStore(cfg.state_path, keep=cfg.keep_generations)
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
        self.trajectory = Trajectory()
        self.rewinds: list[dict[str, Any]] = []  # each rewind handled: at which step, back to which
        self.halted: str | None = None  # folding stopped (rewind_too_far = "stop"): why
        self.degraded: str | None = None  # output (state or published folders) cannot be written: why
        self._retry_at = 0.0
        self._backoff = 1.0
        self._ready_seen: dict[Path, Any] = {}  # check_ready's memory for files with mtimes in the future
        # kept generations: (number, last folded step, the retained steps a rollback to it would read again)
        self._gen_steps: list[tuple[int, int | None, list[int]]] = []
        self._waiting = False
        self._publisher_lock: int | None = None

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

    def _load_state(self, *, at_most: int | None = None) -> None:
        """The averages and bookkeeping of the newest intact generation (``at_most``: no newer than that one)."""
        self._close_stores()  # a rollback replaces the averages: their disk stores are closed first
        self.averages = self._new_averages()
        extra = self.store.load(self.averages, at_most=at_most) or {}
        self.folded = {int(k): v for k, v in extra.get("folded", {}).items()}
        self.skipped = {int(k): v for k, v in extra.get("skipped", {}).items()}
        self.last_step = extra.get("last_step")
        self.trajectory = Trajectory.from_json(extra.get("trajectory"))
        self.rewinds = list(extra.get("rewinds", []))
        self.unpersisted = []
        self._gen_steps = [(g.generation, g.extra.get("last_step"), list(g.extra.get("needs", [])))
                           for g in self.store.history()]

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
        self._check_ownership()
        self.store.lock()
        mirror = None
        try:
            self._lock_output()
            mirror = start_mirror(self.cfg, wake=self.wake)  # a run in object storage: mirrored for the scan
            return self._run()
        finally:
            stop_mirror(mirror)
            self.watcher.stop()
            self.store.unlock()
            if self._publisher_lock is not None:
                os.close(self._publisher_lock)

    def _check_ownership(self) -> None:
        """The state folder must be the daemon's own: never inside the watched run (the trainer's rotation would
        delete it, and the daemon would write into the trainer's folders)."""
        state, watch = self.cfg.state_path.resolve(), self.cfg.watch.resolve()
        if state == watch or watch in state.parents:
            raise UsageError(f"the state folder {self.cfg.state_path} is inside the watched run {self.cfg.watch}; "
                             "ckptavg never writes into the trainer's folders",
                             hint="set state_dir (--state-dir) outside the run, e.g. the default OUTPUT/.ckptavg")
        if state in watch.parents:
            raise UsageError(f"the state folder {self.cfg.state_path} contains the watched run {self.cfg.watch}",
                             hint="set state_dir (--state-dir) to a folder of its own")

    def _lock_output(self) -> None:
        """One daemon publishes into an output folder: a second one (another state folder) is refused."""
        self._publisher_lock = lock_publisher(self.cfg.output, self.cfg.state_path)

    def _run(self) -> int:
        if self.cfg.nice:
            os.nice(self.cfg.nice)
        torch.set_num_threads(self.cfg.threads)
        if self.cfg.ionice_idle and not set_idle_io():
            log.info("idle I/O priority is not available here; reading at normal priority")
        self.retainer = self._make_retainer()
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
        if not self.cfg.watch.is_dir():
            self._note_missing_run()
        self.notifier.ready(f"watching {self.cfg.watch}")
        last_ping = 0.0
        try:
            while not self.stopping.is_set():
                if self.reload.is_set():
                    self.reload.clear()
                    self._reload()
                self.wake.clear()
                self.watcher.ensure()
                if self.degraded is not None and time.monotonic() >= self._retry_at:
                    self._retry_output()
                self._scan()
                if ping is not None and time.monotonic() - last_ping >= ping:
                    self.notifier.watchdog()
                    last_ping = time.monotonic()
                if self.queue and self.halted is None:
                    self._fold(min(self.queue))
                    continue
                self._write_status()
                timeout = self.cfg.poll_interval if ping is None else min(self.cfg.poll_interval, ping)
                if self.degraded is not None:
                    timeout = min(timeout, max(0.05, self._retry_at - time.monotonic()))
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
            if self.degraded is not None:
                log.warning("stopping while degraded (%s): the last %d fold(s) were not saved; they are folded again "
                            "from the retained checkpoints at the next start", self.degraded, len(self.unpersisted))
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

    def _make_retainer(self) -> Retainer:
        """Where checkpoints LAWA still needs are kept: hard links into ``STATE/keep`` where the state folder shares
        the run's filesystem (``keep_for_lawa``), copies otherwise."""
        keep, mode = self.cfg.state_path / "keep", self.cfg.keep_for_lawa
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
        return Retainer(keep, mode="copy" if mode == "copy" else "link")

    def _remove_orphans(self) -> None:
        """Staging folders a crash left beside the published averages (they never replaced anything)."""
        best_grace = self.cfg.evaluate.best_grace if self.cfg.evaluate is not None else 600.0
        for p in remove_publish_orphans(self.cfg.output, best_grace=best_grace):
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

    def _note_missing_run(self) -> None:
        if not self._waiting:
            log.warning("%s does not exist (yet); waiting for it to appear (its parent folder is watched for it)",
                        self.cfg.watch)
            self._waiting = True

    def _scan(self) -> None:
        if not self.cfg.watch.is_dir():
            self._note_missing_run()
            return
        if self._waiting:
            log.info("%s appeared; watching it", self.cfg.watch)
            self._waiting = False
        try:
            candidates = find_candidates(self.cfg.watch)
        except CkptavgError:
            return
        rewinds: dict[int, tuple[str, Path]] = {}  # step -> (why, the checkpoint): where the trainer went back to
        # one instant for the whole scan: judged one by one on a running clock, a checkpoint written after another
        # could turn quiet while the scan still reads the earlier one, be taken first, and make it "late"
        now = self.clock()
        for step in sorted(self.folded):  # a folded step whose files the trainer re-wrote
            if self.trajectory.source_state(step) == "changed":
                src = Path(self.trajectory.sources[step]["path"])
                if self._ready(src, rewritten=True, now=now) is not None:
                    rewinds[step] = (f"step {step} ({src}) was re-written after it was folded", src)
        for path in candidates:
            named = step_from_name(path.name)
            if named is not None and (named in self.folded or named in self.queue or named in self.skipped):
                continue
            if named is not None and named in self.trajectory.abandoned and self._still_abandoned(named, path):
                continue
            ckpt = self._ready(path, now=now)
            if ckpt is None:
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
            if step in self.trajectory.abandoned and self.trajectory.is_abandoned(step, ckpt.files):
                continue
            if self.last_step is not None and step <= self.last_step:
                later = [s for s in self.folded if s > step]
                if all(self.trajectory.source_state(s) == "same" for s in later):
                    self._warn_once(step, "late checkpoint %s (step %d <= %d, already folded past it, and those "
                                    "checkpoints are unchanged): skipped", path, step, self.last_step)
                else:
                    rewinds[step] = (f"a new checkpoint at step {step} ({path}) while a later folded checkpoint "
                                     "was deleted or re-written", path)
                continue
            self._take(ckpt, step)
        if rewinds:
            step = min(rewinds)
            self._rewind(step, *rewinds[step])

    def _ready(self, path: Path, *, rewritten: bool = False, now: float | None = None) -> Checkpoint | None:
        """The indexed checkpoint at ``path`` once its writer has finished it (else None; problems said once).
        A ``rewritten`` checkpoint (re-written in place) must also be quiet for ``settle`` seconds."""
        named = step_from_name(path.name)
        try:
            ready = check_ready(path, settle=self.cfg.settle, marker=self.cfg.marker,
                                clock=self.clock if now is None else (lambda: now),
                                seen=self._ready_seen, deepspeed_weights=self.cfg.deepspeed_weights)
        except OSError:  # it vanished between two looks (rotation): it is simply not there
            return None
        if not ready.ready:
            if ready.state == "bad":
                self._warn_once(named or -1, "not folding %s: %s", path, ready.reason)
            return None
        if rewritten and (self._recently_modified(path) or self._trainer_state_older(path)):
            return None  # a checkpoint re-written in place: wait until the trainer is done with all of it
        try:
            # marker/DCP rules do not open it
            return ready.checkpoint or open_checkpoint(path, deepspeed_weights=self.cfg.deepspeed_weights)
        except CkptavgError as e:
            self._warn_once(named or -1, "not folding %s: %s", path, e)
            return None

    def _recently_modified(self, path: Path) -> bool:
        newest = _newest_mtime_ns(path)
        return newest is None or self.clock() - newest / 1e9 < self.cfg.settle

    @staticmethod
    def _trainer_state_older(path: Path) -> bool:
        """An HF Trainer folder whose trainer_state.json (written last) is older than a weight file: mid-save."""
        state = path / "trainer_state.json"
        if not path.is_dir() or not state.exists():
            return False
        try:
            newest = max(f.stat().st_mtime_ns for f in path.iterdir() if f.name.endswith((".safetensors", ".bin", ".pt")))
            return state.stat().st_mtime_ns < newest
        except (OSError, ValueError):
            return False

    def _still_abandoned(self, step: int, path: Path) -> bool:
        old = self.trajectory.abandoned[step]
        base = Path(old["dir"]) if isinstance(old.get("dir"), str) else path if path.is_dir() else path.parent
        names = old.get("files", {})
        return self.trajectory.is_abandoned(step, [base / n for n in names])

    def _take(self, ckpt: Checkpoint, step: int) -> None:
        """Retain a ready checkpoint (hard links in the state folder) and queue it for folding."""
        if step in self.retainer.steps():  # a copy kept before a crash or a rewind: link the files as they are now
            self.retainer.release(step)
        try:
            kept = self.retainer.retain(ckpt, step)
        except CkptavgError as e:
            self._warn_once(step, "skipping step %d: %s", step, e)
            return
        except OSError as e:  # the state folder's filesystem is full or read-only: retried at the next scan
            self._degrade(f"cannot keep step {step} in {self.retainer.keep_dir}: {e.strerror or e}")
            return
        self.trajectory.record(step, ckpt.path, ckpt.files, _retained_files(ckpt, kept))
        if self.trajectory.save_steps is None and ckpt.path.is_dir():
            self.trajectory.save_steps = save_steps_of(ckpt.path)
        self.queue[step] = (ckpt.fingerprint, kept)
        log.debug("queued step %d (%s)", step, ckpt.path)

    # -- rewinds -------------------------------------------------------------------------------
    def _rewind(self, step: int, why: str, at: Path) -> None:
        """The trainer went back to ``step`` (its new checkpoint is ``at``): the averages return to the newest kept
        generation before it and the new trajectory is folded from there. Of the steps folded or queued at or
        after it, those written before ``at`` (by the trainer's clock) are the old trajectory: abandoned; those
        written after it are the new one, folded again in order once the scanner sees them."""
        if self.cfg.on_rewind == "ignore":
            self._warn_once(step, "%s; on_rewind = 'ignore': the averages keep the old trajectory and skip it "
                            "(they may mix two trajectories)", why)
            self.trajectory.abandon([step])
            return
        dropped = sorted(s for s in [*self.folded, *self.queue] if s >= step)
        prefix = sorted(s for s in self.folded if s < step)
        target = next(((g, ls) for g, ls, _ in reversed(self._gen_steps) if ls is None or ls < step), None)
        base = target[1] if target is not None else None
        refold = [s for s in prefix if base is None or s > base]
        needs = next((n for g, _, n in self._gen_steps if target is not None and g == target[0]), [])
        if prefix and (target is None or any(not self._readable(s) for s in [*refold, *needs])):
            self._rewind_too_far(step, why, prefix)
            return
        for s in list(self.queue):
            if s >= step:
                self.queue.pop(s)
        since = _newest_mtime_ns(at)
        newer = [s for s in dropped if s != step and since is not None and
                 (self.trajectory.source_mtime_ns(s) or 0) >= since]  # the new trajectory, folded too early
        self.trajectory.abandon([s for s in dropped if s not in newer])
        self.trajectory.forget(newer)
        saved = Trajectory.from_json(self.trajectory.to_json())
        rewinds = [*self.rewinds]
        if target is None:  # nothing was folded before the resume point: start empty
            self._reset_averages()
        else:
            self._load_state(at_most=target[0])
        kept_gen = target[0] if target is not None else 0
        self.store.discard_after(kept_gen)  # the abandoned trajectory's generations are no fallback for the new one
        self._gen_steps = [g for g in self._gen_steps if g[0] <= kept_gen]
        for s in dropped:  # their retained copies hold the old trajectory's bytes
            self.retainer.release(s)
        self.trajectory = saved
        self.rewinds = rewinds
        self.skipped = {s: f for s, f in self.skipped.items() if s < step}
        for s in refold:  # folded after that generation and before the resume point: still the trajectory
            ckpt = self._history(s)
            ensure_placed(self.averages, ckpt.tensors.values(), engine=self.engine)
            self.engine.fold(ckpt, self.averages, ident=s, history=self._history)
            self.folded[s] = ckpt.fingerprint
            self.last_step = s
            self.unpersisted.append(s)
        back = self.last_step
        self.rewinds.append({"at": step, "back_to": back, "abandoned": dropped, "why": why, "time": self.clock()})
        log.warning("trainer rewind: %s. The averages are rolled back to step %s and the new trajectory is folded "
                    "from there; %d folded step(s) of the old one are dropped (%s)", why,
                    back if back is not None else "0 (empty)", len(dropped), ", ".join(map(str, dropped)) or "none")
        self.last_error = f"rewind at step {step}: rolled back to step {back}"
        self.since_publish = 1
        self._persist()
        self._publish()
        self._unpublish_empty()
        self._release_unneeded()

    def _reset_averages(self) -> None:
        """Empty averages and bookkeeping: nothing folded (a rewind to before the first kept step)."""
        self._close_stores()
        self.averages = self._new_averages()
        self.folded, self.skipped, self.last_step, self.unpersisted = {}, {}, None, []

    def _unpublish_empty(self) -> None:
        """An average that holds nothing after a rollback (e.g. SWA before its start step) no longer shows the
        abandoned trajectory: its published link is removed until it holds something again."""
        for avg in self.averages:
            link = self.cfg.output / avg.name
            if not avg.slots and link.is_symlink():
                link.unlink()
                log.warning("unpublished %s: after the rollback it holds no checkpoint yet", link)

    def _rewind_too_far(self, step: int, why: str, prefix: list[int]) -> None:
        oldest = next((ls for _, ls, _ in self._gen_steps if ls is not None), None)
        what = (f"{why}, but no kept generation reaches back before it (the oldest kept one ends at step {oldest}; "
                f"keep_generations = {self.cfg.keep_generations})")
        if self.cfg.rewind_too_far == "stop":
            if self.halted is None:
                log.error("%s. rewind_too_far = 'stop': folding stops until the daemon is restarted with an empty "
                          "state folder; the published averages stay as they are", what)
            self.halted = what
            self.state = "halted"
            return
        log.warning("%s. rewind_too_far = 'restart': the averages start again from the checkpoints still on disk "
                    "(steps %s and earlier that were rotated away are not in them)", what, prefix[0])
        self.trajectory.abandon(sorted(s for s in [*self.folded, *self.queue] if s >= step))
        self.trajectory.forget(prefix)
        for s in list(self.queue):
            self.queue.pop(s)
        self.store.discard_after(0)
        self._gen_steps = []
        for s in self.retainer.steps():
            self.retainer.release(s)
        self._reset_averages()
        self.trajectory.gaps.clear()
        self.rewinds.append({"at": step, "back_to": None, "restarted": True, "why": why, "time": self.clock()})
        self.last_error = f"rewind at step {step} beyond the kept generations: averages restarted"
        self._persist()
        self._unpublish_empty()
        self._release_unneeded()

    # -- folding ------------------------------------------------------------------------------
    def _kept_files(self, step: int) -> list[Path]:
        path = self.retainer.path(step)
        names = self.trajectory.kept.get(step, {})
        return [path / n for n in names] if path.is_dir() else [path]

    def _readable(self, step: int) -> bool:
        """Whether the bytes folded for ``step`` can be read again: retained and unchanged, or (retained copy
        released) still in the trainer's folder unchanged, from where it is retained again."""
        if step in self.retainer.steps():
            return not self.trajectory.kept_changed(step, self._kept_files(step))
        if self.trajectory.source_state(step) != "same":
            return False
        try:
            ckpt = open_checkpoint(self.trajectory.sources[step]["path"], step=step,
                                   deepspeed_weights=self.cfg.deepspeed_weights)
            kept = self.retainer.retain(ckpt, step)
        except (CkptavgError, OSError):
            return False
        self.trajectory.kept[step] = file_ids(_retained_files(ckpt, kept)) or {}
        return True

    def _history(self, step: int) -> Checkpoint:
        """A retained checkpoint, read again (LAWA's leaving member, a re-fold): refused if it is no longer the
        bytes that were folded (a trainer that re-wrote the file in place through the hard link)."""
        if not self._readable(step):
            raise CheckpointChangedError(f"the retained copy of step {step} changed after it was folded",
                                         path=self.retainer.path(step))
        return open_checkpoint(self.retainer.path(step), step=step, deepspeed_weights=self.cfg.deepspeed_weights)

    def _repair(self, damaged: int) -> None:
        """The retained copy of ``damaged`` changed after its fold: rebuild what would read it again (LAWA's
        window sums) from the intact checkpoints still in those windows, instead of subtracting bytes that are
        not the ones that were folded."""
        what = ("changed after it was folded (the trainer re-wrote the file in place?)"
                if damaged in self.retainer.steps() else "is gone, and the trainer's own copy changed or was deleted")
        log.warning("the retained copy of step %d %s; the averages that would read it again are rebuilt from the "
                    "intact checkpoints of their windows (the result is the average of the files as first written, to "
                    "float32 rounding)", damaged, what)
        self.last_error = f"retained step {damaged} changed after its fold: windows rebuilt without re-reading it"
        specs = {a.name: a for a in self.cfg.averages}
        for avg in self.averages:
            affected = {}
            for name, slot in avg.slots.items():
                method = avg.method_for(name, slot.dtype)
                needs = list(method.needs(slot)) if method is not None else []
                if damaged in needs:
                    affected[name] = [m for m in needs if m != damaged]
            if not affected:
                continue
            members = sorted({m for ms in affected.values() for m in ms})
            spec = specs[avg.name]
            fresh = build_averages([AverageSpec(spec.method, spec.options, spec.name)], rules=avg.rules,
                                   accum_dtype=avg.accum_dtype, on_shape_change=avg.on_shape_change,
                                   device=self.engine.device)[0]
            for m in members:
                ckpt = self._history(m)
                ensure_placed([fresh], ckpt.tensors.values(), engine=self.engine)
                self.engine.fold(ckpt, [fresh], ident=m, history=self._history)
            for name in affected:
                old, new = avg.slots[name], fresh.slots.get(name)
                if new is None:  # only the damaged checkpoint held this tensor
                    avg.drop(name)
                    continue
                if old.store is not None:
                    old.store.acquire_slot(old)
                for b, buf in old.bufs.items():
                    buf.copy_(new.bufs[b])
                old.state, old.count, old.weight_sum, old.last_step = new.state, new.count, new.weight_sum, new.last_step
                if old.store is not None:
                    old.store.release_slot(old)
        self.trajectory.kept.pop(damaged, None)

    def _fold(self, step: int) -> None:
        fingerprint, path = self.queue.pop(step)
        self.state, self.folding = "folding", step
        self._write_status()
        started = time.perf_counter()
        try:
            ckpt = open_checkpoint(path, step=step, deepspeed_weights=self.cfg.deepspeed_weights)
            if ckpt.fingerprint != fingerprint:
                raise CkptavgError("changed after it was queued", path=path)
            hooks.point("fold.start", step=step, path=path, watch=self.cfg.watch)
            for member in sorted(set().union(*(a.needs() for a in self.averages))):
                if not self._readable(member):
                    self._repair(member)
            ensure_placed(self.averages, ckpt.tensors.values(), engine=self.engine)
            nbytes = self.engine.fold(ckpt, self.averages, ident=step, history=self._history)
        except Exception as e:  # noqa: BLE001 - a checkpoint that cannot be folded never stops the daemon
            text = str(e) if isinstance(e, CkptavgError) else f"{type(e).__name__}: {str(e).strip()[:300]}"
            self.last_error = f"step {step}: {text}"
            log.warning("skipping checkpoint step %d: %s", step, text)
            self._rollback()
            self.skipped[step] = fingerprint
            self.state, self.folding = "watching", None
            self.retainer.release(step)
            self._persist()  # the skip is part of the state: never retried after a restart
            return
        seconds = time.perf_counter() - started
        previous = self.last_step
        self.folded[step] = fingerprint
        self.last_step = step
        for gap in (self.trajectory.gap_before(step, previous, sorted(self.folded)[:-1], self.skipped),
                    self.trajectory.first_gap(sorted(self.folded))):
            if gap is not None:
                log.warning("missed checkpoints: %s", gap.describe())
        self.unpersisted.append(step)
        self.since_publish += 1
        self.last_fold = {"step": step, "bytes": nbytes, "seconds": round(seconds, 3),
                          "gbps": round(nbytes / seconds / 1e9, 3) if seconds else None}
        log.info("folded step %d: %s in %.2f s into %s", step, format_bytes(nbytes), seconds,
                 ", ".join(a.name for a in self.averages if a.method.accepts(step)))
        self._warn_empty(step)
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

    def _warn_empty(self, step: int) -> None:
        """An average that took this fold but holds no tensor: its rules exclude everything this model has."""
        for avg in self.averages:
            if avg.method.accepts(step) and not avg.slots:
                rules = ", ".join(str(r) for r in avg.rules) or "none"
                warn_once(log, ("empty-average", avg.name),
                          "the %s average holds no tensor after folding step %d: its rules (%s) exclude every tensor "
                          "of this model; nothing is published for it", avg.name, step, rules)

    def _rollback(self) -> None:
        """Back to the last committed state, then re-fold what had been folded since."""
        redo, folded, skipped = list(self.unpersisted), dict(self.folded), dict(self.skipped)
        trajectory, rewinds = self.trajectory, self.rewinds
        self._load_state()
        self.trajectory, self.rewinds = trajectory, rewinds
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
                 "last_step": self.last_step, "trajectory": self.trajectory.to_json(), "rewinds": self.rewinds[-50:],
                 "needs": sorted(set().union(*(a.needs() for a in self.averages)))}
        try:
            gen = self.store.save(self.averages, extra)
        except (OutputError, OSError) as e:
            self._degrade(f"cannot save the state in {self.cfg.state_path}: {e}")
            return
        self.unpersisted = []
        self._gen_steps = [*self._gen_steps, (gen, self.last_step, extra["needs"])][-self.cfg.keep_generations:]
        if self.since_publish == 0:
            self._output_ok()

    def _publish(self) -> None:
        if self.last_step is None:
            return
        try:
            newest = self._history(self.last_step)
            for avg in self.averages:
                if not avg.slots:
                    continue  # e.g. SWA before its start step
                publish_average(avg, self.cfg.output / avg.name, newest=newest, aliases=newest.aliases,
                                extra={"daemon": True})
        except (OutputError, OSError) as e:
            self._degrade(f"cannot publish into {self.cfg.output}: {e}")
            return
        self.since_publish = 0
        if not self.unpersisted:
            self._output_ok()

    # -- degraded output -------------------------------------------------------------------------
    def _degrade(self, reason: str) -> None:
        """The output cannot be written (full or read-only filesystem): keep watching and retaining, retry with
        backoff, catch up when it can be written again. Never exit over it."""
        if self.degraded != reason:
            log.warning("degraded: %s; watching and folding go on, saving and publishing are retried (backoff up to "
                        "60 s)", reason)
        self.degraded = reason
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, 60.0)
        self.notifier.status(f"degraded: {reason}")

    def _output_ok(self) -> None:
        if self.degraded is not None:
            log.info("the output can be written again: state saved and averages published (caught up)")
        self.degraded, self._backoff = None, 1.0

    def _retry_output(self) -> None:
        if self.unpersisted:
            self._persist()
        if self.since_publish or self.degraded is not None:
            self.since_publish = max(self.since_publish, 1)
            self._publish()

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
        snapshot_checkpoint(ckpt, dst, progress=_Quiet())

    def _published_step(self, avg: Average) -> int | None:
        try:
            steps = json.loads((self.cfg.output / avg.name / "ckptavg.json").read_text())["steps"]
            return steps[-1] if steps else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _needed(self) -> set[int]:
        needed = set(self.queue) | set(self.unpersisted)
        if self.cfg.on_rewind == "rollback":  # a rewind re-folds what came after the generation it returns to
            floor = min((ls for _, ls, _ in self._gen_steps if ls is not None), default=None)
            if floor is not None:
                needed.update(s for s in self.folded if s > floor)
            for _, _, needs in self._gen_steps:  # what each kept generation's methods would still read
                needed.update(needs)
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
    def status(self) -> Any:  # a ckptavg.contracts.status.StatusDoc
        from ckptavg.contracts.status import AverageStatus, FoldStats, HubStatus, StatusDoc, owned_section

        seen, last = self.newest_seen, self.last_step
        lag = seen - last if seen is not None and last is not None else None
        return StatusDoc(
            pid=os.getpid(), state=self.state, watch=str(self.cfg.watch), output=str(self.cfg.output),
            watcher=self.watcher.mode, updated=self.clock(),
            averages={a.name: AverageStatus(method=a.method.name, options=a.method.options(), folded=len(a.folded),
                                            last_step=a.folded[-1].step if a.folded else None)
                      for a in self.averages},
            folding_step=self.folding, last_folded_step=self.last_step, newest_seen_step=self.newest_seen,
            lag_steps=lag, queued=sorted(self.queue), skipped=sorted(self.skipped), last_error=self.last_error,
            last_fold=owned_section(FoldStats, self.last_fold) if self.last_fold is not None else None,
            evaluation=self.evaluation.status() if self.evaluation is not None else None,
            hub=owned_section(HubStatus, self.hub.status()) if self.hub is not None else None,
            degraded=self.degraded, halted=self.halted, rewinds=self.rewinds[-20:],
            missed=[g.to_json() for g in self.trajectory.gaps],
        )

    def _write_status(self) -> None:
        from ckptavg.contracts.status import STATUS_FILE, write_status

        try:
            write_status(self.cfg.state_path / STATUS_FILE, self.status())
        except CkptavgError as e:
            log.warning("cannot write status: %s", e)
