"""Bad input (docs/FAULTS.md rows 2–12, 17, 18): one clear line naming the file and tensor, exit 1
(usage errors 2), no traceback, and nothing written."""

from __future__ import annotations

import json
import os
import pathlib
import resource
import struct
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli_subprocess, tiny_state, write_checkpoint, write_sharded_safetensors
from safetensors.torch import save_file

from ckptavg.errors import CheckpointChangedError, CheckpointVanishedError, TruncatedFileError
from ckptavg.reading.fileio import FileCache, identify


def assert_refused(r, *needles: str, code: int = 1, out: Path | None = None) -> None:
    assert r.code == code, r
    lines = [line for line in r.err.splitlines() if line.startswith("ckptavg: error:")]
    assert len(lines) == 1, r.err
    assert "Traceback" not in r.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if ".ckptavg-tmp-" in p.name]


def _run(tmp_path, make_run, fmt="safetensors", steps=(100, 200, 300)):
    return make_run(list(steps), fmt=fmt, root=tmp_path / "run")


def _raw_safetensors(path: Path, header: dict | bytes, data: bytes = b"") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


# -- row 2: an index lists a missing shard -------------------------------------------------
def test_missing_shard(tmp_path, make_run, ckptavg):
    paths = make_run([100, 200], fmt="sharded", root=tmp_path / "run", shard_bytes=1024)
    shards = sorted(paths[1].glob("model-*.safetensors"))
    assert len(shards) >= 2
    shards[-1].unlink()
    out = tmp_path / "out"
    r = ckptavg("average", *paths, "-o", out)
    assert_refused(r, "checkpoint-200", shards[-1].name, "missing", out=out)


# -- row 3: truncated shard -------------------------------------------------------------------
def test_truncated_shard(tmp_path, make_run, ckptavg):
    paths = _run(tmp_path, make_run)
    f = paths[1] / "model.safetensors"
    os.truncate(f, f.stat().st_size - 100)
    out = tmp_path / "out"
    assert_refused(ckptavg("average", *paths, "-o", out), str(f), "truncated", out=out)
    assert_refused(ckptavg("inspect", paths[1]), str(f))


# -- row 4: header bomb and garbage -----------------------------------------------------------
@pytest.mark.parametrize("case", ["2**40", "over-limit", "bad-utf8", "bad-json", "json-list", "tiny"])
def test_garbage_headers_rejected_fast_with_flat_memory(tmp_path, ckptavg, case):
    f = tmp_path / "step_1.safetensors"
    if case == "2**40":
        f.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    elif case == "over-limit":
        f.write_bytes(struct.pack("<Q", 100_000_001) + b"{" + b" " * 64)
    elif case == "bad-utf8":
        _raw_safetensors(f, b'{"a\xff\xfe": 1}')
    elif case == "bad-json":
        _raw_safetensors(f, b'{"a": {"dtype": "F32", ')
    elif case == "json-list":
        _raw_safetensors(f, b"[1, 2, 3]")
    else:
        f.write_bytes(b"\x01\x00")
    good = write_checkpoint(tmp_path / "step_2.safetensors", tiny_state(1), "safetensors-file")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    out = tmp_path / "out"
    r = ckptavg("average", f, good, "-o", out)
    assert time.perf_counter() - t0 < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KB: no 100 MB+ read
    assert_refused(r, str(f), out=out)


# -- row 5: crafted offsets -------------------------------------------------------------------
@pytest.mark.parametrize("case,needle", [
    ("overlap", "overlaps"), ("gap", "gap"), ("out-of-bounds", "file holds"), ("shape-bytes", "needs 16 bytes"),
    ("trailing", "not described"), ("bad-dtype", "unknown dtype"), ("negative-shape", "non-negative"),
])
def test_crafted_offsets(tmp_path, ckptavg, case, needle):
    data = bytes(32)
    headers = {
        "overlap": {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                    "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}},
        "gap": {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [24, 32]}},
        "out-of-bounds": {"a": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]}},
        "shape-bytes": {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 32]}},
        "trailing": {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
        "bad-dtype": {"a": {"dtype": "F31", "shape": [8], "data_offsets": [0, 32]}},
        "negative-shape": {"a": {"dtype": "F32", "shape": [-8], "data_offsets": [0, 32]}},
    }
    f = _raw_safetensors(tmp_path / "step_1.safetensors", headers[case], data)
    out = tmp_path / "out"
    r = ckptavg("average", f, "-o", out)
    tensor = {"overlap": "'b'", "gap": "'b'", "trailing": None, "out-of-bounds": None}.get(case, "'a'")
    wanted = [str(f), needle] + ([tensor] if tensor else [])
    assert_refused(r, *wanted, out=out)


