"""DeepSpeed checkpoints as DeepSpeed writes them: a real 2-rank run on CPU (``DS_ACCELERATOR=cpu``, gloo) at
ZeRO stages 1, 2 and 3 (tests/ds_train.py), read by ``ckptavg average`` and by ``ckptavg watch`` started before the
run, against a float64 reference built here from the fp32 master weights DeepSpeed's own
``get_fp32_state_dict_from_zero_checkpoint`` reconstructs (dumped by the trainer outside its run folder).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_daemon import status, stop, wait_for

pytestmark = pytest.mark.slow

pytest.importorskip("deepspeed")

TRAIN = Path(__file__).with_name("ds_train.py")
STEPS = (2, 4, 6)
HALF_LIFE = 3.0
RUN_FILES = {"latest", "zero_to_fp32.py", "zero_to_torch.py", *(f"global_step{s}" for s in STEPS)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_training(run: Path, ref: Path, stage: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(TRAIN), str(run), str(ref),
         "--stage", str(stage), "--steps", str(max(STEPS)), "--every", "2", "--pause", "0.3", *extra],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def start_daemon(run: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ckptavg.cli.main", "watch", str(run), "-o", str(out), "--ema", str(HALF_LIFE),
         "--lawa", "2", "--settle", "0.1", "--poll-interval", "0.2", "--device", "cpu", *extra],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


_RUNS: dict[int, dict] = {}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``trained(stage)``: a 2-rank DeepSpeed run of that stage, watched from its start by ``ckptavg watch``
    (EMA and LAWA-2, so that LAWA re-reads its retained copies); one run per stage for the whole module."""

    def get(stage: int) -> dict:
        if stage in _RUNS:
            return _RUNS[stage]
        base = tmp_path_factory.mktemp(f"zero{stage}")
        run, ref, out = base / "run", base / "ref", base / "avg"
        run.mkdir()
        daemon = start_daemon(run, out)
        try:
            assert wait_for(lambda: status(out).get("state") == "watching", 60), status(out)
            started = time.monotonic()
            trainer = start_training(run, ref, stage)
            log, _ = trainer.communicate(timeout=240)
            seconds = time.monotonic() - started
            assert trainer.returncode == 0, log[-4000:]
            folded = wait_for(lambda: status(out).get("last_folded_step") == max(STEPS), 90)
        finally:
            code, err = stop(daemon)
        assert folded, (status(out), err[-4000:])
        assert code == 0, err[-4000:]
        _RUNS[stage] = {"run": run, "ref": ref, "out": out, "err": err, "seconds": seconds}
        return _RUNS[stage]

    return get


def reference(ref: Path, step: int) -> dict[str, torch.Tensor]:
    """What DeepSpeed's zero_to_fp32 reconstructs at ``step``, plus the frozen parameters it leaves out under its
    bf16 optimizer (ZeRO-1), which ckptavg takes from the module as saved."""
    fp32 = torch.load(ref / f"{step}.pt", weights_only=True)
    module = torch.load(ref / f"{step}.module.pt", weights_only=True)
    return {**{k: v for k, v in module.items() if k not in fp32}, **fp32}


def ema64(ref: Path) -> dict[str, torch.Tensor]:
    """EMA over ``STEPS`` by DESIGN.md's formula, in float64."""
    avg: dict[str, torch.Tensor] = {}
    prev = None
    for step in STEPS:
        theta = {k: v.double() for k, v in reference(ref, step).items()}
        if prev is None:
            avg = theta
        else:
            beta = 0.5 ** ((step - prev) / HALF_LIFE)
            avg = {k: beta * avg[k] + (1 - beta) * theta[k] for k in avg}
        prev = step
    return avg


def lawa64(ref: Path, window: int = 2) -> dict[str, torch.Tensor]:
    members = [reference(ref, s) for s in STEPS[-window:]]
    return {k: sum(m[k].double() for m in members) / window for k in members[0]}


def load_output(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}  # noqa: SIM118


