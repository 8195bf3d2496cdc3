"""Every reader returns exactly what the writer put in; names, prefixes, steps, run folders,
and reads into private memory (never a memory map).

Checkpoints are written by the real writers (``safetensors.torch.save_file``, ``torch.save``)
and compared bit for bit with what :class:`ckptavg.CheckpointReader` returns, and with what
the reference loaders (``safetensors.torch.load_file``, ``torch.load``) return.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import write_checkpoint, write_sharded_safetensors
from safetensors.torch import load_file, save_file

from ckptavg import open_checkpoint
from ckptavg.errors import CheckpointChangedError, CkptavgError
from ckptavg.reading.discover import find_candidates, latest_complete
from ckptavg.reading.steps import step_from_name


def mixed_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Every dtype family a model holds: bf16/fp16/fp32/fp64 floats, int64/int32/uint8/bool buffers,
    a 0-d scalar, a non-contiguous source and odd sizes that break alignment."""
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(37, 12, generator=g).to(torch.bfloat16),
        "layers.0.attn.q.weight": torch.randn(12, 12, generator=g).to(torch.float16),
        "layers.0.attn.k.weight": torch.randn(12, 12, generator=g).t().contiguous(),
        "layers.0.norm.weight": 1 + 0.1 * torch.randn(12, generator=g),
        "layers.0.mlp.bias": torch.randn(7, generator=g).to(torch.bfloat16),
        "layers.0.scale": torch.tensor(0.5 + seed, dtype=torch.float32),
        "layers.0.precise": torch.randn(3, generator=g, dtype=torch.float64),
        "position_ids": torch.arange(13, dtype=torch.int64).reshape(1, 13) + seed,
        "layers.0.num_batches_tracked": torch.tensor(seed, dtype=torch.int64),
        "layers.0.mask": torch.rand(5, generator=g) > 0.5,
        "layers.0.codes": torch.randint(0, 255, (9,), generator=g, dtype=torch.int32),
        "layers.0.bytes": torch.randint(0, 255, (11,), generator=g).to(torch.uint8),
    }


def cli_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """mixed_state without its float64 tensor: averages accumulate in float32 by default (DESIGN.md),
    so float64 inputs are exact only with --accum-dtype float64 (see test_float64_tensors)."""
    state = mixed_state(seed)
    del state["layers.0.precise"]
    return state


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype, (k, got[k].dtype, v.dtype)
        assert tuple(got[k].shape) == tuple(v.shape), k
        assert torch.equal(got[k], v), k


def _read_all(path: Path, **open_kw) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(path, **open_kw)
    with ckpt.reader() as r:
        return {name: r.read(name).clone() for name in ckpt.tensors}


# -- every format -------------------------------------------------------------------------------

def _write(tmp_path: Path, fmt: str, state: dict[str, torch.Tensor]) -> tuple[Path, str]:
    """Write ``state`` in ``fmt``; return the path to open and the expected format name."""
    if fmt == "safetensors-file":
        p = tmp_path / "weights.safetensors"
        save_file(state, str(p), metadata={"format": "pt"})
        return p, "safetensors"
    if fmt == "safetensors-folder":
        (tmp_path / "ck").mkdir()
        save_file(state, str(tmp_path / "ck" / "model.safetensors"), metadata={"format": "pt"})
        return tmp_path / "ck", "safetensors"
    if fmt == "sharded":
        write_sharded_safetensors(tmp_path / "ck", state, 200)  # splits the tensors over many files
        return tmp_path / "ck", "safetensors-sharded"
    if fmt == "sharded-index":
        index = write_sharded_safetensors(tmp_path / "ck", state, 200)
        return index, "safetensors-sharded"
    if fmt == "bin":
        (tmp_path / "ck").mkdir()
        torch.save(state, tmp_path / "ck" / "pytorch_model.bin")
        return tmp_path / "ck", "torch"
    if fmt == "bin-sharded":
        folder = tmp_path / "ck"
        folder.mkdir()
        names = list(state)
        parts = [names[0:4], names[4:8], names[8:]]
        weight_map = {}
        for i, part in enumerate(parts):
            fname = f"pytorch_model-{i + 1:05d}-of-{len(parts):05d}.bin"
            torch.save({k: state[k] for k in part}, folder / fname)
            weight_map.update({k: fname for k in part})
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        return folder, "torch-sharded"
    if fmt == "pt":
        torch.save(state, tmp_path / "w.pt")
        return tmp_path / "w.pt", "torch"
    if fmt == "pth-nested":
        torch.save({"model": state, "optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": []},
                    "step": 3, "epoch": 1}, tmp_path / "w.pth")
        return tmp_path / "w.pth", "torch"
    if fmt == "lightning":
        write_checkpoint(tmp_path / "epoch=0-step=9.ckpt", state, "lightning", step=9)
        return tmp_path / "epoch=0-step=9.ckpt", "lightning"
    raise ValueError(fmt)


