"""Benchmark of averaging across ranks on this machine: the one-shot (``torchrun -m ckptavg average``), or with
``--daemon`` the daemon (``torchrun -m ckptavg watch``) folding the same checkpoints one by one.

    python benchmarks/distributed.py [--size 200MB] [--count 5] [--ranks 1,2] [--cores-per-rank K] [--workdir DIR]
    python benchmarks/distributed.py --daemon --methods ema:2000,lawa:3 ...   # the daemon: every fold's own seconds,
                                                                             # RSS with the accumulators held

Generates ``--count`` synthetic Llama-layout bf16 checkpoints of ``--size`` each (``gen.py``; kept in
``--workdir`` for reuse), then prints a markdown table:

* the read bandwidth alone (one process, ``pread`` of every input byte into a reused buffer), with the
  page cache cold (dropped with ``posix_fadvise``) and warm;
* for each rank count: the wall time of the whole ``torchrun`` command, the time from the process
  group's start to the publish (rank 0's ``averaged ... in`` line), GB/s of input folded, that rate as
  a fraction of linear scaling from 1 rank, and each rank's peak RSS beside the fp32 accumulators of the
  whole model divided by the rank count (what a rank would hold if it kept its part of them all at once;
  the tensor-major schedule holds far less: one piece per average at a time).

The averages run with a warm page cache (the inputs are read once before each run). Every rank runs
``--threads`` arithmetic threads (default 1). The machine, its core count and the load from others are
printed with the table: on a small shared machine two ranks compete for the same cores.
``--cores-per-rank K`` runs each launch under ``taskset`` on ``RANKS x K`` CPUs, so that one rank cannot spread
over the cores that two ranks divide: the scaling of the split itself on a machine with few cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import drop_cache

RSS_MARK = "BENCH-RSS "


def child(argv: list[str]) -> None:
    """One rank: the ckptavg CLI, then its peak RSS on stdout."""
    from ckptavg.cli.main import main

    try:
        main(argv)
    finally:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        sys.stdout.flush()
        # one write() of the whole line: the ranks share torchrun's stdout
        os.write(1, f"\n{RSS_MARK}{json.dumps({'rank': int(os.environ.get('RANK', '0')), 'rss': rss})}\n".encode())


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]?B)", text.strip().upper())
    if not m:
        raise SystemExit(f"--size {text!r}: expected e.g. 200MB")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)])


def input_files(folders: list[Path]) -> list[Path]:
    return sorted(f for d in folders for f in d.glob("*.safetensors"))


def read_all(files: list[Path]) -> tuple[int, float]:
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            off = 0
            while True:
                n = os.preadv(fd, [view], off)
                if n == 0:
                    break
                off += n
            total += off
        finally:
            os.close(fd)
    return total, time.perf_counter() - t0


def launch(n: int, args: list[str], threads: int, cores_per_rank: int | None) -> tuple[list[str], dict[str, str]]:
    """The command and environment of ``torchrun`` on ``n`` ranks, each running the ckptavg CLI with ``args``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", str(Path(__file__)),
           "--child", *args, "--threads", str(threads)]
    if cores_per_rank:  # the whole launch on n x cores_per_rank CPUs: one rank gets no more cores than each of n
        cmd = ["taskset", "-c", f"0-{n * cores_per_rank - 1}", *cmd]
    return cmd, {**os.environ, "OMP_NUM_THREADS": str(threads)}


def rank_report(stdout: str, stderr: str) -> tuple[list[int], list[str]]:
    """Each rank's peak RSS (its child's last line) and the bytes rank 0 says each rank reads."""
    rss = {}
    for m in re.finditer(re.escape(RSS_MARK) + r"(\{[^}]*\})", stdout):
        d = json.loads(m.group(1))
        rss[d["rank"]] = d["rss"]
    shares = [m.group(1) for m in re.finditer(
        r"rank \d+ of \d+: \d+ of \d+ tensors(?: and a part of \d+ cut across ranks)?, ([\d.]+ [KMG]?B) of", stderr)]
    return [rss[k] for k in sorted(rss)], shares


def run_ranks(n: int, folders: list[Path], out: Path, methods: list[str], threads: int,
              cores_per_rank: int | None = None) -> dict:
    cmd, env = launch(n, ["average", *map(str, folders), *methods, "-o", str(out), "--force"], threads, cores_per_rank)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=1800)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{n} rank(s) failed:\n{r.stderr[-3000:]}")
    m = re.search(r"averaged .* in ([\d.]+) s", r.stderr)
    inner = float(m.group(1)) if m else wall
    rss, shares = rank_report(r.stdout, r.stderr)
    return {"wall": wall, "inner": inner, "rss": rss, "shares": shares}