def assert_matches(folder: Path, expected: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> None:
    """The output holds every tensor (the tied head as an alias), each in the dtype DeepSpeed's reconstruction
    has, equal to the float64 reference within that dtype's rounding."""
    got, meta = load_output(folder)
    assert json.loads(meta["ckptavg.tied"]) == {"head.weight": "emb.weight"}
    assert set(got) == set(expected) - {"head.weight"}
    for name, t in got.items():
        assert t.dtype == like[name].dtype, name
        exp = expected[name].to(t.dtype).double()
        tol = 1e-6 if t.dtype == torch.float32 else 1e-2
        assert torch.allclose(t.double(), exp, rtol=tol, atol=tol), (name, (t.double() - exp).abs().max())


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_row86_zero_stages_daemon_and_one_shot_match_zero_to_fp32(trained, tmp_path, ckptavg, stage):
    """docs/FAULTS.md row 86: a real 2-rank ZeRO-1/2/3 run; the daemon (started before the trainer) and the one-shot
    average the fp32 master weights DeepSpeed's zero_to_fp32 reconstructs, never touching the run folder."""
    r = trained(stage)
    run, ref, out = r["run"], r["ref"], r["out"]
    assert r["seconds"] < 120, r["seconds"]  # 2 ranks on CPU: typically 35-45 s on 2 shared cores
    last = reference(ref, max(STEPS))
    st = status(out)
    assert st["skipped"] == [] and st["averages"][f"ema-{HALF_LIFE:g}"]["folded"] == len(STEPS), st
    assert r["err"].count("folded step") == len(STEPS)
    assert_matches(out / f"ema-{HALF_LIFE:g}", ema64(ref), last)
    assert_matches(out / "lawa-2", lawa64(ref), last)  # step 2 left the window: read again from keep/2
    assert {p.name for p in run.iterdir()} == RUN_FILES  # nothing written into the run
    # the retained flat copy (rank files linked side by side, no 'latest') opens whole
    keep = out / ".ckptavg" / "keep" / str(max(STEPS))
    r_inspect = ckptavg("inspect", keep, "--json")
    assert r_inspect.code == 0, r_inspect.err
    info = json.loads(r_inspect.out)
    assert (info["format"], info["complete"], info["ranks"]) == (f"deepspeed-zero{stage}", True, 2)

    r1 = ckptavg("average", run, "--last", "3", "--method", f"ema:{HALF_LIFE:g}", "--device", "cpu",
                 "-o", tmp_path / "one")
    assert r1.code == 0, r1.err
    assert_matches(tmp_path / "one", ema64(ref), last)
    r2 = ckptavg("inspect", run / f"global_step{max(STEPS)}", "--json")
    info = json.loads(r2.out)
    assert (info["format"], info["step"], info["complete"], info["ranks"]) == (f"deepspeed-zero{stage}", 6, True, 2)


def test_row87_half_written_tag_is_not_folded_until_every_rank_file_is_there(trained, tmp_path, ckptavg):
    """docs/FAULTS.md row 87: 'latest' already names a tag whose rank-1 optimizer file is not there yet (rank 0
    writes 'latest' without waiting for the other ranks): the one-shot refuses it, naming the missing rank; the
    daemon waits, and folds it once the file appears."""
    src = trained(2)["run"] / "global_step4"
    run = tmp_path / "run"
    tag = run / "global_step4"
    shutil.copytree(src, tag)
    (run / "latest").write_text("global_step4")
    missing = next(tag.glob("*zero_pp_rank_1_*optim_states.pt"))
    held = tmp_path / missing.name
    missing.rename(held)
    r = ckptavg("average", tag, "-o", tmp_path / "one")
    assert r.code == 1
    assert f"DeepSpeed rank file(s) missing: ranks 1 of 2 (e.g. {missing.name})" in r.err, r.err
    r = ckptavg("inspect", tag, "--json")
    assert json.loads(r.out)["complete"] is False
    out = tmp_path / "avg"
    daemon = start_daemon(run, out)
    try:
        assert wait_for(lambda: status(out).get("state") == "watching", 60), status(out)
        time.sleep(2.0)  # ten rescans: still waiting
        assert status(out).get("last_folded_step") is None, status(out)
        held.rename(missing)
        assert wait_for(lambda: status(out).get("last_folded_step") == 4, 60), status(out)
    finally:
        code, err = stop(daemon)
    assert code == 0, err
    assert not (run / ".ckptavg").exists()


def test_row88_module_weights_on_request_and_refused_under_zero3(trained, tmp_path, ckptavg):
    """docs/FAULTS.md row 88: ``--deepspeed-weights module`` reads the bf16 module weights the model states hold
    (ZeRO-1); under ZeRO-3 they are empty placeholders, and the option is refused with what to do instead."""
    ref = trained(1)["ref"]
    run = trained(1)["run"]
    r = ckptavg("average", run / "global_step4", run / "global_step6", "--deepspeed-weights", "module",
                "--device", "cpu", "-o", tmp_path / "mod")
    assert r.code == 0, r.err
    mods = [torch.load(ref / f"{s}.module.pt", weights_only=True) for s in (4, 6)]
    got, _ = load_output(tmp_path / "mod")
    assert set(got) == set(mods[0]) - {"head.weight"}
    for name, t in got.items():
        assert t.dtype == mods[1][name].dtype, name
        exp = ((mods[0][name].double() + mods[1][name].double()) / 2).to(t.dtype)
        assert torch.equal(t, exp), name
    assert got["fc1.weight"].dtype == torch.bfloat16

    run3 = trained(3)["run"]
    r = ckptavg("average", run3 / "global_step6", "--deepspeed-weights", "module", "-o", tmp_path / "m3")
    assert r.code == 1
    assert "--deepspeed-weights module cannot read a ZeRO-3 checkpoint" in r.err
    assert "use --deepspeed-weights fp32" in r.err


def test_row89_reads_slices_not_rank_files(trained):
    """docs/FAULTS.md row 89: reading a tensor copies only its byte ranges out of the rank files (no memory map, no
    rank file decoded whole): every tensor read equals zero_to_fp32's, and the bytes read are the tensors' own."""
    from ckptavg.reading.checkpoint import open_checkpoint
    from ckptavg.reading.fileio import FileCache

    for stage in (1, 3):
        run, ref = trained(stage)["run"], trained(stage)["ref"]
        ckpt = open_checkpoint(run)  # the save folder: the tag 'latest' names
        assert ckpt.step == max(STEPS) and ckpt.format == f"deepspeed-zero{stage}"
        want = reference(ref, max(STEPS))

        class Counting(FileCache):
            nbytes = 0

            def read(self, path, expected, offset, n, *, out=None):
                Counting.nbytes += n
                return super().read(path, expected, offset, n, out=out)

        with Counting() as files, ckpt.reader(files) as reader:
            for name in ckpt.tensors:
                t = reader.read(name)
                assert t.dtype == want[name].dtype and torch.equal(t, want[name]), name
        need = sum(r.numel * (r.dtype.itemsize if name != "scale" else 4) for name, r in ckpt.tensors.items())
        rank_bytes = sum(f.stat().st_size for f in ckpt.files if "optim_states" in f.name)
        assert Counting.nbytes <= need + 64 and Counting.nbytes < rank_bytes / 2, (Counting.nbytes, need, rank_bytes)
        assert math.isclose(sum(r.numel for r in ckpt.tensors.values()), sum(v.numel() for k, v in want.items()
                                                                             if k != "head.weight"))


@pytest.mark.parametrize("stage", [2, 3])
def test_row90_hf_trainer_layout_reads_the_master_weights_not_its_model_file(tmp_path, ckptavg, stage):
    """docs/FAULTS.md row 90: a real HF Trainer run under DeepSpeed ZeRO-2/3 (2 ranks, CPU) leaves ``checkpoint-N/``
    holding ``latest`` and ``global_stepN/`` (ZeRO-2: beside its own bf16 ``model.safetensors``; ZeRO-3: no weights
    file of its own): discovery takes
    ``checkpoint-N`` as the checkpoint, the fp32 master weights are averaged (as DeepSpeed's zero_to_fp32 rebuilds
    them, not the bf16 file), ``config.json`` is copied and DeepSpeed's scripts are not; a ``checkpoint-N`` whose
    ``latest`` is not written yet is skipped, saying so."""
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from ckptavg.reading.discover import find_candidates

    out_dir = tmp_path / "output"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    trainer = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2", "--master-addr",
         "127.0.0.1", "--master-port", str(free_port()), str(TRAIN.with_name("hf_ds_train.py")), str(out_dir), str(stage)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=240)
    assert trainer.returncode == 0, (trainer.stdout + trainer.stderr)[-4000:]
    ck2, ck4 = out_dir / "checkpoint-2", out_dir / "checkpoint-4"
    names = {p.name for p in ck4.iterdir()}
    assert {"latest", "global_step4", "trainer_state.json"} <= names and ("model.safetensors" in names) == (stage < 3)
    torn = out_dir / "checkpoint-6"
    shutil.copytree(ck4 / "global_step4", torn / "global_step6")  # 'latest' not written yet
    assert [p.name for p in find_candidates(out_dir)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]

    res = ckptavg("average", out_dir, "--last", "2", "--device", "cpu", "-o", tmp_path / "avg")
    assert res.code == 0, res.err
    assert "checkpoint-6" in res.err and "'latest'" in res.err  # skipped, saying why
    with contextlib.redirect_stdout(io.StringIO()):
        refs = [get_fp32_state_dict_from_zero_checkpoint(str(c)) for c in (ck2, ck4)]
    tied = {"lm_head.weight": "transformer.wte.weight"}
    got, meta = load_output(tmp_path / "avg")
    assert json.loads(meta["ckptavg.tied"]) == tied and set(got) == set(refs[1]) - set(tied)
    for name, t in got.items():
        assert t.dtype == refs[1][name].dtype == torch.float32, name
        exp = (refs[0][name].double() + refs[1][name].double()) / 2
        assert torch.allclose(t.double(), exp, rtol=1e-6, atol=1e-7), name
    names = {p.name for p in (tmp_path / "avg").iterdir()}
    assert "config.json" in names and not names & {"zero_to_fp32.py", "zero_to_torch.py", "latest"}


