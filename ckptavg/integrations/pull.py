"""The worker's side of Elastic Averaging SGD: ``x_i ← x_i − α (x_i − x̃)`` toward the published centre.

``ckptavg centre`` publishes the centre as ``OUT/centre``, a symlink to a complete version folder
``OUT/.ckptavg/versions/centre/vNNNNNN-step<S>/`` that is swapped atomically; a replaced version stays
readable for a grace period (60 s). The pull resolves the link once and reads only that folder, so it
never mixes two versions; a version that expired meanwhile is simply not pulled (the next call tries
the newer one). Tensors are read with safetensors (no code execution), one at a time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ckptavg.errors import OptionError, TensorMismatchError, UsageError

log = logging.getLogger(__name__)

__all__ = ["PullState", "centre_version", "pull_toward_centre"]

_VERSION = re.compile(r"^v(\d+)(?:-|$)")


@dataclass
class PullState:
    """What a worker last pulled toward: the centre version's number and folder name (None: nothing yet)."""

    number: int | None = None
    version: str | None = None
    pulls: int = 0


_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {centre path: PullState}


def _link(centre_dir: Path) -> Path:
    """``OUT/centre`` given either it or ``OUT``."""
    centre_dir = Path(centre_dir)
    if (centre_dir / "centre").exists() and not (centre_dir / "ckptavg.json").exists():
        return centre_dir / "centre"
    return centre_dir


def centre_version(centre_dir: str | os.PathLike) -> tuple[int, Path] | None:
    """The published centre's version number and the version folder it resolves to (None: none published)."""
    link = _link(Path(centre_dir))
    try:
        folder = Path(os.path.realpath(link))
        if not (folder / "ckptavg.json").is_file():
            return None
    except OSError:
        return None
    m = _VERSION.match(folder.name)
    if m is not None:
        return int(m.group(1)), folder
    try:  # not a versioned folder (a plain model folder): its mtime orders it
        return (folder / "ckptavg.json").stat().st_mtime_ns, folder
    except OSError:
        return None


def _files(folder: Path) -> list[Path]:
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        weight_map = json.loads(index[0].read_text())["weight_map"]
        return [folder / n for n in sorted(set(weight_map.values()))]
    return sorted(folder.glob("*.safetensors"))


def _check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or not 0 < alpha <= 1:
        raise OptionError.invalid("pull", "alpha", alpha, "a number in (0, 1]")
    return float(alpha)


@torch.no_grad()
def pull_toward_centre(model: torch.nn.Module, centre_dir: str | os.PathLike, alpha: float, *,
                       last: PullState | None = None) -> bool:
    """If a centre newer than the one last pulled toward is published at ``centre_dir`` (``OUT/centre`` or
    ``OUT``), move every parameter of ``model`` that the centre holds toward it, in place:
    ``x ← x − α (x − x̃)``. Call it between optimizer steps. Returns whether it pulled.

    ``last`` records the version pulled toward (default: kept per model and centre folder). Parameters the
    centre lacks are left as they are; a parameter whose shape differs raises :class:`TensorMismatchError`.
    """
    from safetensors import safe_open

    alpha = _check_alpha(alpha)
    if last is None:
        last = _STATES.setdefault(model, {}).setdefault(str(Path(centre_dir).resolve()), PullState())
    found = centre_version(centre_dir)
    if found is None:
        return False
    number, folder = found
    if last.number is not None and number <= last.number:
        return False
    params = dict(model.named_parameters())
    for n, p in list(params.items()):  # a DistributedDataParallel wrapper's names match the centre's without it
        if n.startswith("module."):
            params.setdefault(n[len("module."):], p)
    pulled = 0
    with contextlib.ExitStack() as stack:
        try:  # every file opened before any parameter moves: a version removed meanwhile stays readable
            paths = _files(folder)
            files = [stack.enter_context(safe_open(str(f), framework="pt", device="cpu")) for f in paths]
        except FileNotFoundError:  # the version expired between resolving and opening: the next call pulls
            log.info("centre version %s was replaced before it could be read; pulling toward the next one", folder.name)
            return False
        for f, sf in zip(paths, files):
            for name in sf.keys():  # noqa: SIM118 - safe_open is not a mapping
                p = params.get(name)
                shape = tuple(sf.get_slice(name).get_shape()) if p is not None else None
                if p is not None and shape != tuple(p.shape):
                    raise TensorMismatchError(f"is {list(shape)} in the centre but {list(p.shape)} in the model",
                                              path=f, tensor=name, hint="pull toward a centre of this model")
        for sf in files:  # shapes checked everywhere first: a mismatch leaves the model untouched
            for name in sf.keys():  # noqa: SIM118
                p = params.get(name)
                if p is None:
                    continue
                c = sf.get_tensor(name)
                d = torch.sub(p, c.to(device=p.device, dtype=p.dtype))  # x − x̃
                d.mul_(alpha)  # α (x − x̃)
                p.sub_(d)  # x − α (x − x̃)
                pulled += 1
    if pulled == 0:
        raise UsageError("the published centre holds none of the model's parameters", path=folder,
                         hint="pull toward the centre of this model's workers")
    last.number, last.version, last.pulls = number, folder.name, last.pulls + 1
    return True
