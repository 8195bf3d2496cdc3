"""``ckptavg centre`` (the elastic centre of asynchronous EASGD) and the workers' pull (ckptavg.integrations).

docs/FAULTS.md rows 109-112. The daemon runs as a real process; its centre is checked against a float64
reference of x̃ ← x̃ + α (x − x̃) over the fold order it reports, and bit for bit against an uninterrupted
in-process fold in that order.
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
from test_daemon import ckptavg_command, stop, wait_for

from ckptavg.averaging.average import Average
from ckptavg.averaging.engine import Engine
from ckptavg.averaging.methods.elastic import Elastic
from ckptavg.errors import OptionError, TensorMismatchError, UsageError
from ckptavg.integrations import PullState, centre_version, pull_toward_centre
from ckptavg.reading.checkpoint import open_checkpoint
from ckptavg.writing.export import publish_average

ALPHA = 0.3


def write_worker_checkpoint(run: Path, step: int, seed: int, *, finish: bool = True) -> Path:
    """An HF-Trainer-like checkpoint (trainer_state.json last, renamed into place): fp32, bf16 and int tensors."""
    final = run / f"checkpoint-{step}"
    tmp = run / f"tmp-checkpoint-{step}"
    tmp.mkdir(parents=True)
    g = torch.Generator().manual_seed(1000 * seed + step)
    save_file({"w": torch.randn(48, 16, generator=g), "h": torch.randn(16, 8, generator=g).to(torch.bfloat16),
               "b": torch.randn(16, generator=g), "n": torch.tensor([step])},
              str(tmp / "model.safetensors"), metadata={"format": "pt"})
    torch.save({}, tmp / "optimizer.pt")
    (tmp / "config.json").write_text(json.dumps({"model_type": "test"}))
    if finish:
        (tmp / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    os.rename(tmp, final)
    return final


def start_centre(workers, out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [*ckptavg_command(env), "centre", *map(str, workers), "--alpha", str(ALPHA), "-o", str(out),
         "--settle", "0.1", "--poll", "0.2", *extra],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})},
    )


def cstatus(out: Path) -> dict:
    try:
        return json.loads((out / ".ckptavg" / "centre-status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def folds_reach(out: Path, proc: subprocess.Popen, n: int):
    return lambda: (cstatus(out).get("pid") == proc.pid and cstatus(out).get("folds") == n
                    and cstatus(out).get("state") == "watching")


def resolve_order(out: Path, archive: dict[Path, Path]) -> list[Path]:
    """The folded checkpoints, in the order the daemon reports (``archive``: worker run → its archive copy)."""
    st = cstatus(out)
    by_path = {str(run.resolve()): arch for run, arch in archive.items()}
    return [by_path[st["workers"][i]] / f"checkpoint-{step}" for i, step in st["order"]]


def reference64(paths: list[Path], alpha: float) -> dict[str, torch.Tensor]:
    """The EASGD recurrence in float64 (int tensors: the newest)."""
    c: dict[str, torch.Tensor] = {}
    for p in paths:
        x = load_file(str(p / "model.safetensors"))
        for k, v in x.items():
            if not v.dtype.is_floating_point:
                c[k] = v
            elif k not in c:
                c[k] = v.double()
            else:
                c[k] = c[k] + alpha * (v.double() - c[k])
    return c


def uninterrupted(paths: list[Path], alpha: float) -> dict[str, torch.Tensor]:
    """The same order folded in one process, never interrupted: what the daemon must equal bit for bit."""
    avg = Average("centre", Elastic(alpha=alpha))
    with Engine(device="cpu") as engine:
        for k, p in enumerate(paths):
            engine.fold(open_checkpoint(p), [avg], ident=k)
    return {name: avg.result(name) for name in avg.slots}


def published(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "centre" / "model.safetensors"))


def assert_matches_reference(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(ref)
    for k, v in got.items():
        if not v.dtype.is_floating_point:
            assert torch.equal(v, ref[k]), k
        elif v.dtype == torch.float32:
            torch.testing.assert_close(v.double(), ref[k], rtol=1e-5, atol=1e-6)
        else:  # bf16 output: the float32 centre, rounded once
            torch.testing.assert_close(v.double(), ref[k].to(v.dtype).double(), rtol=1e-2, atol=1e-2)


def archive_copy(run: Path, arch: Path) -> None:
    for p in run.glob("checkpoint-*"):
        if not (arch / p.name).exists():
            shutil.copytree(p, arch / p.name)


# -- the recurrence, the order, exactly once ------------------------------------------------------------------

@pytest.mark.slow
def test_row109_centre_is_the_easgd_recurrence_over_its_fold_order(tmp_path):
    """docs/FAULTS.md row 109: three workers, checkpoints landing while the daemon runs; the published centre
    is x̃ ← x̃ + α (x − x̃) over the order the daemon reports (float64 reference), each checkpoint once, each
    worker's steps increasing."""
    runs = [tmp_path / f"w{i}" for i in range(3)]
    for r in runs:
        r.mkdir()
    out = tmp_path / "out"
    write_worker_checkpoint(runs[0], 10, 0)
    write_worker_checkpoint(runs[1], 10, 1)
    daemon = start_centre(runs, out)
    try:
        assert wait_for(folds_reach(out, daemon, 2), 60)
        for step in (20, 30):
            for i, r in enumerate(runs):
                write_worker_checkpoint(r, step, i)
            time.sleep(0.3)
        write_worker_checkpoint(runs[2], 5, 2)  # written after worker 2's step 20: late, unless seen together
        assert wait_for(lambda: cstatus(out).get("folds") in (8, 9) and not cstatus(out).get("queued"), 60)
        time.sleep(1.0)
    finally:
        code, err = stop(daemon)
    assert code == 0, err
    st = cstatus(out)
    order = [tuple(x) for x in st["order"]]
    assert len(order) == len(set(order)) == st["folds"]  # each checkpoint once
    for i in range(3):
        steps = [s for w, s in order if w == i]
        assert steps == sorted(steps)  # each worker's checkpoints in its step order
    if (2, 5) not in order:  # worker 2's step 5 landed after its step 20 was folded: skipped, and said so
        assert "(worker 2 step 5): arrived after step" in err and len(order) == 8
    paths = [runs[i] / f"checkpoint-{s}" for i, s in order]
    assert_matches_reference(published(out), reference64(paths, ALPHA))
    got, same = published(out), uninterrupted(paths, ALPHA)
    assert all(torch.equal(got[k], same[k]) for k in got)
    info = json.loads((out / "centre" / "ckptavg.json").read_text())
    assert info["method"] == "elastic" and info["options"] == {"alpha": ALPHA} and info["folds"] == len(order)


