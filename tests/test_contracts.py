"""The file contracts (``ckptavg.contracts``): the exact bytes the daemon writes, what readers accept, and
the errors they raise for a damaged file (a corrupt ``status.json`` is one line, exit 1, never a traceback)."""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import pytest

from ckptavg.contracts.evalsettings import EVAL_FILE, EvalSettings, read_eval_settings, write_eval_settings
from ckptavg.contracts.metrics import METRICS_FILE, MetricsRow, append_row, is_better, read_rows
from ckptavg.contracts.status import (
    STATUS_FILE,
    AverageStatus,
    BestModel,
    EvaluationStatus,
    FoldStats,
    HubStatus,
    StatusDoc,
    owned_section,
    read_status,
    write_status,
)
from ckptavg.errors import CkptavgError, MetricsError, StatusError, UsageError

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- metrics.jsonl

OK_ROW = {"round": 3, "step": 300, "written_at": 1763900000.5, "wall_time": 200.0, "candidate": "ema-160",
          "kind": "average", "method": "ema", "options": {"half_life": 160.0}, "evaluator": "python:m:f",
          "metrics": {"val_loss": 1.2345678901234567, "val_acc": 0.5}, "evaluated_at": 1763900003.25,
          "eval_seconds": 0.4123}
ERR_ROW = {"round": 3, "step": 300, "written_at": None, "wall_time": None, "candidate": "raw", "kind": "raw",
           "method": None, "options": None, "evaluator": "command", "error": "evaluator exited with status 1",
           "evaluated_at": 1763900004.0, "eval_seconds": 0.01}


def test_append_row_writes_the_daemons_bytes(tmp_path):
    """One line per row, keys in the daemon's order, metrics or error: byte for byte what it wrote before."""
    path = tmp_path / METRICS_FILE
    ok = MetricsRow(**{k: v for k, v in OK_ROW.items()})
    err = MetricsRow(**{k: v for k, v in ERR_ROW.items()})
    append_row(path, ok)
    append_row(path, err)
    expected = (json.dumps(OK_ROW, sort_keys=False) + "\n" + json.dumps(ERR_ROW, sort_keys=False) + "\n").encode()
    assert path.read_bytes() == expected
    assert read_rows(path) == [ok, err]
    assert not ok.failed and err.failed and err.metrics is None


def test_read_rows_tolerates_a_truncated_last_line_only(tmp_path, caplog):
    path = tmp_path / METRICS_FILE
    good = json.dumps(OK_ROW) + "\n"
    path.write_text(good * 3 + good[:25])
    with caplog.at_level(logging.WARNING, logger="ckptavg"):
        assert len(read_rows(path)) == 3
    assert "line 4" in caplog.text and "does not parse" in caplog.text
    path.write_text(good + good[:25] + "\n" + good)
    with pytest.raises(MetricsError, match="line 2 is not valid JSON") as e:
        read_rows(path)
    assert e.value.path == path and str(path) in str(e.value)
    path.write_text(good + json.dumps({"candidate": "raw", "step": 1}) + "\n" + good)
    with pytest.raises(MetricsError, match=r"line 2: neither \"metrics\""):
        read_rows(path)
    with pytest.raises(UsageError, match="no metrics.jsonl here"):
        read_rows(tmp_path / "absent.jsonl")


def test_a_hand_written_row_keeps_missing_fields_as_none(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 10, "candidate": "ema-5", "metrics": {"loss": 2}}\n'
                    '{"step": 20, "candidate": "raw", "error": null}\n')
    a, b = read_rows(path)
    assert (a.kind, a.round, a.wall_time, a.error, a.metrics) == (None, None, None, None, {"loss": 2})
    assert b.failed and b.error == "None"


@pytest.mark.parametrize("value,best,mode,expected", [
    (1.0, None, "min", True), (1.0, None, "max", True), (1.0, 2.0, "min", True), (2.0, 1.0, "min", False),
    (1.0, 1.0, "min", False), (2.0, 1.0, "max", True), (1.0, 1.0, "max", False), (1.0, 2.0, "max", False),
])
def test_is_better(value, best, mode, expected):
    assert is_better(value, best, mode) is expected


# ---------------------------------------------------------------- eval.json


def test_eval_settings_round_trip_and_errors(tmp_path):
    path = tmp_path / EVAL_FILE
    assert read_eval_settings(path) is None
    write_eval_settings(path, EvalSettings(metric="val_loss", mode="min", every=2, kind="python"))
    assert path.read_bytes() == json.dumps({"metric": "val_loss", "mode": "min", "every": 2, "kind": "python"},
                                           indent=1).encode()
    assert read_eval_settings(path) == EvalSettings("val_loss", "min", 2, "python")
    path.write_text("[1, 2]")
    with pytest.raises(MetricsError, match="expected a JSON object"):
        read_eval_settings(path)
    path.write_text('{"metric": ')
    with pytest.raises(MetricsError, match="cannot read the evaluation settings"):
        read_eval_settings(path)


# ---------------------------------------------------------------- status.json