FORMATS = ["safetensors-file", "safetensors-folder", "sharded", "sharded-index", "bin", "bin-sharded", "pt",
           "pth-nested", "lightning"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_reader_returns_what_the_writer_wrote(tmp_path, fmt):
    state = mixed_state(1)
    path, kind = _write(tmp_path, fmt, state)
    ckpt = open_checkpoint(path)
    assert ckpt.format == kind
    # the index (from headers only) agrees with the data
    for name, v in state.items():
        ref = ckpt.tensors[name]
        assert ref.dtype == v.dtype and ref.shape == tuple(v.shape) and ref.nbytes == v.numel() * v.element_size()
    assert ckpt.nbytes == sum(v.numel() * v.element_size() for v in state.values())
    _assert_same(_read_all(path), state)
    # reading in another order, twice, gives the same bytes
    with ckpt.reader() as r:
        for name in reversed(list(state)):
            assert torch.equal(r.read(name), state[name]), name
            assert torch.equal(r.read(name), state[name]), name
    if fmt.startswith("sharded") or fmt == "bin-sharded":
        assert len(ckpt.files) >= 3 and len({ckpt.tensors[n].file for n in state}) >= 3


@pytest.mark.parametrize("fmt", ["safetensors-folder", "sharded", "bin", "bin-sharded", "pt", "lightning"])
def test_average_of_one_checkpoint_is_that_checkpoint(tmp_path, ckptavg, fmt):
    """End to end through the CLI: the uniform average of a single checkpoint is bit-identical to it."""
    state = cli_state(2)
    path, _ = _write(tmp_path, fmt, state)
    out = tmp_path / "out"
    r = ckptavg("average", path, "--steps", "5", "-o", out)
    assert r.code == 0, r
    _assert_same(load_file(str(out / "model.safetensors")), state)


def test_safetensors_reader_matches_reference_loader(tmp_path):
    index = write_sharded_safetensors(tmp_path / "ck", mixed_state(3), 150)
    reference = {}
    for f in sorted((tmp_path / "ck").glob("model-*.safetensors")):
        reference.update(load_file(str(f)))
    _assert_same(_read_all(index.parent), reference)
    _assert_same(_read_all(index), reference)


def test_float64_tensors(tmp_path, ckptavg):
    """float64 tensors: read exactly; averaged in float32 unless --accum-dtype float64 (DESIGN.md)."""
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(50, generator=g, dtype=torch.float64), "h": torch.randn(4, generator=g).half()}
    b = {"w": torch.randn(50, generator=g, dtype=torch.float64), "h": torch.randn(4, generator=g).half()}
    pa = write_checkpoint(tmp_path / "run" / "step_1.safetensors", a, "safetensors-file")
    pb = write_checkpoint(tmp_path / "run" / "step_2.safetensors", b, "safetensors-file")
    _assert_same(_read_all(pa), a)
    r = ckptavg("average", pa, pb, "--accum-dtype", "float64", "-o", tmp_path / "f64")
    assert r.code == 0, r
    got = load_file(str(tmp_path / "f64" / "model.safetensors"))
    assert got["w"].dtype == torch.float64 and got["h"].dtype == torch.float16
    assert torch.equal(got["w"], (a["w"] + b["w"]) / 2)
    r = ckptavg("average", pa, pb, "-o", tmp_path / "f32")
    assert r.code == 0, r
    got = load_file(str(tmp_path / "f32" / "model.safetensors"))
    assert got["w"].dtype == torch.float64
    torch.testing.assert_close(got["w"], (a["w"] + b["w"]) / 2, rtol=1e-6, atol=1e-7)


# -- pickles: nesting, --state-key, prefixes -----------------------------------------------------

def test_pt_plain_and_nested(tmp_path):
    state = mixed_state(4)
    torch.save(state, tmp_path / "plain.pt")
    _assert_same(_read_all(tmp_path / "plain.pt"), state)
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}, "step": 3},
               tmp_path / "nested.pt")
    ckpt = open_checkpoint(tmp_path / "nested.pt")
    assert set(ckpt.tensors) == set(state)  # the optimizer's entries are not weights
    _assert_same(_read_all(tmp_path / "nested.pt"), state)
    # the usual containers
    for key in ("state_dict", "model_state_dict", "module", "net"):
        torch.save({key: state, "epoch": 2}, tmp_path / f"{key}.pt")
        _assert_same(_read_all(tmp_path / f"{key}.pt"), state)


