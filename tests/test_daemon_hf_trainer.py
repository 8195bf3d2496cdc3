"""A real HF Trainer (tiny GPT-2 from a config, save_total_limit=2) with the daemon beside it as
another process: every checkpoint folded once, LAWA right despite rotation, and each published
average equal to `ckptavg average` over the same checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytestmark = pytest.mark.slow

TRAIN = textwrap.dedent('''
    import shutil, sys, time, torch
    from pathlib import Path
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
    out, archive = sys.argv[1], Path(sys.argv[2])

    class Archive(TrainerCallback):  # a copy of each checkpoint for the test's one-shot comparison
        def on_save(self, args, state, control, **kw):
            src = Path(out) / f"checkpoint-{state.global_step}"
            shutil.copytree(src, archive / src.name)
            time.sleep(0.4)  # the trainer keeps training; rotation deletes old checkpoints meanwhile

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, tie_word_embeddings=True)
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": (ids := torch.randint(0, 64, (16,), generator=g)), "labels": ids} for _ in range(256)]
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=8, max_steps=60, save_steps=5,
                             save_total_limit=2, report_to=[], use_cpu=True, learning_rate=1e-3, seed=0,
                             disable_tqdm=True, logging_steps=1000)
    Trainer(model=GPT2LMHeadModel(cfg), args=args, train_dataset=data, callbacks=[Archive()]).train()
''')


def _status(out):
    try:
        return json.loads((out / ".ckptavg" / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def test_daemon_beside_a_real_trainer(tmp_path, ckptavg):
    run, out, archive = tmp_path / "run", tmp_path / "avg", tmp_path / "archive"
    run.mkdir()
    archive.mkdir()
    daemon = subprocess.Popen(
        [sys.executable, "-m", "ckptavg.cli.main", "watch", str(run), "-o", str(out), "--ema", "10", "--lawa", "3",
         "--swa-start", "30", "--settle", "0.1", "--poll-interval", "0.3", "--device", "cpu"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while _status(out).get("pid") != daemon.pid and time.monotonic() < deadline:
            time.sleep(0.05)
        script = tmp_path / "train.py"
        script.write_text(TRAIN)
        trainer = subprocess.run([sys.executable, str(script), str(run), str(archive)], capture_output=True, text=True,
                                 timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        assert trainer.returncode == 0, trainer.stderr[-3000:]
        deadline = time.monotonic() + 60
        while _status(out).get("last_folded_step") != 60 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, err[-3000:]
    steps = sorted(int(p.name.split("-")[1]) for p in archive.iterdir())
    assert steps == list(range(5, 65, 5))
    assert sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*")) == [55, 60]  # the trainer rotated
    st = _status(out)
    assert st["skipped"] == [] and st["averages"]["ema-10"]["folded"] == 12, st
    for step in steps:  # each folded exactly once
        assert err.count(f"folded step {step}:") == 1, step
    paths = [archive / f"checkpoint-{s}" for s in steps]
    r = ckptavg("average", *paths, "--method", "ema:10", "--method", "lawa:3", "--method", "swa:30", "--device", "cpu",
                "-o", tmp_path / "oneshot")
    assert r.code == 0, r
    for name in ("ema-10", "lawa-3", "swa-30"):
        daemon_out = load_file(str(out / name / "model.safetensors"))
        oneshot = load_file(str(tmp_path / "oneshot" / name / "model.safetensors"))
        assert daemon_out.keys() == oneshot.keys()
        assert all(torch.equal(daemon_out[k], oneshot[k]) for k in daemon_out), name
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "lawa-3")
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


RESUME = textwrap.dedent('''
    import shutil, sys, torch
    from pathlib import Path
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
    out, archive, max_steps, data_seed = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    resume = sys.argv[5] if len(sys.argv) > 5 else None

    class Archive(TrainerCallback):  # a copy of each checkpoint as written, for the test's one-shot comparison
        def on_save(self, args, state, control, **kw):
            src = Path(out) / f"checkpoint-{state.global_step}"
            shutil.rmtree(archive / src.name, ignore_errors=True)
            shutil.copytree(src, archive / src.name)

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, tie_word_embeddings=True)
    g = torch.Generator().manual_seed(data_seed)  # the resumed run sees other data: its steps differ
    data = [{"input_ids": (ids := torch.randint(0, 64, (16,), generator=g)), "labels": ids} for _ in range(256)]
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=8, max_steps=max_steps, save_steps=5,
                             report_to=[], use_cpu=True, learning_rate=1e-3, seed=0, disable_tqdm=True,
                             logging_steps=1000)
    Trainer(model=GPT2LMHeadModel(cfg), args=args, train_dataset=data, callbacks=[Archive()]).train(
        resume_from_checkpoint=resume)
''')


def test_hf_trainer_resuming_from_an_earlier_checkpoint(tmp_path, ckptavg):
    """docs/FAULTS.md row 36 with the real HF Trainer: it trains to step 20 (checkpoints 5..20, folded by the daemon),
    then resumes from checkpoint-10 and trains to 30 on other data, re-writing checkpoint-15 and -20 in place.
    The daemon rolls back to step 10 and follows: its averages equal the one-shot over 5, 10 of the first run and
    15, 20, 25, 30 of the resumed one, bit for bit."""
    run, out, first, second = tmp_path / "run", tmp_path / "avg", tmp_path / "first", tmp_path / "second"
    for d in (run, first, second):
        d.mkdir()
    script = tmp_path / "train.py"
    script.write_text(RESUME)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    daemon = subprocess.Popen(
        [sys.executable, "-m", "ckptavg.cli.main", "watch", str(run), "-o", str(out), "--ema", "10", "--lawa", "3",
         "--swa-start", "10", "--settle", "0.1", "--poll-interval", "0.3", "--device", "cpu"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first_run = subprocess.run([sys.executable, str(script), str(run), str(first), "20", "1"], capture_output=True,
                                   text=True, timeout=600, env=env)
        assert first_run.returncode == 0, first_run.stderr[-3000:]
        deadline = time.monotonic() + 60
        while _status(out).get("last_folded_step") != 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _status(out).get("last_folded_step") == 20, _status(out)
        resumed = subprocess.run([sys.executable, str(script), str(run), str(second), "30", "2",
                                  str(run / "checkpoint-10")], capture_output=True, text=True, timeout=600, env=env)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        deadline = time.monotonic() + 60
        while not (_status(out).get("last_folded_step") == 30 and _status(out)["averages"]["ema-10"]["folded"] == 6) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, err[-3000:]
    st = _status(out)
    assert st["averages"]["ema-10"]["folded"] == 6 and st["skipped"] == [], st
    assert [(r["at"], r["back_to"]) for r in st["rewinds"]] == [(15, 10)], st["rewinds"]
    assert err.count("trainer rewind: step 15") == 1, err[-3000:]
    assert sorted(p.name for p in second.iterdir()) == [f"checkpoint-{s}" for s in (15, 20, 25, 30)]
    followed = [first / "checkpoint-5", first / "checkpoint-10", *(second / f"checkpoint-{s}" for s in (15, 20, 25, 30))]
    old15 = load_file(str(first / "checkpoint-15" / "model.safetensors"))
    new15 = load_file(str(second / "checkpoint-15" / "model.safetensors"))
    assert any(not torch.equal(old15[k], new15[k]) for k in old15)  # the resumed run really went elsewhere
    r = ckptavg("average", *followed, "--method", "ema:10", "--method", "lawa:3", "--method", "swa:10",
                "--device", "cpu", "-o", tmp_path / "oneshot")
    assert r.code == 0, r
    for name in ("ema-10", "lawa-3", "swa-10"):
        daemon_out = load_file(str(out / name / "model.safetensors"))
        oneshot = load_file(str(tmp_path / "oneshot" / name / "model.safetensors"))
        assert daemon_out.keys() == oneshot.keys()
        assert all(torch.equal(daemon_out[k], oneshot[k]) for k in daemon_out), name
