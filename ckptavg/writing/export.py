"""Write an average as a model folder that ``from_pretrained`` and ``safetensors`` load.

The folder holds sharded safetensors (``model-00001-of-0000N.safetensors`` plus
``model.safetensors.index.json``, or a single ``model.safetensors``), each
tensor in its source dtype; the config, tokenizer and generation files of the
newest input; a ``README.md`` model card; and ``ckptavg.json`` provenance.

Shards are written as a stream: the layout of every shard is planned from the
inputs' headers, so each shard's header is written first and each tensor's
bytes are appended as soon as its average is finished — whole, or as
consecutive flat parts (the engine finishes large tensors piece by piece).
Only a bounded window of finished bytes is ever held for writing
(``safetensors.torch.save_file`` would need every tensor of a shard in memory
at once). The one-shot writer works in a background thread, so writing, the
kernel's writeback and the fsync of a finished shard overlap the averaging of
the next tensors; writeback of each written range is started at once
(``sync_file_range``) rather than left to the final fsync, so the fsync at the
end finds little left to do. The folder is built in a temporary sibling,
fsynced and renamed into place (:class:`~ckptavg.writing.atomic.AtomicDir`).

The daemon's publish (:func:`publish_average`) never replaces a folder: each publish is a new
version folder under ``OUT/.ckptavg/versions/<name>/`` and ``OUT/<name>`` is a relative symlink
swapped to it with one ``rename()`` (as ``OUT/best``), so ``OUT/<name>`` is never missing.
:func:`remove_publish_orphans` clears what interrupted publishes leave, at start.

Tied weights: a pickle that stores one tensor under two names (``lm_head.weight``
sharing ``embed_tokens.weight``) is averaged once and written once, as
safetensors requires; the alias is recorded in the shard metadata and in
``ckptavg.json``, and ``from_pretrained`` re-ties it from the config.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ckptavg import hooks
from ckptavg._version import __version__
from ckptavg.averaging.average import Average
from ckptavg.dtypes import short_name
from ckptavg.errors import OutputError, StateLockedError
from ckptavg.reading.checkpoint import Checkpoint
from ckptavg.reading.formats.refs import TensorRef, TensorSpec
from ckptavg.reading.formats.safetensors_writer import ShardWriter
from ckptavg.reading.names import PICKLE_SUFFIXES
from ckptavg.units import format_bytes
from ckptavg.writing import atomic
from ckptavg.writing.atomic import AtomicDir, fsync_dir, is_orphan, remove_orphans

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_PUBLISH_GRACE", "DEFAULT_SHARD_BYTES", "ModelWriter", "copy_meta_files", "expire_versions",
           "next_version", "plan_shards", "point_published", "publish_average", "remove_publish_orphans", "versions_dir", "write_index"]

DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size
WRITE_QUEUE_BYTES = 64 << 20  # finished bytes waiting for the writer thread, at most

# never copied from an input folder: weights, trainer state, pickles, our own outputs
_SKIP_SUFFIXES = (".safetensors", ".distcp", ".index.json", ".tmp", *PICKLE_SUFFIXES)
_SKIP_NAMES = {"trainer_state.json", "README.md", "ckptavg.json", ".metadata", "latest",
               "zero_to_fp32.py", "zero_to_torch.py"}  # DeepSpeed's conversion scripts: not part of the model
_SKIP_PREFIXES = ("rng_state", "optimizer", "scheduler", "training_args", ".")


def plan_shards(refs: Sequence[TensorRef | TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most ``max_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for ref in refs:
        if shards[-1] and size + ref.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(TensorSpec(ref.name, ref.dtype, tuple(ref.shape)))
        size += ref.nbytes
    return shards if shards[0] else []


class ModelWriter:
    """Writes one average's model folder into ``folder`` (a temporary folder from AtomicDir).

    Call :meth:`write` for every planned tensor in order (whole, or as consecutive
    flat parts), then :meth:`finish`; on failure, :meth:`abort`.

    With ``background`` (the default) the bytes are written, and each finished
    shard fsynced, by a ``ckptavg-writer`` thread while the caller computes the
    next tensors; :meth:`write` returns once the tensor is queued (at most
    ``WRITE_QUEUE_BYTES`` wait) and an error of the thread is raised by the next
    :meth:`write` or by :meth:`finish`. The caller must not modify a tensor after
    handing it over: pass ``background=False`` to write live accumulators. The
    thread ends by itself once every planned byte is written, and :meth:`finish`
    and :meth:`abort` join it.
    """

    def __init__(
        self,
        folder: Path,
        refs: Sequence[TensorRef],
        *,
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        weights_name: str = "model",
        aliases: dict[str, str] | None = None,
        background: bool = True,
        files: Sequence[str] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.aliases = {a: t for a, t in (aliases or {}).items() if t in {r.name for r in refs}}
        metadata = {"format": "pt"}
        if self.aliases:
            metadata["ckptavg.tied"] = json.dumps(self.aliases, sort_keys=True)
        shards = plan_shards(refs, max_shard_bytes)
        if not shards:
            raise OutputError("no tensors to write (every tensor was excluded?)", path=self.folder)
        n = len(shards)
        self.files = [
            f"{weights_name}.safetensors" if n == 1 else f"{weights_name}-{i + 1:05d}-of-{n:05d}.safetensors"
            for i in range(n)
        ] if files is None else list(files)  # given: one rank's shards of a distributed run
        if len(self.files) != n:
            raise OutputError(f"internal: {len(self.files)} file names for {n} shards", path=self.folder)
        self.weights_name = weights_name
        self._shards = shards
        self._metadata = metadata
        self._current: ShardWriter | None = None
        self._index = 0
        self.weight_map = {e.name: self.files[i] for i, shard in enumerate(shards) for e in shard}
        self.total_bytes = sum(e.nbytes for shard in shards for e in shard)
        self._background = background
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._queue: deque[tuple[str, torch.Tensor] | None] = deque()
        self._queued = 0  # bytes in the queue
        self._error: BaseException | None = None
        self._aborted = False

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if not self._background:
            self._write(name, tensor)
            return
        nbytes = tensor.numel() * tensor.element_size()
        with self._cond:
            if self._error is not None:
                raise self._error
            if self._thread is None:
                if self._current is None and self._index >= len(self._shards):
                    self._write(name, tensor)  # nothing more was planned: raises
                self._thread = threading.Thread(target=self._run, name="ckptavg-writer", daemon=True)
                self._thread.start()
            while self._queued > 0 and self._queued + nbytes > WRITE_QUEUE_BYTES and self._error is None:
                if not self._thread.is_alive():  # it ended: every planned byte was written
                    raise OutputError(f"internal: tensor {name!r} was not planned", path=self.folder)
                self._cond.wait(0.5)
            if self._error is not None:
                raise self._error
            self._queue.append((name, tensor))
            self._queued += nbytes
            self._cond.notify_all()

    def _run(self) -> None:
        """The writer thread: drain the queue in order until every planned byte is written."""
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                item = self._queue[0]
            if item is None or self._aborted:
                return
            name, tensor = item
            try:
                self._write(name, tensor)
            except BaseException as e:  # noqa: BLE001 - handed to the caller, raised there
                with self._cond:
                    self._error = e
                    self._queue.clear()
                    self._queued = 0
                    self._cond.notify_all()
                return
            with self._cond:
                self._queue.popleft()
                self._queued -= tensor.numel() * tensor.element_size()
                self._cond.notify_all()
                if self._current is None and self._index == len(self._shards):
                    return  # every planned byte is written (and fsynced)

    def _join(self) -> None:
        """Wait for the writer thread to end (it ends when done, on error, or at the None marker)."""
        if self._thread is None:
            return
        with self._cond:
            self._queue.append(None)
            self._cond.notify_all()
        self._thread.join()
        self._thread = None

    def _write(self, name: str, tensor: torch.Tensor) -> None:
        if self._current is None:
            if self._index >= len(self._shards):
                raise OutputError(f"internal: tensor {name!r} was not planned", path=self.folder)
            self._current = ShardWriter(self.folder / self.files[self._index], self._shards[self._index], self._metadata)
        self._current.write(name, tensor)
        if self._current.done:
            self._current.close()
            self._current = None
            self._index += 1

    def finish(self, *, index: bool = True) -> None:
        """Check that every planned byte was written; with ``index``, write the shard index (several files)."""
        self._join()
        if self._error is not None:
            self.abort()
            raise self._error
        if any(item is not None for item in self._queue):
            self.abort()
            raise OutputError("internal: more tensors were written than planned", path=self.folder)
        if self._current is not None or self._index != len(self._shards):
            self.abort()
            raise OutputError("internal: output ended before every planned tensor was written", path=self.folder)
        if index and len(self.files) > 1:
            write_index(self.folder, self.weights_name, self.weight_map, self.total_bytes)

    def abort(self) -> None:
        self._aborted = True
        self._join()
        if self._current is not None:
            self._current.f.close()
            self._current = None


def write_index(folder: Path, weights_name: str, weight_map: dict[str, str], total_bytes: int) -> None:
    """``<weights_name>.safetensors.index.json``: which shard file holds each tensor."""
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (folder / f"{weights_name}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def copy_meta_files(src: Path | None, dst: Path) -> list[str]:
    """Copy config/tokenizer/generation files (not weights, not trainer state) from ``src``."""
    if src is None or not src.is_dir():
        return []
    copied = []
    for p in sorted(src.iterdir()):
        name = p.name
        if (not p.is_file() or p.is_symlink() or name in _SKIP_NAMES or name.endswith(_SKIP_SUFFIXES)
                or name.startswith(_SKIP_PREFIXES)):
            continue
        shutil.copyfile(p, dst / name)
        copied.append(name)
    return copied


def provenance(avg: Average, formats: Sequence[str], *, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "ckptavg_version": __version__,
        **avg.describe(),
        "steps": [r.step for r in avg.folded],
        "inputs": [r.to_json() for r in avg.folded],
        "formats": sorted(set(formats)),
        **(extra or {}),
    }


def model_card(avg: Average, prov: dict[str, Any], *, total_bytes: int, n_tensors: int) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in avg.method.options().items()) or "none"
    steps = [s for s in prov["steps"] if s is not None]
    step_text = ", ".join(map(str, steps)) if steps else "(unknown steps)"
    rules = "\n".join(f"- `{r}`" for r in avg.rules) or "- none"
    inputs = "\n".join(f"| {r['step']} | `{r['path']}` | `{r['fingerprint'][:16]}` |" for r in prov["inputs"])
    return f"""---
