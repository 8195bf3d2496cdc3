"""The output model folder: sharding independent of the input's, dtypes kept, model card and
provenance, atomic replacement, no debris after a failure, refusal to write into the inputs,
and ``ckptavg inspect``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_checkpoint, write_sharded_safetensors
from safetensors import safe_open
from safetensors.torch import load_file

import ckptavg as ckptavg_pkg
from ckptavg import open_checkpoint
from ckptavg.reading.formats.safetensors_writer import ShardWriter
from ckptavg.writing import export

STEPS = [100, 200, 300]


def state_at(i: int) -> dict[str, torch.Tensor]:
    """Mixed dtypes (bf16, fp32, fp16, int64) and sizes; about 14 kB in all."""
    g = torch.Generator().manual_seed(i)
    return {
        "embed.weight": torch.randn(96, 32, generator=g).to(torch.bfloat16),  # 6144 B
        "layers.0.attn.weight": torch.randn(32, 32, generator=g),  # 4096 B
        "layers.0.norm.weight": 1 + 0.1 * torch.randn(32, generator=g),  # 128 B
        "layers.0.mlp.weight": torch.randn(32, 24, generator=g).half(),  # 1536 B
        "layers.0.mlp.bias": torch.randn(24, generator=g).to(torch.bfloat16),  # 48 B
        "layers.1.attn.weight": torch.randn(32, 32, generator=g).to(torch.bfloat16),  # 2048 B
        "position_ids": torch.arange(64, dtype=torch.int64) + i,  # 512 B
        "layers.0.num_batches_tracked": torch.tensor(1000 + i, dtype=torch.int64),  # 8 B
    }


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


TOTAL = sum(nbytes(t) for t in state_at(0).values())


def make_sharded_run(root: Path, steps=STEPS, shard_bytes: int = 3000) -> list[Path]:
    """HF-style sharded checkpoints whose shards split the tensors over several files."""
    paths = []
    for i, step in enumerate(steps):
        folder = root / f"checkpoint-{step}"
        write_sharded_safetensors(folder, state_at(i), shard_bytes)
        (folder / "config.json").write_text(json.dumps({"model_type": "tiny", "step": step}))
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        paths.append(folder)
    return paths


def expected_uniform(n: int) -> dict[str, torch.Tensor]:
    states = [state_at(i) for i in range(n)]
    out = {}
    for k, v in states[-1].items():
        if v.is_floating_point():
            out[k] = (sum(s[k].double() for s in states) / n).to(v.dtype)
        else:
            out[k] = v  # integer buffers: the newest value
    return out


def read_folder(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of an output folder, opened with safetensors' own reader; and name -> file."""
    tensors, where = {}, {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as sf:
            assert sf.metadata() is not None and sf.metadata().get("format") == "pt"
            for k in sf.keys():  # noqa: SIM118 (safe_open is not iterable)
                assert k not in tensors, f"{k} written twice"
                tensors[k] = sf.get_tensor(k)
                where[k] = f.name
    return tensors, where


def assert_matches(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        if v.is_floating_point():
            # float32 accumulation vs the float64 mean: at most one step of the output dtype
            torch.testing.assert_close(got[k].double(), v.double(), rtol=torch.finfo(v.dtype).eps, atol=1e-7, msg=k)
        else:
            assert torch.equal(got[k], v), k


def siblings_debris(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".ckptavg-tmp-" in p.name or ".ckptavg-old-" in p.name]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


# -- sharding -----------------------------------------------------------------------------------

def test_input_shards_split_tensors_over_several_files(tmp_path):
    paths = make_sharded_run(tmp_path / "run")
    ckpt = open_checkpoint(paths[0])
    assert ckpt.format == "safetensors-sharded"
    assert len(ckpt.files) >= 4
    assert len({ref.file for ref in ckpt.tensors.values()}) == len(ckpt.files)


@pytest.mark.parametrize("shard_size,min_files", [("2KB", 5), ("5000", 3), ("7KB", 2)])
def test_small_shard_size_gives_several_shards_and_a_complete_index(tmp_path, ckptavg, shard_size, min_files):
    paths = make_sharded_run(tmp_path / "run")
    out = tmp_path / "out"
    r = ckptavg("average", *paths, "--shard-size", shard_size, "-o", out)
    assert r.code == 0, r
    limit = int(shard_size[:-2]) * 1000 if shard_size.endswith("KB") else int(shard_size)
    files = sorted(out.glob("*.safetensors"))
    n = len(files)
    assert n >= min_files
    assert [f.name for f in files] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    got, where = read_folder(out)
    assert index["weight_map"] == where  # every tensor, in the file that holds it
    assert set(index["weight_map"]) == set(state_at(0))
    assert index["metadata"]["total_size"] == TOTAL == sum(nbytes(t) for t in got.values())
    for f in files:  # no shard over the limit, unless it holds a single bigger tensor
        with safe_open(f, "pt") as sf:
            keys = list(sf.keys())
        data = sum(nbytes(got[k]) for k in keys)
        assert len(keys) == 1 or data <= limit, (f.name, keys, data)
        assert keys, f.name
    assert_matches(got, expected_uniform(3))
    # the output indexes like any sharded checkpoint
    assert open_checkpoint(out).format == "safetensors-sharded"


def test_large_shard_size_gives_one_file_from_sharded_input(tmp_path, ckptavg):
    paths = make_sharded_run(tmp_path / "run")
    out = tmp_path / "out"
    r = ckptavg("average", *paths, "--shard-size", "1GB", "-o", out)
    assert r.code == 0, r
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(out.glob("*.index.json"))
    got = load_file(str(out / "model.safetensors"))
    assert_matches(got, expected_uniform(3))
    # default shard size (5 GB): one file as well
    r = ckptavg("average", *paths, "-o", tmp_path / "default")
    assert r.code == 0, r
    assert [p.name for p in (tmp_path / "default").glob("*.safetensors")] == ["model.safetensors"]
    same, _ = read_folder(tmp_path / "default")
    assert all(torch.equal(same[k], got[k]) for k in got)


def test_single_file_input_sharded_output(tmp_path, ckptavg):
    """Output sharding does not follow the input's: one-file inputs, several output shards."""
    paths = [write_checkpoint(tmp_path / "run" / f"checkpoint-{s}", state_at(i), "safetensors")
             for i, s in enumerate(STEPS)]
    out = tmp_path / "out"
    r = ckptavg("average", *paths, "--shard-size", "3KB", "-o", out)
    assert r.code == 0, r
    got, _ = read_folder(out)
    assert len(list(out.glob("model-*.safetensors"))) >= 3
    assert_matches(got, expected_uniform(3))


def test_dtypes_kept_per_tensor(tmp_path, ckptavg):
    paths = make_sharded_run(tmp_path / "run")
    out = tmp_path / "out"
    assert ckptavg("average", *paths, "--shard-size", "4KB", "-o", out).code == 0
    got, _ = read_folder(out)
    assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in state_at(0).items()}
    assert got["layers.0.num_batches_tracked"].item() == 1002  # newest, not averaged
    assert torch.equal(got["position_ids"], torch.arange(64) + 2)


def test_shard_size_rejects_nonsense(tmp_path, ckptavg):
    paths = make_sharded_run(tmp_path / "run")
    for bad in ("0", "-5MB", "lots", "5XB"):
        r = ckptavg("average", *paths, "--shard-size", bad, "-o", tmp_path / "out")
        assert r.code == 2, (bad, r)
        assert not (tmp_path / "out").exists()


# -- model card and provenance ------------------------------------------------------------------

def test_model_card_and_provenance(tmp_path, ckptavg):
    paths = make_sharded_run(tmp_path / "run")
    out = tmp_path / "out"
    r = ckptavg("average", *paths, "--method", "ema", "--half-life", "250", "--shard-size", "4KB", "-o", out)
    assert r.code == 0, r
    prov = json.loads((out / "ckptavg.json").read_text())
    assert prov["ckptavg_version"] == ckptavg_pkg.__version__
    assert prov["method"] == "ema" and prov["name"] == "ema-250"
    assert prov["options"] == {"half_life": 250.0}
    assert prov["steps"] == STEPS
    assert prov["formats"] == ["safetensors-sharded"]
    assert [i["path"] for i in prov["inputs"]] == [str(p) for p in paths]
    assert [i["step"] for i in prov["inputs"]] == STEPS
    fingerprints = [open_checkpoint(p).fingerprint for p in paths]
    assert [i["fingerprint"] for i in prov["inputs"]] == fingerprints
    assert all(len(fp) == 32 for fp in fingerprints)  # of the headers: equal here, as the shapes are
    assert prov["copied_files"] == ["config.json"]
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "- ema\n" in card.split("---")[1]  # tags in the front matter
    assert "Method: `ema`" in card
    assert "half_life=250.0" in card
    assert "Steps folded: 100, 200, 300" in card
    for p, fp in zip(paths, fingerprints):
        assert f"| `{p}` | `{fp[:16]}` |" in card
    # config.json from the newest input; trainer_state.json not copied
    assert json.loads((out / "config.json").read_text())["step"] == 300
    assert not (out / "trainer_state.json").exists()


def test_model_card_for_lawa_over_a_run_folder(tmp_path, ckptavg):
    paths = make_sharded_run(tmp_path / "run", steps=[100, 200, 300, 400])
    out = tmp_path / "out"
    r = ckptavg("average", tmp_path / "run", "--last", "3", "--method", "lawa", "--window", "2", "-o", out)
    assert r.code == 0, r
    prov = json.loads((out / "ckptavg.json").read_text())
    assert prov["method"] == "lawa" and prov["options"] == {"window": 2}
    assert prov["steps"] == [200, 300, 400]
    assert [i["path"] for i in prov["inputs"]] == [str(p) for p in paths[1:]]
    card = (out / "README.md").read_text()
    assert "Method: `lawa`" in card and "window=2" in card and "Steps folded: 200, 300, 400" in card


# -- atomicity ----------------------------------------------------------------------------------

def test_existing_output_is_refused_then_replaced_with_force(tmp_path, ckptavg):
    paths = make_sharded_run(tmp_path / "run")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "model.safetensors").write_bytes(b"old")
    before = snapshot(out)
    r = ckptavg("average", *paths, "-o", out)
    assert r.code == 1, r
    assert "already exists" in r.err and "--force" in r.err and str(out) in r.err
    assert snapshot(out) == before and (out / "keep.txt").read_text() == "mine"
    assert siblings_debris(tmp_path) == []

    r = ckptavg("average", *paths, "-o", out, "--force")
    assert r.code == 0, r
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "ckptavg.json", "config.json", "model.safetensors"]
    assert_matches(load_file(str(out / "model.safetensors")), expected_uniform(3))
    assert siblings_debris(tmp_path) == []
    # an existing *file* at the output path is refused the same way
    f = tmp_path / "file-out"
    f.write_text("x")
    r = ckptavg("average", *paths, "-o", f)
    assert r.code == 1 and f.read_text() == "x"


