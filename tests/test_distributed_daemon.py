"""The daemon across ranks (``torchrun -m ckptavg watch``): real torchrun, gloo, CPU, 2 ranks.

Each test starts ``python -m torch.distributed.run --standalone --nproc-per-node 2`` (what ``torchrun``
runs) on a run of real HF-Trainer-like checkpoints, and compares every published tensor with the
single-process daemon or the one-shot over the same checkpoints (``torch.equal``: bit-identical; the
single-process daemon equals the one-shot bit for bit, tests/test_daemon.py). Faults are injected at the
named hook points of :mod:`ckptavg.hooks` through tests/faultinject.py, in torchrun's first attempt
only, and ``--max-restarts 1`` restarts every rank as a cluster scheduler would."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_daemon import (
    AVERAGES,
    NAMES,
    one_shot,
    start_daemon,
    status,
    stop,
    wait_for,
    write_trainer_checkpoint,
)
from test_distributed import ROOT, env_plain, load_folder

pytestmark = pytest.mark.slow

STEPS = (100, 200, 300, 400, 500)


def start_ranks(run: Path | str, out: Path, *extra: str, fault: str | None = None, restarts: int = 0,
                nproc: int = 2, env: dict | None = None) -> subprocess.Popen:
    """``torchrun --standalone --nproc-per-node 2 [--max-restarts N] -m ckptavg watch RUN -o OUT ...``
    (through the fault launcher with ``fault``)."""
    env = {**(env or env_plain())}
    target = ["-m", "ckptavg"]
    if fault:
        env["CKPTAVG_FAULT"] = fault
        target = [str(ROOT / "tests" / "faultinject.py")]
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
         f"--max-restarts={restarts}", "--monitor-interval=0.2", *target, "watch", str(run), "-o", str(out),
         *AVERAGES, "--settle", "0.1", "--poll-interval", "0.2", "--device", "cpu", *extra],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def stop_ranks(proc: subprocess.Popen) -> str:
    """SIGTERM to torchrun (what systemd or Slurm sends): it passes it on, every rank stops cleanly."""
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    return err


def folded_to(out: Path, step: int, pid: int | None = None):
    def cond() -> bool:
        st = status(out)
        return (st.get("last_folded_step") == step and st.get("state") == "watching"
                and (pid is None or st.get("pid") != pid))
    return cond


def assert_same_averages(a: Path, b: Path, names: tuple[str, ...] = tuple(NAMES)) -> None:
    """Every tensor of every average, published by the ranks (a shard each) or by one process."""
    for name in names:
        x, _ = load_folder(a / name)
        y, _ = load_folder(b / name)
        assert x.keys() == y.keys(), name
        for k in x:
            assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), (name, k)


def assert_ranks_equal_the_single_daemon(run, out: Path, single: Path, last_step: int,
                                         names: tuple[str, ...] = tuple(NAMES)) -> None:
    """The single-process daemon over ``run`` into ``single``, run until it has folded ``last_step`` and
    stopped cleanly, published what the ranks published into ``out``, bit for bit."""
    daemon = start_daemon(run, single)
    try:
        assert wait_for(lambda: status(single).get("last_folded_step") == last_step, 60)
    finally:
        code, serr = stop(daemon)
    assert code == 0, serr
    assert_same_averages(out, single, names)


def steps_of(out: Path) -> dict[str, list[int]]:
    return {name: json.loads((out / name / "ckptavg.json").read_text())["steps"] for name in NAMES}


def test_row121_two_ranks_are_bit_identical_to_the_single_process_daemon_and_resume(tmp_path):
    """docs/FAULTS.md row 121: a 2-rank daemon (EMA, LAWA, SWA) over checkpoints that land before and while
    it runs, stopped (SIGTERM to torchrun) and started again, publishes bit-identically to a single-process
    daemon over the same checkpoints; each rank wrote its own shard, rank 0 the index and the card."""
    run, out, archive = tmp_path / "run", tmp_path / "avg", tmp_path / "archive"
    archive.mkdir()
    for i, step in enumerate(STEPS[:2]):
        write_trainer_checkpoint(run, step, i, archive)
    ranks = start_ranks(run, out)
    try:
        assert wait_for(folded_to(out, 200), 60), status(out)
        write_trainer_checkpoint(run, 300, 2, archive)
        assert wait_for(folded_to(out, 300), 30), status(out)
    finally:
        err = stop_ranks(ranks)
    assert status(out)["state"] == "stopped", err
    assert "stopped after folding 3 checkpoint(s) on 2 ranks" in err
    ranks = start_ranks(run, out)  # resumes from the committed generation: nothing folded again
    try:
        assert wait_for(lambda: status(out).get("state") == "watching", 60), status(out)
        for i, step in enumerate(STEPS[3:], start=3):
            write_trainer_checkpoint(run, step, i, archive)
            shutil.rmtree(run / f"checkpoint-{step - 300}")  # the trainer rotates (save_total_limit=2)
        assert wait_for(folded_to(out, 500), 60), status(out)
    finally:
        err2 = stop_ranks(ranks)
    assert "resumed from state generation 3, committed by all 2 ranks" in err2
    assert [err2.count(f"folded step {s}:") for s in STEPS] == [0, 0, 0, 1, 1], err2
    st = status(out)
    assert st["state"] == "stopped" and st["skipped"] == [] and st["averages"]["ema-150"]["folded"] == 5
    assert steps_of(out) == {"ema-150": list(STEPS), "lawa-3": list(STEPS), "swa-400": [400, 500]}
    _, index = load_folder(out / "ema-150")
    assert len(set(index["weight_map"].values())) == 2  # one shard per rank
    assert json.loads((out / "ema-150" / "ckptavg.json").read_text())["ranks"] == 2
    assert not any(p.name.startswith(".") for p in run.rglob("*"))  # nothing written into the run

    assert_ranks_equal_the_single_daemon(archive, out, tmp_path / "single", 500)


@pytest.mark.parametrize("fault, resumed, refolded, extra", [
    pytest.param("kill-rank-at=1:rank.fold:300", 2, 1, (), id="rank1-mid-fold"),
    pytest.param("kill-rank-at=0:ranks.before-commit:3", 2, 2, (), id="rank0-mid-commit"),  # every part durable
    pytest.param("kill-rank-at=1:state.before-manifest:3", 2, 2, (), id="rank1-mid-part"),  # writing its part
    pytest.param("kill-rank-at=1:rank.fold:300", 2, 1, ("--memory-budget", "1KB"), id="rank1-mid-fold-disk-store"),
    pytest.param("kill-rank-at=0:publish.before-rename:*", 1, 0, (), id="rank0-mid-publish"),  # step 100 committed
])
def test_rows122_123_kill9_of_a_rank_then_the_elastic_restart_resumes_exactly_once(tmp_path, fault, resumed,
                                                                                    refolded, extra):
    """docs/FAULTS.md rows 122 and 123: a rank exits 137 mid-fold (row 122), or mid-commit (row 123: rank 0
    between every part being durable and the commit record; rank 1 between its accumulators and its part's
    manifest). torchrun (--max-restarts 1) stops the other rank and restarts both; they resume from the
    last committed generation, fold each checkpoint into the averages exactly once, and publish
    bit-identically to the one-shot (= the single-process daemon) over the same checkpoints."""
    run, out = tmp_path / "run", tmp_path / "avg"
    for i, step in enumerate(STEPS):
        write_trainer_checkpoint(run, step, i)
    ranks = start_ranks(run, out, *extra, fault=fault, restarts=1)
    try:
        done = wait_for(folded_to(out, 500), 90)
    finally:
        err = stop_ranks(ranks)
    assert done, err
    assert "failed (exitcode: 137)" in err, err  # torchrun saw the kill, and restarted every rank
    # the restarted ranks resumed from generation 2 (steps 100, 200) and folded 300 once more only if its
    # first fold had been logged before the kill (the commit killed, not the fold)
    assert f"resumed from state generation {resumed}, committed by all 2 ranks" in err, err
    if refolded:
        assert [err.count(f"folded step {s}:") for s in STEPS] == [1, 1, refolded, 1, 1], err
    else:  # killed publishing step 100, already committed: published at the restart, never folded again
        assert [err.count(f"folded step {s}:") for s in STEPS] == [1, 1, 1, 1, 1], err
        assert "the published folders lag the saved state" in err
    if refolded == 2:
        assert "removed its part of generation(s) 3, never committed by every rank" in err
    st = status(out)
    assert st["state"] == "stopped" and st["averages"]["ema-150"]["folded"] == 5 and st["skipped"] == []
    assert steps_of(out) == {"ema-150": list(STEPS), "lawa-3": list(STEPS), "swa-400": [400, 500]}
    if extra:
        assert (out / ".ckptavg" / "ranks" / "rank-1" / "store").is_dir()
    assert not [p for p in out.rglob("*") if ".ckptavg-tmp-" in p.name]  # no staging left behind
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != ".ckptavg"]
    one_shot(run, tmp_path / "oneshot")
    assert_same_averages(out, tmp_path / "oneshot")


def test_row124_a_rank_that_cannot_read_its_part_rolls_every_rank_back(tmp_path):
    """docs/FAULTS.md row 124: rank 1 cannot read its part of step 300 (an injected OSError) while rank 0
    folds its own: every rank discards the fold and returns to generation 2, the daemon says so in one
    line naming the rank, step 300 is skipped as the single-process daemon skips a checkpoint it cannot
    fold, and the averages are the one-shot's without step 300 — never half of it."""
    run, out, archive = tmp_path / "run", tmp_path / "avg", tmp_path / "archive"
    archive.mkdir()
    for i, step in enumerate(STEPS):
        write_trainer_checkpoint(run, step, i, archive if step != 300 else None)
    ranks = start_ranks(run, out, fault="fail-rank-fold=1:300")
    try:
        assert wait_for(folded_to(out, 500), 60), status(out)
    finally:
        err = stop_ranks(ranks)
    line = ("skipping checkpoint step 300: rank 1 of 2 could not fold its part (OSError: injected I/O error "
            "reading rank 1's part of step 300); every rank rolled back to state generation 2: no rank holds "
            "any of step 300")
    assert err.count(line) == 1, err
    st = status(out)
    assert st["skipped"] == [300] and "rank 1 of 2" in st["last_error"]
    assert steps_of(out)["ema-150"] == [100, 200, 400, 500]
    # generation 3 records the skip: every rank's accumulators are generation 2's, bit for bit
    for rank in (0, 1):
        part = out / ".ckptavg" / "ranks" / f"rank-{rank}"
        g2, g3 = load_file(part / "accumulators-2.safetensors"), load_file(part / "accumulators-3.safetensors")
        assert g2.keys() == g3.keys() and g2 and all(torch.equal(g2[k], g3[k]) for k in g2)
    one_shot(archive, tmp_path / "oneshot")
    assert_same_averages(out, tmp_path / "oneshot")