def run_daemon_ranks(n: int, run: Path, out: Path, methods: list[str], threads: int, last_step: int,
                     cores_per_rank: int | None = None) -> dict:
    """``torchrun -m ckptavg watch RUN`` over the checkpoints already in RUN: every fold's own seconds (rank 0's
    ``folded step ... in S s`` lines, persisting and publishing not included), the time from start to the last
    fold, and each rank's peak RSS once it is stopped (SIGTERM, as systemd or Slurm stop it)."""
    import shutil
    import signal

    shutil.rmtree(out, ignore_errors=True)
    flags = [x for m in methods[1::2] for x in _watch_flag(m)]
    cmd, env = launch(n, ["watch", str(run), "-o", str(out), *flags, "--settle", "0.1", "--poll-interval", "0.2",
                          "--device", "cpu"], threads, cores_per_rank)
    status = out / ".ckptavg" / "status.json"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        while True:
            try:
                if json.loads(status.read_text()).get("last_folded_step") == last_step:
                    break
            except (OSError, ValueError):
                pass
            if proc.poll() is not None or time.perf_counter() - t0 > 1800:
                raise SystemExit(f"the {n}-rank daemon stopped or stalled:\n{proc.communicate()[1][-3000:]}")
            time.sleep(0.1)
        wall = time.perf_counter() - t0
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    folds = [float(m.group(1)) for m in re.finditer(r"folded step \d+: .* in ([\d.]+) s on", stderr)]
    rss, shares = rank_report(stdout, stderr)
    return {"wall": wall, "inner": sum(folds), "folds": len(folds), "rss": rss, "shares": shares}


def _watch_flag(method: str) -> list[str]:
    """``ema:2000`` as the watch command's flag (``--ema 2000``)."""
    name, _, value = method.partition(":")
    flag = {"swa": "--swa-start"}.get(name, f"--{name}")
    return [flag, value] if value else [flag]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="200MB", help="bytes per checkpoint")
    p.add_argument("--count", type=int, default=5, help="checkpoints")
    p.add_argument("--ranks", default="1,2", help="rank counts to run")
    p.add_argument("--threads", type=int, default=1, help="arithmetic threads per rank")
    p.add_argument("--methods", default="ema:2000", help="comma-separated --method values, all in one read")
    p.add_argument("--repeat", type=int, default=2, help="runs per rank count (the best is reported)")
    p.add_argument("--cores-per-rank", type=int, default=None,
                   help="run each launch on RANKS x this many CPUs (taskset), so that one rank does not spread over "
                        "the cores the other rank counts divide: the scaling of the split itself")
    p.add_argument("--daemon", action="store_true",
                   help="the daemon (`torchrun -m ckptavg watch`) folding the checkpoints one by one, instead of the "
                        "one-shot: GB/s over the folds' own seconds, peak RSS with every average's accumulators held")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "ckptavg-bench-dist")
    opts = p.parse_args(argv)

    from gen import generate

    size = parse_size(opts.size)
    inputs = opts.workdir / f"run-{opts.size}-{opts.count}"
    folders = sorted(inputs.glob("checkpoint-*"), key=lambda f: int(f.name.split("-")[1]))
    if len(folders) != opts.count:
        t0 = time.perf_counter()
        folders = generate(inputs, size, opts.count)
        print(f"generated {opts.count} x {opts.size} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    files = input_files(folders)
    drop_cache(files)
    total, cold = read_all(files)
    _, warm = read_all(files)
    model_bytes = total // opts.count  # bf16 bytes of one checkpoint
    methods = [x for m in opts.methods.split(",") for x in ("--method", m)]
    from ckptavg.averaging.methods import METHODS

    buffers = sum(len(METHODS[m.split(":")[0]].buffers) for m in opts.methods.split(","))  # LAWA keeps two
    accum = model_bytes * 2 * buffers  # fp32 accumulators of every average, whole model

    rows = []
    base = None
    for n in [int(x) for x in opts.ranks.split(",")]:
        best = None
        for _ in range(opts.repeat):
            read_all(files)  # warm
            if opts.daemon:
                got = run_daemon_ranks(n, inputs, opts.workdir / "out", methods, opts.threads,
                                       int(folders[-1].name.split("-")[1]), opts.cores_per_rank)
            else:
                got = run_ranks(n, folders, opts.workdir / "out", methods, opts.threads, opts.cores_per_rank)
            if best is None or got["inner"] < best["inner"]:
                best = got
        assert best is not None
        rate = total / best["inner"] / 1e9
        base = base or rate / n
        rows.append((n, best, rate, rate / (base * n)))

    load = os.getloadavg()
    print(f"Inputs: {opts.count} x {model_bytes / 1e6:.0f} MB bf16 ({total / 1e9:.2f} GB), methods {opts.methods}, "
          f"{opts.threads} arithmetic thread(s) per rank; {os.cpu_count()} CPU cores"
          + (f", each launch on {opts.cores_per_rank} CPU(s) per rank (taskset)" if opts.cores_per_rank else "")
          + ", load average "
          f"{load[0]:.1f} at the end.\n")
    print(f"Read alone (1 process, pread, 16 MiB buffer): cold page cache {total / cold / 1e9:.2f} GB/s, "
          f"warm {total / warm / 1e9:.2f} GB/s.\n")
    print(f"{'The daemon (torchrun -m ckptavg watch), the checkpoints folded one by one' if opts.daemon else 'The one-shot (torchrun -m ckptavg average)'}:\n")
    timed = "start → last fold | sum of the folds" if opts.daemon else "wall (torchrun) | rank 0: start → publish"
    per = "input bytes per rank, each checkpoint" if opts.daemon else "input bytes per rank"
    print(f"| ranks | {per} | {timed} | GB/s folded "
          "| fraction of linear | peak RSS per rank | fp32 accumulators / ranks |")
    print("|---|---|---|---|---|---|---|---|")
    for n, best, rate, frac in rows:
        rss = ", ".join(f"{r / 2**20:.0f} MiB" for r in best["rss"])
        print(f"| {n} | {', '.join(best['shares'])} | {best['wall']:.1f} s | {best['inner']:.1f} s | {rate:.2f} | {frac:.2f} | {rss} "
              f"| {accum / n / 2**20:.0f} MiB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
