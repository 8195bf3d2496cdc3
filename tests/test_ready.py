"""Readiness by the writer's rules (docs/FAULTS.md: what the checkpoint writers guarantee), with an injected clock."""

from __future__ import annotations

import json
import os
import time

import torch
from conftest import tiny_state, write_checkpoint, write_sharded_safetensors

from ckptavg.reading.ready import check_ready


def later(seconds: float = 60.0):
    return lambda: time.time() + seconds


def test_hf_trainer_checkpoint_waits_for_trainer_state(tmp_path):
    ck = tmp_path / "checkpoint-100"
    write_sharded_safetensors(ck, tiny_state(0), shard_bytes=1024)
    torch.save({}, ck / "optimizer.pt")
    r = check_ready(ck, clock=later())
    assert r.state == "waiting" and "trainer_state.json" in r.reason
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": 100}))
    assert check_ready(ck, clock=time.time).ready  # the marker is the commit: no settle wait
    shards = sorted(ck.glob("model-*.safetensors"))
    shards[-1].unlink()  # an indexed shard missing: not whole
    r = check_ready(ck, clock=later())
    assert r.state == "waiting" and shards[-1].name in r.reason


def test_bare_safetensors_needs_whole_file_and_quiet(tmp_path):
    f = write_checkpoint(tmp_path / "step_5.safetensors", tiny_state(0), "safetensors-file")
    assert check_ready(f, clock=time.time).state == "waiting"  # just written: inside the settle window
    assert check_ready(f, clock=later()).ready
    os.truncate(f, f.stat().st_size - 10)
    r = check_ready(f, clock=later())
    assert r.state == "waiting" and "truncated" in r.reason


def test_pickle_in_place_write_and_garbage(tmp_path):
    f = write_checkpoint(tmp_path / "epoch=0-step=9.ckpt", tiny_state(0), "lightning", step=9)
    assert check_ready(f, clock=later()).ready
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # half written: no zip end record
    r = check_ready(f, clock=later())
    assert r.state == "waiting" and "zip end" in r.reason
    g = tmp_path / "step_3.safetensors"
    g.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"[not a header....")
    assert check_ready(g, clock=time.time).state == "waiting"  # may still be mid-write
    assert check_ready(g, clock=later()).state == "bad"  # quiet and still garbage


def test_dcp_orbax_deepspeed_marker_and_noise(tmp_path):
    dcp = tmp_path / "step-10"
    dcp.mkdir()
    (dcp / "__0_0.distcp").write_bytes(b"x")
    (dcp / ".metadata.tmp").write_bytes(b"x")
    assert check_ready(dcp, clock=later()).state == "waiting"
    os.rename(dcp / ".metadata.tmp", dcp / ".metadata")
    assert check_ready(dcp, clock=later()).ready
    orbax = tmp_path / "step_20"
    write_checkpoint(orbax, tiny_state(0))
    (orbax / "commit_success.txt").write_text("")
    assert check_ready(orbax, clock=time.time).ready
    assert check_ready(tmp_path / "step_30.orbax-checkpoint-tmp-1", clock=later()).state == "waiting"
    ds = tmp_path / "ds"
    tag = ds / "global_step40"
    torch.save({"module": tiny_state(0)}, (tag.mkdir(parents=True) or tag) / "mp_rank_00_model_states.pt")
    (ds / "latest").write_text("global_step20")
    assert check_ready(tag, clock=later()).state == "waiting"
    (ds / "latest").write_text("global_step40")
    assert check_ready(tag, clock=later()).ready
    staged = tmp_path / "tmp-checkpoint-50"
    write_checkpoint(staged, tiny_state(0), step=50)
    assert check_ready(staged, clock=later()).state == "waiting"
    plain = write_checkpoint(tmp_path / "checkpoint-60", tiny_state(0))
    assert check_ready(plain, marker="COMPLETE", clock=later()).state == "waiting"
    (plain / "COMPLETE").write_text("")
    assert check_ready(plain, marker="COMPLETE", clock=time.time).ready
