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
