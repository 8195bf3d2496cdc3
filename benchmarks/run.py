"""ckptavg benchmark suite: speed and memory against the hardware floor and against peers.

    python benchmarks/run.py --size 1GB --k 5                 # the README table
    python benchmarks/run.py --small                          # CI mode: 64 MB, one repetition
    python benchmarks/run.py --size 4GB --k 5 --device cuda --json out.json --markdown out.md

One run generates K synthetic Llama-layout checkpoints (bf16, sharded, with
``model.safetensors.index.json`` and ``config.json``) in a work folder, then measures
on those same files, each in its own child process (peak RSS from ``os.wait4``):

* limits: the read floor (sequential ``readinto`` of every input byte), the write floor
  (one output's bytes, fsynced), the kernel bound (fp32 fold arithmetic on data in memory),
  and with ``--device cuda`` pinned host-to-device bandwidth;
* peers: fairseq's ``scripts/average_checkpoints.py`` method (re-implemented over
  safetensors; bf16 sums as fairseq does, and an fp32 variant), mergekit ``linear`` (when
  importable), and ``torch.optim.swa_utils.AveragedModel`` EMA inside a training loop;
* ckptavg: ``ckptavg average`` end to end, the same through the API in-process, the
  daemon's ``Engine.fold`` into EMA + LAWA + SWA, and LAWA's fold cost at windows 2, 5, 20.

Warm runs follow a full read of the inputs; cold runs follow ``posix_fadvise(DONTNEED)``
on every input file (checked with ``fincore`` when it is installed). Every averaged
output is compared with a correctly rounded float64 mean. The table reports medians
over ``--repeat`` runs, ratios to the floor and to each peer, and the issue's targets
as pass/fail.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import (
    RESULT_MARK,
    checkpoint_files,
    drop_cache,
    files_bytes,
    resident_bytes,
)

GIB = 2**30
ALL_PARTS = ("floor", "write", "kernel", "fairseq", "mergekit", "avgmodel", "cli", "oneshot", "fold", "lawa", "sweep",
             "h2d")
LAWA_WINDOWS = (2, 5, 20)
ONESHOT_ROWS = ("cli", "oneshot")  # the rows compared with the peers
FOLD_SAMPLES = 3  # timed folds per fold child, at least (a fold is short; one sample is too noisy)
DAEMON_WINDOW = 5
EXACT_TOLERANCE = 1e-4  # fraction of elements allowed one bf16 ulp off (fp32 accumulation rounds twice)
KERNEL_CAP = 512 << 20  # the kernel bound is measured on at most this many checkpoint bytes


# -- child processes -----------------------------------------------------------------------
@dataclass
class Run:
    """One child process: its own timing, its wall time seen from outside, its peak RSS."""

    seconds: float
    wall: float
    rss: int
    result: dict


class ChildFailed(RuntimeError):
    pass


GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


def rss_source() -> str:
    if GNU_TIME:
        return "GNU time %M (the command runs as a child of /usr/bin/time, a small process)"
    return "os.wait4 rusage (Linux counts the spawning driver's pre-exec RSS, ~30 MB, as a floor)"


def spawn(cmd: list[str], *, log: Path, env: dict | None = None) -> tuple[float, int, str]:
    """Run ``cmd`` to the end; return (wall seconds, peak RSS bytes, output). Raises on failure.

    Peak RSS: ``os.wait4``'s ``ru_maxrss`` would include the high-water mark of the process
    that spawned the child (the kernel carries it over ``exec``), so the command runs under
    GNU ``time -f %M`` when it is installed, whose own footprint is a few MB.
    """
    rss_file = log.with_suffix(".rss")
    full = [GNU_TIME, "-f", "%M", "-o", str(rss_file), *cmd] if GNU_TIME else cmd
    with open(log, "w+") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen consistent
        out.seek(0)
        text = out.read()
    if proc.returncode != 0:
        raise ChildFailed(f"{' '.join(cmd[:4])} ... exited with {proc.returncode}:\n{text[-3000:]}")
    rss = usage.ru_maxrss * 1024  # Linux reports ru_maxrss in KiB
    if GNU_TIME:
        lines = rss_file.read_text().split()
        rss = int(lines[-1]) * 1024 if lines and lines[-1].isdigit() else rss
    return wall, rss, text


def run_task(task: str, args: dict, *, logdir: Path) -> Run:
    cmd = [sys.executable, str(HERE / "child.py"), task, json.dumps(args)]
    wall, rss, text = spawn(cmd, log=logdir / f"{task}.log")
    lines = [ln for ln in text.splitlines() if ln.startswith(RESULT_MARK)]
    if not lines:
        raise ChildFailed(f"{task}: no result line in its output:\n{text[-3000:]}")
    result = json.loads(lines[-1][len(RESULT_MARK):])
    return Run(seconds=float(result["seconds"]), wall=wall, rss=rss, result=result)


def run_command(cmd: list[str], *, logdir: Path, name: str) -> Run:
    wall, rss, _ = spawn(cmd, log=logdir / f"{name}.log")
    return Run(seconds=wall, wall=wall, rss=rss, result={})


# -- page cache --------------------------------------------------------------------------
def prewarm(files: list[Path]) -> None:
    buf = bytearray(16 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def make_cold(files: list[Path]) -> int | None:
    """Evict the inputs; return how many of their bytes are still cached (None: unknown)."""
    drop_cache(files)
    return resident_bytes(files)


# -- results -----------------------------------------------------------------------------
@dataclass
class Row:
    """One line of the table."""

    key: str
    label: str
    group: str  # limit | peer | ckptavg
    bytes: int = 0  # checkpoint bytes the operation consumes (GB/s is computed on these)
    floor_bytes: int = 0  # bytes a perfect implementation must read (for the ratio to the floor)
    warm: list[float] = field(default_factory=list)  # timed region, seconds
    cold: list[float] = field(default_factory=list)
    wall_warm: list[float] = field(default_factory=list)  # whole child process, seconds
    wall_cold: list[float] = field(default_factory=list)
    rss: int = 0
    note: str = ""
    skipped: str = ""
    check: dict | None = None
    extra: dict = field(default_factory=dict)

    def t(self, mode: str) -> float | None:
        v = self.warm if mode == "warm" else self.cold
        return statistics.median(v) if v else None

    def wall(self, mode: str) -> float | None:
        v = self.wall_warm if mode == "warm" else self.wall_cold
        return statistics.median(v) if v else None

    def gbps(self, mode: str) -> float | None:
        t = self.t(mode)
        return self.bytes / t / 1e9 if t and self.bytes else None

    def to_json(self) -> dict:
        out = {k: getattr(self, k) for k in ("key", "label", "group", "bytes", "floor_bytes", "warm", "cold",
                                             "wall_warm", "wall_cold", "rss", "note", "skipped", "check", "extra")}
        for mode in ("warm", "cold"):
            out[f"{mode}_seconds"] = self.t(mode)
            out[f"{mode}_gbps"] = self.gbps(mode)
            out[f"{mode}_wall"] = self.wall(mode)
        return out


class Bench:
    """Generates the inputs, runs every measurement, and derives ratios and targets."""

    def __init__(self, opts: argparse.Namespace, workdir: Path) -> None:
        self.o = opts
        self.work = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.rows: dict[str, Row] = {}
        self.notes: list[str] = []
        self.cold_residency: list[int | None] = []
        self.warm_residency: list[float | None] = []  # fraction of input bytes cached before a warm run
        self.plan: list[tuple[Row, Callable[[], None], bool]] = []
        self.folders: list[Path] = []
        self.files: list[Path] = []
        self.ckpt_bytes = 0

    # -- helpers ---------------------------------------------------------------------------
    def want(self, part: str) -> bool:
        return part in self.o.only

    def say(self, text: str) -> None:
        if not self.o.quiet:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    def row(self, key: str, label: str, group: str, **kw: Any) -> Row:
        r = self.rows.get(key)
        if r is None:
            r = self.rows[key] = Row(key, label, group, **kw)
        return r

    def fits(self, row: Row, need: int, *, on_device: bool = False) -> bool:
        """Skip a measurement that would not fit in memory (says so in the row). ``on_device``:
        the accumulators live on the GPU with ``--device cuda``, so the host needs little."""
        if on_device and self.o.device == "cuda":
            need = 2 * GIB
        avail = _mem_available()
        if avail is not None and need > 0.9 * avail:
            row.skipped = f"needs ~{need / GIB:.1f} GiB of memory, {avail / GIB:.1f} GiB available"
            self.say(f"skip {row.label}: {row.skipped}")
            return False
        return True

    def both(self, row: Row, go: Callable[[], Run], *, cold: bool = True) -> None:
        """One round of ``go``: warm (after a full read of the inputs) and, with ``cold``, cold."""
        prewarm(self.files)
        self.warm_residency.append(_fraction(resident_bytes(self.files), files_bytes(self.files)))
        r = go()
        row.warm.append(r.seconds)
        row.wall_warm.append(r.wall)
        row.rss = max(row.rss, r.rss)
        row.extra.update(r.result)
        if cold and self.o.cold:
            self.cold_residency.append(make_cold(self.files))
            r = go()
            row.cold.append(r.seconds)
            row.wall_cold.append(r.wall)
            row.rss = max(row.rss, r.rss)

    def each_round(self, row: Row, fn: Callable[[], None]) -> None:
        """Plan ``fn`` (one warm + cold round) for every repetition. Rounds are interleaved across
        methods, so a burst of load from elsewhere on the machine hits them all alike."""
        self.plan.append((row, fn, True))

    def single(self, row: Row, fn: Callable[[], None]) -> None:
        """Plan ``fn`` once (it repeats internally, or needs no repetition)."""
        self.plan.append((row, fn, False))

    def execute(self) -> None:
        """Run the plan: round 1 of the repeated measurements, then the single ones, then the
        remaining rounds."""
        rounds = [(row, fn) for row, fn, rep in self.plan if rep]
        singles = [(row, fn) for row, fn, rep in self.plan if not rep]
        for n in range(self.o.repeat):
            for row, fn in rounds:
                if not row.skipped:
                    self.say(f"{row.label} (round {n + 1} of {self.o.repeat})")
                    self._guard(row, fn)
            if n == 0:
                for row, fn in singles:
                    if not row.skipped:
                        self.say(row.label)
                        self._guard(row, fn)
        self.plan.clear()

    def _guard(self, row: Row, fn: Callable[[], None]) -> None:
        try:
            fn()
        except ChildFailed as e:
            row.skipped = "FAILED: " + str(e).splitlines()[0]
            row.extra["error"] = str(e)
            self.say(f"{row.label} failed: {e}")

    # -- the run -----------------------------------------------------------------------------
    def generate(self) -> None:
        self.say(f"generating {self.o.k} checkpoints of ~{self.o.size / 1e9:.2f} GB in {self.work}")
        r = run_task("generate", {"root": str(self.work / "run"), "size": self.o.size, "k": self.o.k},
                     logdir=self.logs)
        self.folders = [Path(f) for f in r.result["folders"]]
        self.shape = r.result["shape"]
        self.files = [f for d in self.folders for f in checkpoint_files(d)]
        self.ckpt_bytes = files_bytes(checkpoint_files(self.folders[0]))
        self.say(f"generated {files_bytes(self.files) / 1e9:.2f} GB ({self.shape}) in {r.seconds:.1f} s")

    def measure(self) -> None:
        """Plan every measurement (see :meth:`execute` for the order), then run them."""
        k, s = self.o.k, self.ckpt_bytes
        total = files_bytes(self.files)
        folders = [str(f) for f in self.folders]
        dev = self.o.device
        out = self.work / "out"
        out.mkdir(exist_ok=True)
        task = partial(run_task, logdir=self.logs)

        base = self.row("baseline", "python + torch + ckptavg imported", "limit")
        self.single(base, partial(self._once, base, "baseline", {}))
        if self.want("floor"):
            r = self.row("floor", f"read floor: sequential readinto, {k} ckpts", "limit", bytes=total, floor_bytes=total)
            self.each_round(r, partial(self.both, r, partial(task, "read", {"files": [str(f) for f in self.files]})))
        if self.want("write"):
            r = self.row("write", "write floor: one output, fsync", "limit", bytes=s)
            go = partial(task, "write", {"path": str(self.work / "write.bin"), "nbytes": s})
            self.each_round(r, partial(self.both, r, go, cold=False))
        if dev == "cuda" and self.want("h2d"):
            r = self.row("h2d", "pinned host-to-device copy", "limit", bytes=256 << 20)
            self.single(r, partial(self._once, r, "h2d", {"device": "cuda", "nbytes": 256 << 20}))
        if self.want("kernel"):
            cap = min(s, KERNEL_CAP)
            r = self.row("kernel1", f"kernel bound: fp32 uniform, {k} folds + divide", "limit")
            if self.fits(r, 3 * cap + GIB // 2, on_device=True):
                self.single(r, partial(self._once, r, "kernel", {"folders": folders, "mode": "uniform", "k": k,
                                                                 "cap": cap, "device": dev, "repeat": self.o.repeat}))
            r = self.row("kernel3", "kernel bound: fp32 fold into EMA+LAWA+SWA", "limit")
            if self.fits(r, 10 * cap + GIB // 2, on_device=True):
                self.single(r, partial(self._once, r, "kernel", {"folders": folders, "mode": "daemon", "cap": cap,
                                                                 "device": dev, "repeat": self.o.repeat}))
        if self.want("fairseq"):
            for accum in ("bf16", "fp32"):
                r = self.row(f"fairseq-{accum}", f"fairseq average_checkpoints ({accum} sum)", "peer",
                             bytes=k * s, floor_bytes=k * s)
                r.note = "re-implementation over safetensors" + (", bf16 as fairseq sums it" if accum == "bf16" else "")
                target = out / f"fairseq-{accum}"
                if self.fits(r, (4 if accum == "fp32" else 2) * s + GIB // 2):
                    go = partial(task, "fairseq", {"folders": folders, "out": str(target), "accum": accum})
                    self.each_round(r, partial(self.both, r, go))
                    r.extra["output"] = str(target)
        if self.want("mergekit"):
            r = self.row("mergekit", "mergekit linear (equal weights)", "peer", bytes=k * s, floor_bytes=k * s)
            exe = shutil.which("mergekit-yaml")
            if importlib.util.find_spec("mergekit") is None or exe is None:
                r.skipped = "mergekit is not importable here: skipped"
            else:
                cfg = self.work / "mergekit.yml"
                models = "\n".join(f"  - model: {f}\n    parameters:\n      weight: 1.0" for f in folders)
                cfg.write_text(f"merge_method: linear\ndtype: bfloat16\nparameters:\n  normalize: true\n"
                               f"models:\n{models}\n")
                target = out / "mergekit"
                cmd = [exe, str(cfg), str(target)] + (["--cuda"] if dev == "cuda" else [])
                go = partial(_clean_then, target, partial(run_command, cmd, logdir=self.logs, name="mergekit"))
                self.each_round(r, partial(self.both, r, go))
                r.extra["output"] = str(target)
                r.note = "process wall time (mergekit-yaml CLI)"
        if self.want("avgmodel"):
            r = self.row("avgmodel", "AveragedModel EMA in the training loop", "peer")
            args = {"hidden": 256, "layers": 4, "batch": 32, "steps": 5 if self.o.small or self.o.size < 2**28 else 20}
            self.single(r, partial(self._once, r, "avgmodel", args))
        if self.want("cli"):
            r = self.row("cli", "ckptavg average (CLI, end to end)", "ckptavg", bytes=k * s, floor_bytes=k * s)
            r.note = "process wall: start, read, average, write, fsync, rename"
            target = out / "ckptavg-cli"
            cmd = [*_ckptavg_exe(), "--log-level", "warning", "average", *folders, "-o", str(target), "--force",
                   "--device", dev, "--no-progress"]
            self.each_round(r, partial(self.both, r, partial(run_command, cmd, logdir=self.logs, name="cli")))
            r.extra["output"] = str(target)
        if self.want("oneshot"):
            r = self.row("oneshot", "ckptavg one-shot (API, in-process)", "ckptavg", bytes=k * s, floor_bytes=k * s)
            r.note = "average_checkpoints: open, read, average, write, fsync; no interpreter start"
            target = out / "ckptavg-api"
            go = partial(task, "oneshot", {"folders": folders, "out": str(target), "device": dev})
            self.each_round(r, partial(self.both, r, go))
            r.extra["output"] = str(target)
        if self.want("fold"):
            r = self.row("fold", f"ckptavg daemon fold: EMA + LAWA-{DAEMON_WINDOW} + SWA", "ckptavg",
                         bytes=s, floor_bytes=2 * s)
            r.note = "Engine.fold of one checkpoint, accumulators existing; reads it and LAWA's leaving member"
            if self.fits(r, 8 * s + GIB, on_device=True):
                self.single(r, partial(self._fold, r, "daemon", DAEMON_WINDOW))
        if self.want("lawa"):
            for w in LAWA_WINDOWS:
                r = self.row(f"lawa-{w}", f"ckptavg LAWA fold, window {w}", "ckptavg", bytes=s, floor_bytes=2 * s)
                if self.fits(r, 4 * s + GIB, on_device=True):
                    self.single(r, partial(self._fold, r, "lawa", w))
        if self.want("sweep"):
            r = self.row("sweep", "ckptavg sweep: K averages from one read (fold)", "ckptavg", bytes=total, floor_bytes=total)
            r.note = "Engine.average into EMA x4, LAWA x3, SWA x2, newest-N x3 at once; outputs discarded"
            self.single(r, partial(self._sweep, r))
        self.execute()
        for key in ("kernel1", "kernel3"):
            row = self.rows.get(key)
            if row and row.extra.get("sample_bytes") and row.extra["sample_bytes"] < 0.99 * s:
                row.note = f"measured on the first {row.extra['sample_bytes'] / 1e6:.0f} MB of a checkpoint"

    def _once(self, row: Row, task: str, args: dict) -> None:
        """One warm run of a measurement that does not read the inputs from disk."""
        r = run_task(task, args, logdir=self.logs)
        row.warm.append(r.seconds)
        row.wall_warm.append(r.wall)
        row.rss = max(row.rss, r.rss)
        row.extra.update(r.result)
        if "bytes" in r.result:
            row.bytes = int(r.result["bytes"])
        if task == "kernel":  # compared with reading the same bytes (a fold into LAWA also reads the leaver)
            row.floor_bytes = row.bytes * (2 if args["mode"] == "daemon" else 1)

    def _fold(self, row: Row, methods: str, window: int) -> None:
        prewarm(self.files)
        r = run_task("fold", {"folders": [str(f) for f in self.folders], "methods": methods, "window": window,
                              "repeat": max(self.o.repeat, FOLD_SAMPLES), "cold": self.o.cold,
                              "device": self.o.device}, logdir=self.logs)
        row.warm += r.result["warm"]
        row.cold += r.result["cold"]
        row.rss = r.rss
        row.extra.update(r.result)
        self.cold_residency += r.result.get("cold_resident", [])
        self.warm_residency += [_fraction(b, files_bytes(self.files)) for b in r.result.get("warm_resident", [])]

    def _sweep(self, row: Row) -> None:
        """The sweep against the same averages one by one, the engine's read pass alone, and (64 MB
        checkpoints or less) both again writing their model folders: one child, page cache warm."""
        prewarm(self.files)
        write = self.ckpt_bytes <= 64_000_000 * 1.1
        r = run_task("sweep", {"folders": [str(f) for f in self.folders], "repeat": self.o.repeat,
                               "device": self.o.device, "write": write, "out": str(self.work / "out" / "sweep"),
                               "cold": self.o.cold}, logdir=self.logs)
        e, total, n = r.result, files_bytes(self.files), r.result["k_averages"]
        row.label = f"ckptavg sweep: {n} averages from one read (fold, {e['threads']} arithmetic threads)"
        row.warm.append(e["sweep"])
        row.rss = r.rss
        row.extra.update(e)
        self.cold_residency += e.get("cold_resident", [])
        if "sweep_cold" in e:
            row.cold.append(e["sweep_cold"])
        workers = self.row("sweep-workers", f"ckptavg sweep --fold-workers {e['threads']}: {n} averages from one "
                           "read (fold)", "ckptavg", bytes=total, floor_bytes=total)
        workers.warm.append(e["sweep_workers"])
        read = self.row("sweep-read", "ckptavg engine read pass alone (no average)", "ckptavg", bytes=total,
                        floor_bytes=total)
        read.warm.append(e["read"])
        if "read_cold" in e:
            read.cold.append(e["read_cold"])
        each = self.row("sweep-each", f"the same {n} averages one by one (fold; each at its faster of "
                        f"{e['average_threads']} and {e['threads']} threads)", "ckptavg", bytes=n * total,
                        floor_bytes=n * total)
        each.warm.append(e["each_total"])
        if "each_total_cold" in e:
            each.cold.append(e["each_total_cold"])
        if write:
            sw = self.row("sweep-write", f"ckptavg sweep: {n} averages from one read, written", "ckptavg",
                          bytes=total, floor_bytes=total)
            sw.warm.append(e["sweep_write"])
            ew = self.row("sweep-each-write", f"the same {n} averages one by one, written", "ckptavg",
                          bytes=n * total, floor_bytes=n * total)
            ew.warm.append(e["each_write"])

    # -- checks ----------------------------------------------------------------------------------
    def check(self) -> None:
        outputs = {key: r.extra["output"] for key, r in self.rows.items()
                   if r.extra.get("output") and not r.skipped and Path(r.extra["output"]).exists()}
        if not outputs:
            return
        self.say(f"checking {len(outputs)} output(s) against the float64 mean")
        r = run_task("check", {"inputs": [str(f) for f in self.folders], "outputs": outputs,
                               "tolerance": EXACT_TOLERANCE}, logdir=self.logs)
        for key, c in r.result["checks"].items():
            self.rows[key].check = c
        self.say(f"checked in {r.seconds:.1f} s")

    # -- derived ---------------------------------------------------------------------------------
    def bound_gbps(self, mode: str) -> float | None:
        """What reading can at most deliver: the read floor (CUDA: the lower of it and H2D)."""
        f = self.rows.get("floor")
        g = f.gbps(mode) if f else None
        if self.o.device == "cuda" and "h2d" in self.rows:
            h = self.rows["h2d"].gbps("warm")
            g = min(x for x in (g, h) if x is not None) if (g or h) else None
        return g

    def ratio_to_floor(self, row: Row, mode: str) -> float | None:
        t, g = row.t(mode), self.bound_gbps(mode)
        if t is None or not g or not row.floor_bytes:
            return None
        return t / (row.floor_bytes / g / 1e9)

    def speedups(self, row: Row, mode: str) -> dict[str, float | None]:
        """How many times faster this row is than each peer (process wall for the CLI row,
        the timed region for the in-process row)."""
        out: dict[str, float | None] = {}
        for peer in ("fairseq-bf16", "fairseq-fp32", "mergekit"):
            p = self.rows.get(peer)
            if p is None or p.skipped:
                out[peer] = None
                continue
            if row.key == "cli":
                a, b = p.wall(mode), row.wall(mode)
            else:
                a, b = p.t(mode), row.t(mode)
            out[peer] = a / b if a and b else None
        return out

    def targets(self) -> list[dict]:
        """The issue's targets, each with its measured value and pass/fail (None: not measured)."""
        rows, out = self.rows, []

        def add(name: str, value: str, ok: bool | None, why: str = "") -> None:
            out.append({"target": name, "measured": value, "pass": ok, "note": why})

        cli = rows.get("cli")
        for peer, need in (("mergekit", 3.0), ("fairseq-fp32", 2.0)):
            if cli is None or cli.skipped:
                add(f"one-shot >= {need:g}x faster than {peer}", "-", None, "ckptavg CLI not measured")
                continue
            p = rows.get(peer)
            if p is None or p.skipped:
                add(f"one-shot >= {need:g}x faster than {peer}", "-", None, p.skipped if p else "not measured")
                continue
            sp = {m: self.speedups(cli, m)[peer] for m in ("warm", "cold")}
            vals = [v for v in sp.values() if v is not None]
            add(f"one-shot >= {need:g}x faster than {peer}", " / ".join(f"{m} {v:.2f}x" for m, v in sp.items() if v),
                all(v >= need for v in vals) if vals else None, "process wall, CLI vs peer")
        limit = 1.2 * GIB if self.o.size > 2e9 else 1.0 * GIB
        if cli and cli.rss and not cli.skipped:
            add(f"one-shot peak RSS <= {limit / GIB:.1f} GiB", f"{cli.rss / GIB:.2f} GiB", cli.rss <= limit,
                f"baseline interpreter with torch: {rows['baseline'].rss / GIB:.2f} GiB" if rows["baseline"].rss else "")
        exact = [(k, rows[k].check) for k in ("cli", "oneshot") if k in rows and rows[k].check]
        if exact:
            add("one-shot output exact", ", ".join(f"{k}: {c['mismatch_fraction']:.1e} off, max {c['max_ulps']} ulp"
                                                  for k, c in exact),
                all(c["exact"] for _, c in exact), f"<= 1 ulp and <= {EXACT_TOLERANCE:g} of elements off")
        one, fl, wr = rows.get("oneshot"), rows.get("floor"), rows.get("write")
        if one and fl and wr and one.warm and fl.warm and wr.warm:
            vals = {}
            for m in ("warm", "cold"):
                if one.t(m) is None or fl.gbps(m) is None:
                    continue
                bound = one.floor_bytes / self.bound_gbps(m) / 1e9 + wr.t("warm")  # type: ignore[operator]
                vals[m] = one.t(m) / bound  # type: ignore[operator]
            add("in-process time <= 1.5x (read floor + write floor)",
                " / ".join(f"{m} {v:.2f}x" for m, v in vals.items()), all(v <= 1.5 for v in vals.values()))
        fold, k3 = rows.get("fold"), rows.get("kernel3")
        if fold and k3 and fold.warm and k3.warm and fl and fl.warm:
            vals = {}
            kernel_t = fold.bytes / k3.gbps("warm") / 1e9  # type: ignore[operator]
            for m in ("warm", "cold"):
                if fold.t(m) is None or self.bound_gbps(m) is None:
                    continue
                bound = fold.floor_bytes / self.bound_gbps(m) / 1e9 + kernel_t  # type: ignore[operator]
                vals[m] = fold.t(m) / bound  # type: ignore[operator]
            add("daemon fold <= 1.3x (read + fold bound)", " / ".join(f"{m} {v:.2f}x" for m, v in vals.items()),
                all(v <= 1.3 for v in vals.values()), "bound: read floor of the bytes read + kernel time")
        lawa = [rows[f"lawa-{w}"] for w in LAWA_WINDOWS if f"lawa-{w}" in rows and rows[f"lawa-{w}"].warm]
        if len(lawa) == len(LAWA_WINDOWS):
            vals = {}
            for m in ("warm", "cold"):
                ts = [r.t(m) for r in lawa]
                if all(t is not None for t in ts):
                    vals[m] = max(ts) / min(ts)  # type: ignore[type-var,operator]
            add("LAWA fold cost flat in window (2, 5, 20)", " / ".join(f"{m} max/min {v:.2f}" for m, v in vals.items()),
                all(v <= 1.25 for v in vals.values()), "flat: max/min <= 1.25 (the machine's noise)")
        sw = rows.get("sweep")
        if sw and sw.warm and sw.extra.get("each"):
            e, n = sw.extra, sw.extra["k_averages"]
            per_avg = sum(max(0.0, t - e["read"]) for t in e["each"])  # each average's fold, its read taken out
            bound = e["read"] + per_avg
            add(f"sweep <= read + K x per-average fold (K = {n})",
                f"warm {e['sweep'] / bound:.2f}x ({e['sweep']:.3f} s vs {e['read']:.3f} + {per_avg:.3f} s)",
                e["sweep"] <= bound, "in one process, page cache warm; outputs discarded")
            if "sweep_cold" in e:
                add(f"sweep >= 4x faster than the {n} averages one by one, inputs read from storage",
                    f"cold {e['each_total_cold'] / e['sweep_cold']:.2f}x ({e['sweep_cold']:.3f} s vs "
                    f"{e['each_total_cold']:.3f} s)", e["each_total_cold"] / e["sweep_cold"] >= 4,
                    f"page cache dropped before every pass; reading alone {e['read_cold']:.3f} s")
            add(f"sweep >= 4x faster than the {n} averages one by one, page cache warm",
                f"warm {e['each_total'] / e['sweep']:.2f}x"
                + (f"; written: {e['each_write'] / e['sweep_write']:.2f}x" if e.get("sweep_write") else ""),
                e["each_total"] / e["sweep"] >= 4, f"{e['threads']} arithmetic threads (--fold-workers "
                f"{e['threads']}: {e['each_total'] / e['sweep_workers']:.2f}x); each checkpoint byte read {e['read_ratio']:.2f}x "
                "in every pass; warm, the averages' own arithmetic is most of the time")
        return out

    def summary(self) -> dict:
        cold_note = "not measured (--no-cold)"
        if self.o.cold:
            known = [r for r in self.cold_residency if r is not None]
            left = max(known) if known else None
            cold_note = ("posix_fadvise(POSIX_FADV_DONTNEED) on every input file before each cold run"
                         + (f"; fincore: at most {left / 1e6:.1f} MB of inputs still cached" if left is not None
                            else "; residency not verified (no fincore)"))
        known_warm = [f for f in self.warm_residency if f is not None]
        warm_note = ("inputs fully read just before each warm run" + (
            f"; fincore: at least {100 * min(known_warm):.0f}% of input bytes cached at the start of every warm run"
            if known_warm else ""))
        return {
            "warm": warm_note,
            "size_bytes": self.ckpt_bytes, "k": self.o.k, "repeat": self.o.repeat, "device": self.o.device,
            "shape": getattr(self, "shape", None), "peak_rss": rss_source(),
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                        "torch": _torch_version(), "load_avg": os.getloadavg()},
            "cold": cold_note, "notes": self.notes,
            "rows": [r.to_json() | {"ratio_floor_warm": self.ratio_to_floor(r, "warm"),
                                    "ratio_floor_cold": self.ratio_to_floor(r, "cold"),
                                    "speedup_warm": self.speedups(r, "warm") if r.key in ONESHOT_ROWS else None,
                                    "speedup_cold": self.speedups(r, "cold") if r.key in ONESHOT_ROWS else None}
                     for r in self.rows.values()],
            "targets": self.targets(),
        }


