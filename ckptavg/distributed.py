"""The one-shot average across ranks: ``torchrun --nproc-per-node N -m ckptavg average ...``.

torchrun starts the same command on every rank and sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``;
:func:`launch_from_env` reads them and :func:`average_on_ranks` runs the rank's part:

1. **index** — every rank indexes the inputs itself (headers only, the single-process code path: the
   refs carry this machine's file identities, and a header is a few KiB), and validates them as the
   single-process run does; the ranks then compare a digest of what they indexed and of the plan, so a
   rank that saw other inputs (a run folder that gained a checkpoint meanwhile, a node with another
   copy) stops every rank before anything is read;
2. **split** — the output tensors, in output order, are cut into ``WORLD_SIZE`` contiguous runs balanced
   by the bytes read for them (:func:`assign_parts`): a tensor goes to the rank whose share holds the
   middle of its bytes, and a tensor larger than a quarter of a share is itself cut where the shares'
   boundaries fall inside it (flat element ranges), so every rank reads about its share even when one
   tensor is most of the model, and it reads consecutive byte ranges of every input;
3. **average** — each rank folds only its tensors and parts with the one-shot :class:`Engine` (every
   average in one read; per element exactly the single-process arithmetic, so every output tensor is
   bit-identical) and streams its whole tensors into its own shard files, named for their place in the
   whole output (``model-0000i-of-0000N.safetensors``), inside the staging folder rank 0 created; a cut
   tensor has a file of its own, laid out by rank 0 (header, full size) before any rank reads, into
   which each rank writes its part's bytes at their offset (:class:`_CutFiles`);
4. **publish** — after every rank reports success, rank 0 writes the shard index, the config/tokenizer
   files, the model card and ``ckptavg.json`` and renames the staging folder into place
   (:class:`AtomicDir`): one rename publishes the whole output.

Every phase ends with an exchange of each rank's status (:meth:`Ranks.agree`): a rank that fails makes
every rank fail with the same line naming it, and nothing is published (rank 0 removes the staging
folder). The ranks exchange only small status objects, never tensor data, so the process group is gloo
on CPU and on CUDA alike. Every rank must see the inputs and ``-o`` at the same paths (one machine, or a
shared filesystem).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from ckptavg import hooks
from ckptavg.averaging.average import Average
from ckptavg.averaging.compat import check_inputs
from ckptavg.averaging.engine import Engine, expected_outputs, output_order, validate_sequence
from ckptavg.errors import CkptavgError, OutputError, UsageError
from ckptavg.oneshot import (
    AverageSpec,
    Result,
    build_averages,
    final_members,
    order_checkpoints,
    output_targets,
)
from ckptavg.reading.checkpoint import Checkpoint
from ckptavg.reading.formats.refs import TensorRef, TensorSpec
from ckptavg.reading.formats.safetensors_writer import encode_header
from ckptavg.units import format_bytes
from ckptavg.writing.atomic import AtomicDir
from ckptavg.writing.export import DEFAULT_SHARD_BYTES, ModelWriter, finish_folder, plan_shards, write_index

log = logging.getLogger(__name__)

__all__ = ["Launch", "Part", "RankError", "Ranks", "assign_parts", "average_on_ranks", "launch_from_env", "shard_names"]

DEFAULT_TIMEOUT = timedelta(minutes=30)  # the longest a rank waits for the others at an exchange


class _Stopped(BaseException):
    """torchrun stopped this rank (SIGTERM, after another rank failed): unwind, removing the staging folder."""


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While the block runs, SIGTERM (what torchrun sends the other ranks when one fails) raises
    :class:`_Stopped` instead of ending the process at once, so the staging folder is removed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise _Stopped

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


class RankError(CkptavgError):
    """A rank of a distributed run failed: raised on every rank, with the failing rank's own line."""

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Launch:
    """Where this process stands in a torchrun launch."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def _parent_is_torchrun() -> bool | None:
    """Whether the parent process is torchrun (its command line, from /proc); None where it cannot be told."""
    try:
        text = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    return any(mark in text for mark in ("torchrun", "torch.distributed.run", "torch/distributed/run.py"))


def launch_from_env(env: Mapping[str, str] | None = None) -> Launch | None:
    """The launch torchrun describes in the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), or
    None for a plain run.

    Those variables are inherited: a ``ckptavg average`` that a torchrun-launched trainer starts as a
    subprocess has them too, and joining the trainer's process group would hang. So they count only in
    a direct child of torchrun (or with ``CKPTAVG_TORCHRUN=1``, for a launcher that sets the same
    variables); otherwise the run is plain, with one warning."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return None
    if env.get("CKPTAVG_TORCHRUN") != "1" and _parent_is_torchrun() is False:
        log.warning("WORLD_SIZE and RANK are set but this process was not started by torchrun (inherited from "
                    "a training job?): averaging in this one process; set CKPTAVG_TORCHRUN=1 to run as a rank")
        return None
    try:
        world = int(env["WORLD_SIZE"])
        rank = int(env["RANK"])
        local = int(env.get("LOCAL_RANK", rank))
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    except ValueError:
        raise UsageError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (set by torchrun)") from None
    if not 0 <= rank < world:
        raise UsageError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return Launch(rank=rank, world_size=world, local_rank=local, local_world_size=max(1, local_world))


