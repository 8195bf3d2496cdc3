"""Whether checkpoints are of one model: refuse unrelated models, warn about tensors some inputs lack.

Two checkpoints are of different models when their ``config.json`` names another ``model_type`` or
``architectures``, or when each holds tensors the other lacks. A run that grows (progressive training:
tensors that appear at a later step) holds a superset of what it held before and passes; a tensor
missing from some inputs is averaged over the inputs that hold it, with a warning naming it and them.

:func:`check_inputs` judges the inputs of a one-shot run all at once; :func:`check_against` judges one
checkpoint against what a long-lived :class:`~ckptavg.averaging.average.Average` already holds (the
daemon's folds, through :meth:`Engine.fold <ckptavg.averaging.engine.Engine.fold>`).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Sequence

from ckptavg.averaging.average import Average
from ckptavg.errors import MixedModelsError
from ckptavg.reading.checkpoint import Checkpoint

log = logging.getLogger(__name__)

__all__ = ["check_against", "check_inputs"]

_HINT = "average checkpoints of one model, or pass --allow-mixed-models to average them anyway"


def _some(names: Iterable[str], n: int = 3) -> str:
    """Up to ``n`` names, quoted, and how many more."""
    names = sorted(names)
    text = ", ".join(repr(x) for x in names[:n])
    return text + (f" and {len(names) - n} more" if len(names) > n else "")


def _paths(ckpts: Sequence[Checkpoint], n: int = 3) -> str:
    text = ", ".join(str(c.path) for c in ckpts[:n])
    return text + (f" and {len(ckpts) - n} more" if len(ckpts) > n else "")


def _disjoint(here: set[str], there: set[str], other: str) -> str | None:
    """What differs when each set holds names the other lacks (None: one holds the other)."""
    extra, lacking = here - there, there - here
    if not extra or not lacking:
        return None
    return (f"it holds {len(extra)} tensor(s) that {other} lacks ({_some(extra)}) "
            f"and lacks {len(lacking)} that {other} holds ({_some(lacking)})")


def _refuse_or_warn(error: MixedModelsError, allow: bool) -> None:
    if not allow:
        raise error
    log.warning("%s; averaging anyway (--allow-mixed-models)", error)


def check_inputs(ckpts: Sequence[Checkpoint], *, allow_mixed: bool = False) -> None:
    """Refuse (``allow_mixed``: warn about) inputs of different models; warn, per group of inputs,
    about the tensors they lack that others hold."""
    known = [c for c in ckpts if c.model is not None]
    for c in known[1:]:
        if c.model != known[0].model:
            _refuse_or_warn(MixedModelsError(
                f"is not the same model as {known[0].path}: config.json says {c.model} here and {known[0].model} there",
                path=c.path, hint=_HINT), allow_mixed)
            break
    groups: dict[frozenset[str], list[Checkpoint]] = {}
    for c in ckpts:
        groups.setdefault(frozenset(c.tensors), []).append(c)
    for (a, ca), (b, cb) in itertools.combinations(groups.items(), 2):
        what = _disjoint(set(b), set(a), str(ca[0].path))
        if what is not None:
            _refuse_or_warn(MixedModelsError(f"is not the same model as {ca[0].path}: {what}", path=cb[0].path,
                                             hint=_HINT), allow_mixed)
            break
    union = set().union(*groups) if groups else set()
    for names, members in groups.items():
        missing = union - names
        if missing:
            log.warning("%d tensor(s) missing from %s: %s; their averages use only the inputs that hold them",
                        len(missing), _paths(members), _some(missing, 5))


def check_against(ckpt: Checkpoint, avg: Average) -> None:
    """Refuse ``ckpt`` if it is of another model than what ``avg`` has folded (its last fold's config, and
    the tensors it holds); warn about tensors ``avg`` holds that ``ckpt`` lacks. Reads no tensor."""
    if not avg.slots:
        return
    last = avg.folded[-1] if avg.folded else None
    if last is not None and last.model is not None and ckpt.model is not None and last.model != ckpt.model:
        raise MixedModelsError(
            f"is not the same model as the {avg.name} average: config.json says {ckpt.model} here and {last.model} "
            f"at step {last.step}", path=ckpt.path, hint="the checkpoint is skipped; watch one model's run per daemon",
        )
    names = {n for n, ref in ckpt.tensors.items() if avg.method_for(n, ref.dtype) is not None}
    held = set(avg.slots)
    what = _disjoint(names, held, f"the {avg.name} average")
    if what is not None:
        raise MixedModelsError(f"is not the same model as the {avg.name} average: {what}", path=ckpt.path,
                               hint="the checkpoint is skipped; watch one model's run per daemon")
    if held - names:
        log.warning("%s: %d tensor(s) of the %s average missing: %s; they keep their earlier average",
                    ckpt.path, len(held - names), avg.name, _some(held - names, 5))
