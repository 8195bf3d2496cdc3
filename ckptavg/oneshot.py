"""One-shot averaging of saved checkpoints into model folders (the engine of ``ckptavg average``).

Safetensors inputs are folded tensor-major (one tensor's accumulators at a
time); pickles checkpoint-major into long-lived accumulators, which go to a
disk store when they exceed ``memory_budget`` (see :mod:`ckptavg.averaging.store`).
A method that drops inputs (LAWA's window) is told which inputs end in each tensor's final
state, so a NaN/Inf in an input that leaves it cannot poison the result.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import secrets
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ckptavg.averaging.average import Average
from ckptavg.averaging.compat import check_inputs
from ckptavg.averaging.engine import Engine, expected_outputs
from ckptavg.averaging.methods import make_method
from ckptavg.averaging.placement import Placement, ensure_placed
from ckptavg.averaging.rules import Rule
from ckptavg.errors import StepError, UsageError
from ckptavg.progress import Progress
from ckptavg.reading.checkpoint import Checkpoint
from ckptavg.reading.formats.refs import TensorRef
from ckptavg.units import format_bytes
from ckptavg.writing.atomic import AtomicDir
from ckptavg.writing.dcp import DcpWriter
from ckptavg.writing.export import DEFAULT_SHARD_BYTES, ModelWriter, finish_folder

log = logging.getLogger(__name__)

__all__ = ["AverageSpec", "Result", "average_checkpoints", "build_averages", "final_members", "order_checkpoints"]


@dataclass(frozen=True)
class AverageSpec:
    """One requested average: a registry method name, its options, and an optional name."""

    method: str
    options: dict[str, Any] = field(default_factory=dict)
    name: str | None = None


@dataclass
class Result:
    outputs: dict[str, Path]
    bytes_read: int
    seconds: float
    schedule: str
    placement: dict[str, str] = field(default_factory=dict)  # per average: "cpu", "cuda[:N]", "pinned" or "disk"


def build_averages(
    specs: Sequence[AverageSpec],
    *,
    rules: Sequence[Rule] = (),
    accum_dtype: torch.dtype = torch.float32,
    on_shape_change: str = "error",
    device: torch.device | str = "cpu",
    memory_budget: int | None = None,
    store_dir: Path | None = None,
) -> list[Average]:
    """Averages from ``specs``. With ``memory_budget`` (bytes of host memory for accumulators) or on a
    CUDA device they share a :class:`~ckptavg.averaging.store.Placement`: averages beyond the budget keep their
    accumulators in a disk store under ``store_dir``, those beyond the free GPU memory in pinned CPU
    memory (decided at the first checkpoint-major fold, see :func:`~ckptavg.averaging.store.ensure_placed`)."""
    device = torch.device(device)
    placement = None
    if memory_budget is not None or device.type == "cuda":
        placement = Placement(memory_budget=memory_budget, store_dir=None if store_dir is None else Path(store_dir))
    averages = []
    for spec in specs:
        method = make_method(spec.method, **spec.options)
        averages.append(Average(spec.name or method.label(), method, rules=tuple(rules), accum_dtype=accum_dtype,
                                on_shape_change=on_shape_change, device=device, placement=placement))
    names = [a.name for a in averages]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise UsageError(f"two averages are both named {min(dup)!r}; give them different options")
    return averages


def order_checkpoints(
    ckpts: Sequence[Checkpoint], weights: Sequence[float] | None = None
) -> tuple[list[Checkpoint], list[float] | None]:
    """Drop duplicates (one file reached by two paths) and sort by step when every step is known."""
    if weights is not None and len(weights) != len(ckpts):
        raise UsageError(f"--weights has {len(weights)} values for {len(ckpts)} checkpoints")
    seen: dict[tuple[int, int], Checkpoint] = {}
    kept: list[tuple[Checkpoint, float | None]] = []
    for i, c in enumerate(ckpts):
        first = next(iter(c.tensors.values())).identity
        key = (first.dev, first.ino)
        if key in seen:
            if weights is not None:
                raise UsageError(f"{c.path} and {seen[key].path} are the same checkpoint; with --weights each input must be distinct")
            log.warning("%s is the same checkpoint as %s; taken once", c.path, seen[key].path)
            continue
        seen[key] = c
        kept.append((c, None if weights is None else weights[i]))
    if all(c.step is not None for c, _ in kept):
        kept.sort(key=lambda t: t[0].step)  # type: ignore[arg-type,return-value]
        for (a, _), (b, _) in itertools.pairwise(kept):
            if a.step == b.step:
                raise StepError(f"has the same step ({b.step}) as {a.path}", path=b.path,
                                hint="pass --steps to set the steps explicitly")
    ordered = [c for c, _ in kept]
    return ordered, (None if weights is None else [w for _, w in kept])  # type: ignore[misc]


def final_members(ckpts: Sequence[Checkpoint], avg: Average) -> dict[str, tuple[frozenset, int]] | None:
    """Per tensor, the positions (the idents one-shot folds with) of the inputs that end in the average's
    final state, for a method that says (:meth:`Method.final_members`; LAWA: the tensor's last window), and
    how many inputs fold into it. The other inputs are folded with NaN/Inf as 0. None: the method keeps
    every input."""
    occurrences: dict[str, list[int]] = {}
    for i, c in enumerate(ckpts):
        if avg.method.accepts(c.step):
            for name in c.tensors:
                occurrences.setdefault(name, []).append(i)
    shared: dict[tuple[frozenset, int], tuple[frozenset, int]] = {}
    out: dict[str, tuple[frozenset, int]] = {}
    for name, idents in occurrences.items():
        members = avg.method.final_members(idents)
        if members is None:
            return None
        key = (members, len(idents))
        out[name] = shared.setdefault(key, key)
    return out


def _union_refs(ckpts: Sequence[Checkpoint]) -> list[TensorRef]:
    """Every tensor of ``ckpts``, as its newest ref: what long-lived accumulators will hold."""
    refs: dict[str, TensorRef] = {}
    for c in ckpts:
        refs.update(c.tensors)
    return list(refs.values())



def output_targets(ckpts: Sequence[Checkpoint], averages: Sequence[Average], out: Path, subfolders: bool | None,
                   protected: Sequence[Path]) -> dict[str, Path]:
    """Each average's output folder (``out/<name>`` when there are several, or ``subfolders``), each refused
    when it would land on or inside an input or a protected path."""
    if subfolders is None:
        subfolders = len(averages) > 1
    targets = {a.name: (out / a.name if subfolders else out) for a in averages}
    protect = [*protected, *_input_paths(ckpts)]
    for target in targets.values():
        _protect(target, protect)
    return targets

def _protect(out: Path, protected: Sequence[Path]) -> None:
    """Refuse an output inside an input (it would write into the trainer's folder) or holding one
    (``--force`` would replace it, deleting the checkpoints)."""
    real = out.resolve()
    for p in protected:
        rp = Path(p).resolve()
        if real == rp or rp in real.parents:
            raise UsageError(f"-o {out} is inside {p}; ckptavg never writes into a trainer's checkpoint folder",
                             hint="choose an output outside the run and checkpoint folders")
        if real in rp.parents:
            raise UsageError(f"-o {out} contains the input {p}; writing there would replace the checkpoints",
                             hint="choose an output outside the run and checkpoint folders")


def _input_paths(ckpts: Sequence[Checkpoint]) -> list[Path]:
    """Every input file, and every folder that is a checkpoint (given as a folder, or through a file in it)."""
    paths: list[Path] = []
    for c in ckpts:
        if not isinstance(c.path, Path):  # in object storage (ckptavg.reading.remote): no local folder to protect
            continue
        paths += [c.path, *c.files]
        if c.path.is_dir():
            continue
        if c.meta_dir is not None or c.format.endswith("-sharded"):
            paths.append(c.path.parent)  # an index or model file inside a checkpoint folder
    return paths


def _remove_stale_scratch(out: Path) -> None:
    """Disk stores that a killed run left beside ``out`` (their process is gone) are removed."""
    for old in out.parent.glob(f".{out.name}.ckptavg-scratch-*"):
        pid_text = old.name.rsplit("-scratch-", 1)[1].split("-")[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        try:
            os.kill(int(pid_text), 0)
            continue  # that run is still going
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # another user's live process
        log.warning("removing %s, the disk store of an interrupted run", old)
        shutil.rmtree(old, ignore_errors=True)


def average_checkpoints(
    ckpts: Sequence[Checkpoint],
    averages: Sequence[Average],
    out: Path,
    *,
    weights: Sequence[float] | None = None,
    engine: Engine | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    force: bool = False,
    protected: Sequence[Path] = (),
    subfolders: bool | None = None,
    progress: Progress | None = None,
    memory_budget: int | None = None,
    scratch_dir: Path | None = None,
    allow_mixed_models: bool = False,
    output_format: str = "safetensors",
) -> Result:
    """Average ``ckpts`` into one model folder per average and return where they are.

    With one average the folder is ``out``; with several (or ``subfolders=True``)
    it is ``out/<name>``. Nothing is written unless every average succeeds.
    ``memory_budget`` bounds the host memory of long-lived (checkpoint-major)
    accumulators: averages beyond it fold through a disk store in
    ``scratch_dir`` (default: a hidden folder beside ``out``, removed at the end).
    Inputs of different models are refused unless ``allow_mixed_models`` (:func:`check_inputs`).
    ``output_format`` ``"dcp"`` writes each average as a torch.distributed.checkpoint folder instead of
    safetensors (:class:`~ckptavg.writing.dcp.DcpWriter`).
    """
    if output_format not in ("safetensors", "dcp"):
        raise UsageError(f"output format {output_format!r}: expected safetensors or dcp")
    if not ckpts:
        raise UsageError("no checkpoints to average")
    if not averages:
        raise UsageError("no averaging method requested")
    ckpts, weights = order_checkpoints(ckpts, weights)
    check_inputs(ckpts, allow_mixed=allow_mixed_models)
    targets = output_targets(ckpts, averages, Path(out), subfolders, protected)
    plans = {a.name: expected_outputs(ckpts, a) for a in averages}
    for a in averages:
        warning = a.method.inputs_warning(len(ckpts))
        if warning is not None:
            log.warning("%s: %s", a.name, warning)
    for a in averages:
        if not plans[a.name]:
            if not any(a.method.accepts(c.step) for c in ckpts):
                raise UsageError(f"the {a.name} average accepts none of the inputs (newest step: {ckpts[-1].step})",
                                 hint="lower --start-step")
            raise UsageError(f"the {a.name} average would hold no tensor: every tensor is excluded by --rule")
    aliases: dict[str, str] = {}
    for c in ckpts:
        aliases.update(c.aliases)
    owns_engine = engine is None
    engine = engine or Engine(device="cpu", progress=progress)
    if progress is not None:
        engine.progress = progress
    # DCP tensors are read one at a time (no whole-file load as for pickles): tensor-major too
    schedule = ("tensor-major" if all(c.format.startswith("safetensors") or c.format == "dcp" for c in ckpts)
                else "checkpoint-major")
    for a in averages:
        a.final_members = final_members(ckpts, a)
    own_scratch = scratch_dir is None
    scratch = (Path(scratch_dir) if scratch_dir is not None
               else out.parent / f".{out.name}.ckptavg-scratch-{os.getpid()}-{secrets.token_hex(4)}")
    if own_scratch:
        _remove_stale_scratch(out)
    total = sum(c.nbytes for c in ckpts)
    started = time.perf_counter()
    engine.progress.start(total, len(ckpts))
    try:
        if schedule == "checkpoint-major":  # long-lived accumulators: decide where they live
            if memory_budget is not None:
                shared = Placement(memory_budget=memory_budget)
                for a in averages:
                    if a.placement is None and not a.slots:
                        a.placement = shared
            for placement in {id(a.placement): a.placement for a in averages if a.placement is not None}.values():
                placement.store_dir = placement.store_dir or scratch
                if memory_budget is not None:
                    placement.memory_budget = memory_budget
            ensure_placed(averages, _union_refs(ckpts), engine=engine)
        with contextlib.ExitStack() as stack:
            folders = {name: stack.enter_context(AtomicDir(t, replace=force)) for name, t in targets.items()}
            writers = {
                a.name: (DcpWriter if output_format == "dcp" else ModelWriter)(
                    folders[a.name], plans[a.name], max_shard_bytes=max_shard_bytes,
                    weights_name=ckpts[-1].weights_name, aliases=aliases)
                for a in averages
            }
            try:
                if schedule == "tensor-major":
                    engine.average(ckpts, averages, lambda avg, name, t: writers[avg.name].write(name, t), weights=weights)
                else:
                    history = dict(enumerate(ckpts))
                    for i, c in enumerate(ckpts):
                        engine.fold(c, averages, ident=i, weight=1.0 if weights is None else float(weights[i]),
                                    history=history, check_inputs=False,  # outputs are checked instead
                                    check_model=False)  # judged above, all inputs at once
                    for a in averages:
                        for ref in plans[a.name]:
                            engine.finish_tensor(ref.name, ckpts, [a], lambda avg, name, t: writers[avg.name].write(name, t))
            except BaseException:
                for w in writers.values():
                    w.abort()
                raise
            for a in averages:
                finish_folder(folders[a.name], a, writers[a.name], newest=ckpts[-1],
                              formats=[c.format for c in ckpts], extra={"schedule": schedule})
    finally:
        engine.progress.finish()
        if owns_engine:
            engine.close()
        placed = {a.name: a.placement.where.get(a.name, "") for a in averages if a.placement is not None}
        for a in averages:
            if a.store is not None:
                a.slots.clear()
                a.store.close()
        if own_scratch and scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    seconds = time.perf_counter() - started
    log.info("averaged %d checkpoints (%s) into %s in %.2f s", len(ckpts), format_bytes(total),
             ", ".join(str(t) for t in targets.values()), seconds)
    return Result(outputs=targets, bytes_read=total, seconds=seconds, schedule=schedule,
                  placement={k: v for k, v in placed.items() if v})