def rank_device(spec: str, launch: Launch) -> torch.device:
    """``auto``/``cuda`` give each rank ``cuda:LOCAL_RANK`` where CUDA is present; ``cuda:N`` and ``cpu`` stay."""
    if spec in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", launch.local_rank % torch.cuda.device_count())
    if spec == "auto":
        return torch.device("cpu")
    return torch.device(spec)


def _describe(e: BaseException) -> tuple[str, int]:
    if isinstance(e, CkptavgError):
        return str(e), e.exit_code
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:300]}", 1


class Ranks:
    """The process group of one distributed run and its status exchanges (gloo: small objects only)."""

    def __init__(self, launch: Launch, *, timeout: timedelta = DEFAULT_TIMEOUT) -> None:
        import torch.distributed as dist

        self.launch = launch
        self._dist = dist
        if not dist.is_available():
            raise UsageError("this torch was built without torch.distributed; run without torchrun")
        self._own = not dist.is_initialized()
        if self._own:
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
            if attempt is None:
                dist.init_process_group(backend="gloo", timeout=timeout)
            else:  # torchrun: the rendezvous store outlives a restart; the keys of an attempt are its own
                store, _, _ = next(dist.rendezvous("env://", rank=launch.rank, world_size=launch.world_size,
                                                   timeout=timeout))
                store.set_timeout(timeout)
                dist.init_process_group(backend="gloo", store=dist.PrefixStore(f"ckptavg/attempt-{attempt}", store),
                                        rank=launch.rank, world_size=launch.world_size, timeout=timeout)

    @property
    def rank(self) -> int:
        return self.launch.rank

    def gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.launch.world_size
        self._dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        self._dist.broadcast_object_list(box, src=0)
        return box[0]

    @contextlib.contextmanager
    def agree(self, phase: str) -> Iterator[None]:
        """Run the block on every rank, then exchange how it went: if it failed on any rank, raise
        :class:`RankError` on every rank, naming the first failing rank and its error."""
        failure: tuple[str, int] | None = None
        error: Exception | None = None
        try:
            yield
        except Exception as e:
            error = e
            failure = _describe(e)
            log.debug("rank %d failed while %s", self.rank, phase, exc_info=True)
        statuses = self.gather(failure)
        for r, status in enumerate(statuses):
            if status is not None:
                text, code = status
                raise RankError(f"rank {r} of {self.launch.world_size} failed while {phase}: {text}; "
                                "nothing was written", exit_code=code) from error

    def close(self) -> None:
        if self._own and self._dist.is_initialized():
            self._dist.destroy_process_group()


