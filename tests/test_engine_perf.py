"""The engine's speed-ups change nothing: pieces, threads and the background writer are bitwise neutral.

The tensor-major schedule cuts large tensors into pieces (``piece_elems``), folds
with ``threads`` CPU threads, and hands finished parts to a ``ckptavg-writer``
thread. Each test runs the same averages with those knobs at their extremes
(pieces of a few elements, several threads) and with them off (whole tensors, one
thread), and demands byte-identical output files; and against the checkpoint-major
schedule (pickles), which never uses pieces.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from conftest import tiny_state, write_checkpoint
from safetensors.torch import load_file

from ckptavg.averaging.engine import Engine
from ckptavg.errors import OutputError
from ckptavg.oneshot import AverageSpec, average_checkpoints, build_averages
from ckptavg.reading.checkpoint import open_checkpoint
from ckptavg.reading.formats.safetensors_writer import ShardWriter
from ckptavg.writing.export import ModelWriter

STEPS = [100, 200, 350, 400, 600]
SPECS = {
    "uniform": [AverageSpec("uniform", {"weighted": False})],
    "weighted": [AverageSpec("uniform", {"weighted": True})],
    "several": [AverageSpec("ema", {"half_life": 150.0}), AverageSpec("lawa", {"window": 2}),
                AverageSpec("swa", {"start_step": 300})],
}


def _states(dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    states = []
    for i in range(len(STEPS)):
        s = tiny_state(i, dtype=dtype, scale=1 + 0.3 * i)
        s["big.weight"] = (torch.randn(300, 7, generator=torch.Generator().manual_seed(50 + i)) * (1 + i)).to(dtype)
        s["big.weight"].view(-1)[::17] = -0.0  # signed zeros must survive the piece path too
        states.append(s)
    return states


def _run(tmp_path: Path, fmt: str, dtype: torch.dtype) -> list[Path]:
    return [write_checkpoint(tmp_path / f"run-{fmt}" / f"checkpoint-{s}", st, fmt, shard_bytes=1500)
            for s, st in zip(STEPS, _states(dtype))]


def _average(paths: list[Path], out: Path, kind: str, **engine_kw: int) -> dict[str, bytes]:
    """Average ``paths`` with an engine built from ``engine_kw``; the output files' bytes by name."""
    ckpts = [open_checkpoint(p) for p in paths]
    weights = [0.5, 1.0, 2.0, 0.25, 3.0] if kind == "weighted" else None
    with Engine(device="cpu", **engine_kw) as engine:
        averages = build_averages(SPECS[kind])
        average_checkpoints(ckpts, averages, out, engine=engine, weights=weights)
    files = {}
    for f in sorted(out.rglob("*.safetensors")):
        files[str(f.relative_to(out))] = f.read_bytes()
    assert files
    return files


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("kind", list(SPECS))
def test_pieces_and_threads_are_bitwise_neutral(tmp_path, kind, dtype):
    paths = _run(tmp_path, "sharded", dtype)
    whole = _average(paths, tmp_path / "whole", kind, piece_elems=1 << 30, threads=1)
    assert _average(paths, tmp_path / "pieces", kind, piece_elems=37, chunk_elems=5, threads=2) == whole
    assert _average(paths, tmp_path / "one-piece-per-chunk", kind, piece_elems=64, chunk_elems=64, threads=1) == whole
    # checkpoint-major (pickles) never cuts tensors: the same bytes again
    bins = _run(tmp_path, "bin", dtype)
    assert _average(bins, tmp_path / "bin", kind) == whole


