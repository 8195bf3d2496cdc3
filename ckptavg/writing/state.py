"""Persisted averages: accumulators and manifest, saved in generations so a crash never loses both.

A generation ``N`` is two files in the state folder:

* ``accumulators-N.safetensors`` — every slot buffer of every average, keyed
  ``<average>/<tensor>/<buffer>``, written as a stream (one tensor at a time);
* ``manifest-N.json`` — the schema version, each average's configuration and
  per-tensor bookkeeping (counts, last steps, LAWA windows), the folded
  checkpoints, caller data (``extra``), the SHA-256 of the whole accumulator
  file (``sha256``: what ``sha256sum`` prints) and, last, the SHA-256 of the
  manifest's own canonical content (``manifest_sha256``, see :func:`_canonical_sha256`).

Both are written durably (temporary file in the same folder, fsync, rename,
fsync of the folder); the manifest is renamed last, so it is the commit. The
newest ``keep`` generations are kept (default 2: the newest and one fallback);
older ones are removed only after the new one is committed.

Every generation is verified as a whole before anything of it is used: the
manifest's checksum first, then its structure, then the accumulator file's
header against the manifest (every buffer it lists, with the dtype and shape
its slot says, nothing else), then the file's checksum. Loading takes the
newest generation that verifies; a damaged one is skipped with one warning
naming it and what is wrong, and loading refuses — never silently resets —
when none verifies or the state was written by a newer schema. No content of
the files makes :meth:`StateStore.load` raise anything but :class:`StateError`
(or :class:`NewerStateError`).

Schemas: 1 (ckptavg before the manifest checksum: read, with one info line; its
``sha256`` covers the accumulator data only) and 2. Every schema keeps the
envelope ``schema`` + ``manifest_sha256`` over the canonical content, so a
newer state is recognised as newer only when its checksum verifies; a
manifest that claims a newer schema but does not verify may be a damaged one
(a flipped digit), so older generations are tried first, and the refusal says
"newer" only when none verifies.

A state folder is owned by one process at a time (``flock`` on ``lock``).

Disk-backed averages (:mod:`ckptavg.averaging.store`) save and load one tensor at a
time, their pages dropped after each, so neither needs the model in memory.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ckptavg import hooks
from ckptavg.averaging.average import Average, FoldRecord
from ckptavg.averaging.methods.base import Slot
from ckptavg.dtypes import SAFETENSORS_TO_TORCH
from ckptavg.errors import (
    CheckpointError,
    CkptavgError,
    NewerStateError,
    OutputError,
    StateError,
    StateLockedError,
)
from ckptavg.reading.fileio import FileCache
from ckptavg.reading.formats.refs import TensorSpec
from ckptavg.reading.formats.safetensors import read_header
from ckptavg.reading.formats.safetensors_writer import ShardWriter, encode_header
from ckptavg.writing.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

__all__ = ["SCHEMA_VERSION", "GenerationInfo", "StateStore"]

SCHEMA_VERSION = 2
_MANIFEST = re.compile(r"^manifest-(\d+)\.json$")
_CHECKSUM = "manifest_sha256"  # the manifest's own checksum: a key of the manifest, outside what it covers
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# What content of a damaged manifest or file can raise while it is interpreted: each becomes a StateError.
_CONTENT_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError, UnicodeError,
                   RecursionError, OSError)


def _canonical_sha256(body: dict[str, Any]) -> str:
    """SHA-256 of a manifest's content (without ``manifest_sha256``): sorted keys, no whitespace, ASCII.

    Whitespace, key order and number spelling (``1e-05`` or ``1E-05``) do not count: only what the
    content means."""
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


@dataclass(frozen=True)
class GenerationInfo:
    """A kept generation whose manifest verifies: its number and the ``extra`` given to :meth:`StateStore.save`."""

    generation: int
    extra: dict[str, Any]


class _Unverified(StateError):
    """A manifest that does not verify; ``claims`` is the newer schema it claims, if any (damaged, or newer)."""

    def __init__(self, message: str, *, path: Path, claims: int | None) -> None:
        super().__init__(message, path=path)
        self.claims = claims


class StateStore:
    """The state folder of one set of averages; ``keep``: how many generations :meth:`save` keeps (at least 1)."""

    def __init__(self, folder: Path, keep: int = 2) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be a whole number of generations >= 1, not {keep!r}")
        self.folder = Path(folder)
        self.keep = keep
        self._lock_fd: int | None = None

    # -- ownership ------------------------------------------------------------------------
    def lock(self) -> None:
        """Take the folder for this process, or raise :class:`StateLockedError`."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / "lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise StateLockedError(f"is in use by process {holder}", path=self.folder,
                                   hint="another ckptavg daemon runs on this state; stop it or use another --state-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    # -- generations ------------------------------------------------------------------------
    def generations(self) -> list[int]:
        """Numbers of the generations on disk (a manifest each, verified or not), oldest first."""
        if not self.folder.is_dir():
            return []
        gens = [int(m.group(1)) for p in self.folder.iterdir() if (m := _MANIFEST.match(p.name))]
        return sorted(gens)

    def next_generation(self) -> int:
        gens = self.generations()
        return (gens[-1] + 1) if gens else 1

    def history(self) -> list[GenerationInfo]:
        """Each kept generation whose manifest verifies, oldest first, with its ``extra``.

        Only the manifests are read (their checksum and structure); the accumulators are verified by
        :meth:`load`, which may still skip a listed generation whose accumulator file is damaged.
        Damaged manifests are left out; a verified manifest of a newer schema raises :class:`NewerStateError`."""
        out = []
        for gen in self.generations():
            try:
                manifest = self._read_manifest(gen, quiet=True)
            except NewerStateError:
                raise
            except StateError as e:
                log.debug("state generation %d left out of the history: %s", gen, e)
                continue
            out.append(GenerationInfo(gen, manifest["extra"]))
        return out

    def save(self, averages: Sequence[Average], extra: dict[str, Any] | None = None, *,
             generation: int | None = None) -> int:
        """Commit a new generation holding ``averages`` and ``extra`` (JSON-able); returns its number.

        ``generation``: its number (newer than every generation on disk; default the next one) — the
        distributed daemon numbers every rank's part of one generation alike.

        Then removes the generations beyond the newest ``keep``: of the older ones, only those whose
        manifest verifies count toward ``keep`` (a damaged one is no fallback), and one of a newer
        schema is never removed."""
        gens = self.generations()
        gen = self.next_generation() if generation is None else generation
        if gens and gen <= gens[-1]:
            raise ValueError(f"generation {gen} is not newer than the saved generation {gens[-1]}")
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"accumulators-{gen}.safetensors"
        entries: list[tuple[str, torch.Tensor, Any]] = []
        for avg in averages:
            for tensor, slot in avg.slots.items():
                for buf, t in slot.bufs.items():
                    entries.append((f"{avg.name}/{tensor}/{buf}", t, avg.store))
        tmp = self.folder / f".{name}.ckptavg-tmp-{secrets.token_hex(4)}"
        specs = [TensorSpec(k, t.dtype, tuple(t.shape)) for k, t, _ in entries]
        metadata = {"format": "pt", "ckptavg.state": str(gen)}
        head, _ = encode_header(specs, metadata)  # what ShardWriter writes first: checked below
        digest = hashlib.sha256(head)  # the whole file: header, then every tensor's bytes in order
        try:
            writer = ShardWriter(tmp, specs, metadata)
            for key, t, store in entries:
                data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                if data.numel():
                    digest.update(memoryview(data.numpy()))
                writer.write(key, t.detach().cpu())
                if store is not None:  # a disk-backed average: drop the pages just read
                    store.release(t)
            writer.close()
            with open(tmp, "rb") as f:
                if f.read(len(head)) != head:
                    raise OutputError("internal: the accumulator file's header is not the one checksummed", path=tmp)
            os.replace(tmp, self.folder / name)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if isinstance(e, OutputError):
                raise
            raise OutputError(f"could not save the averages' state: {e.strerror or e}", path=self.folder / name) from e
        hooks.point("state.before-manifest", generation=gen)
        manifest: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "generation": gen,
            "accumulators": name,
            "sha256": digest.hexdigest(),
            "averages": [
                {
                    **avg.describe(),
                    "slots": {tensor: {**slot.meta(), "bufs": list(slot.bufs)} for tensor, slot in avg.slots.items()},
                    "folded": [r.to_json() for r in avg.folded],
                }
                for avg in averages
            ],
            "extra": extra or {},
        }
        # the checksum is over the content as it reads back (a tuple in extra reads back as a list)
        manifest = json.loads(json.dumps(manifest))
        manifest[_CHECKSUM] = _canonical_sha256(manifest)
        atomic_write_bytes(self.folder / f"manifest-{gen}.json", json.dumps(manifest, indent=1).encode())
        self._prune(gens)
        return gen

    def _prune(self, older: list[int]) -> None:
        """After a commit: keep ``keep - 1`` of the ``older`` generations (newest that verify), remove the rest."""
        fallbacks = self.keep - 1
        for old in reversed(older):
            if fallbacks > 0:
                try:
                    self._read_manifest(old, quiet=True)
                except NewerStateError:
                    continue  # never removes a newer ckptavg's state
                except StateError as e:
                    log.info("removing damaged state generation %d (%s)", old, e.message)
                    self._remove(old)
                    continue
                fallbacks -= 1
                continue
            self._remove(old)

    def discard_after(self, generation: int) -> list[int]:
        """Remove every generation newer than ``generation`` (returns their numbers).

        For a rollback: after ``load(at_most=generation)``, the next :meth:`save` must not leave the
        abandoned newer generations on disk as fallbacks of the new timeline. Each generation's
        manifest goes first, so an interruption leaves no manifest without its accumulators."""
        gone = [g for g in self.generations() if g > generation]
        for g in reversed(gone):
            self._remove(g)
        return gone

    def _remove(self, gen: int) -> None:
        (self.folder / f"manifest-{gen}.json").unlink(missing_ok=True)
        (self.folder / f"accumulators-{gen}.safetensors").unlink(missing_ok=True)

    def load(self, averages: Sequence[Average], *, at_most: int | None = None) -> dict[str, Any] | None:
        """Restore ``averages`` from the newest generation that verifies; returns its ``extra`` (None: no state).

        ``at_most``: only generations numbered ``<= at_most`` are candidates (a rollback); a state
        with none of them is refused. A damaged generation is skipped with one warning naming it and
        what is wrong. ``averages`` must be configured as when they were saved (same names, methods,
        options and rules); anything else is refused. Accumulators are read straight into where each
        average keeps them (memory, GPU, or its disk store, placed from the verified header's sizes),
        checksummed on the way, and attached only once the whole generation verifies.

        Raises only :class:`StateError` (:class:`NewerStateError` for a newer schema) for anything in
        the files."""
        gens = self.generations()
        if not gens:
            return None
        candidates = [g for g in gens if at_most is None or g <= at_most]
        if not candidates:
            raise StateError(f"no saved generation at or before {at_most} (kept: {', '.join(map(str, gens))})",
                             path=self.folder)
        problems: list[str] = []
        newer: int | None = None
        for gen in reversed(candidates):
            try:
                manifest = self._read_manifest(gen)
            except _Unverified as e:
                if e.claims is not None:
                    newer = max(newer or 0, e.claims)
                problems.append(f"generation {gen} is unusable ({e})")
                continue
            except NewerStateError:
                raise
            except StateError as e:
                problems.append(f"generation {gen} is unusable ({e})")
                continue
            self._check_configuration(manifest, averages)  # verified, and made with another configuration: refused
            try:
                slots = self._read_accumulators(manifest, averages)
            except StateError as e:
                problems.append(f"generation {gen} is unusable ({e})")
                continue
            saved = {a["name"]: a for a in manifest["averages"]}
            for avg in averages:
                avg.slots = slots[avg.name]
                avg.folded = [FoldRecord(r["path"], r["step"], r["fingerprint"], r.get("weight"), r.get("model"))
                              for r in saved[avg.name]["folded"]]
            if problems:
                log.warning("state %s; resumed from generation %d", "; ".join(problems), gen)
            return manifest["extra"]
        if newer is not None:
            raise NewerStateError(f"was written by a newer ckptavg (state schema {newer}, this version reads "
                                  f"{SCHEMA_VERSION}), or is damaged: " + "; ".join(problems), path=self.folder,
                                  hint="upgrade ckptavg")
        raise StateError("no saved generation verifies: " + "; ".join(problems), path=self.folder,
                         hint="move the state folder away to start over (the averages would restart empty)")

    def _read_manifest(self, gen: int, *, quiet: bool = False) -> dict[str, Any]:
        """Generation ``gen``'s manifest, verified (checksum, then structure), or a :class:`StateError` naming it."""
        path = self.folder / f"manifest-{gen}.json"
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise StateError(f"manifest is unreadable ({e.strerror or e})", path=path) from None
        try:
            manifest = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise StateError(f"manifest is not UTF-8 text (byte {e.start})", path=path) from None
        except json.JSONDecodeError as e:
            raise StateError(f"manifest is not valid JSON ({e.msg} at char {e.pos})", path=path) from None
        except (ValueError, RecursionError) as e:
            raise StateError(f"manifest is not usable JSON ({type(e).__name__})", path=path) from None
        if not isinstance(manifest, dict):
            raise StateError("manifest is not a JSON object", path=path)
        schema = manifest.get("schema")
        if not isinstance(schema, int) or isinstance(schema, bool) or schema < 1:
            raise StateError("manifest has no schema version", path=path)
        claims = schema if schema > SCHEMA_VERSION else None
        if _CHECKSUM in manifest:
            body = {k: v for k, v in manifest.items() if k != _CHECKSUM}
            try:
                actual: str | None = _canonical_sha256(body)
            except (ValueError, TypeError, RecursionError):
                actual = None
            if actual is None or manifest[_CHECKSUM] != actual:
                raise _Unverified("manifest checksum does not match its content", path=path, claims=claims)
            if claims is not None:
                raise NewerStateError(f"was written by a newer ckptavg (state schema {schema}, this version reads "
                                      f"{SCHEMA_VERSION})", path=path, hint="upgrade ckptavg")
        elif claims is not None:
            raise _Unverified(f"manifest claims state schema {schema} and carries no checksum", path=path,
                              claims=claims)
        elif schema >= 2:
            raise StateError(f"manifest of state schema {schema} carries no checksum", path=path)
        elif not quiet:
            log.info("state generation %d has no manifest checksum (schema 1, written by an older ckptavg); "
                     "accepted as it reads", gen)
        _validate_manifest(manifest, gen, path)
        return manifest

    @staticmethod
    def _check_configuration(manifest: dict[str, Any], averages: Sequence[Average]) -> None:
        saved = {a.get("name"): a for a in manifest["averages"] if isinstance(a, dict)}
        for avg in averages:
            s = saved.get(avg.name)
            want = avg.describe()
            if s is None or any(s.get(k) != want[k] for k in ("method", "options", "rules", "accum_dtype")):
                raise StateError(
                    f"the saved state does not hold average {avg.name!r} with this configuration "
                    f"(saved: {', '.join(sorted(map(str, saved))) or 'none'})",
                    hint="use the configuration the state was made with, or another state folder",
                )

    def _read_accumulators(self, manifest: dict[str, Any], averages: Sequence[Average]) -> dict[str, dict[str, Slot]]:
        """New slots for ``averages`` from the generation's accumulator file, header and checksum verified;
        a :class:`StateError` naming the file for anything wrong in it."""
        path = self.folder / manifest["accumulators"]
        try:
            return self._read_accumulators_unchecked(path, manifest, averages)
        except StateError:
            raise
        except CheckpointError as e:  # unreadable, truncated, changed while read
            raise StateError(f"accumulator file is unusable: {e.message}", path=path) from None
        except CkptavgError:
            raise  # not about the files (e.g. over the memory budget with no disk store)
        except _CONTENT_ERRORS as e:
            raise StateError(f"accumulator file or its manifest is malformed ({type(e).__name__}: {e})",
                             path=path) from None

    def _read_accumulators_unchecked(self, path: Path, manifest: dict[str, Any],
                                     averages: Sequence[Average]) -> dict[str, dict[str, Slot]]:
        header = read_header(path)
        gen = manifest["generation"]
        if (header.metadata or {}).get("ckptavg.state") != str(gen):
            raise StateError(f"accumulator file is not generation {gen}'s", path=path)
        by_name = {a.name: a for a in averages}
        saved = {a["name"]: a for a in manifest["averages"]}
        # every buffer the manifest lists, with the dtype and shape its slot says; nothing else
        want: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        where: dict[str, tuple[str, str, str]] = {}  # file key -> (average, tensor, buffer), configured averages only
        for name, a in saved.items():
            accum = _DTYPE_BY_NAME[a["accum_dtype"]]
            avg = by_name.get(name)
            for tensor, meta in a["slots"].items():
                dtype = _DTYPE_BY_NAME[meta["dtype"]]
                if avg is not None:
                    method = avg.method_for(tensor, dtype)
                    if method is not None and tuple(meta["bufs"]) != tuple(method.buffers):
                        raise StateError(f"slot {name}/{tensor} lists buffers {meta['bufs']}, its method keeps "
                                         f"{list(method.buffers)}", path=path)
                for buf in meta["bufs"]:
                    key = f"{name}/{tensor}/{buf}"
                    want[key] = (dtype if buf == "value" else accum, (math.prod(meta["shape"]),))
                    if avg is not None:
                        where[key] = (name, tensor, buf)
        if set(header.tensors) != set(want):
            missing, extra = sorted(set(want) - set(header.tensors)), sorted(set(header.tensors) - set(want))
            what = f"lacks {missing[0]}" if missing else f"holds {extra[0]}, which the manifest does not list"
            raise StateError(f"accumulator file {what}", path=path)
        for key, ref in header.tensors.items():
            dtype, shape = want[key]
            if ref.dtype != dtype or tuple(ref.shape) != shape:
                raise StateError(f"accumulator {key} is {_DTYPE_NAME[ref.dtype]} {list(ref.shape)} in the file, "
                                 f"{_DTYPE_NAME[dtype]} {list(shape)} in the manifest", path=path)
        # the file's checksum: schema 2 covers all of it (length, header, data), schema 1 the data only
        digest = hashlib.sha256()
        need = {name: 0 for name in by_name}
        for key, ref in header.tensors.items():
            if key in where:
                need[where[key][0]] += ref.nbytes
        pending = [a for a in averages if a.placement is not None and not a.placement.decided]
        for placement in {id(a.placement): a.placement for a in pending}.values():
            placement.place([a for a in pending if a.placement is placement], need)
        for avg in averages:  # lay out each disk store at once: one file per average, not one per tensor
            if avg.store is not None:
                avg.store.reserve([(f"{where[k][1]}/{where[k][2]}", ref.numel, ref.dtype)
                                   for k, ref in header.tensors.items()
                                   if k in where and where[k][0] == avg.name and where[k][2] != "value"])
        bufs: dict[tuple[str, str, str], torch.Tensor] = {}
        scratch = torch.empty(0, dtype=torch.uint8)
        with FileCache() as files:
            ident = header.identity  # the file whose header was checked: a replaced file is refused
            if manifest["schema"] >= 2:
                head = torch.empty(header.data_start, dtype=torch.uint8)
                files.read(path, ident, 0, header.data_start, out=head)
                digest.update(memoryview(head.numpy()))
            for key, ref in header.tensors.items():
                target = where.get(key)
                avg = by_name[target[0]] if target is not None else None
                full: torch.Tensor | None = None  # where this tensor's bytes go (None: only checksummed)
                if target is not None and avg is not None and avg.device.type == "cpu":
                    full = avg.alloc(target[1], target[2], ref.numel, ref.dtype).view(torch.uint8)
                elif avg is not None:
                    full = torch.empty(ref.nbytes, dtype=torch.uint8)
                elif scratch.numel() < min(ref.nbytes, _READ_CHUNK):
                    scratch = torch.empty(min(ref.nbytes, _READ_CHUNK), dtype=torch.uint8)
                for off in range(0, ref.nbytes, _READ_CHUNK):
                    n = min(_READ_CHUNK, ref.nbytes - off)
                    part = full[off:off + n] if full is not None else scratch[:n]
                    files.read(path, ident, ref.offset + off, n, out=part)  # type: ignore[operator]
                    digest.update(memoryview(part.numpy()))
                if target is None or avg is None or full is None:
                    continue
                t = full.view(ref.dtype)
                if avg.store is not None:
                    avg.store.release(t)
                elif avg.device.type != "cpu":
                    t = t.to(avg.device)
                bufs[target] = t
        if digest.hexdigest() != manifest["sha256"]:
            raise StateError("accumulator checksum does not match its manifest", path=path)
        slots: dict[str, dict[str, Slot]] = {}
        for name, avg in by_name.items():
            slots[name] = {}
            for tensor, meta in saved[name]["slots"].items():
                dtype = _DTYPE_BY_NAME[meta["dtype"]]
                method = avg.method_for(tensor, dtype)
                slot = Slot(shape=tuple(meta["shape"]), dtype=dtype, count=meta["count"],
                            last_step=meta["last_step"], weight_sum=meta["weight_sum"], store=avg.store,
                            state=method.restore_state(meta) if method is not None else {})
                for buf in meta["bufs"]:
                    slot.bufs[buf] = bufs[(name, tensor, buf)]
                slots[name][tensor] = slot
        return slots


