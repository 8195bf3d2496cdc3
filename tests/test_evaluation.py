"""Evaluation beside the fold loop: evaluators, rounds, metrics.jsonl, the best model and its atomic swap."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_daemon import start_daemon, status, stop, wait_for, write_trainer_checkpoint

from ckptavg.contracts.metrics import MetricsRow
from ckptavg.daemon.config import EvalConfig, load_config
from ckptavg.daemon.evaluation import BEST_LINK, EvalRound, Evaluation
from ckptavg.errors import UsageError
from ckptavg.evaluators import Candidate, EvaluationError, make_evaluator
from ckptavg.evaluators.command import CommandEvaluator
from ckptavg.evaluators.python import PythonEvaluator

# An eval command that does not import torch (fast): mean of tensor "b" read with safetensors' numpy API.
EVAL_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from safetensors import safe_open
    delay = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    time.sleep(delay)
    with safe_open(sys.argv[1] + "/model.safetensors", framework="np") as f:
        b = f.get_tensor("b")
    print("some chatter first")
    print(json.dumps({"val_loss": float(abs(b).mean()), "b0": float(b[0])}))
""")


def model_folder(path: Path, value: float) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({"b": torch.full((8,), value), "w": torch.zeros(4, 4)}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "test"}))
    (path / "ckptavg.json").write_text(json.dumps({"steps": [100]}))
    return path


@pytest.fixture
def eval_script(tmp_path: Path) -> Path:
    p = tmp_path / "eval_b.py"
    p.write_text(EVAL_SCRIPT)
    return p


# ---------------------------------------------------------------------------------------------
# the evaluators
# ---------------------------------------------------------------------------------------------
def test_command_evaluator_reads_the_last_json_line_and_quotes_the_folder(tmp_path, eval_script):
    folder = model_folder(tmp_path / "a model folder", 0.5)
    ev = CommandEvaluator(f"{sys.executable} {eval_script} {{model_dir}}", log_dir=tmp_path / "logs")
    got = ev.evaluate(Candidate("ema-10", 100, folder))
    assert got == {"val_loss": 0.5, "b0": 0.5}


def test_command_evaluator_errors_name_the_log_and_the_cause(tmp_path):
    folder = model_folder(tmp_path / "m", 1.0)
    logs = tmp_path / "logs"
    ev = CommandEvaluator("echo oops >&2; exit 3", log_dir=logs)
    with pytest.raises(EvaluationError, match="exited with status 3") as e:
        ev.evaluate(Candidate("raw", 7, folder))
    log_file = logs / "eval-step7-raw.log"
    assert str(log_file) in str(e.value) and log_file.read_text().strip() == "oops"
    with pytest.raises(EvaluationError, match="not JSON"):
        CommandEvaluator("echo hello").evaluate(Candidate("raw", 7, folder))
    with pytest.raises(EvaluationError, match="printed nothing"):
        CommandEvaluator("true").evaluate(Candidate("raw", 7, folder))
    with pytest.raises(EvaluationError, match="'loss' = 'low' is not a number"):
        CommandEvaluator("""echo '{"loss": "low"}'""").evaluate(Candidate("raw", 7, folder))
    with pytest.raises(EvaluationError, match="is nan"):
        CommandEvaluator("""echo '{"loss": NaN}'""").evaluate(Candidate("raw", 7, folder))
    with pytest.raises(UsageError):
        CommandEvaluator("  ")


def test_command_evaluator_timeout_kills_the_whole_process_group(tmp_path):
    folder = model_folder(tmp_path / "m", 1.0)
    pidfile = tmp_path / "child.pid"
    ev = CommandEvaluator(f"sleep 30 & echo $! > {pidfile}; wait", timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(EvaluationError, match="timed out after 1 s"):
        ev.evaluate(Candidate("raw", 1, folder))
    assert time.monotonic() - t0 < 10
    pid = int(pidfile.read_text())
    assert wait_for(lambda: not Path(f"/proc/{pid}").exists()
                    or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2],
                    timeout=5), "the command's child survived the timeout"


