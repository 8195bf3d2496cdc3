"""Finding the checkpoints of a run folder.

A run folder (a Trainer's ``output_dir``, a Lightning ``checkpoints/`` folder, a
plain loop's save folder) is walked a few levels deep. A candidate is a folder
or weight file whose name carries a step (``checkpoint-500``, ``step_500.pt``,
``epoch=1-step=500.ckpt``, fairseq's ``checkpoint_3_500.pt``) or is a fairseq epoch checkpoint
(``checkpoint3.pt``, ordered after the update checkpoints of its epoch, see :func:`steps.order_key`).
Aliases whose names carry no step (Lightning's ``last.ckpt``, a copy or a link; fairseq's
``checkpoint_last.pt`` and ``checkpoint_best.pt``, copies) are never candidates. Staging names that writers use before the final
rename are ignored (``tmp-checkpoint-*``, ``*.tmp``, ``*.orbax-checkpoint-tmp-*``,
``.metadata.tmp``, dotfiles). Symbolic links are followed only inside the root
(a checkpoint folder whose weight file links out of the root is skipped),
each file or folder is taken once (by ``(st_dev, st_ino)``, so ``last.ckpt`` →
``epoch=3-step=900.ckpt`` is one checkpoint), and a directory loop cannot hang
the walk.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ckptavg.errors import CheckpointError, CheckpointNotFoundError, IncompleteCheckpointError
from ckptavg.reading.checkpoint import Checkpoint, open_checkpoint, open_remote_many
from ckptavg.reading.formats.deepspeed import holds_deepspeed
from ckptavg.reading.names import DCP_MARKERS, WEIGHT_SUFFIXES, is_noise, is_side_file
from ckptavg.reading.remote import list_run, store_for
from ckptavg.reading.steps import checkpoint_kind, order_key
from ckptavg.redact import warn_once

log = logging.getLogger(__name__)

__all__ = ["find_candidates", "latest_complete"]

def find_candidates(root: Path, *, max_depth: int = 4) -> list[Path]:
    """Every path under ``root`` that names a step (or a fairseq epoch) and may hold a checkpoint, in training
    order (:func:`ckptavg.reading.steps.order_key`)."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointNotFoundError("run folder not found", path=root)
    real_root = root.resolve()
    seen: set[tuple[int, int]] = set()
    found: list[tuple[tuple, Path]] = []

    def inside(p: Path) -> bool:
        try:
            real = p.resolve()
        except (OSError, RuntimeError):  # symlink loop
            return False
        return real == real_root or real_root in real.parents

    def visit(folder: Path, depth: int) -> None:
        try:
            st = folder.stat()
        except OSError:
            return
        key = (st.st_dev, st.st_ino)
        if key in seen:
            return
        seen.add(key)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            log.warning("cannot list %s: %s", folder, e.strerror)
            return
        for entry in entries:
            if is_noise(entry.name):
                continue
            path = Path(entry.path)
            if entry.is_symlink() and not inside(path):
                warn_once(log, ("link-out", str(path), str(root)), "security: %s links outside %s; not followed", path, root)
                continue
            try:
                is_dir = entry.is_dir()
                st_e = entry.stat()
            except OSError:
                continue
            step = order_key(entry.name)
            if is_dir:
                if step is not None and _holds_weights(path):
                    outside = _weights_outside(path, inside)
                    if outside is not None:
                        warn_once(log, ("weights-out", str(path), str(outside)),
                                  "security: skipping %s: its weight file %s resolves outside %s; not followed",
                                  path, outside, root)
                        continue
                    if (st_e.st_dev, st_e.st_ino) not in seen:
                        seen.add((st_e.st_dev, st_e.st_ino))
                        found.append((step, path))
                elif depth < max_depth:
                    visit(path, depth + 1)
            elif step is not None and entry.name.endswith(WEIGHT_SUFFIXES) and not is_side_file(entry.name):
                key_e = (st_e.st_dev, st_e.st_ino)
                if key_e in seen:
                    log.info("%s is the same file as one already found; taken once", path)
                    continue
                seen.add(key_e)
                found.append((step, path))

    visit(root, 0)
    found.sort(key=lambda t: (t[0], str(t[1])))
    return [p for _, p in found]


def _weight_names(folder: Path) -> list[str]:
    """Names in ``folder`` that may be (or index) its weights (DCP: its ``.distcp`` files, or accelerate's
    ``pytorch_model_fsdp_0/``; whether ``.metadata`` committed them is judged when the folder is opened)."""
    return [n for n in os.listdir(folder)
            if not is_noise(n) and n.endswith((*WEIGHT_SUFFIXES, ".index.json", *DCP_MARKERS))
            and not is_side_file(n)]


