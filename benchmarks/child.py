"""One benchmark measurement, run in its own process: ``python benchmarks/child.py TASK JSON_ARGS``.

The driver (``run.py``) starts every measurement in a fresh child so that its peak
RSS (from ``os.wait4``) belongs to that method alone. Each task times only its own
region (after imports) and prints one line: ``BENCH-RESULT {json}``.

Tasks:

``baseline``   python + torch + ckptavg imported, nothing else (the RSS every torch child pays)
``read``       the read floor: every input file read sequentially with large ``readinto``
``write``      the write floor: one output's bytes written and fsynced
``kernel``     the fp32 fold arithmetic alone, on tensors already in memory
``fairseq``    fairseq's ``scripts/average_checkpoints.py`` method, re-implemented over safetensors
``avgmodel``   ``torch.optim.swa_utils.AveragedModel`` EMA inside a training loop (scaled-down model)
``oneshot``    ckptavg one-shot uniform through the public API
``fold``       ckptavg ``Engine.fold`` of one checkpoint into long-lived averages (daemon mode)
``sweep``      ckptavg sweep's fold of K averages from one read vs the K averages one by one
``h2d``        pinned host-to-device copy bandwidth (CUDA only)
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULT_MARK, checkpoint_files, drop_cache, resident_bytes, shard_map

_BLOCK = 16 << 20


def task_baseline(args: dict) -> dict:
    import torch  # noqa: F401

    import ckptavg  # noqa: F401

    return {"seconds": 0.0}


def task_read(args: dict) -> dict:
    """Read every file start to end into one reused buffer: what any reader must at least pay."""
    files = [Path(f) for f in args["files"]]
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    total = 0
    start = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while True:
                n = fh.readinto(view)
                if not n:
                    break
                total += n
    return {"seconds": time.perf_counter() - start, "bytes": total}


def task_write(args: dict) -> dict:
    """Write ``nbytes`` in large blocks and fsync: what writing one output must at least pay."""
    path, nbytes = Path(args["path"]), int(args["nbytes"])
    block = os.urandom(_BLOCK)
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as fh:
        left = nbytes
        while left > 0:
            left -= fh.write(block[: min(left, _BLOCK)])
        os.fsync(fh.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return {"seconds": seconds, "bytes": nbytes}


def _load_prefix(folder: Path, cap: int, device: Any) -> list[Any]:
    """The first tensors of a checkpoint, in index order, up to ``cap`` bytes, flat, on ``device``."""
    from safetensors import safe_open

    out, size = [], 0
    by_file: dict[Path, list[str]] = {}
    for name, f in shard_map(folder).items():
        by_file.setdefault(f, []).append(name)
    for f, names in by_file.items():
        with safe_open(str(f), framework="pt") as sf:
            for name in names:
                t = sf.get_tensor(name).reshape(-1).to(device)
                out.append(t)
                size += t.numel() * t.element_size()
                if size >= cap:
                    return out
    return out


def task_kernel(args: dict) -> dict:
    """The fold arithmetic alone: cast each chunk through a small reused fp32 scratch buffer and
    add it into fp32 accumulators (``uniform``: K folds plus the final divide and cast back;
    ``daemon``: one fold into EMA + LAWA (with a leaving member) + SWA). No I/O is timed."""
    import torch

    device = torch.device(args.get("device", "cpu"))
    chunk = int(args.get("chunk_elems", 1 << 20))
    xs = _load_prefix(Path(args["folders"][0]), int(args["cap"]), device)
    nbytes = sum(t.numel() * t.element_size() for t in xs)
    scratch = [torch.empty(chunk, dtype=torch.float32, device=device) for _ in range(3)]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    if args["mode"] == "uniform":
        k = int(args["k"])
        accs = [torch.zeros(t.numel(), dtype=torch.float32, device=device) for t in xs]
        outs = [torch.empty_like(t) for t in xs]
        for rep in range(1 + int(args.get("repeat", 1))):  # the first pass is untimed (page faults)
            for a in accs:
                a.zero_()
            sync()
            start = time.perf_counter()
            for _fold in range(k):
                for x, acc in zip(xs, accs):
                    for lo in range(0, x.numel(), chunk):
                        hi = min(lo + chunk, x.numel())
                        c = scratch[0][: hi - lo].copy_(x[lo:hi])
                        acc[lo:hi].add_(c)
            for acc, out in zip(accs, outs):
                out.copy_(acc.div_(torch.tensor(float(k), device=device)))
            sync()
            if rep:
                times.append(time.perf_counter() - start)
        return {"seconds": statistics.median(times), "bytes": k * nbytes, "sample_bytes": nbytes}
    olds = _load_prefix(Path(args["folders"][1]), int(args["cap"]), device)
    ema = [torch.zeros(t.numel(), dtype=torch.float32, device=device) for t in xs]
    big_s = [torch.zeros_like(e) for e in ema]
    big_f = [torch.zeros_like(e) for e in ema]
    swa = [torch.zeros_like(e) for e in ema]
    beta = 0.5 ** (1000 / 2000)
    for rep in range(1 + int(args.get("repeat", 1))):  # the first pass is untimed (page faults)
        sync()
        start = time.perf_counter()
        for i, x in enumerate(xs):
            for lo in range(0, x.numel(), chunk):
                hi = min(lo + chunk, x.numel())
                c = scratch[0][: hi - lo].copy_(x[lo:hi])
                tmp = scratch[1][: hi - lo]
                ema[i][lo:hi].mul_(beta).add_(torch.mul(c, 1.0 - beta, out=tmp))
                old = scratch[2][: hi - lo].copy_(olds[i][lo:hi])
                big_s[i][lo:hi].sub_(old).add_(c)
                big_f[i][lo:hi].add_(c)
                swa[i][lo:hi].add_(c)
        sync()
        if rep:
            times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "bytes": nbytes, "sample_bytes": nbytes}


def _save_like(state: dict, source: Path, out: Path) -> None:
    """Write ``state`` as safetensors shards laid out like ``source`` (same index), fsync each file."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    by_file: dict[str, dict] = {}
    for name, f in shard_map(source).items():
        by_file.setdefault(f.name, {})[name] = state[name]
    for fname, tensors in by_file.items():
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
    for side in ("model.safetensors.index.json", "config.json"):
        if (source / side).exists():
            (out / side).write_bytes((source / side).read_bytes())
    for f in out.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def task_fairseq(args: dict) -> dict:
    """fairseq ``scripts/average_checkpoints.py``'s method, faithfully re-implemented over safetensors.

    Each checkpoint is loaded whole; a running sum is kept per parameter, starting from a
    clone of the first checkpoint's tensor; then every float sum is divided in place by the
    number of checkpoints. fairseq promotes only ``torch.HalfTensor`` (fp16) to fp32, so bf16
    parameters are summed in bf16 (``accum=bf16``, its real behaviour); ``accum=fp32``
    promotes every float tensor (the variant a careful user would write) and casts the result
    back to the source dtype, so the output folder has the inputs' layout.
    """
    import torch
    from safetensors.torch import load_file

    folders = [Path(f) for f in args["folders"]]
    fp32 = args["accum"] == "fp32"
    start = time.perf_counter()
    params: dict[str, torch.Tensor] = {}
    keys = None
    dtypes: dict[str, torch.dtype] = {}
    for folder in folders:
        state: dict[str, torch.Tensor] = {}
        for f in checkpoint_files(folder):  # torch.load of the whole checkpoint, in fairseq
            state.update(load_file(str(f)))
        model_keys = list(state)
        if keys is None:
            keys = model_keys
        elif sorted(keys) != sorted(model_keys):
            raise KeyError(f"For checkpoint {folder}, expected list of params: {keys}, but found: {model_keys}")
        for k in keys:
            p = state[k]
            dtypes.setdefault(k, p.dtype)
            if p.dtype == torch.float16 or (fp32 and p.is_floating_point()):
                p = p.float()
            if k not in params:
                params[k] = p.clone()  # clone() is needed in case p is a shared parameter
            else:
                params[k] += p
        del state
    n = len(folders)
    for k, v in params.items():
        if v.is_floating_point():
            v.div_(n)
        else:
            v //= n
        params[k] = v.to(dtypes[k])
    _save_like(params, folders[-1], Path(args["out"]))
    return {"seconds": time.perf_counter() - start}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def task_avgmodel(args: dict) -> dict:
    """What a trainer pays for in-process EMA: step time of a small MLP trained with AdamW, without
    and then with ``AveragedModel(..., multi_avg_fn=get_ema_multi_avg_fn(0.999))`` updated after
    every optimizer step, and the resident memory the averaged copy adds."""
    import torch
    from torch import nn
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    hidden, layers, batch, steps = int(args["hidden"]), int(args["layers"]), int(args["batch"]), int(args["steps"])
    blocks: list[nn.Module] = []
    for _ in range(layers):
        blocks += [nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden)]
    model = nn.Sequential(*blocks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, hidden)
    y = torch.randn(batch, hidden)
    n_params = sum(p.numel() for p in model.parameters())

    updates: list[float] = []

    def step(ema: Any = None) -> None:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        if ema is not None:
            t0 = time.perf_counter()
            ema.update_parameters(model)
            updates.append(time.perf_counter() - t0)

    def timed(ema: Any = None) -> float:
        t0 = time.perf_counter()
        step(ema)
        return time.perf_counter() - t0

    for _ in range(3):
        step()
    rss_before = _rss_bytes()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999))
    for _ in range(3):
        step(ema)
    # alternate plain and averaged steps: the machine may be shared, so both see the same load
    plain, with_ema = [], []
    for _ in range(steps):
        plain.append(timed())
        with_ema.append(timed(ema))
    base = statistics.median(plain)
    return {
        "seconds": statistics.median(with_ema), "step_plain": base, "step_ema": statistics.median(with_ema),
        "update": statistics.median(updates[3:]),
        "extra_rss": _rss_bytes() - rss_before, "params": n_params,
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "model": f"MLP {layers}x({hidden}->{4 * hidden}->{hidden}), fp32, batch {batch}, AdamW, CPU",
    }