tags:
- ckptavg
- checkpoint-averaging
- {avg.method.name}
---

# {avg.name}: checkpoint average made with ckptavg

This model is the **{avg.method.name}** average (options: {opts}) of {len(prov['inputs'])} training checkpoints,
made by [ckptavg](https://github.com/ckptavg/ckptavg) {prov['ckptavg_version']}.

- Method: `{avg.method.name}` — {avg.method.reference}
- Options: {opts}
- Steps folded: {step_text}
- Accumulation: {short_name(avg.accum_dtype)}; each tensor is stored in its source dtype
- Tensors: {n_tensors} ({format_bytes(total_bytes)})

## Per-tensor rules
{rules}

## Inputs

| step | checkpoint | header fingerprint |
|---|---|---|
{inputs}

`ckptavg.json` holds the same provenance in machine-readable form.
"""


def finish_folder(folder: Path, avg: Average, writer: ModelWriter, *, newest: Checkpoint | None,
                  formats: Sequence[str], extra: dict[str, Any] | None = None) -> None:
    """Close the weights, then add the newest input's config/tokenizer files, ``ckptavg.json`` and the model card."""
    writer.finish()
    copied = copy_meta_files(newest.meta_dir if newest is not None else None, folder)
    prov = provenance(avg, formats, extra={"tied_weights": writer.aliases, "copied_files": copied, **(extra or {})})
    (folder / "ckptavg.json").write_text(json.dumps(prov, indent=2) + "\n")
    (folder / "README.md").write_text(model_card(avg, prov, total_bytes=writer.total_bytes, n_tensors=len(writer.weight_map)))


# -- the daemon's publish: versioned folders behind one symlink --------------------------------------

DEFAULT_PUBLISH_GRACE = 60.0  # seconds a replaced version stays for readers that already resolved the link
VERSIONS = Path(".ckptavg") / "versions"  # OUT/.ckptavg/versions/<name>/vNNNNNN-step<S>/
MIGRATED = "v000000-migrated"  # a real OUT/<name> folder written by an older ckptavg, moved in once
_NUMBER = re.compile(r"v(\d+)(?:-|$)")
_NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EXDEV}


