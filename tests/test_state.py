"""Persisted state: resume is bitwise identical; corrupt, newer or foreign state is refused, never reset."""

from __future__ import annotations

import json

import pytest
import torch

from ckptavg import Engine, open_checkpoint
from ckptavg.errors import StateError, StateLockedError
from ckptavg.oneshot import AverageSpec, build_averages
from ckptavg.writing.state import StateStore

SPECS = [AverageSpec("ema", {"half_life": 150.0}), AverageSpec("lawa", {"window": 3}),
         AverageSpec("swa", {"start_step": 300}), AverageSpec("uniform")]


def _fold(engine, averages, ckpts, history):
    for c in ckpts:
        history[c.step] = c
        engine.fold(c, averages, ident=c.step, history=history)


def _results(averages):
    return {(a.name, n): a.result(n) for a in averages for n in a.slots}


def test_resume_is_bitwise_identical(tmp_path, make_run):
    ckpts = [open_checkpoint(p) for p in make_run([100, 200, 250, 400, 500, 700, 720])]
    with Engine() as engine:
        straight = build_averages(SPECS)
        _fold(engine, straight, ckpts, {})
        first = build_averages(SPECS)
        history: dict = {}
        _fold(engine, first, ckpts[:4], history)
        store = StateStore(tmp_path / "state")
        gen = store.save(first, extra={"last_step": 400})
        resumed = build_averages(SPECS)
        assert StateStore(tmp_path / "state").load(resumed) == {"last_step": 400}
        _fold(engine, resumed, ckpts[4:], history)
    a, b = _results(straight), _results(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r.step for r in resumed[0].folded] == [100, 200, 250, 400, 500, 700, 720]
    assert gen == 1


def test_generations_fall_back_and_refuse(tmp_path, make_run, caplog):
    ckpts = [open_checkpoint(p) for p in make_run([100, 200, 300])]
    store = StateStore(tmp_path / "state")
    with Engine() as engine:
        avgs = build_averages(SPECS)
        _fold(engine, avgs, ckpts[:2], {})
        store.save(avgs, {"gen": 1})
        _fold(engine, avgs, ckpts[2:], {c.step: c for c in ckpts})
        store.save(avgs, {"gen": 2})
        store.save(avgs, {"gen": 3})
    assert store.generations() == [2, 3]  # the previous generation is kept as the fallback
    acc = tmp_path / "state" / "accumulators-3.safetensors"
    data = bytearray(acc.read_bytes())
    data[-5] ^= 0xFF  # flip a byte in the data section
    acc.write_bytes(bytes(data))
    assert store.load(build_averages(SPECS)) == {"gen": 2}
    assert "generation 3 is unusable" in caplog.text
    (tmp_path / "state" / "manifest-2.json").write_text("{not json")
    with pytest.raises(StateError, match="no saved generation verifies"):
        store.load(build_averages(SPECS))


def test_newer_schema_and_other_configuration_are_refused(tmp_path, make_run):
    ckpts = [open_checkpoint(p) for p in make_run([100, 200])]
    store = StateStore(tmp_path / "state")
    with Engine() as engine:
        avgs = build_averages(SPECS)
        _fold(engine, avgs, ckpts, {})
        store.save(avgs)
    with pytest.raises(StateError, match="'ema-999'"):
        store.load(build_averages([AverageSpec("ema", {"half_life": 999.0})] + SPECS[1:]))
    # same name, other options: refused too, and nothing was restored into the first average
    avgs = build_averages([AverageSpec("lawa", {"window": 3}), AverageSpec("ema", {"half_life": 999.0}, name="ema-150")])
    with pytest.raises(StateError, match="'ema-150'"):
        store.load(avgs)
    assert not avgs[0].slots
    manifest = tmp_path / "state" / "manifest-1.json"
    data = json.loads(manifest.read_text())
    data["schema"] = 99
    manifest.write_text(json.dumps(data))
    with pytest.raises(StateError, match="newer ckptavg"):
        store.load(build_averages(SPECS))


def test_one_owner_at_a_time(tmp_path):
    a, b = StateStore(tmp_path / "s"), StateStore(tmp_path / "s")
    a.lock()
    with pytest.raises(StateLockedError, match=str(__import__("os").getpid())):
        b.lock()
    a.unlock()
    b.lock()
    b.unlock()