def test_python_evaluator_gets_a_state_dict_or_a_folder(tmp_path):
    mod = tmp_path / "my_eval.py"
    mod.write_text(textwrap.dedent("""
        def by_state(state):
            return {"val_loss": float(state["b"].mean())}
        def by_folder(model_dir):
            return {"n_files": len(list(model_dir.iterdir()))}
        def broken(state):
            raise RuntimeError("cuda out of memory\\nmore lines")
        def wrong(state):
            return 3.0
    """))
    folder = model_folder(tmp_path / "m", 0.25)
    assert PythonEvaluator(f"{mod}:by_state").evaluate(Candidate("x", 1, folder)) == {"val_loss": 0.25}
    assert PythonEvaluator(f"{mod}:by_folder").evaluate(Candidate("x", 1, folder)) == {"n_files": 3.0}
    with pytest.raises(EvaluationError, match="raised RuntimeError on x .*cuda out of memory$"):
        PythonEvaluator(f"{mod}:broken").evaluate(Candidate("x", 1, folder))
    with pytest.raises(EvaluationError, match="returned float"):
        PythonEvaluator(f"{mod}:wrong").evaluate(Candidate("x", 1, folder))
    for spec, msg in [("nocolon", "expected 'package.module:function'"), ("no_such_mod_xyz:f", "cannot import"),
                      (f"{mod}:missing", "has no function 'missing'"), (f"{tmp_path}/nope.py:f", "no such file")]:
        with pytest.raises(UsageError, match=msg):
            PythonEvaluator(spec)


def test_make_evaluator_refuses_unknown_kinds():
    with pytest.raises(UsageError, match="expected one of command, python, hf-perplexity"):
        make_evaluator("bleu", {})


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
def test_evaluate_and_hub_tables(tmp_path):
    cfg_file = tmp_path / "exp.toml"
    base = f'watch = "{tmp_path}/run"\noutput = "{tmp_path}/avg"\n[[average]]\nmethod = "ema"\nhalf_life = 100\n'
    cfg_file.write_text(base + '[evaluate]\ncommand = "python e.py {model_dir}"\nmetric = "acc"\nmode = "max"\n'
                        'every = 2\ntimeout = 60\n[hub]\nrepo = "org/name"\nprivate = true\n')
    cfg = load_config(cfg_file)
    assert cfg.evaluate == EvalConfig("command", {"command": "python e.py {model_dir}", "timeout": 60.0},
                                      metric="acc", mode="max", every=2)
    assert cfg.hub.repo == "org/name" and cfg.hub.private and cfg.hub.revision is None
    cfg = load_config(cfg_file, evaluate_overrides={"metric": "loss", "mode": "min"})
    assert (cfg.evaluate.metric, cfg.evaluate.mode) == ("loss", "min")
    for extra, msg in [('[evaluate]\ncommand = "x"\nmode = "lowest"\n', "evaluate.mode: expected min or max"),
                       ('[evaluate]\ncommand = "x"\nfunction = "m:f"\n', "evaluate.kind"),
                       ('[evaluate]\nkind = "python"\n', "evaluate.function: required"),
                       ('[evaluate]\ncommand = "x"\nevery = 0\n', "evaluate.every"),
                       ('[evaluate]\ncommand = "x"\nbatch_size = 2\n', "evaluate.batch_size: unknown key"),
                       ('[hub]\nrepo = "noslash"\n', "hub.repo")]:
        cfg_file.write_text(base + extra)
        with pytest.raises(UsageError, match=msg) as e:
            load_config(cfg_file)
        assert str(cfg_file) in str(e.value)


def test_watch_flags_need_an_evaluator(tmp_path, ckptavg):
    r = ckptavg("watch", tmp_path / "run", "-o", tmp_path / "avg", "--ema", "10", "--metric", "loss")
    assert r.code == 2 and "need an evaluator" in r.err
    r = ckptavg("watch", tmp_path / "run", "-o", tmp_path / "avg", "--ema", "10", "--eval", "x", "--eval-python", "m:f")
    assert r.code == 2 and "one of --eval" in r.err


# ---------------------------------------------------------------------------------------------
# rounds, selection, best/ (in-process)
# ---------------------------------------------------------------------------------------------
def _round(ev: Evaluation, step: int, values: dict[str, float], tmp_path: Path) -> EvalRound:
    rnd = ev.new_round(step, written_at=1000.0 + step)
    for name, v in values.items():
        folder = model_folder(rnd.folder / name, v)
        rnd.candidates.append(Candidate(name, step, folder, kind="raw" if name == "raw" else "average",
                                        info={"method": None if name == "raw" else "ema", "options": {},
                                              "steps": [step]}))
    return rnd


