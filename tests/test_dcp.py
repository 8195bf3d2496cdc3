"""torch.distributed.checkpoint (DCP) folders: read (one process and a real 2-rank FSDP2 run), refused when
unsafe or broken, and written (``--output-format dcp``) so that ``dcp.load`` reads the average back."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ckptavg.errors import (
    IncompleteCheckpointError,
    MissingShardError,
    SpecialFileError,
    TruncatedFileError,
    UnknownFormatError,
    UnsafePathError,
    UnsafePickleError,
    UnsupportedCheckpointError,
)
from ckptavg.reading.checkpoint import open_checkpoint
from ckptavg.reading.discover import find_candidates, latest_complete
from ckptavg.reading.ready import check_ready

dcp = pytest.importorskip("torch.distributed.checkpoint")
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

TRAINER = Path(__file__).with_name("dcp_fsdp_trainer.py")


def save(state: dict, folder: Path) -> Path:
    """``dcp.save`` in this one process (no process group), as torch's FileSystemWriter lays it out."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is ... uninitialized, assuming ... a single process"
        dcp.save(state, checkpoint_id=str(folder))
    return folder


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)  # a 4-d weight
        self.proj = nn.Linear(5, 7).to(torch.bfloat16)
        self.half = nn.Linear(3, 2).to(torch.float16)
        self.register_buffer("count", torch.arange(6, dtype=torch.int64).reshape(2, 3))
        self.register_buffer("scale", torch.tensor(0.5, dtype=torch.float64))  # 0-d


def net_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in Net().state_dict().items()}


def optimizer_state(model_sd: dict[str, torch.Tensor]) -> dict:
    params = [nn.Parameter(v.float().clone()) for v in model_sd.values() if v.is_floating_point()]
    opt = torch.optim.AdamW(params)
    sum(p.sum() for p in params).backward()
    opt.step()
    return opt.state_dict()


def read_all(path: Path, **kw) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(path, **kw)
    with ckpt.reader() as r:
        return {n: r.read(n) for n in ckpt.tensors}


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k], v), k


# -- layouts of real writers ----------------------------------------------------------------------------------

def test_one_process_dcp_reads_every_dtype_and_shape_bit_for_bit(tmp_path, ckptavg):
    sd = net_state(0)
    folder = save({"model": sd, "optim": optimizer_state(sd)}, tmp_path / "run" / "step-40")
    ckpt = open_checkpoint(folder)
    assert ckpt.format == "dcp" and ckpt.step == 40 and ckpt.incomplete is None
    assert ckpt.files[0].name == ".metadata" and all(f.suffix == ".distcp" for f in ckpt.files[1:])
    assert_same(read_all(folder), sd)  # optimizer entries (and its bytes entries) left out, "model." removed
    r = ckptavg("inspect", folder)
    assert r.code == 0 and "format:      dcp" in r.out and "step:        40 (from name)" in r.out, r
    assert "complete:    yes" in r.out and ".metadata" in r.out


@pytest.mark.parametrize("layout", ["torchtitan", "accelerate", "dcp-tutorial", "lightning"])
def test_model_entries_as_each_writer_lays_them_out(tmp_path, layout):
    sd = net_state(1)
    osd = optimizer_state(sd)
    if layout == "torchtitan":  # model keys at the top, then optimizer/lr_scheduler/dataloader/train_state
        folder = save({**sd, "optimizer": osd, "lr_scheduler": {"last_epoch": 3}, "dataloader": {"pos": b"x"},
                       "train_state": {"step": 30, "ntokens_seen": 999}}, tmp_path / "checkpoint" / "weights")
        step = 30  # from train_state.step: the folder name carries none
    elif layout == "accelerate":  # FSDP SHARDED_STATE_DICT: {"model": sd} in pytorch_model_fsdp_0/
        outer = tmp_path / "checkpoint-30"
        save({"model": sd}, outer / "pytorch_model_fsdp_0")
        save({"optimizer": osd}, outer / "optimizer_0")
        (outer / "config.json").write_text(json.dumps({"model_type": "net"}))
        folder, step = outer, 30
    elif layout == "dcp-tutorial":  # {"app": AppState} whose state_dict is {"model": ..., "optim": ...}
        folder, step = save({"app": {"model": sd, "optim": osd}}, tmp_path / "step-30"), 30
    else:  # Lightning's sharded FSDP: a folder named like the .ckpt file, model and optimizer_0 entries
        folder = save({"model": sd, "optimizer_0": osd}, tmp_path / "epoch=0-step=30.ckpt")
        torch.save({"global_step": 30}, folder / "meta.pt")
        step = 30
    ckpt = open_checkpoint(folder)
    assert ckpt.format == "dcp" and ckpt.step == step
    assert_same(read_all(folder), sd)
    if layout == "accelerate":
        assert ckpt.model == "net" and all(f.parent.name == "pytorch_model_fsdp_0" for f in ckpt.files)
    if layout == "torchtitan":
        assert ckpt.step_source.startswith("train_state")


