"""``ckptavg demo``: a real trainer process with the daemon beside it, evaluation, best model, report."""

from __future__ import annotations

import json
import os

import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def test_demo_trains_with_the_daemon_beside_it_and_reports(tmp_path, ckptavg):
    """The README's main command, with its defaults."""
    out = tmp_path / "demo"
    r = ckptavg("demo", "--out", out)
    assert r.code == 0, r
    checkpoints = sorted((out / "run").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(checkpoints) == 30
    names = ("ema-160", "lawa-5", "swa-600", "uniform")
    for name in names:
        assert (out / "avg" / name / "model.safetensors").is_file()
    # every checkpoint was evaluated: raw and each average that had started, one row per candidate per round
    rows = [json.loads(line) for line in (out / "avg" / ".ckptavg" / "metrics.jsonl").read_text().splitlines()]
    assert all("metrics" in row for row in rows)
    last = {row["candidate"]: row for row in rows if row["step"] == 1200}
    assert set(last) == {"raw", *names}
    # the report printed each average's row next to raw's, and the plot and page exist
    table = r.out[r.out.index("candidate"):]
    for name in ("raw", *names):
        assert any(line.startswith(name) for line in table.splitlines()), name
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "data:image/png;base64," in (out / "report.html").read_text()
    # best/ is the candidate with the lowest val_loss across all rounds
    best = json.loads((out / "avg" / "best" / "ckptavg.json").read_text())["selection"]
    assert best["value"] == min(row["metrics"]["val_loss"] for row in rows)
    assert os.readlink(out / "avg" / "best").startswith(".best-versions/")
    # the averages helped on this run: the report says so, and the best model is an average
    assert best["kind"] == "average"
    assert "Every average beat the raw checkpoint." in r.out
    # the daemon's EMA is exactly what the one-shot CLI makes from the same checkpoints
    again = tmp_path / "again"
    r2 = ckptavg("average", *checkpoints, "--method", "ema:160", "-o", again)
    assert r2.code == 0, r2
    a = load_file(str(out / "avg" / "ema-160" / "model.safetensors"))
    b = load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_demo_refuses_to_overwrite(tmp_path, ckptavg):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = ckptavg("demo", "--out", out, "--steps", "40", "--save-every", "20")
    assert r.code == 2 and "--force" in r.err
    assert (out / "keep.txt").read_text() == "mine"