def test_rounds_write_metrics_and_publish_the_best_atomically(tmp_path):
    out, state = tmp_path / "avg", tmp_path / "avg" / ".ckptavg"
    mod = tmp_path / "ev.py"
    mod.write_text("def f(state):\n    return {'val_loss': float(state['b'].mean()), 'other': 1.0}\n")
    published = []
    ev = Evaluation(EvalConfig("python", {"function": f"{mod}:f"}, metric="val_loss", best_grace=0.0),
                    output=out, state_path=state, on_best=lambda folder, best: published.append((folder, best)))
    ev.note_checkpoint(1100.0)
    ev.start()
    try:
        ev.submit(_round(ev, 100, {"raw": 0.9, "ema-10": 0.5}, tmp_path))
        assert ev.wait_idle(30)
        ev.submit(_round(ev, 200, {"raw": 0.7, "ema-10": 0.6}, tmp_path))  # no improvement: best stays
        assert ev.wait_idle(30)
        ev.submit(_round(ev, 300, {"raw": 0.2, "ema-10": 0.4}, tmp_path))  # the raw checkpoint wins
        assert ev.wait_idle(30)
    finally:
        ev.close()
    rows = [json.loads(line) for line in (state / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["step"], r["candidate"], r["metrics"]["val_loss"]) for r in rows] == [
        (1, 100, "raw", pytest.approx(0.9)), (1, 100, "ema-10", 0.5), (2, 200, "raw", pytest.approx(0.7)),
        (2, 200, "ema-10", pytest.approx(0.6)), (3, 300, "raw", pytest.approx(0.2)),
        (3, 300, "ema-10", pytest.approx(0.4))]
    assert rows[0]["wall_time"] == 0.0 and rows[2]["wall_time"] == 100.0 and rows[1]["kind"] == "average"
    assert [b["candidate"] for _, b in published] == ["ema-10", "raw"]
    link = out / BEST_LINK
    assert link.is_symlink() and os.readlink(link) == ".best-versions/v0002-step300-raw"
    assert load_file(str(link / "model.safetensors"))["b"][0].item() == pytest.approx(0.2)
    sel = json.loads((link / "ckptavg.json").read_text())["selection"]
    assert sel["candidate"] == "raw" and sel["value"] == pytest.approx(0.2) and sel["step"] == 300
    card = (link / "README.md").read_text()
    assert "`raw` at step 300" in card and "val_loss" in card
    assert json.loads((state / "eval.json").read_text())["metric"] == "val_loss"
    assert not list((state / "eval").glob("round-*")), "round snapshots are removed after evaluation"
    assert sorted(p.name for p in (out / ".best-versions").iterdir()) == ["v0002-step300-raw"]  # grace 0: old removed

    # a restart keeps the best and the round counter
    ev2 = Evaluation(EvalConfig("python", {"function": f"{mod}:f"}, metric="val_loss"), output=out, state_path=state)
    assert ev2.round == 3 and ev2.best["candidate"] == "raw" and ev2.last_step == 300


def test_a_reader_never_sees_a_partial_best(tmp_path):
    out, state = tmp_path / "avg", tmp_path / "avg" / ".ckptavg"
    ev = Evaluation(EvalConfig("python", {"function": "x:y"}, metric="val_loss", best_grace=0.5), output=out,
                    state_path=state)
    stop_reading = threading.Event()
    seen, errors = set(), []

    def reader():
        while not stop_reading.is_set():
            existed = (out / BEST_LINK).is_symlink()
            try:
                t = load_file(str(out / BEST_LINK / "model.safetensors"))
                seen.add(round(t["b"][0].item(), 3))
                assert t["b"].eq(t["b"][0]).all()
            except FileNotFoundError:
                if existed:
                    errors.append("best/ pointed at a missing model")
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

    th = threading.Thread(target=reader, name="test-reader")
    th.start()
    try:
        for i in range(30):
            rnd = _round(ev, 100 + i, {"ema": 1.0 - i / 100}, tmp_path)
            ev._select(rnd, [MetricsRow(step=100 + i, candidate="ema", kind="average",
                                        metrics={"val_loss": 1.0 - i / 100})])
    finally:
        stop_reading.set()
        th.join()
    assert not errors, errors[:3]
    assert len(seen) > 1