def test_pieces_give_the_float64_reference(tmp_path):
    """Not only self-consistent: the pieced uniform mean is the correctly rounded fp32-accumulated mean."""
    paths = _run(tmp_path, "safetensors", torch.bfloat16)
    out = tmp_path / "out"
    _average(paths, out, "uniform", piece_elems=10, threads=2)
    got = load_file(str(out / "model.safetensors"))["big.weight"]
    acc = torch.zeros(300, 7)
    for s in _states(torch.bfloat16):
        acc += s["big.weight"].float()
    want = (acc / torch.tensor(float(len(STEPS)))).to(torch.bfloat16)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_a_tensor_that_changes_shape_keeps_the_whole_tensor_path(tmp_path):
    """Policy reset: pieces would straddle two shapes, so such a tensor is read whole and restarts."""
    states = _states(torch.float32)
    for s in states[3:]:
        s["big.weight"] = s["big.weight"][:200].clone()
    paths = [write_checkpoint(tmp_path / "run" / f"checkpoint-{st}", s) for st, s in zip(STEPS, states)]
    ckpts = [open_checkpoint(p) for p in paths]
    outs = []
    for label, piece in (("whole", 1 << 30), ("pieces", 16)):
        with Engine(device="cpu", piece_elems=piece) as engine:
            averages = build_averages(SPECS["uniform"], on_shape_change="reset")
            average_checkpoints(ckpts, averages, tmp_path / label, engine=engine)
        outs.append((tmp_path / label / "model.safetensors").read_bytes())
    assert outs[0] == outs[1]
    got = load_file(str(tmp_path / "pieces" / "model.safetensors"))["big.weight"]
    want = (states[3]["big.weight"] + states[4]["big.weight"]) / torch.tensor(2.0)
    assert torch.equal(got, want)


def _refs(tmp_path: Path, state: dict[str, torch.Tensor]):
    """TensorRefs of ``state`` (written to a real file), in ``state``'s order: the output plan."""
    tensors = open_checkpoint(write_checkpoint(tmp_path / "src", state)).tensors
    return [tensors[name] for name in state]


def test_writer_appends_flat_parts(tmp_path):
    state = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.arange(5, dtype=torch.int64)}
    folder = tmp_path / "out"
    folder.mkdir()
    w = ModelWriter(folder, _refs(tmp_path, state))
    flat = state["a"].reshape(-1)
    for lo, hi in ((0, 5), (5, 6), (6, 12)):
        w.write("a", flat[lo:hi].clone())
    w.write("b", state["b"])
    w.finish()
    got = load_file(str(folder / "model.safetensors"))
    assert torch.equal(got["a"], state["a"]) and torch.equal(got["b"], state["b"])


@pytest.mark.parametrize("bad", ["overflow", "wrong-dtype", "wrong-name", "short"])
def test_writer_refuses_parts_that_do_not_tile_the_tensor(tmp_path, bad):
    state = {"a": torch.zeros(3, 4), "b": torch.zeros(2)}
    folder = tmp_path / "out"
    folder.mkdir()
    w = ModelWriter(folder, _refs(tmp_path, state))
    with pytest.raises(OutputError, match="internal"):
        w.write("a", torch.zeros(8))
        if bad == "overflow":
            w.write("a", torch.zeros(5))
        elif bad == "wrong-dtype":
            w.write("a", torch.zeros(4, dtype=torch.float64))
        elif bad == "wrong-name":
            w.write("b", torch.zeros(2))
        w.write("a", torch.zeros(4)) if bad == "short" else None
        w.finish()  # "short": a is complete, b never came
    w.abort()


def test_writer_thread_error_surfaces_and_the_thread_ends(tmp_path, monkeypatch):
    """A failing disk write in the ckptavg-writer thread is raised in the caller, by write or finish."""
    state = {f"t{i}": torch.full((1000,), float(i)) for i in range(6)}
    folder = tmp_path / "out"
    folder.mkdir()
    real = ShardWriter.write

    def failing(self, name, tensor):
        if name == "t2":
            raise OSError(28, "No space left on device")
        return real(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "write", failing)
    w = ModelWriter(folder, _refs(tmp_path, state), max_shard_bytes=8000)
    with pytest.raises(OSError, match="No space left"):
        for name, t in state.items():
            w.write(name, t)
        w.finish()
    w.abort()
    assert not [t for t in threading.enumerate() if t.name == "ckptavg-writer"]


