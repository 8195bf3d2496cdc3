"""``ckptavg soup``: greedy model soups (Wortsman et al. 2022) of real fine-tunes, evaluated by a real evaluator.

The zoo: a 2-layer, 32-wide GPT-2 built from a config (nothing downloaded) is pre-trained for a few steps on
unstructured text, then fine-tuned on CPU, from that one base, on structured "target" text: four good fine-tunes
(different seeds and learning rates) and one deliberately bad one (a learning rate a thousand times too high).
Each is written by ``save_pretrained`` (safetensors, config, tokenizer) as ``ft-<i>/checkpoint-24`` — all at the
same step, as separate fine-tunes are. The soup is scored by the real ``hf-perplexity`` evaluator on held-out
target text; the expected metrics, the greedy decisions and the weights are recomputed here independently
(transformers' own ``labels=`` loss, float64 means of the safetensors files).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import torch
from conftest import write_sharded_safetensors
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matrices, one CPU thread

STEP = 40
ADJ = ["big", "small", "red", "blue", "old"]
NOUN = ["cat", "dog", "mat", "rug", "hat"]
VERB = ["sat", "ran", "slept", "hid"]
PREP = ["on", "under", "near"]
NOISE = ["why", "how", "when", "who", "it", "is", "was", "very", "quite", "one", "two", "and", "then", ",", "!"]
VOCAB = ["the", "a", ".", *ADJ, *NOUN, *VERB, *PREP, *NOISE]


def general_text(n_words: int, seed: int) -> str:
    """Unstructured text: every word of the vocabulary, uniformly (what the base model is pre-trained on)."""
    rng = random.Random(seed)
    words = [rng.choice(VOCAB) for _ in range(n_words)]
    return "\n".join(" ".join(words[i:i + 12]) for i in range(0, n_words, 12)) + "\n"


def target_text(n_sentences: int, seed: int) -> str:
    """Structured text: 'the big cat sat on a red mat .' — the fine-tuning task, and its held-out split."""
    rng = random.Random(seed)
    return "\n".join(f"{rng.choice(['the', 'a'])} {rng.choice(ADJ)} {rng.choice(NOUN)} {rng.choice(VERB)} "
                     f"{rng.choice(PREP)} {rng.choice(['the', 'a'])} {rng.choice(ADJ)} {rng.choice(NOUN)} ."
                     for _ in range(n_sentences)) + "\n"


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(VOCAB)], trainers.WordLevelTrainer(special_tokens=["[UNK]", "[EOS]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")


def gpt2(vocab: int, *, width: int = 32) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=width, n_head=2, vocab_size=vocab, n_positions=256,
                                      bos_token_id=1, eos_token_id=1, tie_word_embeddings=True))


def blocks(tokenizer: PreTrainedTokenizerFast, text: str, seq_len: int = 32) -> torch.Tensor:
    ids = tokenizer(text)["input_ids"]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def train(model: torch.nn.Module, data: torch.Tensor, *, steps: int, lr: float, seed: int,
          optimizer: str = "adamw") -> torch.nn.Module:
    """``steps`` of AdamW, or SGD with momentum 0.9, on random batches of 8 blocks; transformers' own causal-LM loss."""
    g = torch.Generator().manual_seed(seed)
    opt = (torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9) if optimizer == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0))
    model.train()
    for _ in range(steps):
        batch = data[torch.randint(0, data.shape[0], (8,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def held_out_loss(model_dir: Path, tokenizer: PreTrainedTokenizerFast, text: str, seq_len: int = 256) -> float:
    """The reference: token-weighted mean of transformers' own per-block loss over the held-out blocks."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    data = blocks(tokenizer, text, seq_len)
    with torch.no_grad():
        return sum(model(input_ids=b[None], labels=b[None]).loss.item() for b in data) / data.shape[0]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def assert_mean_of(folder: Path, members: list[Path]) -> None:
    """The folder's tensors are the float64 mean of exactly ``members``' tensors, to fp32 rounding: an fp32 sum of n
    values is off by at most n ulps of the sum of their magnitudes, plus the rounding of the quotient."""
    states = [weights(Path(m)) for m in members]
    got = weights(folder)
    assert sorted(got) == sorted(states[0])
    n, eps = len(states), 2.0**-23
    for k, t in got.items():
        assert t.dtype == torch.float32
        ref = sum(s[k].double() for s in states) / n
        bound = n * eps * sum(s[k].double().abs() for s in states) / n + eps * ref.abs()
        err = (t.double() - ref).abs()
        assert bool((err <= bound).all()), f"tensor {k}: off by {float((err - bound).max()):.3g} beyond fp32 rounding"


FINE_TUNES = [  # (seed, optimizer, learning rate): four good fine-tunes, SGD at a high learning rate (the iterates
    # bounce around the minimum: averaging them helps), and a deliberately bad one: AdamW at 3.0, 1000x a usual rate
    (1, "sgd", 0.3), (2, "sgd", 0.3), (4, "sgd", 0.3), (6, "sgd", 0.2), (5, "adamw", 3.0),
]
BAD = 4  # the index of the bad fine-tune


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict:
    """Base model pre-trained a few steps; five fine-tunes of it saved as real HF checkpoint folders."""
    root = tmp_path_factory.mktemp("zoo")
    tokenizer = build_tokenizer()
    pretraining = general_text(4000, 0) + target_text(300, 7)
    base = train(gpt2(len(tokenizer)), blocks(tokenizer, pretraining), steps=150, lr=3e-3, seed=0)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    task = blocks(tokenizer, target_text(600, 1))
    folders = []
    for i, (seed, optimizer, lr) in enumerate(FINE_TUNES):
        model = gpt2(len(tokenizer))
        model.load_state_dict(base_state)
        train(model, task, steps=STEP, lr=lr, seed=seed, optimizer=optimizer)
        folder = root / f"ft-{i}" / f"checkpoint-{STEP}"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders.append(folder)
    valid = root / "valid.txt"
    valid.write_text(target_text(400, 99))  # 14 blocks of 256 tokens (hf-perplexity's default seq_len)
    return {"root": root, "tokenizer": tokenizer, "folders": folders, "valid": valid}


def soup_record(out: Path) -> dict:
    return json.loads((out / "soup.json").read_text())


def test_greedy_soup_of_real_fine_tunes(zoo, tmp_path, ckptavg):
    """docs/FAULTS.md row 106: members ranked by held-out loss, each added only if the soup improves; the bad
    fine-tune (huge LR) is ranked last and not added. The greedy soup's weights are the float64 mean of exactly the
    added members, the uniform soup's the mean of all five; every metric matches transformers' own loss."""
    folders, tok = zoo["folders"], zoo["tokenizer"]
    out, uni = tmp_path / "soup", tmp_path / "uniform"
    r = ckptavg("soup", *folders, "--eval-hf-perplexity", zoo["valid"], "--metric", "val_loss",
                "--keep-uniform", uni, "-o", out)
    assert r.code == 0, r.err
    print(r.out)
    rec = soup_record(out)
    assert rec["metric"] == "val_loss" and rec["mode"] == "min" and rec["better"] == "lower"
    members = rec["members"]
    own = {m["path"]: m["metrics"]["val_loss"] for m in members}
    # every member's metric is transformers' own held-out loss of that folder
    for f in folders:
        assert own[str(f)] == pytest.approx(held_out_loss(f, tok, zoo["valid"].read_text()), rel=1e-5)
    # sorted best first; the bad fine-tune is the worst member and is not added
    values = [m["metrics"]["val_loss"] for m in members]
    assert values == sorted(values)
    assert members[-1]["path"] == str(folders[BAD]) and not members[-1]["added"]
    print("members:", [(Path(m["path"]).parent.name, round(m["metrics"]["val_loss"], 4),
                        m["soup_metrics_when_tried"] and round(m["soup_metrics_when_tried"]["val_loss"], 4),
                        m["added"]) for m in members])
    # the greedy rule, replayed from the record: added exactly when the soup with it is strictly better
    current, added = values[0], [members[0]["path"]]
    assert members[0]["added"] and members[0]["soup_metrics_when_tried"] is None
    for m in members[1:]:
        tried = m["soup_metrics_when_tried"]["val_loss"]
        assert m["added"] == (tried < current)
        if m["added"]:
            current = tried
            added.append(m["path"])
    assert rec["greedy"]["members"] == added and rec["greedy"]["metrics"]["val_loss"] == current
    assert len(added) >= 2, "no fine-tune improved the soup: the zoo does not exercise the greedy step"
    assert members[-1]["soup_metrics_when_tried"]["val_loss"] > current  # the bad one really hurts
    # the weights: the float64 mean of exactly the added members, not of all
    assert_mean_of(out, added)
    assert_mean_of(uni, folders)
    with pytest.raises(AssertionError, match="beyond fp32 rounding"):
        assert_mean_of(out, [*added, folders[BAD]])
    # the soups' metrics are the loss of what was written
    assert current == pytest.approx(held_out_loss(out, tok, zoo["valid"].read_text()), rel=1e-5)
    uniform = rec["uniform"]["metrics"]["val_loss"]
    assert uniform == pytest.approx(held_out_loss(uni, tok, zoo["valid"].read_text()), rel=1e-5)
    # the table, and the plain sentence comparing the three
    lines = r.out.splitlines()
    assert lines[0].split()[:4] == ["#", "member", "val_loss", "soup"]
    assert str(folders[BAD]) in lines[1 + len(members)] and lines[1 + len(members)].rstrip().endswith("no")
    sentence = lines[-1]
    assert sentence.startswith(f"The greedy soup of {len(added)} of 5 members has val_loss {current:.6g} (lower is "
                               f"better), better than the best single model, {added[0]}")
    assert f"uniform soup of all 5 scores {'better still' if uniform < current else 'worse'} (val_loss {uniform:.6g})" \
        in sentence
    # `ckptavg report` on the soup's output shows the same table and sentence, from soup.json
    rep = ckptavg("report", out)
    assert rep.code == 0, rep.err
    assert rep.out.strip() == r.out.strip()
    # provenance: the soup's record in ckptavg.json, its inputs the added members; the model loads
    prov = json.loads((out / "ckptavg.json").read_text())
    assert [i["path"] for i in prov["inputs"]] == added and prov["soup"]["this"] == "greedy"
    assert "Greedy soup" in (out / "README.md").read_text()
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["soup", "uniform"]  # no work folder left behind
    for f in folders:  # the members are untouched
        assert sorted(p.name for p in f.iterdir()) == sorted(p.name for p in folders[0].iterdir())


def test_a_soup_that_does_not_beat_the_best_single_model_says_so(zoo, tmp_path, ckptavg):
    """docs/FAULTS.md row 107: a tie is not added (an identical copy of the best member: the soup with it is the same
    model, the same loss), nor is a member that hurts; the sentence says plainly that the soup did not beat the best
    single model, and the output holds that model's weights."""
    folders = zoo["folders"]
    best, bad = folders[0], folders[BAD]
    twin = tmp_path / "twin" / f"checkpoint-{STEP}"
    shutil.copytree(best, twin)
    out = tmp_path / "soup"
    r = ckptavg("soup", bad, best, twin, "--eval-hf-perplexity", zoo["valid"], "-o", out)
    assert r.code == 0, r.err
    rec = soup_record(out)
    assert [m["path"] for m in rec["members"]] == [str(best), str(twin), str(bad)]  # a tie keeps the order given
    assert [m["added"] for m in rec["members"]] == [True, False, False]
    tied = rec["members"][1]
    assert tied["soup_metrics_when_tried"]["val_loss"] == tied["metrics"]["val_loss"] == \
        rec["members"][0]["metrics"]["val_loss"]
    assert rec["uniform"]["metrics"]["val_loss"] > rec["greedy"]["metrics"]["val_loss"]
    assert r.out.splitlines()[-1].startswith(
        f"The greedy soup did not beat the best single model: no other member improved val_loss (lower is better) "
        f"when added, so the greedy soup is {best} alone")
    assert weights(out).keys() == weights(best).keys()
    assert all(torch.equal(weights(out)[k], v) for k, v in weights(best).items())


def test_mixed_architectures_are_refused_before_any_evaluation(zoo, tmp_path, ckptavg):
    """docs/FAULTS.md row 105: a member of another architecture (a Llama beside GPT-2s; a GPT-2 of another width) is
    refused with the mixed-models error naming both, before the evaluator runs once; nothing is written."""
    folders, tok = zoo["folders"], zoo["tokenizer"]
    llama = tmp_path / "llama"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256)
                     ).save_pretrained(llama)
    wide = tmp_path / "wide"
    gpt2(len(tok), width=64).save_pretrained(wide)
    marker = tmp_path / "evaluated"
    cmd = f"touch {marker}; echo '{{\"val_loss\": 1.0}}'"
    for other, words in ((llama, "config.json says llama (LlamaForCausalLM) here and gpt2 (GPT2LMHeadModel) there"),
                         (wide, "tensor 'transformer.h.0.attn.c_attn.bias' has shape (192,) here and (96,) there")):
        out = tmp_path / "soup"
        r = ckptavg("soup", folders[0], folders[1], other, "--eval", cmd, "-o", out)
        assert r.code == 1, r.err
        line = r.err.strip().splitlines()[-1]
        assert line.startswith(f"ckptavg: error: {other}: is not the same model as {folders[0]}: "), line
        assert words in line, line
        assert not marker.exists() and not out.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["llama", "wide"])


