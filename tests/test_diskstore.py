"""The disk-backed accumulator store (``--memory-budget``) and the placement of averages (GPU spill).

Folds through the store must match folds in memory bit for bit; the store's
files are plain fp32 safetensors; persisted generations save from and load
into disk-backed averages; bad budgets are usage errors naming the option.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import run_cli_subprocess, tiny_state, write_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file

from ckptavg import Engine, open_checkpoint
from ckptavg.averaging.placement import Placement, ensure_placed
from ckptavg.averaging.store import DiskStore
from ckptavg.oneshot import AverageSpec, average_checkpoints, build_averages
from ckptavg.writing.state import StateStore

SPECS = [AverageSpec("ema", {"half_life": 150.0}), AverageSpec("lawa", {"window": 3}),
         AverageSpec("swa", {"start_step": 300}), AverageSpec("uniform")]
NAMES = ["ema-150", "lawa-3", "swa-300", "uniform"]
STEPS = [100, 200, 250, 400, 500, 700, 720]


def _load(folder):
    return load_file(str(folder / "model.safetensors"))


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, x in a.items():
        assert x.dtype == b[k].dtype and torch.equal(x, b[k]), k


def _results(averages):
    return {(a.name, n): a.result(n).clone() for a in averages for n in a.slots}


def _fold(engine, averages, ckpts, history):
    for c in ckpts:
        history[c.step] = c
        ensure_placed(averages, c.tensors.values(), engine=engine)
        engine.fold(c, averages, ident=c.step, history=history)


# -- one-shot, checkpoint-major (pickles) ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_oneshot_through_the_disk_store_is_bitwise_equal(tmp_path, make_run, ckptavg, dtype):
    paths = make_run(STEPS, fmt="pt", dtype=dtype)
    methods = ["--method", "ema:150", "--method", "lawa:3", "--method", "swa:300", "--method", "uniform"]
    r = ckptavg("--log-level", "info", "average", *paths, *methods, "-o", tmp_path / "mem")
    assert r.code == 0, r
    assert "on disk" not in r.err
    r = ckptavg("--log-level", "info", "average", *paths, *methods, "--memory-budget", "100B", "-o", tmp_path / "disk")
    assert r.code == 0, r
    assert "on disk in" in r.err and "lawa-3" in r.err and "checkpoint-major" in r.err, r.err
    for name in NAMES:
        _assert_same(_load(tmp_path / "mem" / name), _load(tmp_path / "disk" / name))
    # the default scratch folder (hidden, beside -o) is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "mem", "run"]


def test_budget_splits_averages_between_memory_and_disk(tmp_path, make_run, caplog):
    ckpts = [open_checkpoint(p) for p in make_run(STEPS, fmt="pt")]
    need = build_averages(SPECS[:1])[0].accumulator_bytes(ckpts[0].tensors.values())
    scratch = tmp_path / "scratch"
    with Engine() as engine:
        mem = build_averages(SPECS)
        average_checkpoints(ckpts, mem, tmp_path / "mem", engine=engine)
        mixed = build_averages(SPECS, memory_budget=need)
        caplog.set_level("INFO", logger="ckptavg")
        result = average_checkpoints(ckpts, mixed, tmp_path / "mixed", engine=engine, memory_budget=need,
                                     scratch_dir=scratch)
    assert result.placement["ema-150"] == "cpu"  # the first one fits the budget
    assert all(result.placement[n] == "disk" for n in NAMES[1:]), result.placement
    assert f"on disk in {scratch}" in caplog.text and caplog.text.count("accumulators:") == 1
    assert scratch.is_dir() and not list(scratch.iterdir())  # a given scratch folder stays, emptied
    for name in NAMES:
        _assert_same(_load(tmp_path / "mem" / name), _load(tmp_path / "mixed" / name))


def test_tensor_major_ignores_the_budget(tmp_path, make_run, ckptavg):
    paths = make_run(STEPS[:3])  # safetensors: one tensor's accumulators at a time
    r = ckptavg("--log-level", "info", "average", *paths, "--memory-budget", "1KB", "-o", tmp_path / "o")
    assert r.code == 0, r
    assert "tensor-major" in r.err and "on disk" not in r.err


# -- checkpoint-major folds as the daemon does them, and persisted state -----------------------------------
def test_checkpoint_major_folds_and_state_round_trip(tmp_path, make_run):
    ckpts = [open_checkpoint(p) for p in make_run(STEPS)]
    with Engine(chunk_elems=100) as engine:  # several chunks per tensor
        straight = build_averages(SPECS)
        _fold(engine, straight, ckpts, {})
        disk = build_averages(SPECS, memory_budget=1, store_dir=tmp_path / "store")
        _fold(engine, disk, ckpts, {})
        assert all(a.store is not None for a in disk)
        _assert_same(_results(straight), _results(disk))

        # persist from disk-backed averages after 4 folds; resume into fresh disk-backed ones
        first = build_averages(SPECS, memory_budget=1, store_dir=tmp_path / "store2")
        history: dict = {}
        _fold(engine, first, ckpts[:4], history)
        state = StateStore(tmp_path / "state")
        state.save(first, extra={"last_step": 400})
        in_memory = build_averages(SPECS)
        assert StateStore(tmp_path / "state").load(in_memory) == {"last_step": 400}
        resumed = build_averages(SPECS, memory_budget=1, store_dir=tmp_path / "store3")
        assert StateStore(tmp_path / "state").load(resumed) == {"last_step": 400}
        assert all(a.store is not None and a.store.files for a in resumed)  # placed from the manifest's sizes
        _assert_same(_results(first), _results(in_memory))
        _fold(engine, resumed, ckpts[4:], history)
        _fold(engine, in_memory, ckpts[4:], history)
    _assert_same(_results(straight), _results(resumed))
    _assert_same(_results(straight), _results(in_memory))
    assert [r.step for r in resumed[0].folded] == STEPS


def test_float64_accumulators_and_rules_through_the_store(tmp_path, make_run):
    from ckptavg.averaging.rules import parse_rules

    ckpts = [open_checkpoint(p) for p in make_run(STEPS[:5])]
    rules = parse_rules(["*.norm.*=half-life:50", "*.attn.*=latest", "*.mlp.*=exclude"])
    out = {}
    for label, kw in (("mem", {}), ("disk", {"memory_budget": 1, "store_dir": tmp_path / "store"})):
        with Engine() as engine:
            avgs = build_averages(SPECS, accum_dtype=torch.float64, rules=rules, **kw)
            _fold(engine, avgs, ckpts, {})
            out[label] = _results(avgs)
            if label == "disk":
                lawa = avgs[1]
                assert lawa.slots["embed.weight"].bufs["S"].dtype == torch.float64 and lawa.store.owns(
                    lawa.slots["embed.weight"].bufs["S"])
                assert not lawa.store.owns(lawa.slots["layers.0.attn.weight"].bufs["value"])  # latest: in memory
    assert ("lawa-3", "layers.0.mlp.bias") not in out["disk"]
    _assert_same(out["mem"], out["disk"])


def test_rollback_reloads_a_disk_backed_average(tmp_path):
    """The daemon's rollback: a fold that fails part-way leaves the disk-backed accumulators half-folded;
    fresh averages on the same store folder reload the last generation and go on, bitwise as in memory."""
    from ckptavg.errors import NonFiniteError

    states = [tiny_state(i, dtype=torch.float32) for i in range(6)]
    states[4]["layers.0.mlp.bias"][3] = float("nan")  # not the first tensor: the fold fails part-way
    ckpts = [open_checkpoint(write_checkpoint(tmp_path / "run" / f"checkpoint-{(i + 1) * 100}", s))
             for i, s in enumerate(states)]
    good = ckpts[:4] + ckpts[5:]
    store_dir, state = tmp_path / "state" / "store", StateStore(tmp_path / "state")
    with Engine() as engine:
        straight = build_averages(SPECS)
        _fold(engine, straight, good, {})
        history = {c.step: c for c in ckpts}
        avgs = build_averages(SPECS, memory_budget=1, store_dir=store_dir)
        _fold(engine, avgs, ckpts[:4], history)
        state.save(avgs, {"last_step": 400})
        with pytest.raises(NonFiniteError, match="mlp.bias"):
            _fold(engine, avgs, ckpts[4:5], history)
        assert avgs[0].slots["embed.weight"].count == 5  # half-folded: embed.weight took step 500
        avgs = build_averages(SPECS, memory_budget=1, store_dir=store_dir)  # the rollback
        assert state.load(avgs) == {"last_step": 400}
        _fold(engine, avgs, ckpts[5:], history)
        assert len(list(store_dir.iterdir())) == len(SPECS)  # the old store's files were replaced, not added to
    _assert_same(_results(straight), _results(avgs))


def test_store_files_are_fp32_safetensors(tmp_path, make_run):
    ckpts = [open_checkpoint(p) for p in make_run(STEPS[:4])]
    with Engine() as engine:
        avgs = build_averages([AverageSpec("ema", {"half_life": 150.0}), AverageSpec("lawa", {"window": 2})],
                              memory_budget=1, store_dir=tmp_path / "store")
        _fold(engine, avgs, ckpts, {})
        for avg in avgs:
            avg.store.flush()
            files = avg.store.files
            assert len(files) == 1 and files[0].parent == tmp_path / "store"
            with safe_open(str(files[0]), "pt") as f:
                keys = set(f.keys())
                assert f.metadata()["ckptavg.store"] == avg.name
                for name, slot in avg.slots.items():
                    for buf, t in slot.bufs.items():
                        if t.dtype.is_floating_point and buf != "value":
                            assert t.dtype == torch.float32
                    if name == "embed.weight":
                        on_disk = {k: f.get_tensor(k) for k in keys if k.startswith(f"{name}/")}
                        # the file holds the live accumulators (LAWA swaps S and F: compare as a set)
                        assert sorted(v.sum().item() for v in on_disk.values()) == \
                            sorted(v.sum().item() for v in slot.bufs.values())
                        assert all(v.dtype == torch.float32 for v in on_disk.values())
        ema = avgs[0]
        assert torch.equal(ema.result("embed.weight"), build_and_fold_in_memory(ckpts)["embed.weight"])
        for avg in avgs:
            avg.slots.clear()
            avg.store.close()
    assert not list((tmp_path / "store").iterdir())


def build_and_fold_in_memory(ckpts):
    with Engine() as engine:
        (avg,) = build_averages([AverageSpec("ema", {"half_life": 150.0})])
        _fold(engine, [avg], ckpts, {})
        return {n: avg.result(n) for n in avg.slots}


def test_growing_model_and_shape_reset_through_the_store(tmp_path, make_run):
    """Tensors that appear later, or restart, get room in a new store file; results stay bitwise."""
    states = [tiny_state(i, dtype=torch.float32) for i in range(5)]
    for i in (3, 4):  # a new tensor from the 4th checkpoint; embed grows at the 4th
        states[i]["extra.weight"] = torch.full((7,), float(i))
        states[i]["embed.weight"] = torch.randn(80, 16, generator=torch.Generator().manual_seed(i))
    paths = [write_checkpoint(tmp_path / "run" / f"checkpoint-{(i + 1) * 100}", s) for i, s in enumerate(states)]
    ckpts = [open_checkpoint(p) for p in paths]
    out = {}
    for label, kw in (("mem", {}), ("disk", {"memory_budget": 1, "store_dir": tmp_path / "store"})):
        with Engine() as engine:
            avgs = build_averages(SPECS, on_shape_change="reset", **kw)
            _fold(engine, avgs, ckpts, {})
            out[label] = _results(avgs)
            if label == "disk":
                assert all(len(a.store.files) >= 2 for a in avgs)
    _assert_same(out["mem"], out["disk"])


# -- the placement decision (CPU-testable; the CUDA fold itself is a gpu test) ----------------------------
def _fake_averages(device: str = "cpu"):
    avgs = build_averages(SPECS)
    for a in avgs:
        a.device = torch.device(device)
    return avgs


def test_placement_on_cpu_with_a_budget(tmp_path):
    avgs = _fake_averages()
    need = {"ema-150": 100, "lawa-3": 200, "swa-300": 100, "uniform": 100}
    where = Placement(memory_budget=250, store_dir=tmp_path / "s").place(avgs, need)
    assert where["ema-150"] == "cpu"
    assert where["lawa-3"] == "disk"  # 100 + 200 > 250: in order, the first that overflows goes to disk
    assert where["swa-300"] == "cpu"  # 100 + 100 fits
    assert where["uniform"] == "disk"
    assert [a.store is not None for a in avgs] == [False, True, False, True]
    for a in avgs:
        if a.store is not None:
            a.store.close()


def test_placement_spills_to_pinned_memory_when_the_gpu_is_full(tmp_path, caplog):
    avgs = _fake_averages("cuda")
    need = {"ema-150": 3 << 30, "lawa-3": 7 << 30, "swa-300": 3 << 30, "uniform": 4 << 30}
    caplog.set_level("INFO", logger="ckptavg")
    placement = Placement(free_gpu=lambda device: 10 << 30, gpu_margin=1 << 30, memory_budget=8 << 30,
                          store_dir=tmp_path / "s")
    where = placement.place(avgs, need)
    assert where["ema-150"] == "cuda" and where["lawa-3"] == "pinned"
    assert where["swa-300"] == "cuda"  # 3 + 3 <= 10 - 1
    assert where["uniform"] == "disk"  # off the GPU (3 + 3 + 4 > 9), and 7 + 4 over the 8 GiB host budget
    assert [str(a.device) for a in avgs] == ["cuda", "cpu", "cuda", "cpu"]
    assert avgs[1].pinned and not avgs[3].pinned and avgs[3].store is not None
    assert "lawa-3 (7.52 GB) in pinned CPU memory" in caplog.text
    assert f"uniform (4.29 GB) on disk in {tmp_path / 's'}" in caplog.text and caplog.text.count("accumulators:") == 1
    avgs[3].store.close()
    # an engine that cannot fold into host accumulators keeps everything on the GPU
    avgs = _fake_averages("cuda")
    where = Placement(free_gpu=lambda device: 0).place(avgs, need, host_ok=False)
    assert set(where.values()) == {"cuda"} and all(a.device.type == "cuda" for a in avgs)


def test_placement_without_a_store_folder_is_a_usage_error():
    from ckptavg.errors import UsageError

    with pytest.raises(UsageError, match="--memory-budget"):
        Placement(memory_budget=10).place(_fake_averages()[:1], {"ema-150": 100})


def test_store_alloc_release_and_reuse(tmp_path):
    store = DiskStore(tmp_path, "avg")
    store.reserve([("a/S", 10, torch.float32), ("b/S", 3000, torch.float64)])
    a = store.alloc("a/S", 10, torch.float32)
    assert torch.equal(a, torch.zeros(10))
    a += 5
    store.release(a)  # pages dropped from the process, data kept by the file
    assert torch.equal(a, torch.full((10,), 5.0))
    again = store.alloc("a/S", 10, torch.float32)  # handed out again (a slot restarted): zeroed
    assert torch.equal(again, torch.zeros(10)) and len(store.files) == 1
    other = store.alloc("c/S", 4, torch.float32)  # not reserved: a new file
    assert len(store.files) == 2 and torch.equal(other, torch.zeros(4))
    assert store.alloc("z/S", 0, torch.float32).numel() == 0
    del a, again, other
    store.close()
    assert not list(tmp_path.iterdir())


# -- the CLI option ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["lots", "0", "-1GB", "2XB", ""])
def test_bad_memory_budget_is_a_usage_error(tmp_path, make_run, ckptavg, value):
    paths = make_run([100, 200], fmt="pt")
    r = ckptavg("average", *paths, "--memory-budget", value, "-o", tmp_path / "o")
    assert r.code == 2 and "--memory-budget" in r.err and "Traceback" not in r.err, r
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", ["2GiB", "500MB", "1048576", "1.5GB"])
def test_memory_budget_units(tmp_path, make_run, ckptavg, value):
    paths = make_run([100, 200], fmt="pt")
    r = ckptavg("average", *paths, "--memory-budget", value, "-o", tmp_path / "o")
    assert r.code == 0, r


def test_scratch_dir_that_is_a_file_is_a_usage_error(tmp_path, make_run, ckptavg):
    paths = make_run([100, 200], fmt="pt")
    (tmp_path / "f").write_text("x")
    r = ckptavg("average", *paths, "--memory-budget", "1KB", "--scratch-dir", tmp_path / "f", "-o", tmp_path / "o")
    assert r.code == 2 and "--scratch-dir" in r.err, r


def test_daemon_config_memory_budget(tmp_path):
    from ckptavg.daemon.config import build_config
    from ckptavg.errors import UsageError

    base = {"watch": str(tmp_path / "w"), "output": str(tmp_path / "o"), "average": [{"method": "lawa", "window": 3}]}
    assert build_config({**base, "memory_budget": "8GiB"}, source="c.toml").memory_budget == 8 << 30
    assert build_config({**base, "memory_budget": 4096}, source="c.toml").memory_budget == 4096
    assert build_config(base, source="c.toml").memory_budget is None
    for bad in ("lots", -1, 1.5, True):
        with pytest.raises(UsageError, match="memory_budget"):
            build_config({**base, "memory_budget": bad}, source="c.toml")


# -- memory: peak RSS of a process folding through the store ---------------------------------------------------
_RSS_SCRIPT = textwrap.dedent("""
    import json, os, sys, threading, time
    import torch
    from ckptavg import Engine, open_checkpoint
    from ckptavg.oneshot import AverageSpec, build_averages
    from ckptavg.averaging.placement import ensure_placed

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    paths, budget, store = sys.argv[1].split(","), sys.argv[2], sys.argv[3]
    ckpts = [open_checkpoint(p) for p in paths]
    kw = {} if budget == "none" else {"memory_budget": int(budget), "store_dir": store}
    torch.set_num_threads(1)
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    with Engine(staging_bytes=8 << 20) as engine:
        avgs = build_averages([AverageSpec("lawa", {"window": 2}), AverageSpec("ema", {"half_life": 100.0})], **kw)
        base = rss()
        sampler = threading.Thread(target=sample, name="ckptavg-rss")
        sampler.start()
        t0 = time.perf_counter()
        nbytes = 0
        for i, c in enumerate(ckpts):
            ensure_placed(avgs, c.tensors.values(), engine=engine)
            nbytes += engine.fold(c, avgs, ident=i, history=dict(enumerate(ckpts)))
        seconds = time.perf_counter() - t0
        done.set()
        sampler.join()
        digest = [float(a.value(n).double().sum()) for a in avgs for n in sorted(a.slots)]
    print(json.dumps({"grow": (peak[0] - base) / 2**20, "gbps": nbytes / seconds / 1e9, "digest": digest}))