def _validate_manifest(m: dict[str, Any], gen: int, path: Path) -> None:
    """The structure every reader of a manifest relies on, or a :class:`StateError` saying what is off."""

    def bad(what: str) -> StateError:
        return StateError(f"manifest is malformed: {what}", path=path)

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if m.get("generation") != gen or not is_int(m.get("generation")):
        raise bad(f"it says generation {m.get('generation')!r}, its name {gen}")
    if m.get("accumulators") != f"accumulators-{gen}.safetensors":
        raise bad(f"accumulators {m.get('accumulators')!r} is not accumulators-{gen}.safetensors")
    if not isinstance(m.get("sha256"), str) or not _HEX64.match(m["sha256"]):
        raise bad("no accumulator checksum")
    if not isinstance(m.get("extra"), dict):
        raise bad("extra is not an object")
    averages = m.get("averages")
    if not isinstance(averages, list):
        raise bad("no list of averages")
    names = set()
    for a in averages:
        if not isinstance(a, dict) or not isinstance(a.get("name"), str) or a["name"] in names:
            raise bad("an average without a name of its own")
        names.add(a["name"])
        if a.get("accum_dtype") not in _DTYPE_BY_NAME:
            raise bad(f"average {a['name']!r} has no accumulator dtype")
        slots, folded = a.get("slots"), a.get("folded")
        if not isinstance(slots, dict) or not isinstance(folded, list):
            raise bad(f"average {a['name']!r} lacks its slots or folded checkpoints")
        for tensor, meta in slots.items():
            where = f"slot {a['name']}/{tensor}"
            if not isinstance(meta, dict):
                raise bad(f"{where} is not an object")
            shape, bufs = meta.get("shape"), meta.get("bufs")
            if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
                raise bad(f"{where} has no shape")
            if meta.get("dtype") not in _DTYPE_BY_NAME:
                raise bad(f"{where} has no dtype")
            if not is_int(meta.get("count")) or meta["count"] < 0:
                raise bad(f"{where} has no count")
            if meta.get("last_step") is not None and not is_int(meta["last_step"]):
                raise bad(f"{where} has no last step")
            if not is_num(meta.get("weight_sum")):
                raise bad(f"{where} has no weight sum")
            if not isinstance(bufs, list) or not all(isinstance(b, str) for b in bufs) or len(set(bufs)) != len(bufs):
                raise bad(f"{where} has no list of buffers")
        for r in folded:
            if (not isinstance(r, dict) or not isinstance(r.get("path"), str)
                    or not isinstance(r.get("fingerprint"), str)
                    or (r.get("step") is not None and not is_int(r["step"]))
                    or (r.get("weight") is not None and not is_num(r["weight"]))):
                raise bad(f"average {a['name']!r} has a malformed folded checkpoint")


_READ_CHUNK = 64 << 20
_DTYPE_BY_NAME = {str(t).removeprefix("torch."): t for t in SAFETENSORS_TO_TORCH.values()}
_DTYPE_NAME = {t: n for n, t in _DTYPE_BY_NAME.items()}