def test_writer_thread_overlaps_and_fsyncs_every_shard(tmp_path, monkeypatch):
    """Shards are written by the ckptavg-writer thread, each fsynced once it is complete."""
    state = {f"t{i}": torch.full((1000,), float(i)) for i in range(6)}
    folder = tmp_path / "out"
    folder.mkdir()
    synced: list[tuple[str, str]] = []
    real_close = ShardWriter.close

    def close(self):
        synced.append((self.path.name, threading.current_thread().name))
        real_close(self)

    monkeypatch.setattr(ShardWriter, "close", close)
    w = ModelWriter(folder, _refs(tmp_path, state), max_shard_bytes=8000)
    for name, t in state.items():
        w.write(name, t)
    w.finish()
    assert [n for n, _ in synced] == w.files and len(w.files) == 3
    assert {thread for _, thread in synced} == {"ckptavg-writer"}
    got = {}
    for f in w.files:
        got.update(load_file(str(folder / f)))
    assert all(torch.equal(got[k], v) for k, v in state.items())


def test_finite_check_is_exact():
    """The quick NaN/Inf test (a sum) never passes a poisoned tensor nor refuses a clean one whose sum overflows."""
    from ckptavg.averaging.engine import _all_finite

    big = torch.full((8,), 3e38)
    assert not torch.isfinite(big.sum()) and _all_finite(big)  # overflow of the sum alone: still finite
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        for bad in (float("nan"), float("inf"), float("-inf")):
            t = torch.ones(1000, dtype=dtype)
            t[517] = bad
            assert not _all_finite(t), (dtype, bad)
        assert _all_finite(torch.ones(1000, dtype=dtype))
    fp8 = torch.zeros(4, dtype=torch.float8_e5m2)  # no sum for fp8: the elementwise test
    assert _all_finite(fp8)


def test_daemon_folds_with_reused_buffers_equal_the_pieced_one_shot(tmp_path):
    """Checkpoint-major folds (the daemon's schedule: LAWA reads its leaving member into reused buffers,
    tensors of different sizes in turn) give the bytes of the pieced tensor-major one-shot."""
    paths = _run(tmp_path, "sharded", torch.bfloat16)
    ckpts = [open_checkpoint(p) for p in paths]
    one_shot = _average(paths, tmp_path / "one-shot", "several", piece_elems=50, threads=1)
    averages = build_averages(SPECS["several"])
    with Engine(device="cpu") as engine:
        history = dict(enumerate(ckpts))
        for i, c in enumerate(ckpts):
            engine.fold(c, averages, ident=i, history=history)
        assert engine._old_bufs, "LAWA's leaving members were read into the reused buffers"
    for avg in averages:
        got = load_file(str(tmp_path / "one-shot" / avg.name / "model.safetensors"))
        for name, t in got.items():
            mine = avg.result(name)
            assert mine.dtype == t.dtype and torch.equal(mine.reshape(-1).view(torch.uint8),
                                                         t.reshape(-1).view(torch.uint8)), (avg.name, name)
    assert one_shot


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["uniform", "several"])
def test_cuda_pieces_equal_cpu_whole(tmp_path, kind):
    """On CUDA, pieces are staged through the pinned chunks at their byte offsets: the CPU's bytes."""
    paths = _run(tmp_path, "sharded", torch.bfloat16)
    cpu = _average(paths, tmp_path / "cpu", kind, piece_elems=1 << 30, threads=1)
    ckpts = [open_checkpoint(p) for p in paths]
    with Engine(device="cuda", piece_elems=37) as engine:
        averages = build_averages(SPECS[kind], device=engine.device)
        average_checkpoints(ckpts, averages, tmp_path / "cuda", engine=engine)
    got = {str(f.relative_to(tmp_path / "cuda")): f.read_bytes() for f in sorted((tmp_path / "cuda").rglob("*.safetensors"))}
    assert got == cpu


def test_cli_threads_option_gives_the_same_bytes(tmp_path, make_run, ckptavg):
    paths = make_run([100, 200, 300])
    outs = []
    for t in ("1", "2"):
        out = tmp_path / f"t{t}"
        r = ckptavg("average", *paths, "--method", "ema:150", "--threads", t, "-o", out)
        assert r.code == 0, r
        outs.append((out / "model.safetensors").read_bytes())
    assert outs[0] == outs[1]
    assert ckptavg("average", *paths, "--threads", "0", "-o", tmp_path / "x").code == 2