def task_oneshot(args: dict) -> dict:
    """ckptavg's one-shot uniform mean through the public API, output fsynced (AtomicDir)."""
    from ckptavg.averaging.engine import Engine
    from ckptavg.oneshot import AverageSpec, average_checkpoints, build_averages
    from ckptavg.reading.checkpoint import open_checkpoint

    start = time.perf_counter()
    ckpts = [open_checkpoint(f) for f in args["folders"]]
    with Engine(device=args.get("device", "cpu")) as engine:
        averages = build_averages([AverageSpec("uniform")], device=engine.device)
        result = average_checkpoints(ckpts, averages, Path(args["out"]), engine=engine, force=True)
    return {"seconds": time.perf_counter() - start, "bytes": result.bytes_read, "schedule": result.schedule}


def task_fold(args: dict) -> dict:
    """``Engine.fold`` of one checkpoint into averages whose accumulators already exist.

    ``methods=daemon``: EMA (half-life 2000 steps) + LAWA(window) + SWA, as the daemon runs
    them; ``methods=lawa``: LAWA alone. The K input folders are reused cyclically under
    increasing steps (``open_checkpoint(step=...)``), so any window can be filled: ``window``
    untimed folds fill it, then each timed fold is a steady-state fold that also reads the
    checkpoint leaving the window. Warm folds are timed first; then, before each cold fold,
    every input file is evicted from the page cache.
    """
    from ckptavg.averaging.engine import Engine
    from ckptavg.oneshot import AverageSpec, build_averages
    from ckptavg.reading.checkpoint import open_checkpoint

    folders = [Path(f) for f in args["folders"]]
    window, repeat = int(args["window"]), int(args.get("repeat", 1))
    files = [f for d in folders for f in checkpoint_files(d)]
    if args["methods"] == "daemon":
        specs = [AverageSpec("ema", {"half_life": 2000.0}), AverageSpec("lawa", {"window": window}),
                 AverageSpec("swa", {"start_step": 0})]
    else:
        specs = [AverageSpec("lawa", {"window": window})]
    history: dict[int, Any] = {}

    def ckpt(i: int) -> Any:
        c = history.get(i)
        if c is None:
            c = history[i] = open_checkpoint(folders[i % len(folders)], step=1000 * (i + 1))
        return c

    with Engine(device=args.get("device", "cpu")) as engine:
        averages = build_averages(specs, device=engine.device)
        i = 0

        def fold() -> float:
            nonlocal i
            c = ckpt(i)
            if engine.device.type == "cuda":
                import torch

                torch.cuda.synchronize(engine.device)
            t0 = time.perf_counter()
            engine.fold(c, averages, ident=i, history=ckpt)
            if engine.device.type == "cuda":
                import torch

                torch.cuda.synchronize(engine.device)
            i += 1
            history.pop(i - window - 2, None)
            return time.perf_counter() - t0

        for _ in range(window):
            fold()
        warm, warm_resident = [], []
        for _ in range(repeat):
            warm_resident.append(resident_bytes(files))
            warm.append(fold())
        cold, resident = [], []
        if args.get("cold"):
            for _ in range(repeat):
                drop_cache(files)
                resident.append(resident_bytes(files))
                cold.append(fold())
    nbytes = ckpt(0).nbytes
    return {"seconds": statistics.median(warm), "warm": warm, "cold": cold,
            "cold_seconds": statistics.median(cold) if cold else None,
            "bytes": nbytes, "bytes_read": 2 * nbytes, "folds": i, "cold_resident": resident,
            "warm_resident": warm_resident}


