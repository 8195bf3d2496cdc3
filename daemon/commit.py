"""The distributed daemon's state: one part per rank, made valid together by one commit record.

Under ``torchrun ... -m ckptavg watch`` every rank holds only its tensors' accumulators, so the state of
generation G is in ``WORLD_SIZE`` parts, and is valid only when all of them are durable:

* ``STATE/ranks/rank-<r>/`` — rank r's part: a :class:`~ckptavg.writing.state.StateStore` of its own
  (``manifest-G.json`` + ``accumulators-G.safetensors``, written durably, checksummed), numbered alike on
  every rank;
* ``STATE/ranks/commit-G.json`` — written by rank 0 (temporary file, fsync, rename) only after every rank
  said its part of G is durable: the world size, the SHA-256 of every part's manifest, and a SHA-256 of
  its own content. It is the commit: a generation without it does not exist.

Phase one (every rank writes and fsyncs its part, then the ranks exchange how it went) and phase two
(rank 0 writes the record) are driven by :mod:`ckptavg.daemon.ranks`; this module owns the files. At
start, every rank loads the part of the newest committed generation whose every part verifies
(:meth:`Commits.valid`, then each rank's :meth:`Commits.part_matches`) and removes newer, uncommitted
parts, so a kill of any rank anywhere leaves the previous generation or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptavg.errors import StateError, UsageError
from ckptavg.writing.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

__all__ = ["COMMIT_SCHEMA", "Commit", "Commits", "part_folder", "refuse_ranks_state"]

COMMIT_SCHEMA = 1
_COMMIT = re.compile(r"^commit-(\d+)\.json$")
_CHECKSUM = "commit_sha256"


def part_folder(state: Path, rank: int) -> Path:
    """Where rank ``rank`` keeps its part of the state."""
    return Path(state) / "ranks" / f"rank-{rank}"


def refuse_ranks_state(state: Path) -> None:
    """A single-process daemon must not start over on a torchrun daemon's state (it would not see it)."""
    if (Path(state) / "ranks").is_dir():
        raise UsageError(f"the state folder {state} holds the state of a daemon run under torchrun (its ranks/ "
                         "folder); a single process would start over beside it",
                         hint="start it with torchrun and the same number of ranks, or give another --state-dir")


def manifest_sha256(part: Path, generation: int) -> str | None:
    """SHA-256 of a part's manifest of ``generation`` (None if it cannot be read)."""
    try:
        return hashlib.sha256((Path(part) / f"manifest-{generation}.json").read_bytes()).hexdigest()
    except OSError:
        return None


def _canonical(body: dict[str, Any]) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


@dataclass(frozen=True)
class Commit:
    """A verified commit record: generation G is valid, made of these parts."""

    generation: int
    world_size: int
    parts: tuple[str, ...]  # rank r's manifest SHA-256 at index r


class Commits:
    """The commit records in ``STATE/ranks`` (rank 0 writes them; every rank may read them)."""

    def __init__(self, state: Path, *, keep: int) -> None:
        self.folder = Path(state) / "ranks"
        self.keep = keep

    def numbers(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := _COMMIT.match(p.name)))

    def read(self, generation: int) -> Commit:
        """The commit record of ``generation``, verified, or a :class:`StateError` naming it."""
        path = self.folder / f"commit-{generation}.json"
        try:
            doc = json.loads(path.read_bytes().decode("utf-8"))
        except (OSError, ValueError) as e:
            raise StateError(f"commit record is unreadable ({type(e).__name__})", path=path) from None
        if not isinstance(doc, dict) or doc.get(_CHECKSUM) != _canonical({k: v for k, v in doc.items() if k != _CHECKSUM}):
            raise StateError("commit record checksum does not match its content", path=path)
        if doc.get("schema") != COMMIT_SCHEMA or doc.get("generation") != generation:
            raise StateError(f"commit record is not a schema {COMMIT_SCHEMA} record of generation {generation}",
                             path=path)
        parts = doc.get("parts")
        world = doc.get("world_size")
        if not isinstance(world, int) or not isinstance(parts, list) or len(parts) != world \
                or not all(isinstance(p, str) for p in parts):
            raise StateError("commit record is malformed (world_size, parts)", path=path)
        return Commit(generation, world, tuple(parts))

    def valid(self) -> list[Commit]:
        """Every commit record that verifies, oldest first (a damaged one is left out with one warning)."""
        out = []
        for g in self.numbers():
            try:
                out.append(self.read(g))
            except StateError as e:
                log.warning("state: %s; left out", e)
        return out

    def write(self, generation: int, parts: list[str]) -> None:
        """Make ``generation`` valid: its record, written durably; then keep only the newest ``keep`` records."""
        body: dict[str, Any] = {"schema": COMMIT_SCHEMA, "generation": generation, "world_size": len(parts),
                                "parts": list(parts)}
        body[_CHECKSUM] = _canonical(body)
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.folder / f"commit-{generation}.json", json.dumps(body, indent=1).encode())
        for old in self.numbers()[:-self.keep]:
            (self.folder / f"commit-{old}.json").unlink(missing_ok=True)

    def discard_after(self, generation: int) -> None:
        """Remove the records newer than ``generation`` (a start that could not load them)."""
        for g in self.numbers():
            if g > generation:
                (self.folder / f"commit-{g}.json").unlink(missing_ok=True)

    @staticmethod
    def part_matches(commit: Commit, rank: int, part: Path) -> bool:
        """Whether rank ``rank``'s part on disk is the one ``commit`` names."""
        return manifest_sha256(part, commit.generation) == commit.parts[rank]
