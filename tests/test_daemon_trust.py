"""The daemon is never silently wrong (docs/FAULTS.md rows 26, 36–41): rewinds, re-written retained copies,
missed checkpoints, a run folder that does not exist yet, poison checkpoints, special files, clocks that
disagree, full or read-only outputs, and who owns the state and the output. Each runs the daemon as a real
process and compares its published averages with ``ckptavg average`` over the trajectory the trainer followed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_daemon import (
    assert_same,
    ckptavg_command,
    one_shot,
    start_daemon,
    status,
    stop,
    wait_for,
    write_trainer_checkpoint,
)

pytestmark = pytest.mark.slow


def folded_to(out: Path, step: int, read=None):
    read = read or status
    return lambda: read(out).get("last_folded_step") == step and not read(out).get("queued")


def rewrite_in_place(folder: Path, seed: int) -> None:
    """What a trainer that resumed does to an existing checkpoint folder: the same files re-written, same inodes."""
    g = torch.Generator().manual_seed(seed)
    weights = folder / "model.safetensors"
    ino = weights.stat().st_ino
    tmp = folder.parent / f".rewrite-{folder.name}.safetensors"
    step = int(folder.name.split("-")[1])
    save_file({"w": torch.randn(96, 32, generator=g).to(torch.bfloat16), "b": torch.randn(32, generator=g),
               "n": torch.tensor([step])}, str(tmp), metadata={"format": "pt"})
    with open(weights, "r+b") as f:  # truncate and write through the same inode, as open(..., "wb") does
        f.truncate(0)
        f.write(tmp.read_bytes())
    tmp.unlink()
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "rewritten": True}))
    assert weights.stat().st_ino == ino


def archive_of(folder: Path, archive: Path) -> None:
    if (archive / folder.name).exists():
        shutil.rmtree(archive / folder.name)
    shutil.copytree(folder, archive / folder.name)


# -- rewinds (row 36) --------------------------------------------------------------------------------------------

def drive_rewind(run: Path, out: Path, followed: Path, timeout: float) -> bool:
    """The trainer of row 36, beside a running daemon: 100-400 are folded, then it resumes from checkpoint-200,
    re-writing 300 and 400 in place, and 500 follows; every version is also copied into ``followed`` (the
    trajectory the averages must equal). True once 500 is folded as the fifth checkpoint."""
    for i, step in enumerate((100, 200, 300, 400)):
        archive_of(write_trainer_checkpoint(run, step, i), followed)
    assert wait_for(folded_to(out, 400), timeout), status(out)
    for seed, step in ((10, 300), (11, 400)):  # the trainer resumed from checkpoint-200
        rewrite_in_place(run / f"checkpoint-{step}", seed)
        archive_of(run / f"checkpoint-{step}", followed)
        time.sleep(0.5)
    archive_of(write_trainer_checkpoint(run, 500, 12), followed)
    return wait_for(lambda: status(out).get("last_folded_step") == 500 and not status(out).get("queued")
                    and status(out)["averages"]["ema-150"]["folded"] == 5, timeout)


def assert_rewound(out: Path, err: str, followed: Path, oneshot: Path, same) -> None:
    """After :func:`drive_rewind`: one rewind said, at 300 back to 200, and the averages ``same`` as the
    one-shot over the trajectory followed."""
    assert err.count("trainer rewind: step 300") == 1, err
    st = status(out)
    assert st["rewinds"][0]["at"] == 300 and st["rewinds"][0]["back_to"] == 200, st["rewinds"]
    one_shot(followed, oneshot)
    same(out, oneshot)


def test_rewind_in_place_rolls_back_and_follows_the_new_trajectory(tmp_path):
    """Resume from step 200 after 300 and 400 were folded: 300 and 400 are re-written in place with new values,
    then 500 follows. The averages equal the one-shot over 100, 200, 300', 400', 500 — never a mix."""
    run, out, followed = tmp_path / "run", tmp_path / "avg", tmp_path / "followed"
    run.mkdir()
    followed.mkdir()
    daemon = start_daemon(run, out)
    try:
        assert drive_rewind(run, out, followed, 30), status(out)
    finally:
        code, err = stop(daemon)
    assert code == 0, err
    assert_rewound(out, err, followed, tmp_path / "oneshot", assert_same)


def test_run_folder_recreated_with_steps_restarting(tmp_path):
    """The run folder is deleted and recreated; its steps start again at 100. Nothing of the old run stays."""
    run, out, second = tmp_path / "run", tmp_path / "avg", tmp_path / "second"
    run.mkdir()
    second.mkdir()
    daemon = start_daemon(run, out)
    try:
        for i, step in enumerate((100, 200, 300, 400, 500)):
            write_trainer_checkpoint(run, step, i)
        assert wait_for(folded_to(out, 500), 30), status(out)
        shutil.rmtree(run)
        run.mkdir()
        for i, step in enumerate((100, 200)):
            archive_of(write_trainer_checkpoint(run, step, 20 + i), second)
            time.sleep(0.3)
        assert wait_for(lambda: status(out).get("last_folded_step") == 200 and status(out).get("rewinds"), 30), status(out)
        assert not (out / "swa-400").exists()  # the old run's SWA is not shown while the new one has none
        for i, step in enumerate((300, 400, 500)):
            archive_of(write_trainer_checkpoint(run, step, 22 + i), second)
        assert wait_for(lambda: status(out).get("last_folded_step") == 500 and
                        status(out)["averages"]["ema-150"]["folded"] == 5, 30), status(out)
    finally:
        code, err = stop(daemon)
    assert code == 0, err
    assert "trainer rewind" in err
    one_shot(second, tmp_path / "oneshot")
    assert_same(out, tmp_path / "oneshot")


# -- a retained copy re-written after its fold (row 37) -------------------------------------------------------------

def test_retained_copy_rewritten_in_place_is_detected_and_the_window_rebuilt(tmp_path):
    """checkpoint-100 is re-written in place (through the daemon's hard link) and rotated away while the daemon is
    down; LAWA-3 would subtract it when 400 arrives. The daemon notices, warns once, rebuilds the window from 200,
    300 and 400: the result is the one-shot over the files as first written (to float32 rounding, since the window
    sum is rebuilt rather than updated), never the new bytes."""
    run, out, first = tmp_path / "run", tmp_path / "avg", tmp_path / "first"
    run.mkdir()
    first.mkdir()
    daemon = start_daemon(run, out)
    try:
        for i, step in enumerate((100, 200, 300)):
            archive_of(write_trainer_checkpoint(run, step, i), first)
        assert wait_for(folded_to(out, 300), 30), status(out)
    finally:
        code, err = stop(daemon)
    assert code == 0, err
    rewrite_in_place(run / "checkpoint-100", seed=99)  # changes the retained hard link too
    shutil.rmtree(run / "checkpoint-100")  # rotated away: only the daemon's (changed) copy is left
    archive_of(write_trainer_checkpoint(run, 400, 3), first)
    daemon = start_daemon(run, out)
    try:
        assert wait_for(folded_to(out, 400), 30), status(out)
    finally:
        code, err = stop(daemon)
    assert code == 0, err
    assert err.count("the retained copy of step 100 changed after it was folded") == 1, err
    one_shot(first, tmp_path / "oneshot")
    lawa = load_file(str(out / "lawa-3" / "model.safetensors"))
    want = load_file(str(tmp_path / "oneshot" / "lawa-3" / "model.safetensors"))
    ref = {k: sum(load_file(str(first / f"checkpoint-{s}" / "model.safetensors"))[k].double() for s in (200, 300, 400)) / 3
           for k in ("w", "b")}
    for k in ("w", "b"):
        torch.testing.assert_close(lawa[k].double(), ref[k].to(lawa[k].dtype).double(), rtol=0, atol=0) \
            if lawa[k].dtype == torch.bfloat16 else torch.testing.assert_close(lawa[k].double(), ref[k], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lawa[k], want[k], rtol=2e-6, atol=2e-6)
    for name in ("ema-150", "swa-400"):  # the methods that never re-read it are bit-identical
        x, y = load_file(str(out / name / "model.safetensors")), load_file(str(tmp_path / "oneshot" / name / "model.safetensors"))
        assert all(torch.equal(x[k], y[k]) for k in x), name


# -- missed checkpoints and a run that does not exist yet (rows 26, 38) ------------------------------------------------

def test_checkpoints_that_came_and_went_unseen_are_reported(tmp_path):
    run, out = tmp_path / "run", tmp_path / "avg"
    run.mkdir()
    daemon = start_daemon(run, out)
    try:
        for i, step in enumerate((100, 200, 300)):
            write_trainer_checkpoint(run, step, i)
        assert wait_for(folded_to(out, 300), 30), status(out)
    finally:
        stop(daemon)
    for i, step in enumerate((400, 500, 600)):  # written and rotated away while nobody watched
        write_trainer_checkpoint(run, step, 10 + i)
    for step in (400, 500):
        shutil.rmtree(run / f"checkpoint-{step}")
    daemon = start_daemon(run, out)
    try:
        assert wait_for(folded_to(out, 600), 30), status(out)
    finally:
        code, err = stop(daemon)
    assert code == 0, err
    line = ("missed checkpoints: 2 checkpoint(s) between steps 300 and 600 (steps 400..500, one every 100 steps by "
            "the trainer's cadence) were never seen: the averages do not include them")
    assert err.count(line) == 1, err
    assert status(out)["missed"] == [{"after": 300, "before": 600, "every": 100, "source": "cadence", "count": 2}]


def test_save_steps_tell_what_was_rotated_away_before_the_first_scan(tmp_path):
    run, out = tmp_path / "run", tmp_path / "avg"
    run.mkdir()
    for i, step in enumerate((300, 400)):  # 100 and 200 were rotated away before the daemon started
        folder = write_trainer_checkpoint(run, step, i)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "save_steps": 100}))
    daemon = start_daemon(run, out)
    try:
        assert wait_for(folded_to(out, 400), 30), status(out)
    finally:
        code, err = stop(daemon)
    assert code == 0, err
    assert err.count("missed checkpoints: 2 checkpoint(s) before the daemon saw the run (steps 100..200, one every "
                     "100 steps by the trainer's save_steps)") == 1, err


def test_watch_started_before_the_run_folder_exists(tmp_path):
    """It says so, and the folder's creation wakes it at once (a 30 s poll interval would otherwise show)."""
    run, out = tmp_path / "later" / "run", tmp_path / "avg"
    daemon = start_daemon(run, out, "--poll-interval", "30")
    try:
        assert wait_for(lambda: status(out).get("state") == "watching", 30)
        run.mkdir(parents=True)
        write_trainer_checkpoint(run, 100, 0)
        started = time.monotonic()
        assert wait_for(folded_to(out, 100), 20), status(out)
        assert time.monotonic() - started < 10
    finally:
        code, err = stop(daemon)
    assert code == 0, err
    assert err.count(f"{run} does not exist (yet); waiting for it to appear") == 1, err


# -- degrade, never die (rows 39, 40, 41) ----------------------------------------------------------------------------

def test_a_checkpoint_that_cannot_be_folded_is_skipped_once_and_for_good(tmp_path):
    run, out = tmp_path / "run", tmp_path / "avg"
    run.mkdir()
    env = {**os.environ, "CKPTAVG_FAULT": "poison-step=200"}
    daemon = start_daemon(run, out, env=env)
    try:
        for i, step in enumerate((100, 200, 300)):
            write_trainer_checkpoint(run, step, i)
        assert wait_for(folded_to(out, 300), 30), status(out)
    finally:
        code, err = stop(daemon)
    assert code == 0, err
    assert err.count("skipping checkpoint step 200: RuntimeError: poisoned by the test") == 1, err
    assert status(out)["skipped"] == [200]
    daemon = start_daemon(run, out, env=env)  # the skip is persisted: no retry, no crash loop
    try:
        assert wait_for(lambda: status(out).get("state") == "watching" and status(out).get("pid") == daemon.pid, 30)
        time.sleep(1.0)
    finally:
        code, err = stop(daemon)
    assert code == 0 and "step 200" not in err, err


def test_a_fifo_where_a_weight_file_should_be_never_blocks(tmp_path):
    run, out = tmp_path / "run", tmp_path / "avg"
    run.mkdir()
    bad = run / "checkpoint-100"
    bad.mkdir()
    os.mkfifo(bad / "model.safetensors")
    (bad / "trainer_state.json").write_text("{}")
    daemon = start_daemon(run, out)
    try:
        write_trainer_checkpoint(run, 200, 1)
        assert wait_for(folded_to(out, 200), 30), status(out)
    finally:
        started = time.monotonic()
        code, err = stop(daemon)  # SIGTERM still works
    assert code == 0 and time.monotonic() - started < 10, err
    assert "is not a regular file (a FIFO, socket or device?); it is never opened" in err
    r = subprocess.run([*ckptavg_command(None), "inspect", str(bad)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and r.stderr.strip().endswith("is a FIFO, not a weight file; it is not read "
                                                           "(checkpoint files must be regular files)"), r.stderr


def test_a_checkpoint_from_the_future_is_folded_once_it_stops_changing(tmp_path):
    """Clock skew: the trainer's host is an hour ahead of this one."""
    run, out = tmp_path / "run", tmp_path / "avg"
    run.mkdir()
    folder = write_trainer_checkpoint(run, 100, 0)
    ahead = time.time() + 3600
    for f in [folder, *folder.iterdir()]:
        os.utime(f, (ahead, ahead))
    daemon = start_daemon(run, out)
    try:
        assert wait_for(folded_to(out, 100), 20), status(out)
    finally:
        code, err = stop(daemon)
    assert code == 0, err
    assert "in the future by this host's clock (clock skew" in err


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "fs"
    if os.geteuid() != 0 or not _mount_tmpfs(mnt, "4m"):
        pytest.skip("needs root to mount a small tmpfs")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_then_read_only_output_degrades_and_catches_up(tmp_path, small_fs):
    """The output filesystem fills up, then turns read-only: the daemon keeps folding, says "degraded" in its
    status, and catches up bit-identically once it can write (the state folder is elsewhere)."""
    run, out, state = tmp_path / "run", small_fs / "avg", tmp_path / "state"

    def status(_out: Path) -> dict:
        try:
            return json.loads((state / "status.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    run.mkdir()
    archive = tmp_path / "archive"
    archive.mkdir()
    daemon = start_daemon(run, out, "--state-dir", str(state))
    try:
        archive_of(write_trainer_checkpoint(run, 100, 0), archive)
        assert wait_for(folded_to(out, 100, status), 30), status(out)
        filler = small_fs / "filler"
        with open(filler, "wb") as f:  # fill the output filesystem
            try:
                while True:
                    f.write(b"\0" * (1 << 16))
            except OSError:
                pass
        for i, step in enumerate((200, 300)):
            archive_of(write_trainer_checkpoint(run, step, i + 1), archive)
        assert wait_for(lambda: status(out).get("degraded") and status(out).get("last_folded_step") == 300, 30), status(out)
        filler.unlink()
        assert wait_for(lambda: not status(out).get("degraded") and
                        json.loads((out / "lawa-3" / "ckptavg.json").read_text())["steps"][-1] == 300, 90), status(out)
        assert subprocess.run(["mount", "-o", "remount,ro", str(small_fs)]).returncode == 0
        archive_of(write_trainer_checkpoint(run, 400, 4), archive)
        assert wait_for(lambda: status(out).get("degraded") and status(out).get("last_folded_step") == 400, 30), status(out)
        assert subprocess.run(["mount", "-o", "remount,rw", str(small_fs)]).returncode == 0
        assert wait_for(lambda: not status(out).get("degraded") and
                        json.loads((out / "lawa-3" / "ckptavg.json").read_text())["steps"][-1] == 400, 90), status(out)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], capture_output=True)
        code, err = stop(daemon)
    assert code == 0, err
    assert "degraded: cannot publish into" in err and "caught up" in err
    one_shot(archive, tmp_path / "oneshot")
    assert_same(out, tmp_path / "oneshot")


# -- ownership -------------------------------------------------------------------------------------------------------

def test_a_state_folder_inside_the_run_is_refused(tmp_path):
    run, out = tmp_path / "run", tmp_path / "avg"
    run.mkdir()
    write_trainer_checkpoint(run, 100, 0)
    daemon = start_daemon(run, out, "--state-dir", str(run / "checkpoint-100" / "state"))
    code, err = daemon.wait(30), daemon.stderr.read()
    assert code == 2, err
    assert err.strip().splitlines()[-1] == (
        f"ckptavg: error: the state folder {run / 'checkpoint-100' / 'state'} is inside the watched run {run}; "
        "ckptavg never writes into the trainer's folders (set state_dir (--state-dir) outside the run, e.g. the "
        "default OUTPUT/.ckptavg)")
    assert not (run / "checkpoint-100" / "state").exists()


def test_two_daemons_cannot_publish_into_one_output(tmp_path):
    run, out = tmp_path / "run", tmp_path / "avg"
    run.mkdir()
    first = start_daemon(run, out)
    try:
        assert wait_for(lambda: status(out).get("state") == "watching", 30)
        second = start_daemon(run, out, "--state-dir", str(tmp_path / "other-state"))
        code, err = second.wait(30), second.stderr.read()
    finally:
        stop(first)
    assert code == 1, err
    assert f"ckptavg: error: {out}: is published by another ckptavg daemon (pid {first.pid}" in err