@pytest.mark.slow
def test_row110_a_workers_later_step_waits_for_its_earlier_one(tmp_path):
    """docs/FAULTS.md row 110: worker 0's step 200 is finished while its step 100 is still being written
    (no trainer_state.json yet): 200 waits; once 100 is finished, 100 is folded before 200."""
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    a.mkdir()
    b.mkdir()
    write_worker_checkpoint(a, 100, 0, finish=False)  # mid-save
    write_worker_checkpoint(a, 200, 0)  # lands first
    write_worker_checkpoint(b, 100, 1)
    daemon = start_centre([a, b], out)
    try:
        assert wait_for(folds_reach(out, daemon, 1), 60)
        time.sleep(1.0)
        st = cstatus(out)
        assert st["folds"] == 1 and st["order"] == [[1, 100]] and st["waiting_for"] == {"0": 100}
        assert [0, 200] in st["queued"]
        (a / "checkpoint-100" / "trainer_state.json").write_text('{"global_step": 100}')
        assert wait_for(folds_reach(out, daemon, 3), 60)
    finally:
        code, err = stop(daemon)
    assert code == 0, err
    st = cstatus(out)
    assert st["order"] == [[1, 100], [0, 100], [0, 200]]
    paths = [b / "checkpoint-100", a / "checkpoint-100", a / "checkpoint-200"]
    assert_matches_reference(published(out), reference64(paths, ALPHA))


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["crash-before-persist", "crash-before-manifest"])
def test_row111_kill9_between_fold_and_persist_refolds_exactly_once(tmp_path, fault):
    """docs/FAULTS.md row 111: kill -9 after a fold, before its generation is committed; the worker then rotates
    that checkpoint away. The restart re-folds it from the retained copy exactly once: the centre is bit-identical
    to an uninterrupted run in the same order, and the order lists each checkpoint once."""
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    arch = {a: tmp_path / "arch-a", b: tmp_path / "arch-b"}
    for p in [a, b, *arch.values()]:
        p.mkdir()
    write_worker_checkpoint(a, 1, 0)
    write_worker_checkpoint(b, 1, 1)
    daemon = start_centre([a, b], out)
    try:
        assert wait_for(folds_reach(out, daemon, 2), 60)
    finally:
        code, _ = stop(daemon)
    assert code == 0
    write_worker_checkpoint(a, 2, 0)
    archive_copy(a, arch[a])
    archive_copy(b, arch[b])
    crashed = start_centre([a, b], out, env={"CKPTAVG_FAULT": fault})
    _, err = crashed.communicate(timeout=60)
    assert crashed.returncode == 137, err
    assert cstatus(out)["folds"] == 2  # the third fold was never committed
    assert any((out / ".ckptavg" / "keep").rglob("model.safetensors"))  # its retained copy is there
    shutil.rmtree(a / "checkpoint-2")  # the worker rotates it away
    daemon = start_centre([a, b], out)
    try:
        assert wait_for(folds_reach(out, daemon, 3), 60)
        write_worker_checkpoint(b, 2, 1)
        archive_copy(b, arch[b])
        assert wait_for(folds_reach(out, daemon, 4), 60)
    finally:
        code, err = stop(daemon)
    assert code == 0, err
    st = cstatus(out)
    assert [tuple(x) for x in st["order"]] == [(0, 1), (1, 1), (0, 2), (1, 2)]
    assert err.count("folded worker 0 step 2") == 1 and "queued again" in err
    paths = resolve_order(out, arch)
    same = uninterrupted(paths, ALPHA)
    got = published(out)
    assert all(torch.equal(got[k], same[k]) for k in got), "not bit-identical to the uninterrupted run"
    assert_matches_reference(got, reference64(paths, ALPHA))
    assert not list((out / ".ckptavg" / "keep").rglob("model.safetensors"))  # every copy released once durable