""")


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB and MADV_DONTNEED are Linux's")
def test_peak_rss_is_bounded_by_the_budget_not_the_model(tmp_path):
    """~100 MB of fp32 tensors x (2 LAWA + 1 EMA) accumulators = ~300 MB; with a 32 MB budget the
    process's peak RSS grows by far less than that (reported, not timed)."""
    paths = []
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        state = {f"layer.{j}.weight": torch.randn(1 << 20, generator=g) for j in range(25)}  # 25 x 4 MiB
        paths.append(str(write_checkpoint(tmp_path / f"checkpoint-{(i + 1) * 100}", state)))
    script = tmp_path / "rss.py"
    script.write_text(_RSS_SCRIPT)
    got = {}
    for label, budget in (("memory", "none"), ("disk", str(32 << 20))):
        # glibc's dynamic mmap threshold keeps freed 4 MiB read buffers in the heap (~100 MiB here, with or
        # without the store); a fixed threshold measures the accumulators alone
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        r = subprocess.run([sys.executable, str(script), ",".join(paths), budget, str(tmp_path / "store")],
                           capture_output=True, text=True, timeout=300, env=env, check=False)
        assert r.returncode == 0, r.stderr
        got[label] = json.loads(r.stdout.strip().splitlines()[-1])
    grow = {k: v["grow"] for k, v in got.items()}
    print(f"peak RSS growth: in memory {grow['memory']:.0f} MiB, disk store {grow['disk']:.0f} MiB; "
          f"throughput {got['memory']['gbps']:.2f} vs {got['disk']['gbps']:.2f} GB/s")
    assert got["memory"]["digest"] == got["disk"]["digest"]
    assert grow["memory"] > 250  # the accumulators are resident
    assert grow["disk"] < grow["memory"] / 4  # a few tensors' worth, not the model's