def test_row125_another_world_size_or_a_single_process_state_is_refused(tmp_path):
    """docs/FAULTS.md row 125: the state of a 2-rank daemon restarted on 1 rank, and a single-process
    daemon's state folder given to a torchrun daemon, are refused with one line saying what to do; the
    state is left as it was."""
    run, out = tmp_path / "run", tmp_path / "avg"
    write_trainer_checkpoint(run, 100, 0)
    ranks = start_ranks(run, out)
    try:
        assert wait_for(folded_to(out, 100), 60), status(out)
    finally:
        stop_ranks(ranks)
    before = sorted(p.name for p in (out / ".ckptavg" / "ranks").iterdir())
    one = start_ranks(run, out, nproc=1)
    _, err = one.communicate(timeout=60)
    assert one.returncode != 0
    assert "was written by 2 ranks and this run has 1: start the daemon with the same number of ranks" in err, err
    assert sorted(p.name for p in (out / ".ckptavg" / "ranks").iterdir()) == before
    alone = start_daemon(run, out)  # nor does one process start over beside the ranks' state
    _, err = alone.communicate(timeout=60)
    assert alone.returncode == 2 and "holds the state of a daemon run under torchrun" in err, err
    assert sorted(p.name for p in (out / ".ckptavg" / "ranks").iterdir()) == before
    assert not list((out / ".ckptavg").glob("manifest-*.json"))

    single = tmp_path / "single"
    daemon = start_daemon(run, single)
    try:
        assert wait_for(lambda: status(single).get("last_folded_step") == 100, 60)
    finally:
        stop(daemon)
    two = start_ranks(run, single)
    _, err = two.communicate(timeout=60)
    assert two.returncode != 0
    assert "holds the state of a single-process daemon; under torchrun the state is kept per rank" in err, err


