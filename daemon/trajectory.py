"""What the trainer actually did: which files each folded step came from, rewinds, and checkpoints missed.

The averages must equal the one-shot over the trajectory the trainer followed. Three things can make them
silently differ, and this module is how the daemon tells:

* **Rewinds.** A trainer resumed from an earlier checkpoint re-writes steps that were already folded
  (the HF Trainer re-writes ``checkpoint-N/`` in place, with the same header), or a run folder is
  deleted and recreated with its steps starting again. Header fingerprints cannot tell (a run's
  checkpoints share their headers); the files' identity can: for every folded step the daemon records
  the trainer's weight files as ``(inode, size, mtime_ns)``. A folded step whose files now differ, or a
  new step at or below the newest folded one while a folded step after it vanished or changed, is a
  rewind to that step.
* **A retained copy changed after its fold.** Retained copies are hard links, so a trainer that
  re-writes a file in place (``open(..., "wb")``, ``torch.save``) changes the copy too. Its size and
  mtime are recorded when it is kept and checked before it is read again (not its inode: a state
  folder copied elsewhere keeps its files' mtimes and stays usable).
* **Checkpoints missed.** A gap in the folded steps against the trainer's save interval (its
  ``trainer_state.json``'s ``save_steps``, else the run's cadence) means checkpoints came and went
  unseen (rotation faster than the daemon, or before it started).

ctime is not part of the identity: hard-linking, and the trainer deleting its own name, change an
inode's ctime without changing its content.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["FileIds", "Gap", "Trajectory", "file_ids", "save_steps_of"]

FileIds = dict[str, list[int]]  # file name -> [inode, size, mtime_ns]


def file_ids(files: Iterable[Path]) -> FileIds | None:
    """The identity of each file, or None if one of them is gone."""
    out: FileIds = {}
    for f in files:
        try:
            st = os.stat(f)
        except OSError:
            return None
        out[Path(f).name] = [st.st_ino, st.st_size, st.st_mtime_ns]
    return out


def save_steps_of(folder: Path) -> int | None:
    """The HF Trainer's save interval from a checkpoint's ``trainer_state.json`` (None: not known)."""
    try:
        value = json.loads((Path(folder) / "trainer_state.json").read_text(encoding="utf-8")).get("save_steps")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


@dataclass(frozen=True)
class Gap:
    """Checkpoints expected between two folded steps (or before the first) that were never seen."""

    after: int | None  # the folded step before the gap (None: the run's start)
    before: int  # the folded step after it
    every: int  # the save interval the expectation comes from
    source: str  # "save_steps" (trainer_state.json) or "cadence" (the run's folded steps)

    @property
    def first(self) -> int:
        return self.every if self.after is None else self.after + self.every

    @property
    def count(self) -> int:
        return max(0, -(-(self.before - self.first) // self.every))

    def describe(self) -> str:
        first, last = self.first, self.first + (self.count - 1) * self.every
        steps = f"step {first}" if first == last else f"steps {first}..{last}"
        where = "before the daemon saw the run" if self.after is None else f"between steps {self.after} and {self.before}"
        return (f"{self.count} checkpoint(s) {where} ({steps}, one every {self.every} steps by the trainer's "
                f"{'save_steps' if self.source == 'save_steps' else 'cadence'}) were never seen: the averages do "
                f"not include them")

    def to_json(self) -> dict[str, Any]:
        return {"after": self.after, "before": self.before, "every": self.every, "source": self.source,
                "count": self.count}


@dataclass
class Trajectory:
    """Per folded step: the trainer's path and files as folded, and the retained copy's files."""

    # step -> {"path": str, "files": FileIds, and "dir": str where the files lie in a subfolder of the checkpoint
    # (accelerate's pytorch_model_fsdp_0/)}
    sources: dict[int, dict[str, Any]] = field(default_factory=dict)
    kept: dict[int, FileIds] = field(default_factory=dict)  # step -> retained files' ids
    abandoned: dict[int, dict[str, Any]] = field(default_factory=dict)  # steps a rewind left behind, as they were
    gaps: list[Gap] = field(default_factory=list)
    save_steps: int | None = None

    # -- persistence (in the state's extra) ----------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"sources": {str(k): v for k, v in self.sources.items()},
                "kept": {str(k): v for k, v in self.kept.items()},
                "abandoned": {str(k): v for k, v in self.abandoned.items()},
                "gaps": [g.to_json() for g in self.gaps], "save_steps": self.save_steps}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Trajectory:
        t = cls()
        if not isinstance(data, Mapping):
            return t
        try:
            t.sources = {int(k): v for k, v in (data.get("sources") or {}).items()}
            t.kept = {int(k): v for k, v in (data.get("kept") or {}).items()}
            t.abandoned = {int(k): v for k, v in (data.get("abandoned") or {}).items()}
            t.gaps = [Gap(g["after"], g["before"], g["every"], g["source"]) for g in data.get("gaps") or []]
            t.save_steps = data.get("save_steps")
        except (AttributeError, KeyError, TypeError, ValueError):
            log.warning("the saved trajectory bookkeeping is unreadable; rewinds before now cannot be detected")
            return cls()
        return t

    # -- recording -------------------------------------------------------------------------------
    def record(self, step: int, path: Path, trainer_files: Iterable[Path], kept_files: Iterable[Path]) -> None:
        """Remember where ``step`` came from, at the moment it was retained."""
        trainer_files = list(trainer_files)
        ids = file_ids(trainer_files)
        if ids is not None:
            self.sources[step] = {"path": str(path), "files": ids}
            parents = {Path(f).parent for f in trainer_files}
            if len(parents) == 1 and parents != {path if path.is_dir() else path.parent}:
                self.sources[step]["dir"] = str(parents.pop())
        kept = file_ids(kept_files)
        if kept is not None:
            self.kept[step] = kept
        self.abandoned.pop(step, None)

    def forget(self, steps: Iterable[int]) -> None:
        for s in steps:
            self.sources.pop(s, None)
            self.kept.pop(s, None)

    # -- what changed ----------------------------------------------------------------------------
    def source_state(self, step: int) -> str:
        """``same``, ``changed`` (the trainer's files at that path differ) or ``gone`` (path or files missing)."""
        src = self.sources.get(step)
        if src is None:
            return "gone"
        folder = Path(src["path"])
        base = Path(src["dir"]) if isinstance(src.get("dir"), str) else folder if folder.is_dir() else folder.parent
        now = file_ids(base / name for name in src["files"]) if base.is_dir() else None
        if now is None:
            return "gone" if not folder.exists() else "changed"
        return "same" if now == src["files"] else "changed"

    def source_mtime_ns(self, step: int) -> int | None:
        """When the trainer wrote the files of ``step`` that the daemon took (the newest mtime recorded)."""
        src = self.sources.get(step)
        return max((ids[2] for ids in src["files"].values()), default=None) if src else None

    def kept_changed(self, step: int, files: Iterable[Path]) -> bool:
        """True when the retained copy of ``step`` is no longer the bytes that were folded."""
        want = self.kept.get(step)
        if want is None:
            return False
        now = file_ids(files)
        # size and mtime, not the inode: a state folder copied elsewhere (copy2 keeps mtimes) is still intact
        return now is None or any((now.get(k) or [None])[1:] != v[1:] for k, v in want.items())

    def is_abandoned(self, step: int, files: Iterable[Path]) -> bool:
        """A step a rewind left behind, still exactly as it was (not re-written by the trainer yet)."""
        old = self.abandoned.get(step)
        return old is not None and file_ids(files) == old.get("files")

    def abandon(self, steps: Iterable[int]) -> None:
        for s in steps:
            if s in self.sources:
                self.abandoned[s] = self.sources.pop(s)
            self.kept.pop(s, None)

    # -- gaps -------------------------------------------------------------------------------------
    def gap_before(self, step: int, previous: int | None, folded: list[int], skipped: Iterable[int]) -> Gap | None:
        """A gap between ``previous`` (the last folded step, None at the start) and ``step``, if checkpoints
        are known to be missing there; each gap is reported once."""
        every, source = (self.save_steps, "save_steps") if self.save_steps else (self._cadence(folded, step), "cadence")
        if not every:
            return None
        if previous is None:
            if source != "save_steps" or step <= every:
                return None
        elif step - previous <= every or any(previous < s < step for s in skipped):
            return None
        gap = Gap(previous, step, every, source)
        if gap.count <= 0 or any(g.before == step for g in self.gaps):
            return None
        self.gaps.append(gap)
        return gap

    @staticmethod
    def _cadence(folded: list[int], step: int) -> int | None:
        """The run's save interval seen so far: the smallest step difference, once seen at least twice."""
        steps = sorted({*folded, step})[-16:]
        diffs = [b - a for a, b in zip(steps, steps[1:]) if b > a]
        if len(diffs) < 2:
            return None
        smallest = min(diffs)
        return smallest if diffs.count(smallest) >= 2 and all(d % smallest == 0 for d in diffs) else None

    def first_gap(self, folded: list[int]) -> Gap | None:
        """Once the cadence is known: checkpoints before the first folded step that were never seen."""
        if not folded or any(g.after is None for g in self.gaps):
            return None
        every, source = (self.save_steps, "save_steps") if self.save_steps else (self._cadence(folded[:-1], folded[-1]), "cadence")
        first = min(folded)
        if not every or first <= every or first % every:
            return None
        gap = Gap(None, first, every, source)
        self.gaps.append(gap)
        return gap