def test_usage_errors(zoo, tmp_path, ckptavg):
    folders = zoo["folders"]
    out = tmp_path / "soup"
    r = ckptavg("soup", folders[0], folders[1], "-o", out)
    assert r.code == 2 and "give one evaluator" in r.err
    r = ckptavg("soup", folders[0], "--eval", "echo '{\"a\": 1}'", "-o", out)
    assert r.code == 2 and "at least two models" in r.err
    r = ckptavg("soup", folders[0], folders[0], "--eval", "echo '{\"a\": 1}'", "-o", out)
    assert r.code == 2 and "are the same checkpoint" in r.err
    r = ckptavg("soup", folders[0], folders[1], "--eval", "echo '{\"a\": 1}'", "--metric", "acc", "-o", out)
    assert r.code == 2 and "returned no 'acc'" in r.err
    r = ckptavg("soup", folders[0], folders[1], "--eval", "echo '{\"a\": 1}'", "-o", folders[0] / "soup")
    assert r.code == 2 and "never writes into a trainer's checkpoint folder" in r.err
    assert not out.exists() and not (folders[0] / "soup").exists()


STREAM_EVAL = textwrap.dedent('''
    """A held-out 'loss' that streams: the mean squared distance of the fp32 weights to 0, 4 MiB read at a time
    (plain reads: a memory map would count the whole file in the evaluator's resident set)."""
    import json
    import struct
    from pathlib import Path

    import torch


    def evaluate(model_dir):
        total, count = 0.0, 0
        for f in sorted(Path(model_dir).glob("*.safetensors")):
            with open(f, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                header = json.loads(fh.read(n))
                for name, info in header.items():
                    if name == "__metadata__":
                        continue
                    lo, hi = info["data_offsets"]
                    fh.seek(8 + n + lo)
                    left = hi - lo
                    while left:
                        buf = fh.read(min(left, 4 << 20))
                        left -= len(buf)
                        t = torch.frombuffer(bytearray(buf), dtype=torch.float32).double()
                        total += float((t * t).sum())
                        count += t.numel()
        return {"distance": total / count}
''')