def test_row126_a_two_rank_daemon_folds_an_fsdp2_trainer_writing_dcp_as_it_trains(tmp_path):
    """docs/FAULTS.md row 126: a 2-rank FSDP2 trainer (torchrun, gloo) saves model + optimizer with dcp.save
    every 3 steps (tests/dcp_fsdp_trainer.py) while a 2-rank daemon (a second torchrun) folds the run as
    it trains, each rank reading only its tensors of the DCP shards; the result equals, bit for bit, a
    single-process daemon over the same checkpoints."""
    run, ref, out, single = tmp_path / "run", tmp_path / "ref", tmp_path / "avg", tmp_path / "single"
    run.mkdir()
    ranks = start_ranks(run, out)
    try:
        trainer = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
             str(ROOT / "tests" / "dcp_fsdp_trainer.py"), str(run), str(ref), "--steps", "12", "--every", "3",
             "--pause", "0.5"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**env_plain(), "PYTHONWARNINGS": "ignore"})
        folded_while_training = 0
        while trainer.poll() is None:
            folded_while_training = max(folded_while_training, status(out).get("last_folded_step") or 0)
            time.sleep(0.1)
        log = trainer.stdout.read()  # type: ignore[union-attr]
        assert trainer.returncode == 0, log
        assert folded_while_training >= 3, "the daemon folded nothing while the trainer ran"
        done = wait_for(folded_to(out, 12), 60)
    finally:
        err = stop_ranks(ranks)
    assert done, err
    assert status(out)["state"] == "stopped" and status(out)["skipped"] == [], err
    assert [err.count(f"folded step {s}:") for s in (3, 6, 9, 12)] == [1, 1, 1, 1], err
    assert_ranks_equal_the_single_daemon(run, out, single, 12, ("ema-150", "lawa-3"))
    assert not (out / "swa-400").exists() and not (single / "swa-400").exists()  # its start step was not reached
    x, _ = load_folder(out / "ema-150")
    assert set(x) == {"embed.weight", "block.0.weight", "block.0.bias", "block.2.weight", "block.2.bias",
                      "norm.weight", "norm.bias", "head.weight", "head.bias"}  # no optimizer or train_state