def test_row91_without_zero_the_module_weights_are_read(tmp_path, ckptavg):
    """docs/FAULTS.md row 91: DeepSpeed without ZeRO (stage 0, fp32, 2 ranks) saves only
    ``mp_rank_00_model_states.pt`` (no ``param_shapes``, no rank files): its module weights are the master weights;
    the save folder with several tags is a run folder for the one-shot."""
    run, ref = tmp_path / "run", tmp_path / "ref"
    trainer = start_training(run, ref, 0, "--fp32")
    log, _ = trainer.communicate(timeout=240)
    assert trainer.returncode == 0, log[-4000:]
    r = ckptavg("inspect", run / "global_step6", "--json")
    info = json.loads(r.out)
    assert (info["format"], info["complete"], info["deepspeed_weights"]) == ("deepspeed-zero0", True, "module")
    r = ckptavg("average", run, "--device", "cpu", "-o", tmp_path / "avg")  # every tag of the save folder
    assert r.code == 0, r.err
    refs = [torch.load(ref / f"{s}.pt", weights_only=True) for s in STEPS]
    expected = {k: sum(x[k].double() for x in refs) / len(refs) for k in refs[0]}
    assert_matches(tmp_path / "avg", expected, refs[-1])


@pytest.mark.slow
def test_row86_under_torchrun_each_rank_gathers_its_own_tensors(trained, tmp_path):
    """A ZeRO-3 run averaged by `torchrun --nproc-per-node 2 -m ckptavg average`: each rank reads its tensors'
    slices from the rank files; every output tensor equals the single-process run's bit for bit."""
    from test_distributed import load_folder, plain, torchrun

    run = trained(3)["run"]
    r = plain("average", run, "--last", "3", "--method", f"ema:{HALF_LIFE}", "-o", tmp_path / "plain")
    assert r.returncode == 0, r.stderr
    r = torchrun(2, "average", run, "--last", "3", "--method", f"ema:{HALF_LIFE}", "-o", tmp_path / "ranks")
    assert r.returncode == 0, r.stderr[-4000:]
    one, _ = load_folder(tmp_path / "plain")
    two, _ = load_folder(tmp_path / "ranks")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