def test_cli_subprocess_disk_store_leaves_nothing_behind(tmp_path, make_run):
    paths = make_run([100, 200, 300], fmt="pt")
    r = run_cli_subprocess("average", *paths, "--method", "lawa:2", "--memory-budget", "1KB", "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "on disk" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]


# -- CUDA: averages that do not fit the GPU fold into pinned CPU memory, or the disk store ---------------------
@pytest.mark.gpu
@pytest.mark.parametrize("budget", [None, 1], ids=["pinned", "disk"])
def test_gpu_spill_matches_the_cpu_bitwise(tmp_path, make_run, budget):
    ckpts = [open_checkpoint(p) for p in make_run(STEPS, fmt="pt")]
    with Engine(device="cpu") as engine:
        average_checkpoints(ckpts, build_averages(SPECS), tmp_path / "cpu", engine=engine)
    with Engine(device="cuda") as engine:
        avgs = build_averages(SPECS, device=engine.device, memory_budget=budget)
        avgs[0].placement.free_gpu = lambda device: 0  # nothing fits the GPU
        result = average_checkpoints(ckpts, avgs, tmp_path / "gpu", engine=engine, memory_budget=budget)
    want = "pinned" if budget is None else "disk"
    assert set(result.placement.values()) == {want}, result.placement
    for name in NAMES:
        _assert_same(_load(tmp_path / "cpu" / name), _load(tmp_path / "gpu" / name))


def test_a_full_disk_is_a_clear_error_not_a_crash(tmp_path, make_run, ckptavg, monkeypatch):
    import errno

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    paths = make_run([100, 200], fmt="pt")
    r = ckptavg("average", *paths, "--memory-budget", "1KB", "--scratch-dir", tmp_path / "scratch", "-o", tmp_path / "o")
    assert r.code == 1 and "No space left" in r.err and str(tmp_path / "scratch") in r.err and "Traceback" not in r.err, r
    assert not (tmp_path / "o").exists() and not list((tmp_path / "scratch").iterdir())


@pytest.fixture
def poisoned_empty(monkeypatch):
    """``torch.empty`` that returns NaN-filled floating tensors: a buffer read before it is written shows."""
    empty = torch.empty

    def poisoned(*args, **kw):
        t = empty(*args, **kw)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", poisoned)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
@pytest.mark.parametrize("window", [1, 2, 3, 4, 7, 9])
@pytest.mark.parametrize("budget", [None, "100B"], ids=["memory", "disk-store"])
def test_oneshot_lawa_keeps_the_daemons_bits(tmp_path, make_run, fmt, window, budget, poisoned_empty):
    """One-shot LAWA knows the future: it folds members that will leave the window with NaN/Inf as 0, and
    skips the updates that never reach the final state (S before the last promotion, F outside the block
    promoted last, the zeroing of F), writing a buffer's first live update anew into unzeroed memory. With
    finite inputs none of it changes a bit: the result is the daemon's fold (no knowledge of the future,
    every operation run), for N < k, N = k and every N mod k, in pieces (safetensors, tensor-major) and
    checkpoint-major (pickles), in memory and through the disk store; unzeroed buffers are NaN here
    (``poisoned_empty``), so one read before it is written would show."""
    ckpts = [open_checkpoint(p) for p in make_run(STEPS, fmt=fmt, dtype=torch.float32)]  # 7 inputs
    with Engine(piece_elems=64) as engine:
        daemon = build_averages([AverageSpec("lawa", {"window": window})])
        _fold(engine, daemon, ckpts, {})
        oneshot = build_averages([AverageSpec("lawa", {"window": window})])
        average_checkpoints(ckpts, oneshot, tmp_path / "o", engine=engine,
                            **({} if budget is None else {"memory_budget": 100, "scratch_dir": tmp_path / "s"}))
    got = _load(tmp_path / "o")
    assert set(got) == set(daemon[0].slots)
    for name in got:
        assert torch.equal(got[name], daemon[0].result(name)), name
    assert daemon[0].slots["embed.weight"].final is None and daemon[0].slots["embed.weight"].folds is None


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_unzeroed_accumulators_are_written_before_they_are_read(tmp_path, make_run, fmt, poisoned_empty):
    """Every method's buffers in ``written_first`` are allocated without zeroing (NaN here); the first fold
    writes them (EMA and power-EMA copy, sums add to 0.0 in one pass): one-shot and daemon agree bit for bit
    with the disk store's zeroed buffers, and nothing is NaN."""
    ckpts = [open_checkpoint(p) for p in make_run(STEPS, fmt=fmt, dtype=torch.bfloat16)]
    specs = [AverageSpec("ema", {"half_life": 150}), AverageSpec("power-ema", {"sigma_rel": 0.1}),
             AverageSpec("lawa", {"window": 3}), AverageSpec("swa", {"start_step": 300}), AverageSpec("uniform", {})]
    with Engine(piece_elems=64) as engine:
        daemon = build_averages(specs)
        _fold(engine, daemon, ckpts, {})
        average_checkpoints(ckpts, build_averages(specs), tmp_path / "mem", engine=engine)
        average_checkpoints(ckpts, build_averages(specs), tmp_path / "disk", engine=engine, memory_budget=100,
                            scratch_dir=tmp_path / "s")
    for i, avg in enumerate(daemon):
        mem, disk = _load(tmp_path / "mem" / avg.name), _load(tmp_path / "disk" / avg.name)
        assert set(mem) == set(avg.slots), avg.name
        for name in mem:
            assert not mem[name].float().isnan().any(), (avg.name, name)
            assert torch.equal(mem[name], disk[name]) and torch.equal(mem[name], avg.result(name)), (avg.name, name)


@pytest.mark.slow
def test_daemon_with_a_memory_budget_folds_through_the_disk_store_and_survives_kill_9(tmp_path):
    """The daemon's accumulators live in STATE/store when they exceed --memory-budget; killed with SIGKILL
    mid-run and restarted, the averages equal the one-shot's bit for bit."""
    import random
    import time

    from test_daemon import assert_same, one_shot, start_daemon, status, stop, wait_for, write_trainer_checkpoint

    run, out = tmp_path / "run", tmp_path / "avg"
    for i, step in enumerate(range(100, 1700, 100)):
        write_trainer_checkpoint(run, step, i)
    rng = random.Random(3)
    for _ in range(2):
        daemon = start_daemon(run, out, "--memory-budget", "4KB", env={"CKPTAVG_FAULT": "slow-fold=0.1"})
        assert wait_for(lambda d=daemon: status(out).get("pid") == d.pid, 30)
        time.sleep(rng.uniform(0.3, 0.8))
        daemon.kill()
        daemon.wait()
    daemon = start_daemon(run, out, "--memory-budget", "4KB")
    try:
        assert wait_for(lambda: status(out).get("pid") == daemon.pid and status(out).get("last_folded_step") == 1600
                        and status(out).get("state") == "watching", 90), status(out)
    finally:
        code, err = stop(daemon)
    assert code == 0, err
    assert "on disk" in err  # the placement line names the averages kept on disk
    one_shot(run, tmp_path / "oneshot")
    assert_same(out, tmp_path / "oneshot")


def test_a_killed_runs_disk_store_is_removed_by_the_next_run(tmp_path, make_run, ckptavg):
    import subprocess

    paths = make_run([100, 200, 300], fmt="pt")
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".out.ckptavg-scratch-{dead.pid}-abcd1234"
    stale.mkdir()
    (stale / "ema-150.safetensors").write_bytes(b"x" * 100)
    live = tmp_path / f".out.ckptavg-scratch-{os.getpid()}-ffff0000"  # a live process's: kept
    live.mkdir()
    r = ckptavg("average", *paths, "--method", "ema:150", "--memory-budget", "1KB", "-o", tmp_path / "out")
    assert r.code == 0, r
    assert not stale.exists() and live.exists()
    assert "disk store of an interrupted run" in r.err