# ---------------------------------------------------------------------------------------------
# the daemon as a process
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_daemon_evaluates_every_round_and_publishes_best(tmp_path, eval_script):
    run, out = tmp_path / "run", tmp_path / "avg"
    run.mkdir()
    for i, step in enumerate((100, 200, 300)):
        write_trainer_checkpoint(run, step, seed=i)
    proc = start_daemon(run, out, "--eval", f"{sys.executable} {eval_script} {{model_dir}}", "--metric", "val_loss")
    try:
        assert wait_for(lambda: (status(out).get("evaluation") or {}).get("last_evaluated_step") == 300, 90), \
            status(out)
        write_trainer_checkpoint(run, 400, seed=3)
        assert wait_for(lambda: (status(out).get("evaluation") or {}).get("last_evaluated_step") == 400, 90)
    finally:
        code, err = stop(proc)
    assert code == 0, err
    rows = [json.loads(line) for line in (out / ".ckptavg" / "metrics.jsonl").read_text().splitlines()]
    by_round: dict[int, set] = {}
    for r in rows:
        by_round.setdefault(r["round"], set()).add(r["candidate"])
        assert "metrics" in r, r
    assert by_round[max(by_round)] == {"raw", "ema-150", "lawa-3", "swa-400"}
    assert by_round[min(by_round)] == {"raw", "ema-150", "lawa-3"}  # SWA starts at step 400
    raw400 = next(r for r in rows if r["step"] == 400 and r["candidate"] == "raw")
    b = load_file(str(run / "checkpoint-400" / "model.safetensors"))["b"]
    assert raw400["metrics"]["val_loss"] == pytest.approx(b.abs().mean().item())
    st = status(out)["evaluation"]
    best = json.loads((out / BEST_LINK / "ckptavg.json").read_text())["selection"]
    assert best["value"] == min(r["metrics"]["val_loss"] for r in rows) == st["best"]["value"]
    assert "Traceback" not in err


@pytest.mark.slow
def test_a_slow_evaluator_does_not_delay_folding(tmp_path, eval_script):
    """Each evaluation takes 1.5 s per candidate (6 s a round); checkpoints arrive every 0.3 s. Folding keeps
    up (the lag after the last checkpoint is bounded), stale rounds are skipped, and the newest is evaluated."""
    run, out = tmp_path / "run", tmp_path / "avg"
    run.mkdir()
    proc = start_daemon(run, out, "--eval", f"{sys.executable} {eval_script} {{model_dir}} 1.5")
    try:
        assert wait_for(lambda: status(out).get("state") == "watching", 60)
        written = {}
        for i, step in enumerate(range(100, 1300, 100)):
            write_trainer_checkpoint(run, step, seed=i)
            written[step] = time.monotonic()
            time.sleep(0.3)
        assert wait_for(lambda: status(out).get("last_folded_step") == 1200, 30)
        caught_up = time.monotonic() - written[1200]
        st = status(out)
        ev = st["evaluation"]
        assert ev["running_step"] is not None or ev["pending_step"] is not None, "evaluation should still be busy"
        assert caught_up < 6.0, f"folding lagged {caught_up:.1f} s behind the trainer while evaluation ran"
        assert wait_for(lambda: (status(out).get("evaluation") or {}).get("last_evaluated_step") == 1200, 120)
        assert status(out)["evaluation"]["skipped_rounds"] >= 1
    finally:
        code, err = stop(proc)
    assert code == 0, err
    assert "skipped: round" in err