# -- row 6: path escape from an index --------------------------------------------------------
@pytest.mark.parametrize("target", ["../../x.safetensors", "ABSOLUTE", "SYMLINK"])
def test_index_path_escape(tmp_path, ckptavg, target):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = write_checkpoint(outside / "secret.safetensors", {"a": torch.ones(4)}, "safetensors-file")
    ck = tmp_path / "run" / "checkpoint-1"
    ck.mkdir(parents=True)
    save_file({"b": torch.ones(4)}, str(ck / "part.safetensors"))
    if target == "ABSOLUTE":
        name = str(secret)
    elif target == "SYMLINK":
        (ck / "link.safetensors").symlink_to(secret)
        name = "link.safetensors"
    else:
        name = target
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": name, "b": "part.safetensors"}}))
    atime = secret.stat().st_atime_ns
    out = tmp_path / "out"
    r = ckptavg("average", ck, "-o", out)
    assert_refused(r, "model.safetensors.index.json", "outside", out=out)
    assert "security" in r.err  # logged as a security warning
    assert secret.stat().st_atime_ns == atime


# -- row 7: index and shard disagree ----------------------------------------------------------
@pytest.mark.parametrize("case", ["index-extra", "shard-extra"])
def test_index_and_shard_disagree(tmp_path, ckptavg, case):
    ck = tmp_path / "checkpoint-1"
    index = write_sharded_safetensors(ck, tiny_state(0), shard_bytes=1024)
    data = json.loads(index.read_text())
    shards = sorted(data["weight_map"].values())
    first_shard = max(set(shards), key=shards.count)  # a shard holding several tensors
    if case == "index-extra":
        data["weight_map"]["ghost.weight"] = first_shard
    else:
        victim = next(k for k, v in data["weight_map"].items() if v == first_shard)
        del data["weight_map"][victim]
    index.write_text(json.dumps(data))
    out = tmp_path / "out"
    r = ckptavg("average", ck, "-o", out)
    assert_refused(r, first_shard, "ghost.weight" if case == "index-extra" else victim, out=out)


# -- row 8: shape/dtype change, empty ZeRO-3 tensors ------------------------------------------
@pytest.mark.parametrize("case", ["shape", "dtype", "zero3"])
def test_tensor_changes_are_rejected(tmp_path, ckptavg, case):
    states = [tiny_state(i, dtype=torch.float32) for i in range(3)]
    if case == "shape":
        states[2]["layers.0.attn.weight"] = torch.zeros(16, 17)
    elif case == "dtype":
        states[2]["layers.0.attn.weight"] = states[2]["layers.0.attn.weight"].half()
    else:
        states[2]["layers.0.attn.weight"] = torch.zeros(0)
    paths = [write_checkpoint(tmp_path / "run" / f"checkpoint-{(i + 1) * 100}", s) for i, s in enumerate(states)]
    if case == "zero3":  # saved by DeepSpeed, as HF Trainer leaves it (elsewhere an empty tensor is just empty)
        for p in paths:
            (p / "zero_to_fp32.py").write_text("# DeepSpeed's consolidation script\n")
    out = tmp_path / "out"
    r = ckptavg("average", *paths, "-o", out)
    assert_refused(r, "checkpoint-300", "layers.0.attn.weight", out=out)
    if case == "zero3":
        assert "ZeRO-3" in r.err


# -- row 9: NaN / Inf --------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_nan_names_file_and_tensor(tmp_path, ckptavg, fmt):
    states = [tiny_state(i, dtype=torch.float32) for i in range(3)]
    states[1]["layers.0.norm.weight"][3] = float("nan")
    paths = [write_checkpoint(tmp_path / "run" / (f"checkpoint-{(i + 1) * 100}" if fmt == "safetensors" else f"step_{(i + 1) * 100}.pt"),
                              s, fmt) for i, s in enumerate(states)]
    out = tmp_path / "out"
    bad = paths[1] / "model.safetensors" if fmt == "safetensors" else paths[1]
    assert_refused(ckptavg("average", *paths, "--method", "ema:100", "-o", out), str(bad), "layers.0.norm.weight", "NaN", out=out)
    r = ckptavg("average", *paths, "--allow-nonfinite", "-o", out)
    assert r.code == 0, r