def versions_dir(target: Path) -> Path:
    """Where the versions of the published average ``target`` (``OUT/<name>``) live."""
    target = Path(target)
    return target.parent / VERSIONS / target.name


def _number(name: str) -> int | None:
    m = _NUMBER.match(name)
    return int(m.group(1)) if m else None


def _linked(link: Path) -> Path | None:
    """The folder a symlink ``link`` points to (resolved), or None."""
    return Path(os.path.realpath(link)) if link.is_symlink() else None


def _link_targets(folder: Path) -> set[Path]:
    """Everything a symlink directly in ``folder`` points to: never removed."""
    try:
        return {Path(os.path.realpath(p)) for p in folder.iterdir() if p.is_symlink()}
    except OSError:
        return set()


def _mkdirs(folder: Path) -> None:
    """Create ``folder`` and its missing parents, each made durable in its parent."""
    missing = []
    p = folder
    while not p.exists():
        missing.append(p)
        p = p.parent
    for p in reversed(missing):
        p.mkdir(exist_ok=True)
        fsync_dir(p.parent)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def publish_average(avg: Average, target: Path, *, newest: Checkpoint, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                    aliases: dict[str, str] | None = None, extra: dict[str, Any] | None = None,
                    grace: float = DEFAULT_PUBLISH_GRACE) -> Path:
    """Publish the current state of a long-lived average at ``target`` (the daemon's ``OUT/<name>``).
    Accumulators are left as they are. Returns the new version folder.

    The model folder is built as a new version ``OUT/.ckptavg/versions/<name>/vNNNNNN-step<S>/`` (in a
    staging folder, fsynced, renamed in), then ``OUT/<name>`` is swapped to it with one ``rename()`` of a
    new relative symlink: a reader (``from_pretrained``) always finds a whole folder, the old one or the
    new one. Each opened file stays readable to the end; a replaced version is removed ``grace`` seconds
    after it was replaced, so a reader that resolved ``OUT/<name>`` once (``os.path.realpath``) reads
    every file of one publish. A real folder at ``target`` (an older ckptavg) is moved into the versions
    once, atomically exchanged with the new link where the filesystem can.
    """
    if not grace >= 0:
        raise ValueError(f"grace must be >= 0 seconds, not {grace!r}")
    target = Path(target)
    version = next_version(target, avg.folded[-1].step if avg.folded else None)

    order = [n for n in newest.tensors if n in avg.slots] + [n for n in avg.slots if n not in newest.tensors]
    refs = [TensorSpec(n, avg.slots[n].dtype, avg.slots[n].shape) for n in order]
    with AtomicDir(version) as folder:
        writer = ModelWriter(folder, refs, max_shard_bytes=max_shard_bytes,  # type: ignore[arg-type]
                             weights_name=newest.weights_name, aliases=aliases, background=False)  # live accumulators
        try:
            for name in order:
                writer.write(name, avg.result(name).cpu())
        except BaseException:
            writer.abort()
            raise
        finish_folder(folder, avg, writer, newest=newest, formats=[newest.format], extra=extra)
    point_published(target, version, grace=grace)
    return version