def _weights_outside(folder: Path, inside: Callable[[Path], bool]) -> Path | None:
    """The first weight file of ``folder`` that is a link resolving outside the run root, or None.

    A checkpoint folder inside the root whose ``model.safetensors`` links elsewhere
    would make ckptavg read (and publish) a file the user never pointed it at.
    """
    try:
        names = sorted(_weight_names(folder))
    except OSError:
        return None
    for n in names:
        p = folder / n
        if p.is_symlink() and not inside(p):
            return p
    return None


def _holds_weights(folder: Path) -> bool:
    try:  # an HF Trainer checkpoint-N under ZeRO-3 may hold only latest and global_stepN/
        return bool(_weight_names(folder)) or holds_deepspeed(folder)
    except OSError:
        return False


def latest_complete(root: Path, n: int, *, kind: str | None = None, **open_options: object) -> list[Checkpoint]:
    """The newest ``n`` complete checkpoints of a run folder, oldest first.

    Incomplete ones (still being written: a missing shard, a truncated file, no
    ``trainer_state.json`` yet) are skipped with a warning. ``kind`` ``"epoch"`` or ``"update"`` keeps
    only fairseq's epoch (``checkpoint<E>.pt``) or update (``checkpoint_<E>_<U>.pt``) checkpoints, like
    fairseq's ``average_checkpoints.py --num-epoch-checkpoints`` / ``--num-update-checkpoints``.
    """
    chosen: list[Checkpoint] = []
    candidates = find_candidates(root)
    if kind is not None:
        candidates = [p for p in candidates if checkpoint_kind(p) == kind]
        if not candidates:
            raise CheckpointNotFoundError(f"holds no fairseq {kind} checkpoints", path=root,
                                          hint="epoch: checkpoint<E>.pt; update: checkpoint_<E>_<U>.pt")
    for path in reversed(candidates):
        try:
            ckpt = open_checkpoint(path, **open_options)  # type: ignore[arg-type]
        except IncompleteCheckpointError as e:
            log.warning("skipping incomplete checkpoint: %s", e)
            continue
        except CheckpointError as e:
            log.warning("skipping %s: %s", path, e)
            continue
        if ckpt.incomplete:
            log.warning("skipping %s: %s", path, ckpt.incomplete)
            continue
        if chosen and chosen[-1].step == ckpt.step:
            log.warning("skipping %s: same step %s as %s", path, ckpt.step, chosen[-1].path)
            continue
        chosen.append(ckpt)
        if len(chosen) == n:
            break
    if not chosen:
        raise CheckpointNotFoundError("no complete checkpoint with a step in its name was found", path=root,
                                      hint="expected checkpoint-<N>/, step-<N>, epoch=E-step=N.ckpt ...")
    return list(reversed(chosen))


def remote_latest_complete(url: str, n: int, *, storage_options: Mapping[str, Any] | None = None) -> list[Checkpoint]:
    """The newest ``n`` complete checkpoints of a run folder in object storage, oldest first (as
    :func:`latest_complete` for a local one). Candidates are indexed newest first, ``n`` at a time concurrently."""
    store, root = store_for(url, storage_options)
    candidates = [f"{store.scheme}://{path}" for path, _ in reversed(list_run(store, root))]
    chosen: list[Checkpoint] = []
    while candidates and len(chosen) < n:
        batch, candidates = candidates[: max(1, min(n - len(chosen), 16))], candidates[max(1, min(n - len(chosen), 16)):]
        for ckpt in open_remote_many(batch, store=store):
            if isinstance(ckpt, CheckpointError):
                log.warning("skipping: %s", ckpt)
                continue
            if ckpt.incomplete:
                log.warning("skipping %s: %s", ckpt.path, ckpt.incomplete)
                continue
            if chosen and chosen[-1].step == ckpt.step:
                log.warning("skipping %s: same step %s as %s", ckpt.path, ckpt.step, chosen[-1].path)
                continue
            chosen.append(ckpt)
            if len(chosen) == n:
                break
    if not chosen:
        raise CheckpointNotFoundError("no complete checkpoint with a step in its name was found",
                                      path=store.location(root),
                                      hint="expected checkpoint-<N>/ folders of safetensors weights")
    return list(reversed(chosen))
