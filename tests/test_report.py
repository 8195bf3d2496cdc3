"""``ckptavg report``: numbers copied exactly from metrics.jsonl, steps to target, the plot and the HTML page.

The metrics files are written by hand in the daemon's schema: a noisy, decreasing raw validation loss
that plateaus; an EMA that is smoother and lower (it reaches the raw best sooner); a LAWA that is
worse at every round. Expected values are computed here from the records themselves.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import random
import re
import struct
import sys
from pathlib import Path

import pytest

from ckptavg.errors import CkptavgError, UsageError
from ckptavg.publishing.report import PLOT_SKIPPED, build_report, load_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS = list(range(100, 3100, 100))


def make_records(*, fail_ema_at: int | None = 600, extra: dict[str, float] | None = None) -> list[dict]:
    rng = random.Random(1234)
    records = []
    for rnd, step in enumerate(STEPS, start=1):
        wall = (step - STEPS[0]) * 2.5  # trainer seconds since the first checkpoint: ~2 h in all
        clean = 0.9 + 1.5 * math.exp(-step / 500)
        values = {
            "raw": round(clean + rng.uniform(-0.05, 0.05), 6),
            "ema-160": round(clean - 0.1 + rng.uniform(-0.003, 0.003), 6),
            "lawa-5": round(clean + 0.08 + rng.uniform(-0.01, 0.01), 6),
        }
        for name, offset in (extra or {}).items():
            values[name] = round(clean + offset, 6)
        for name, loss in values.items():
            method = "raw" if name == "raw" else name.split("-")[0]
            rec = {"round": rnd, "step": step, "written_at": 1763900000.5 + wall, "wall_time": wall,
                   "candidate": name, "kind": "raw" if name == "raw" else "average", "method": method,
                   "options": {"half_life": 160.0} if method == "ema" else {"window": 5} if method == "lawa" else {},
                   "evaluator": "python:ckptavg.demo:evaluate_folder", "evaluated_at": 1763900003.1 + wall,
                   "eval_seconds": 0.4}
            if name == "ema-160" and step == fail_ema_at:
                rec["error"] = "evaluator exited with status 1"
            else:
                rec["metrics"] = {"val_loss": loss, "val_acc": round(1.0 - loss / 3, 6)}
            records.append(rec)
    return records


def write_metrics(out: Path, records: list[dict], *, eval_json: dict | None = None, tail: str = "") -> Path:
    state = out / ".ckptavg"
    state.mkdir(parents=True, exist_ok=True)
    path = state / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    if eval_json is not None:
        (state / "eval.json").write_text(json.dumps(eval_json))
    return path


def points(records: list[dict], name: str, metric: str = "val_loss") -> list[tuple[int, float, float]]:
    return [(r["step"], r["wall_time"], r["metrics"][metric]) for r in records
            if r["candidate"] == name and "metrics" in r]


def first_reaching(pts: list[tuple[int, float, float]], target: float, mode: str = "min"):
    return next((p for p in pts if (p[2] <= target if mode == "min" else p[2] >= target)), None)


def table_rows(text: str) -> dict[str, list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("---")) + 1
    rows = {}
    for line in lines[start:]:
        if not line.strip():
            break
        cells = line.split()
        rows[cells[0]] = cells
    return rows


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, list[dict]]:
    records = make_records()
    out = tmp_path / "avg"
    write_metrics(out, records, eval_json={"metric": "val_loss", "mode": "min"})
    return out, records


def test_fixture_is_what_the_tests_claim(run):
    _, records = run
    raw, ema, lawa = (points(records, n) for n in ("raw", "ema-160", "lawa-5"))
    raw_best = min(p[2] for p in raw)
    assert first_reaching(ema, raw_best)[0] < first_reaching(raw, raw_best)[0]
    assert all(lw[2] > r[2] for lw, r in zip(lawa, raw, strict=True))


def test_table_numbers_are_exactly_the_files(run):
    out, records = run
    rep = build_report(out)
    rows = table_rows(rep.table_text())
    assert list(rows) == ["raw", "ema-160", "lawa-5"]  # raw first, then the averages in file order
    for name in rows:
        pts = points(records, name)
        best = min(pts, key=lambda p: p[2])
        cells = rows[name]
        assert cells[4] == repr(best[2]) and float(cells[4]) == best[2]
        assert cells[5] == str(best[0])
        assert cells[6] == repr(pts[-1][2])
        assert cells[2] == str(len(pts))
    assert rows["ema-160"][3] == "1" and rows["raw"][3] == "0"  # the failed evaluation is counted, not used
    assert "val_loss (min: lower is better)" in rep.table_text()


def test_steps_and_hours_to_the_raw_best(run):
    out, records = run
    rep = build_report(out)
    raw, ema = points(records, "raw"), points(records, "ema-160")
    target = min(p[2] for p in raw)
    raw_hit, ema_hit = first_reaching(raw, target), first_reaching(ema, target)
    data = rep.to_json()
    assert data["target"] == target and data["target_source"] == "the raw checkpoint's best"
    by_name = {c["name"]: c for c in data["candidates"]}
    assert by_name["raw"]["target_reached"] == {"step": raw_hit[0], "wall_time": raw_hit[1], "value": raw_hit[2]}
    ema_json = by_name["ema-160"]
    assert ema_json["target_reached"]["step"] == ema_hit[0]
    assert ema_json["steps_saved"] == raw_hit[0] - ema_hit[0] > 0
    assert ema_json["steps_saved_pct"] == pytest.approx(100 * (raw_hit[0] - ema_hit[0]) / raw_hit[0])
    assert ema_json["seconds_saved"] == pytest.approx(raw_hit[1] - ema_hit[1])
    assert ema_json["best_ratio_vs_raw"] == pytest.approx(min(p[2] for p in ema) / target)
    assert ema_json["helped"] is True
    text = rep.table_text()
    pct = 100 * (raw_hit[0] - ema_hit[0]) / raw_hit[0]
    assert f"ema-160 reached the target {raw_hit[0] - ema_hit[0]} steps ({pct:.1f}%) earlier than raw" in text
    row = table_rows(text)["ema-160"]
    assert row[7] == str(ema_hit[0])
    assert row[8] == f"{ema_hit[1] / 3600:.2f}"  # the run is over 2 h long: hours
    assert "target at (hours)" in text


def test_lawa_that_never_beat_raw_is_named(run):
    out, _ = run
    rep = build_report(out)
    text = rep.table_text()
    assert f"lawa-5 never beat the raw checkpoint (worse or equal in all {len(STEPS)} rounds compared)" in text
    assert "ema-160 never beat" not in text
    data = rep.to_json()
    assert data["did_not_help"] == ["lawa-5"]
    lawa = next(c for c in data["candidates"] if c["name"] == "lawa-5")
    assert lawa["rounds_beating_raw"] == 0 and lawa["target_reached"] is None


def test_explicit_target_and_max_mode_from_eval_json(tmp_path):
    records = make_records()
    out = tmp_path / "avg"
    write_metrics(out, records, eval_json={"metric": "val_acc", "mode": "max"})
    rep = build_report(out, target=0.6)
    assert (rep.metric, rep.mode, rep.target) == ("val_acc", "max", 0.6)
    for name in ("raw", "ema-160", "lawa-5"):
        pts = points(records, name, "val_acc")
        c = next(c for c in rep.candidates if c.name == name)
        assert c.best.value == max(p[2] for p in pts)
        hit = first_reaching(pts, 0.6, "max")
        assert (c.target.step if c.target else None) == (hit[0] if hit else None)
    # --metric/--mode override the daemon's choice
    rep = build_report(out, metric="val_loss", mode="min")
    assert rep.raw.best.value == min(p[2] for p in points(records, "raw"))


def test_png_has_two_panels_and_a_dashed_target(run, tmp_path):
    out, _ = run
    rep = build_report(out)
    fig = rep.figure()
    assert len(fig.axes) == 2
    ax_step, ax_time = fig.axes
    assert "step" in ax_step.get_xlabel() and "hours" in ax_time.get_xlabel()
    for ax in fig.axes:
        dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
        assert len(dashed) == 1 and list(dashed[0].get_ydata()) == [rep.target, rep.target]
        raw_line = next(line for line in ax.get_lines() if line.get_color() == "black")
        assert list(raw_line.get_ydata()) == [p.value for p in rep.raw.points]
    png = rep.write_png(tmp_path / "r.png").read_bytes()
    assert png[:8] == PNG_SIGNATURE and png[12:16] == b"IHDR"
    assert struct.unpack(">II", png[16:24]) == (1200, 480)


def test_html_is_self_contained_and_escapes_names(tmp_path):
    evil = '<img src="http://evil.example/x.png">$x$'
    records = make_records(extra={evil: -0.05})
    out = tmp_path / "avg"
    write_metrics(out, records)
    rep = build_report(out)
    page = rep.write_html(tmp_path / "r.html").read_text()
    m = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert m and base64.b64decode(m.group(1))[:8] == PNG_SIGNATURE
    assert 'src="http' not in page and "href=" not in page and "<link" not in page and "<script" not in page
    assert evil not in page and html_escape(evil) in page
    assert "<table>" in page and f"<td>{rep.raw.best.value!r}</td>" in page


def html_escape(text: str) -> str:
    import html

    return html.escape(text)


def test_truncated_last_line_is_ignored_with_a_warning(tmp_path, caplog):
    records = make_records()
    out = tmp_path / "avg"
    path = write_metrics(out, records, tail='{"round": 31, "step": 3100, "candidate": "raw", "metrics": {"val_lo')
    with caplog.at_level(logging.WARNING, logger="ckptavg"):
        assert len(load_metrics(path)) == len(records)
    assert f"line {len(records) + 1}" in caplog.text and "does not parse" in caplog.text
    rep = build_report(out)
    assert rep.raw.final.step == STEPS[-1]


def test_bad_line_in_the_middle_is_an_error_naming_the_line(tmp_path, ckptavg):
    records = make_records()
    out = tmp_path / "avg"
    path = write_metrics(out, records)
    lines = path.read_text().splitlines()
    lines[4] = lines[4][:40]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CkptavgError, match="line 5 is not valid JSON") as e:
        load_metrics(path)
    assert e.value.path == path
    r = ckptavg("report", out)
    assert r.code == 1 and "metrics.jsonl" in r.err and "line 5" in r.err and "Traceback" not in r.err
    lines[4] = json.dumps({"candidate": "raw", "step": "12", "metrics": {}})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CkptavgError, match=r"line 5: \"step\" must be an integer"):
        load_metrics(path)


def test_cli_prints_the_table_and_writes_png_and_html(run, ckptavg):
    out, records = run
    r = ckptavg("report", out)
    assert r.code == 0, r
    rows = table_rows(r.out)
    assert rows["raw"][4] == repr(min(p[2] for p in points(records, "raw")))
    assert f"plot: {out / 'report.png'}" in r.out and f"html: {out / 'report.html'}" in r.out
    assert (out / "report.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "data:image/png;base64," in (out / "report.html").read_text()


def test_cli_json_and_custom_paths_and_the_file_as_argument(run, ckptavg, tmp_path):
    out, records = run
    png, page = tmp_path / "elsewhere.png", tmp_path / "elsewhere.html"
    r = ckptavg("report", out / ".ckptavg" / "metrics.jsonl", "--json", "--png", png, "--html", page,
                "--metric", "val_acc", "--mode", "max")
    assert r.code == 0, r
    data = json.loads(r.out)
    assert data["metric"] == "val_acc" and data["target"] == max(p[2] for p in points(records, "raw", "val_acc"))
    assert png.exists() and page.exists() and not (out / "report.png").exists()
    assert str(png) in r.err


def test_cli_errors(tmp_path, ckptavg, run):
    out, _ = run
    empty = tmp_path / "no-eval"
    empty.mkdir()
    r = ckptavg("report", empty)
    assert r.code == 2 and "metrics.jsonl" in r.err and "evaluator" in r.err
    r = ckptavg("report", out, "--metric", "bleu")
    assert r.code == 2 and "'bleu'" in r.err and "val_loss, val_acc" in r.err
    r = ckptavg("report", out, "--mode", "lowest")
    assert r.code == 2
    r = ckptavg("report", out, "--target", "nan")
    assert r.code == 2 and "--target" in r.err
    assert not (empty / "report.png").exists()


def test_eval_json_naming_an_absent_metric(tmp_path, ckptavg):
    out = tmp_path / "avg"
    write_metrics(out, make_records(), eval_json={"metric": "perplexity", "mode": "min"})
    with pytest.raises(UsageError, match="eval.json"):
        build_report(out)
    assert build_report(out, metric="val_loss").metric == "val_loss"
    (out / ".ckptavg" / "eval.json").write_text('{"metric": "val_loss", "mode": "lowest"}')
    r = ckptavg("report", out)
    assert r.code == 2 and "eval.json" in r.err and "'lowest'" in r.err and "--mode" in r.err


def test_every_evaluation_failed(tmp_path, ckptavg):
    out = tmp_path / "avg"
    records = [{"round": 1, "step": 100, "wall_time": 0.0, "candidate": "raw", "kind": "raw",
                "error": "CUDA out of memory"}]
    write_metrics(out, records)
    r = ckptavg("report", out)
    assert r.code == 1 and "CUDA out of memory" in r.err


def test_without_matplotlib_the_table_still_prints(run, ckptavg, monkeypatch):
    out, records = run
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    r = ckptavg("report", out)
    assert r.code == 0 and r.err.splitlines() == [PLOT_SKIPPED], r
    assert table_rows(r.out)["raw"][4] == repr(min(p[2] for p in points(records, "raw")))
    assert not (out / "report.png").exists()
    page = (out / "report.html").read_text()
    assert "data:image/png" not in page and "matplotlib is not installed" in page


def test_no_raw_no_wall_clock_and_a_nan(tmp_path, caplog):
    out = tmp_path / "avg"
    state = out / ".ckptavg"
    state.mkdir(parents=True)
    (state / "metrics.jsonl").write_text(
        '{"step": 10, "candidate": "ema-5", "kind": "average", "metrics": {"loss": 2}, "wall_time": null}\n'
        '{"step": 20, "candidate": "ema-5", "kind": "average", "metrics": {"loss": NaN}, "wall_time": null}\n'
        '{"step": 30, "candidate": "ema-5", "kind": "average", "metrics": {"loss": 1.5}, "wall_time": null}\n'
        '{"step": 40, "candidate": "ema-5", "kind": "average", "metrics": {"loss": 1.5}, "wall_time": null}\n')
    with caplog.at_level(logging.WARNING, logger="ckptavg"):
        rep = build_report(out)
    assert "skipped 1 evaluation(s) with no finite loss" in caplog.text
    assert rep.raw is None and rep.target is None and rep.time_unit() is None
    ema = rep.candidates[0]
    assert [p.value for p in ema.points] == [2, 1.5, 1.5]
    assert (ema.best.step, ema.final.step) == (30, 40)  # a tie: the best was first reached at step 30
    assert "No raw checkpoint was evaluated" in rep.table_text()
    fig = rep.figure()
    assert len(fig.axes) == 2 and not fig.axes[1].get_lines()  # no wall clock: an empty, labelled panel
    assert json.loads(json.dumps(rep.to_json()))["candidates"][0]["best"]["value"] == 1.5