@pytest.mark.slow
def test_row112_rotated_before_its_fold_is_folded_from_the_retained_copy(tmp_path):
    """docs/FAULTS.md row 112: a worker deletes a queued checkpoint (rotation) before the centre reads it: the
    retained hard links are folded, nothing is lost."""
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    arch = {a: tmp_path / "arch-a", b: tmp_path / "arch-b"}
    for p in [a, b, *arch.values()]:
        p.mkdir()
    for step in (1, 2):
        write_worker_checkpoint(a, step, 0)
        write_worker_checkpoint(b, step, 1)
    archive_copy(a, arch[a])
    archive_copy(b, arch[b])
    ev = tmp_path / "ev.py"
    ev.write_text("from safetensors.torch import load_file\n"
                  "def score(model_dir):\n    return {'w_sum': float(load_file(str(model_dir / 'model.safetensors'))['w'].sum())}\n")
    daemon = start_centre([a, b], out, "--eval-python", f"{ev}:score", env={"CKPTAVG_FAULT": "remove-source-before-fold"})
    try:
        assert wait_for(folds_reach(out, daemon, 4), 60)
    finally:
        code, err = stop(daemon)
    assert code == 0, err
    lines = [json.loads(x) for x in (out / ".ckptavg" / "centre-metrics.jsonl").read_text().splitlines()]
    assert [x["fold"] for x in lines] == [1, 2, 3, 4]  # each published centre evaluated (--eval-python)
    assert lines[-1]["w_sum"] == pytest.approx(float(published(out)["w"].sum()), rel=1e-6)
    assert not list(a.glob("checkpoint-*")) and not list(b.glob("checkpoint-*"))  # all rotated away
    paths = resolve_order(out, arch)
    assert len(paths) == 4
    assert_matches_reference(published(out), reference64(paths, ALPHA))