EVAL = '''
import json, sys
from pathlib import Path
from safetensors.torch import load_file
folder, name, step, calls = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
tensors = {}
for f in sorted(folder.glob("*.safetensors")):  # every rank's shard of the published folder
    tensors.update(load_file(f))
with open(calls, "a") as out:
    out.write(f"{name} {step}\\n")
print(json.dumps({"val_loss": tensors["b"].float().abs().mean().item()}))
'''


def test_row121_evaluation_runs_once_on_rank_0_over_the_ranks_shards(tmp_path):
    """docs/FAULTS.md row 121: with --eval, each candidate of a round is evaluated once (on rank 0, not once
    per rank), on the published folder holding every rank's shard; each rank's state part holds only its
    own tensors' accumulators, and together they hold every tensor once."""
    run, out, calls, script = tmp_path / "run", tmp_path / "avg", tmp_path / "calls.txt", tmp_path / "ev.py"
    script.write_text(EVAL)
    for i, step in enumerate((100, 200)):
        write_trainer_checkpoint(run, step, i)
    ranks = start_ranks(run, out, "--eval", f"{sys.executable} {script} {{model_dir}} {{name}} {{step}} {calls}",
                        "--metric", "val_loss")
    try:
        done = wait_for(lambda: (status(out).get("evaluation") or {}).get("last_evaluated_step") == 200, 90)
    finally:
        err = stop_ranks(ranks)
    assert done, err
    lines = calls.read_text().splitlines()
    assert lines and len(lines) == len(set(lines)), lines  # never twice: one evaluator, not one per rank
    assert {"raw 200", "ema-150 200", "lawa-3 200"} <= set(lines)
    rows = [json.loads(x) for x in (out / ".ckptavg" / "metrics.jsonl").read_text().splitlines()]
    assert {r["candidate"] for r in rows if r["step"] == 200} == {"raw", "ema-150", "lawa-3"}
    assert_disjoint_parts(out)


