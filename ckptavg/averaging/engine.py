"""The streaming fold: read each tensor once, fold it into every average.

Two schedules share one per-tensor fold (:meth:`Engine._fold_tensor`), so they
produce bit-identical averages:

* **checkpoint-major** (:meth:`Engine.fold`): one checkpoint into long-lived
  accumulators — the daemon's mode, and the one-shot mode for pickles (which
  can only be read a whole file at a time). Memory: the accumulators plus the
  staging window.
* **tensor-major** (:meth:`Engine.average`): for each tensor, its value in every
  input checkpoint, then the finished average goes to the writer and its
  accumulators are freed — the one-shot mode for safetensors. A large tensor
  whose shape and dtype agree in every input is cut into *pieces* of
  ``piece_elems`` elements, each read (``pread`` of its byte range), folded,
  finished and written on its own: every method is elementwise, so a piece is
  averaged exactly as the whole tensor would be, while memory stays at one
  piece's accumulators plus the staging window (even for a 2 GB embedding),
  and the accumulators of a piece stay in the CPU caches across the inputs.

A reader thread stays ahead of the arithmetic by at most ``staging_bytes``
(pieces: ``PIECE_STAGING_BYTES``, read into reused buffers — fresh memory costs
a page fault per 4 KiB, which makes ``pread`` from the page cache 2-3x slower).
The one-shot arithmetic runs on ``threads`` CPU threads (default: all cores
but one, which the reader, the writer thread and the kernel's writeback need:
OpenMP threads that must share a core with them, or with another process,
wait on each other and run many times slower).
On CUDA, tensors are read into pinned chunks and copied to the device with
non-blocking copies on a side stream, overlapped with the next read and with
the fold kernels on the main stream. Casting to the accumulator dtype goes
through small reused scratch chunks (``chunk_elems``), never a whole-tensor
copy.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ckptavg.averaging.average import Average, FoldRecord
from ckptavg.averaging.compat import check_against
from ckptavg.averaging.methods import FoldInfo, Latest, Method, Plan, Slot
from ckptavg.errors import CkptavgError, NonFiniteError, StepError, TensorMismatchError, UsageError
from ckptavg.progress import Progress
from ckptavg.reading.checkpoint import Checkpoint, CheckpointReader
from ckptavg.reading.fileio import FileCache, ObjectIdentity
from ckptavg.reading.formats.refs import TensorRef

log = logging.getLogger(__name__)

__all__ = ["Engine", "resolve_device"]

DEFAULT_CHUNK_ELEMS = 1 << 20  # 4 MiB of fp32 scratch: stays in cache
DEFAULT_PIECE_ELEMS = 1 << 20  # tensor-major unit: 4 MiB of fp32 accumulator, stays in the CPU caches
DEFAULT_STAGING_BYTES = 256 << 20
# read-ahead of the tensor-major schedule when it reads pieces: a few pieces of every input, enough to keep
# the reader ahead; more would only add to the resident set
PIECE_STAGING_BYTES = 64 << 20
_PIN_CHUNK_BYTES = 16 << 20
DEFAULT_REMOTE_READS = 8  # object storage: reads in flight (each a round trip), as the benchmark's baseline


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``."""
    if spec is None or str(spec) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available on this machine", hint="use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise UsageError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")
    return device


@dataclass
class _Job:
    average: Average
    method: Method
    slot: Slot
    plan: Plan


@dataclass
class _Request:
    ckpt_index: int
    name: str
    nbytes: int
    piece: tuple[int, int] | None = None  # element range [lo, hi) of a tensor read in pieces


def _piece_ref(ref: TensorRef, piece: tuple[int, int] | None) -> TensorRef:
    """``ref`` narrowed to the flat element range ``piece`` (a 1-D tensor at its byte range)."""
    return ref if piece is None else ref.narrow(*piece)


def _pieces(refs: Sequence[TensorRef], piece_elems: int) -> list[tuple[int, int] | None]:
    """How a tensor is read tensor-major: ``[None]`` (whole) or element ranges of ``piece_elems``.

    Only a safetensors tensor (byte ranges) larger than one piece whose shape and
    dtype agree in every input is cut: a tensor that changes shape or dtype
    (policy ``reset``) keeps the whole-tensor path and its logged restart.
    """
    first = refs[0]
    n = first.numel
    if n <= piece_elems or any(r.offset is None or r.shape != first.shape or r.dtype != first.dtype for r in refs):
        return [None]
    return [(lo, min(lo + piece_elems, n)) for lo in range(0, n, piece_elems)]


