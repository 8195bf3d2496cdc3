"""``ckptavg sweep``: a grid of averages from one read of each checkpoint, evaluated, ranked, the best published.

A real run: the demo's trainer (an MLP trained with SGD on CPU, a safetensors checkpoint every 40 steps),
its evaluator (held-out loss), and the CLI in-process. Every average of the sweep must equal the same
average computed alone by ``ckptavg average``, bit for bit, and each checkpoint byte is read once
(the engine's read accounting, :meth:`Engine.bytes_read`).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckptavg.averaging.engine import Engine
from ckptavg.averaging.methods import METHODS, FoldInfo, Method, Option, Plan, Slot, register, unregister
from ckptavg.demo import DemoConfig, train
from ckptavg.reading.discover import latest_complete
from ckptavg.sweep import LAST, NOT_HELPED, fold_grid, parse_grid

STEPS, EVERY = 480, 40  # 12 checkpoints
GRID = ("ema:40,80,160,320", "lawa:2,3,5,8", "swa:200,320", "uniform:4,8")  # 12 averages
EVAL = ("--eval-python", "ckptavg.demo:evaluate_folder", "--metric", "val_loss")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the demo's trainer process runs (a tiny MLP: more threads only contend)
    try:
        train(root, DemoConfig(steps=STEPS, save_every=EVERY))
    finally:
        torch.set_num_threads(threads)
    return root


def _states(run: Path) -> dict[int, dict[str, torch.Tensor]]:
    return {int(p.name.split("-")[1]): load_file(str(p / "model.safetensors")) for p in run.glob("checkpoint-*")}


def _alone_args(name: str) -> list[str]:
    """The ``ckptavg average`` flags computing one grid point alone."""
    if name.startswith("uniform-last"):
        return ["--last", name.removeprefix("uniform-last")]
    method, value = name.rsplit("-", 1)
    return ["--method", f"{method}:{value}"]


def _reference(states: dict[int, dict[str, torch.Tensor]], name: str) -> dict[str, torch.Tensor]:
    """The average in float64, computed here from the definitions (independent of ckptavg's fold)."""
    steps = sorted(states)
    method, value = name.replace("uniform-last", "uniform-").rsplit("-", 1)
    v = int(value)
    out = {}
    for key in states[steps[0]]:
        xs = [states[s][key].double() for s in steps]
        if method == "ema":
            acc = xs[0]
            for prev, s, x in zip(steps, steps[1:], xs[1:]):
                beta = 0.5 ** ((s - prev) / v)
                acc = beta * acc + (1 - beta) * x
        elif method == "lawa":
            acc = torch.stack(xs[-v:]).mean(0)
        elif method == "swa":
            acc = torch.stack([x for s, x in zip(steps, xs) if s >= v]).mean(0)
        else:  # uniform-last
            acc = torch.stack(xs[-v:]).mean(0)
        out[key] = acc
    return out


def distance_to_final(model_dir: Path) -> dict[str, float]:
    """A metric the newest raw checkpoint wins outright (0): the distance to the run's final weights."""
    model_dir = Path(model_dir)
    state = load_file(str(next(model_dir.glob("*.safetensors"))))
    final = load_file(os.environ["SWEEP_FINAL"])
    return {"dist": float(sum(((state[k].double() - final[k].double()) ** 2).sum() for k in final) ** 0.5)}


def weight_norm(model_dir: Path) -> dict[str, float]:
    """A metric that needs no config.json (the pickles' export has none)."""
    state = load_file(str(next(Path(model_dir).glob("*.safetensors"))))
    return {"norm": float(sum((v.double() ** 2).sum() for v in state.values()) ** 0.5)}


def fail_on_lawa(model_dir: Path) -> dict[str, float]:
    """The demo's evaluator, failing (as a broken evaluation would) on every LAWA average."""
    from ckptavg.demo import evaluate_folder
    from ckptavg.evaluators import EvaluationError

    if Path(model_dir).name.startswith("lawa"):
        raise EvaluationError("cannot score LAWA here (test)")
    return evaluate_folder(model_dir)


@pytest.mark.slow
def test_sweep_folds_every_average_from_one_read_and_each_equals_the_average_alone(run, tmp_path, ckptavg):
    """Twelve averages in one sweep: each equals `ckptavg average` of that method alone, bit for bit (and its
    float64 definition within fp32 rounding); table, JSON, CSV and plot are written; the best is published."""
    out = tmp_path / "sweep"
    res = ckptavg("sweep", run, *[a for g in GRID for a in ("--grid", g)], *EVAL, "-o", out, "--keep-all")
    assert res.code == 0, res.err
    doc = json.loads((out / "sweep.json").read_text())
    averages = [r for r in doc["rows"] if r["kind"] == "average"]
    raws = [r for r in doc["rows"] if r["kind"] == "raw"]
    assert len(averages) == 12 and len(raws) == 12
    assert doc["read_ratio"] == 1.0  # every checkpoint byte read once, LAWA's leaving members included
    states = _states(run)
    for row in averages:
        name = row["candidate"]
        got = load_file(str(out / "averages" / name / "model.safetensors"))
        alone = tmp_path / "alone" / name
        r = ckptavg("average", run, *_alone_args(name), "-o", alone)
        assert r.code == 0, r.err
        want = load_file(str(alone / "model.safetensors"))
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), (name, k)
        ref = _reference(states, name)
        for k in ref:
            torch.testing.assert_close(got[k].double(), ref[k], rtol=1e-5, atol=1e-6, msg=f"{name} {k}")
    # the ranking: the best average is the lowest val_loss among averages, and it is what OUT/best holds
    best = min(averages, key=lambda r: r["value"])
    assert doc["best_average"]["candidate"] == best["candidate"]
    assert doc["best_raw"]["value"] == min(r["value"] for r in raws)
    link = out / "best"
    assert link.is_symlink() and best["candidate"] in os.readlink(link)
    published = load_file(str(link / "model.safetensors"))
    kept = load_file(str(out / "averages" / best["candidate"] / "model.safetensors"))
    assert all(torch.equal(published[k], kept[k]) for k in kept)
    selection = json.loads((link / "ckptavg.json").read_text())["selection"]
    assert selection["candidate"] == best["candidate"] and selection["value"] == best["value"]
    from ckptavg.demo import evaluate_folder
    assert evaluate_folder(link)["val_loss"] == pytest.approx(best["value"], rel=1e-6)
    # averaging helps on this run (SGD at a high learning rate): the sentence names the winner
    assert doc["helped"] is True and NOT_HELPED not in res.out and f"best average: {best['candidate']}" in res.out
    assert "ema-160" in res.out and "raw, best of 12" in res.out  # the table
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert len(rows) == 24 and {r["candidate"] for r in rows} >= {"ema-40", "lawa-8", "swa-320", "uniform-last4"}
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the daemon's metrics rows: `ckptavg report` reads them
    metrics = [json.loads(line) for line in (out / ".ckptavg" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 24
    rep = ckptavg("report", out, "--json")
    assert rep.code == 0, rep.err
    reported = {c["name"]: c for c in json.loads(rep.out)["candidates"]}
    assert reported.keys() >= {"raw", "ema-40", "lawa-8", "swa-320", "uniform-last4"}
    assert reported[best["candidate"]]["best"]["value"] == pytest.approx(best["value"], rel=1e-9)


@pytest.mark.parametrize("piece_elems", [1 << 20, 1000])
def test_each_checkpoint_byte_is_read_once(run, tmp_path, piece_elems):
    """The engine's read accounting: with LAWA windows 2, 3, 5 (each needing its leaving member) and EMA/SWA/
    newest-N means, every byte of every checkpoint file is read exactly once, whole tensors or in pieces."""
    ckpts = latest_complete(run, 100)
    points = parse_grid(["lawa:2,3,5", "ema:80", "swa:200", "uniform:6"])
    with Engine(device="cpu", piece_elems=piece_elems) as engine:
        fold = fold_grid(ckpts, points, tmp_path / "out", engine=engine)
    assert fold.checkpoint_bytes and set(fold.bytes_read) == set(fold.checkpoint_bytes)
    for path, n in fold.checkpoint_bytes.items():
        assert fold.bytes_read[path] == n, path
    assert fold.read_ratio == 1.0


@pytest.mark.parametrize("piece_elems", [1 << 20, 1000])
def test_fold_workers_split_the_averages_and_change_no_bit(run, tmp_path, piece_elems):
    """The sweep's fold workers: every average of the grid (power-EMA and a weighted mean too) folded by 3
    threads, in pieces and in several chunks per piece, is bit-identical to the one-thread fold; the work is
    really split (each worker thread folded some of it)."""
    import threading

    ckpts = latest_complete(run, 100)
    points = parse_grid(["lawa:2,3,5", "ema:40,160", "swa:200", "uniform:4,8", "power-ema:0.1"])
    outs, seen = {}, set()
    apply = {c: vars(c)["apply"] for cls in METHODS.values() for c in cls.__mro__ if "apply" in vars(c)}

    def spy(orig):
        def wrapped(self, *a, **kw):
            seen.add(threading.current_thread().name)
            return orig(self, *a, **kw)
        return wrapped

    for workers in (1, 3):
        for cls, fn in apply.items():
            cls.apply = spy(fn)
        try:
            with Engine(device="cpu", piece_elems=piece_elems, chunk_elems=300, fold_workers=workers) as engine:
                fold = fold_grid(ckpts, points, tmp_path / f"w{workers}", engine=engine)
        finally:
            for cls, fn in apply.items():
                cls.apply = fn
        outs[workers] = {name: load_file(str(path / "model.safetensors")) for name, path in fold.outputs.items()}
        assert fold.read_ratio == 1.0
    assert any(n.startswith("ckptavg-fold") for n in seen) and len(seen) >= 2, seen
    assert outs[1].keys() == outs[3].keys() and len(outs[1]) == len(points)
    for name, want in outs[1].items():
        for k, v in want.items():
            assert torch.equal(outs[3][name][k], v), (name, k)



def test_the_cli_threads_and_fold_workers_change_no_bit(run, tmp_path, ckptavg):
    """``ckptavg sweep``: every core on the arithmetic (the default), one arithmetic thread, or fold workers
    sharing the averages: the same averages, bit for bit."""
    outs = {}
    for label, flags in {"default": (), "one": ("--threads", "1"), "workers": ("--threads", "1", "--fold-workers", "2")}.items():
        out = tmp_path / label
        res = ckptavg("sweep", run, "--last", "5", "--grid", "lawa:2,3", "--grid", "ema:80", "--grid", "uniform:4",
                      *EVAL, "--no-raw", "--keep-all", *flags, "-o", out)
        assert res.code == 0, res.err
        outs[label] = {d.name: load_file(str(d / "model.safetensors")) for d in (out / "averages").iterdir()}
    assert len(outs["default"]) == 4
    for label in ("one", "workers"):
        assert outs[label].keys() == outs["default"].keys()
        for name, want in outs["default"].items():
            assert all(torch.equal(outs[label][name][k], v) for k, v in want.items()), (label, name)
    res = ckptavg("sweep", run, "--grid", "ema:80", *EVAL, "--fold-workers", "0", "-o", tmp_path / "bad")
    assert res.code == 2 and "--fold-workers" in res.err and "Traceback" not in res.err

def test_averaging_that_does_not_help_is_said_plainly(run, tmp_path, ckptavg, monkeypatch):
    """docs/FAULTS.md row 104: no average beats the best raw checkpoint (a metric the newest checkpoint wins
    outright): one plain sentence, exit 0, the JSON says so, and the best average is still published."""
    monkeypatch.setenv("SWEEP_FINAL", str(run / f"checkpoint-{STEPS}" / "model.safetensors"))
    out = tmp_path / "sweep"
    res = ckptavg("sweep", run, "--last", "6", "--grid", "ema:40,80", "--grid", "lawa:2,3",
                  "--eval-python", "test_sweep:distance_to_final", "-o", out)
    assert res.code == 0, res.err
    doc = json.loads((out / "sweep.json").read_text())
    best = doc["best_average"]["candidate"]
    assert f"{NOT_HELPED}: the best average, {best} (dist = " in res.out and f"step {STEPS} (dist = 0)" in res.out
    assert doc["helped"] is False and doc["best_raw"]["candidate"] == f"raw-{STEPS}" and doc["best_raw"]["value"] == 0
    assert len([r for r in doc["rows"] if r["kind"] == "raw"]) == 6  # --last 6
    assert os.readlink(out / "best").endswith(f"-{best}")
    assert not (out / "averages").exists() and not list((out / ".ckptavg").glob("sweep-*"))  # temporaries removed


def test_a_failed_evaluation_is_recorded_and_the_rest_ranked(run, tmp_path, ckptavg):
    """docs/FAULTS.md row 103: the evaluator fails on some averages: they show as failed (with the error in the
    JSON), the others are ranked and the best of them published; exit 0."""
    out = tmp_path / "sweep"
    res = ckptavg("sweep", run, "--last", "5", "--grid", "lawa:2,3", "--grid", "ema:80",
                  "--eval-python", "test_sweep:fail_on_lawa", "-o", out)
    assert res.code == 0, res.err
    doc = json.loads((out / "sweep.json").read_text())
    failed = {r["candidate"]: r for r in doc["rows"] if r["error"]}
    assert set(failed) == {"lawa-2", "lawa-3"} and "cannot score LAWA" in failed["lawa-2"]["error"]
    assert doc["best_average"]["candidate"] == "ema-80" and "failed" in res.out
    assert "ema-80" in os.readlink(out / "best")


def test_bad_grids_and_outputs_are_refused(run, tmp_path, ckptavg):
    """docs/FAULTS.md rows 101 and 102: a bad grid, a missing evaluator, an output in the run folder, or a folder
    holding something else: exit 2, one line naming the option or folder, nothing written."""
    out = tmp_path / "sweep"
    cases = [
        (["--grid", "nosuch:1,2"], "unknown method 'nosuch'"),
        (["--grid", "ema"], "expected ema:V1,V2"),
        (["--grid", "ema:100,-5"], "half"),
        (["--grid", "lawa:0"], "window"),
        (["--grid", "uniform:two"], "not a positive number of newest checkpoints"),
        (["--grid", "ema:100", "--grid", "ema:100.0"], "names the average ema-100 twice"),
    ]
    for args, text in cases:
        res = ckptavg("sweep", run, *args, *EVAL, "-o", out)
        assert res.code == 2, (args, res)
        assert text in res.err and "Traceback" not in res.err, (args, res.err)
        assert not out.exists()
    res = ckptavg("sweep", run, "--grid", "ema:100", "-o", out)
    assert res.code == 2 and "needs an evaluator" in res.err
    res = ckptavg("sweep", run, "--grid", "ema:100", *EVAL, "-o", run / "sweep")
    assert res.code == 2 and "never writes into a trainer's checkpoint folder" in res.err
    assert not (run / "sweep").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    res = ckptavg("sweep", run, "--grid", "ema:100", *EVAL, "-o", other)
    assert res.code == 2 and "holds no earlier sweep" in res.err and (other / "notes.txt").read_text() == "mine"
    res = ckptavg("sweep", run, "--last", "3", "--grid", "ema:100", *EVAL, "-o", out)
    assert res.code == 0, res.err
    res = ckptavg("sweep", run, "--last", "3", "--grid", "ema:100", *EVAL, "-o", out)
    assert res.code == 2 and "--force" in res.err
    res = ckptavg("sweep", run, "--last", "3", "--grid", "ema:200", *EVAL, "-o", out, "--force")
    assert res.code == 0, res.err
    assert [r["candidate"] for r in json.loads((out / "sweep.json").read_text())["rows"] if r["kind"] == "average"] == ["ema-200"]


class Shrink(Method):
    """The newest checkpoint times ``factor`` (a test-only method: any registered method joins a sweep)."""

    name = "shrink"
    summary = "newest checkpoint, scaled (test only)"
    buffers = ("v",)
    params = (Option("factor", float, "Scale.", metavar="F", low=0, low_open=True, high=1),)
    main_option = "factor"

    factor: float

    def prepare(self, slot: Slot, info: FoldInfo) -> Plan:
        return Plan(first=slot.count == 0, b=self.factor)

    def apply(self, slot: Slot, plan: Plan, x: torch.Tensor, old: torch.Tensor | None, lo: int, hi: int,
              tmp: torch.Tensor) -> None:
        slot.bufs["v"][lo:hi].copy_(torch.mul(x, plan.b, out=tmp))

    def value(self, slot: Slot) -> torch.Tensor:
        return slot.bufs["v"]


def test_a_registered_method_joins_the_sweep(run, tmp_path, ckptavg):
    """The grid is built from the registry: a method registered later is swept with no change to the sweep."""
    register(Shrink)
    try:
        points = parse_grid(["shrink:0.5,0.25", "uniform:3"])
        assert [(p.name, p.option, p.horizon) for p in points] == [
            ("shrink-0.5", "factor", 0.5), ("shrink-0.25", "factor", 0.25), ("uniform-last3", LAST, 3)]
        out = tmp_path / "sweep"
        res = ckptavg("sweep", run, "--last", "4", "--grid", "shrink:0.5,0.9", *EVAL, "-o", out, "--no-raw",
                      "--keep-all")
        assert res.code == 0, res.err
        final = load_file(str(run / f"checkpoint-{STEPS}" / "model.safetensors"))
        got = load_file(str(out / "averages" / "shrink-0.5" / "model.safetensors"))
        assert all(torch.equal(got[k], final[k] * 0.5) for k in final)
        doc = json.loads((out / "sweep.json").read_text())
        assert doc["best_raw"] is None and {r["candidate"] for r in doc["rows"]} == {"shrink-0.5", "shrink-0.9"}
    finally:
        unregister("shrink")
    assert "shrink" not in METHODS


def test_pickles_fold_through_the_disk_store_under_a_memory_budget(run, tmp_path, ckptavg):
    """Pickle inputs fold checkpoint-major into long-lived accumulators; beyond --memory-budget they live in the
    disk store, and every average still equals `ckptavg average` of it alone."""
    pt = tmp_path / "pt"
    pt.mkdir()
    for folder in sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-5:]:
        step = int(folder.name.split("-")[1])
        torch.save(load_file(str(folder / "model.safetensors")), pt / f"step_{step}.pt")
    out = tmp_path / "sweep"
    res = ckptavg("--log-level", "debug", "sweep", pt, "--grid", "ema:80", "--grid", "lawa:2", "--grid", "uniform:3",
                  "--eval-python", "test_sweep:weight_norm", "-o", out, "--keep-all", "--memory-budget", "1KiB")
    assert res.code == 0, res.err
    assert "on disk" in res.err  # the placement line: accumulators beyond the budget in the disk store
    for name, args in (("ema-80", ["--method", "ema:80"]), ("lawa-2", ["--method", "lawa:2"]),
                       ("uniform-last3", ["--last", "3"])):
        alone = tmp_path / "alone" / name
        assert ckptavg("average", pt, *args, "-o", alone).code == 0
        want = load_file(str(alone / "model.safetensors"))
        got = load_file(str(out / "averages" / name / "model.safetensors"))
        assert all(torch.equal(got[k], want[k]) for k in want), name
    shutil.rmtree(out)


@pytest.mark.slow
def test_the_daemon_keeps_a_sweep_current_and_status_names_the_best(run, tmp_path, ckptavg):
    """`[sweep] grid = [...]` in the daemon's config: every grid point is an average kept current as the run
    trains, evaluated each round; `ckptavg status` names the best; each equals the one-shot sweep's, bit for bit."""
    import subprocess
    import sys
    import textwrap
    import time

    out = tmp_path / "avg"
    config = tmp_path / "exp.toml"
    config.write_text(textwrap.dedent(f"""\
        watch = "{run}"
        output = "{out}"
        device = "cpu"
        settle = 0.1
        poll_interval = 0.2
        [sweep]
        grid = ["ema:80,160", "lawa:3,5"]
        [evaluate]
        function = "ckptavg.demo:evaluate_folder"
        metric = "val_loss"
        every = 12
        """))
    proc = subprocess.Popen([sys.executable, "-m", "ckptavg.cli.main", "watch", "--config", str(config)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        st: dict = {}
        while time.monotonic() < deadline:
            try:
                st = json.loads((out / ".ckptavg" / "status.json").read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                st = {}
            if ((st.get("evaluation") or {}).get("best") or {}).get("step") == STEPS:
                break
            time.sleep(0.1)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    best = st["evaluation"]["best"]
    assert best["candidate"] in {"ema-80", "ema-160", "lawa-3", "lawa-5", "raw"}, best
    shown = ckptavg("status", out)
    assert f"best:       {best['candidate']} at step {STEPS}" in shown.out
    assert set(st["averages"]) == {"ema-80", "ema-160", "lawa-3", "lawa-5"}
    sweep = tmp_path / "sweep"
    res = ckptavg("sweep", run, "--grid", "ema:80,160", "--grid", "lawa:3,5", *EVAL, "-o", sweep, "--keep-all",
                  "--no-raw")
    assert res.code == 0, res.err
    for name in ("ema-80", "ema-160", "lawa-3", "lawa-5"):
        a = load_file(str(out / name / "model.safetensors"))
        b = load_file(str(sweep / "averages" / name / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in b), name
    assert "Traceback" not in err


@pytest.mark.slow
def test_a_tiny_causal_lm_trained_on_real_text_is_swept_by_perplexity(tmp_path, ckptavg):
    """A 2-layer GPT-2 made from a config (nothing downloaded), trained a few AdamW steps on real English text
    (this repository's README, a word-level tokenizer trained on it), `save_pretrained` every 10 steps; the sweep
    scores every average and raw checkpoint with the `hf-perplexity` evaluator on held-out text and publishes a
    loadable best model; each average equals `ckptavg average` of it alone, bit for bit."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    cut = int(len(text) * 0.8)
    train_text, held_out = text[:cut], text[cut:]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([train_text], trainers.WordLevelTrainer(vocab_size=2000, special_tokens=["[UNK]", "[EOS]"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")
    (tmp_path / "val.txt").write_text(held_out, encoding="utf-8")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer), n_positions=64,
                                           bos_token_id=1, eos_token_id=1))
        ids = torch.tensor(tokenizer(train_text)["input_ids"])
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(0)
        run = tmp_path / "run"
        for step in range(1, 61):
            starts = torch.randint(0, len(ids) - 65, (8,), generator=g)
            batch = torch.stack([ids[s:s + 64] for s in starts])
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 10 == 0:
                model.save_pretrained(run / f"checkpoint-{step}")
                tokenizer.save_pretrained(run / f"checkpoint-{step}")
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "sweep"
    config = tmp_path / "eval.toml"  # an [evaluate] table, as the daemon's config has it
    config.write_text(f'[evaluate]\nkind = "hf-perplexity"\ndata = "{tmp_path / "val.txt"}"\nseq_len = 64\n'
                      'batch_size = 4\nmetric = "val_loss"\n')
    res = ckptavg("sweep", run, "--grid", "ema:10,20,40", "--grid", "lawa:2,3", "--grid", "uniform:4",
                  "--config", config, "-o", out, "--keep-all")
    assert res.code == 0, res.err
    doc = json.loads((out / "sweep.json").read_text())
    assert len([r for r in doc["rows"] if r["kind"] == "raw"]) == 6 and doc["read_ratio"] == 1.0
    assert all(r["value"] is not None and r["value"] > 0 for r in doc["rows"]), doc["rows"]
    for name, args in (("ema-20", ["--method", "ema:20"]), ("lawa-3", ["--method", "lawa:3"])):
        alone = tmp_path / "alone" / name
        assert ckptavg("average", run, *args, "-o", alone).code == 0
        want = load_file(str(alone / "model.safetensors"))
        got = load_file(str(out / "averages" / name / "model.safetensors"))
        assert all(torch.equal(got[k], want[k]) for k in want), name
    best = AutoModelForCausalLM.from_pretrained(out / "best")  # the published best loads as a causal LM
    assert best.config.n_layer == 2 and doc["best_average"]["candidate"] in os.readlink(out / "best")