def test_state_key_chooses_the_entry(tmp_path, ckptavg):
    state = cli_state(5)
    ema = {k: (v * 2 if v.is_floating_point() else v) for k, v in state.items()}
    nested_ema = {k: (v * 3 if v.is_floating_point() else v) for k, v in state.items()}
    path = tmp_path / "both.pt"
    torch.save({"model": state, "ema": ema, "extra": {"inner": nested_ema}, "step": 3}, path)
    _assert_same(_read_all(path), state)  # "model" is found by default
    _assert_same(_read_all(path, state_key="ema"), ema)
    _assert_same(_read_all(path, state_key="extra/inner"), nested_ema)
    out = tmp_path / "out"
    r = ckptavg("average", path, "--steps", "1", "--state-key", "ema", "-o", out)
    assert r.code == 0, r
    _assert_same(load_file(str(out / "model.safetensors")), ema)
    r = ckptavg("average", path, "--steps", "1", "--state-key", "nope", "-o", tmp_path / "x")
    assert r.code == 1 and "nope" in r.err and "both.pt" in r.err
    assert not (tmp_path / "x").exists()


def test_lightning_prefix_stripped_and_kept(tmp_path, ckptavg):
    state = cli_state(6)
    path = write_checkpoint(tmp_path / "epoch=1-step=30.ckpt", state, "lightning", step=30)
    raw = torch.load(path, weights_only=True)
    assert set(raw["state_dict"]) == {f"model.{k}" for k in state}
    ckpt = open_checkpoint(path)
    assert ckpt.format == "lightning" and ckpt.step == 30
    _assert_same(_read_all(path), state)
    _assert_same(_read_all(path, strip_prefix=""), {f"model.{k}": v for k, v in state.items()})
    out = tmp_path / "auto"
    assert ckptavg("average", path, "-o", out).code == 0
    _assert_same(load_file(str(out / "model.safetensors")), state)
    out = tmp_path / "keep"
    r = ckptavg("average", path, "--strip-prefix", "none", "-o", out)
    assert r.code == 0, r
    _assert_same(load_file(str(out / "model.safetensors")), {f"model.{k}": v for k, v in state.items()})
    out = tmp_path / "explicit"
    r = ckptavg("average", path, "--strip-prefix", "model.layers.0.", "-o", out)
    assert r.code == 0, r
    assert "attn.q.weight" in load_file(str(out / "model.safetensors"))


def test_lightning_with_several_submodules_keeps_names(tmp_path):
    """Only a prefix that every key shares is the LightningModule's; two submodules keep their names."""
    state = {"encoder.w": torch.ones(3), "decoder.w": torch.zeros(3)}
    torch.save({"global_step": 4, "state_dict": state}, tmp_path / "last.ckpt")
    _assert_same(_read_all(tmp_path / "last.ckpt"), state)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
@pytest.mark.parametrize("where", ["pt", "bin-folder", "nested"])
def test_ddp_and_compile_prefixes_stripped(tmp_path, ckptavg, prefix, where):
    state = cli_state(7)
    wrapped = {prefix + k: v for k, v in state.items()}
    if where == "pt":
        path = tmp_path / "step_10.pt"
        torch.save(wrapped, path)
    elif where == "nested":
        path = tmp_path / "step_10.pt"
        torch.save({"model": wrapped, "optimizer": {}, "step": 10}, path)
    else:
        path = tmp_path / "checkpoint-10"
        path.mkdir()
        torch.save(wrapped, path / "pytorch_model.bin")
    _assert_same(_read_all(path), state)
    out = tmp_path / "out"
    r = ckptavg("average", path, "-o", out)
    assert r.code == 0, r
    _assert_same(load_file(str(out / "model.safetensors")), state)


def test_lightning_around_a_compiled_model(tmp_path):
    """``self.model = torch.compile(net)`` inside a LightningModule saves ``model._orig_mod.<name>``."""
    state = mixed_state(8)
    torch.save({"global_step": 4, "state_dict": {f"model._orig_mod.{k}": v for k, v in state.items()}},
               tmp_path / "epoch=0-step=4.ckpt")
    _assert_same(_read_all(tmp_path / "epoch=0-step=4.ckpt"), state)