def _fail_after_first_write(monkeypatch, exc: BaseException, calls: list[str]) -> None:
    real = ShardWriter.write

    def write(self, name, tensor):
        if calls:
            raise exc
        calls.append(name)
        return real(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "write", write)


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("fmt", ["sharded", "bin"])
def test_failure_mid_write_leaves_nothing(tmp_path, ckptavg, monkeypatch, existing, fmt):
    if fmt == "sharded":
        paths = make_sharded_run(tmp_path / "run")
    else:
        paths = [write_checkpoint(tmp_path / "run" / f"checkpoint-{s}", state_at(i), "bin")
                 for i, s in enumerate(STEPS)]
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"previous")
    before = snapshot(out) if existing else None
    inputs_before = snapshot(tmp_path / "run")
    calls: list[str] = []
    _fail_after_first_write(monkeypatch, OSError(28, "No space left on device"), calls)
    args = ["average", *paths, "--shard-size", "2KB", "-o", out] + (["--force"] if existing else [])
    r = ckptavg(*args)
    assert r.code == 1, r
    assert calls, "the failure must come after some output was written"
    assert "No space left" in r.err
    if existing:
        assert snapshot(out) == before  # the previous output, untouched
    else:
        assert not out.exists()
    assert siblings_debris(tmp_path) == []
    assert snapshot(tmp_path / "run") == inputs_before  # inputs untouched, nothing added