def sweep_grid(steps: list[int]) -> list[str]:
    """The benchmark's sweep over checkpoints at ``steps``: EMA x4, LAWA x3, SWA x2, newest-N x3 (12 averages;
    fewer with fewer than 5 checkpoints)."""
    k, gap = len(steps), steps[1] - steps[0]
    small = sorted({max(2, min(k, n)) for n in (2, 3, k - 1)})
    starts = sorted({steps[1], steps[k // 2]})
    return [f"ema:{gap // 2},{gap},{2 * gap},{4 * gap}", "lawa:" + ",".join(map(str, small)),
            "swa:" + ",".join(map(str, starts)), "uniform:" + ",".join(map(str, small))]


def task_sweep(args: dict) -> dict:
    """``ckptavg sweep``'s fold against the same averages one by one, in one process, page cache warm, and
    with ``cold`` also with the inputs dropped from the page cache before every pass (read from storage, as
    checkpoints larger than the page cache always are).

    Timed (medians of ``repeat``): the engine's read pass alone (every tensor read, folded into nothing),
    the sweep's fold of K averages from one read (as ``ckptavg sweep`` runs it: every core on the arithmetic;
    and with fold workers instead), and each average's fold alone (K passes, each the faster of ``ckptavg
    average``'s threads and every core); with
    ``write``, also the sweep writing its K model folders (:func:`fold_grid`) against K one-shot runs.
    Outputs go to a discarding sink in the fold-only rows: what is measured is reading and folding.
    """
    from ckptavg.averaging.engine import Engine
    from ckptavg.oneshot import average_checkpoints, final_members
    from ckptavg.reading.checkpoint import open_checkpoint
    from ckptavg.sweep import available_cpus, fold_grid, grid_averages, parse_grid, piece_elems_for

    folders = [Path(f) for f in args["folders"]]
    repeat = int(args.get("repeat", 1))
    ckpts = [open_checkpoint(f, step=1000 * (i + 1)) for i, f in enumerate(folders)]
    points = parse_grid(sweep_grid([c.step for c in ckpts]))

    def discard(avg: Any, name: str, t: Any) -> None:
        pass

    def fold(engine: Any, pts: list) -> float:
        averages = grid_averages(pts, ckpts, device=engine.device)
        for a in averages:
            a.final_members = final_members(ckpts, a)
        default, engine.piece_elems = engine.piece_elems, piece_elems_for(averages, engine.piece_elems)  # as fold_grid
        try:
            t0 = time.perf_counter()
            engine.average(ckpts, averages, discard)
            return time.perf_counter() - t0
        finally:
            engine.piece_elems = default

    out: dict[str, Any] = {"k_averages": len(points), "grid": [p.name for p in points], "bytes": sum(c.nbytes for c in ckpts)}
    device = args.get("device", "cpu")
    cores = available_cpus()
    out["threads"] = cores  # as ckptavg sweep runs: one fold thread, every core on the arithmetic
    # the averages one by one as ``ckptavg average`` runs each (all cores but one on the arithmetic, one
    # for the reader) and on every core: the baseline takes, per average, the faster of the two
    with Engine(device=device) as engine, Engine(device=device, threads=cores) as swe, \
            Engine(device=device, fold_workers=cores) as workers:
        out["average_threads"] = engine.threads
        fold(engine, [])  # warm-up: allocator, threads
        fold(swe, points)
        fold(workers, points)
        read, sweep, sweep_w, each = [], [], [], []
        before = sum(sum(e.bytes_read().values()) for e in (engine, swe, workers))
        for _ in range(repeat):
            read.append(fold(engine, []))
            sweep.append(fold(swe, points))
            sweep_w.append(fold(workers, points))  # fold workers: each folds its share of the averages
            each.append([min(fold(engine, [p]), fold(swe, [p])) for p in points])
        done = sum(sum(e.bytes_read().values()) for e in (engine, swe, workers)) - before
        out["read_ratio"] = done / out["bytes"] / (repeat * (3 + 2 * len(points)))
        if args.get("cold"):  # each pass reads the inputs from storage: the page cache dropped before it
            files = [f for d in folders for f in checkpoint_files(d)]

            def cold(engine: Any, pts: list) -> float:
                drop_cache(files)
                left = resident_bytes(files)
                if left is not None:
                    out.setdefault("cold_resident", []).append(left)
                return fold(engine, pts)

            read_c, sweep_c, each_c = [], [], []
            for _ in range(repeat):
                read_c.append(cold(engine, []))
                sweep_c.append(cold(swe, points))
                each_c.append([min(cold(engine, [p]), cold(swe, [p])) for p in points])
            out["read_cold"], out["sweep_cold"] = statistics.median(read_c), statistics.median(sweep_c)
            out["each_cold"] = [statistics.median(col) for col in zip(*each_c)]
            out["each_total_cold"] = sum(out["each_cold"])
    out["sweep_workers"] = statistics.median(sweep_w)
    out["read"], out["sweep"] = statistics.median(read), statistics.median(sweep)
    out["each"] = [statistics.median(col) for col in zip(*each)]
    out["each_total"] = sum(out["each"])
    if args.get("write"):
        root = Path(args["out"])
        sw, ew = [], []
        for _ in range(repeat):
            t0 = time.perf_counter()
            with Engine(device=device, threads=cores) as swe:
                fold_grid(ckpts, points, root / "sweep", engine=swe, force=True)
            sw.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with Engine(device=device) as engine:
                for p in points:
                    a = grid_averages([p], ckpts, device=engine.device)
                    average_checkpoints(ckpts, a, root / "each" / p.name, engine=engine, force=True)
            ew.append(time.perf_counter() - t0)
        out["sweep_write"], out["each_write"] = statistics.median(sw), statistics.median(ew)
    out["seconds"] = out["sweep"]
    return out


def task_h2d(args: dict) -> dict:
    """Pinned host-to-device copy bandwidth (what the engine's staging path can at most move)."""
    import torch

    device = torch.device(args.get("device", "cuda"))
    nbytes = int(args.get("nbytes", 256 << 20))
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(int(args.get("repeat", 5))):
        t0 = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times), "bytes": nbytes}


def task_generate(args: dict) -> dict:
    """Write the synthetic input checkpoints (in a child, so the driver never holds tensors)."""
    from gen import generate, shape_for

    start = time.perf_counter()
    folders = generate(Path(args["root"]), int(args["size"]), int(args["k"]))
    return {"seconds": time.perf_counter() - start, "folders": [str(f) for f in folders],
            "shape": vars(shape_for(int(args["size"])))}


def task_check(args: dict) -> dict:
    """Compare output folders with the correctly rounded float64 mean of the inputs."""
    from reference import check_outputs

    start = time.perf_counter()
    checks = check_outputs([Path(f) for f in args["inputs"]], {k: Path(v) for k, v in args["outputs"].items()})
    return {"seconds": time.perf_counter() - start,
            "checks": {k: {**c.to_json(), "exact": c.exact(float(args["tolerance"]))} for k, c in checks.items()}}


def task_torch(args: dict) -> dict:
    """What torch this interpreter has, and whether CUDA works."""
    import torch

    return {"seconds": 0.0, "version": torch.__version__, "cuda": torch.cuda.is_available()}


TASKS: dict[str, Callable[[dict], dict]] = {
    "generate": task_generate, "check": task_check, "torch": task_torch, "baseline": task_baseline, "read": task_read, "write": task_write, "kernel": task_kernel,
    "fairseq": task_fairseq, "avgmodel": task_avgmodel, "oneshot": task_oneshot, "fold": task_fold, "h2d": task_h2d,
    "sweep": task_sweep,
}


def main() -> None:
    task, args = sys.argv[1], json.loads(sys.argv[2])
    result = TASKS[task](args)
    sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
