"""End to end: a trainer process (tiny Llama, plain loop, ``save_pretrained`` + tokenizer per checkpoint), the
daemon as a process with the ``hf-perplexity`` evaluator, ``OUT/best`` loaded with ``from_pretrained``, and
``ckptavg report`` whose numbers are those of ``metrics.jsonl``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from test_daemon import start_daemon_from_config, status, wait_for

pytestmark = pytest.mark.slow

TRAINER = textwrap.dedent('''
    """A real (tiny) causal-LM training loop writing Hugging Face checkpoints, as many users' scripts do."""
    import os, random, sys
    from pathlib import Path
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    run, text_file, steps, save_every = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.manual_seed(0)
    torch.set_num_threads(1)
    words = sorted(set(text_file.read_text().split()))
    vocab = {w: i for i, w in enumerate(["[UNK]", "[BOS]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="[BOS]")
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    ids = torch.tensor(tokenizer(text_file.read_text())["input_ids"])
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    rng = random.Random(0)
    for step in range(1, steps + 1):
        starts = [rng.randrange(0, len(ids) - 33) for _ in range(8)]
        batch = torch.stack([ids[s:s + 32] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % save_every == 0:
            tmp = run / f"tmp-checkpoint-{step}"
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            os.rename(tmp, run / f"checkpoint-{step}")
    print("done", flush=True)
''')


def make_text(n_sentences: int, seed: int) -> str:
    """A toy language with structure a tiny model can learn (subject verb object, agreement)."""
    import random

    rng = random.Random(seed)
    subj = {"the cat": "sits", "the dogs": "run", "a bird": "sings", "my friends": "laugh"}
    objs = ["on the mat", "in the park", "all day", "at night", "with joy"]
    return " ".join(f"{s} {v} {rng.choice(objs)} ." for s, v in (rng.choice(list(subj.items()))
                                                                 for _ in range(n_sentences)))


def test_trainer_daemon_hf_perplexity_best_and_report(tmp_path):
    run, out = tmp_path / "run", tmp_path / "avg"
    run.mkdir()
    train_text, val_text = tmp_path / "train.txt", tmp_path / "val.txt"
    train_text.write_text(make_text(3000, 0))
    val_text.write_text(make_text(300, 1))
    (tmp_path / "trainer.py").write_text(TRAINER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    daemon = start_daemon_from_config(run, out, f"""
        [[average]]
        method = "ema"
        half_life = 20
        [[average]]
        method = "lawa"
        window = 3
        [evaluate]
        kind = "hf-perplexity"
        data = "{val_text}"
        seq_len = 32
        batch_size = 8
        max_tokens = 4096
        metric = "val_loss"
        mode = "min"
    """, env=env)
    try:
        trainer = subprocess.run([sys.executable, str(tmp_path / "trainer.py"), str(run), str(train_text), "60", "10"],
                                 capture_output=True, text=True, timeout=300, env=env)
        assert trainer.returncode == 0, trainer.stderr[-2000:]
        assert wait_for(lambda: (status(out).get("evaluation") or {}).get("last_evaluated_step") == 60, 240), \
            status(out)
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, err[-3000:]
    assert "Traceback" not in err

    rows = [json.loads(line) for line in (out / ".ckptavg" / "metrics.jsonl").read_text().splitlines()]
    assert all("metrics" in r for r in rows), [r.get("error") for r in rows if "error" in r]
    rounds: dict[int, set] = {}
    for r in rows:
        rounds.setdefault(r["round"], set()).add(r["candidate"])
        assert r["metrics"]["val_ppl"] == pytest.approx(torch.tensor(r["metrics"]["val_loss"]).exp().item(), rel=1e-6)
    assert rounds and all(c == {"raw", "ema-20", "lawa-3"} for c in rounds.values()), rounds
    assert {r["step"] for r in rows} <= {10, 20, 30, 40, 50, 60} and max(r["step"] for r in rows) == 60
    # training worked: the raw model at the end is much better than at the start
    raw = {r["step"]: r["metrics"]["val_loss"] for r in rows if r["candidate"] == "raw"}
    assert raw[60] < raw[min(raw)]

    # OUT/best loads with from_pretrained and scores what metrics.jsonl says it scored
    from transformers import AutoModelForCausalLM, AutoTokenizer

    best_dir = out / "best"
    sel = json.loads((best_dir / "ckptavg.json").read_text())["selection"]
    assert sel["value"] == min(r["metrics"]["val_loss"] for r in rows)
    model = AutoModelForCausalLM.from_pretrained(best_dir, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(best_dir, local_files_only=True)
    from ckptavg.evaluators import Candidate
    from ckptavg.evaluators.hf_perplexity import HFPerplexity

    again = HFPerplexity(val_text, seq_len=32, batch_size=8, max_tokens=4096).evaluate(
        Candidate(sel["candidate"], sel["step"], best_dir.resolve()))
    assert again["val_loss"] == pytest.approx(sel["value"], rel=1e-5)
    assert model.config.vocab_size == len(tok)
    assert "Best model so far" in (best_dir / "README.md").read_text()

    # the report: its numbers are the file's
    r = subprocess.run([sys.executable, "-m", "ckptavg.cli.main", "report", str(out), "--json"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cands = {c["name"]: c for c in report["candidates"]}
    for name in ("raw", "ema-20", "lawa-3"):
        mine = [x["metrics"]["val_loss"] for x in rows if x["candidate"] == name]
        assert cands[name]["best"]["value"] == min(mine)