MEASURE = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
           "sys.stdout.write(r.stdout); sys.stderr.write(r.stderr); "
           "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")


def peak_kb(*args: object, cwd: Path) -> tuple[int, str]:
    """Run ``ckptavg ARGS`` as its own process; its peak RSS (kB) and stdout."""
    # one malloc arena: what the peak then measures is the tensors held, not how many 64 MiB per-thread arenas
    # glibc happened to open for the reader, writer and evaluation threads (timing-dependent, tens of MiB)
    env = {**os.environ, "MALLOC_ARENA_MAX": "1"}
    p = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, "-m", "ckptavg.cli.main", *map(str, args)],
                       capture_output=True, text=True, timeout=300, cwd=cwd, check=False, env=env)
    assert p.returncode == 0, p.stderr
    out, peak = p.stdout.rsplit("PEAK_KB ", 1)
    return int(peak), out


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB is Linux's")
def test_peak_memory_of_a_soup_of_four_is_the_engines_bound(tmp_path):
    """docs/FAULTS.md row 108: a soup of four 96 MiB models (384 MiB in all) never holds the models in memory: its
    peak RSS stays within that of `ckptavg average` of the same four (the engine's one-shot bound: a piece's
    accumulators, the read-ahead and write windows) plus what the evaluator keeps, far below one model more. The
    three noisy members are added (their mean is nearer 0), the offset one is not. Figures printed, nothing timed."""
    n_tensors, numel = 6, 4 << 20  # 6 x 16 MiB fp32 per model
    members = []
    for i in range(4):
        g = torch.Generator().manual_seed(i)
        offset = 3.0 if i == 3 else 0.0
        state = {f"layers.{j}.weight": torch.randn(numel, generator=g) + offset for j in range(n_tensors)}
        folder = tmp_path / f"ft-{i}"
        folder.mkdir()
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        members.append(folder)
        del state
    (tmp_path / "stream_eval.py").write_text(STREAM_EVAL)
    model_mb = n_tensors * numel * 4 / 2**20
    # each the lower of two runs: how far the reader runs ahead of the arithmetic (up to the read-ahead window)
    # depends on the machine's load, and one busy run moved a peak by 85 MiB
    avg_kb = min(peak_kb("average", *members, "-o", tmp_path / f"avg{i}", cwd=tmp_path)[0] for i in range(2))
    soups = [peak_kb("soup", *members, "--eval-python", "stream_eval.py:evaluate", "--json", "-o",
                     tmp_path / f"soup{i}", cwd=tmp_path) for i in range(2)]
    soup_kb, out = min(soups, key=lambda r: r[0])
    rec = json.loads(out)
    print(f"peak RSS: soup of 4 x {model_mb:.0f} MiB: {soup_kb / 1024:.0f} MiB; `ckptavg average` of the same: "
          f"{avg_kb / 1024:.0f} MiB")
    assert Path(rec["members"][-1]["path"]).name == "ft-3"
    assert [m["added"] for m in rec["members"]] == [True, True, True, False]
    assert rec["uniform"]["metrics"]["distance"] > rec["greedy"]["metrics"]["distance"]
    # the engine's bound, plus what the evaluator keeps and run-to-run noise (measured: 8-36 MiB over it); one
    # model more (96 MiB) would not fit
    assert soup_kb <= avg_kb + 64 * 1024, (soup_kb, avg_kb)