def test_nan_found_after_shards_were_written_leaves_nothing(tmp_path, ckptavg, monkeypatch):
    """The newest checkpoint's last tensor holds a NaN: found when that tensor's average is finished,
    after earlier shards were written; the whole output is abandoned."""
    paths = make_sharded_run(tmp_path / "run")
    last_name = list(json.loads((paths[-1] / "model.safetensors.index.json").read_text())["weight_map"])[-1]
    bad = state_at(2)
    assert bad[last_name].is_floating_point() or last_name == "layers.0.num_batches_tracked"
    float_names = [k for k, v in bad.items() if v.is_floating_point()]
    poisoned = float_names[-1]
    bad[poisoned] = bad[poisoned].clone()
    bad[poisoned].view(-1)[3] = float("nan")
    for f in paths[-1].glob("model*"):
        f.unlink()
    write_sharded_safetensors(paths[-1], bad, 3000)
    written: list[str] = []
    real = export.ModelWriter.write

    def spy(self, name, tensor):  # counts what the engine handed to the writer, never changes anything
        written.append(name)
        return real(self, name, tensor)

    # the writer's own thread may or may not have reached the disk when the NaN is found (timing); what
    # the engine handed over before it is deterministic, and the output must be gone either way
    monkeypatch.setattr(export.ModelWriter, "write", spy)
    out = tmp_path / "out"
    r = ckptavg("average", *paths, "--shard-size", "2KB", "-o", out)
    assert r.code == 1, r
    assert written and poisoned not in written
    assert "NaN" in r.err and poisoned in r.err and "checkpoint-300" in r.err
    assert not out.exists()
    assert siblings_debris(tmp_path) == []


