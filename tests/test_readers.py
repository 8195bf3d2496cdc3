"""Every reader returns what the writer put in; steps, run folders, inspect, private-memory reads."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import tiny_state, write_checkpoint
from safetensors.torch import load_file

from ckptavg import open_checkpoint
from ckptavg.reading.steps import step_from_name


@pytest.mark.parametrize("fmt", ["safetensors", "safetensors-file", "sharded", "bin", "bin-sharded", "pt", "lightning"])
def test_reader_roundtrip(tmp_path, fmt):
    state = tiny_state(3)
    name = {"safetensors-file": "m.safetensors", "pt": "m.pt", "lightning": "m.ckpt"}.get(fmt, "ck")
    path = write_checkpoint(tmp_path / name, state, fmt, shard_bytes=1024, step=7)
    ckpt = open_checkpoint(path)
    assert set(ckpt.tensors) == set(state)  # Lightning's "model." prefix is stripped automatically
    with ckpt.reader() as r:
        for k, v in state.items():
            got = r.read(k)
            assert got.dtype == v.dtype and torch.equal(got, v), k
    if fmt == "lightning":
        assert ckpt.step == 7 and ckpt.step_source.startswith("global_step")
    if fmt == "sharded":
        assert len(ckpt.files) > 1


def test_pickle_nesting_state_key_and_prefixes(tmp_path, ckptavg):
    state = tiny_state(0, dtype=torch.float32)
    nested = tmp_path / "nested_step_1.pt"
    torch.save({"model": state, "optimizer": {"lr": 0.1}, "step": 3}, nested)
    assert set(open_checkpoint(nested).tensors) == set(state)
    two = tmp_path / "two_step_1.pt"
    torch.save({"model": state, "ema": {k: v * 2 for k, v in state.items()}}, two)
    with open_checkpoint(two, state_key="ema").reader() as r:
        assert torch.equal(r.read("embed.weight"), state["embed.weight"] * 2)
    ddp = tmp_path / "ddp_step_1.pt"
    torch.save({f"module._orig_mod.{k}": v for k, v in state.items()}, ddp)
    assert set(open_checkpoint(ddp).tensors) == set(state)
    ckpt = write_checkpoint(tmp_path / "epoch=0-step=5.ckpt", state, "lightning", step=5)
    assert set(open_checkpoint(ckpt, strip_prefix="").tensors) == {f"model.{k}" for k in state}
    r = ckptavg("average", ckpt, "--strip-prefix", "none", "-o", tmp_path / "keep")
    assert r.code == 0, r
    assert set(load_file(str(tmp_path / "keep" / "model.safetensors"))) == {f"model.{k}" for k in state}
    r = ckptavg("average", two, "--state-key", "nope", "-o", tmp_path / "x")
    assert r.code == 1 and "nope" in r.err and "two_step_1.pt" in r.err


@pytest.mark.parametrize("name,step", [
    ("checkpoint-9000", 9000), ("step-12", 12), ("step_13", 13), ("epoch=3-step=9000.ckpt", 9000),
    ("ckpt_step_15.pth", 15), ("global_step77", 77), ("iter_0000100", 100), ("runs/step-1/checkpoint-500", 500),
    ("model.safetensors", None), ("last.ckpt", None),
])
def test_step_from_name(name, step):
    assert step_from_name(name) == step


def test_step_from_trainer_state(tmp_path):
    p = write_checkpoint(tmp_path / "final", tiny_state(0), step=4242)
    assert open_checkpoint(p).step == 4242


def test_last_skips_incomplete_newest(tmp_path, ckptavg, make_run):
    paths = make_run([100, 200, 300, 400], fmt="sharded", shard_bytes=1024)
    (paths[3] / "trainer_state.json").unlink()  # being written: Trainer files present, state not yet
    torch.save({}, paths[3] / "optimizer.pt")
    shard = sorted(paths[2].glob("model-*.safetensors"))[-1]
    shard.unlink()  # a shard missing
    out = tmp_path / "out"
    r = ckptavg("average", paths[0].parent, "--last", "2", "-o", out)
    assert r.code == 0, r
    assert json.loads((out / "ckptavg.json").read_text())["steps"] == [100, 200]
    assert "skipping" in r.err and "checkpoint-400" in r.err and "checkpoint-300" in r.err
    # one log line per checkpoint when no terminal is attached
    assert r.err.count("INFO: read checkpoint-") == 2
    r = ckptavg("average", paths[3], "-o", tmp_path / "o2")
    assert r.code == 1 and "trainer_state.json" in r.err


def test_inspect_reports(tmp_path, ckptavg, make_run):
    (ck,) = make_run([300], fmt="sharded", shard_bytes=1024)
    r = ckptavg("inspect", ck, "--json", "--tensors")
    assert r.code == 0, r
    info = json.loads(r.out)
    state = tiny_state(0)
    assert info["format"] == "safetensors-sharded" and info["step"] == 300 and info["complete"]
    assert info["tensors"] == len(state) and len(info["files"]) > 1
    assert info["bytes"] == sum(v.numel() * v.element_size() for v in state.values())
    assert info["dtypes"]["bfloat16"]["tensors"] == 3 and info["dtypes"]["int64"]["tensors"] == 1
    assert {t["name"] for t in info["tensor_list"]} == set(state)
    r = ckptavg("inspect", ck)
    assert "safetensors-sharded" in r.out and "step:        300" in r.out and "complete:    yes" in r.out
    (ck / "trainer_state.json").unlink()
    torch.save({}, ck / "optimizer.pt")
    r = ckptavg("inspect", ck)
    assert "complete:    no" in r.out


def test_reads_are_private_copies(tmp_path):
    """Tensors read earlier stay intact when the file is truncated afterwards (no memory map)."""
    f = write_checkpoint(tmp_path / "a.safetensors", {"w": torch.arange(100_000, dtype=torch.float32)}, "safetensors-file")
    ckpt = open_checkpoint(f)
    with ckpt.reader() as r:
        t = r.read("w")
    os.truncate(f, 16)
    assert torch.equal(t, torch.arange(100_000, dtype=torch.float32))
