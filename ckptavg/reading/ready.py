"""When is a checkpoint finished? By the rules of the writer that made it.

Writers do not save atomically, so a checkpoint is folded only once its writer's
commit signal is there (``docs/FAULTS.md``, "What checkpoint writers guarantee,
and what they don't"):

* **HF Trainer** folder (Trainer files such as ``optimizer.pt``/``rng_state*`` present):
  ``trainer_state.json`` (written last) exists and every indexed shard is present and whole.
* **torch.distributed.checkpoint**: ``.metadata`` exists (``.metadata.tmp`` renamed is the commit).
* **Orbax**: no ``.orbax-checkpoint-tmp`` in the name, or ``commit_success.txt`` present.
* **accelerate** ``save_state`` folder (``random_states_<n>.pkl``, ``optimizer.bin`` ... and no
  ``trainer_state.json``): ``random_states_0.pkl`` (written last) has its zip end record, the weights are
  whole, and the folder is quiet for ``settle`` seconds (registered custom objects are saved after it).
* **DeepSpeed**: a non-empty ``latest`` tag file in the run folder names the tag (or a later one), and every
  rank's file the optimizer states' partition count calls for is there (a flat retained copy, with no
  ``latest`` beside it, is judged by its rank files alone).
* **a bare safetensors file or ``save_pretrained`` folder**: complete by header arithmetic
  (``8 + header_len + data_end == size``) and quiet for ``settle`` seconds.
* **a pickle file** (``.pt``/``.ckpt``/``.bin``): its zip end-of-central-directory record is
  there (a torch zip written in place lacks it until the end) and it is quiet for ``settle`` seconds.
* a user **marker** glob (e.g. ``COMPLETE``) overrides all of these.

"Quiet" is judged on the trainer's clock where it agrees with ours: a file whose mtime lies in the
future (clock skew between the trainer's host and the file server) is quiet once its size and mtime
have not changed for ``settle`` seconds of our clock (the caller keeps that memory in ``seen``).
Special files (a FIFO or device where a weight file should be) are refused without being opened.

Nothing here reads tensor data or unpickles anything. The clock is injectable.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from ckptavg.errors import CheckpointError, IncompleteCheckpointError, UnsupportedCheckpointError
from ckptavg.reading.checkpoint import Checkpoint, open_checkpoint, open_remote_checkpoint
from ckptavg.reading.fileio import zip_finished
from ckptavg.reading.formats import accelerate as acc
from ckptavg.reading.names import PICKLE_SUFFIXES, is_noise
from ckptavg.reading.remote import ObjectStore, is_dir, modified, trainer_pending
from ckptavg.reading.steps import step_from_name

__all__ = ["Readiness", "check_ready", "remote_ready"]

_SKEW = 2.0  # seconds of clock difference tolerated before an mtime counts as "in the future"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Readiness:
    state: Literal["ready", "waiting", "bad"]
    reason: str
    checkpoint: Checkpoint | None = None  # the indexed checkpoint, when it was opened

    @property
    def ready(self) -> bool:
        return self.state == "ready"


def _newest_mtime(path: Path) -> float:
    if path.is_file():
        return path.stat().st_mtime
    newest = path.stat().st_mtime
    for entry in os.scandir(path):
        try:
            newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
        except FileNotFoundError:
            continue
    return newest


def _signature(path: Path) -> tuple:
    entries = [path] if path.is_file() else [path, *sorted(path.iterdir())]
    out = []
    for p in entries:
        try:
            st = p.stat()
        except OSError:
            continue
        out.append((p.name, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _quiet(path: Path, settle: float, now: float, seen: dict | None) -> bool:
    """Unmodified for ``settle`` seconds: by the files' mtimes, or, when those lie in the future (the writer's
    clock is ahead), by how long their sizes and mtimes have stayed the same as first seen (``seen``)."""
    newest = _newest_mtime(path)
    if newest <= now + _SKEW:
        return now - newest >= settle
    if seen is None:
        return False
    sig = _signature(path)
    first = seen.get(path)
    if first is None or first[0] != sig:
        if first is None:
            log.warning("%s was modified %.0f s in the future by this host's clock (clock skew between the trainer's "
                        "host and the file server?); it is folded once it has not changed for %g s",
                        path, newest - now, settle)
        seen[path] = (sig, now)
        return False
    return now - first[1] >= settle


def _special(path: Path) -> Path | None:
    """The first file that is neither a regular file nor a folder (a FIFO, a socket, a device), or None."""
    entries = [path] if not path.is_dir() else [path, *path.iterdir()]
    for p in entries:
        try:
            mode = p.stat().st_mode
        except OSError:
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            return p
    return None


def check_ready(path: Path, *, settle: float = 5.0, marker: str | None = None,
                clock: Callable[[], float] = time.time, seen: dict | None = None,
                deepspeed_weights: str = "fp32") -> Readiness:
    """Decide whether ``path`` (a checkpoint folder or file) is finished and can be folded.

    ``seen`` (kept by the caller between calls) lets a checkpoint whose mtime lies in the future count as
    quiet once it stops changing."""
    path = Path(path)
    if is_noise(path.name):
        return Readiness("waiting", "a staging or hidden name; the writer has not renamed it yet")
    if not path.exists():
        return Readiness("waiting", "not there (yet)")
    special = _special(path)
    if special is not None:
        return Readiness("bad", f"{special} is not a regular file (a FIFO, socket or device?); it is never opened")
    if marker is not None:
        base = path if path.is_dir() else path.parent
        return (Readiness("ready", f"marker {marker!r} present") if any(base.glob(marker))
                else Readiness("waiting", f"marker {marker!r} not written yet"))
    quiet = _quiet(path, settle, clock(), seen)
    if path.is_dir():
        names = set(os.listdir(path))
        if any(n.endswith(".distcp") for n in names) or ".metadata.tmp" in names or ".metadata" in names:
            return (Readiness("ready", "DCP .metadata committed") if ".metadata" in names
                    else Readiness("waiting", "DCP .metadata not committed yet"))
        if "commit_success.txt" in names:
            return Readiness("ready", "Orbax commit_success.txt present")
        latest = path.parent / "latest"
        if not latest.exists() and path.name.startswith("global_step") and any(
                n.endswith("_model_states.pt") for n in names):
            return Readiness("waiting", "DeepSpeed has not written 'latest' beside this tag yet (it writes it last)")
        if latest.is_file():  # DeepSpeed: the tag file is written after the tag folder
            tag = latest.read_text(errors="replace").strip()
            here, there = step_from_name(path.name), step_from_name(tag)
            if not tag or (tag != path.name and (here is None or there is None or there < here)):
                return Readiness("waiting", f"DeepSpeed 'latest' names {tag or 'nothing'!s}, not this tag yet")
        accelerate = acc.is_accelerate(names)
        if accelerate and (why := acc.pending(path)) is not None:
            return Readiness("waiting", why)
        trainer = not accelerate and (bool(names & {"optimizer.pt", "optimizer.bin", "scheduler.pt", "training_args.bin",
                                                   "scaler.pt"}) or any(n.startswith("rng_state") for n in names))
        if trainer and "trainer_state.json" not in names:
            return Readiness("waiting", "trainer_state.json not written yet (the HF Trainer writes it last)")
    elif path.suffix in (".pt", ".pth", ".bin", ".ckpt") and not zip_finished(path):
        return Readiness("waiting", "pickle still being written (no zip end record yet)")
    try:
        ckpt = open_checkpoint(path, deepspeed_weights=deepspeed_weights)
    except IncompleteCheckpointError as e:
        return Readiness("waiting", str(e))
    except UnsupportedCheckpointError as e:
        return Readiness("bad", str(e))
    except CheckpointError as e:
        # a header that does not parse may still be mid-write: wait for the settle window, then call it bad
        return Readiness("bad" if quiet else "waiting", str(e))
    if ckpt.incomplete:  # e.g. a DeepSpeed rank file missing, named
        return Readiness("waiting", ckpt.incomplete)
    if path.is_dir() and (path / "trainer_state.json").exists():
        return Readiness("ready", "HF Trainer checkpoint: trainer_state.json written and every shard whole", ckpt)
    if not quiet:
        return Readiness("waiting", f"whole, but modified less than {settle:g} s ago")
    if path.is_dir() and acc.is_accelerate(os.listdir(path)):
        return Readiness("ready", f"accelerate save_state: {acc.LAST_FILE} (written last) and the weights whole, "
                                  f"quiet for {settle:g} s", ckpt)
    return Readiness("ready", f"{ckpt.format}: whole and quiet for {settle:g} s", ckpt)


def remote_ready(store: ObjectStore, path: str, *, settle: float = 5.0, now: float | None = None,
                 marker: str | None = None, open_it: bool = True) -> Readiness:
    """The writer's completion rule for a checkpoint in object storage (:mod:`ckptavg.reading.ready` for local
    ones). Objects appear whole (a PUT or a multipart upload completes atomically), so what is judged is the
    folder: ``trainer_state.json`` for an HF Trainer folder, ``.metadata`` for DCP, every shard an index names
    for a ``save_pretrained`` folder, which must also be quiet (no object newer than ``settle`` seconds, on the
    server's clock). ``open_it``: index the safetensors headers too (the one-shot's and inspect's view)."""
    name = path.rsplit("/", 1)[-1]
    if is_noise(name):
        return Readiness("waiting", "a staging or hidden name; the writer has not renamed it yet")
    try:
        top = store.info(path)
    except FileNotFoundError:
        return Readiness("waiting", "not there (yet)")
    entries = store.listing(path) if is_dir(top) else {name: top}
    now = time.time() if now is None else now
    if marker is not None:
        return (Readiness("ready", f"marker {marker!r} present") if any(fnmatch.fnmatch(n, marker) for n in entries)
                else Readiness("waiting", f"marker {marker!r} not written yet"))
    if is_dir(top):
        if any(n.endswith(".distcp") for n in entries) or ".metadata" in entries:
            return (Readiness("ready", "DCP .metadata committed") if ".metadata" in entries
                    else Readiness("waiting", "DCP .metadata not committed yet"))
        if (why := trainer_pending(entries)) is not None:
            return Readiness("waiting", why)
    newest = max((modified(e) for e in entries.values() if not is_dir(e)), default=0.0)
    ckpt = None
    if open_it or not any(n.endswith(PICKLE_SUFFIXES) for n in entries):
        try:
            ckpt = open_remote_checkpoint(f"{store.scheme}://{path}", store=store, side_files=open_it)
        except IncompleteCheckpointError as e:
            return Readiness("waiting", str(e))
        except UnsupportedCheckpointError as e:
            if open_it:
                return Readiness("bad", str(e))
        except CheckpointError as e:
            quiet = now - newest >= settle
            return Readiness("bad" if quiet else "waiting", str(e))
    if "trainer_state.json" in entries:
        return Readiness("ready", "HF Trainer checkpoint: trainer_state.json written and every shard there", ckpt)
    if now - newest < settle:
        return Readiness("waiting", f"whole, but uploaded less than {settle:g} s ago")
    return Readiness("ready", f"{ckpt.format if ckpt else 'checkpoint'}: whole and quiet for {settle:g} s", ckpt)