def test_row112_a_checkpoint_vanishing_before_it_is_kept_is_said_once_and_in_the_status(tmp_path, monkeypatch, caplog):
    """docs/FAULTS.md row 112: ready, then deleted before it could be hard-linked: one warning, and the status
    lists it (never silent)."""
    import ckptavg.daemon.centre as centre_mod

    a, out = tmp_path / "a", tmp_path / "out"
    a.mkdir()
    write_worker_checkpoint(a, 5, 0)
    real = centre_mod.check_ready

    def ready_then_gone(path, **kw):
        r = real(path, **kw)
        if r.ready:
            for f in Path(path).iterdir():
                f.unlink()
        return r

    monkeypatch.setattr(centre_mod, "check_ready", ready_then_gone)
    svc = centre_mod.CentreService(centre_mod.CentreConfig(workers=(a,), output=out, alpha=0.5, settle=0.0))
    svc.engine = Engine(device="cpu")
    svc._load()
    svc.retainers = {0: centre_mod.Retainer(out / ".ckptavg" / "keep" / "0")}
    with caplog.at_level("WARNING"):
        svc._scan()
        svc._scan()
    assert sum("vanished" in r.getMessage() for r in caplog.records) == 1
    assert svc.status()["vanished"][0]["step"] == 5 and not svc.queue


# -- bad input ------------------------------------------------------------------------------------------------

def run_cli(capsys, *args: str) -> tuple[int, str]:
    from ckptavg.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["centre", *args])
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("alpha", ["0", "1.5", "-0.1", "nan"])
def test_alpha_outside_0_1_is_refused(tmp_path, capsys, alpha):
    (tmp_path / "a").mkdir()
    code, err = run_cli(capsys, str(tmp_path / "a"), "--alpha", alpha, "-o", str(tmp_path / "out"))
    assert code == 2 and "--alpha" in err and "(0, 1]" in err and "Traceback" not in err, err


def test_alpha_one_is_accepted():
    from ckptavg.daemon.centre import CentreConfig, check_config

    assert check_config(CentreConfig(workers=(Path("nowhere-yet"),), output=Path("o"), alpha=1)).alpha == 1.0
    with pytest.raises(OptionError):
        check_config(CentreConfig(workers=(Path("x"),), output=Path("o"), alpha=0.0))


def test_worker_that_is_not_a_folder_is_refused(tmp_path, capsys):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    code, err = run_cli(capsys, str(f), "--alpha", "0.5", "-o", str(tmp_path / "out"))
    assert code == 2 and str(f) in err and "is not a folder" in err, err