@pytest.mark.slow
def test_evaluation_failures_do_not_stop_the_daemon_and_a_restart_evaluates_what_was_missed(tmp_path, eval_script):
    run, out = tmp_path / "run", tmp_path / "avg"
    run.mkdir()
    write_trainer_checkpoint(run, 100, seed=0)
    proc = start_daemon(run, out, "--eval", "echo broken >&2; exit 1")
    try:
        assert wait_for(lambda: (status(out).get("evaluation") or {}).get("last_evaluated_step") == 100, 60)
        write_trainer_checkpoint(run, 200, seed=1)
        assert wait_for(lambda: status(out).get("last_folded_step") == 200, 60)
    finally:
        code, err = stop(proc)
    assert code == 0 and "evaluation of raw at step 100 failed" in err
    rows = [json.loads(line) for line in (out / ".ckptavg" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all("exited with status 1" in r["error"] for r in rows)
    assert not (out / BEST_LINK).exists()
    # restart with a working evaluator: the newest state is evaluated even with no new checkpoint
    proc = start_daemon(run, out, "--eval", f"{sys.executable} {eval_script} {{model_dir}}")
    try:
        assert wait_for(lambda: (status(out).get("evaluation") or {}).get("last_evaluated_step") == 200
                        and (out / BEST_LINK).exists(), 60), status(out)
    finally:
        code, err = stop(proc)
    assert code == 0, err


@pytest.mark.slow
def test_row35_a_slow_evaluation_does_not_stop_the_watchdog_pings(tmp_path, eval_script):
    """The other half of docs/FAULTS.md row 35: evaluation runs beside the loop, so a long evaluation never starves
    systemd's watchdog (only a blocked loop does, see test_daemon_faults)."""
    import socket

    run, out = tmp_path / "run", tmp_path / "avg"
    run.mkdir()
    write_trainer_checkpoint(run, 100, seed=0)
    sock_path = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(sock_path))
    server.settimeout(0.2)
    received: list[tuple[float, str]] = []
    proc = start_daemon(run, out, "--eval", f"{sys.executable} {eval_script} {{model_dir}} 2.0",
                        env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"})
    try:
        end = time.monotonic() + 60
        while time.monotonic() < end and (status(out).get("evaluation") or {}).get("last_evaluated_step") != 100:
            try:
                received.append((time.monotonic(), server.recv(4096).decode()))
            except TimeoutError:
                pass
    finally:
        code, err = stop(proc)
        server.close()
    assert code == 0, err
    pings = [t for t, m in received if m == "WATCHDOG=1"]
    assert len(pings) > 10
    assert max(b - a for a, b in zip(pings, pings[1:])) < 1.0  # pinged every ~0.2 s through 4 s of evaluation


@pytest.mark.slow
def test_raw_pickle_checkpoints_are_exported_for_evaluation(tmp_path, make_run):
    """A run of bare .pt files: the raw candidate is exported to a safetensors folder an evaluator can load."""
    run, out = tmp_path / "run", tmp_path / "avg"
    paths = make_run([100, 200], fmt="pt", dtype=torch.float32)
    mod = tmp_path / "ev.py"
    mod.write_text("from safetensors.torch import load_file\n"
                   "def f(model_dir):\n"
                   "    t = load_file(str(model_dir / 'model.safetensors'))['embed.weight']\n"
                   "    return {'val_loss': float(t.abs().mean())}\n")
    proc = start_daemon(run, out, "--eval-python", f"{mod}:f")
    try:
        assert wait_for(lambda: (status(out).get("evaluation") or {}).get("last_evaluated_step") == 200, 60), \
            status(out)
    finally:
        code, err = stop(proc)
    assert code == 0, err
    rows = [json.loads(line) for line in (out / ".ckptavg" / "metrics.jsonl").read_text().splitlines()]
    raw = [r for r in rows if r["candidate"] == "raw" and r["step"] == 200]
    assert raw and "metrics" in raw[0], rows
    want = torch.load(paths[1], weights_only=True)["embed.weight"].abs().mean().item()
    assert raw[0]["metrics"]["val_loss"] == pytest.approx(want)


@pytest.mark.slow
def test_eval_every_n_folds(tmp_path, eval_script):
    """--eval-every 2: a round after every second fold, also when checkpoints arrive one at a time."""
    run, out = tmp_path / "run", tmp_path / "avg"
    run.mkdir()
    proc = start_daemon(run, out, "--eval", f"{sys.executable} {eval_script} {{model_dir}}", "--eval-every", "2")
    try:
        for i, step in enumerate((100, 200, 300, 400)):
            write_trainer_checkpoint(run, step, seed=i)
            assert wait_for(lambda s=step: status(out).get("last_folded_step") == s, 60), status(out)
            time.sleep(0.5)  # the queue is empty between checkpoints
        assert wait_for(lambda: (status(out).get("evaluation") or {}).get("last_evaluated_step") == 400, 60)
    finally:
        code, err = stop(proc)
    assert code == 0, err
    rows = [json.loads(line) for line in (out / ".ckptavg" / "metrics.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rows}) == [200, 400]