DIST_CMD = textwrap.dedent('''
    """Command evaluator: the mean squared weight (lower is better) and its negation (higher is better); it fails
    on the candidate named in $FAIL_ON. Standard library only (fp32 safetensors), so it starts fast."""
    import array
    import json
    import os
    import struct
    import sys
    from pathlib import Path

    folder, name = Path(sys.argv[1]), sys.argv[2]
    if name == os.environ.get("FAIL_ON"):
        sys.exit(3)
    total, count = 0.0, 0
    for f in sorted(folder.glob("*.safetensors")):
        data = f.read_bytes()
        n = struct.unpack("<Q", data[:8])[0]
        for key, info in json.loads(data[8:8 + n]).items():
            if key != "__metadata__":
                lo, hi = info["data_offsets"]
                values = array.array("f", data[8 + n + lo:8 + n + hi])
                total += sum(v * v for v in values)
                count += len(values)
    print(json.dumps({"distance": total / count, "closeness": -total / count}))
''')


@pytest.mark.parametrize("metric,mode", [("distance", "min"), ("closeness", "max")])
def test_a_member_whose_evaluation_fails_is_left_out_and_max_mode_ranks_higher_first(tmp_path, ckptavg, monkeypatch,
                                                                                    metric, mode):
    """docs/FAULTS.md row 106: a member whose evaluation fails (the command exits 3) is left out with a warning naming
    it and shown as failed; the soup goes on with the others. A pickle member is evaluated from its one-model mean.
    --mode max ranks higher first and makes the same decisions as min on the negated metric."""
    def state(seed: int, offset: float = 0.0) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {"a.weight": torch.randn(64, 32, generator=g) + offset, "b.bias": torch.randn(32, generator=g) + offset}

    a, b, c = tmp_path / "a", tmp_path / "b.pt", tmp_path / "c"
    c.mkdir()
    write_sharded_safetensors(a, state(0), shard_bytes=4096)  # two shards and model.safetensors.index.json
    torch.save(state(1), b)
    save_file(state(2, offset=2.0), str(c / "model.safetensors"))
    (tmp_path / "dist.py").write_text(DIST_CMD)
    monkeypatch.setenv("FAIL_ON", "member-3")
    out = tmp_path / "soup"
    r = ckptavg("soup", a, b, c, "--eval", f"{sys.executable} {tmp_path / 'dist.py'} {{model_dir}} {{name}}",
                "--metric", metric, "--mode", mode, "-o", out)
    assert r.code == 0, r.err
    assert f"{c}: evaluation failed, left out of the soup: eval command exited with status 3 on member-3" in r.err
    rec = soup_record(out)
    assert [m["path"] for m in rec["members"]][-1] == str(c)
    assert rec["members"][-1]["metrics"] is None and "status 3" in rec["members"][-1]["error"]
    own = {m["path"]: m["metrics"] for m in rec["members"][:2]}
    for member, st in ((a, state(0)), (b, state(1))):  # the sharded folder (linked), the pickle (its one-model mean)
        expected = sum(float((t.double() ** 2).sum()) for t in st.values()) / sum(t.numel() for t in st.values())
        assert own[str(member)]["distance"] == pytest.approx(expected, rel=1e-6)
    first = min(own, key=lambda p: own[p]["distance"])
    assert rec["members"][0]["path"] == first and rec["better"] == ("lower" if mode == "min" else "higher")
    assert [m["added"] for m in rec["members"]] == [True, True, False]  # the mean of two noises is nearer 0
    assert r.out.splitlines()[4].split()[1:] == [str(c), "failed", "-", "no"]
    b_state = torch.load(b, weights_only=True)
    states = [state(0), b_state]
    got = weights(out)
    for k in got:
        ref = (states[0][k].double() + states[1][k].double()) / 2
        torch.testing.assert_close(got[k].double(), ref, rtol=0, atol=1e-6)
    assert rec["uniform"]["metrics"]["distance"] > rec["greedy"]["metrics"]["distance"]  # c's offset, in the uniform


def test_an_existing_output_is_refused_before_any_evaluation(tmp_path, ckptavg):
    a, b = tmp_path / "a", tmp_path / "b"
    for i, f in enumerate((a, b)):
        f.mkdir()
        save_file({"w": torch.full((4,), float(i))}, str(f / "model.safetensors"))
    out = tmp_path / "soup"
    out.mkdir()
    marker = tmp_path / "evaluated"
    r = ckptavg("soup", a, b, "--eval", f"touch {marker}; echo '{{\"loss\": 1}}'", "-o", out)
    assert r.code == 1 and f"ckptavg: error: {out}: already exists (pass --force to replace it)" in r.err
    assert not marker.exists()
    r = ckptavg("soup", a, b, "--eval", f"touch {marker}; echo '{{\"loss\": 1}}'", "--force", "-o", out)
    assert r.code == 0, r.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "evaluated", "soup"]
    assert (out / "soup.json").is_file()