def test_nan_that_left_the_lawa_window_does_not_poison(tmp_path, ckptavg):
    states = [tiny_state(i, dtype=torch.float32) for i in range(4)]
    states[0]["embed.weight"][0, 0] = float("inf")
    paths = [write_checkpoint(tmp_path / "run" / f"checkpoint-{(i + 1) * 100}", s) for i, s in enumerate(states)]
    r = ckptavg("average", *paths, "--method", "lawa:2", "-o", tmp_path / "out")
    assert r.code == 0, r
    from safetensors.torch import load_file

    got = load_file(str(tmp_path / "out" / "model.safetensors"))["embed.weight"]
    torch.testing.assert_close(got, (states[2]["embed.weight"] + states[3]["embed.weight"]) / 2)


# -- rows 10, 11: malicious pickles ---------------------------------------------------------------
class _Evil:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.sentinel),))


def _evil_pickle(path: Path, sentinel: Path, *, nested: bool = False) -> Path:
    payload = {"weight": torch.ones(3), "evil": _Evil(sentinel)}
    torch.save({"state_dict": payload, "global_step": 5} if nested else payload, path)
    return path


@pytest.mark.parametrize("name", ["pytorch_model.bin", "step_5.pt", "epoch=0-step=5.ckpt"])
@pytest.mark.parametrize("force_env", [False, True])
def test_malicious_pickle_is_never_executed(tmp_path, ckptavg, monkeypatch, name, force_env):
    if force_env:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    sentinel = tmp_path / "SENTINEL"
    folder = tmp_path / "in"
    folder.mkdir()
    f = _evil_pickle(folder / name, sentinel, nested=name.endswith(".ckpt"))
    out = tmp_path / "out"
    r = ckptavg("average", f, "-o", out)
    assert_refused(r, str(f), "not executed", out=out)
    assert_refused(ckptavg("inspect", f), str(f))
    assert not sentinel.exists()