def test_the_same_worker_twice_is_refused(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    os.symlink(tmp_path / "a", tmp_path / "alias")
    code, err = run_cli(capsys, str(tmp_path / "a"), str(tmp_path / "alias"), "--alpha", "0.5", "-o", str(tmp_path / "out"))
    assert code == 2 and "are the same folder" in err, err
    (tmp_path / "a" / "inner").mkdir()
    with pytest.raises(UsageError, match="lies inside worker folder"):
        from ckptavg.daemon.centre import CentreConfig, check_config

        check_config(CentreConfig(workers=(tmp_path / "a", tmp_path / "a" / "inner"), output=tmp_path / "o", alpha=0.5))
    with pytest.raises(UsageError, match="never writes into a trainer's folders"):
        check_config(CentreConfig(workers=(tmp_path / "a",), output=tmp_path / "a" / "out", alpha=0.5))


# -- the pull -------------------------------------------------------------------------------------------------

def publish_centre(out: Path, ckpt: Path, alpha: float = 1.0, avg: Average | None = None) -> Average:
    """Fold ``ckpt`` into a centre and publish it at OUT/centre, as the daemon does."""
    avg = avg or Average("centre", Elastic(alpha=alpha))
    c = open_checkpoint(ckpt, step=len(avg.folded) + 1)
    with Engine(device="cpu") as engine:
        engine.fold(c, [avg], ident=len(avg.folded))
    publish_average(avg, out / "centre", newest=c, extra={"folds": len(avg.folded)})
    return avg


def small_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def save_model(model: torch.nn.Module, folder: Path) -> Path:
    folder.mkdir(parents=True)
    save_file({k: v.detach().clone() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    return folder


def test_pull_applies_exactly_x_minus_alpha_x_minus_centre_and_only_for_a_newer_centre(tmp_path):
    out = tmp_path / "out"
    other = small_model(1)
    publish_centre(out, save_model(other, tmp_path / "c1"))
    model = small_model(0)
    x0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    c = dict(other.named_parameters())
    state = PullState()
    assert pull_toward_centre(model, out / "centre", 0.25, last=state) is True
    for k, p in model.named_parameters():
        expect = x0[k] - 0.25 * (x0[k] - c[k].detach())
        assert torch.equal(p.detach(), expect), k
        assert not torch.equal(p.detach(), x0[k])
    x1 = {k: v.detach().clone() for k, v in model.named_parameters()}
    assert pull_toward_centre(model, out / "centre", 0.25, last=state) is False  # no newer centre: a no-op
    assert pull_toward_centre(model, out, 0.25, last=state) is False  # OUT itself names the same centre
    assert all(torch.equal(p.detach(), x1[k]) for k, p in model.named_parameters())
    number, _ = centre_version(out / "centre")
    publish_centre(out, save_model(small_model(2), tmp_path / "c2"))  # a newer version
    assert centre_version(out)[0] == number + 1
    assert pull_toward_centre(model, out / "centre", 0.25, last=state) is True and state.pulls == 2
    assert pull_toward_centre(model, out / "centre", 0.25) is True  # default state: kept per model
    assert pull_toward_centre(model, out / "centre", 0.25) is False


def test_pull_without_a_centre_and_bad_input(tmp_path):
    model = small_model(0)
    assert pull_toward_centre(model, tmp_path / "nothing", 0.5) is False
    with pytest.raises(OptionError):
        pull_toward_centre(model, tmp_path, 0.0)
    with pytest.raises(OptionError):
        pull_toward_centre(model, tmp_path, 1.5)
    out = tmp_path / "out"
    wrong = torch.nn.Sequential(torch.nn.Linear(8, 5))
    publish_centre(out, save_model(wrong, tmp_path / "c"))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    with pytest.raises(TensorMismatchError, match=r"tensor '0\.(weight|bias)': is \[5"):
        pull_toward_centre(model, out / "centre", 0.5)
    assert all(torch.equal(p.detach(), before[k]) for k, p in model.named_parameters())  # untouched
    _, folder = centre_version(out)
    shutil.rmtree(folder)  # the version the link names is gone (expired): nothing to pull, no error
    assert pull_toward_centre(model, out / "centre", 0.5) is False


def test_pull_reads_the_version_it_resolved(tmp_path):
    """A reader that resolved OUT/centre before a publish keeps reading that version's files, whole."""
    out = tmp_path / "out"
    publish_centre(out, save_model(small_model(1), tmp_path / "c1"))
    _, first = centre_version(out)
    publish_centre(out, save_model(small_model(2), tmp_path / "c2"))
    _, second = centre_version(out)
    assert first != second and (first / "model.safetensors").exists()  # kept for the grace period


@pytest.mark.slow
def test_hf_callback_pulls_in_a_real_trainer_run(tmp_path):
    transformers = pytest.importorskip("transformers")
    from ckptavg.integrations.hf import CentrePullCallback

    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(1)
    other = transformers.GPT2LMHeadModel(cfg)
    other.save_pretrained(tmp_path / "w1" / "checkpoint-1")
    out = tmp_path / "out"
    publish_centre(out, tmp_path / "w1" / "checkpoint-1")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    x0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": r, "labels": r} for r in ids]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=2,
                                          learning_rate=0.0, weight_decay=0.0, report_to=[], save_strategy="no",
                                          use_cpu=True, logging_strategy="no", disable_tqdm=True)
    cb = CentrePullCallback(out / "centre", alpha=0.5, every=2)
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train()
    assert cb.state.pulls == 1  # one centre published: pulled once (step 2), a no-op at step 4
    c = dict(other.named_parameters())
    for k, p in model.named_parameters():  # lr 0: the pull alone moved the weights
        torch.testing.assert_close(p.detach().cpu(), x0[k] - 0.5 * (x0[k] - c[k].detach()), rtol=0, atol=0)


@pytest.mark.slow
def test_lightning_callback_pulls_in_a_real_trainer_run(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    from ckptavg.integrations.lightning import CentrePullLightningCallback

    class Tiny(L.LightningModule):
        def __init__(self, seed: int) -> None:
            super().__init__()
            self.net = small_model(seed)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    other = Tiny(1)
    folder = tmp_path / "w1" / "checkpoint-1"
    folder.mkdir(parents=True)
    save_file({k: v.detach().clone() for k, v in other.state_dict().items()}, str(folder / "model.safetensors"))
    out = tmp_path / "out"
    publish_centre(out, folder)
    module = Tiny(0)
    x0 = {k: v.detach().clone() for k, v in module.named_parameters()}
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 8, generator=g), torch.randn(16, 3, generator=g))
    cb = CentrePullLightningCallback(out / "centre", alpha=0.5, every=2)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
                        default_root_dir=str(tmp_path / "run"))
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    assert cb.state.pulls == 1
    c = dict(other.named_parameters())
    for k, p in module.named_parameters():
        assert torch.equal(p.detach(), x0[k] - 0.5 * (x0[k] - c[k].detach())), k


