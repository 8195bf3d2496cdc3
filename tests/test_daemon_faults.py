"""docs/FAULTS.md daemon rows, each against a real daemon process (or the watcher in-process for 27)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time

import pytest
from test_daemon import assert_same, one_shot, start_daemon, status, stop, wait_for, write_trainer_checkpoint

from ckptavg.daemon import watcher as watcher_mod

pytestmark = pytest.mark.slow


def running(out, daemon):
    return status(out).get("pid") == daemon.pid


def folded_to(out, daemon, step):
    return lambda: running(out, daemon) and status(out).get("last_folded_step") == step and status(out)["state"] == "watching"


def test_row2_missing_shard_waits_then_is_skipped_when_passed(tmp_path):
    run, out = tmp_path / "run", tmp_path / "avg"
    write_trainer_checkpoint(run, 100, 0)
    bad = run / "checkpoint-200"
    bad.mkdir()
    from conftest import tiny_state, write_sharded_safetensors

    write_sharded_safetensors(bad, tiny_state(1), shard_bytes=1024)
    (bad / "trainer_state.json").write_text('{"global_step": 200}')
    sorted(bad.glob("model-*.safetensors"))[-1].unlink()
    daemon = start_daemon(run, out)
    try:
        assert wait_for(folded_to(out, daemon, 100), 30)
        time.sleep(1.0)
        assert status(out)["last_folded_step"] == 100  # waits: never reads the incomplete checkpoint
        write_trainer_checkpoint(run, 300, 2)
        write_trainer_checkpoint(run, 400, 3)
        write_trainer_checkpoint(run, 500, 4)
        assert wait_for(folded_to(out, daemon, 500), 30)
    finally:
        code, err = stop(daemon)
    assert code == 0 and "folded step 200" not in err
    assert status(out)["averages"]["ema-150"]["folded"] == 4


def test_row13_event_storm_and_row16_late_step_fold_nothing_twice(tmp_path):
    run, out = tmp_path / "run", tmp_path / "avg"
    for i, step in enumerate((100, 300, 400, 500)):
        write_trainer_checkpoint(run, step, i)
    daemon = start_daemon(run, out)
    try:
        assert wait_for(folded_to(out, daemon, 500), 30)
        for i in range(50):  # 50 create/modify/move events on folded checkpoints
            f = run / "checkpoint-300" / f"junk{i}.txt"
            f.write_text("x")
            os.rename(f, run / "checkpoint-400" / f.name)
            os.utime(run / "checkpoint-100" / "trainer_state.json")
        write_trainer_checkpoint(run, 200, 9)  # a late step
        time.sleep(1.5)
    finally:
        code, err = stop(daemon)
    assert code == 0
    assert [err.count(f"folded step {s}:") for s in (100, 300, 400, 500)] == [1, 1, 1, 1]
    assert "late checkpoint" in err and "folded step 200" not in err
    daemon = start_daemon(run, out)  # restart: the storm and the late step still fold nothing
    try:
        assert wait_for(lambda: running(out, daemon) and status(out)["state"] == "watching", 30)
        time.sleep(1.0)
    finally:
        code, err = stop(daemon)
    assert code == 0 and "folded step" not in err and status(out)["averages"]["ema-150"]["folded"] == 4


def test_row14_rotation_right_before_the_read_is_harmless(tmp_path):
    run, out, archive = tmp_path / "run", tmp_path / "avg", tmp_path / "archive"
    archive.mkdir()
    for i, step in enumerate((100, 200, 300, 400, 500)):
        write_trainer_checkpoint(run, step, i, archive)
    daemon = start_daemon(run, out, env={"CKPTAVG_FAULT": "remove-source-before-fold"})
    try:
        assert wait_for(folded_to(out, daemon, 500), 30)
    finally:
        code, err = stop(daemon)
    assert code == 0, err
    assert not list(run.glob("checkpoint-*"))  # the trainer's copies are gone ...
    one_shot(archive, tmp_path / "oneshot")
    assert_same(out, tmp_path / "oneshot")  # ... yet every fold read whole checkpoints (retained links)


@pytest.mark.parametrize("fault", ["crash-before-manifest", "crash-before-publish-rename"])
def test_rows19_20_kill_between_write_and_rename(tmp_path, fault):
    run, out = tmp_path / "run", tmp_path / "avg"
    for i, step in enumerate((100, 200, 300, 400, 500)):
        write_trainer_checkpoint(run, step, i)
    daemon = start_daemon(run, out, "--persist-every", "1")
    try:
        assert wait_for(folded_to(out, daemon, 500), 30)
    finally:
        stop(daemon)
    before = (out / "ema-150" / "model.safetensors").read_bytes()
    write_trainer_checkpoint(run, 600, 6)
    daemon = start_daemon(run, out, env={"CKPTAVG_FAULT": fault})
    daemon.communicate(timeout=60)
    assert daemon.returncode == 137
    assert (out / "ema-150" / "model.safetensors").read_bytes() == before  # old and complete
    daemon = start_daemon(run, out)
    try:
        assert wait_for(folded_to(out, daemon, 600), 30)
    finally:
        code, err = stop(daemon)
    assert code == 0, err
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != ".ckptavg"]  # orphans removed
    one_shot(run, tmp_path / "oneshot")
    assert_same(out, tmp_path / "oneshot")


def test_row24_daemon_refuses_corrupt_or_newer_state(tmp_path):
    run, out = tmp_path / "run", tmp_path / "avg"
    for i, step in enumerate((100, 200)):
        write_trainer_checkpoint(run, step, i)
    daemon = start_daemon(run, out)
    try:
        assert wait_for(folded_to(out, daemon, 200), 30)
    finally:
        stop(daemon)
    state = out / ".ckptavg"
    for m in state.glob("manifest-*.json"):
        data = json.loads(m.read_text())
        data["schema"] = 99
        m.write_text(json.dumps(data))
    daemon = start_daemon(run, out)
    _, err = daemon.communicate(timeout=60)
    assert daemon.returncode == 1 and "newer ckptavg" in err and "Traceback" not in err


def test_row26_root_missing_then_recreated(tmp_path):
    run, out = tmp_path / "run", tmp_path / "avg"
    daemon = start_daemon(run, out)
    try:
        assert wait_for(lambda: running(out, daemon), 30)
        write_trainer_checkpoint(run, 100, 0)
        assert wait_for(folded_to(out, daemon, 100), 30)
        shutil.rmtree(run)
        time.sleep(0.5)
        write_trainer_checkpoint(run, 200, 1)  # recreated: re-armed and rescanned
        assert wait_for(folded_to(out, daemon, 200), 30)
    finally:
        code, err = stop(daemon)
    assert code == 0, err


def test_row27_network_mounts_and_inotify_limits_poll(monkeypatch, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(watcher_mod, "mount_type", lambda path: "nfs4")
    w = watcher_mod.Watcher(tmp_path, threading.Event(), poll="auto")
    w.ensure()
    w.ensure()
    assert w.mode == "polling" and caplog.text.count("nfs4 mount") == 1
    monkeypatch.setattr(watcher_mod, "mount_type", lambda path: "ext4")

    watchdog_observers = pytest.importorskip("watchdog.observers")

    class Full(watchdog_observers.Observer):  # the inotify watch limit
        def schedule(self, *a, **k):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(watchdog_observers, "Observer", Full)
    w2 = watcher_mod.Watcher(tmp_path, threading.Event(), poll="auto")
    w2.ensure()
    assert w2.mode == "polling" and "polling instead" in caplog.text
    w2.stop()


def test_row28_without_events_the_rescan_finds_everything(tmp_path):
    run, out = tmp_path / "run", tmp_path / "avg"
    run.mkdir()
    daemon = start_daemon(run, out, "--poll", "--poll-interval", "0.5")
    try:
        assert wait_for(lambda: running(out, daemon), 30)
        assert status(out)["watcher"] == "polling"
        for i, step in enumerate((100, 200, 300)):
            write_trainer_checkpoint(run, step, i)
        assert wait_for(folded_to(out, daemon, 300), 5)  # within a few intervals, no event needed
    finally:
        code, _ = stop(daemon)
    assert code == 0


def test_row35_watchdog_pings_stop_while_the_loop_is_blocked(tmp_path):
    run, out = tmp_path / "run", tmp_path / "avg"
    for i, step in enumerate((100, 200)):
        write_trainer_checkpoint(run, step, i)
    sock_path = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(sock_path))
    server.settimeout(0.2)
    received: list[tuple[float, str]] = []
    daemon = start_daemon(run, out, env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "200000",
                                         "CKPTAVG_FAULT": "slow-fold=2.0"})
    try:
        end = time.monotonic() + 30
        while time.monotonic() < end and not (received and status(out).get("last_folded_step") == 200
                                               and status(out).get("state") == "watching"):
            try:
                received.append((time.monotonic(), server.recv(4096).decode()))
            except socket.timeout:
                pass
        time.sleep(0.5)
    finally:
        code, _ = stop(daemon)
        try:
            while True:
                received.append((time.monotonic(), server.recv(4096).decode()))
        except socket.timeout:
            server.close()
    assert code == 0
    kinds = [m for _, m in received]
    assert kinds[0].startswith("READY=1") and any(m.startswith("STOPPING=1") for m in kinds)
    pings = [t for t, m in received if m == "WATCHDOG=1"]
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert pings and max(gaps) >= 1.5  # no ping while a 2 s fold blocked the loop: systemd would restart it


def test_row1_half_written_hf_checkpoint_and_row17_noise(tmp_path):
    run, out = tmp_path / "run", tmp_path / "avg"
    write_trainer_checkpoint(run, 100, 0)
    half = write_trainer_checkpoint(run, 200, 1)
    (half / "trainer_state.json").unlink()  # weights and optimizer written, the marker not yet
    staged = write_trainer_checkpoint(run, 300, 2)
    os.rename(staged, run / "tmp-checkpoint-300")  # a staging name that is never renamed
    hidden = write_trainer_checkpoint(run, 400, 3)
    os.rename(hidden, run / ".checkpoint-400")
    daemon = start_daemon(run, out)
    try:
        assert wait_for(folded_to(out, daemon, 100), 30)
        time.sleep(1.0)
        assert status(out)["last_folded_step"] == 100
        (half / "trainer_state.json").write_text('{"global_step": 200}')
        assert wait_for(folded_to(out, daemon, 200), 30)
        time.sleep(1.0)
    finally:
        code, err = stop(daemon)
    assert code == 0 and err.count("folded step 200:") == 1
    assert "folded step 300" not in err and "folded step 400" not in err


def _hwm_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_row34_burst_memory_does_not_grow_with_the_queue(tmp_path):
    peaks = {}
    for n in (5, 50):
        run, out = tmp_path / f"run{n}", tmp_path / f"avg{n}"
        daemon = start_daemon(run, out)
        try:
            assert wait_for(lambda: running(out, daemon), 30)
            for i in range(n):  # a burst: all at once
                write_trainer_checkpoint(run, (i + 1) * 100, i)
            assert wait_for(folded_to(out, daemon, n * 100), 120)
            peaks[n] = _hwm_kb(daemon.pid)
        finally:
            code, err = stop(daemon)
        assert code == 0 and all(err.count(f"folded step {(i + 1) * 100}:") == 1 for i in range(n))
    assert peaks[50] < peaks[5] + 40_000, peaks  # KB: the queue holds paths, not tensors


def test_sighup_reloads_the_config(tmp_path):
    run, out = tmp_path / "run", tmp_path / "avg"
    write_trainer_checkpoint(run, 100, 0)
    cfg = tmp_path / "exp.toml"
    base = f'watch = "{run}"\noutput = "{out}"\nsettle = 0.1\npoll_interval = 0.2\ndevice = "cpu"\n'
    cfg.write_text(base + 'publish_every = 1\n[[average]]\nmethod = "lawa"\nwindow = 2\n')
    import subprocess
    import sys

    daemon = subprocess.Popen([sys.executable, "-m", "ckptavg.cli.main", "watch", "--config", str(cfg)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(folded_to(out, daemon, 100), 30)
        cfg.write_text(base + 'publish_every = 1000\n[[average]]\nmethod = "lawa"\nwindow = 2\n')
        daemon.send_signal(__import__("signal").SIGHUP)
        time.sleep(1.0)
        write_trainer_checkpoint(run, 200, 1)
        assert wait_for(folded_to(out, daemon, 200), 30)
        published = json.loads((out / "lawa-2" / "ckptavg.json").read_text())["steps"]
        assert published == [100]  # publish_every = 1000 now: not republished until shutdown
    finally:
        code, err = stop(daemon)
    assert code == 0 and "configuration reloaded" in err
    assert json.loads((out / "lawa-2" / "ckptavg.json").read_text())["steps"] == [100, 200]  # published on exit


def test_row18_lightning_symlinks_and_loops_and_status_table(tmp_path, ckptavg):
    from conftest import tiny_state, write_checkpoint

    run, out = tmp_path / "run", tmp_path / "avg"
    ckdir = run / "lightning_logs" / "version_0" / "checkpoints"
    for i, step in enumerate((100, 200, 300, 400, 500)):
        write_checkpoint(ckdir / f"epoch=0-step={step}.ckpt", tiny_state(i), "lightning", step=step)
    (ckdir / "last.ckpt").symlink_to(ckdir / "epoch=0-step=500.ckpt")
    (ckdir / "step=500-again.ckpt").symlink_to(ckdir / "epoch=0-step=500.ckpt")
    (run / "loop").symlink_to(run)
    daemon = start_daemon(run, out)
    try:
        assert wait_for(folded_to(out, daemon, 500), 30)
        r = ckptavg("status", out)
        assert r.code == 0 and "folded to: step 500" in r.out and "ema-150" in r.out and "lag 0 steps" in r.out
    finally:
        code, err = stop(daemon)
    assert code == 0 and [err.count(f"folded step {s}:") for s in (100, 200, 300, 400, 500)] == [1] * 5
    r = ckptavg("status", tmp_path / "nowhere")
    assert r.code == 2 and "no daemon status" in r.err


def test_row9_nan_checkpoint_is_rolled_back_and_skipped(tmp_path):
    """A NaN found mid-fold: the fold is undone (state reloaded, unpersisted folds replayed), the checkpoint
    skipped for good, and the averages equal those of the other checkpoints."""
    from safetensors.torch import load_file, save_file

    run, out, clean = tmp_path / "run", tmp_path / "avg", tmp_path / "clean"
    clean.mkdir()
    for i, step in enumerate((100, 200, 300, 400, 500, 600)):
        ck = write_trainer_checkpoint(run, step, i)
        if step == 400:
            state = load_file(str(ck / "model.safetensors"))
            state["b"][5] = float("nan")  # "b" is stored after "w": the fold is half done when it is found
            save_file(state, str(ck / "model.safetensors"), metadata={"format": "pt"})
        else:
            shutil.copytree(ck, clean / ck.name)
    daemon = start_daemon(run, out, "--persist-every", "3")
    try:
        assert wait_for(folded_to(out, daemon, 600), 30)
    finally:
        code, err = stop(daemon)
    assert code == 0 and "skipping checkpoint step 400" in err and "NaN" in err
    assert status(out)["skipped"] == [400]
    one_shot(clean, tmp_path / "oneshot")
    assert_same(out, tmp_path / "oneshot")
    daemon = start_daemon(run, out)  # the skip is remembered across a restart
    try:
        assert wait_for(lambda: running(out, daemon) and status(out)["state"] == "watching", 30)
        time.sleep(0.8)
    finally:
        code, err = stop(daemon)
    assert code == 0 and "step 400" not in err
