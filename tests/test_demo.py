"""``ckptavg demo``: a real training loop, then averages that match ``ckptavg average`` bit for bit."""

from __future__ import annotations

from safetensors.torch import load_file


def test_demo_trains_averages_and_reports(tmp_path, ckptavg):
    out = tmp_path / "demo"
    r = ckptavg("demo", "--out", out, "--steps", "200", "--save-every", "20")
    assert r.code == 0, r
    checkpoints = sorted((out / "run").glob("checkpoint-*"))
    assert len(checkpoints) == 10
    for name in ("ema-80", "lawa-5", "swa-100", "uniform"):
        assert name in r.out
        assert (out / "avg" / name / "model.safetensors").is_file()
    assert "raw (last checkpoint)" in r.out
    # the demo's EMA is exactly what the one-shot CLI makes from the same checkpoints
    again = tmp_path / "again"
    r2 = ckptavg("average", *checkpoints, "--method", "ema:80", "-o", again)
    assert r2.code == 0, r2
    a = load_file(str(out / "avg" / "ema-80" / "model.safetensors"))
    b = load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_demo_refuses_to_overwrite(tmp_path, ckptavg):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = ckptavg("demo", "--out", out, "--steps", "40", "--save-every", "20")
    assert r.code == 2 and "--force" in r.err
    assert (out / "keep.txt").read_text() == "mine"
