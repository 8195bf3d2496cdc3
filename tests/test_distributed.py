"""The one-shot average across ranks (``torchrun -m ckptavg average``): real torchrun, gloo, CPU.

Each test starts ``python -m torch.distributed.run --standalone --nproc-per-node N`` (what ``torchrun``
runs) over a small run of real safetensors checkpoints and compares every output tensor with the
single-process run of the same command (``torch.equal``: bit-identical)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_model

from ckptavg import distributed
from ckptavg.distributed import Part, assign_parts, launch_from_env, shard_names

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["--method", "ema:150", "--method", "lawa:3", "--method", "swa:200", "--method", "uniform",
           "--method", "power-ema:0.1"]


class Tiny(torch.nn.Module):
    """Uneven tensors of several dtypes; the output head is tied to the embedding (stored once)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(300, 64)  # the largest tensor
        self.block = torch.nn.Linear(64, 64)
        self.norm = torch.nn.LayerNorm(64)
        self.head = torch.nn.Linear(64, 300, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.small = torch.nn.Linear(3, 5)
        self.block.to(torch.bfloat16)
        self.small.to(torch.float16)


def make_run(root: Path, steps=(100, 200, 300, 400, 500)) -> Path:
    run = root / "run"
    for i, step in enumerate(steps):
        torch.manual_seed(i)
        m = Tiny()
        folder = run / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_model(m, str(folder / "model.safetensors"))  # drops the tied head, as save_pretrained does
        (folder / "config.json").write_text(json.dumps({"model_type": "tiny", "tie_word_embeddings": True}))
    return run


def env_plain() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT)  # tests/faultinject.py imports ckptavg from the checkout
    return env