def next_version(target: Path, step: int | None) -> Path:
    """The folder the next version of the published average ``target`` is built as (not created)."""
    versions = versions_dir(target)
    try:
        _mkdirs(versions)
        numbers = [n for p in versions.iterdir() if (n := _number(p.name)) is not None]
    except OSError as e:
        raise OutputError(f"cannot create the versions folder: {e.strerror or e}", path=versions) from e
    return versions / (f"v{max(numbers, default=0) + 1:06d}" + (f"-step{step}" if step is not None else ""))


def point_published(target: Path, version: Path, *, grace: float = DEFAULT_PUBLISH_GRACE) -> None:
    """Swap ``target`` (``OUT/<name>``) to the complete ``version`` folder with one rename, then expire the
    versions replaced more than ``grace`` seconds ago."""
    hooks.point("publish.before-rename", target=target)  # the new version is complete; OUT/<name> is unchanged
    try:
        _point_at(target, version)
    except OSError as e:
        raise OutputError(f"could not publish: {e.strerror or e}", path=target) from e
    expire_versions(target, grace=grace)


def _point_at(target: Path, version: Path) -> None:
    """Swap ``target`` to ``version`` atomically; the version it replaces starts its grace period now."""
    rel = os.path.relpath(version, target.parent)
    if target.is_symlink() or not os.path.lexists(target):
        old = _linked(target)
        if old is not None and old.parent == version.parent.resolve() and old.is_dir():
            os.utime(old)  # replaced now: expire_versions counts the grace period from here
        atomic.swap_symlink(target, rel)
        return
    # OUT/<name> is a real folder (an older ckptavg): move it into the versions, once
    dest = version.parent / MIGRATED
    if os.path.lexists(dest):
        dest = version.parent / f"{MIGRATED}-{secrets.token_hex(4)}"
    os.utime(target)
    tmp = atomic.temp_name(target)
    os.symlink(rel, tmp)
    try:
        atomic.exchange_paths(tmp, target)  # OUT/<name> is now the link; tmp holds the old folder
    except OSError as e:
        if e.errno not in _NO_EXCHANGE:
            tmp.unlink(missing_ok=True)
            raise
        log.warning("%s is a folder written by an older ckptavg and this filesystem cannot exchange it with a "
                    "link atomically: moving it into %s; readers find no %s for a moment, this once", target,
                    dest, target.name)
        os.rename(target, dest)  # a kill here leaves no OUT/<name>: remove_publish_orphans links dest back
        os.replace(tmp, target)
    else:
        os.rename(tmp, dest)  # a kill here leaves the old folder as a staging orphan, removed at start
        log.info("%s was a folder written by an older ckptavg: it is now a link to %s; the old folder is %s",
                 target, version.name, dest)
    fsync_dir(target.parent)
    fsync_dir(dest.parent)


