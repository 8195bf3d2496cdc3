"""The benchmark suite runs end to end in its small CI mode and reports every measurement.

Not a timed test: nothing here asserts a speed. It asserts that each measurement ran
(or says why it was skipped), that the outputs of ckptavg pass the float64 exactness
check, that the check does catch an inexact output (fairseq's bf16 sums), and that
the JSON, markdown and printed table agree and the work folder is cleaned up.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "run.py"

sys.path.insert(0, str(ROOT / "benchmarks"))
from reference import correctly_rounded, ulp_distance

TIMED_BOTH = ("floor", "fairseq-bf16", "fairseq-fp32", "cli", "oneshot", "fold", "lawa-2", "lawa-5", "lawa-20")
TIMED_WARM = ("baseline", "write", "kernel1", "kernel3", "avgmodel")


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("bench")
    work = tmp / "work"
    out_json, out_md = tmp / "bench.json", tmp / "bench.md"
    proc = subprocess.run(
        [sys.executable, str(RUN), "--size", "16MB", "--k", "3", "--repeat", "1", "--workdir", str(work),
         "--json", str(out_json), "--markdown", str(out_md), "--quiet"],
        check=False, capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"summary": json.loads(out_json.read_text()), "markdown": out_md.read_text(), "stdout": proc.stdout,
            "work": work}


def _rows(summary: dict) -> dict[str, dict]:
    return {r["key"]: r for r in summary["rows"]}


@pytest.mark.slow
def test_every_measurement_is_present(bench: dict) -> None:
    rows = _rows(bench["summary"])
    for key in TIMED_BOTH + TIMED_WARM:
        assert key in rows, key
        r = rows[key]
        assert not r["skipped"], (key, r["skipped"])
        assert r["warm_seconds"] is not None and r["warm_seconds"] >= 0, key
        assert r["rss"] > 10 * 2**20, (key, r["rss"])  # a real child process's peak RSS, in bytes
    for key in TIMED_BOTH:
        assert rows[key]["cold_seconds"] is not None and rows[key]["cold_seconds"] > 0, key
        assert rows[key]["warm_gbps"] > 0, key
        assert rows[key]["ratio_floor_warm"] > 0 and rows[key]["ratio_floor_cold"] > 0, key
    for key in ("fairseq-bf16", "fairseq-fp32"):
        assert rows["cli"]["speedup_warm"][key] > 0 and rows["oneshot"]["speedup_cold"][key] > 0
    # peak RSS is the child's own: the read floor (no torch) stays far below any torch process
    assert rows["floor"]["rss"] < 100 * 2**20 < rows["baseline"]["rss"] <= rows["oneshot"]["rss"]
    # the floor read every input byte; the one-shot and the peers consume the same bytes
    assert rows["floor"]["extra"]["bytes"] == rows["floor"]["bytes"] == rows["cli"]["bytes"]
    assert rows["fold"]["extra"]["folds"] == 5 + 2 * 3  # window filled, then 3 warm and 3 cold folds
    assert rows["lawa-20"]["extra"]["folds"] == 20 + 2 * 3
    avg = rows["avgmodel"]["extra"]
    assert avg["step_plain"] > 0 and avg["step_ema"] > 0 and avg["update"] > 0 and avg["params"] > 10**6
    mk = rows["mergekit"]
    if importlib.util.find_spec("mergekit") is None:
        assert "not importable" in mk["skipped"]
    else:
        assert not mk["skipped"] and mk["check"]["exact"]
    assert bench["summary"]["cold"].startswith("posix_fadvise")


@pytest.mark.slow
def test_the_sweep_is_measured_against_its_averages_one_by_one(bench: dict) -> None:
    """The sweep row: K averages from one read, the same K one by one, the engine's read pass, each read once."""
    rows = _rows(bench["summary"])
    e = rows["sweep"]["extra"]
    assert e["k_averages"] == len(e["grid"]) == len(e["each"]) >= 9 and e["read_ratio"] == 1.0 and e["threads"] >= 1
    for key in ("sweep", "sweep-workers", "sweep-read", "sweep-each", "sweep-write", "sweep-each-write"):
        assert rows[key]["warm_seconds"] > 0 and not rows[key]["skipped"], key
    assert rows["sweep-each"]["bytes"] == e["k_averages"] * rows["sweep"]["bytes"]
    targets = {t["target"]: t for t in bench["summary"]["targets"]}
    assert any(name.startswith("sweep >= 4x faster") and t["pass"] in (True, False) for name, t in targets.items())
    assert any(name.startswith("sweep <= read + K x") and t["pass"] in (True, False) for name, t in targets.items())


@pytest.mark.slow
def test_outputs_checked_against_float64(bench: dict) -> None:
    rows = _rows(bench["summary"])
    for key in ("cli", "oneshot", "fairseq-fp32"):
        c = rows[key]["check"]
        assert c["exact"], (key, c)
        assert c["elements"] == rows["fold"]["extra"]["bytes"] // 2  # every bf16 element of a checkpoint
        assert c["max_ulps"] <= 1 and c["mismatch_fraction"] <= 1e-4 and not c["missing"]
    bad = rows["fairseq-bf16"]["check"]  # bf16 running sums: the check must catch them
    assert not bad["exact"] and bad["mismatch_fraction"] > 0.01 and bad["max_ulps"] > 1
    targets = {t["target"]: t for t in bench["summary"]["targets"]}
    assert targets["one-shot output exact"]["pass"] is True
    assert any("LAWA" in name for name in targets) and any("daemon fold" in name for name in targets)
    assert all(t["pass"] in (True, False, None) for t in targets.values())


@pytest.mark.slow
def test_table_markdown_and_cleanup(bench: dict) -> None:
    md, out = bench["markdown"], bench["stdout"]
    for text in (md, out):
        assert "read floor" in text and "ckptavg average (CLI, end to end)" in text and "LAWA fold, window 20" in text
    assert md.count("\n|") >= len(TIMED_BOTH) + len(TIMED_WARM) + 2
    assert "targets" in out and "cold cache: posix_fadvise" in out
    work = bench["work"]
    assert not any((work / sub).exists() for sub in ("run", "out", "logs")), list(work.iterdir())


def test_correct_rounding_of_the_reference() -> None:
    """The float64 → bf16 reference rounds once: values just off a bf16 tie round away from
    the tie's even neighbour when the float32 intermediate would land on the tie."""
    one = torch.tensor([1.0], dtype=torch.float64)
    half_ulp = 2.0**-8  # bf16 has 8 significant bits: the ulp at 1.0 is 2**-7
    above = one + half_ulp + 2.0**-40  # rounds to float32 exactly on the tie; the true value is above it
    below = one + half_ulp - 2.0**-40
    assert above.to(torch.float32).to(torch.bfloat16).item() == 1.0  # naive double rounding: wrong
    assert correctly_rounded(above, torch.bfloat16).item() == 1.0 + 2.0**-7
    assert correctly_rounded(below, torch.bfloat16).item() == 1.0
    assert correctly_rounded(one + half_ulp, torch.bfloat16).item() == 1.0  # an exact tie goes to even
    neg = correctly_rounded(-above, torch.bfloat16)
    assert neg.item() == -(1.0 + 2.0**-7)
    a = torch.tensor([1.0, -1.0, 0.0], dtype=torch.bfloat16)
    b = torch.tensor([1.0 + 2.0**-7, -1.0 - 2.0**-6, 0.0], dtype=torch.bfloat16)
    assert ulp_distance(a, b).tolist() == [1, 2, 0]