def assert_disjoint_parts(out: Path) -> None:
    """Each rank's newest state part holds accumulators of its own tensors and parts only; together, every
    element once: ``w`` (98% of the bytes) is cut across the ranks (flat element ranges, as the one-shot cuts
    it), ``b`` and ``n`` are whole on one rank."""
    held = []
    for rank in (0, 1):
        part = out / ".ckptavg" / "ranks" / f"rank-{rank}"
        newest = max(int(p.stem.split("-")[1]) for p in part.glob("accumulators-*.safetensors"))
        accs = load_file(part / f"accumulators-{newest}.safetensors")
        held.append({k.split("/")[1]: v.numel() for k, v in accs.items() if k.startswith("ema-150/")})
        extra = json.loads((part / f"manifest-{newest}.json").read_text())["extra"]
        assert extra["cut_as"] == {"w": [[96, 32], "bfloat16"]}, extra
        (r0, lo0, hi0), (r1, lo1, hi1) = extra["owner"]["w"]
        assert (r0, r1, lo0, hi0 == lo1, hi1) == (0, 1, 0, True, 96 * 32), extra["owner"]
    assert held[0]["w"] == hi0 and held[1]["w"] == hi1 - lo1, held
    assert {"b", "n"} <= held[0].keys() ^ held[1].keys(), held  # whole, on one rank each


@pytest.mark.parametrize("policy", ["error", "reset"])
def test_row127_a_tensor_cut_across_ranks_that_changes_shape_is_handled_as_one_process_does(tmp_path, policy):
    """docs/FAULTS.md row 127: ``w``, cut across the 2 ranks, grows from 96 to 128 rows at step 300 (progressive
    training). Under ``--on-shape-change error`` both daemons skip the grown checkpoints naming the tensor and
    the change; under ``reset`` the ranks cut ``w`` anew in the same proportions and restart its averages
    there. Either way the published averages equal the single-process daemon's bit for bit."""
    archive = tmp_path / "archive"
    archive.mkdir()
    run = tmp_path / "run"
    for i, step in enumerate(STEPS[:4]):
        write_trainer_checkpoint(run, step, i, archive, rows=96 if step < 300 else 128)
    flags = ("--on-shape-change", policy)
    errs = {}
    for kind, out in (("ranks", tmp_path / "avg"), ("single", tmp_path / "single")):
        proc = start_ranks(run, out, *flags) if kind == "ranks" else start_daemon(archive, out, *flags)
        try:
            done = wait_for(lambda out=out: status(out).get("state") == "watching" and (
                status(out).get("last_folded_step") == 400 or 400 in (status(out).get("skipped") or [])), 60)
        finally:
            errs[kind] = stop_ranks(proc) if kind == "ranks" else stop(proc)[1]
        assert done, (status(out), errs[kind])
    st = status(tmp_path / "avg")
    if policy == "error":
        assert st["skipped"] == [300, 400] == status(tmp_path / "single")["skipped"], st
        assert "changed shape from [96, 32] to [128, 32]" in errs["ranks"] and "'w'" in errs["ranks"], errs["ranks"]
        assert "--on-shape-change reset" in errs["ranks"]
        names = tuple(NAMES[:2])  # SWA starts at 400: skipped
    else:
        assert st["skipped"] == [] and st["last_folded_step"] == 400, st
        assert errs["ranks"].count("tensor 'w' changed from [96, 32] bfloat16 to [128, 32] bfloat16; its averages "
                                   "restart here") == 1, errs["ranks"]
        extra = json.loads(max((tmp_path / "avg" / ".ckptavg" / "ranks" / "rank-1").glob("manifest-*.json"),
                               key=lambda p: int(p.stem.split("-")[1])).read_text())["extra"]
        assert extra["cut_as"] == {"w": [[128, 32], "bfloat16"]} and extra["owner"]["w"][1][2] == 128 * 32, extra
        names = tuple(NAMES)
    assert_same_averages(tmp_path / "avg", tmp_path / "single", names)


