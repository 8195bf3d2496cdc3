"""The daemon across ranks: ``torchrun --nproc-per-node N -m ckptavg watch RUN -o OUT ...``.

Every rank runs a :class:`RankService`, the single-process :class:`~ckptavg.daemon.service.Service` with
its folding, persisting and publishing made collective:

* **one decides** — rank 0 alone watches the run, checks readiness, keeps (hard-links) ready checkpoints
  in ``STATE/keep`` and writes the status file, with the single-process code. Each turn of its loop ends
  in one decision — fold step S (its retained path and header fingerprint), retry the output, take a new
  configuration (SIGHUP), stop, or nothing yet — which it broadcasts (gloo, a small object) to every rank;
* **every rank folds** — the same checkpoints in the same order, but only its own tensors: the split of
  the one-shot (:func:`~ckptavg.distributed.assign_parts`, contiguous runs of the output order balanced
  by bytes, a tensor larger than a quarter of a share cut into flat element ranges where the shares'
  boundaries fall inside it), decided from the first checkpoint folded and kept in the state. So each
  rank reads only its byte ranges and holds only its part of the accumulators, and every element gets
  exactly the arithmetic of the single-process daemon: the result is bit-identical. A cut tensor that
  changes shape or dtype is refused as one process refuses it, or under ``--on-shape-change reset`` is
  cut anew in the same proportions, its averages restarting there on every rank. After a fold the ranks
  exchange how it went;
  if any rank failed (a read error, NaN/Inf in its tensors), **every** rank rolls back to the last
  committed generation and the checkpoint is skipped, as the single-process daemon skips it: never a
  half-folded average;
* **two-phase commit** — persisting generation G: every rank writes and fsyncs its part
  (``STATE/ranks/rank-<r>/``), the ranks exchange how it went, then rank 0 writes the commit record
  ``STATE/ranks/commit-G.json`` (:mod:`ckptavg.daemon.commit`). At start every rank loads the newest
  generation that is committed and whose every part verifies, and removes newer parts: a kill -9 of any
  rank at any moment, followed by torchrun's restart of all ranks, resumes exactly once;
* **publishing** — every rank writes its shards of each average into one staging version folder rank 0
  created (a cut tensor: its own file, laid out by rank 0, each rank writing its part's bytes in place);
  rank 0 writes the shard index, config files, ``ckptavg.json`` and model card, renames the
  version into place and swaps ``OUT/<name>`` to it, as the single-process daemon does. Evaluation and
  the Hub upload run on rank 0 only, on the published folders.

A trainer rewind is planned by rank 0 (the single-process choice of the generation to return to) and
carried out by every rank on its part; a retained checkpoint that changed after its fold is found by
rank 0 and every rank rebuilds its tensors' LAWA windows without it, as the single-process daemon does.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
import zlib
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from ckptavg import hooks
from ckptavg.averaging.average import Average
from ckptavg.averaging.engine import Engine, output_order
from ckptavg.averaging.placement import ensure_placed
from ckptavg.daemon.commit import Commit, Commits, manifest_sha256, part_folder
from ckptavg.daemon.config import WatchConfig
from ckptavg.daemon.notify import Notifier
from ckptavg.daemon.remote import start_mirror, stop_mirror
from ckptavg.daemon.retain import Retainer
from ckptavg.daemon.service import Service, _newest_mtime_ns, _Quiet, _written_at, set_idle_io
from ckptavg.daemon.trajectory import Trajectory
from ckptavg.distributed import (
    DEFAULT_TIMEOUT,
    Launch,
    Part,
    RankError,
    Ranks,
    _Assembled,
    _CutFiles,
    _describe,
    _layout,
    _shard_metadata,
    _view,
    assign_parts,
    rank_device,
)
from ckptavg.dtypes import short_name
from ckptavg.errors import CkptavgError, OutputError, StateError, TensorMismatchError, UsageError
from ckptavg.oneshot import AverageSpec, build_averages
from ckptavg.reading.checkpoint import Checkpoint, open_checkpoint
from ckptavg.reading.formats.refs import TensorSpec
from ckptavg.units import format_bytes
from ckptavg.writing.atomic import AtomicDir
from ckptavg.writing.export import DEFAULT_SHARD_BYTES, ModelWriter, finish_folder, next_version, point_published
from ckptavg.writing.state import StateStore

log = logging.getLogger(__name__)

__all__ = ["RankService"]

Failure = tuple[int, tuple[str, int]]  # (rank, (its error line, exit code))


def _first(statuses: list[Any]) -> Failure | None:
    """The first rank whose status (``None`` or a :func:`_describe` pair) is a failure."""
    return next(((r, s) for r, s in enumerate(statuses) if s is not None), None)


class _KeptCopies(Retainer):
    """The retained checkpoints as a rank other than 0 sees them: it reads them, rank 0 keeps and releases them."""

    def __init__(self, keep_dir: Path) -> None:  # no folder made, no orphans removed: rank 0's work
        self.keep_dir = Path(keep_dir)
        self.mode = "link"
        self._warned_copy = False

    def retain(self, ckpt: Checkpoint, step: int) -> Path:
        raise OutputError("internal: only rank 0 keeps checkpoints", path=self.keep_dir)

    def release(self, step: int) -> None:
        pass


class RankService(Service):
    """This rank's part of the distributed daemon (see the module docstring); every rank runs one."""

    def __init__(self, cfg: WatchConfig, *, launch: Launch, config_path: Path | None = None,
                 clock: Any = time.time, timeout: timedelta = DEFAULT_TIMEOUT) -> None:
        super().__init__(cfg, config_path=config_path, clock=clock)
        self.launch = launch
        self.rank, self.world = launch.rank, launch.world_size
        self.lead = self.rank == 0
        self.part = part_folder(cfg.state_path, self.rank)
        # one more generation than committed ones: a new part is written before its commit, then pruned
        self.store = StateStore(self.part, keep=cfg.keep_generations + 1)
        self.commits = Commits(cfg.state_path, keep=cfg.keep_generations)
        self.committed = 0  # the newest generation every rank has committed
        self.owner: dict[str, list[Part]] = {}  # tensor -> its parts (one: the rank holding it whole)
        self.cut_as: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}  # a cut tensor: the shape and dtype cut
        self.all_needs: set[int] = set()  # the steps any rank's averages will read again (LAWA)
        self.timeout = timeout
        self.ranks: Ranks | None = None
        self._pending_rewind: tuple[int, str, str] | None = None
        self._views = False  # while repairing: _history gives this rank's view of a checkpoint
        self._owner_lock = StateStore(cfg.state_path)  # rank 0: the whole state folder's lock
        if not self.lead:
            self.notifier = Notifier(address="")  # systemd hears rank 0 only

    # -- set-up --------------------------------------------------------------------------------
    def _new_averages(self) -> list[Average]:
        specs = [AverageSpec(a.method, a.options, a.name) for a in self.cfg.averages]
        averages = build_averages(specs, rules=self.cfg.rules, accum_dtype=getattr(torch, self.cfg.accum_dtype),
                                  on_shape_change=self.cfg.on_shape_change, device=self.engine.device,
                                  memory_budget=self.cfg.memory_budget, store_dir=self.part / "store")
        for avg, a in zip(averages, self.cfg.averages):
            avg.rules = tuple(a.rules) + tuple(self.cfg.rules)
        return averages

    def _load_state(self, *, at_most: int | None = None) -> None:
        """This rank's part of committed generation ``at_most`` (default: the newest committed one), exactly:
        a part that fell back to an older generation is an error, never a mix of generations."""
        at_most = self.committed if at_most is None else at_most
        self._close_stores()
        self.averages = self._new_averages()
        extra = (self.store.load(self.averages, at_most=at_most) if at_most else None) or {}
        if at_most and extra.get("generation") != at_most:
            raise StateError(f"rank {self.rank}'s part of generation {at_most} does not verify", path=self.part)
        self.folded = {int(k): v for k, v in extra.get("folded", {}).items()}
        self.skipped = {int(k): v for k, v in extra.get("skipped", {}).items()}
        self.last_step = extra.get("last_step")
        self.trajectory = Trajectory.from_json(extra.get("trajectory"))
        self.rewinds = list(extra.get("rewinds", []))
        self.unpersisted = []
        self.owner, self.cut_as = _owner_from_json(extra.get("owner") or {}, extra.get("cut_as") or {})
        self.all_needs = set(extra.get("needs", []))
        self._gen_steps = [(g.generation, g.extra.get("last_step"), list(g.extra.get("needs", [])))
                           for g in self.store.history() if g.generation <= at_most][-self.cfg.keep_generations:]

    def _reset_averages(self) -> None:
        super()._reset_averages()
        self.owner, self.cut_as = {}, {}  # the next checkpoint folded decides the split anew

    def _check_layout(self) -> None:
        if any(self.cfg.state_path.glob("manifest-*.json")):
            raise UsageError(f"the state folder {self.cfg.state_path} holds the state of a single-process daemon; "
                             "under torchrun the state is kept per rank",
                             hint="give the torchrun daemon another --state-dir (or run it as one process)")

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> int:
        self._check_ownership()
        self.ranks = Ranks(self.launch, timeout=self.timeout)
        mirror = None
        try:
            with self.ranks.agree("taking the state folder"):
                if self.lead:
                    self._check_layout()
                    self._owner_lock.lock()
                    self._lock_output()
                    # a run in object storage: rank 0 mirrors it beside the state for its scan; every rank reads
                    # the checkpoints it folds from the retained copies in STATE/keep, as for a local run
                    mirror = start_mirror(self.cfg, wake=self.wake)
                self.store.lock()
            return self._run_ranks()
        except RuntimeError as e:  # the process group broke: another rank died (torchrun restarts them all)
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "gloo" not in text.lower() and "connection" not in text.lower():
                raise
            raise RankError(f"rank {self.rank} of {self.world} lost the other ranks ({text[:200]}); the state stays "
                            f"at committed generation {self.committed}, from which torchrun's restart "
                            "(--max-restarts) resumes") from e
        finally:
            stop_mirror(mirror)
            self.watcher.stop()
            self.store.unlock()
            self._owner_lock.unlock()
            if self._publisher_lock is not None:
                os.close(self._publisher_lock)
            self.ranks.close()

    def _run_ranks(self) -> int:
        assert self.ranks is not None
        cfg = self.cfg
        if cfg.nice:
            os.nice(cfg.nice)
        torch.set_num_threads(cfg.threads)
        if cfg.ionice_idle and not set_idle_io():
            log.debug("idle I/O priority is not available here")
        with self.ranks.agree("starting"):
            self.engine = Engine(device=rank_device(cfg.device or "auto", self.launch), progress=_Quiet())
            if self.lead:
                self.retainer = self._make_retainer()
                self._remove_orphans()
            else:
                self.retainer = _KeptCopies(cfg.state_path / "keep")
        self._recover()
        lagging = self.lead and any(self._published_step(a) != a.folded[-1].step for a in self.averages if a.folded)
        if self.ranks.broadcast(lagging):
            log.info("publishing the averages: the published folders lag the saved state (interrupted publish)")
            self._publish()
        if self.lead:
            self._start_publishing()
            self._release_unneeded()
        if threading.current_thread() is threading.main_thread():
            self._install_signals()
        watchdog_usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        self._ping = watchdog_usec / 2e6 if watchdog_usec else None
        self._last_ping = 0.0
        if self.lead:
            log.info("watching %s on %d ranks: %s; state in %s (%d checkpoint(s) already folded, generation %d)",
                     cfg.watch, self.world, ", ".join(a.name for a in self.averages), cfg.state_path,
                     len(self.folded), self.committed)
        self.state = "watching"
        if self.lead and not cfg.watch.is_dir():
            self._note_missing_run()
        self.notifier.ready(f"watching {cfg.watch} on {self.world} ranks")
        clean = False
        try:
            while True:
                decision = self.ranks.broadcast(self._decide() if self.lead else None)
                kind = decision[0]
                if kind == "stop":
                    break
                if kind == "fold":
                    self._fold_ranks(*decision[1:])
                elif kind == "rewind":
                    self._rewind_ranks(*decision[1:])
                elif kind == "retry":
                    self._retry_output()
                elif kind == "config":
                    self.cfg = decision[1]
            clean = True
        finally:
            self.state = "stopping"
            if clean:  # every rank is here: the last fold is persisted and published together
                self.notifier.stopping("persisting and publishing before exit")
                if self.unpersisted:
                    self._persist()
                if self.since_publish:
                    self._publish()
            if self.evaluation is not None:
                self.evaluation.close()
            if self.hub is not None:
                self.hub.close()
            self.state = "stopped" if clean else "failed"
            self._write_status()
            self.engine.close()
            self._close_stores()
        if self.lead:
            log.info("stopped after folding %d checkpoint(s) on %d ranks", len(self.folded), self.world)
        return 0

    def _decide(self) -> tuple[Any, ...]:
        """Rank 0: one turn of the single-process loop, up to the decision every rank then carries out."""
        if self.stopping.is_set():
            return ("stop",)
        if self.reload.is_set():
            self.reload.clear()
            before = self.cfg
            self._reload()
            if self.cfg is not before:
                return ("config", self.cfg)
        self.wake.clear()
        self.watcher.ensure()
        if self.degraded is not None and time.monotonic() >= self._retry_at:
            return ("retry",)
        self._scan()
        if self._pending_rewind is not None:
            step, why, at = self._pending_rewind
            self._pending_rewind = None
            plan = self._plan_rewind(step, why)
            if plan is not None:
                return ("rewind", step, why, at, plan)
        if self._ping is not None and time.monotonic() - self._last_ping >= self._ping:
            self.notifier.watchdog()
            self._last_ping = time.monotonic()
        if self.queue and self.halted is None:
            step = min(self.queue)
            fingerprint, path = self.queue.pop(step)
            changed = [m for m in sorted(self.all_needs | set().union(*(a.needs() for a in self.averages)))
                       if not self._readable(m)]  # repaired by every rank before the fold, as in one process
            return ("fold", step, fingerprint, str(path), changed)
        self._write_status()
        timeout = self.cfg.poll_interval if self._ping is None else min(self.cfg.poll_interval, self._ping)
        if self.degraded is not None:
            timeout = min(timeout, max(0.05, self._retry_at - time.monotonic()))
        self.wake.wait(timeout)
        if self.wake.is_set() and not self.stopping.is_set():
            self.stopping.wait(min(0.5, self.cfg.settle))
        return ("idle",)

    # -- rewinds: rank 0 plans, every rank rolls back ----------------------------------------------
    def _rewind(self, step: int, why: str, at: Path) -> None:
        """Rank 0, from :meth:`_scan`: a rewind to carry out after the scan, on every rank."""
        if self.cfg.on_rewind == "ignore":
            super()._rewind(step, why, at)
            return
        self._pending_rewind = (step, why, str(at))

    def _plan_rewind(self, step: int, why: str) -> dict[str, Any] | None:
        """Rank 0: where the rewind of ``step`` returns to (the single-process choice), or None when folding
        stops (``rewind_too_far = "stop"``)."""
        dropped = sorted(s for s in [*self.folded, *self.queue] if s >= step)
        prefix = sorted(s for s in self.folded if s < step)
        target = next(((g, ls) for g, ls, _ in reversed(self._gen_steps) if ls is None or ls < step), None)
        base = target[1] if target is not None else None
        refold = [s for s in prefix if base is None or s > base]
        needs = next((n for g, _, n in self._gen_steps if target is not None and g == target[0]), [])
        too_far = bool(prefix) and (target is None or any(not self._readable(s) for s in [*refold, *needs]))
        if too_far and self.cfg.rewind_too_far == "stop":
            super()._rewind_too_far(step, why, prefix)  # halts folding; nothing of the averages changes
            return None
        return {"dropped": dropped, "prefix": prefix, "target": target, "refold": refold, "too_far": too_far}

    def _rewind_ranks(self, step: int, why: str, at: str, plan: dict[str, Any]) -> None:
        """Every rank: :meth:`Service._rewind` (or its ``rewind_too_far = "restart"``), each rank re-folding only
        its tensors; the commit records follow the discarded generations."""
        if plan["too_far"]:
            self._restart_ranks(step, why, plan["prefix"])
            return
        dropped, target, refold = plan["dropped"], plan["target"], plan["refold"]
        saved = self.trajectory
        if self.lead:
            for s in list(self.queue):
                if s >= step:
                    self.queue.pop(s)
            since = _newest_mtime_ns(Path(at))
            newer = [s for s in dropped if s != step and since is not None and
                     (self.trajectory.source_mtime_ns(s) or 0) >= since]  # the new trajectory, folded too early
            self.trajectory.abandon([s for s in dropped if s not in newer])
            self.trajectory.forget(newer)
            saved = Trajectory.from_json(self.trajectory.to_json())
        rewinds = [*self.rewinds]
        kept = target[0] if target is not None else 0
        if target is None:
            self._reset_averages()
        else:
            self._load_state(at_most=kept)
        self._discard_after(kept)
        for s in dropped:
            self.retainer.release(s)  # (rank 0: the others keep nothing)
        self.trajectory, self.rewinds = saved, rewinds
        self.skipped = {s: f for s, f in self.skipped.items() if s < step}
        for s in refold:  # folded after that generation and before the resume point: still the trajectory
            ckpt = self._history(s)
            mine = self._mine(ckpt, folding=True)
            ensure_placed(self.averages, mine.tensors.values(), engine=self.engine)
            self.engine.fold(mine, self.averages, ident=s, history=self._history_mine)
            self.folded[s] = ckpt.fingerprint
            self.last_step = s
            self.unpersisted.append(s)
        back = self.last_step
        self.rewinds.append({"at": step, "back_to": back, "abandoned": dropped, "why": why, "time": self.clock()})
        if self.lead:
            log.warning("trainer rewind: %s. The averages are rolled back to step %s on every rank and the new "
                        "trajectory is folded from there; %d folded step(s) of the old one are dropped (%s)", why,
                        back if back is not None else "0 (empty)", len(dropped), ", ".join(map(str, dropped)) or "none")
        self.last_error = f"rewind at step {step}: rolled back to step {back}"
        self.since_publish = 1
        self._persist()
        self._publish()
        self._unpublish_empty()
        if self.lead:
            self._release_unneeded()

    def _restart_ranks(self, step: int, why: str, prefix: list[int]) -> None:
        """``rewind_too_far = "restart"`` on every rank: the averages start again from what is on disk."""
        if self.lead:
            log.warning("%s, but no kept generation reaches back before it (keep_generations = %d). "
                        "rewind_too_far = 'restart': the averages start again from the checkpoints still on disk "
                        "(steps %s and earlier that were rotated away are not in them)", why,
                        self.cfg.keep_generations, prefix[0])
            self.trajectory.abandon(sorted(s for s in [*self.folded, *self.queue] if s >= step))
            self.trajectory.forget(prefix)
            self.queue.clear()
            for s in self.retainer.steps():
                self.retainer.release(s)
            self.trajectory.gaps.clear()
        self._discard_after(0)
        self._reset_averages()
        self.rewinds.append({"at": step, "back_to": None, "restarted": True, "why": why, "time": self.clock()})
        self.last_error = f"rewind at step {step} beyond the kept generations: averages restarted"
        self._persist()
        self._unpublish_empty()
        if self.lead:
            self._release_unneeded()

    def _discard_after(self, generation: int) -> None:
        """Generations newer than ``generation`` are abandoned: the commit records first, then every part."""
        if self.lead:
            self.commits.discard_after(generation)
        self.store.discard_after(generation)
        self.committed = generation
        self._gen_steps = [g for g in self._gen_steps if g[0] <= generation]

    def _unpublish_empty(self) -> None:
        """Every rank: an average no rank holds anything of is unpublished (rank 0 removes its link)."""
        assert self.ranks is not None
        held = set().union(*self.ranks.gather({a.name for a in self.averages if a.slots}))
        if self.lead:
            for avg in self.averages:
                link = self.cfg.output / avg.name
                if avg.name not in held and link.is_symlink():
                    link.unlink()
                    log.warning("unpublished %s: after the rollback it holds no checkpoint yet", link)

    def _retry_output(self) -> None:
        if self.unpersisted:
            self._persist()
        self.since_publish = max(self.since_publish, 1)
        self._publish()

    def _write_status(self) -> None:
        if self.lead:
            super()._write_status()

    def _needed(self) -> set[int]:
        return super()._needed() | self.all_needs

    # -- start: the newest generation every rank committed ----------------------------------------
    def _recover(self) -> None:
        assert self.ranks is not None
        records = self.ranks.broadcast([(c.generation, c.world_size, c.parts) for c in self.commits.valid()]
                                       if self.lead else None)
        worlds = {w for _, w, _ in records}
        if worlds and worlds != {self.world}:
            raise RankError(f"the state in {self.cfg.state_path} was written by {max(worlds)} ranks and this run "
                            f"has {self.world}: start the daemon with the same number of ranks (or another "
                            "--state-dir)", exit_code=2)
        chosen = 0
        for generation, world, parts in reversed(records):
            problem: str | None = None
            try:
                if not Commits.part_matches(Commit(generation, world, parts), self.rank, self.part):
                    raise StateError(f"rank {self.rank}'s part of generation {generation} is missing or is not the "
                                     "committed one", path=self.part)
                self._load_state(at_most=generation)
            except StateError as e:
                problem = str(e)
            failed = _first(self.ranks.gather(problem))
            if failed is None:
                chosen = generation
                break
            if self.lead:
                log.warning("state generation %d cannot be loaded on every rank (rank %d: %s); trying the one before",
                            generation, failed[0], failed[1])
        else:
            if records:
                raise RankError(f"no committed state generation in {self.cfg.state_path} loads on every rank",
                                exit_code=2)
        self.committed = chosen
        gone = self.store.discard_after(chosen)  # parts of generations never committed (a kill mid-commit)
        if self.lead:
            self.commits.discard_after(chosen)
        if gone:
            log.warning("rank %d: removed its part of generation(s) %s, never committed by every rank",
                        self.rank, ", ".join(map(str, gone)))
        if chosen == 0:
            self._load_state(at_most=0)
        elif self.lead:
            log.info("resumed from state generation %d, committed by all %d ranks", chosen, self.world)

    # -- folding -------------------------------------------------------------------------------
    def _mine(self, ckpt: Checkpoint, *, folding: bool = False) -> Checkpoint:
        """``ckpt`` with only this rank's tensors and parts (the split is decided by the first checkpoint folded);
        ``folding``: ``ckpt`` is being folded, so a cut tensor that changed is dealt with by the shape policy."""
        if not self.owner:
            self._assign(ckpt)
        other: set[str] = set()  # cut tensors at another shape than this split's: not in the view
        for name, ref in ckpt.tensors.items():
            if name not in self.owner:  # a tensor the first checkpoint did not have: a fixed rank of its own
                self.owner[name] = [Part(zlib.crc32(name.encode()) % self.world, 0, ref.numel)]
            elif name in self.cut_as and (ref.offset is None or (tuple(ref.shape), ref.dtype) != self.cut_as[name]):
                if folding:
                    self._cut_changed(ckpt, name)
                else:  # an earlier checkpoint (a LAWA member leaving): its averages restarted since
                    other.add(name)
        whole = {n for n in ckpt.tensors if n not in self.cut_as and self.owner[n][0].rank == self.rank}
        cut = {n: p for n in ckpt.tensors if n in self.cut_as and n not in other
               for p in self.owner[n] if p.rank == self.rank}
        return _view(ckpt, whole, cut)

    def _assign(self, ckpt: Checkpoint) -> None:
        """The split, from the first checkpoint folded (every rank computes the same, integer arithmetic)."""
        refs = ckpt.tensors
        self.owner = assign_parts([(n, refs[n].nbytes, refs[n].numel, refs[n].offset is not None)
                                   for n in output_order([ckpt])], self.world)
        self.cut_as = {n: (tuple(refs[n].shape), refs[n].dtype) for n, ps in self.owner.items() if len(ps) > 1}
        if self.lead:
            per_elem = {n: r.nbytes / max(1, r.numel) for n, r in refs.items()}
            for r in range(self.world):
                whole = [n for n, ps in self.owner.items() if n not in self.cut_as and ps[0].rank == r]
                parts = [(n, p) for n in self.cut_as for p in self.owner[n] if p.rank == r]
                nbytes = sum(refs[n].nbytes for n in whole) + sum((p.hi - p.lo) * per_elem[n] for n, p in parts)
                log.info("rank %d of %d: %d of %d tensors%s, %s of %s per checkpoint", r, self.world, len(whole),
                         len(refs), f" and a part of {len(parts)} cut across ranks" if parts else "",
                         format_bytes(int(nbytes)), format_bytes(ckpt.nbytes))

    def _cut_changed(self, ckpt: Checkpoint, name: str) -> None:
        """A tensor cut across ranks changed shape or dtype (or is no longer a byte range) in ``ckpt``, being
        folded: refused as one process refuses a changed tensor, or (``--on-shape-change reset``, or no average
        holds it) cut anew in the same proportions, with its averages restarting here on every rank."""
        ref = ckpt.tensors[name]
        shape, dtype = self.cut_as[name]
        held = [a for a in self.averages if name in a.slots]
        if self.cfg.on_shape_change == "reset" or not held:
            old = self.owner[name]
            numel = math.prod(shape)
            if ref.offset is not None and ref.numel > 1:
                parts = [Part(p.rank, p.lo * ref.numel // numel, p.hi * ref.numel // numel) for p in old]
                parts = [p for p in parts if p.hi > p.lo]
            else:
                parts = [Part(old[0].rank, 0, ref.numel)]
            self.owner[name] = parts
            if len(parts) > 1:
                self.cut_as[name] = (tuple(ref.shape), ref.dtype)
            else:
                del self.cut_as[name]
            for a in held:
                a.drop(name)
            if self.lead:
                log.warning("%s: tensor %r changed from %s %s to %s %s; its averages restart here (cut across "
                            "ranks anew)", ckpt.path, name, list(shape), short_name(dtype), list(ref.shape),
                            short_name(ref.dtype))
            return
        if ref.offset is None:
            what = "is no longer a byte range of its file (another format?)"
            hint = f"it was cut across ranks at {list(shape)}; start the daemon on a new --state-dir"
        elif tuple(ref.shape) != shape:
            what = f"changed shape from {list(shape)} to {list(ref.shape)}"
            hint = "use --on-shape-change reset to restart its average (progressive training)"
        else:
            what = f"changed dtype from {short_name(dtype)} to {short_name(ref.dtype)}"
            hint = "use --on-shape-change reset to restart its average"
        raise TensorMismatchError(what, path=ckpt.path, tensor=name, hint=hint)

    def _history(self, step: int) -> Checkpoint:
        if self.lead:  # rank 0 knows the trajectory: it refuses retained bytes that changed
            ckpt = super()._history(step)
        else:
            ckpt = open_checkpoint(self.retainer.path(step), step=step, deepspeed_weights=self.cfg.deepspeed_weights)
        return self._mine(ckpt) if self._views else ckpt

    def _history_mine(self, step: int) -> Checkpoint:
        return self._mine(self._history(step))

    def _my_needs(self) -> list[int]:
        return sorted(set().union(*(a.needs() for a in self.averages)))

    def _rollback(self) -> None:
        """Back to the last committed generation, re-folding (this rank's part of) what was folded since."""
        redo, folded, skipped = list(self.unpersisted), dict(self.folded), dict(self.skipped)
        trajectory, rewinds = self.trajectory, self.rewinds
        self._load_state()
        self.trajectory, self.rewinds = trajectory, rewinds
        for step in redo:
            ckpt = self._mine(self._history(step), folding=True)
            ensure_placed(self.averages, ckpt.tensors.values(), engine=self.engine)
            self.engine.fold(ckpt, self.averages, ident=step, history=self._history_mine)
        self.folded, self.skipped, self.unpersisted = folded, skipped, redo
        if redo:
            self.last_step = redo[-1]

    def _repair(self, damaged: int) -> None:
        """Every rank: :meth:`Service._repair` on its own tensors (the window members it re-reads are its views)."""
        said = logging.getLogger("ckptavg.daemon.service")
        level = said.level
        if not self.lead:
            said.setLevel(logging.ERROR)  # rank 0 says it once
        self._views = True
        try:
            super()._repair(damaged)
        finally:
            self._views = False
            said.setLevel(level)

    def _fold_ranks(self, step: int, fingerprint: str, where: str, changed: list[int]) -> None:
        assert self.ranks is not None
        path = Path(where)
        self.state, self.folding = "folding", step
        self._write_status()
        started = time.perf_counter()
        problem: tuple[str, int] | None = None
        nbytes = 0
        ckpt: Checkpoint | None = None
        try:
            ckpt = open_checkpoint(path, step=step, deepspeed_weights=self.cfg.deepspeed_weights)
            if ckpt.fingerprint != fingerprint:
                raise CkptavgError("changed after it was queued", path=path)
            hooks.point("fold.start", step=step, path=path, watch=self.cfg.watch)
            hooks.point("rank.fold", rank=self.rank, world_size=self.world, step=step)
            for member in changed:
                self._repair(member)
            mine = self._mine(ckpt, folding=True)
            ensure_placed(self.averages, mine.tensors.values(), engine=self.engine)
            nbytes = self.engine.fold(mine, self.averages, ident=step, history=self._history_mine)
        except Exception as e:  # a checkpoint that cannot be folded never stops the daemon
            problem = _describe(e)
            log.debug("rank %d could not fold step %d", self.rank, step, exc_info=True)
        statuses = self.ranks.gather((problem, nbytes, self._my_needs()))
        failed = _first([s[0] for s in statuses])
        if failed is not None:
            r, (text, _) = failed
            self.last_error = f"step {step}: rank {r} of {self.world}: {text}"
            if self.lead:
                log.warning("skipping checkpoint step %d: rank %d of %d could not fold its part (%s); every rank "
                            "rolled back to state generation %d: no rank holds any of step %d", step, r, self.world,
                            text, self.committed, step)
            self._rollback()
            self.skipped[step] = fingerprint
            self.state, self.folding = "watching", None
            if self.lead:
                self.retainer.release(step)
            self._persist()  # the skip is part of the state: never retried after a restart
            return
        assert ckpt is not None
        seconds = time.perf_counter() - started
        total = sum(s[1] for s in statuses)
        self.all_needs = set().union(*(s[2] for s in statuses))
        previous = self.last_step
        self.folded[step] = fingerprint
        self.last_step = step
        if self.lead:
            for gap in (self.trajectory.gap_before(step, previous, sorted(self.folded)[:-1], self.skipped),
                        self.trajectory.first_gap(sorted(self.folded))):
                if gap is not None:
                    log.warning("missed checkpoints: %s", gap.describe())
        self.unpersisted.append(step)
        self.since_publish += 1
        self.last_fold = {"step": step, "bytes": total, "seconds": round(seconds, 3),
                          "gbps": round(total / seconds / 1e9, 3) if seconds else None}
        if self.lead:
            log.info("folded step %d: %s in %.2f s on %d ranks into %s", step, format_bytes(total), seconds,
                     self.world, ", ".join(a.name for a in self.averages if a.method.accepts(step)))
        if len(self.unpersisted) >= self.cfg.persist_every:
            self._persist()
        if self.since_publish >= self.cfg.publish_every:
            self._publish()
        due = False
        if self.evaluation is not None:
            self.evaluation.note_checkpoint(_written_at(ckpt))
            self.since_eval += 1
            due = self.since_eval >= self.evaluation.cfg.every
        if self.ranks.broadcast(due):
            if self.since_publish:
                self._publish()  # every rank: the evaluated folders are the published ones
            if self.lead and not self.since_publish:  # (a failed publish: no round on stale folders)
                self._schedule_eval(ckpt)
        if self.lead:
            self._release_unneeded()
        self.state, self.folding = "watching", None
        self._write_status()
        self.notifier.status(f"folded step {step}; {len(self.queue)} queued")

    # -- persisting: the two-phase commit ----------------------------------------------------------
    def _persist(self) -> None:
        assert self.ranks is not None
        generation = self.committed + 1
        hooks.point("state.before-persist", generation=generation)
        self.all_needs = set().union(*self.ranks.gather(self._my_needs()))
        extra = None
        if self.lead:
            extra = {"folded": {str(k): v for k, v in sorted(self.folded.items())},
                     "skipped": {str(k): v for k, v in sorted(self.skipped.items())},
                     "last_step": self.last_step, "trajectory": self.trajectory.to_json(),
                     "rewinds": self.rewinds[-50:], "needs": sorted(self.all_needs)}
        extra = {**self.ranks.broadcast(extra), "generation": generation, "world_size": self.world,
                 **_owner_to_json(self.owner, self.cut_as)}
        problem: tuple[str, int] | None = None
        digest: str | None = None
        try:  # phase one: this rank's part, durable
            self.store.save(self.averages, extra, generation=generation)
            digest = manifest_sha256(self.part, generation)
            if digest is None:
                raise OutputError("the manifest just written cannot be read back", path=self.part)
        except (OSError, ValueError) as e:
            problem = _describe(e)
        statuses = self.ranks.gather((problem, digest))
        failed = _first([s[0] for s in statuses])
        if failed is None:  # phase two: the commit record
            hooks.point("ranks.before-commit", rank=self.rank, world_size=self.world, generation=generation)
            if self.lead:
                try:
                    self.commits.write(generation, [s[1] for s in statuses])
                except OSError as e:
                    failed = (0, _describe(e))
            failed = self.ranks.broadcast(failed)
        if failed is not None:
            self.store.discard_after(self.committed)  # this rank's part of the generation is never valid
            r, (text, _) = failed
            self._degrade(f"cannot save the state in {self.cfg.state_path} (rank {r} of {self.world}): {text}")
            return
        self.committed = generation
        self.unpersisted = []
        self._gen_steps = [*self._gen_steps, (generation, self.last_step, extra["needs"])][-self.cfg.keep_generations:]
        if self.since_publish == 0:
            self._output_ok()

    # -- publishing: every rank its shards, rank 0 the rest ------------------------------------------
    def _publish(self) -> None:
        assert self.ranks is not None
        if self.last_step is None:
            return
        problem: tuple[str, int] | None = None
        newest: Checkpoint | None = None
        held: dict[str, list[tuple[str, torch.dtype, tuple[int, ...]]]] = {}
        try:
            newest = self._history(self.last_step)
            held = {a.name: [(n, s.dtype, tuple(s.shape)) for n, s in a.slots.items()] for a in self.averages}
        except Exception as e:  # noqa: BLE001 - said by every rank below
            problem = _describe(e)
        statuses = self.ranks.gather((problem, held))
        failed = _first([s[0] for s in statuses])
        stack = contextlib.ExitStack()  # rank 0: the staging version folders, removed unless published
        plan: dict[str, tuple[str, str, Any]] = {}
        if failed is None and self.lead:
            assert newest is not None
            try:
                for avg in self.averages:
                    held_by: dict[str, list[tuple[int, torch.dtype, tuple[int, ...]]]] = {}
                    for r, st in enumerate(statuses):
                        for n, dtype, shape in st[1][avg.name]:
                            held_by.setdefault(n, []).append((r, dtype, shape))
                    where = {}  # tensor -> (its rank, or -1 if cut; dtype; whole shape)
                    for n, holders in held_by.items():
                        if n not in self.cut_as:
                            where[n] = holders[-1]
                            continue
                        if {r for r, _, _ in holders} != {p.rank for p in self.owner[n]}:
                            raise CkptavgError(f"internal: the parts of tensor {n!r} of {avg.name} are held by ranks "
                                               f"{sorted(r for r, _, _ in holders)}, cut for ranks "
                                               f"{[p.rank for p in self.owner[n]]}")
                        shape, dtype = self.cut_as[n]
                        where[n] = (-1, dtype, shape)
                    if not where:
                        continue  # e.g. SWA before its start step
                    order = [n for n in newest.tensors if n in where] + [n for n in where if n not in newest.tensors]
                    specs = [TensorSpec(n, where[n][1], where[n][2]) for n in order]
                    layout = _layout(specs, {n: self.owner[n] if n in self.cut_as else where[n][0] for n in order},
                                     self.world, DEFAULT_SHARD_BYTES, newest.weights_name)
                    target = self.cfg.output / avg.name
                    version = next_version(target, avg.folded[-1].step if avg.folded else None)
                    folder = stack.enter_context(AtomicDir(version))
                    _CutFiles(folder, layout, _shard_metadata(newest.aliases, layout)).create()
                    plan[avg.name] = (str(version), str(folder), layout)
            except (OSError, CkptavgError) as e:
                failed = (0, _describe(e))
        failed, plan = self.ranks.broadcast((failed, plan))
        try:
            if failed is None:
                problem = None
                try:
                    self._write_shards(plan, newest)
                except Exception as e:  # noqa: BLE001 - said by every rank below
                    problem = _describe(e)
                failed = _first(self.ranks.gather(problem))
            if failed is None and self.lead:
                try:
                    self._finish_versions(plan, newest, stack)
                except (OSError, CkptavgError) as e:
                    failed = (0, _describe(e))
            if plan:
                failed = self.ranks.broadcast(failed)
        finally:
            stack.__exit__(RuntimeError, RuntimeError("not published"), None)  # a no-op once renamed
        if failed is not None:
            r, (text, _) = failed
            self._degrade(f"cannot publish into {self.cfg.output} (rank {r} of {self.world}): {text}")
            return
        self.since_publish = 0
        if not self.unpersisted:
            self._output_ok()

    def _write_shards(self, plan: dict[str, tuple[str, str, Any]], newest: Checkpoint | None) -> None:
        assert newest is not None
        by_name = {a.name: a for a in self.averages}
        for name, (_, folder, layout) in plan.items():
            avg = by_name[name]
            refs = layout.refs[self.rank]
            if refs:
                writer = ModelWriter(Path(folder), refs, max_shard_bytes=DEFAULT_SHARD_BYTES,
                                     weights_name=newest.weights_name, aliases=newest.aliases, background=False,
                                     files=layout.files[self.rank])
                try:
                    for ref in refs:
                        writer.write(ref.name, avg.result(ref.name).cpu())
                    writer.finish(index=False)  # rank 0 writes the index of every rank's shards
                except BaseException:
                    writer.abort()
                    raise
            parts = [(n, p) for n in layout.cut for p in self.owner[n] if p.rank == self.rank]
            if parts:  # this rank's parts of the tensors cut across ranks, in place in the files rank 0 laid out
                files = _CutFiles(Path(folder), layout, _shard_metadata(newest.aliases, layout))
                try:
                    for n, p in parts:
                        files.start(n, p.lo)
                        files.write(n, avg.result(n).cpu())
                    files.finish()
                except BaseException:
                    files.close()
                    raise

    def _finish_versions(self, plan: dict[str, tuple[str, str, Any]], newest: Checkpoint | None,
                         stack: contextlib.ExitStack) -> None:
        assert newest is not None
        by_name = {a.name: a for a in self.averages}
        for name, (_, folder, layout) in plan.items():
            assembled = _Assembled(Path(folder), layout, newest.weights_name, newest.aliases)
            finish_folder(Path(folder), by_name[name], assembled, newest=newest,  # type: ignore[arg-type]
                          formats=[newest.format], extra={"daemon": True, "ranks": self.world})
        stack.close()  # fsync every rank's files, rename each version folder into place
        for name, (version, _, _) in plan.items():
            point_published(self.cfg.output / name, Path(version))


def _owner_to_json(owner: dict[str, list[Part]], cut_as: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict:
    """The split, as the state keeps it: a whole tensor's rank, a cut tensor's parts and the shape it was cut at."""
    return {"owner": {n: [[p.rank, p.lo, p.hi] for p in ps] if n in cut_as else ps[0].rank
                      for n, ps in sorted(owner.items())},
            "cut_as": {n: [list(shape), short_name(dtype)] for n, (shape, dtype) in sorted(cut_as.items())}}


def _owner_from_json(owner: dict[str, Any], cut_as: dict[str, Any]) -> tuple[dict[str, list[Part]], dict]:
    parts = {str(n): [Part(int(v), 0, 0)] if isinstance(v, int) else [Part(*map(int, p)) for p in v]
             for n, v in owner.items()}
    return parts, {str(n): (tuple(int(d) for d in shape), getattr(torch, dtype)) for n, (shape, dtype) in cut_as.items()}