def plain(*args: object, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckptavg", *map(str, args)], env=env or env_plain(),
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def torchrun(n: int, *args: object, script: list[str] | None = None, env: dict | None = None
             ) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node n -m ckptavg ARGS`` (or ``script`` instead of ``-m ckptavg``)."""
    target = script or ["-m", "ckptavg"]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                           *target, *map(str, args)], env=env or env_plain(), capture_output=True, text=True,
                          timeout=180, stdin=subprocess.DEVNULL)


def load_folder(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Every tensor of a model folder, checking that the index (if any) names each tensor's file exactly once."""
    index_file = folder / "model.safetensors.index.json"
    if not index_file.exists():
        return load_file(folder / "model.safetensors"), {}
    index = json.loads(index_file.read_text())
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(set(index["weight_map"].values())):
        part = load_file(folder / file)
        assert not set(part) & set(tensors), f"{file} repeats a tensor"
        tensors.update(part)
    assert set(index["weight_map"]) == set(tensors), "the index does not cover every tensor exactly once"
    assert all(name in load_file(folder / f) for name, f in index["weight_map"].items())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    return tensors, index


def assert_same(a: Path, b: Path) -> None:
    ta, _ = load_folder(a)
    tb, _ = load_folder(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype, name
        assert torch.equal(ta[name], tb[name]), f"{name} differs"
    assert (b / "config.json").read_text() == (a / "config.json").read_text()
    pa, pb = json.loads((a / "ckptavg.json").read_text()), json.loads((b / "ckptavg.json").read_text())
    for key in ("method", "options", "steps", "inputs", "tied_weights", "copied_files"):
        assert pa[key] == pb[key], key
    assert (b / "README.md").exists()


def test_launch_is_read_from_torchrun_environment(monkeypatch):
    assert launch_from_env({}) is None
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    monkeypatch.setattr(distributed, "_parent_is_torchrun", lambda: True)
    got = launch_from_env(env)
    assert (got.rank, got.world_size, got.local_rank, got.local_world_size) == (3, 4, 1, 2)
    monkeypatch.setattr(distributed, "_parent_is_torchrun", lambda: False)  # inherited from a trainer
    assert launch_from_env(env) is None
    assert launch_from_env({**env, "CKPTAVG_TORCHRUN": "1"}).rank == 3


@pytest.mark.slow
def test_a_subprocess_of_a_torchrun_trainer_averages_plainly(tmp_path):
    """``ckptavg average`` started by a torchrun-launched trainer inherits WORLD_SIZE/RANK: it must not
    join the trainer's process group (it would hang) but average on its own, saying why once."""
    run = make_run(tmp_path, steps=(100, 200))
    env = {**env_plain(), "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "1"}
    r = plain("average", run, "--last", "2", "-o", tmp_path / "out", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("was not started by torchrun") == 1
    assert "ranks" not in json.loads((tmp_path / "out" / "ckptavg.json").read_text())


def assign_whole(sizes: list[tuple[str, int]], world: int) -> dict[str, int]:
    """Whole tensors only (none cuttable): each tensor's one rank."""
    parts = assign_parts([(n, b, b, False) for n, b in sizes], world)
    assert all(len(ps) == 1 for ps in parts.values())
    return {n: ps[0].rank for n, ps in parts.items()}


def test_assignment_is_contiguous_and_balanced_by_bytes():
    sizes = [("emb", 1000), *[(f"l{i}", 100) for i in range(20)], ("head", 1000)]
    owner = assign_whole(sizes, 2)
    ranks = [owner[n] for n, _ in sizes]
    assert ranks == sorted(ranks)  # contiguous runs in output order
    loads = [sum(b for n, b in sizes if owner[n] == r) for r in range(2)]
    assert loads == [2000, 2000]
    three = assign_whole(sizes, 3)
    loads = [sum(b for n, b in sizes if three[n] == r) for r in range(3)]
    assert max(loads) <= 4000 / 3 + 1000  # a share plus at most one tensor
    assert shard_names([1, 0, 2]) == [["model-00001-of-00003.safetensors"], [],
                                      ["model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]]
    assert shard_names([1, 0]) == [["model.safetensors"], []]


def test_a_tensor_larger_than_a_share_is_cut_where_the_shares_end():
    """An embedding that is most of the model: whole-tensor assignment would give one rank nearly all of it; cut at
    the shares' boundaries, every rank reads its share to the element. Parts are contiguous and in rank order, a
    tiny leftover stays with its neighbour, and a tensor that cannot be read in parts (another dtype in some
    input, a DCP/DeepSpeed source) stays whole."""
    tensors = [("embed", 8_000_000, 2_000_000, True), ("norm", 4000, 1000, True), ("block", 400_000, 100_000, True),
               ("head", 1_600_000, 400_000, True)]
    total = sum(t[1] for t in tensors)
    for world in (2, 3, 4, 7):
        parts = assign_parts(tensors, world)
        flat = [(name, p) for name, *_ in tensors for p in parts[name]]
        assert [p.rank for _, p in flat] == sorted(p.rank for _, p in flat)  # contiguous runs in output order
        for name, numel in ((t[0], t[2]) for t in tensors):  # each tensor's parts cover it exactly once
            ps = parts[name]
            assert ps[0].lo == 0 and ps[-1].hi == numel and all(a.hi == b.lo for a, b in zip(ps, ps[1:]))
        per = {t[0]: t[1] / t[2] for t in tensors}
        loads = [sum((p.hi - p.lo) * per[n] for n, p in flat if p.rank == r) for r in range(world)]
        assert max(loads) <= total / world + 400_000 + 4, (world, loads)  # a share, give or take the block tensor
    assert [p.rank for p in assign_parts(tensors, 2)["embed"]] == [0, 1]
    before = assign_whole([(t[0], t[1]) for t in tensors], 2)
    assert before["embed"] == 0 and before["head"] == 1  # whole tensors: rank 0 would read 80% of the bytes
    # a tensor that cannot be cut stays whole with the rank holding its middle
    assert assign_parts([("embed", 8_000_000, 2_000_000, False), *tensors[1:]], 2)["embed"] == [Part(0, 0, 2_000_000)]
    # small tensors (under a quarter of a share) are never cut; a sliver (under an eighth of a share) is not a part
    assert all(len(p) == 1 for p in assign_parts([(f"l{i}", 100, 25, True) for i in range(40)], 4).values())
    sliver = assign_parts([("a", 1000, 1000, True), ("b", 60, 60, True)], 2)
    assert sliver["a"] == [Part(0, 0, 530), Part(1, 530, 1000)] and sliver["b"] == [Part(1, 0, 60)]
    assert assign_parts([("w", 0, 0, True)], 2) == {"w": [Part(0, 0, 0)]}


@pytest.mark.slow
def test_two_ranks_are_bit_identical_to_one_process(tmp_path):
    """Every method in one read on 2 ranks (gloo, CPU) against the single-process run; then the same split
    into several shards (--shard-size)."""
    run = make_run(tmp_path)
    ckpts = sorted(run.glob("checkpoint-*"))
    single = plain("average", *ckpts, *METHODS, "-o", tmp_path / "single")
    assert single.returncode == 0, single.stderr
    two = torchrun(2, "average", *ckpts, *METHODS, "-o", tmp_path / "two")
    assert two.returncode == 0, two.stderr
    # the embedding is 90% of the model: it is cut, and each rank reads exactly half of the bytes
    shares = re.findall(r"rank (\d) of 2: \d of 7 tensors and a part of 1 cut across ranks, ([\d.]+ [KM]B) of", two.stderr)
    assert len(shares) == 2 and shares[0][1] == shares[1][1], two.stderr
    names = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir()) and len(names) == 5
    for name in names:
        assert_same(tmp_path / "single" / name, tmp_path / "two" / name)
        _, index = load_folder(tmp_path / "two" / name)
        assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors",
                                                     "model-00002-of-00002.safetensors"}
        assert index["weight_map"]["embed.weight"] == "model-00001-of-00002.safetensors"  # both ranks wrote it
        assert json.loads((tmp_path / "two" / name / "ckptavg.json").read_text())["ranks"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left

    # small shards: several files on a rank, numbered across the ranks; the tensors are the same
    two = torchrun(2, "average", *ckpts, "--method", "ema:150", "--shard-size", "4KB", "-o", tmp_path / "sharded")
    assert two.returncode == 0, two.stderr
    _, index = load_folder(tmp_path / "sharded")
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and files[-1].endswith(f"-of-{len(files):05d}.safetensors")
    assert_same(tmp_path / "single" / "ema-150", tmp_path / "sharded")


@pytest.mark.slow
def test_two_ranks_weighted_mean_is_bit_identical(tmp_path):
    run = make_run(tmp_path)
    ckpts = sorted(run.glob("checkpoint-*"))
    weights = ["--weights", "1,2,3,0.5,4"]
    single = plain("average", *ckpts, *weights, "-o", tmp_path / "w1")
    two = torchrun(2, "average", *ckpts, *weights, "-o", tmp_path / "w2")
    assert single.returncode == 0 and two.returncode == 0, single.stderr + two.stderr
    assert_same(tmp_path / "w1", tmp_path / "w2")
    assert json.loads((tmp_path / "w2" / "ckptavg.json").read_text())["options"]["weighted"] is True


@pytest.mark.slow
def test_world_size_one_under_torchrun_equals_plain(tmp_path):
    run = make_run(tmp_path, steps=(100, 200, 300))
    plain_run = plain("average", run, "--last", "3", "--method", "ema:150", "-o", tmp_path / "plain")
    one = torchrun(1, "average", run, "--last", "3", "--method", "ema:150", "-o", tmp_path / "one")
    assert plain_run.returncode == 0 and one.returncode == 0, plain_run.stderr + one.stderr
    assert_same(tmp_path / "plain", tmp_path / "one")
    # the same file, byte for byte: one rank writes the single-process layout
    assert (tmp_path / "plain" / "model.safetensors").read_bytes() == (tmp_path / "one" / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_row113_a_rank_that_fails_fails_every_rank_and_publishes_nothing(tmp_path):
    """docs/FAULTS.md row 113: rank 1 fails while writing its tensors (fault hook ``rank.write``); rank 0
    finishes its own part. Every rank exits non-zero with one line naming rank 1; no output, no staging."""
    run = make_run(tmp_path, steps=(100, 200, 300))
    env = {**env_plain(), "CKPTAVG_FAULT": "fail-rank=1"}
    r = torchrun(2, "average", run, "--last", "3", "--method", "ema:150", "--method", "uniform", "-o",
                 tmp_path / "out", script=[str(ROOT / "tests" / "faultinject.py")], env=env)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if "ckptavg: error:" in ln]
    assert len(lines) == 2, r.stderr  # one line per rank
    for line in lines:
        assert "rank 1 of 2 failed while averaging its tensors" in line and "nothing was written" in line
        assert "injected I/O error" in line
    # torchrun's own launcher reports the failed ranks (its ChildFailedError summary); no frame of ckptavg's
    assert re.search(r'File "[^"]*ckptavg', r.stderr) is None, r.stderr
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_row114_an_existing_output_on_rank_0_stops_every_rank_before_reading(tmp_path):
    """docs/FAULTS.md row 114: the output exists (no --force): rank 0 refuses it, rank 1 stops too, the
    old folder is untouched; with --force it is replaced atomically."""
    run = make_run(tmp_path, steps=(100, 200))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    r = torchrun(2, "average", run, "--last", "2", "-o", out)
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if "ckptavg: error:" in ln]
    assert len(lines) == 2 and all("rank 0 of 2 failed while creating the output folder" in ln
                                   and "already exists" in ln for ln in lines), r.stderr
    assert (out / "keep.txt").read_text() == "old"
    r = torchrun(2, "average", run, "--last", "2", "-o", out, "--force")
    assert r.returncode == 0, r.stderr
    assert not (out / "keep.txt").exists() and load_folder(out)[0]


@pytest.mark.slow
def test_row115_a_rank_killed_leaves_nothing_published(tmp_path):
    """docs/FAULTS.md row 115: rank 1 killed (exit 137) mid-write: rank 0 stops (its exchange with rank 1
    fails, or torchrun's SIGTERM unwinds it), the command fails, no output folder and no staging folder."""
    run = make_run(tmp_path, steps=(100, 200, 300))
    env = {**env_plain(), "CKPTAVG_FAULT": "kill-rank=1"}
    r = torchrun(2, "average", run, "--last", "3", "-o", tmp_path / "out",
                 script=[str(ROOT / "tests" / "faultinject.py")], env=env)
    assert r.returncode != 0
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # rank 0 removed its staging folder


@pytest.mark.slow
def test_row116_ranks_that_indexed_different_inputs_stop_before_reading(tmp_path):
    """docs/FAULTS.md row 116: rank 1 indexes other inputs than rank 0 (here: its own --last; in life, a run
    folder that gained a checkpoint between the ranks' scans, or nodes that see different files): every
    rank stops before any tensor is read, with one line saying so; nothing is written."""
    run = make_run(tmp_path, steps=(100, 200, 300))
    script = tmp_path / "skewed.py"
    script.write_text(
        "import os, sys\n"
        "from ckptavg.cli.main import main\n"
        "last = '2' if os.environ['RANK'] == '1' else '3'\n"
        f"main(['average', {str(run)!r}, '--last', last, '-o', {str(tmp_path / 'out')!r}])\n")
    r = torchrun(2, script=[str(script)])
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if "ckptavg: error:" in ln]
    assert len(lines) == 2 and all("rank 1 indexed other inputs than rank 0" in ln for ln in lines), r.stderr
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_more_ranks_than_tensors(tmp_path):
    """3 ranks, one tensor: it is cut in three, each rank reads its third and writes it at its place in the one
    file rank 0 laid out; that file is the single-process file byte for byte. Then a tensor of another dtype in
    one input (it cannot be read in parts): ranks 0 and 2 read and write nothing, rank 0 still publishes."""
    from safetensors.torch import save_file

    for i, step in enumerate((10, 20)):
        (tmp_path / "run" / f"checkpoint-{step}").mkdir(parents=True)
        save_file({"w": torch.randn(100, generator=torch.Generator().manual_seed(i))},
                  str(tmp_path / "run" / f"checkpoint-{step}" / "model.safetensors"))
    r = torchrun(3, "average", tmp_path / "run", "--last", "2", "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    for rank in range(3):
        assert f"rank {rank} of 3: 0 of 1 tensors and a part of 1 cut across ranks" in r.stderr, r.stderr
    p = plain("average", tmp_path / "run", "--last", "2", "-o", tmp_path / "plain")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "plain" / "model.safetensors").read_bytes()

    (tmp_path / "run" / "checkpoint-30").mkdir()
    save_file({"w": torch.randn(100, generator=torch.Generator().manual_seed(5)).half()},
              str(tmp_path / "run" / "checkpoint-30" / "model.safetensors"))
    reset = ("--on-shape-change", "reset")
    r = torchrun(3, "average", tmp_path / "run", "--last", "3", *reset, "-o", tmp_path / "out2")
    assert r.returncode == 0, r.stderr
    assert "rank 0 of 3: 0 of 1 tensors," in r.stderr and "rank 1 of 3: 1 of 1 tensors," in r.stderr
    p = plain("average", tmp_path / "run", "--last", "3", *reset, "-o", tmp_path / "plain2")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "out2" / "model.safetensors").read_bytes() == (tmp_path / "plain2" / "model.safetensors").read_bytes()
