"""Real trainers' default layouts: accelerate ``save_state``, Lightning ``ModelCheckpoint`` and fairseq.

Each writer runs tiny on CPU in a child process with its default names; the daemon watches the run from
before the first save, and the one-shot averages the same run afterwards. Both are compared with a float64
reference made from the weights the writer saved, read by an independent path (``safetensors.load_file``, or
``torch.load(weights_only=False)`` in the trainer's own process), and with each other bit for bit.

fairseq cannot be installed here: its newest release (0.12.2) does not import on Python 3.11
(``fairseq/dataclass/configs.py`` line 1106, ``common: CommonConfig = CommonConfig()``, raises
``ValueError: mutable default <class '...CommonConfig'> for field common is not allowed: use default_factory``),
and ``pip install fairseq`` fails to build (``ninja: error: '.../fairseq/data/data_utils_fast.cpp' ... missing``).
So its test trains a small encoder-decoder with plain torch and saves through a copy of fairseq 0.12.2's
``checkpoint_utils.save_checkpoint`` / ``Trainer.state_dict`` logic: the same names and conditions
(``checkpoint<E>.pt`` at the end of an epoch, ``checkpoint_<E>_<U>.pt`` every ``save_interval_updates`` updates
mid-epoch, ``checkpoint_best.pt`` and ``checkpoint_last.pt`` as copies), the same atomic ``.tmp`` + rename, and
the same contents (``model`` with the decoder's output projection tied to its input embedding, ``cfg`` as a plain
container, ``optimizer_history`` with ``num_updates``, ``extra_state`` with ``train_iterator``/``val_loss``/
``metrics``, ``last_optimizer_state``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_daemon import status, stop, wait_for

ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}


# -- helpers ------------------------------------------------------------------------------------------
def start_daemon(run: Path, out: Path, *averages: str) -> subprocess.Popen:
    daemon = subprocess.Popen(
        [sys.executable, "-m", "ckptavg.cli.main", "watch", str(run), "-o", str(out), *averages,
         "--settle", "0.2", "--poll-interval", "0.2", "--device", "cpu"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    assert wait_for(lambda: status(out).get("pid") == daemon.pid, 30), "the daemon did not start"
    return daemon


def train(tmp_path: Path, script: str, *args: object) -> subprocess.CompletedProcess:
    path = tmp_path / "train.py"
    path.write_text(textwrap.dedent(script))
    done = subprocess.run([sys.executable, str(path), *map(str, args)], capture_output=True, text=True,
                          timeout=300, check=False, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def mean64(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: sum(s[k].double() for s in states) / len(states) for k in states[0]}


def assert_matches(folder: Path, ref: dict[str, torch.Tensor], tied: dict[str, str] | None = None) -> None:
    """``folder``'s model.safetensors holds every reference tensor (a tied name by its stored twin) within fp32
    rounding of the float64 reference."""
    got = load_file(str(folder / "model.safetensors"))
    tied = tied or {}
    assert set(got) | set(tied) == set(ref), (sorted(got), sorted(ref))
    for k, want in ref.items():
        g = got[tied.get(k, k)] if k not in got else got[k]
        assert g.shape == want.shape, k
        torch.testing.assert_close(g.double(), want, rtol=1e-6, atol=1e-6, msg=k)


def assert_daemon_equals_one_shot(daemon_out: Path, one_shot: Path, names: list[str]) -> None:
    for name in names:
        a, b = load_file(str(daemon_out / name / "model.safetensors")), load_file(str(one_shot / name / "model.safetensors"))
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name


def manifest(folder: Path) -> dict:
    return json.loads((folder / "ckptavg.json").read_text())


# -- accelerate ---------------------------------------------------------------------------------------
ACCELERATE = '''
    import sys, time, torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    project, auto, safe = sys.argv[1], sys.argv[2] == "auto", sys.argv[3] == "safetensors"
    torch.manual_seed(0)
    acc = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=project,
                                                                    automatic_checkpoint_naming=auto))
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 5)
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 6, generator=g),
                                                                      torch.randn(64, 3, generator=g)), batch_size=8)
    model, opt, sched, data = acc.prepare(model, opt, sched, data)
    step = 0
    for epoch in range(2):  # 8 batches an epoch: accelerate's own step counter restarts at each epoch's end
        for x, y in data:
            with acc.accumulate(model):
                loss = torch.nn.functional.mse_loss(model(x), y)
                acc.backward(loss); opt.step(); sched.step(); opt.zero_grad()
            step += 1
            if step % 3 == 0:
                acc.save_state(None if auto else f"{project}/step_{step}", safe_serialization=safe)
                time.sleep(0.3)
'''


def _accelerate_weights(folder: Path, safe: bool) -> dict[str, torch.Tensor]:
    if safe:
        return load_file(str(folder / "model.safetensors"))
    return torch.load(folder / "pytorch_model.bin", weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("naming", ["auto", "named"])
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pickle"])
def test_accelerate_save_state(tmp_path, ckptavg, naming, safe):
    """docs/FAULTS.md rows 92 and 93 with the real ``Accelerator.save_state``: folders that hold
    ``random_states_0.pkl``/``optimizer.bin`` but never a ``trainer_state.json`` are folded once whole, and the
    automatic ``checkpoint_<i>`` names give save numbers (said once), user names ``step_<N>`` give steps."""
    pytest.importorskip("accelerate")
    project, out = tmp_path / "project", tmp_path / "avg"
    project.mkdir()
    daemon = start_daemon(project, out, "--ema", "2", "--lawa", "3")
    try:
        train(tmp_path, ACCELERATE, project, naming, "safetensors" if safe else "pickle")
        steps = list(range(5)) if naming == "auto" else [3, 6, 9, 12, 15]
        assert wait_for(lambda: status(out).get("last_folded_step") == steps[-1], 60), status(out)
    finally:
        code, err = stop(daemon)
    assert code == 0, err[-3000:]
    folders = ([project / "checkpoints" / f"checkpoint_{i}" for i in steps] if naming == "auto"
               else [project / f"step_{s}" for s in steps])
    assert all(f.is_dir() and not (f / "trainer_state.json").exists() for f in folders)
    assert status(out)["averages"]["ema-2"]["folded"] == 5 and status(out)["skipped"] == []
    for s in steps:
        assert err.count(f"folded step {s}:") == 1, (s, err[-3000:])
    note = "accelerate names its checkpoints by save number"
    assert err.count(note) == (1 if naming == "auto" else 0), err[-3000:]

    r = ckptavg("average", project, "--method", "ema:2", "--method", "lawa:3", "--device", "cpu",
                "-o", tmp_path / "oneshot")
    assert r.code == 0, r
    assert r.err.count(note) == (1 if naming == "auto" else 0), r.err
    assert manifest(tmp_path / "oneshot" / "lawa-3")["steps"] == steps
    assert_daemon_equals_one_shot(out, tmp_path / "oneshot", ["ema-2", "lawa-3"])
    weights = [_accelerate_weights(f, safe) for f in folders]
    assert_matches(out / "lawa-3", mean64(weights[-3:]))
    r = ckptavg("average", project, "--last", "4", "--device", "cpu", "-o", tmp_path / "last4")
    assert r.code == 0, r
    assert_matches(tmp_path / "last4", mean64(weights[-4:]))

    r = ckptavg("inspect", folders[1], "--json", "--settle", "0.1")
    assert r.code == 0, r
    info = json.loads(r.out)
    assert info["format"] == ("safetensors" if safe else "torch") and info["step"] == steps[1]
    assert info["ready"] == "ready" and "random_states_0.pkl" in info["ready_reason"], info
    assert ("save number" in info["step_source"]) == (naming == "auto"), info


def _accelerate_folder(tmp_path: Path) -> Path:
    """One real ``save_state`` folder, in this process."""
    accelerate = pytest.importorskip("accelerate")
    torch.manual_seed(0)
    acc = accelerate.Accelerator(cpu=True)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    folder = tmp_path / "run" / "step_7"
    acc.save_state(str(folder))
    return folder


def test_row92_accelerate_folder_mid_save_waits_for_random_states(tmp_path, ckptavg):
    """docs/FAULTS.md row 92: an accelerate folder whose ``random_states_0.pkl`` (written last by ``save_state``) is
    missing or still being written is waiting, by that name (never "trainer_state.json"); once whole it is
    ready and complete."""
    from ckptavg.reading.checkpoint import open_checkpoint
    from ckptavg.reading.ready import check_ready

    folder = _accelerate_folder(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "optimizer.bin", "random_states_0.pkl"]
    whole = (folder / "random_states_0.pkl").read_bytes()
    ready = check_ready(folder, settle=0, clock=lambda: time.time() + 10)
    assert ready.state == "ready" and "accelerate" in ready.reason and ready.checkpoint.step == 7, ready
    assert open_checkpoint(folder).incomplete is None

    (folder / "random_states_0.pkl").write_bytes(whole[: len(whole) // 2])  # mid-write: no zip end record yet
    ready = check_ready(folder, settle=0, clock=lambda: time.time() + 10)
    assert ready.state == "waiting" and "random_states_0.pkl still being written" in ready.reason, ready
    (folder / "random_states_0.pkl").unlink()  # not written yet: the weights and optimizer.bin are there
    ready = check_ready(folder, settle=0, clock=lambda: time.time() + 10)
    assert ready.state == "waiting" and "random_states_0.pkl not written yet" in ready.reason, ready
    assert "trainer_state" not in ready.reason
    assert "random_states_0.pkl not written yet" in open_checkpoint(folder).incomplete
    info = json.loads(ckptavg("inspect", folder, "--json").out)
    assert info["complete"] is False and info["ready"] == "waiting" and "random_states_0.pkl" in info["ready_reason"]
    r = ckptavg("average", folder, "-o", tmp_path / "out")
    assert r.code == 1 and "random_states_0.pkl not written yet" in r.err, r
    (folder / "random_states_0.pkl").write_bytes(whole)
    ready = check_ready(folder, settle=0, clock=lambda: time.time() + 10)
    assert ready.state == "ready" and "random_states_0.pkl" in ready.reason, ready


def test_row93_accelerate_save_numbers_are_never_read_silently_as_steps(tmp_path, ckptavg):
    """docs/FAULTS.md row 93: ``checkpoints/checkpoint_<i>`` of an accelerate folder is a save number; it is used
    as the step with one warning, and ``--steps`` gives real steps; the ``step`` inside random_states_0.pkl
    (accelerate's gradient-accumulation counter) is never used (nor the pickle loaded)."""
    folder = _accelerate_folder(tmp_path)
    auto = tmp_path / "project" / "checkpoints"
    auto.mkdir(parents=True)
    for i in range(3):
        shutil.copytree(folder, auto / f"checkpoint_{i}")
    r = ckptavg("inspect", auto / "checkpoint_2", "--json")
    info = json.loads(r.out)
    assert info["step"] == 2 and "save number" in info["step_source"], info
    assert r.err.count("accelerate names its checkpoints by save number") == 1, r.err
    r = ckptavg("average", auto / "checkpoint_1", auto / "checkpoint_2", "--steps", "300,600", "-o", tmp_path / "o")
    assert r.code == 0, r
    assert manifest(tmp_path / "o")["steps"] == [300, 600] and "save number" not in r.err


# -- Lightning ----------------------------------------------------------------------------------------
LIGHTNING = '''
    import argparse, enum, pathlib, sys, torch
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    root, archive, save_last = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]

    class Mode(enum.Enum):
        FAST = "fast"

    class Tiny(L.LightningModule):
        def __init__(self, data_dir: pathlib.Path, opts: argparse.Namespace, mode: Mode, hidden: int = 16):
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Sequential(torch.nn.Linear(6, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 3))

        def training_step(self, batch, i):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(80, 6, generator=g),
                                                                      torch.randn(80, 3, generator=g)), batch_size=8)
    ckpt = ModelCheckpoint(every_n_train_steps=3, save_top_k=-1, save_last=True if save_last == "copy" else "link")
    trainer = L.Trainer(max_steps=15, accelerator="cpu", default_root_dir=root, callbacks=[ckpt],
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Tiny(pathlib.Path("/data/x"), argparse.Namespace(lr=0.01, name="t"), Mode.FAST), data)
    # the reference: every file it wrote, unpickled here where Mode is defined (weights_only=False)
    ref = {p.name: torch.load(p, weights_only=False)["state_dict"] for p in root.rglob("*.ckpt")}
    torch.save(ref, archive / "ref.pt")
'''


@pytest.mark.slow
@pytest.mark.parametrize("save_last", ["copy", "link"])
def test_lightning_model_checkpoint(tmp_path, ckptavg, save_last):
    """docs/FAULTS.md row 95 with the real Lightning ``Trainer`` and ``ModelCheckpoint(every_n_train_steps=3,
    save_top_k=-1, save_last=True or "link")``, hyper-parameters holding a Path, a Namespace and an enum:
    ``last.ckpt`` (a copy or a link) is an alias, never a checkpoint of its own; the steps come from the names,
    and from ``global_step`` inside where the name has none."""
    pytest.importorskip("lightning")
    root, out, archive = tmp_path / "root", tmp_path / "avg", tmp_path / "archive"
    root.mkdir()
    archive.mkdir()
    daemon = start_daemon(root, out, "--ema", "4", "--lawa", "3")
    try:
        train(tmp_path, LIGHTNING, root, archive, save_last)
        assert wait_for(lambda: status(out).get("last_folded_step") == 15, 60), status(out)
    finally:
        code, err = stop(daemon)
    assert code == 0, err[-3000:]
    ckdir = next(root.rglob("checkpoints"))
    names = sorted(p.name for p in ckdir.iterdir())
    assert names == sorted([f"epoch={(s - 1) // 10}-step={s}.ckpt" for s in (3, 6, 9, 12, 15)] + ["last.ckpt"]), names
    assert (ckdir / "last.ckpt").is_symlink() == (save_last == "link")
    st = status(out)
    assert st["averages"]["ema-4"]["folded"] == 5 and st["skipped"] == [], (st, err[-5000:])
    for s in (3, 6, 9, 12, 15):
        assert err.count(f"folded step {s}:") == 1, (s, err[-3000:])

    r = ckptavg("average", root, "--method", "ema:4", "--method", "lawa:3", "--device", "cpu", "-o", tmp_path / "one")
    assert r.code == 0, r
    assert manifest(tmp_path / "one" / "lawa-3")["steps"] == [3, 6, 9, 12, 15]
    assert_daemon_equals_one_shot(out, tmp_path / "one", ["ema-4", "lawa-3"])
    ref = torch.load(archive / "ref.pt", weights_only=True)
    ordered = [ref[f"epoch={(s - 1) // 10}-step={s}.ckpt"] for s in (3, 6, 9, 12, 15)]
    strip = {k: k.removeprefix("net.") for k in ordered[0]}  # ckptavg drops the LightningModule's one prefix
    ordered = [{strip[k]: v for k, v in s.items()} for s in ordered]
    assert_matches(out / "lawa-3", mean64(ordered[-3:]))
    assert_matches(tmp_path / "one" / "ema-4", _ema64(ordered, [3, 6, 9, 12, 15], 4.0))

    # last.ckpt given on its own: the step from global_step inside (its name has none)
    r = ckptavg("inspect", ckdir / "last.ckpt", "--json")
    assert r.code == 0, r
    info = json.loads(r.out)
    assert info["format"] == "lightning" and info["step"] == 15 and info["step_source"] == "global_step in the .ckpt"
    renamed = tmp_path / "plain"
    renamed.mkdir()
    for s in (9, 12):  # names without a step: the steps come from the files
        (renamed / f"model-{s}x.ckpt").write_bytes((ckdir / f"epoch={(s - 1) // 10}-step={s}.ckpt").read_bytes())
    r = ckptavg("average", renamed / "model-9x.ckpt", renamed / "model-12x.ckpt", "-o", tmp_path / "two")
    assert r.code == 0, r
    assert manifest(tmp_path / "two")["steps"] == [9, 12]
    assert_matches(tmp_path / "two", mean64(ordered[2:4]))


def _ema64(states: list[dict[str, torch.Tensor]], steps: list[int], half_life: float) -> dict[str, torch.Tensor]:
    """EMA over checkpoints by step gap: the newest keeps weight 1 - 0.5 ** (gap / half_life) (see DESIGN.md)."""
    avg = {k: v.double().clone() for k, v in states[0].items()}
    for prev, step, s in zip(steps, steps[1:], states[1:]):
        w = 1 - 0.5 ** ((step - prev) / half_life)
        avg = {k: (1 - w) * avg[k] + w * s[k].double() for k in avg}
    return avg


# -- fairseq ------------------------------------------------------------------------------------------
FAIRSEQ = '''
    # Saves like fairseq 0.12.2 (checkpoint_utils.save_checkpoint + Trainer.state_dict/save_checkpoint), which
    # cannot be installed on Python 3.11 (see the test module's docstring).
    import collections, os, shutil, sys, time, torch
    save_dir, updates_per_epoch, epochs, interval = sys.argv[1], 5, 3, 2
    os.makedirs(save_dir, exist_ok=True)

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = torch.nn.Embedding(20, 8, padding_idx=1)
            self.layers = torch.nn.ModuleList([torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)])

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = torch.nn.Embedding(20, 8, padding_idx=1)
            self.layers = torch.nn.ModuleList([torch.nn.Linear(16, 8)])
            self.output_projection = torch.nn.Linear(8, 20, bias=False)
            self.output_projection.weight = self.embed_tokens.weight  # --share-decoder-input-output-embed

    class Transformer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.decoder = Encoder(), Decoder()

        def forward(self, src, prev):
            enc = self.encoder.embed_tokens(src)
            for layer in self.encoder.layers:
                enc = layer(enc)
            dec = self.decoder.embed_tokens(prev)
            x = self.decoder.layers[0](torch.cat([dec, enc.mean(0, keepdim=True).expand_as(dec)], -1))
            return self.decoder.output_projection(x)

    torch.manual_seed(0)
    model = Transformer()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    cfg = {"_name": None, "common": {"seed": 1, "fp16": False, "log_format": None},
           "checkpoint": {"save_dir": save_dir, "save_interval": 1, "save_interval_updates": interval,
                          "keep_interval_updates": -1, "no_epoch_checkpoints": False, "no_last_checkpoints": False,
                          "best_checkpoint_metric": "loss", "maximize_best_checkpoint_metric": False},
           "optimization": {"max_epoch": epochs, "lr": [0.01], "update_freq": [1]},
           "model": {"_name": "transformer", "encoder_embed_dim": 8, "share_decoder_input_output_embed": True},
           "task": {"_name": "translation", "data": "data-bin"}}
    num_updates, best = 0, None

    def state_dict(extra_state):
        state = {
            "args": None, "cfg": cfg, "model": model.state_dict(), "criterion": None,
            "optimizer_history": [{"criterion_name": "LabelSmoothedCrossEntropyCriterion", "optimizer_name": "FairseqAdam",
                                   "lr_scheduler_state": {"best": best}, "num_updates": num_updates}],
            "task_state": {},
            "extra_state": {"metrics": collections.OrderedDict(train=[(100, "loss", "AverageMeter",
                                                                       {"val": 1.0, "sum": 2.0, "count": 2, "round": 3})]),
                            "previous_training_time": 1.5},
            "last_optimizer_state": optimizer.state_dict(),
        }
        state["extra_state"].update(extra_state)
        return state

    def save_checkpoint(epoch, end_of_epoch, val_loss):
        global best
        if val_loss is not None:
            best = val_loss if best is None else min(best, val_loss)
        conds = collections.OrderedDict()
        conds[f"checkpoint{epoch}.pt"] = end_of_epoch and epoch % cfg["checkpoint"]["save_interval"] == 0
        conds[f"checkpoint_{epoch}_{num_updates}.pt"] = not end_of_epoch and num_updates % interval == 0
        conds["checkpoint_best.pt"] = val_loss is not None and val_loss <= best
        conds["checkpoint_last.pt"] = True
        train_iterator = ({"version": 2, "epoch": epoch + 1, "iterations_in_epoch": 0, "shuffle": True} if end_of_epoch
                          else {"version": 2, "epoch": epoch, "iterations_in_epoch": num_updates % updates_per_epoch,
                                "shuffle": True})
        extra = {"train_iterator": train_iterator, "val_loss": val_loss}
        if best is not None:
            extra["best"] = best
        paths = [os.path.join(save_dir, n) for n, c in conds.items() if c]
        if len(paths) > 1 or not paths[0].endswith("checkpoint_last.pt"):
            with open(paths[0] + ".tmp", "wb") as f:  # torch_persistent_save: atomic
                torch.save(state_dict(extra), f)
            os.rename(paths[0] + ".tmp", paths[0])
            for cp in paths[1:]:
                shutil.copyfile(paths[0], cp)  # PathManager.copy
            time.sleep(0.3)

    for epoch in range(1, epochs + 1):
        for i in range(updates_per_epoch):
            src = torch.randint(2, 20, (6, 4), generator=g)
            tgt = torch.randint(2, 20, (5, 4), generator=g)
            loss = torch.nn.functional.cross_entropy(model(src, tgt).flatten(0, 1), tgt.flatten())
            optimizer.zero_grad(); loss.backward(); optimizer.step()
            num_updates += 1
            end_of_epoch = i == updates_per_epoch - 1
            save_checkpoint(epoch, end_of_epoch, float(loss) if end_of_epoch else None)
'''
FAIRSEQ_STEPS = [2, 4, 5, 6, 8, 10, 12, 14, 15]  # updates: 5 an epoch, saved every 2 mid-epoch and at each epoch's end
FAIRSEQ_NAMES = ["checkpoint_1_2.pt", "checkpoint_1_4.pt", "checkpoint1.pt", "checkpoint_2_6.pt", "checkpoint_2_8.pt",
                 "checkpoint2.pt", "checkpoint_3_12.pt", "checkpoint_3_14.pt", "checkpoint3.pt"]
FAIRSEQ_TIED = {"decoder.output_projection.weight": "decoder.embed_tokens.weight"}


@pytest.mark.slow
def test_fairseq_epoch_and_update_checkpoints(tmp_path, ckptavg):
    """docs/FAULTS.md row 94: fairseq's ``checkpoint<E>.pt`` and ``checkpoint_<E>_<U>.pt`` order on one axis (the
    ``num_updates`` inside); ``checkpoint_last.pt``/``checkpoint_best.pt`` are copies and never counted;
    ``--checkpoint-kind epoch|update`` with ``--last N`` picks as fairseq's ``average_checkpoints.py
    --num-epoch-checkpoints`` / ``--num-update-checkpoints`` do. The writer is emulated (module docstring)."""
    run, out = tmp_path / "checkpoints", tmp_path / "avg"
    run.mkdir()
    daemon = start_daemon(run, out, "--ema", "4", "--lawa", "3")
    try:
        train(tmp_path, FAIRSEQ, run)
        assert wait_for(lambda: status(out).get("last_folded_step") == 15, 60), status(out)
    finally:
        code, err = stop(daemon)
    assert code == 0, err[-3000:]
    assert sorted(p.name for p in run.iterdir()) == sorted(FAIRSEQ_NAMES + ["checkpoint_best.pt", "checkpoint_last.pt"])
    st = status(out)
    assert st["averages"]["ema-4"]["folded"] == 9 and st["skipped"] == [], st
    for s in FAIRSEQ_STEPS:
        assert err.count(f"folded step {s}:") == 1, (s, err[-3000:])
    assert "late checkpoint" not in err, err[-3000:]

    weights = {n: torch.load(run / n, weights_only=False)["model"] for n in FAIRSEQ_NAMES}
    ordered = [weights[n] for n in FAIRSEQ_NAMES]
    r = ckptavg("average", run, "--method", "ema:4", "--method", "lawa:3", "--device", "cpu", "-o", tmp_path / "one")
    assert r.code == 0, r
    assert manifest(tmp_path / "one" / "lawa-3")["steps"] == FAIRSEQ_STEPS
    assert_daemon_equals_one_shot(out, tmp_path / "one", ["ema-4", "lawa-3"])
    assert_matches(out / "lawa-3", mean64(ordered[-3:]), FAIRSEQ_TIED)
    assert_matches(out / "ema-4", _ema64(ordered, FAIRSEQ_STEPS, 4.0), FAIRSEQ_TIED)

    r = ckptavg("average", run, "--last", "2", "--checkpoint-kind", "epoch", "-o", tmp_path / "epochs")
    assert r.code == 0, r
    assert manifest(tmp_path / "epochs")["steps"] == [10, 15]
    assert_matches(tmp_path / "epochs", mean64([weights["checkpoint2.pt"], weights["checkpoint3.pt"]]), FAIRSEQ_TIED)
    r = ckptavg("average", run, "--last", "3", "--checkpoint-kind", "update", "-o", tmp_path / "updates")
    assert r.code == 0, r
    assert manifest(tmp_path / "updates")["steps"] == [8, 12, 14]
    assert_matches(tmp_path / "updates", mean64([weights[n] for n in ("checkpoint_2_8.pt", "checkpoint_3_12.pt",
                                                                      "checkpoint_3_14.pt")]), FAIRSEQ_TIED)
    r = ckptavg("average", run / "checkpoint1.pt", run / "checkpoint_3_14.pt", "--checkpoint-kind", "epoch",
                "-o", tmp_path / "bad")
    assert r.code == 2 and "--checkpoint-kind takes a single run folder" in r.err, r

    r = ckptavg("inspect", run, "--json", "--settle", "0.1")
    rows = json.loads(r.out)["checkpoints"]
    assert [Path(x["path"]).name for x in rows] == FAIRSEQ_NAMES
    assert [x["step"] for x in rows] == FAIRSEQ_STEPS
    assert all(x["format"] == "fairseq" and x["step_source"] == "num_updates in fairseq's optimizer_history"
               for x in rows), rows
    assert all(x["ready"] == "ready" for x in rows), rows


def test_row94_fairseq_names_order_without_opening_the_files(tmp_path):
    """docs/FAULTS.md row 94: discovery orders fairseq names on (epoch, updates): an epoch checkpoint after the
    update checkpoints of its epoch, before the next epoch's; the aliases (``checkpoint_last.pt``,
    ``checkpoint_best.pt``, ``checkpoint.best_loss_2.31.pt``) and a staging ``.tmp`` are not candidates."""
    from ckptavg.reading.discover import find_candidates
    from ckptavg.reading.steps import checkpoint_kind, epoch_from_name, step_from_name

    run = tmp_path / "checkpoints"
    run.mkdir()
    names = ["checkpoint_2_9.pt", "checkpoint10.pt", "checkpoint1.pt", "checkpoint_1_4.pt", "checkpoint2.pt",
             "checkpoint_10_100.pt", "checkpoint_last.pt", "checkpoint_best.pt", "checkpoint.best_loss_2.31.pt",
             "checkpoint3.pt.tmp"]
    for n in names:
        (run / n).write_bytes(b"PK")
    assert [p.name for p in find_candidates(run)] == ["checkpoint_1_4.pt", "checkpoint1.pt", "checkpoint_2_9.pt",
                                                      "checkpoint2.pt", "checkpoint_10_100.pt", "checkpoint10.pt"]
    assert step_from_name("checkpoint_2_9.pt") == 9 and step_from_name("checkpoint2.pt") is None
    assert epoch_from_name("checkpoint2.pt") == 2 and epoch_from_name("checkpoint_last.pt") is None
    assert [checkpoint_kind(n) for n in ("checkpoint2.pt", "checkpoint_2_9.pt", "checkpoint-9", "checkpoint_9")] == [
        "epoch", "update", None, None]


def test_row96_inspect_reports_each_writers_rule(tmp_path, ckptavg):
    """docs/FAULTS.md row 96: ``ckptavg inspect`` on a run folder says, per checkpoint, the format, the step and
    where it came from, and the readiness verdict with the writer's rule: here an HF Trainer folder waiting for
    trainer_state.json, a finished accelerate folder, a pickle still being written, a fairseq file."""
    from conftest import tiny_state, write_checkpoint

    run = tmp_path / "run"
    hf = write_checkpoint(run / "checkpoint-100", tiny_state(0), step=100)
    (hf / "trainer_state.json").unlink()
    torch.save({}, hf / "optimizer.pt")
    folder = _accelerate_folder(tmp_path)
    os.rename(folder, run / "step_200")
    torch.save({"model": dict(tiny_state(2)), "optimizer_history": [{"num_updates": 300}], "extra_state": {}},
               run / "checkpoint_1_300.pt")
    whole = (run / "checkpoint_1_300.pt").read_bytes()
    (run / "step_400.pt").write_bytes(whole[:-30])  # no zip end record yet
    past = time.time() - 60
    for p in run.rglob("*"):
        os.utime(p, (past, past))
    r = ckptavg("inspect", run, "--json", "--settle", "1")
    rows = {Path(x["path"]).name: x for x in json.loads(r.out)["checkpoints"]}
    assert sorted(rows) == ["checkpoint-100", "checkpoint_1_300.pt", "step_200", "step_400.pt"]
    assert rows["checkpoint-100"]["ready"] == "waiting" and "trainer_state.json" in rows["checkpoint-100"]["ready_reason"]
    assert rows["step_200"]["ready"] == "ready" and "accelerate" in rows["step_200"]["ready_reason"]
    assert rows["step_200"]["step"] == 200 and rows["step_200"]["step_source"] == "name"
    assert rows["checkpoint_1_300.pt"]["format"] == "fairseq" and rows["checkpoint_1_300.pt"]["ready"] == "ready"
    assert rows["step_400.pt"]["ready"] == "waiting" and "zip end record" in rows["step_400.pt"]["ready_reason"]
    r = ckptavg("inspect", run / "step_200", "--settle", "1")
    assert r.code == 0 and "ready:       ready: accelerate save_state" in r.out, r
