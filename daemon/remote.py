"""``ckptavg watch s3://bucket/run``: the run in object storage, mirrored locally for the daemon.

Object stores send no file events, so a thread polls the run's listing every ``poll_interval`` seconds
(one paginated ``fs.find`` of the run, no cached listing). A checkpoint that is finished by its writer's rule
(:func:`ckptavg.reading.remote.remote_ready`: ``trainer_state.json`` for an HF Trainer folder, ``.metadata``
for DCP, every shard present and quiet for a ``save_pretrained`` folder) is downloaded — its weights, index
and config/tokenizer files, and ``trainer_state.json``; never the trainer's optimizer, scheduler or RNG
state — by ranged reads in parallel parts, each retried on a dropped connection
(:class:`ckptavg.reading.remote.ObjectStore`), into a hidden staging folder that is renamed into the mirror
only when whole (:class:`~ckptavg.writing.atomic.AtomicDir`). Each file keeps the object's last-modified
time, the trainer's clock. An object that changed while it was downloaded (its ETag or size) is thrown away
and fetched again at the next poll.

The daemon (:mod:`ckptavg.daemon.service`) watches the mirror as it watches any local run: the same
readiness rules, exactly-once folding, and retention. A checkpoint the trainer deletes from the bucket
(rotation) is deleted from the mirror too, so the mirror holds what the bucket holds; the checkpoints the
averages still need (LAWA's leaving member, what is queued) were hard-linked into ``STATE/keep/`` from the
mirror when they were taken, so their bytes stay (:mod:`ckptavg.daemon.retain`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ckptavg.errors import CheckpointError, CkptavgError
from ckptavg.reading.names import PICKLE_SUFFIXES, is_noise
from ckptavg.reading.ready import remote_ready
from ckptavg.reading.remote import TRAINER_FILES, ObjectStore, modified, redact_url, store_for
from ckptavg.reading.steps import order_key
from ckptavg.writing.atomic import AtomicDir, fsync_path, remove_orphans, temp_name

log = logging.getLogger(__name__)

__all__ = ["RemoteMirror", "start_mirror", "stop_mirror"]

STATE_FILE = ".ckptavg-mirror.json"  # hidden: never a checkpoint candidate
_BATCH_PARTS = 4  # parts of one file in flight while downloading (each ``part_bytes``)


def _skipped(name: str) -> bool:
    """Trainer state the daemon never reads (the optimizer is 2-3x the weights): not downloaded."""
    return name in TRAINER_FILES or name.startswith(("rng_state", "optimizer", "scheduler", "."))


class RemoteMirror:
    """Keeps ``local`` a mirror of the finished checkpoints of the run at ``url``."""

    def __init__(self, url: str, local: Path, *, storage_options: Mapping[str, Any] | None = None,
                 poll_interval: float = 2.0, settle: float = 5.0, marker: str | None = None,
                 wake: threading.Event | None = None, store: ObjectStore | None = None) -> None:
        self.url = url
        self.local = Path(local)
        if store is None:
            self.store, self.root = store_for(url, storage_options)
        else:
            self.store, self.root = store, url.split("://", 1)[1].rstrip("/")
        self.poll_interval = poll_interval
        self.settle = settle
        self.marker = marker
        self.wake = wake
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._said: set[tuple[str, str]] = set()
        self.local.mkdir(parents=True, exist_ok=True)
        remove_orphans(self.local)  # a download cut short by a crash
        self.mirrored: dict[str, list] = self._load()  # name -> [[file, size, etag], ...] as downloaded

    # -- bookkeeping --------------------------------------------------------------------------------------
    def _load(self) -> dict[str, list]:
        try:
            data = json.loads((self.local / STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("url") != self.url or not isinstance(data.get("mirrored"), dict):
            return {}
        return {k: v for k, v in data["mirrored"].items() if (self.local / k).exists()}

    def _save(self) -> None:
        tmp = self.local / f"{STATE_FILE}.tmp"
        tmp.write_text(json.dumps({"url": self.url, "mirrored": self.mirrored}), encoding="utf-8")
        os.replace(tmp, self.local / STATE_FILE)

    def _say_once(self, name: str, what: str, *args: Any) -> None:
        if (name, what) not in self._said:
            self._said.add((name, what))
            log.warning(what, *args)

    # -- one poll -----------------------------------------------------------------------------------------
    def sync(self) -> int:
        """Mirror what is new or re-written, drop what the trainer deleted. Returns checkpoints downloaded.
        One paginated listing of the whole run per poll (not one per checkpoint folder)."""
        tree = self.store.tree(self.root)
        candidates = []
        for name, objects in tree.items():
            folder = "" not in objects
            if is_noise(name) or order_key(name) is None or (
                    not folder and not name.endswith((".safetensors", *PICKLE_SUFFIXES))):
                continue
            files = ({n: e for n, e in objects.items() if n and "/" not in n and not _skipped(n)} if folder
                     else {name: objects[""]})
            candidates.append((order_key(name), name, folder, files))
        candidates.sort(key=lambda c: c[0])
        got = 0
        for _, name, folder, files in candidates:
            if self._stop.is_set():
                break
            path = f"{self.root}/{name}"
            try:
                if self.mirrored.get(name) == _signature(files):
                    continue
                ready = remote_ready(self.store, path, settle=self.settle, marker=self.marker, open_it=False)
                if not ready.ready:
                    if ready.state == "bad":
                        self._say_once(name, "not mirroring %s: %s", self.store.location(path), ready.reason)
                    continue
                if self._download(path, name, folder, files):
                    got += 1
            except CkptavgError as e:
                self._say_once(name, "not mirroring %s yet: %s", self.store.location(path), e)
            except OSError as e:
                self._say_once(name, "cannot mirror %s into %s: %s", self.store.location(path), self.local,
                               e.strerror or e)
        for name in [n for n in self.mirrored if n not in tree]:  # rotated away in the bucket
            log.info("%s was deleted from %s; removing its mirror copy (retained copies stay)", name,
                     redact_url(self.url))
            target = self.local / name
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
            del self.mirrored[name]
            self._save()
        return got

    def _files(self, path: str, folder: bool) -> dict[str, dict[str, Any]]:
        if not folder:
            return {path.rsplit("/", 1)[-1]: dict(self.store.info(path))}
        return {n: e for n, e in self.store.listing(path).items() if e.get("type") != "directory" and not _skipped(n)}

    def _download(self, path: str, name: str, folder: bool, files: dict[str, dict[str, Any]]) -> bool:
        target = self.local / name
        if folder:
            with AtomicDir(target, replace=True) as tmp:
                for fname, info in sorted(files.items()):
                    self._fetch_file(f"{path}/{fname}", info, tmp / fname)
                newest = max((modified(i) for i in files.values()), default=0.0)
                if newest:
                    os.utime(tmp, (newest, newest))
                if _signature(self._files(path, folder)) != _signature(files):
                    raise CheckpointError("changed while it was downloaded; fetched again at the next poll",
                                          path=self.store.location(path))
        else:
            tmp = temp_name(target)
            try:
                self._fetch_file(path, files[name], tmp)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
        self.mirrored[name] = _signature(files)
        self._save()
        size = sum(int(i.get("size") or 0) for i in files.values())
        log.info("mirrored %s (%d file(s), %.1f MB) into %s", self.store.location(path), len(files), size / 1e6,
                 target)
        if self.wake is not None:
            self.wake.set()
        return True

    def _fetch_file(self, path: str, info: Mapping[str, Any], dest: Path) -> None:
        """Download one object whole: ranged parts, a few in flight, each retried by the store."""
        size = int(info.get("size") or 0)
        part = self.store.part_bytes
        ranges = [(lo, min(lo + part, size)) for lo in range(0, size, part)]
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for i in range(0, len(ranges), _BATCH_PARTS):
                batch = ranges[i:i + _BATCH_PARTS]
                for (lo, _), data in zip(batch, self.store.fetch(path, batch)):
                    os.pwrite(fd, data, lo)
        finally:
            os.close(fd)
        fsync_path(dest)
        when = modified(info)
        if when:
            os.utime(dest, (when, when))

    # -- the thread ---------------------------------------------------------------------------------------
    def start(self) -> None:
        log.info("mirroring %s into %s (polled every %g s)", redact_url(self.url), self.local, self.poll_interval)
        self._thread = threading.Thread(target=self._run, name="ckptavg-mirror", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception as e:  # noqa: BLE001 - the listing failed (network, credentials): said, retried
                self._say_once("", "cannot list %s: %s (retried every poll)", redact_url(self.url), e)
            self._stop.wait(self.poll_interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def _signature(files: Mapping[str, Mapping[str, Any]]) -> list:
    return [[n, int(i.get("size") or 0), str(i.get("ETag") or i.get("etag") or modified(i))]
            for n, i in sorted(files.items())]


def start_mirror(cfg: Any, *, wake: threading.Event | None = None) -> RemoteMirror | None:
    """The mirror of ``cfg.watch_url`` into ``cfg.watch``, started; None for a local run."""
    url = getattr(cfg, "watch_url", None)
    if url is None:
        return None
    mirror = RemoteMirror(url, cfg.watch, storage_options=dict(cfg.storage), poll_interval=cfg.poll_interval,
                          settle=cfg.settle, marker=cfg.marker, wake=wake)
    mirror.start()
    return mirror


def stop_mirror(mirror: RemoteMirror | None) -> None:
    if mirror is not None:
        mirror.stop()