def expire_versions(target: Path, *, grace: float = DEFAULT_PUBLISH_GRACE, startup: bool = False,
                    now: float | None = None) -> list[Path]:
    """Remove the versions of ``target`` that no link points to, once ``grace`` seconds have passed since
    they were replaced (their mtime). With ``startup`` (nothing is publishing), also staging folders of
    interrupted versions and complete versions newer than the linked one (built, never linked)."""
    target = Path(target)
    versions = versions_dir(target)
    now = time.time() if now is None else now
    removed: list[Path] = []
    try:
        entries = list(versions.iterdir())
    except OSError:
        return removed
    keep = _link_targets(target.parent)
    linked = _linked(target)
    linked_n = _number(linked.name) if linked is not None and linked.parent == versions.resolve() else None
    for p in entries:
        if Path(os.path.realpath(p)) in keep:
            continue
        if p.name.startswith("."):
            if not (startup and is_orphan(p.name)):
                continue
        elif not (startup and linked_n is not None and (_number(p.name) or 0) > linked_n):
            try:
                if now - p.lstat().st_mtime < grace:
                    continue
            except OSError:
                continue
        _remove(p)
        removed.append(p)
    return removed


def remove_publish_orphans(output: Path, *, grace: float = DEFAULT_PUBLISH_GRACE, best_grace: float = 600.0,
                           best_link: str = "best", best_versions: str = ".best-versions") -> list[Path]:
    """What the daemon runs at start, before it publishes: remove what interrupted publishes left in
    ``output`` and return it. Never removes what a symlink in ``output`` points to.

    * staging folders and links (``.<name>.ckptavg-tmp-*``) and ``.ckptavg-old-*`` folders in ``output``;
    * per average (``.ckptavg/versions/<name>/``): staging folders, versions built but never linked,
      and replaced versions older than ``grace``. A migration cut short between its two renames (no
      ``OUT/<name>`` but a migrated folder) is repaired first: the link goes back to the old folder;
    * ``.best-versions/``: staging folders, and versions ``best`` does not point to once both they and
      the ``best`` link are older than ``best_grace`` (the link's age bounds when they were replaced).
    """
    output = Path(output)
    removed = remove_orphans(output)
    root = output / VERSIONS
    try:
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        folders = []
    for folder in folders:
        target = output / folder.name
        if not os.path.lexists(target) and (folder / MIGRATED).is_dir():
            log.warning("%s was missing (a migration was interrupted): linking it back to %s", target, MIGRATED)
            atomic.swap_symlink(target, os.path.relpath(folder / MIGRATED, output))
        removed += expire_versions(target, grace=grace, startup=True)
        try:
            folder.rmdir()  # only when empty
        except OSError:
            pass
    best = output / best_versions
    if best.is_dir() and not best.is_symlink():
        keep = _link_targets(output)
        link = output / best_link
        try:
            since = link.lstat().st_mtime
        except OSError:
            since = 0.0
        now = time.time()
        for p in list(best.iterdir()):
            if Path(os.path.realpath(p)) in keep:
                continue
            if p.name.startswith("."):
                if not is_orphan(p.name):
                    continue
            else:
                try:
                    if now - max(p.lstat().st_mtime, since) < best_grace:
                        continue
                except OSError:
                    continue
            _remove(p)
            removed.append(p)
    return removed


def lock_publisher(output: Path, state: Path) -> int:
    """Take the publisher lock of ``output`` (``OUT/.ckptavg/publisher.lock``, beside the published versions):
    one daemon publishes into an output folder, a second one is refused naming the holder. Returns the
    descriptor that holds the lock (close it to let go)."""
    import fcntl

    path = output / ".ckptavg" / "publisher.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    # read-only descriptor: a daemon holding the output must not keep it from being remounted read-only
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise StateLockedError(f"is published by another ckptavg daemon ({holder})", path=output,
                               hint="give each daemon its own output folder") from None
    path.write_text(f"pid {os.getpid()}, state {state.resolve()}")
    return fd
