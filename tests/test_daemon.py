"""The sidecar as a real process: rotation, exactly once, kill -9 and resume, SIGTERM, one owner."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.slow

AVERAGES = ["--ema", "150", "--lawa", "3", "--swa-start", "400"]
NAMES = ["ema-150", "lawa-3", "swa-400"]


def write_trainer_checkpoint(run: Path, step: int, seed: int, archive: Path | None = None, *, rows: int = 96) -> Path:
    """What an HF Trainer leaves: weights, optimizer, and trainer_state.json last (``rows``: of ``w``)."""
    final = run / f"checkpoint-{step}"
    tmp = run / f"tmp-checkpoint-{step}"
    tmp.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    save_file({"w": torch.randn(rows, 32, generator=g).to(torch.bfloat16), "b": torch.randn(32, generator=g),
               "n": torch.tensor([step])}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    torch.save({}, tmp / "optimizer.pt")
    (tmp / "config.json").write_text(json.dumps({"model_type": "test", "step": step}))
    (tmp / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    os.rename(tmp, final)
    if archive is not None:
        shutil.copytree(final, archive / final.name)
    return final


FAULTINJECT = Path(__file__).with_name("faultinject.py")


def ckptavg_command(env: dict | None) -> list[str]:
    """How a test starts the CLI in a child process: through the fault launcher when the test injects faults
    (``CKPTAVG_FAULT``, see tests/faultinject.py), else plainly."""
    if env and env.get("CKPTAVG_FAULT"):
        return [sys.executable, str(FAULTINJECT)]
    return [sys.executable, "-m", "ckptavg.cli.main"]


def start_daemon(run: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [*ckptavg_command(env), "watch", str(run), "-o", str(out), *AVERAGES,
         "--settle", "0.1", "--poll-interval", "0.2", "--device", "cpu", *extra],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})},
    )


def start_daemon_from_config(run: Path, out: Path, tables: str, *args: str, env: dict) -> subprocess.Popen:
    """``ckptavg [ARGS] watch --config`` on a config at ``out``'s side: the run, the output, CPU, quick settle
    and polling, then ``tables`` (``[[average]]``, ``[evaluate]``, ``[hub]``...)."""
    config = out.parent / "exp.toml"
    config.write_text(f'watch = "{run}"\noutput = "{out}"\ndevice = "cpu"\nsettle = 0.1\npoll_interval = 0.2\n'
                      + textwrap.dedent(tables))
    return subprocess.Popen([*ckptavg_command(env), *args, "watch", "--config", str(config)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def status(out: Path) -> dict:
    try:
        return json.loads((out / ".ckptavg" / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def wait_for(cond, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


def stop(proc: subprocess.Popen) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    return proc.returncode, err


def one_shot(ckpt_dir: Path, out: Path) -> None:
    from ckptavg.cli.main import main

    paths = sorted(ckpt_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    try:
        main(["--log-level", "warning", "average", *map(str, paths), "--method", "ema:150", "--method", "lawa:3",
              "--method", "swa:400", "--device", "cpu", "-o", str(out)])
    except SystemExit as e:
        assert e.code in (0, None)


def assert_same(a: Path, b: Path) -> None:
    for name in NAMES:
        x, y = load_file(str(a / name / "model.safetensors")), load_file(str(b / name / "model.safetensors"))
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), (name, k)


def test_rotation_exactly_once_and_equal_to_one_shot(tmp_path):
    run, out, archive = tmp_path / "run", tmp_path / "avg", tmp_path / "archive"
    run.mkdir()
    archive.mkdir()
    daemon = start_daemon(run, out)
    try:
        assert wait_for(lambda: status(out).get("state") == "watching", 30)
        for i, step in enumerate(range(100, 1300, 100)):
            write_trainer_checkpoint(run, step, i, archive)
            for old in sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[:-2]:
                shutil.rmtree(old)  # save_total_limit=2
            time.sleep(0.15)
        assert wait_for(lambda: status(out).get("last_folded_step") == 1200, 60), status(out)
    finally:
        code, err = stop(daemon)
    assert code == 0, err
    st = status(out)
    assert st["state"] == "stopped" and st["skipped"] == [] and st["averages"]["ema-150"]["folded"] == 12
    assert err.count("folded step") == 12  # each checkpoint folded once
    # retained: LAWA's window in each of the 4 kept state generations (a rollback to the oldest re-reads 700)
    assert sorted(int(p.name) for p in (out / ".ckptavg" / "keep").iterdir()) == [700, 800, 900, 1000, 1100, 1200]
    one_shot(archive, tmp_path / "oneshot")
    assert_same(out, tmp_path / "oneshot")
    assert json.loads((out / "ema-150" / "config.json").read_text())["step"] == 1200
    assert not any(p.name.startswith(".") for p in run.rglob("*"))  # nothing written into the run


def test_kill_9_anywhere_then_resume_is_bitwise_identical(tmp_path):
    run, out = tmp_path / "run", tmp_path / "avg"
    for i, step in enumerate(range(100, 3300, 100)):  # 32 checkpoints
        write_trainer_checkpoint(run, step, i)
    rng = random.Random(7)
    kills = 0
    progress = []
    for _ in range(4):
        daemon = start_daemon(run, out, env={"CKPTAVG_FAULT": "slow-fold=0.1"})
        assert wait_for(lambda: status(out).get("pid") == daemon.pid, 30)  # running, past start-up
        time.sleep(rng.uniform(0.2, 0.9))
        if daemon.poll() is None:
            daemon.kill()  # SIGKILL: no chance to persist
            daemon.wait()
            kills += 1
        progress.append(status(out).get("last_folded_step"))
    assert kills >= 3 and progress[-1] is not None and progress[-1] < 3200, progress
    daemon = start_daemon(run, out)
    try:
        assert wait_for(lambda: status(out).get("pid") == daemon.pid and status(out).get("last_folded_step") == 3200
                        and status(out).get("state") == "watching", 90), status(out)
    finally:
        code, err = stop(daemon)
    assert code == 0, err
    one_shot(run, tmp_path / "oneshot")
    assert_same(out, tmp_path / "oneshot")
    assert status(out)["averages"]["ema-150"]["folded"] == 32


def test_sigterm_mid_fold_and_second_instance(tmp_path):
    run, out = tmp_path / "run", tmp_path / "avg"
    for i, step in enumerate(range(100, 600, 100)):
        write_trainer_checkpoint(run, step, i)
    daemon = start_daemon(run, out, env={"CKPTAVG_FAULT": "slow-fold=2.0"})
    try:
        assert wait_for(lambda: status(out).get("folding_step") == 200, 60)  # inside the second fold
        second = start_daemon(run, out)
        _, err2 = second.communicate(timeout=60)
        assert second.returncode == 1 and "in use by process" in err2 and "Traceback" not in err2
        assert wait_for(lambda: status(out).get("folding_step") is not None, 30)
    finally:
        t0 = time.monotonic()
        code, err = stop(daemon)  # mid-fold: the fold finishes (<= 2 s here), state is saved, exit 0
    assert code == 0 and time.monotonic() - t0 < 5, err
    st = status(out)
    folded = st["last_folded_step"]
    assert st["state"] == "stopped" and folded is not None and folded < 500
    # restart: continues from the committed state and finishes the rest exactly once
    daemon = start_daemon(run, out)
    try:
        assert wait_for(lambda: status(out).get("pid") == daemon.pid and status(out).get("last_folded_step") == 500, 60)
    finally:
        code, err = stop(daemon)
    assert code == 0 and f"folded step {folded}:" not in err
    one_shot(run, tmp_path / "oneshot")
    assert_same(out, tmp_path / "oneshot")


def test_crash_before_persist_replays(tmp_path):
    run, out = tmp_path / "run", tmp_path / "avg"
    for i, step in enumerate(range(100, 600, 100)):
        write_trainer_checkpoint(run, step, i)
    daemon = start_daemon(run, out, env={"CKPTAVG_FAULT": "crash-before-persist"})
    daemon.communicate(timeout=60)
    assert daemon.returncode == 137 and status(out).get("last_folded_step") is None
    daemon = start_daemon(run, out)
    try:
        assert wait_for(lambda: status(out).get("pid") == daemon.pid and status(out).get("last_folded_step") == 500, 60)
    finally:
        code, err = stop(daemon)
    assert code == 0, err
    one_shot(run, tmp_path / "oneshot")
    assert_same(out, tmp_path / "oneshot")