def test_state_key_and_strip_prefix_pick_another_entry(tmp_path):
    sd, ema = net_state(2), net_state(3)
    folder = save({"model": sd, "ema": {f"module.{k}": v for k, v in ema.items()}}, tmp_path / "step-5")
    assert_same(read_all(folder), sd)
    assert_same(read_all(folder, state_key="ema"), ema)  # DDP's module. removed as for pickles


def test_nd_chunks_are_assembled_and_torch_reads_the_same_folder(tmp_path):
    """A 2x2 grid of chunks over a 3-d tensor, and dim-0 shards of uneven size with an empty one (FSDP2 with more
    ranks than rows): assembled exactly, and torch's own dcp.load agrees with what ckptavg read."""
    g = torch.Generator().manual_seed(0)
    grid = torch.randn(6, 4, 3, generator=g)
    rows = torch.randn(3, 5, generator=g).to(torch.bfloat16)
    folder = handmade(tmp_path / "step-7", {
        "grid": (grid, [((0, 0, 0), (3, 2, 3)), ((0, 2, 0), (3, 2, 3)), ((3, 0, 0), (3, 2, 3)), ((3, 2, 0), (3, 2, 3))]),
        "rows": (rows, [((0, 0), (2, 5)), ((2, 0), (1, 5)), ((3, 0), (0, 5))]),
    })
    assert_same(read_all(folder), {"grid": grid, "rows": rows})
    loaded = {"grid": torch.zeros_like(grid), "rows": torch.zeros_like(rows)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(loaded, checkpoint_id=str(folder))
    assert_same(loaded, {"grid": grid, "rows": rows})


# -- refused: docs/FAULTS.md rows 80-82 ---------------------------------------------------------------------

class _System:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


@pytest.mark.parametrize("where", ["whole", "inside-metadata"])
def test_row80_malicious_metadata_is_refused_and_nothing_runs(tmp_path, ckptavg, where):
    """docs/FAULTS.md row 80: a .metadata naming os.system is refused by the restricted unpickler, naming the global."""
    sentinel = tmp_path / "SENTINEL"
    folder = save({"model": net_state(0)}, tmp_path / "run" / "step-10")
    payload = _System(f"touch {sentinel}")
    if where == "whole":
        data = pickle.dumps(payload, protocol=4)
    else:  # a real Metadata object with the payload in its planner data
        with open(folder / ".metadata", "rb") as f:
            good = pickle.load(f)  # the test's own file, written by dcp.save above
        good.planner_data = {"x": payload}
        data = pickle.dumps(good, protocol=4)
    (folder / ".metadata").write_bytes(data)
    with pytest.raises(UnsafePickleError, match=r"system") as e:
        open_checkpoint(folder)
    assert ".metadata" in str(e.value)
    out = tmp_path / "out"
    r = ckptavg("average", folder, "-o", out)
    assert r.code == 1 and "system" in r.err and "Traceback" not in r.err and not out.exists()
    r = ckptavg("inspect", folder)
    assert r.code == 1 and "system" in r.err
    assert not sentinel.exists()


def test_row80_an_oversized_metadata_is_refused_unread(tmp_path, monkeypatch):
    """docs/FAULTS.md row 80: a .metadata over the size bound is refused before a byte of it is unpickled (the
    bound lowered to 100 bytes here; it is 1 GiB)."""
    from ckptavg.reading.formats import dcp as reader

    folder = save({"model": net_state(0)}, tmp_path / "step-10")
    monkeypatch.setattr(reader, "MAX_METADATA_BYTES", 100)
    monkeypatch.setattr(reader, "_MetadataUnpickler", None)  # unpickling it at all would fail differently
    with pytest.raises(UnsafePickleError, match="over the 100-byte limit"):
        open_checkpoint(folder)


def test_row80_a_fifo_metadata_is_never_opened(tmp_path):
    """docs/FAULTS.md row 80: a FIFO where .metadata should be is refused without being opened (nothing blocks)."""
    folder = save({"model": net_state(0)}, tmp_path / "step-10")
    (folder / ".metadata").unlink()
    os.mkfifo(folder / ".metadata")
    with pytest.raises(SpecialFileError, match="never opened"):
        open_checkpoint(folder)


def test_row81_truncated_or_missing_chunk_file_is_refused_naming_it(tmp_path, ckptavg):
    """docs/FAULTS.md row 81: a .distcp cut short or missing is an incomplete checkpoint, named; never half-read."""
    truncated = save({"model": net_state(0)}, tmp_path / "a" / "step-10")
    f = next(truncated.glob("*.distcp"))
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(TruncatedFileError, match=f.name):
        open_checkpoint(truncated)
    missing = save({"model": net_state(0)}, tmp_path / "b" / "step-10")
    g = next(missing.glob("*.distcp"))
    g.unlink()
    with pytest.raises(MissingShardError, match=g.name):
        open_checkpoint(missing)
    for folder, name in ((truncated, f.name), (missing, g.name)):
        r = ckptavg("average", folder, "-o", tmp_path / "out")
        assert r.code == 1 and name in r.err and "Traceback" not in r.err
    # a chunk whose bytes are garbage (same length): refused when read, naming the tensor
    bad = save({"model": net_state(0)}, tmp_path / "c" / "step-10")
    h = next(bad.glob("*.distcp"))
    h.write_bytes(b"\0" * h.stat().st_size)
    ckpt = open_checkpoint(bad)
    with ckpt.reader() as r, pytest.raises(UnknownFormatError, match="not a torch.save zip"):
        r.read(next(iter(ckpt.tensors)))


def test_row82_chunks_that_do_not_tile_the_tensor_are_refused_at_index(tmp_path):
    """docs/FAULTS.md row 82: a gap, an overlap, a chunk outside the shape, a path out of the folder, transforms."""
    t = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    gap = handmade(tmp_path / "gap", {"w": (t, [((0, 0), (2, 4)), ((3, 0), (3, 4))])})
    with pytest.raises(UnknownFormatError, match=r"tensor 'w'.*gap"):
        open_checkpoint(gap)
    overlap = handmade(tmp_path / "overlap", {"w": (t, [((0, 0), (4, 4)), ((3, 0), (3, 4))])})
    with pytest.raises(UnknownFormatError, match=r"tensor 'w'.*overlap"):
        open_checkpoint(overlap)
    outside = handmade(tmp_path / "outside", {"w": (t, [((0, 0), (6, 4)), ((0, 4), (6, 1))])})
    with pytest.raises(UnknownFormatError, match="outside"):
        open_checkpoint(outside)
    escape = handmade(tmp_path / "escape", {"w": (t, [((0, 0), (6, 4))])}, relative_path="../../etc/passwd")
    with pytest.raises(UnsafePathError, match="passwd"):
        open_checkpoint(escape)
    zstd = handmade(tmp_path / "zstd", {"w": (t, [((0, 0), (6, 4))])}, transforms=["zstd"])
    with pytest.raises(UnsupportedCheckpointError, match="zstd"):
        open_checkpoint(zstd)


def test_row83_half_written_dcp_is_never_folded_and_discovery_finds_dcp_steps(tmp_path, ckptavg):
    """docs/FAULTS.md row 83: .distcp files without .metadata (the rename not done yet) are waited for: readiness
    says waiting, a one-shot over the run skips it, open refuses it as incomplete."""
    run = tmp_path / "outputs" / "checkpoint"
    for step in (10, 20):
        save({**net_state(step), "optimizer": optimizer_state(net_state(step))}, run / f"step-{step}")
    half = save({**net_state(30)}, run / "step-30")
    os.rename(half / ".metadata", half / ".metadata.tmp")  # as FileSystemWriter leaves it before its last rename
    assert find_candidates(tmp_path / "outputs") == [run / "step-10", run / "step-20", run / "step-30"]
    assert check_ready(half, clock=lambda: time.time() + 60).state == "waiting"
    assert check_ready(run / "step-20", clock=lambda: time.time() + 60).ready
    with pytest.raises(IncompleteCheckpointError, match="not committed"):
        open_checkpoint(half)
    assert [c.step for c in latest_complete(tmp_path / "outputs", 5)] == [10, 20]
    out = tmp_path / "avg"
    r = ckptavg("average", tmp_path / "outputs", "-o", out)
    assert r.code == 0, r
    want = {k: ((net_state(10)[k].double() + net_state(20)[k].double()) / 2) for k in net_state(0)}
    got = load_file(out / "model.safetensors")
    assert set(got) == set(want)
    # read tensor by tensor across the inputs, as safetensors are (no whole-model accumulators as for pickles)
    assert json.loads((out / "ckptavg.json").read_text())["schedule"] == "tensor-major"
    for k, v in want.items():  # the mean of steps 10 and 20 only, rounded to each tensor's dtype
        torch.testing.assert_close(got[k], v.to(got[k].dtype), msg=k)
    r = ckptavg("inspect", half)
    assert r.code != 0 and "not committed" in r.err


# -- written: --output-format dcp (row 84) -------------------------------------------------------------------

def test_row84_output_format_dcp_loads_with_dcp_load_bit_for_bit(tmp_path, ckptavg):
    """docs/FAULTS.md row 84: the DCP output of an average is what dcp.load reads into a fresh model's state dict,
    bit for bit the safetensors output of the same average; ckptavg reads it back too."""
    run = tmp_path / "run"
    for step in (100, 200, 300):
        save({"model": net_state(step), "optim": optimizer_state(net_state(step))}, run / f"step-{step}")
    r = ckptavg("average", run, "--method", "ema:150", "-o", tmp_path / "st")
    assert r.code == 0, r
    r = ckptavg("average", run, "--method", "ema:150", "--output-format", "dcp", "-o", tmp_path / "dc")
    assert r.code == 0, r
    out = tmp_path / "dc"
    assert (out / ".metadata").is_file() and not (out / ".metadata.tmp").exists()
    assert not list(out.glob("*.safetensors"))
    fresh = {k: torch.full_like(v, 7) for k, v in Net().state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(fresh, checkpoint_id=str(out))
    want = load_file(tmp_path / "st" / "model.safetensors")
    assert_same(fresh, want)
    back = open_checkpoint(out)
    assert back.format == "dcp"
    assert_same(read_all(out), want)


def test_row84_tied_weights_are_both_keys_of_the_dcp_output(tmp_path, ckptavg):
    """docs/FAULTS.md row 84: a tied weight (one storage under two names in a pickle) is stored once and listed
    under both names, so dcp.load fills both keys of a model whose state dict holds both."""
    paths = []
    for step in (1, 2):
        w = torch.randn(5, 3, generator=torch.Generator().manual_seed(step))
        torch.save({"embed.weight": w, "head.weight": w, "head.bias": torch.zeros(5) + step}, tmp_path / f"step_{step}.pt")
        paths.append(tmp_path / f"step_{step}.pt")
    r = ckptavg("average", *paths, "--output-format", "dcp", "-o", tmp_path / "out")
    assert r.code == 0, r
    target = {"embed.weight": torch.zeros(5, 3), "head.weight": torch.zeros(5, 3), "head.bias": torch.zeros(5)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(target, checkpoint_id=str(tmp_path / "out"))
    mean = sum(torch.load(p, weights_only=True)["embed.weight"].double() for p in paths) / 2
    torch.testing.assert_close(target["embed.weight"].double(), mean)
    assert torch.equal(target["head.weight"], target["embed.weight"]) and torch.equal(target["head.bias"], torch.full((5,), 1.5))
    meta = dcp.FileSystemReader(str(tmp_path / "out")).read_metadata()  # our own output: torch's reader is fine
    where = {k.fqn: (v.offset, v.length) for k, v in meta.storage_data.items()}
    assert where["head.weight"] == where["embed.weight"] != where["head.bias"]  # the tied bytes are stored once


# -- helpers -------------------------------------------------------------------------------------------------

def handmade(folder: Path, tensors: dict, *, relative_path: str = "__0_0.distcp", transforms: list | None = None) -> Path:
    """A DCP folder written the way FileSystemWriter writes one (each chunk a torch.save appended to the file,
    .metadata a pickle of torch's Metadata classes), with the chunk layout the test asks for."""
    folder.mkdir(parents=True)
    state, storage = {}, {}
    with open(folder / "__0_0.distcp", "wb") as f:
        for name, (full, chunks) in tensors.items():
            props = TensorProperties(dtype=full.dtype)
            state[name] = TensorStorageMetadata(properties=props, size=full.shape, chunks=[
                ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s)) for o, s in chunks])
            for o, s in chunks:
                piece = full
                try:
                    for d, (a, n) in enumerate(zip(o, s)):
                        piece = piece.narrow(d, a, n)
                except (IndexError, RuntimeError):  # a chunk outside the tensor (a corrupt .metadata)
                    piece = torch.zeros(s, dtype=full.dtype)
                start = f.tell()
                torch.save(piece.clone(), f)
                storage[MetadataIndex(name, o)] = _StorageInfo(relative_path, start, f.tell() - start,
                                                               transform_descriptors=transforms)
    meta = Metadata(state_dict_metadata=state, planner_data={n: (n,) for n in state}, storage_data=storage)
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(meta, f)
    return folder


def _wait_folded(out: Path, step: int, timeout: float = 60.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if json.loads((out / ".ckptavg" / "status.json").read_text()).get("last_folded_step") == step:
                return True
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_row85_daemon_folds_hf_trainer_fsdp_checkpoints_without_false_rewinds(tmp_path):
    """docs/FAULTS.md row 85: HF Trainer + FSDP SHARDED_STATE_DICT checkpoints (checkpoint-N/ holding accelerate's
    pytorch_model_fsdp_0/ and optimizer_0/ DCP folders, trainer_state.json last), written while the daemon runs:
    each is folded once (its model files lie in a subfolder: never taken for a re-written checkpoint), a
    checkpoint without trainer_state.json is waited for, and the EMA equals a float64 reference; config.json is
    carried into the published folder."""
    run, out = tmp_path / "run", tmp_path / "out"
    run.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    daemon = subprocess.Popen(
        [sys.executable, "-m", "ckptavg.cli.main", "watch", str(run), "-o", str(out), "--ema", "15",
         "--settle", "0.1", "--poll-interval", "0.2", "--device", "cpu"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    states = {}
    try:
        for step in (10, 20, 30, 40):
            sd = states[step] = net_state(step)
            folder = run / f"checkpoint-{step}"
            save({"model": sd}, folder / "pytorch_model_fsdp_0")
            save({"optimizer": optimizer_state(sd)}, folder / "optimizer_0")
            torch.save({"seed": step}, folder / "rng_state_0.pth")
            (folder / "config.json").write_text(json.dumps({"model_type": "net"}))
            if step < 40:  # step 40's save is cut short before trainer_state.json
                (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        assert _wait_folded(out, 30)
        time.sleep(1.5)  # rescans after the last fold: a subfolder's files must not look re-written
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=30)
    assert daemon.returncode == 0, err
    assert "rewind" not in err and "Traceback" not in err, err
    status = json.loads((out / ".ckptavg" / "status.json").read_text())
    assert status["averages"]["ema-15"]["folded"] == 3 and status["rewinds"] == []
    got = load_file(out / "ema-15" / "model.safetensors")
    steps = [10, 20, 30]
    for k, v in states[10].items():
        if v.is_floating_point():
            want = _ema([states[s][k] for s in steps], steps, 15.0)
            torch.testing.assert_close(got[k], want.to(v.dtype), msg=k)
    assert json.loads((out / "ema-15" / "config.json").read_text()) == {"model_type": "net"}


# -- a real 2-rank FSDP2 run (row 85) -------------------------------------------------------------------------

def _ema(values: list[torch.Tensor], steps: list[int], half_life: float) -> torch.Tensor:
    ema = values[0].double()
    for prev, step, v in zip(steps, steps[1:], values[1:]):
        beta = 0.5 ** ((step - prev) / half_life)
        ema = beta * ema + (1 - beta) * v.double()
    return ema


@pytest.mark.slow
def test_row85_fsdp2_two_ranks_one_shot_and_daemon_folding_as_it_trains(tmp_path, ckptavg):
    """docs/FAULTS.md row 85: torchrun --nproc-per-node 2 (gloo, CPU) trains a tiny model under FSDP2
    (fully_shard; uneven dim-0 shards and an empty one) and saves model + optimizer with dcp.save every 3 steps
    (torchtitan's layout); rank 0 writes the gathered full state dict outside the run. The daemon, started
    beside the training, folds while it trains; the one-shot runs after. Both equal a float64 reference
    computed from the full state dicts (EMA and uniform)."""
    run, ref, out, oneshot = tmp_path / "run", tmp_path / "ref", tmp_path / "watch-out", tmp_path / "oneshot"
    run.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    daemon = subprocess.Popen(
        [sys.executable, "-m", "ckptavg.cli.main", "watch", str(run), "-o", str(out), "--ema", "6", "--uniform",
         "--settle", "0.1", "--poll-interval", "0.2", "--device", "cpu"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        trainer = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(TRAINER),
             str(run), str(ref), "--steps", "12", "--every", "3", "--pause", "0.5"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        folded_while_training = 0
        while trainer.poll() is None:
            try:
                status = json.loads((out / ".ckptavg" / "status.json").read_text())
                folded_while_training = max(folded_while_training, status.get("last_folded_step") or 0)
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        log = trainer.stdout.read()  # type: ignore[union-attr]
        assert trainer.returncode == 0, log
        assert folded_while_training >= 3, "the daemon folded nothing while the trainer ran"
        end = time.monotonic() + 60
        while time.monotonic() < end:
            try:
                if json.loads((out / ".ckptavg" / "status.json").read_text()).get("last_folded_step") == 12:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=30)
    assert daemon.returncode == 0, err
    assert "Traceback" not in err, err

    steps = [3, 6, 9, 12]
    full = [torch.load(ref / f"step-{s}.pt", weights_only=True) for s in steps]
    names = set(full[0])
    want = {
        "ema-6": {k: _ema([f[k] for f in full], steps, 6.0) for k in names},
        "uniform": {k: sum(f[k].double() for f in full) / len(full) for k in names},
    }
    r = ckptavg("average", run, "--method", "ema:6", "--method", "uniform", "-o", oneshot)
    assert r.code == 0, r
    for name, expected in want.items():
        for where in (oneshot / name, out / name):
            got = load_file(where / "model.safetensors")
            assert set(got) == names, (where, sorted(set(got) ^ names))  # no optimizer or train_state entries
            for k, v in expected.items():
                torch.testing.assert_close(got[k].double(), v, rtol=1e-6, atol=1e-6, msg=f"{where} {k}")
    # every checkpoint really was sharded across both ranks, unevenly, with an empty shard
    ckpt = open_checkpoint(run / "step-12")
    assert {f.name for f in ckpt.files} == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    assert ckpt.tensors["embed.weight"].shape == (11, 8) and ckpt.tensors["head.weight"].shape == (1, 8)