class _BufferPool:
    """Reused read buffers for pieces: reading into fresh memory costs a page fault per 4 KiB,
    which makes ``pread`` from the page cache 2-3x slower. :meth:`get` never blocks (an empty
    pool allocates), so the prefetcher's byte window alone decides how far it reads ahead;
    :meth:`put` keeps at most ``keep`` buffers."""

    def __init__(self, capacity: int, keep: int) -> None:
        self.capacity = capacity
        self.keep = keep
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def get(self) -> torch.Tensor:
        with self._lock:
            if self._free:
                return self._free.pop()
        return torch.empty(self.capacity, dtype=torch.uint8)

    def put(self, buf: torch.Tensor) -> None:
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append(buf)


_malloc_tuned = False


def _keep_freed_memory() -> None:
    """Let glibc reuse freed piece-sized blocks instead of returning them to the kernel.

    Every piece allocates and frees accumulators, values and staging buffers of a
    few MiB; by default glibc maps blocks that large fresh (and unmaps them on
    free), so every piece pays page faults and kernel zeroing — 3x the arithmetic.
    Raising the mmap and trim thresholds keeps them in the heap; the heap's size is
    bounded by the staging window and one piece's accumulators. Process-wide and
    glibc-only (elsewhere a no-op); set once, by the tensor-major schedule.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 64 << 20)
    mallopt(m_trim_threshold, 128 << 20)


class _Prefetcher:
    """Runs ``load`` over ``requests`` in a thread, at most ``max_bytes`` ahead of the consumer."""

    _DONE = object()

    def __init__(self, requests: Iterable[_Request], load: Callable[[_Request], Any], max_bytes: int,
                 workers: int = 1) -> None:
        self._requests = requests
        self._load = load
        self._max = max_bytes
        # object storage: ``workers`` ranged reads in flight (a round trip each), delivered in request order
        self._pool = (concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="ckptavg-read")
                      if workers > 1 else None)
        self._inflight = 0
        self._cond = threading.Condition()
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ckptavg-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for req in self._requests:
                with self._cond:
                    if self._inflight > 0 and self._inflight + req.nbytes > self._max:
                        # full: resume once half the window is free, then read a burst. Waking for every
                        # piece the consumer frees would hand the interpreter lock back and forth with the
                        # fold at every piece (each torch call releases it and must take it back)
                        while (self._inflight > 0 and self._inflight + req.nbytes > self._max // 2
                               and not self._stop.is_set()):
                            self._cond.wait(0.5)
                    if self._stop.is_set():
                        return
                    self._inflight += req.nbytes
                self._queue.put((req, self._load(req) if self._pool is None else self._pool.submit(self._load, req)))
            self._queue.put((None, self._DONE))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            self._queue.put((None, e))

    def __iter__(self) -> Iterator[tuple[_Request, Any]]:
        while True:
            req, item = self._queue.get()
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            try:
                yield req, (item.result() if isinstance(item, concurrent.futures.Future) else item)
            finally:
                with self._cond:
                    self._inflight -= req.nbytes
                    if self._inflight <= self._max // 2:
                        self._cond.notify()

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        while self._thread.is_alive():
            try:  # unblock a producer waiting on nothing; drop staged tensors
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class Engine:
    """Streams checkpoint tensors into averages. See the module docstring."""

    # On CUDA, averages whose accumulators live in CPU memory (spilled: pinned, or the disk store) are
    # folded on the CPU from a device-to-host copy of each chunk; CPU and CUDA arithmetic are bitwise equal.
    host_accumulators = True

    def __init__(
        self,
        *,
        device: str | torch.device | None = "cpu",
        chunk_elems: int = DEFAULT_CHUNK_ELEMS,
        piece_elems: int = DEFAULT_PIECE_ELEMS,
        staging_bytes: int = DEFAULT_STAGING_BYTES,
        check_finite: bool = True,
        progress: Progress | None = None,
        threads: int | None = None,
        fold_workers: int = 1,
        remote_reads: int = DEFAULT_REMOTE_READS,
    ) -> None:
        self.device = resolve_device(device)
        self.remote_reads = max(1, int(remote_reads))  # ranged reads in flight for inputs in object storage
        self.chunk_elems = int(chunk_elems)
        self.piece_elems = max(1, int(piece_elems))
        # CPU threads for the arithmetic of :meth:`average` (one-shot); :meth:`fold` uses the caller's setting
        self.threads = threads if threads is not None else max(1, (os.cpu_count() or 1) - 1)
        # threads folding different averages of one tensor at once (CPU; each with one intra-op thread):
        # worth it when many averages share each read (``ckptavg sweep``); 1 = the calling thread alone
        self.fold_workers = max(1, int(fold_workers))
        self._fold_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.staging_bytes = int(staging_bytes)
        self.check_finite = check_finite
        self.progress = progress or Progress()
        self.files = FileCache(max_open=128)  # used by the prefetch thread only
        self._old_files = FileCache(max_open=32)  # LAWA's leaving members, read on the calling thread
        self._scratch: dict[tuple[torch.dtype, int, bool], torch.Tensor] = {}
        self._old_bufs: list[torch.Tensor] = []
        self._cuda = self.device.type == "cuda"
        if self._cuda:
            self._side = torch.cuda.Stream(device=self.device)
            self._pinned = [torch.empty(_PIN_CHUNK_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            self._pin_events = [torch.cuda.Event() for _ in range(2)]
            self._pin_next = 0

    def bytes_read(self) -> dict[Any, int]:
        """Bytes this engine has read, per file (the new checkpoints' reads and the re-reads of earlier ones)."""
        total = self.files.bytes_read.copy()
        total.update(self._old_files.bytes_read)
        return dict(total)

    def close(self) -> None:
        if self._fold_pool is not None:
            self._fold_pool.shutdown(wait=True)
            self._fold_pool = None
        self.files.close()
        self._old_files.close()

    def __enter__(self) -> Engine:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_workers(self, ckpts: Sequence[Checkpoint]) -> int:
        """Reads in flight: several for inputs in object storage (each read is a round trip) whose tensors are plain
        byte ranges or DCP chunks (its source keeps nothing between reads); on CPU the loads share nothing but the
        thread-safe file cache and buffer pool. Else one."""
        remote = any(isinstance(r.identity, ObjectIdentity) for c in ckpts for r in c.tensors.values())
        stateless = all(c.format.startswith("safetensors") or c.format == "dcp" for c in ckpts)
        return self.remote_reads if remote and stateless and not self._cuda else 1

    # -- staging ------------------------------------------------------------------------
    def _scratch_chunk(self, slot: int, dtype: torch.dtype, n: int, *, host: bool = False,
                       worker: int = 0) -> torch.Tensor:
        """Reused scratch on the engine's device; ``host``: on the CPU, for averages spilled off the GPU;
        ``worker``: each fold worker thread has its own."""
        key = (dtype, slot, host, worker)
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(n, min(self.chunk_elems, 1 << 16)), dtype=dtype,
                              device="cpu" if host else self.device)
            self._scratch[key] = buf
        return buf[:n]

    def _load(self, reader: CheckpointReader, name: str, piece: tuple[int, int] | None = None,
              pool: _BufferPool | None = None) -> tuple[torch.Tensor, Any]:
        """Read one tensor (or the element range ``piece`` of it) and stage it on the engine's
        device. Runs in the prefetch thread. On CPU a piece is read into a buffer of ``pool``,
        which the staged tuple carries (in place of a CUDA event) to be put back after the fold."""
        ref = _piece_ref(reader.checkpoint.tensors[name], piece)
        if not self._cuda:
            if piece is None:
                return reader.read(name), None
            buf = pool.get() if pool is not None and ref.nbytes <= pool.capacity else None
            out = buf[: ref.nbytes] if buf is not None else None
            raw = self.files.read(ref.file, ref.identity, ref.offset, ref.nbytes, out=out)  # type: ignore[arg-type]
            return raw.view(ref.dtype), buf
        if ref.offset is None:  # pickle: already in memory after the file load
            with torch.cuda.stream(self._side):
                dev = reader.read(name).to(self.device, non_blocking=False)
                done = torch.cuda.Event()
                done.record(self._side)
            return dev, done
        with torch.cuda.stream(self._side):
            dev = torch.empty(ref.nbytes, dtype=torch.uint8, device=self.device)
            for off in range(0, ref.nbytes, _PIN_CHUNK_BYTES):
                n = min(_PIN_CHUNK_BYTES, ref.nbytes - off)
                i = self._pin_next
                self._pin_next ^= 1
                self._pin_events[i].synchronize()  # the copy out of this buffer has finished
                buf = self._pinned[i][:n]
                self.files.read(ref.file, ref.identity, ref.offset + off, n, out=buf)
                dev[off : off + n].copy_(buf, non_blocking=True)
                self._pin_events[i].record(self._side)
            done = torch.cuda.Event()
            done.record(self._side)
        return dev.view(ref.dtype).reshape(ref.shape), done

    def _old_buffer(self, i: int, nbytes: int) -> torch.Tensor:
        """Reused CPU buffer ``i`` for LAWA's leaving member in :meth:`fold` (the calling thread only).

        Reading into fresh memory costs a page fault per 4 KiB; the buffers grow to the
        largest tensor and are kept (one per leaving checkpoint of a fold, usually one per
        LAWA average) — small beside the long-lived accumulators they serve.
        """
        while len(self._old_bufs) <= i:
            self._old_bufs.append(torch.empty(0, dtype=torch.uint8))
        if self._old_bufs[i].numel() < nbytes:
            self._old_bufs[i] = torch.empty(0, dtype=torch.uint8)  # free the old one first
            self._old_bufs[i] = torch.empty(nbytes, dtype=torch.uint8)
        return self._old_bufs[i][:nbytes]

    def _ready(self, staged: tuple[torch.Tensor, Any]) -> torch.Tensor:
        x, done = staged
        if done is not None and not isinstance(done, torch.Tensor):  # a CUDA event (a tensor: a pool buffer)
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(done)
            x.record_stream(stream)
        return x

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.device == self.device else t.to(self.device)

    # -- the per-tensor fold ------------------------------------------------------------
    def _jobs(self, ref: TensorRef, averages: Sequence[Average], info: FoldInfo, path: Any) -> list[_Job]:
        jobs = []
        for avg in averages:
            method = avg.method_for(ref.name, ref.dtype)
            if method is None or not avg.method.accepts(info.step):
                continue
            slot = avg.slot_for(ref, method, path=path)
            jobs.append(_Job(avg, method, slot, method.prepare(slot, info)))
        return jobs

    def _fold_tensor(
        self,
        x: torch.Tensor,
        jobs: Sequence[_Job],
        info: FoldInfo,
        read_old: Callable[[Hashable, Slot], torch.Tensor],
    ) -> None:
        if not jobs:
            return
        flat = x.reshape(-1)
        n = flat.numel()
        olds = {id(j): read_old(j.plan.old, j.slot).reshape(-1) for j in jobs if j.plan.old is not None}
        floats = [j for j in jobs if not isinstance(j.method, Latest)]
        acc_dtypes = {j.average.accum_dtype for j in floats}
        on_host = {id(j) for j in floats if flat.is_cuda and j.average.device.type == "cpu"}
        groups = self._job_groups(jobs)
        for lo in range(0, n, self.chunk_elems):
            hi = min(lo + self.chunk_elems, n)
            raw = flat[lo:hi]
            cast = {dt: self._scratch_chunk(0, dt, hi - lo).copy_(raw) for dt in acc_dtypes}
            if len(groups) == 1:
                self._apply_jobs(groups[0], raw, cast, olds, on_host, lo, hi, 0)
                continue
            # the averages are independent: each worker folds its own, on its own scratch, into its own
            # accumulators, with the same operations as one thread would (the bits do not depend on it)
            futures = [self._pool().submit(self._apply_jobs, g, raw, cast, olds, on_host, lo, hi, w)
                       for w, g in enumerate(groups[1:], 1)]
            try:
                self._apply_jobs(groups[0], raw, cast, olds, on_host, lo, hi, 0)
            finally:
                for f in futures:
                    f.result()
        for j in jobs:
            j.method.commit(j.slot, j.plan, info)

    def _apply_jobs(self, jobs: Sequence[_Job], raw: torch.Tensor, cast: Mapping[torch.dtype, torch.Tensor],
                    olds: Mapping[int, torch.Tensor], on_host: set[int], lo: int, hi: int, worker: int) -> None:
        """One chunk ``[lo, hi)`` of the new value into ``jobs``' accumulators (``cast``: the chunk in each
        accumulator dtype)."""
        cast_h: dict[torch.dtype, torch.Tensor] = {}
        for j in jobs:
            if isinstance(j.method, Latest):
                j.method.apply(j.slot, j.plan, raw, None, lo, hi, raw)  # copy_ crosses devices
                continue
            dt = j.average.accum_dtype
            host = id(j) in on_host  # a spilled average: fold on the CPU
            if host and dt not in cast_h:
                cast_h[dt] = self._scratch_chunk(0, dt, hi - lo, host=True).copy_(cast[dt])
            old = None
            if j.plan.old is not None:
                old = self._scratch_chunk(2, dt, hi - lo, host=host, worker=worker).copy_(olds[id(j)][lo:hi])
            j.method.apply(j.slot, j.plan, cast_h[dt] if host else cast[dt], old, lo, hi,
                           self._scratch_chunk(1, dt, hi - lo, host=host, worker=worker))

    def _job_groups(self, jobs: Sequence[_Job]) -> list[list[_Job]]:
        """``jobs`` split among up to ``fold_workers`` threads, balanced by the passes each makes over the
        chunk (longest first, each to the least loaded worker). One group on CUDA (one stream) or with one
        worker."""
        workers = min(self.fold_workers, len(jobs))
        if workers <= 1 or self._cuda:
            return [list(jobs)]
        loads = [0] * workers
        groups: list[list[_Job]] = [[] for _ in range(workers)]
        for j in sorted(jobs, key=_passes, reverse=True):
            w = loads.index(min(loads))
            groups[w].append(j)
            loads[w] += _passes(j)
        return [g for g in groups if g]

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._fold_pool is None:
            self._fold_pool = concurrent.futures.ThreadPoolExecutor(max(1, self.fold_workers - 1),
                                                                   thread_name_prefix="ckptavg-fold")
        return self._fold_pool

    # -- checkpoint-major -----------------------------------------------------------------
    def fold(
        self,
        ckpt: Checkpoint,
        averages: Sequence[Average],
        *,
        ident: Hashable,
        weight: float = 1.0,
        history: Mapping[Hashable, Checkpoint] | Callable[[Hashable], Checkpoint] | None = None,
        check_inputs: bool | None = None,
        check_model: bool = True,
    ) -> int:
        """Fold one checkpoint into every average that accepts its step. Returns bytes read.

        Shapes and dtypes are checked against every average before any tensor is
        read. ``ident`` names this checkpoint uniquely within the run (its step, or
        its position); ``history`` maps the ``ident`` of earlier checkpoints to
        themselves (LAWA reads the member leaving its window). With
        ``check_inputs`` (default: the engine's ``check_finite``) a tensor holding
        NaN/Inf raises :class:`NonFiniteError` before it is folded. With ``check_model`` a checkpoint of
        another model than an average holds raises :class:`MixedModelsError` (:func:`check_against`);
        the one-shot, which judges all its inputs at once, turns it off.
        """
        check_inputs = self.check_finite if check_inputs is None else check_inputs
        info = FoldInfo(ident=ident, step=ckpt.step, weight=weight)
        _check_steps([ckpt], averages)
        accepting = [a for a in averages if a.method.accepts(ckpt.step)]
        for avg in accepting:
            if check_model:
                check_against(ckpt, avg)
            for ref in ckpt.tensors.values():
                if avg.method_for(ref.name, ref.dtype) is not None:
                    avg.check(ref, path=ckpt.path, zero3=ckpt.zero3)
                    if avg.on_shape_change == "error" and ckpt.zero3:
                        _reject_placeholder(ref, ckpt.path)
        get_old = _history_lookup(history)
        old_readers: dict[Hashable, CheckpointReader] = {}

        buffer_of: dict[Hashable, int] = {}

        def read_old(old_ident: Hashable, slot: Slot) -> torch.Tensor:
            reader = old_readers.get(old_ident)
            if reader is None:
                reader = old_readers[old_ident] = get_old(old_ident).reader(self._old_files)
            i = buffer_of.setdefault(old_ident, len(buffer_of))
            return self._to_device(_read_matching(reader, current_name, slot, out=lambda n: self._old_buffer(i, n)))

        reader = ckpt.reader(self.files)
        requests = [_Request(0, name, ref.nbytes) for name, ref in ckpt.tensors.items()]
        stream = _Prefetcher(requests, lambda r: self._load(reader, r.name), self.staging_bytes,
                             workers=self._read_workers([ckpt]))
        start = time.perf_counter()
        total = 0
        try:
            for req, staged in stream:
                current_name = req.name
                ref = ckpt.tensors[req.name]
                x = self._ready(staged)
                if check_inputs and ref.dtype.is_floating_point and not _all_finite(x):
                    raise NonFiniteError("holds NaN or Inf values; the checkpoint is not folded", path=ref.file, tensor=ref.name,
                                         hint="pass --allow-nonfinite to average it anyway")
                self._fold_tensor(x, self._jobs(ref, accepting, info, ckpt.path), info, read_old)
                total += ref.nbytes
                self.progress.advance(ref.nbytes)
        finally:
            stream.close()
            reader.release()
            for r in old_readers.values():
                r.release()
        for avg in accepting:
            avg.folded.append(FoldRecord(str(ckpt.path), ckpt.step, ckpt.fingerprint,
                                         weight if avg.method.options().get("weighted") else None, ckpt.model))
        self.progress.checkpoint_done(ckpt, total, time.perf_counter() - start)
        return total

    # -- tensor-major ---------------------------------------------------------------------
    def average(
        self,
        ckpts: Sequence[Checkpoint],
        averages: Sequence[Average],
        emit: Callable[[Average, str, torch.Tensor], None],
        *,
        weights: Sequence[float] | None = None,
    ) -> None:
        """Average ``ckpts`` (in step order) tensor by tensor; ``emit(average, name, tensor)``
        receives each finished tensor (on CPU, source dtype) in :func:`output_order`.

        A tensor read in pieces is emitted as consecutive flat parts (1-D tensors of
        its source dtype, in element order) that together make the tensor:
        :class:`~ckptavg.writing.export.ModelWriter` appends them.
        """
        if weights is not None and len(weights) != len(ckpts):
            raise UsageError(f"--weights has {len(weights)} values for {len(ckpts)} checkpoints")
        _check_steps(ckpts, averages)
        validate_sequence(ckpts, averages)
        idents = list(range(len(ckpts)))  # position in the run: headers of a run's checkpoints are often identical
        by_ident = dict(zip(idents, ckpts))
        infos = [FoldInfo(ident=i, step=c.step, weight=1.0 if weights is None else float(weights[k]))
                 for k, (i, c) in enumerate(zip(idents, ckpts))]
        requests: list[_Request] = []
        pending: dict[tuple[str, tuple[int, int] | None], int] = {}
        for name in output_order(ckpts):
            held = [(k, c.tensors[name]) for k, c in enumerate(ckpts) if name in c.tensors]
            for piece in _pieces([r for _, r in held], self.piece_elems):
                pending[(name, piece)] = len(held)
                requests += [_Request(k, name, _piece_ref(r, piece).nbytes, piece) for k, r in held]
        if not self._cuda:
            _keep_freed_memory()
        with _torch_threads(None if self._cuda else 1 if self.fold_workers > 1 else self.threads):
            self._average(ckpts, averages, emit, infos, requests, pending, by_ident)
        for avg in averages:
            for c, info in zip(ckpts, infos):
                if avg.method.accepts(c.step):
                    avg.folded.append(FoldRecord(str(c.path), c.step, c.fingerprint,
                                                 info.weight if weights is not None else None, c.model))

    def _average(self, ckpts: Sequence[Checkpoint], averages: Sequence[Average],
                 emit: Callable[[Average, str, torch.Tensor], None], infos: list[FoldInfo],
                 requests: list[_Request], pending: dict[tuple[str, tuple[int, int] | None], int],
                 by_ident: dict[Hashable, Checkpoint]) -> None:
        readers = [c.reader(self.files) for c in ckpts]
        remaining = [0] * len(ckpts)
        for r in requests:
            remaining[r.ckpt_index] += 1
        read_bytes = [0] * len(ckpts)
        old_readers: dict[Hashable, CheckpointReader] = {}

        # this tensor piece's value in the inputs a later fold of it reads again (LAWA's leaving member), kept
        # from their one read: tensor-major reads a piece from every input in a row, so a window's members are
        # in memory already; an entry beyond ``self.staging_bytes`` of them is read again instead
        kept: dict[Hashable, tuple[torch.Tensor, Any]] = {}
        kept_bytes = 0

        def release_kept(ident: Hashable) -> None:
            nonlocal kept_bytes
            x_kept, buf = kept.pop(ident)
            kept_bytes -= x_kept.numel() * x_kept.element_size()
            if pool is not None and isinstance(buf, torch.Tensor):
                pool.put(buf)

        def read_old(old_ident: Hashable, slot: Slot) -> torch.Tensor:
            hit = kept.get(old_ident)
            if hit is not None and (current.piece is not None or tuple(hit[0].shape) == slot.shape):
                return self._to_device(hit[0])
            reader = old_readers.get(old_ident)
            if reader is None:
                reader = old_readers[old_ident] = by_ident[old_ident].reader(self._old_files)
            if current.piece is None:
                return self._to_device(_read_matching(reader, current.name, slot))
            ref = reader.checkpoint.tensors.get(current.name)
            if ref is None or ref.offset is None or ref.numel < current.piece[1]:
                raise TensorMismatchError("the checkpoint leaving the LAWA window no longer matches this tensor",
                                          path=reader.checkpoint.path, tensor=current.name)
            ref = _piece_ref(ref, current.piece)
            raw = self._old_files.read(ref.file, ref.identity, ref.offset, ref.nbytes)  # type: ignore[arg-type]
            return self._to_device(raw.view(ref.dtype))

        window = self.staging_bytes
        if any(r.piece is not None for r in requests):
            window = min(window, max(PIECE_STAGING_BYTES, 3 * len(ckpts) * self.piece_elems * 4))
        pool = None
        if not self._cuda and any(r.piece is not None for r in requests):
            capacity = max(r.nbytes for r in requests if r.piece is not None)
            pool = _BufferPool(capacity, keep=(window + self.staging_bytes) // capacity + 2)  # + kept pieces
        spent = [0.0] * len(ckpts)  # each checkpoint's own read time (tensor-major reads them all together)

        def load(r: _Request) -> Any:
            t0 = time.perf_counter()
            try:
                return self._load(readers[r.ckpt_index], r.name, r.piece, pool)
            finally:
                spent[r.ckpt_index] += time.perf_counter() - t0

        stream = _Prefetcher(requests, load, window, workers=self._read_workers(ckpts))
        try:
            for req, staged in stream:
                current = req
                k = req.ckpt_index
                ckpt = ckpts[k]
                ref = _piece_ref(ckpt.tensors[req.name], req.piece)
                x = self._ready(staged)
                jobs = self._jobs(ref, averages, infos[k], ckpt.path)
                self._fold_tensor(x, jobs, infos[k], read_old)
                needed = _still_read(jobs)
                for ident in [i for i in kept if i not in needed]:
                    release_kept(ident)
                if infos[k].ident in needed and ref.nbytes <= self.staging_bytes:
                    kept[infos[k].ident] = staged  # no method modifies x: every one copies out of it
                    kept_bytes += ref.nbytes
                    while kept_bytes > self.staging_bytes:
                        release_kept(next(iter(kept)))
                elif pool is not None and isinstance(staged[1], torch.Tensor):
                    pool.put(staged[1])  # the fold kept no view of x: every method copies out of it
                del x, staged
                self.progress.advance(ref.nbytes)
                read_bytes[k] += ref.nbytes
                remaining[k] -= 1
                if remaining[k] == 0:  # the seconds spent reading this checkpoint, not the time since the start
                    self.progress.checkpoint_done(ckpt, read_bytes[k], spent[k])
                key = (req.name, req.piece)
                pending[key] -= 1
                if pending[key] == 0:
                    for ident in list(kept):
                        release_kept(ident)
                    self.finish_tensor(req.name, ckpts, averages, emit)
        finally:
            stream.close()
            kept.clear()
            for r in [*readers, *old_readers.values()]:
                r.release()

    def finish_tensor(self, name: str, ckpts: Sequence[Checkpoint], averages: Sequence[Average],
                      emit: Callable[[Average, str, torch.Tensor], None]) -> None:
        """Emit the finished average of tensor ``name`` from each average (checked for NaN/Inf
        unless ``check_finite`` is off) and free its accumulators."""
        for avg in averages:
            if name not in avg.slots:
                continue
            slot = avg.slots[name]
            value = avg.output(name)  # what is written: a finite fp32 value may still overflow a bf16 one
            if self.check_finite and value.dtype.is_floating_point and not _all_finite(value):
                raise self._find_nonfinite(name, ckpts, avg)
            emit(avg, name, value.reshape(slot.shape).cpu())
            avg.drop(name)

    def _find_nonfinite(self, name: str, ckpts: Sequence[Checkpoint], avg: Average) -> CkptavgError:
        """Name the input that poisoned ``name`` (only runs when something did)."""
        for c in ckpts:
            if name in c.tensors and avg.method.accepts(c.step):
                with c.reader() as r:
                    if not _all_finite(r.read(name)):
                        return NonFiniteError("holds NaN or Inf values", path=c.tensors[name].file, tensor=name,
                                              hint="drop this checkpoint, or pass --allow-nonfinite to average it anyway")
        return NonFiniteError(f"the {avg.name} average overflowed to Inf/NaN", tensor=name,
                              hint="use --accum-dtype float64")


def _passes(job: _Job) -> int:
    """About how many passes over a chunk folding ``job`` makes: the cost :meth:`Engine._job_groups` balances."""
    return 1 + len(job.method.buffers) + (job.plan.old is not None)


def _still_read(jobs: Sequence[_Job]) -> set:
    """Idents of the inputs whose value of this tensor a later fold of it reads again (:meth:`Method.needs`)."""
    out: set = set()
    for j in jobs:
        out.update(j.method.needs(j.slot))
    return out


def _all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN/Inf. A sum is NaN or Inf when any element is, and summing
    is several times quicker than ``isfinite``; only a non-finite sum (which finite values
    can also reach, by overflow) needs the elementwise test. 8-bit floats have neither ``sum`` nor
    ``isfinite`` in torch: they are tested through float32, a chunk at a time."""
    if t.dtype in _SUMMABLE:
        return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())
    flat = t.reshape(-1)
    step = DEFAULT_CHUNK_ELEMS
    return all(bool(torch.isfinite(flat[i:i + step].float()).all()) for i in range(0, flat.numel(), step))


_SUMMABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # fp8 has no sum


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (None: unchanged), then restore the setting."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _history_lookup(history: Any) -> Callable[[Hashable], Checkpoint]:
    if history is None:
        def missing(ident: Hashable) -> Checkpoint:
            raise UsageError(f"LAWA needs checkpoint {ident!r}, which is no longer available")
        return missing
    if callable(history):
        return history
    return lambda ident: history[ident]


def _read_matching(reader: CheckpointReader, name: str, slot: Slot,
                   out: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
    """The tensor ``name`` of the checkpoint leaving a LAWA window (into ``out(nbytes)`` when it
    can be read in place), checked against the slot it is subtracted from."""
    ckpt = reader.checkpoint
    ref = ckpt.tensors.get(name)
    if ref is None or ref.shape != slot.shape:
        raise TensorMismatchError("the checkpoint leaving the LAWA window no longer matches this tensor",
                                  path=ckpt.path, tensor=name)
    return reader.read(name, out=out(ref.nbytes) if out is not None and ref.offset is not None else None)


def output_order(ckpts: Sequence[Checkpoint]) -> list[str]:
    """Tensor order of the outputs: the newest checkpoint's order, then tensors only older ones have."""
    names: dict[str, None] = {}
    for c in reversed(ckpts):
        for name in c.tensors:
            names.setdefault(name, None)
    return list(names)


def _check_steps(ckpts: Sequence[Checkpoint], averages: Sequence[Average]) -> None:
    for avg in averages:
        if avg.needs_steps():
            for c in ckpts:
                if c.step is None:
                    raise StepError(
                        f"the {avg.name} average needs training steps, and no step could be read from this name",
                        path=c.path, hint="name checkpoints like checkpoint-<N> or step-<N>, or pass --steps",
                    )


def _reject_placeholder(ref: TensorRef, path: Any) -> None:
    """In a checkpoint DeepSpeed saved, a ``[0]``-shaped float tensor is a ZeRO-3 partitioned placeholder,
    never real weights (elsewhere an empty tensor is just empty, and is averaged like any other)."""
    if ref.shape == (0,) and ref.dtype.is_floating_point:
        raise TensorMismatchError(
            "is empty (shape [0])", path=path, tensor=ref.name,
            hint="a DeepSpeed ZeRO-3 partitioned placeholder? pass its DeepSpeed global_step folder instead, "
                 "which ckptavg gathers",
        )


def _shape_change_hint(ref: TensorRef, before: Checkpoint, now: Checkpoint) -> str:
    """What to do about a tensor that changed shape or dtype between ``before`` and ``now``: restarting
    its average fits one model that grew, never two different models."""
    if ref.numel == 0 and now.zero3:
        return "a ZeRO-3 placeholder? pass its DeepSpeed global_step folder instead"
    if before.model is not None and now.model is not None and before.model != now.model:
        return f"the checkpoints are of different models ({before.model}, {now.model}); average checkpoints of one model"
    return "use --on-shape-change reset to restart its average"


def validate_sequence(ckpts: Sequence[Checkpoint], averages: Sequence[Average]) -> None:
    """Check, from the indexes alone, that the checkpoints can be folded in this order.

    Raises before any tensor is read: steps out of order or repeated, and (policy
    ``error``) tensors that change shape or dtype.
    """
    steps = [c.step for c in ckpts]
    if all(s is not None for s in steps):
        for a, b in itertools.pairwise(ckpts):
            if b.step <= a.step:  # type: ignore[operator]
                raise StepError(f"step {b.step} comes after step {a.step} ({a.path}); steps must increase",
                                path=b.path, hint="two inputs have the same step? pass --steps")
    for avg in averages:
        if avg.on_shape_change != "error":
            continue
        seen: dict[str, tuple[TensorRef, Checkpoint]] = {}
        for c in ckpts:
            if not avg.method.accepts(c.step):
                continue
            for ref in c.tensors.values():
                if avg.method_for(ref.name, ref.dtype) is None:
                    continue
                prev = seen.get(ref.name)
                if prev is not None and (prev[0].shape != ref.shape or prev[0].dtype != ref.dtype):
                    p = prev[0]
                    raise TensorMismatchError(
                        f"is {list(ref.shape)} {str(ref.dtype)[6:]} here but {list(p.shape)} {str(p.dtype)[6:]} in {prev[1].path}",
                        path=c.path, tensor=ref.name,
                        hint=_shape_change_hint(ref, prev[1], c),
                    )
                if c.zero3:
                    _reject_placeholder(ref, c.path)
                seen[ref.name] = (ref, c)


def expected_outputs(ckpts: Sequence[Checkpoint], avg: Average) -> list[TensorRef]:
    """The tensors ``avg`` will produce from ``ckpts``, in :func:`output_order`, each as the
    ref of the newest checkpoint that it was folded from (its output shape and dtype)."""
    last: dict[str, TensorRef] = {}
    for c in ckpts:
        if not avg.method.accepts(c.step):
            continue
        for ref in c.tensors.values():
            if avg.method_for(ref.name, ref.dtype) is not None:
                last[ref.name] = ref
    return [last[name] for name in output_order(ckpts) if name in last]