BEST = {"candidate": "ema-160", "kind": "average", "method": "ema", "options": {"half_life": 160.0}, "step": 300,
        "round": 3, "metric": "val_loss", "mode": "min", "value": 1.25, "metrics": {"val_loss": 1.25},
        "raw_metrics_same_step": {"val_loss": 1.5}, "version": 2, "steps_folded": [100, 200, 300],
        "published_at": 1763900010.0, "folder": "/out/.best-versions/v0002-step300-ema-160"}
HUB = {"repo": "me/model", "revision": None, "state": "idle", "last_commit": "abc123", "last_step": 300,
       "pending_step": None, "attempts": 0, "last_error": None}
FOLD = {"step": 300, "bytes": 123456789, "seconds": 0.5, "gbps": 0.247}


def legacy_status() -> dict:
    """The document as the daemon writes it (keys and order): as before the contract, plus the trust fields."""
    return {
        "pid": 4242, "state": "watching", "watch": "/run", "output": "/out", "watcher": "polling", "updated": 1e9,
        "averages": {"ema-160": {"method": "ema", "options": {"half_life": 160.0}, "folded": 3, "last_step": 300},
                     "lawa-5": {"method": "lawa", "options": {"window": 5}, "folded": 0, "last_step": None}},
        "folding_step": None, "last_folded_step": 300, "newest_seen_step": 400, "lag_steps": 100, "queued": [400],
        "skipped": [], "last_error": None, "last_fold": FOLD,
        "evaluation": {"kind": "python", "metric": "val_loss", "mode": "min", "rounds": 3,
                       "last_evaluated_step": 300, "running_step": None, "pending_step": None,
                       "skipped_rounds": 1, "failures": 0, "last_error": None, "best": BEST},
        "hub": HUB, "degraded": None, "halted": None,
        "rewinds": [{"at": 300, "back_to": 200, "abandoned": [300], "why": "re-written", "time": 1e9}],
        "missed": [{"after": 100, "before": 400, "every": 100, "source": "cadence", "count": 2}],
    }


def built_status() -> StatusDoc:
    return StatusDoc(
        pid=4242, state="watching", watch="/run", output="/out", watcher="polling", updated=1e9,
        averages={"ema-160": AverageStatus("ema", {"half_life": 160.0}, 3, 300),
                  "lawa-5": AverageStatus("lawa", {"window": 5}, 0, None)},
        folding_step=None, last_folded_step=300, newest_seen_step=400, lag_steps=100, queued=[400], skipped=[],
        last_error=None, last_fold=owned_section(FoldStats, FOLD),
        evaluation=EvaluationStatus(kind="python", metric="val_loss", mode="min", rounds=3, last_evaluated_step=300,
                                    skipped_rounds=1, best=owned_section(BestModel, BEST)),
        hub=owned_section(HubStatus, HUB),
        rewinds=[{"at": 300, "back_to": 200, "abandoned": [300], "why": "re-written", "time": 1e9}],
        missed=[{"after": 100, "before": 400, "every": 100, "source": "cadence", "count": 2}])


def test_write_status_writes_the_daemons_bytes_and_reads_back(tmp_path):
    path = tmp_path / STATUS_FILE
    write_status(path, built_status())
    assert path.read_bytes() == json.dumps(legacy_status(), indent=1).encode()
    doc = read_status(path)
    assert doc.to_json() == legacy_status() and list(doc.to_json()) == list(legacy_status())
    assert doc.averages["lawa-5"] == AverageStatus("lawa", {"window": 5}, 0, None)
    assert doc.evaluation.best.value == 1.25 and doc.evaluation.best.candidate == "ema-160"
    assert doc.hub.repo == "me/model" and doc.hub.to_json()["attempts"] == 0
    assert doc.last_fold.bytes == 123456789


def test_status_without_evaluation_or_hub_and_unknown_keys(tmp_path):
    path = tmp_path / STATUS_FILE
    data = {**legacy_status(), "evaluation": None, "hub": None, "last_fold": None, "from_a_newer_daemon": 1}
    path.write_text(json.dumps(data))
    doc = read_status(path)
    assert doc.evaluation is None and doc.hub is None and doc.last_fold is None
    assert doc.to_json() == data  # kept whole, for `ckptavg status --json`


def test_a_missing_status_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_status(tmp_path / STATUS_FILE)


