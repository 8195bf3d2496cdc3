"""Persisted averages: accumulators and manifest, saved in generations so a crash never loses both.

A generation ``N`` is two files in the state folder:

* ``accumulators-N.safetensors`` — every slot buffer of every average, keyed
  ``<average>/<tensor>/<buffer>``, written as a stream (one tensor at a time);
* ``manifest-N.json`` — the schema version, each average's configuration and
  per-tensor bookkeeping (counts, last steps, LAWA windows), the folded
  checkpoints, caller data, and the SHA-256 of the accumulator file.

Both are written durably (temporary file in the same folder, fsync, rename,
fsync of the folder); the manifest is renamed last, so it is the commit. The
previous generation is kept until the next one is committed. Loading takes the
newest generation whose checksum verifies, falls back to the previous one with
a warning, and refuses — never silently resets — when none verifies or the
state was written by a newer schema. A state folder is owned by one process at
a time (``flock`` on ``lock``).

Disk-backed averages (:mod:`ckptavg.averaging.store`) save and load one tensor at a
time, their pages dropped after each, so neither needs the model in memory.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ckptavg import hooks
from ckptavg.averaging.average import Average, FoldRecord
from ckptavg.averaging.methods.base import Slot
from ckptavg.dtypes import SAFETENSORS_TO_TORCH
from ckptavg.errors import CheckpointError, NewerStateError, OutputError, StateError, StateLockedError
from ckptavg.reading.fileio import FileCache, identify
from ckptavg.reading.formats.refs import TensorSpec
from ckptavg.reading.formats.safetensors import read_header
from ckptavg.reading.formats.safetensors_writer import ShardWriter
from ckptavg.writing.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

__all__ = ["SCHEMA_VERSION", "StateStore"]

SCHEMA_VERSION = 1
_MANIFEST = re.compile(r"^manifest-(\d+)\.json$")


class StateStore:
    """The state folder of one set of averages."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
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
        if not self.folder.is_dir():
            return []
        gens = [int(m.group(1)) for p in self.folder.iterdir() if (m := _MANIFEST.match(p.name))]
        return sorted(gens)

    def next_generation(self) -> int:
        gens = self.generations()
        return (gens[-1] + 1) if gens else 1

    def save(self, averages: Sequence[Average], extra: dict[str, Any] | None = None) -> int:
        """Commit a new generation holding ``averages`` and ``extra``; returns its number."""
        gens = self.generations()
        gen = self.next_generation()
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"accumulators-{gen}.safetensors"
        entries: list[tuple[str, torch.Tensor, Any]] = []
        for avg in averages:
            for tensor, slot in avg.slots.items():
                for buf, t in slot.bufs.items():
                    entries.append((f"{avg.name}/{tensor}/{buf}", t, avg.store))
        tmp = self.folder / f".{name}.ckptavg-tmp-{secrets.token_hex(4)}"
        digest = hashlib.sha256()
        try:
            writer = ShardWriter(tmp, [TensorSpec(k, t.dtype, tuple(t.shape)) for k, t, _ in entries],
                                {"format": "pt", "ckptavg.state": str(gen)})
            for key, t, store in entries:
                data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                if data.numel():
                    digest.update(memoryview(data.numpy()))
                writer.write(key, t.detach().cpu())
                if store is not None:  # a disk-backed average: drop the pages just read
                    store.release(t)
            writer.close()
            os.replace(tmp, self.folder / name)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"could not save the averages' state: {e.strerror or e}", path=self.folder / name) from e
        hooks.point("state.before-manifest", generation=gen)
        manifest = {
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
        atomic_write_bytes(self.folder / f"manifest-{gen}.json", json.dumps(manifest, indent=1).encode())
        for old in gens[:-1]:  # keep the previous generation as the fallback
            self._remove(old)
        return gen

    def _remove(self, gen: int) -> None:
        (self.folder / f"manifest-{gen}.json").unlink(missing_ok=True)
        (self.folder / f"accumulators-{gen}.safetensors").unlink(missing_ok=True)

    def load(self, averages: Sequence[Average]) -> dict[str, Any] | None:
        """Restore ``averages`` from the newest valid generation; returns its ``extra`` (None: no state).

        ``averages`` must be configured as when they were saved (same names,
        methods, options and rules); anything else is refused. Accumulators are
        read straight into where each average keeps them (memory, GPU, or its disk
        store, placed from the manifest's sizes), checksummed on the way, and
        attached only once the checksum verifies.
        """
        gens = self.generations()
        if not gens:
            return None
        problems = []
        for gen in reversed(gens[-2:]):
            try:
                manifest = self._read_manifest(gen)
            except NewerStateError:
                raise
            except StateError as e:
                problems.append(str(e))
                log.warning("state generation %d is unusable (%s); trying the previous one", gen, e.message)
                continue
            self._check_configuration(manifest, averages)
            try:
                slots = self._read_accumulators(manifest, averages)
            except StateError as e:
                problems.append(str(e))
                log.warning("state generation %d is unusable (%s); trying the previous one", gen, e.message)
                continue
            saved = {a["name"]: a for a in manifest["averages"]}
            for avg in averages:
                avg.slots = slots[avg.name]
                avg.folded = [FoldRecord(r["path"], r["step"], r["fingerprint"], r.get("weight"), r.get("model"))
                              for r in saved[avg.name]["folded"]]
            if problems:
                log.warning("resumed from generation %d after: %s", gen, "; ".join(problems))
            return manifest["extra"]
        raise StateError("no saved generation verifies: " + "; ".join(problems), path=self.folder,
                         hint="move the state folder away to start over (the averages would restart empty)")

    def _read_manifest(self, gen: int) -> dict[str, Any]:
        path = self.folder / f"manifest-{gen}.json"
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StateError(f"manifest is unreadable ({e})", path=path) from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("schema"), int):
            raise StateError("manifest has no schema version", path=path)
        if manifest["schema"] > SCHEMA_VERSION:
            raise NewerStateError(f"was written by a newer ckptavg (state schema {manifest['schema']}, this version reads "
                             f"{SCHEMA_VERSION})", path=path, hint="upgrade ckptavg")
        if not isinstance(manifest.get("averages"), list):
            raise StateError("manifest lists no averages", path=path)
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
        """New slots for ``averages`` read from the generation's accumulator file, checksum verified."""
        path = self.folder / str(manifest.get("accumulators"))
        try:
            header = read_header(path)
        except CheckpointError as e:
            raise StateError(f"accumulator file is unusable: {e.message}", path=path) from None
        by_name = {a.name: a for a in averages}
        saved = {a["name"]: a for a in manifest["averages"]}
        try:
            where: dict[str, tuple[str, str, str]] = {}  # file key -> (average, tensor, buffer)
            for name in by_name:
                for tensor, meta in saved[name]["slots"].items():
                    for buf in meta["bufs"]:
                        where[f"{name}/{tensor}/{buf}"] = (name, tensor, buf)
        except (KeyError, TypeError, AttributeError) as e:
            raise StateError(f"manifest is malformed ({e})", path=path) from None
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
        digest = hashlib.sha256()
        bufs: dict[tuple[str, str, str], torch.Tensor] = {}
        scratch = torch.empty(0, dtype=torch.uint8)
        with FileCache() as files:
            ident = identify(path)
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
        if digest.hexdigest() != manifest.get("sha256"):
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
                    if (name, tensor, buf) not in bufs:
                        raise StateError(f"accumulator {name}/{tensor}/{buf} is missing", path=path)
                    slot.bufs[buf] = bufs[(name, tensor, buf)]
                slots[name][tensor] = slot
        return slots


_READ_CHUNK = 64 << 20
_DTYPE_BY_NAME = {str(t).removeprefix("torch."): t for t in SAFETENSORS_TO_TORCH.values()}