def test_malicious_pickle_with_env_in_a_real_process(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    f = _evil_pickle(tmp_path / "step_5.pt", sentinel)
    p = run_cli_subprocess("average", f, "-o", tmp_path / "out", env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    assert p.returncode == 1 and "Traceback" not in p.stderr and str(f) in p.stderr, p.stderr
    assert not sentinel.exists() and not (tmp_path / "out").exists()


# -- row 12: pickled side files ----------------------------------------------------------------------
def test_side_files_are_never_unpickled(tmp_path, ckptavg):
    sentinel = tmp_path / "SENTINEL"
    # given directly: refused with a reason
    args = _evil_pickle(tmp_path / "training_args.bin", sentinel)
    assert_refused(ckptavg("average", args, "-o", tmp_path / "o1"), "training_args.bin", "never unpickles")
    # a DCP folder whose .metadata is a malicious pickle
    dcp = tmp_path / "dcp" / "step-10"
    dcp.mkdir(parents=True)
    _evil_pickle(dcp / "metadata.pkl", sentinel)
    (dcp / "metadata.pkl").rename(dcp / ".metadata")
    (dcp / "__0_0.distcp").write_bytes(b"\0" * 64)
    assert_refused(ckptavg("average", dcp, "-o", tmp_path / "o2"), "step-10", "DCP .metadata")
    # an HF folder holding malicious optimizer/args pickles averages without touching them
    paths = []
    for i, step in enumerate((100, 200)):
        p = write_checkpoint(tmp_path / "run" / f"checkpoint-{step}", tiny_state(i), step=step)
        _evil_pickle(p / "training_args.bin", sentinel)
        _evil_pickle(p / "optimizer.pt", sentinel)
        paths.append(p)
    r = ckptavg("average", *paths, "-o", tmp_path / "o3")
    assert r.code == 0, r
    r = ckptavg("inspect", tmp_path / "run")
    assert r.code == 0 and "checkpoint-200" in r.out
    assert not sentinel.exists()


# -- row 17: noise entries ---------------------------------------------------------------------------
def test_noise_entries_are_ignored(tmp_path, ckptavg):
    run = tmp_path / "run"
    # every noise name below carries a step, so only the noise rules keep it out
    for i, name in enumerate(["checkpoint-100", "checkpoint-200", "tmp-checkpoint-300", "tmp-step-350",
                              "step_400.orbax-checkpoint-tmp-1", ".step-500"]):
        write_checkpoint(run / name, tiny_state(i), step=(i + 1) * 100)
    write_checkpoint(run / "step-600.metadata.tmp", tiny_state(6), "safetensors-file")
    write_checkpoint(run / "step_700.safetensors.tmp", tiny_state(7), "safetensors-file")
    out = tmp_path / "out"
    r = ckptavg("average", run, "--last", "5", "-o", out)
    assert r.code == 0, r
    assert json.loads((out / "ckptavg.json").read_text())["steps"] == [100, 200]
    r = ckptavg("inspect", run, "--json")
    listed = [Path(c["path"]).name for c in json.loads(r.out)["checkpoints"]]
    assert listed == ["checkpoint-100", "checkpoint-200"]
    # a shell glob that caught a staging folder: skipped with a warning
    r = ckptavg("average", run / "checkpoint-100", run / "tmp-checkpoint-300", "-o", tmp_path / "o2")
    assert r.code == 0 and "tmp-checkpoint-300" in r.err


# -- row 18: symlinks and loops ----------------------------------------------------------------------
def test_symlinks_and_loops(tmp_path, ckptavg):
    run = tmp_path / "run"
    ckdir = run / "lightning_logs" / "version_0" / "checkpoints"
    for i, step in enumerate((100, 200, 300)):
        write_checkpoint(ckdir / f"epoch=0-step={step}.ckpt", tiny_state(i), "lightning", step=step)
    (ckdir / "last.ckpt").symlink_to(ckdir / "epoch=0-step=300.ckpt")
    (ckdir / "step=300-copy.ckpt").symlink_to(ckdir / "epoch=0-step=300.ckpt")  # same inode, names a step
    (run / "loop").symlink_to(run)  # directory loop
    outside = write_checkpoint(tmp_path / "elsewhere" / "step_999.pt", tiny_state(9), "pt")
    (run / "step_999.pt").symlink_to(outside)
    out = tmp_path / "out"
    t0 = time.perf_counter()
    r = ckptavg("average", run, "--last", "10", "-o", out)
    assert time.perf_counter() - t0 < 20
    assert r.code == 0, r
    assert json.loads((out / "ckptavg.json").read_text())["steps"] == [100, 200, 300]
    assert "outside" in r.err  # the link out of the root was not followed
    # explicit duplicates: one file by two names is taken once
    r = ckptavg("average", ckdir / "epoch=0-step=300.ckpt", ckdir / "step=300-copy.ckpt", ckdir / "epoch=0-step=100.ckpt",
                "-o", tmp_path / "o2")
    assert r.code == 0 and "taken once" in r.err, r
    assert json.loads((tmp_path / "o2" / "ckptavg.json").read_text())["steps"] == [100, 300]


# -- a file changed during the read (docs/FAULTS.md row 15, reader side) -------------------------------------
@pytest.mark.parametrize("change", ["truncate", "replace", "append", "delete"])
def test_file_changed_during_read_is_rejected(tmp_path, change):
    f = write_checkpoint(tmp_path / "a.safetensors", {"w": torch.arange(1000, dtype=torch.float32)}, "safetensors-file")
    ident = identify(f)
    with FileCache() as files:
        head = files.read(f, ident, 8, 8)  # opens and checks the file
        assert head.numel() == 8
        if change == "truncate":
            os.truncate(f, 100)
        elif change == "append":
            with open(f, "ab") as fh:
                fh.write(b"x")
        elif change == "replace":
            tmp = tmp_path / "b"
            tmp.write_bytes(f.read_bytes())
            os.replace(tmp, f)
        else:
            f.unlink()
        if change in ("delete", "replace"):  # the open descriptor still reads the whole, unchanged file
            assert torch.equal(files.read(f, ident, 8, 8), head)
        else:
            with pytest.raises((CheckpointChangedError, TruncatedFileError)):
                files.read(f, ident, 0, 4008)
    with FileCache() as files:
        if change == "delete":
            with pytest.raises(CheckpointVanishedError):
                files.read(f, ident, 0, 8)
        elif change == "replace":
            with pytest.raises(CheckpointChangedError, match="replaced"):
                files.read(f, ident, 0, 8)


def test_real_process_exit_codes_and_debug_traceback(tmp_path, make_run):
    paths = _run(tmp_path, make_run)
    os.truncate(paths[2] / "model.safetensors", 50)
    p = run_cli_subprocess("average", *paths, "-o", tmp_path / "out")
    assert p.returncode == 1 and "Traceback" not in p.stderr and "checkpoint-300" in p.stderr, p.stderr
    p = run_cli_subprocess("average", *paths, "--method", "nope", "-o", tmp_path / "out")
    assert p.returncode == 2 and "Traceback" not in p.stderr and "unknown method" in p.stderr, p.stderr
    p = run_cli_subprocess("--log-level", "debug", "average", *paths, "-o", tmp_path / "out")
    assert p.returncode == 1 and "Traceback" in p.stderr
    assert not (tmp_path / "out").exists()