@dataclass(frozen=True)
class Part:
    """A rank's part of one output tensor: its flat elements ``[lo, hi)``."""

    rank: int
    lo: int
    hi: int


def assign_parts(tensors: Sequence[tuple[str, int, int, bool]], world_size: int) -> dict[str, list[Part]]:
    """Tensors ``(name, bytes read, numel, cuttable)``, in output order, to ranks: ``world_size`` contiguous runs
    balanced by bytes, the whole tensor to the rank whose equal share of the total holds the middle of its bytes
    (a rank's load is at most its share plus half of each of its two boundary tensors), except that a cuttable
    tensor (byte ranges, one shape and dtype in every input) larger than a quarter of a share is cut where the
    shares' boundaries fall inside it, each part going to the rank whose share holds its middle. A part smaller than an
    eighth of a share stays with its neighbour. So a rank reads its share give or take that, even when one
    tensor (an embedding) is most of the model. Integer arithmetic only: every rank computes the same parts."""
    total = sum(t[1] for t in tensors)
    out: dict[str, list[Part]] = {}
    before = 0
    w = world_size
    for i, (name, nbytes, numel, cuttable) in enumerate(tensors):
        if total == 0:
            out[name] = [Part(min(w - 1, i * w // max(1, len(tensors))), 0, numel)]
            continue
        cuts = [0]
        if cuttable and w > 1 and numel > 1 and 4 * nbytes * w > total:
            for r in range(1, w):
                edge = total * r - before * w  # share boundary r, from this tensor's start, in bytes x w
                if 0 < edge < nbytes * w:
                    e = edge * numel // (nbytes * w)
                    if 8 * (e - cuts[-1]) * nbytes * w >= total * numel:  # the part before is >= share / 8
                        cuts.append(e)
            while len(cuts) > 1 and 8 * (numel - cuts[-1]) * nbytes * w < total * numel:
                cuts.pop()  # the last part would be tiny: it stays with the part before
        cuts.append(numel)
        out[name] = [Part(min(w - 1, (2 * before * numel + (lo + hi) * nbytes) * w // (2 * total * numel)), lo, hi)
                     for lo, hi in itertools.pairwise(cuts)]
        before += nbytes
    return out


def shard_names(per_rank: Sequence[int], weights_name: str = "model") -> list[list[str]]:
    """File names of each rank's shards, numbered in rank order across the whole output (a single file
    overall is ``model.safetensors``, as in a single-process run)."""
    n = sum(per_rank)
    names: list[list[str]] = []
    first = 0
    for count in per_rank:
        names.append([f"{weights_name}.safetensors" if n == 1 else f"{weights_name}-{first + i + 1:05d}-of-{n:05d}.safetensors"
                      for i in range(count)])
        first += count
    return names


@dataclass
class _Layout:
    """One average's output across ranks: every rank's whole tensors and their file names, the file of each
    tensor cut across ranks (its own file, which each part's rank writes into), and the whole weight map."""

    refs: list[list[TensorRef]]  # per rank: its whole tensors
    files: list[list[str]]  # per rank: the files of its whole tensors
    cut: dict[str, tuple[str, TensorRef]]  # a tensor cut across ranks: its file and its output ref
    weight_map: dict[str, str]  # in output order
    total_bytes: int

    def all_files(self) -> list[str]:
        return [*(f for files in self.files for f in files), *(f for f, _ in self.cut.values())]


def _layout(plan: Sequence[TensorRef | TensorSpec], parts: Mapping[str, Sequence[Part] | int], world: int,
            max_shard_bytes: int, weights_name: str) -> _Layout:
    """The files of one average across ranks; ``parts``: each tensor's parts, or the one rank holding it whole."""
    parts = {n: [Part(p, 0, 0)] if isinstance(p, int) else p for n, p in parts.items()}
    refs: list[list[TensorRef]] = [[] for _ in range(world)]
    cut_after: list[list[TensorRef]] = [[] for _ in range(world)]  # numbered after the files of their first rank
    for ref in plan:
        p = parts[ref.name]
        (refs if len(p) == 1 else cut_after)[p[0].rank].append(ref)
    shards = [plan_shards(r, max_shard_bytes) for r in refs]
    counts = [len(shards[r]) + len(cut_after[r]) for r in range(world)]
    names = shard_names(counts, weights_name)
    files = [names[r][:len(shards[r])] for r in range(world)]
    cut = {ref.name: (names[r][len(shards[r]) + i], ref) for r in range(world) for i, ref in enumerate(cut_after[r])}
    weight_map: dict[str, str] = {name: f for name, (f, _) in cut.items()}
    for r in range(world):
        for i, shard in enumerate(shards[r]):
            for spec in shard:
                weight_map[spec.name] = files[r][i]
    ordered = {ref.name: weight_map[ref.name] for ref in plan}
    return _Layout(refs, files, cut, ordered, sum(ref.nbytes for ref in plan))


class _CutFiles:
    """The files of tensors cut across ranks, for one average: rank 0 creates each (its header, and the file at
    its full size) before any rank folds; each rank then writes its part's bytes at their place (``pwrite``:
    the parts are disjoint byte ranges of one file) and fsyncs before it reports success."""

    def __init__(self, folder: Path, layout: _Layout, metadata: dict[str, str]) -> None:
        self.folder = folder
        self.layout = layout
        self.metadata = metadata
        self._fds: dict[str, int] = {}
        self._next: dict[str, int] = {}  # tensor -> the file offset its next bytes go to

    def create(self) -> None:
        for (file, ref) in self.layout.cut.values():
            head, _ = encode_header([TensorSpec(ref.name, ref.dtype, tuple(ref.shape))], self.metadata)
            with open(self.folder / file, "wb") as f:
                f.write(head)
                f.truncate(len(head) + ref.nbytes)

    def start(self, name: str, lo: int) -> None:
        """This rank's part of ``name`` starts at element ``lo``."""
        file, ref = self.layout.cut[name]
        path = self.folder / file
        try:
            fd = os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise OutputError("the file rank 0 created for a tensor cut across ranks is not visible here", path=path,
                              hint="every rank must see -o at the same path (a shared filesystem)") from None
        with open(path, "rb") as f:
            head = 8 + int.from_bytes(f.read(8), "little")
        self._fds[name] = fd
        self._next[name] = head + lo * ref.dtype.itemsize

    def write(self, name: str, t: torch.Tensor) -> None:
        fd, at = self._fds[name], self._next[name]
        _, ref = self.layout.cut[name]
        if t.dtype != ref.dtype:
            raise OutputError(f"internal: {name} came out as {t.dtype}, its file holds {ref.dtype}",
                              path=self.folder / self.layout.cut[name][0])
        view = memoryview(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], at + done)
        self._next[name] = at + done

    def finish(self) -> None:
        for fd in self._fds.values():
            os.fsync(fd)
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


def _shard_metadata(aliases: Mapping[str, str], layout: _Layout) -> dict[str, str]:
    """The header metadata of the file of a cut tensor, as :class:`ModelWriter` writes a shard's (the tied names
    whose tensor the average holds ride in the header)."""
    metadata = {"format": "pt"}
    tied = {a: t for a, t in aliases.items() if t in layout.weight_map}
    if tied:
        metadata["ckptavg.tied"] = json.dumps(tied, sort_keys=True)
    return metadata


class _Assembled:
    """What :func:`finish_folder` needs from a writer, for the whole output of all ranks (rank 0)."""

    def __init__(self, folder: Path, layout: _Layout, weights_name: str, aliases: dict[str, str]) -> None:
        self.folder = folder
        self.layout = layout
        self.weights_name = weights_name
        self.weight_map = layout.weight_map
        self.total_bytes = layout.total_bytes
        self.aliases = {a: t for a, t in aliases.items() if t in layout.weight_map}

    def finish(self) -> None:
        missing = [f for f in self.layout.all_files() if not (self.folder / f).is_file()]
        if missing:
            raise OutputError(f"the shard {missing[0]} of another rank is missing from the staging folder",
                              path=self.folder, hint="every rank must see -o at the same path (a shared filesystem)")
        if len(self.layout.all_files()) > 1:
            write_index(self.folder, self.weights_name, self.weight_map, self.total_bytes)


def _view(c: Checkpoint, names: set[str], cut: Mapping[str, Part] | None = None) -> Checkpoint:
    """``c`` with only the tensors ``names`` and this rank's ``cut`` parts (flat element ranges): what this rank
    reads of it."""
    cut = cut or {}
    return replace(c, tensors={n: (r.narrow(cut[n].lo, cut[n].hi) if n in cut else r)
                               for n, r in c.tensors.items() if n in names or n in cut})


def _cuttable(refs: Sequence[TensorRef]) -> bool:
    """A tensor can be cut across ranks where each rank can read its elements alone: byte ranges, one shape and
    one dtype in every input (as the engine's pieces)."""
    first = refs[0]
    return all(r.offset is not None and r.shape == first.shape and r.dtype == first.dtype for r in refs)


def _digest(ckpts: Sequence[Checkpoint], owner: Mapping[str, list[Part]], layouts: Mapping[str, _Layout],
            targets: Mapping[str, Path], weights: Sequence[float] | None) -> str:
    doc = {
        "inputs": [[str(c.path), c.step, c.fingerprint] for c in ckpts],
        "owner": sorted((n, [[p.rank, p.lo, p.hi] for p in ps]) for n, ps in owner.items()),
        "files": {k: v.weight_map for k, v in sorted(layouts.items())},
        "targets": {k: str(v.resolve()) for k, v in sorted(targets.items())},
        "weights": None if weights is None else list(weights),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def default_threads(launch: Launch) -> int:
    """CPU threads per rank: this machine's cores shared among its ranks, one left for reading and writing."""
    return max(1, (os.cpu_count() or 1) // launch.local_world_size - 1)


def average_on_ranks(
    launch: Launch,
    index: Callable[[], tuple[list[Checkpoint], list[Path]]],
    specs: Sequence[AverageSpec],
    out: Path,
    *,
    weights: Sequence[float] | None = None,
    device: str = "auto",
    threads: int | None = None,
    check_finite: bool = True,
    build: Callable[[torch.device], list[Average]] | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    force: bool = False,
    subfolders: bool | None = None,
    allow_mixed_models: bool = False,
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> Result:
    """This rank's part of a one-shot average (see the module docstring); every rank calls it with the
    same arguments. ``index()`` returns the inputs and the run folders never written to (the CLI's
    :func:`resolve_inputs`); ``build(device)`` the averages (default: ``build_averages(specs)``)."""
    with _sigterm_unwinds():
        try:
            return _average_on_ranks(launch, index, specs, out, weights=weights, device=device, threads=threads,
                                     check_finite=check_finite, build=build, max_shard_bytes=max_shard_bytes,
                                     force=force, subfolders=subfolders, allow_mixed_models=allow_mixed_models,
                                     timeout=timeout)
        except _Stopped:
            raise RankError(f"rank {launch.rank} of {launch.world_size} was stopped by torchrun (another rank "
                            "ended); nothing was written") from None


def _average_on_ranks(
    launch: Launch,
    index: Callable[[], tuple[list[Checkpoint], list[Path]]],
    specs: Sequence[AverageSpec],
    out: Path,
    *,
    weights: Sequence[float] | None,
    device: str,
    threads: int | None,
    check_finite: bool,
    build: Callable[[torch.device], list[Average]] | None,
    max_shard_bytes: int,
    force: bool,
    subfolders: bool | None,
    allow_mixed_models: bool,
    timeout: timedelta,
) -> Result:
    started = time.perf_counter()
    ranks = Ranks(launch, timeout=timeout)
    engine: Engine | None = None
    folders: dict[str, Path] = {}
    stack = contextlib.ExitStack()  # rank 0: the staging folders, removed unless published
    try:
        with ranks.agree("indexing the inputs"):
            ckpts, protected = index()
            if not ckpts:
                raise UsageError("no checkpoints to average")
            dev = rank_device(device, launch)
            engine = Engine(device=dev, check_finite=check_finite,
                            threads=threads if threads is not None else default_threads(launch))
            averages = build(engine.device) if build is not None else build_averages(specs, device=engine.device)
            if not averages:
                raise UsageError("no averaging method requested")
            ckpts, weights = order_checkpoints(ckpts, weights)
            check_inputs(ckpts, allow_mixed=allow_mixed_models)
            # each rank reads only its tensors: byte ranges (safetensors) or a per-tensor source (DCP, DeepSpeed)
            if not all(c.source is not None or all(r.offset is not None for r in c.tensors.values()) for c in ckpts):
                raise UsageError("under torchrun, inputs must be safetensors, DCP or DeepSpeed checkpoints (each tensor "
                                 "is read on its own); pickles (.pt/.bin/.ckpt) are read whole",
                                 hint="run without torchrun, or convert the checkpoints to safetensors")
            validate_sequence(ckpts, averages)
            out = Path(out)
            targets = output_targets(ckpts, averages, out, subfolders, protected)
            plans = {a.name: expected_outputs(ckpts, a) for a in averages}
            for a in averages:
                if not plans[a.name]:
                    raise UsageError(f"the {a.name} average would hold no tensor (it accepts no input, or --rule "
                                     "excludes every tensor)")
                warning = a.method.inputs_warning(len(ckpts))
                if warning is not None and launch.rank == 0:
                    log.warning("%s: %s", a.name, warning)
                a.final_members = final_members(ckpts, a)
            aliases: dict[str, str] = {}
            for c in ckpts:
                aliases.update(c.aliases)
            held = {name: [c.tensors[name] for c in ckpts if name in c.tensors] for name in output_order(ckpts)}
            sizes = [(name, sum(r.nbytes for r in refs)) for name, refs in held.items()]
            owner = assign_parts([(name, nbytes, held[name][0].numel, _cuttable(held[name])) for name, nbytes in sizes],
                                 launch.world_size)
            weights_name = ckpts[-1].weights_name
            layouts = {a.name: _layout(plans[a.name], owner, launch.world_size, max_shard_bytes, weights_name)
                       for a in averages}
            digest = _digest(ckpts, owner, layouts, targets, weights)
        digests = ranks.gather(digest)
        if len(set(digests)) > 1:
            other = next(r for r, d in enumerate(digests) if d != digests[0])
            raise RankError(f"rank {other} indexed other inputs than rank 0 (a checkpoint appeared or changed while "
                            "the ranks were indexing, or the nodes see different files); nothing was written")
        mine = {name for name, ps in owner.items() if len(ps) == 1 and ps[0].rank == launch.rank}
        my_cut = {name: p for name, ps in owner.items() if len(ps) > 1 for p in ps if p.rank == launch.rank}
        per_elem = {name: b / max(1, held[name][0].numel) for name, b in sizes}

        def load(r: int) -> tuple[int, int, float]:
            whole = [n for n, ps in owner.items() if len(ps) == 1 and ps[0].rank == r]
            parts = [(n, p) for n, ps in owner.items() if len(ps) > 1 for p in ps if p.rank == r]
            return len(whole), len(parts), sum(b for n, b in sizes if n in set(whole)) + \
                sum((p.hi - p.lo) * per_elem[n] for n, p in parts)

        my_bytes = int(load(launch.rank)[2])
        if launch.rank == 0:
            for r in range(launch.world_size):
                whole, parts, nbytes = load(r)
                log.info("rank %d of %d: %d of %d tensors%s, %s of %s to read", r, launch.world_size, whole,
                         len(owner), f" and a part of {parts} cut across ranks" if parts else "",
                         format_bytes(int(nbytes)), format_bytes(sum(b for _, b in sizes)))

        with ranks.agree("creating the output folder"):
            if launch.rank == 0:
                for name, t in targets.items():
                    folders[name] = stack.enter_context(AtomicDir(t, replace=force))
                    _CutFiles(folders[name], layouts[name], _shard_metadata(aliases, layouts[name])).create()
        folders = ranks.broadcast({k: str(v) for k, v in folders.items()})
        folders = {k: Path(v) for k, v in folders.items()}

        with ranks.agree("averaging its tensors"):
            for name, folder in folders.items():
                if not folder.is_dir():
                    raise OutputError("the staging folder rank 0 created is not visible here", path=folder,
                                      hint="every rank must see -o at the same path (a shared filesystem)")
            writers: dict[str, ModelWriter] = {}
            cut_files: dict[str, _CutFiles] = {}
            for a in averages:
                layout = layouts[a.name]
                if layout.refs[launch.rank]:
                    writers[a.name] = ModelWriter(folders[a.name], layout.refs[launch.rank],
                                                  max_shard_bytes=max_shard_bytes, weights_name=weights_name,
                                                  aliases=aliases, files=layout.files[launch.rank])
                cut_files[a.name] = _CutFiles(folders[a.name], layout, _shard_metadata(aliases, layout))
                for name in layout.cut:
                    if name in my_cut:
                        cut_files[a.name].start(name, my_cut[name].lo)

            def emit(avg: Average, name: str, t: torch.Tensor) -> None:
                hooks.point("rank.write", rank=launch.rank, world_size=launch.world_size, tensor=name)
                if name in my_cut:
                    cut_files[avg.name].write(name, t)
                else:
                    writers[avg.name].write(name, t)

            views = [_view(c, mine, my_cut) for c in ckpts]
            engine.progress.start(my_bytes, len(ckpts))
            try:
                engine.average(views, averages, emit, weights=weights)
                for w in writers.values():
                    w.finish(index=False)  # rank 0 writes the index of every rank's shards
                for f in cut_files.values():
                    f.finish()
            except BaseException:
                for w in writers.values():
                    w.abort()
                for f in cut_files.values():
                    f.close()
                raise
            finally:
                engine.progress.finish()

        with ranks.agree("publishing the output"):
            if launch.rank == 0:
                for a in averages:
                    assembled = _Assembled(folders[a.name], layouts[a.name], weights_name, aliases)
                    finish_folder(folders[a.name], a, assembled, newest=ckpts[-1],  # type: ignore[arg-type]
                                  formats=[c.format for c in ckpts],
                                  extra={"schedule": "tensor-major", "ranks": launch.world_size})
                stack.close()  # fsync every rank's files, rename each staging folder into place
    except BaseException:
        stack.__exit__(RuntimeError, RuntimeError("not published"), None)  # rank 0: remove the staging folders
        raise
    finally:
        if engine is not None:
            engine.close()
        ranks.close()
    seconds = time.perf_counter() - started
    if launch.rank == 0:
        total = sum(b for _, b in sizes)
        log.info("averaged %d checkpoints (%s) on %d ranks into %s in %.2f s (%.2f GB/s)", len(ckpts),
                 format_bytes(total), launch.world_size, ", ".join(str(t) for t in targets.values()), seconds,
                 total / seconds / 1e9 if seconds else 0.0)
    return Result(outputs=targets, bytes_read=my_bytes, seconds=seconds, schedule="tensor-major")