def test_tied_pickle_tensors_are_aliases(tmp_path):
    emb = torch.randn(10, 4)
    state = {"embed.weight": emb, "head.weight": emb, "other": torch.randn(3)}
    torch.save(state, tmp_path / "tied.pt")
    ckpt = open_checkpoint(tmp_path / "tied.pt")
    assert ckpt.aliases == {"head.weight": "embed.weight"}
    assert set(ckpt.tensors) == {"embed.weight", "other"}
    # two equal but separate tensors are not tied
    torch.save({"a": emb.clone(), "b": emb.clone()}, tmp_path / "untied.pt")
    assert open_checkpoint(tmp_path / "untied.pt").aliases == {}


# -- steps --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,step", [
    ("checkpoint-9000", 9000),
    ("checkpoint_12", 12),
    ("step-12", 12),
    ("step_13", 13),
    ("Step_14", 14),
    ("step=15", 15),
    ("epoch=3-step=9000.ckpt", 9000),
    ("epoch=3-step=9000-v1.ckpt", 9000),
    ("ckpt_step_15.pth", 15),
    ("global_step77", 77),
    ("iter_0000100", 100),
    ("model_500.pt", 500),
    ("runs/exp1/checkpoint-500/model.safetensors", 500),
    ("runs/step-1/checkpoint-500", 500),
    ("epoch_3", None),
    ("model.safetensors", None),
    ("model-00001-of-00003.safetensors", None),
    ("last.ckpt", None),
    ("pytorch_model.bin", None),
])
def test_step_from_name(name, step):
    assert step_from_name(name) == step


def test_step_from_trainer_state_and_lightning_global_step(tmp_path):
    p = write_checkpoint(tmp_path / "final", mixed_state(0), step=4242)
    ckpt = open_checkpoint(p)
    assert ckpt.step == 4242 and ckpt.step_source == "trainer_state.json"
    # a file in such a folder gets the folder's step too
    assert open_checkpoint(p / "model.safetensors").step == 4242
    torch.save({"epoch": 2, "global_step": 321, "state_dict": {"model.w": torch.ones(2)}}, tmp_path / "last.ckpt")
    ckpt = open_checkpoint(tmp_path / "last.ckpt")
    assert ckpt.step == 321 and "global_step" in ckpt.step_source
    # the name wins over the file's own count; an explicit step wins over both
    torch.save({"global_step": 999, "state_dict": {"model.w": torch.ones(2)}}, tmp_path / "epoch=0-step=50.ckpt")
    assert open_checkpoint(tmp_path / "epoch=0-step=50.ckpt").step == 50
    assert open_checkpoint(tmp_path / "epoch=0-step=50.ckpt", step=7).step == 7
    # no step anywhere
    torch.save({"w": torch.ones(2)}, tmp_path / "weights.pt")
    assert open_checkpoint(tmp_path / "weights.pt").step is None


# -- run folders: --last N ----------------------------------------------------------------------

def _make_run(root: Path, steps: list[int]) -> list[Path]:
    paths = []
    for i, step in enumerate(steps):
        p = write_checkpoint(root / f"checkpoint-{step}", cli_state(i), "sharded", shard_bytes=200, step=step,
                             config=True)
        torch.save({"state": {}}, p / "optimizer.pt")  # an HF Trainer checkpoint
        paths.append(p)
    return paths


def _break(path: Path, how: str) -> None:
    if how == "missing-shard":
        max(path.glob("model-*.safetensors")).unlink()
    elif how == "no-trainer-state":
        (path / "trainer_state.json").unlink()
    elif how == "truncated-shard":
        shard = sorted(path.glob("model-*.safetensors"))[1]
        os.truncate(shard, shard.stat().st_size - 3)
    elif how == "shard-being-written":  # in the folder, not yet in the index's list... and the index lists one more
        index = json.loads((path / "model.safetensors.index.json").read_text())
        index["weight_map"]["late.weight"] = "model-99999-of-99999.safetensors"
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        raise ValueError(how)