def test_failure_with_several_averages_leaves_nothing(tmp_path, ckptavg, monkeypatch):
    paths = make_sharded_run(tmp_path / "run")
    calls: list[str] = []
    _fail_after_first_write(monkeypatch, OSError(5, "Input/output error"), calls)
    out = tmp_path / "out"
    r = ckptavg("average", *paths, "--method", "ema:100", "--method", "lawa:2", "-o", out)
    assert r.code == 1, r
    assert calls
    assert not out.exists() or list(out.iterdir()) == []  # no subfolder, no debris
    assert siblings_debris(tmp_path) == []


def test_failure_with_several_averages_leaves_no_output_folder(tmp_path, ckptavg, monkeypatch):
    paths = make_sharded_run(tmp_path / "run")
    calls: list[str] = []
    _fail_after_first_write(monkeypatch, OSError(5, "Input/output error"), calls)
    out = tmp_path / "out"
    r = ckptavg("average", *paths, "--method", "ema:100", "--method", "lawa:2", "-o", out)
    assert r.code == 1 and calls, r
    assert not out.exists()


def test_several_averages_success_layout(tmp_path, ckptavg):
    paths = make_sharded_run(tmp_path / "run")
    out = tmp_path / "out"
    r = ckptavg("average", *paths, "--method", "ema:100", "--method", "lawa:2", "--shard-size", "4KB", "-o", out)
    assert r.code == 0, r
    assert sorted(p.name for p in out.iterdir()) == ["ema-100", "lawa-2"]
    for sub in out.iterdir():
        got, where = read_folder(sub)
        index = json.loads((sub / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == where and index["metadata"]["total_size"] == TOTAL
        assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in state_at(0).items()}
    assert siblings_debris(out) == [] and siblings_debris(tmp_path) == []


# -- never into the inputs ----------------------------------------------------------------------

def test_output_inside_an_input_checkpoint_is_refused(tmp_path, ckptavg):
    paths = make_sharded_run(tmp_path / "run")
    before = snapshot(tmp_path)
    for target in (paths[1] / "avg", paths[1] / "deeper" / "avg", paths[0]):
        for extra in ([], ["--force"]):
            r = ckptavg("average", *paths, "-o", target, *extra)
            assert r.code == 2, (target, extra, r)
            assert "inside" in r.err
            assert snapshot(tmp_path) == before
    # through a symbolic link to the checkpoint folder
    link = tmp_path / "link"
    link.symlink_to(paths[2], target_is_directory=True)
    r = ckptavg("average", *paths, "-o", link / "avg")
    assert r.code == 2, r
    assert not (paths[2] / "avg").exists()
    assert not [p for p in paths[2].iterdir() if "ckptavg" in p.name]


def test_output_inside_a_run_folder_is_refused(tmp_path, ckptavg):
    make_sharded_run(tmp_path / "run")
    run = tmp_path / "run"
    before = snapshot(tmp_path)
    for args in (["--last", "2"], []):  # given with --last, or recognised as a run folder
        for target in (run / "avg", run, run / "checkpoint-100" / "x"):
            r = ckptavg("average", run, *args, "-o", target, "--force")
            assert r.code == 2, (args, target, r)
            assert snapshot(tmp_path) == before
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-100", "checkpoint-200", "checkpoint-300"]


@pytest.mark.parametrize("given", ["checkpoint-folders", "index-files"])
def test_output_that_contains_the_inputs_is_refused(tmp_path, ckptavg, given):
    paths = make_sharded_run(tmp_path / "run")
    before = snapshot(tmp_path / "run")
    if given == "checkpoint-folders":  # -o the run folder that holds them
        r = ckptavg("average", *paths, "-o", tmp_path / "run", "--force")
    else:  # -o the checkpoint folder of an input given by its index file
        r = ckptavg("average", *(p / "model.safetensors.index.json" for p in paths), "-o", paths[-1], "--force")
    assert r.code == 2, r
    assert (tmp_path / "run").is_dir() and snapshot(tmp_path / "run") == before


def test_output_inside_the_folder_of_an_index_file_input_is_refused(tmp_path, ckptavg):
    paths = make_sharded_run(tmp_path / "run")
    before = snapshot(tmp_path / "run")
    r = ckptavg("average", *(p / "model.safetensors.index.json" for p in paths), "-o", paths[-1] / "avg")
    assert r.code == 2, r
    assert snapshot(tmp_path / "run") == before


# -- inspect ------------------------------------------------------------------------------------

def _inspect_json(ckptavg, *args) -> dict:
    r = ckptavg("inspect", *args, "--json")
    assert r.code == 0, r
    return json.loads(r.out)


FIELDS = {"path", "format", "step", "step_source", "complete", "incomplete_reason", "files", "tensors", "bytes",
          "dtypes", "tied", "fingerprint", "config_files"}


def test_inspect_sharded_folder(tmp_path, ckptavg):
    paths = make_sharded_run(tmp_path / "run")
    info = _inspect_json(ckptavg, paths[1])
    assert FIELDS <= set(info)
    assert info["format"] == "safetensors-sharded" and info["step"] == 200 and info["step_source"] == "name"
    assert info["complete"] is True and info["incomplete_reason"] is None
    assert info["tensors"] == len(state_at(0)) and info["bytes"] == TOTAL
    assert sorted(Path(f).name for f in info["files"]) == sorted(p.name for p in paths[1].glob("model-*.safetensors"))
    assert info["dtypes"] == {
        "bfloat16": {"tensors": 3, "bytes": 6144 + 48 + 2048},
        "float16": {"tensors": 1, "bytes": 1536},
        "float32": {"tensors": 2, "bytes": 4096 + 128},
        "int64": {"tensors": 2, "bytes": 512 + 8},
    }
    assert info["fingerprint"] == open_checkpoint(paths[1]).fingerprint
    assert "config.json" in info["config_files"]
    r = ckptavg("inspect", paths[1])
    assert r.code == 0, r
    assert "safetensors-sharded" in r.out and "step:        200" in r.out and "complete:    yes" in r.out
    r = ckptavg("inspect", paths[1], "--tensors", "--json")
    listed = {t["name"]: t for t in json.loads(r.out)["tensor_list"]}
    assert set(listed) == set(state_at(0))
    assert listed["embed.weight"] == {"name": "embed.weight", "dtype": "bfloat16", "shape": [96, 32], "bytes": 6144,
                                      "file": listed["embed.weight"]["file"]}


def test_inspect_folder_and_files(tmp_path, ckptavg):
    folder = write_checkpoint(tmp_path / "checkpoint-7", state_at(0), "safetensors", config=True)
    info = _inspect_json(ckptavg, folder)
    assert info["format"] == "safetensors" and info["step"] == 7 and info["complete"] is True
    assert info["files"] == [str(folder / "model.safetensors")] and info["bytes"] == TOTAL
    assert info["config_files"] == ["config.json"]
    info = _inspect_json(ckptavg, folder / "model.safetensors")
    assert info["format"] == "safetensors" and info["tensors"] == len(state_at(0))
    pt = write_checkpoint(tmp_path / "ckpt_step_42.pt", state_at(1), "pt")
    info = _inspect_json(ckptavg, pt)
    assert info["format"] == "torch" and info["step"] == 42 and info["bytes"] == TOTAL
    assert info["dtypes"]["float16"] == {"tensors": 1, "bytes": 1536}
    ck = write_checkpoint(tmp_path / "last.ckpt", state_at(1), "lightning", step=55)
    info = _inspect_json(ckptavg, ck)
    assert info["format"] == "lightning" and info["step"] == 55 and info["tensors"] == len(state_at(0))
    emb = torch.randn(4, 4)
    torch.save({"a.weight": emb, "b.weight": emb}, tmp_path / "tied.pt")
    info = _inspect_json(ckptavg, tmp_path / "tied.pt")
    assert info["tied"] == {"b.weight": "a.weight"} and info["tensors"] == 1


def test_inspect_hf_checkpoint_without_trainer_state_is_incomplete(tmp_path, ckptavg):
    (ck,) = make_sharded_run(tmp_path / "run", steps=[500])
    (ck / "trainer_state.json").unlink()
    torch.save({"state": {}}, ck / "optimizer.pt")
    torch.save({"rng": torch.get_rng_state()}, ck / "rng_state.pth")
    info = _inspect_json(ckptavg, ck)
    assert info["complete"] is False and "trainer_state.json" in info["incomplete_reason"]
    r = ckptavg("inspect", ck)
    assert r.code == 0 and "complete:    no" in r.out and "trainer_state.json" in r.out
    # once the Trainer writes it, the checkpoint is complete
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": 500}))
    assert _inspect_json(ckptavg, ck)["complete"] is True
    # a bare save_pretrained folder (no Trainer files) is complete without it
    bare = write_checkpoint(tmp_path / "bare", state_at(0), "safetensors", config=True)
    assert _inspect_json(ckptavg, bare)["complete"] is True


def test_inspect_run_folder(tmp_path, ckptavg):
    paths = make_sharded_run(tmp_path / "run")
    (paths[2] / "trainer_state.json").unlink()
    torch.save({}, paths[2] / "optimizer.pt")
    info = _inspect_json(ckptavg, tmp_path / "run")
    rows = info["checkpoints"]
    assert [r["step"] for r in rows] == STEPS
    assert [r["complete"] for r in rows] == [True, True, False]
    assert all(r["format"] == "safetensors-sharded" and r["bytes"] == TOTAL for r in rows)


def test_inspect_and_average_read_only(tmp_path, ckptavg):
    """Neither command writes anything into the inputs."""
    paths = make_sharded_run(tmp_path / "run")
    before = snapshot(tmp_path / "run")
    for p in paths:
        assert ckptavg("inspect", p).code == 0
    assert ckptavg("average", *paths, "-o", tmp_path / "out").code == 0
    assert snapshot(tmp_path / "run") == before