def _fraction(part: int | None, whole: int) -> float | None:
    return None if part is None or not whole else part / whole


def _clean_then(path: Path, fn: Callable[[], Run]) -> Run:
    shutil.rmtree(path, ignore_errors=True)
    return fn()


def _ckptavg_exe() -> list[str]:
    exe = shutil.which("ckptavg")
    return [exe] if exe else [sys.executable, "-c", "import sys; from ckptavg.cli.main import main; main()"]


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _torch_version() -> str:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "-"


def parse_size(text: str) -> int:
    """``64MB`` -> 64_000_000, ``1GiB`` -> 2**30 (the same units as ``ckptavg``'s options)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 64MB, 1GB or 1GiB")
    unit = (m.group(2) or "b").lower()
    scale = 1 if unit == "b" else (1024 if "i" in unit else 1000) ** ("kmgt".index(unit[0]) + 1)
    return int(float(m.group(1)) * scale)


# -- rendering ------------------------------------------------------------------------------
COLUMNS = ("method", "warm s", "warm GB/s", "cold s", "cold GB/s", "proc s", "peak RSS", "x floor w/c",
           "vs fairseq-bf16", "vs fairseq-fp32", "vs mergekit", "exact")


def _f(v: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def table_rows(summary: dict) -> list[list[str]]:
    out = []
    for r in summary["rows"]:
        if r["skipped"]:
            out.append([r["label"], *(["-"] * (len(COLUMNS) - 2)), r["skipped"]])
            continue
        ratio = f"{_f(r['ratio_floor_warm'])}/{_f(r['ratio_floor_cold'])}" if r["floor_bytes"] else "-"
        sp = []
        for peer in ("fairseq-bf16", "fairseq-fp32", "mergekit"):
            w = (r["speedup_warm"] or {}).get(peer)
            c = (r["speedup_cold"] or {}).get(peer)
            sp.append("-" if w is None and c is None else f"{_f(w)}x/{_f(c)}x")
        chk = r["check"]
        exact = "-" if not chk else (f"{'yes' if chk['exact'] else 'NO'} ({chk['mismatch_fraction']:.1e} off, "
                                     f"max {chk['max_ulps']} ulp, err {chk['max_abs_err']:.1e})")
        warm_s = r["warm_seconds"]
        if r["key"] == "avgmodel" and r["extra"].get("step_plain"):
            e = r["extra"]
            out.append([r["label"], f"{e['step_ema'] * 1e3:.1f} ms/step", "-", "-", "-", _f(r["warm_wall"], "{:.1f}"),
                        _rss(r["rss"]), f"{e['step_ema'] / e['step_plain']:.2f}x step", "-", "-", "-",
                        (f"update {e['update'] * 1e3:.1f} ms vs step {e['step_plain'] * 1e3:.1f} ms; "
                        f"+{e['extra_rss'] / 1e6:.0f} MB RSS for {e['param_bytes'] / 1e6:.1f} MB of params")])
            continue
        out.append([r["label"], _f(warm_s, "{:.3f}"), _f(r["warm_gbps"]), _f(r["cold_seconds"], "{:.3f}"),
                    _f(r["cold_gbps"]), _f(r["warm_wall"], "{:.1f}"), _rss(r["rss"]), ratio, *sp, exact])
    return out


def _rss(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n else "-"


def render_text(summary: dict) -> None:
    rows = table_rows(summary)
    title = (f"ckptavg benchmarks: {summary['k']} x {summary['size_bytes'] / 1e9:.2f} GB bf16 Llama-layout "
             f"checkpoints, device {summary['device']}, median of {summary['repeat']}")
    try:
        from rich.console import Console
        from rich.table import Table

        console = Console(width=250)
        t = Table(title=title)
        for c in COLUMNS:
            t.add_column(c, overflow="fold")
        for r in rows:
            t.add_row(*r)
        console.print(t)
        tt = Table(title="targets (from the issue)")
        for c in ("target", "measured", "pass", "note"):
            tt.add_column(c, overflow="fold")
        for tg in summary["targets"]:
            tt.add_row(tg["target"], tg["measured"], _pass(tg["pass"]), tg["note"])
        console.print(tt)
    except ImportError:
        print(title)
        for r in [list(COLUMNS), *rows]:
            print(" | ".join(r))
        for tg in summary["targets"]:
            print(f"{_pass(tg['pass']):5} {tg['target']}: {tg['measured']} {tg['note']}")
    print(f"warm cache: {summary['warm']}")
    print(f"cold cache: {summary['cold']}")
    print(f"peak RSS: {summary['peak_rss']}")
    m = summary["machine"]
    print(f"machine: {m['cpus']} CPUs, load average {m['load_avg'][0]:.1f}, torch {m['torch']}, {m['platform']}")
    for n in summary["notes"]:
        print(f"note: {n}")


def _pass(v: bool | None) -> str:
    return "n/a" if v is None else ("PASS" if v else "FAIL")


def render_markdown(summary: dict) -> str:
    rows = table_rows(summary)
    lines = [(f"**{summary['k']} x {summary['size_bytes'] / 1e9:.2f} GB bf16 checkpoints, device "
             f"{summary['device']}, median of {summary['repeat']}**"), "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
    lines += ["", "| target | measured | pass | note |", "|---|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {_pass(t['pass'])} | {t['note']} |" for t in summary["targets"]]
    m = summary["machine"]
    lines += ["", f"Warm cache: {summary['warm']}.", f"Cold cache: {summary['cold']}.", f"Peak RSS: {summary['peak_rss']}.", (f"Machine: {m['cpus']} CPUs, load average "
              f"{m['load_avg'][0]:.1f}, torch {m['torch']}.")]
    return "\n".join(lines) + "\n"


# -- command line ------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", help="bytes per checkpoint, e.g. 64MB, 1GB, 4GB (default 1GB; --small: 64MB)")
    p.add_argument("--k", type=int, default=5, help="number of checkpoints (default 5)")
    p.add_argument("--repeat", type=int, default=3, help="repetitions; the table shows medians (default 3)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--only", default=",".join(ALL_PARTS),
                   help=f"comma-separated subset of: {', '.join(ALL_PARTS)} (default: all)")
    p.add_argument("--small", action="store_true", help="CI mode: --size 64MB --repeat 1, peers skipped when absent")
    p.add_argument("--no-cold", dest="cold", action="store_false", help="skip the cold-cache runs")
    p.add_argument("--workdir", type=Path, help="where checkpoints are generated (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.add_argument("--markdown", type=Path, help="write the table as markdown here")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    o = p.parse_args(argv)
    if o.small:
        o.repeat = 1
    o.size = o.size or ("64MB" if o.small else "1GB")
    try:
        o.size = parse_size(o.size)
    except ValueError as e:
        p.error(f"--size: {e}")
    o.only = {x.strip() for x in o.only.split(",") if x.strip()}
    unknown = o.only - set(ALL_PARTS)
    if unknown:
        p.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(ALL_PARTS)}")
    if o.k < 2:
        p.error("--k must be at least 2")
    if o.repeat < 1:
        p.error("--repeat must be at least 1")
    if o.device == "cuda":  # asked of a child: the driver stays free of torch (see spawn)
        probe = subprocess.run([sys.executable, str(HERE / "child.py"), "torch", "{}"], capture_output=True,
                               text=True, check=False)
        if '"cuda": true' not in probe.stdout:
            p.error("--device cuda: CUDA is not available here")
    return o


def main(argv: list[str] | None = None) -> int:
    o = parse_args(argv)
    owned = o.workdir is None
    work = Path(tempfile.mkdtemp(prefix="ckptavg-bench-")) if owned else o.workdir
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(o, work)
    try:
        bench.generate()
        load0 = os.getloadavg()[0]
        bench.measure()
        bench.notes.append(f"load average {load0:.1f} when measurements began, {os.getloadavg()[0]:.1f} when they "
                           f"ended, on {os.cpu_count()} CPUs: other work on the machine makes timings noisy")
        bench.check()
        summary = bench.summary()
        render_text(summary)
        if o.json:
            o.json.write_text(json.dumps(summary, indent=2))
        if o.markdown:
            o.markdown.write_text(render_markdown(summary))
    finally:
        if o.keep:
            print(f"kept {work}", file=sys.stderr)
        elif owned:
            shutil.rmtree(work, ignore_errors=True)
        else:
            for sub in ("run", "out", "logs"):
                shutil.rmtree(work / sub, ignore_errors=True)
    failed = [r.label for r in bench.rows.values() if r.skipped.startswith("FAILED")]
    if failed:
        print(f"failed: {', '.join(failed)} (see the JSON for their output)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