@pytest.mark.parametrize("how", ["missing-shard", "no-trainer-state", "truncated-shard", "shard-being-written"])
def test_last_n_skips_an_incomplete_newest(tmp_path, ckptavg, how):
    root = tmp_path / "run"
    paths = _make_run(root, [100, 200, 300, 400])
    _break(paths[3], how)
    chosen = latest_complete(root, 2)
    assert [c.step for c in chosen] == [200, 300]
    assert [c.path for c in chosen] == paths[1:3]
    out = tmp_path / "out"
    r = ckptavg("average", root, "--last", "2", "-o", out)
    assert r.code == 0, r
    prov = json.loads((out / "ckptavg.json").read_text())
    assert prov["steps"] == [200, 300]
    assert "checkpoint-400" in r.err  # the skip is logged, naming the checkpoint
    # values: the mean of checkpoints 200 and 300 (int buffers: the newest, 300)
    got = load_file(str(out / "model.safetensors"))
    a, b = cli_state(1), cli_state(2)
    for k in a:
        if a[k].is_floating_point():
            want = ((a[k].double() + b[k].double()) / 2).to(a[k].dtype)
            torch.testing.assert_close(got[k], want, rtol=0, atol=0, msg=k)
        else:
            assert torch.equal(got[k], b[k]), k


def test_last_n_takes_the_newest_by_step_not_by_name(tmp_path, ckptavg):
    root = tmp_path / "run"
    _make_run(root, [900, 1000, 80, 10000])  # "checkpoint-10000" sorts before "checkpoint-900" as text
    assert [c.step for c in latest_complete(root, 2)] == [1000, 10000]
    assert [c.step for c in latest_complete(root, 10)] == [80, 900, 1000, 10000]
    r = ckptavg("average", root, "--last", "3", "-o", tmp_path / "out")
    assert r.code == 0, r
    assert json.loads((tmp_path / "out" / "ckptavg.json").read_text())["steps"] == [900, 1000, 10000]


def test_run_folder_ignores_staging_names(tmp_path):
    root = tmp_path / "run"
    _make_run(root, [100, 200])
    write_checkpoint(root / "tmp-checkpoint-300", mixed_state(5), step=300)
    write_checkpoint(root / "checkpoint-400.tmp", mixed_state(5), step=400)
    write_checkpoint(root / ".checkpoint-500", mixed_state(5), step=500)
    (root / "checkpoint-600").mkdir()  # no weights (yet)
    assert [p.name for p in find_candidates(root)] == ["checkpoint-100", "checkpoint-200"]
    assert [c.step for c in latest_complete(root, 5)] == [100, 200]


# -- private memory, never a memory map ---------------------------------------------------------

@pytest.mark.parametrize("fmt", ["safetensors-file", "sharded", "pt", "bin-sharded", "lightning"])
def test_reads_are_private_copies(tmp_path, fmt):
    """Tensors already returned stay intact when the trainer rewrites or truncates the file.

    A memory map would show the new bytes after an in-place rewrite (checked first, so a
    mapping fails this test cleanly instead of dying of SIGBUS at the truncation)."""
    state = {**mixed_state(9), "big.weight": torch.arange(40_000, dtype=torch.float32).reshape(200, 200)}
    path, _ = _write(tmp_path, fmt, state)
    ckpt = open_checkpoint(path)
    reader = ckpt.reader()
    try:
        got = {name: reader.read(name) for name in ckpt.tensors}  # no clone: what the reader handed out
        files = sorted({ref.file for ref in ckpt.tensors.values()})
        for f in files:  # rewrite every byte in place (same inode), as a trainer overwriting its file
            size = f.stat().st_size
            with open(f, "r+b") as fh:
                fh.write(b"\xff" * size)
                fh.flush()
                os.fsync(fh.fileno())
        _assert_same(got, state)
        for f in files:
            os.truncate(f, 0)
        _assert_same(got, state)
    finally:
        reader.close()


def test_reading_a_changed_file_is_an_error_not_garbage(tmp_path):
    state = mixed_state(10)
    path, _ = _write(tmp_path, "safetensors-file", state)
    ckpt = open_checkpoint(path)
    with ckpt.reader() as r:
        first = r.read("embed.weight")
        os.truncate(path, path.stat().st_size - 8)
        with pytest.raises(CheckpointChangedError) as e:
            r.read("layers.0.norm.weight")
        assert str(path) in str(e.value)
    assert torch.equal(first, state["embed.weight"])
    # and a pickle rewritten after indexing is refused before it is loaded
    torch.save(state, tmp_path / "w.pt")
    ckpt = open_checkpoint(tmp_path / "w.pt")
    torch.save({k: torch.zeros_like(v) for k, v in state.items()}, tmp_path / "w2.pt")
    os.replace(tmp_path / "w2.pt", tmp_path / "w.pt")
    with ckpt.reader() as r, pytest.raises(CkptavgError) as e:
        r.read("embed.weight")
    assert "w.pt" in str(e.value)