def test_the_experiments_report_says_plainly_when_the_centre_did_not_help():
    """benchmarks/easgd.py's verdict follows the numbers: a centre worse than the lone worker is reported so."""
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("easgd_bench", Path(__file__).parents[1] / "benchmarks" / "easgd.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    a = argparse.Namespace(workers=2, steps=40, save_every=20, alpha=0.5, tau=20)

    def run(name, centre_loss, worker_loss):
        return {"name": name, "rep": 0, "folds": 4, "centre": [(20, 2.0, 0.5), (80, centre_loss, 0.6)],
                "workers": [[(20, 2.0, 0.5, 1), (40, worker_loss, 0.6, 1)]] * 2}

    single = {"name": "single", "rep": 0, "curve": [(20, 1.5, 0.6), (40, 1.4, 0.6), (60, 1.3, 0.6), (80, 1.2, 0.7)]}
    text, _ = bench.report([run("pull", 1.9, 1.8), run("nopull", 1.7, 1.6), single], a, 1.0, "cmd")
    assert "the centre with the pull did not beat one worker alone" in text
    assert "The pull did not help the centre" in text and "the centre did not beat its own workers" in text
    text, _ = bench.report([run("pull", 1.0, 1.1), run("nopull", 1.7, 1.6), single], a, 1.0, "cmd")
    assert "the centre with the pull beat one worker alone" in text and "The pull helped the centre" in text