def _broken_documents() -> list[tuple[str, str, str]]:
    good = json.dumps(legacy_status(), indent=1)

    def variant(**changes) -> str:
        return json.dumps({**legacy_status(), **changes})

    ev = legacy_status()["evaluation"]
    return [
        ("truncated", good[: len(good) // 2], "not valid JSON"),
        ("empty", "", "is empty"),
        ("not-json", "pid=4242 state=watching\n", "not valid JSON"),
        ("a-list", "[1, 2, 3]", "expected a JSON object, found a list"),
        ("a-string", '"watching"', "expected a JSON object, found a string"),
        ("averages-a-list", variant(averages=["ema-160"]), "'averages' must be a JSON object"),
        ("averages-missing", json.dumps({k: v for k, v in legacy_status().items() if k != "averages"}),
         "no 'averages'"),
        ("average-not-an-object", variant(averages={"ema": 3}), "averages.ema: expected a JSON object"),
        ("folded-a-string", variant(averages={"ema": {"method": "ema", "folded": "3"}}),
         "averages.ema: 'folded' must be an integer"),
        ("evaluation-a-list", variant(evaluation=[1]), "evaluation: expected a JSON object"),
        ("best-value-a-string", variant(evaluation={**ev, "best": {**BEST, "value": "1.25"}}),
         "evaluation.best: 'value' must be a number"),
        ("updated-null", variant(updated=None), "'updated' must be a number"),
        ("state-missing", json.dumps({k: v for k, v in legacy_status().items() if k != "state"}), "no 'state'"),
    ]


@pytest.mark.parametrize("name,text,what", _broken_documents(), ids=[b[0] for b in _broken_documents()])
def test_a_broken_status_is_a_status_error_naming_the_file(tmp_path, name, text, what):
    path = tmp_path / STATUS_FILE
    path.write_text(text)
    with pytest.raises(StatusError) as e:
        read_status(path)
    assert isinstance(e.value, CkptavgError) and e.value.path == path
    assert str(e.value).startswith(f"{path}: ") and what in str(e.value), str(e.value)


def test_a_non_utf8_status_is_a_status_error(tmp_path):
    path = tmp_path / STATUS_FILE
    path.write_bytes(b'{"pid": "\xff\xfe"}')
    with pytest.raises(StatusError, match="cannot read"):
        read_status(path)


# ---------------------------------------------------------------- `ckptavg status`


@pytest.mark.parametrize("text", [
    json.dumps(legacy_status(), indent=1)[:200],  # truncated
    "not json at all",
    "[]",
    json.dumps({**legacy_status(), "averages": [1, 2]}),
    json.dumps({**legacy_status(), "averages": "ema"}),
])
def test_cli_status_on_a_corrupt_file_is_one_line_exit_1(tmp_path, ckptavg, text):
    out = tmp_path / "avg"
    (out / ".ckptavg").mkdir(parents=True)
    path = out / ".ckptavg" / STATUS_FILE
    path.write_text(text)
    for args in ((), ("--json",)):
        r = ckptavg("status", out, *args)
        assert r.code == 1, r
        lines = r.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"ckptavg: error: {path}: "), r
        assert "AttributeError" not in r.err and "TypeError" not in r.err and "Traceback" not in r.err


def test_cli_status_missing_is_still_a_usage_error(tmp_path, ckptavg):
    r = ckptavg("status", tmp_path)
    assert r.code == 2 and "no daemon status here" in r.err


def test_cli_status_shows_a_good_document(tmp_path, ckptavg):
    out = tmp_path / "avg"
    state = out / ".ckptavg"
    state.mkdir(parents=True)
    write_status(state / STATUS_FILE, built_status())
    r = ckptavg("status", out)
    assert r.code == 0, r
    assert "daemon:    watching (pid 4242" in r.out and "polling)" in r.out
    assert "folded to: step 300; newest seen 400; lag 100 steps; 1 queued" in r.out
    assert "last fold: step 300, 0.123 GB in 0.5 s (0.247 GB/s)" in r.out
    assert "lawa      " in r.out and "None" in r.out
    assert "evaluation: python, 3 round(s), last evaluated step 300; 1 stale round(s) skipped, 0 failure(s)" in r.out
    assert f"best:       ema-160 at step 300, val_loss = 1.25 (min) -> {Path('/out') / 'best'}" in r.out
    assert "hub:        me/model@main: idle, last commit abc123 (step 300)" in r.out
    r = ckptavg("status", out, "--json")
    assert r.code == 0 and json.loads(r.out) == legacy_status()


# ---------------------------------------------------------------- who may spell what


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_core_never_imports_the_daemon_the_cli_or_the_evaluators():
    bad = []
    for f in sorted((ROOT / "ckptavg").rglob("*.py")):
        if f == ROOT / "ckptavg" / "__main__.py":  # `python -m ckptavg` is the CLI's entry point, not the core
            continue
        for name in _imports(f):
            if any(name == p or name.startswith(p + ".") for p in ("ckptavg.daemon", "ckptavg.cli",
                                                                     "ckptavg.evaluators")):
                bad.append(f"{f.relative_to(ROOT)}: {name}")
    assert not bad, bad


def test_contract_files_are_named_only_in_the_contracts():
    """The writers and readers moved onto the contracts never build a contract file's path from their own
    literal (help text and messages may mention the files)."""
    names = {METRICS_FILE, EVAL_FILE, STATUS_FILE}
    users = ["daemon/evaluation.py", "daemon/service.py", "cli/status.py", "cli/report.py",
             "ckptavg/publishing/report.py"]
    found = []
    for rel in users:
        tree = ast.parse((ROOT / rel).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{rel}:{node.lineno}: {node.value!r}")
    assert not found, found