def test_row121_a_trainer_rewind_rolls_every_rank_back(tmp_path):
    """docs/FAULTS.md row 121 (rewinds as in row 36): the trainer resumes from step 200 after 300 and 400 were
    folded, re-writing them in place, then 500 follows. Rank 0 plans the rollback, every rank returns its part
    to generation 2 and follows the new trajectory: the averages equal the one-shot over 100, 200, 300', 400',
    500 bit for bit, as the single-process daemon's do."""
    from test_daemon_trust import assert_rewound, drive_rewind

    run, out, followed = tmp_path / "run", tmp_path / "avg", tmp_path / "followed"
    run.mkdir()
    followed.mkdir()
    ranks = start_ranks(run, out)
    try:
        done = drive_rewind(run, out, followed, 60)
    finally:
        err = stop_ranks(ranks)
    assert done, err
    assert_rewound(out, err, followed, tmp_path / "oneshot", assert_same_averages)


def test_row121_a_run_folder_recreated_with_steps_restarting_empties_every_rank(tmp_path):
    """docs/FAULTS.md row 121 (as row 36): the run folder is deleted and recreated, its steps start again at
    100: every rank drops its part of the old run (nothing of it stays, SWA is unpublished until it holds
    something again) and the averages equal the one-shot over the new run bit for bit."""
    from test_daemon_trust import archive_of

    run, out, second = tmp_path / "run", tmp_path / "avg", tmp_path / "second"
    run.mkdir()
    second.mkdir()
    ranks = start_ranks(run, out)
    try:
        for i, step in enumerate(STEPS):
            write_trainer_checkpoint(run, step, i)
        assert wait_for(folded_to(out, 500), 60), status(out)
        shutil.rmtree(run)
        run.mkdir()
        for i, step in enumerate((100, 200)):
            archive_of(write_trainer_checkpoint(run, step, 20 + i), second)
            time.sleep(0.3)
        assert wait_for(lambda: status(out).get("last_folded_step") == 200 and status(out).get("rewinds"), 60), \
            status(out)
        assert not (out / "swa-400").exists()  # the old run's SWA is not shown while the new one has none
        for i, step in enumerate((300, 400, 500)):
            archive_of(write_trainer_checkpoint(run, step, 22 + i), second)
        done = wait_for(lambda: status(out).get("last_folded_step") == 500 and
                        status(out)["averages"]["ema-150"]["folded"] == 5, 60)
    finally:
        err = stop_ranks(ranks)
    assert done, err
    assert "trainer rewind" in err and "on every rank" in err
    one_shot(second, tmp_path / "oneshot")
    assert_same_averages(out, tmp_path / "oneshot")


def test_row121_a_retained_copy_rewritten_after_its_fold_is_repaired_on_every_rank(tmp_path):
    """docs/FAULTS.md row 121 (as row 37): checkpoint-100 is re-written in place through the retained hard
    link and rotated away while the daemon is down; LAWA-3 would subtract it when 400 arrives. Rank 0 finds
    it, says so once, and every rank rebuilds its tensors' windows from 200, 300 and 400: the averages
    equal, bit for bit, the single-process daemon's through the same events."""
    from test_daemon_trust import rewrite_in_place

    outs = {}
    for kind in ("ranks", "single"):
        run, out = tmp_path / kind / "run", tmp_path / kind / "avg"
        run.mkdir(parents=True)
        for i, step in enumerate((100, 200, 300)):
            write_trainer_checkpoint(run, step, i)
        proc = start_ranks(run, out) if kind == "ranks" else start_daemon(run, out)
        try:
            assert wait_for(lambda out=out: status(out).get("last_folded_step") == 300, 60), status(out)
        finally:
            stop_ranks(proc) if kind == "ranks" else stop(proc)
        rewrite_in_place(run / "checkpoint-100", seed=99)  # changes the retained hard link too
        shutil.rmtree(run / "checkpoint-100")  # rotated away: only the daemon's (changed) copy is left
        write_trainer_checkpoint(run, 400, 3)
        proc = start_ranks(run, out) if kind == "ranks" else start_daemon(run, out)
        try:
            done = wait_for(lambda out=out: status(out).get("last_folded_step") == 400
                            and status(out)["state"] == "watching", 60)
        finally:
            err = stop_ranks(proc) if kind == "ranks" else stop(proc)[1]
        assert done, err
        assert err.count("the retained copy of step 100 changed after it was folded") == 1, err
        outs[kind] = out
    assert_same_averages(outs["ranks"], outs["single"])
    assert_disjoint_parts(outs["ranks"])
