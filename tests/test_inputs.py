"""Hostile and unusual inputs (issue 10): unrelated models, every safetensors dtype, header arithmetic,
empty tensors, pickle bombs. docs/FAULTS.md rows 44-48."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_daemon import start_daemon_from_config, status, stop, wait_for

from ckptavg.dtypes import BITS, SAFETENSORS_TO_TORCH, TORCH_TO_SAFETENSORS, cast_back, policy


def one_error_line(r) -> str:
    lines = [x for x in r.err.splitlines() if x.startswith("ckptavg: error:")]
    assert len(lines) == 1, r.err
    return lines[0]


# -- row 44: unrelated models ------------------------------------------------------------------------
def gpt2(folder: Path, layers: int = 2, seed: int = 0) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=16, n_head=2, vocab_size=32, n_positions=16)).save_pretrained(folder)
    return folder


def llama(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=2, vocab_size=32)).save_pretrained(folder)
    return folder


def test_row44_gpt2_and_llama_are_refused_naming_both(tmp_path, ckptavg):
    """docs/FAULTS.md row 44."""
    a, b = gpt2(tmp_path / "gpt2"), llama(tmp_path / "llama")
    out = tmp_path / "out"
    r = ckptavg("average", a, b, "-o", out)
    assert r.code == 1 and not out.exists()
    assert one_error_line(r) == (
        f"ckptavg: error: {b}: is not the same model as {a}: config.json says llama (LlamaForCausalLM) here and "
        "gpt2 (GPT2LMHeadModel) there (average checkpoints of one model, or pass --allow-mixed-models to average "
        "them anyway)")
    # without configs, the tensor names alone show it
    for c in (a, b):
        (c / "config.json").unlink()
    r = ckptavg("average", a, b, "-o", out)
    assert r.code == 1 and not out.exists()
    line = one_error_line(r)
    assert line.startswith(f"ckptavg: error: {b}: is not the same model as {a}: it holds ")
    assert "tensor(s) that " + str(a) + " lacks ('lm_head.weight', 'model.embed_tokens.weight'" in line
    # the user says otherwise: averaged, with a warning
    r = ckptavg("average", a, b, "--allow-mixed-models", "-o", out)
    assert r.code == 0 and "averaging anyway (--allow-mixed-models)" in r.err
    assert "lm_head.weight" in load_file(str(out / "model.safetensors"))


def test_row44_more_layers_is_growth_with_a_warning_naming_the_tensors_and_inputs(tmp_path, ckptavg):
    """docs/FAULTS.md row 44: 2 then 3 layers (progressive growth) is averaged; layer 2 comes from one input,
    and the warning says so."""
    a, b = gpt2(tmp_path / "checkpoint-100", 2), gpt2(tmp_path / "checkpoint-200", 3, seed=1)
    r = ckptavg("average", a, b, "-o", tmp_path / "out")
    assert r.code == 0, r.err
    assert (f"WARNING: 12 tensor(s) missing from {a}: 'transformer.h.2.attn.c_attn.bias', "
            "'transformer.h.2.attn.c_attn.weight', 'transformer.h.2.attn.c_proj.bias', "
            "'transformer.h.2.attn.c_proj.weight', 'transformer.h.2.ln_1.bias' and 7 more; their averages use only "
            "the inputs that hold them") in r.err.splitlines()
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(got["transformer.h.2.ln_1.bias"], load_file(str(b / "model.safetensors"))["transformer.h.2.ln_1.bias"])


def test_row44_shape_change_hint_does_not_suggest_reset_for_other_models(tmp_path, ckptavg):
    """docs/FAULTS.md row 44: with --allow-mixed-models, a shape change between two models is not called growth."""
    a = gpt2(tmp_path / "checkpoint-100")
    b = gpt2(tmp_path / "checkpoint-200")
    cfg = json.loads((b / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "gpt2-other", ["OtherLMHeadModel"]
    (b / "config.json").write_text(json.dumps(cfg))
    sd = load_file(str(b / "model.safetensors"))
    sd["transformer.wte.weight"] = torch.zeros(40, 16)
    save_file(sd, str(b / "model.safetensors"), metadata={"format": "pt"})
    r = ckptavg("average", a, b, "--allow-mixed-models", "-o", tmp_path / "out")
    assert r.code == 1
    line = one_error_line(r)
    assert "--on-shape-change reset" not in line
    assert line.endswith("(the checkpoints are of different models (gpt2 (GPT2LMHeadModel), gpt2-other "
                         "(OtherLMHeadModel)); average checkpoints of one model)")


def test_row44_daemon_skips_a_checkpoint_of_another_model_with_one_warning(tmp_path):
    """docs/FAULTS.md row 44: the daemon folds the GPT-2 run, skips the Llama checkpoint with one warning
    (persisted: never retried), and goes on."""
    run, out = tmp_path / "run", tmp_path / "avg"
    for step in (100, 200):
        gpt2(run / f"checkpoint-{step}", seed=step)
    llama(run / "checkpoint-300")
    gpt2(run / "checkpoint-400", seed=400)
    import os
    daemon = start_daemon_from_config(run, out, '[[average]]\nmethod = "swa"\nstart_step = 0\n', env=dict(os.environ))
    try:
        assert wait_for(lambda: status(out).get("last_folded_step") == 400, 60), status(out)
    finally:
        code, err = stop(daemon)
    assert code == 0, err
    assert status(out)["skipped"] == [300]
    skips = [x for x in err.splitlines() if "skipping checkpoint step 300" in x]
    assert len(skips) == 1 and "is not the same model as the swa-0 average: config.json says llama (LlamaForCausalLM) " \
        "here and gpt2 (GPT2LMHeadModel) at step 200" in skips[0], err
    assert err.count("folded step") == 3


# -- row 46: every dtype safetensors defines -------------------------------------------------------
SIZE = 6


def dtype_state(seed: int) -> dict[str, torch.Tensor]:
    """One tensor per torch-mapped safetensors dtype, plus an empty one (row 47)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, dtype in SAFETENSORS_TO_TORCH.items():
        base = torch.randn(SIZE, generator=g) * 4
        if dtype == torch.bool:
            t = base > 0
        elif dtype == torch.complex64:
            t = torch.complex(base, -base)
        elif dtype.is_floating_point:
            t = base.abs().to(dtype) if dtype == torch.float8_e8m0fnu else base.to(dtype)
        else:
            t = (base.abs() * 10).to(dtype)
        out[f"t.{name}"] = t
    out["t.empty"] = torch.zeros(0)
    return out


def expected(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out = {}
    for k, last in states[-1].items():
        if last.dtype.is_floating_point and policy(TORCH_TO_SAFETENSORS[last.dtype]).startswith("average"):
            mean = sum(s[k].float() for s in states) / len(states)
            out[k] = cast_back(mean, last.dtype)
        else:
            out[k] = last
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bytes(a.reshape(-1).view(torch.uint8).numpy()) == \
        bytes(b.reshape(-1).view(torch.uint8).numpy())


def test_row46_every_dtype_through_the_one_shot_and_the_daemon(tmp_path, ckptavg):
    """docs/FAULTS.md rows 46 and 47: each dtype averaged (floats, fp8 in fp32 rounded back) or taken from the
    newest input (integers, bool, E8M0 scales, complex), bit-identical in the one-shot and the daemon; an
    empty tensor is averaged like any other."""
    run = tmp_path / "run"
    states = [dtype_state(i) for i in range(3)]
    for i, s in enumerate(states):
        (run / f"checkpoint-{(i + 1) * 100}").mkdir(parents=True)
        save_file(s, str(run / f"checkpoint-{(i + 1) * 100}" / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    r = ckptavg("average", *sorted(run.iterdir()), "--method", "swa:0", "-o", out)
    assert r.code == 0, r.err
    got = load_file(str(out / "model.safetensors"))
    want = expected(states)
    assert got.keys() == want.keys()
    for k in want:
        assert same_bits(got[k], want[k]), k
    import os
    avg = tmp_path / "avg"
    daemon = start_daemon_from_config(run, avg, '[[average]]\nmethod = "swa"\nstart_step = 0\n', env=dict(os.environ))
    try:
        assert wait_for(lambda: status(avg).get("last_folded_step") == 300, 60), status(avg)
    finally:
        code, err = stop(daemon)
    assert code == 0 and status(avg)["skipped"] == [], err
    assert (avg / "swa-0" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_row46_fp8_saturates_and_the_table_is_complete():
    """docs/FAULTS.md row 46: fp8 rounds back saturating (torch's cast overflows E5M2 to Inf, FNUZ to NaN);
    every dtype the format defines has a policy, and the README states it."""
    big = torch.tensor([1e6, -1e6, 3.0])
    for dt in (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz):
        m = torch.finfo(dt).max
        assert cast_back(big, dt).float().tolist() == [m, -m, 3.0]
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for name in BITS:
        assert f"| `{name}` | {policy(name)} |" in readme, name


def raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def test_row46_packed_dtypes_are_refused_naming_the_tensor(tmp_path, ckptavg):
    """docs/FAULTS.md row 46: F4 and F6 (no torch dtype holds them element for element)."""
    f = raw_safetensors(tmp_path / "q.safetensors", {"w": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}, bytes(2))
    r = ckptavg("inspect", f)
    assert r.code == 1
    assert one_error_line(r) == (f"ckptavg: error: {f}: tensor 'w': dtype F4 (4-bit, packed) has no torch dtype; "
                                 "ckptavg cannot average it (dequantize the checkpoint, or leave this tensor out of it)")


# -- row 48: header arithmetic ------------------------------------------------------------------------
@pytest.mark.parametrize("shape,words", [
    ([2**64, 0], "dimension 18446744073709551616 of shape [18446744073709551616, 0] does not fit in 64 bits, "
                 "the safetensors format's limit"),
    ([2**63, 0], "dimension 9223372036854775808 of shape [9223372036854775808, 0] is over 2**63 - 1, "
                 "the largest torch can hold"),
    ([2**40, 2**40, 0], "shape [1099511627776, 1099511627776, 0] overflows 64 bits when multiplied out"),
])
def test_row48_every_dimension_is_validated_as_the_format_does(tmp_path, ckptavg, shape, words):
    """docs/FAULTS.md row 48."""
    f = raw_safetensors(tmp_path / "step_1.safetensors", {"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}, b"")
    for args in (("inspect", f), ("average", f, "-o", tmp_path / "out")):
        r = ckptavg(*args)
        assert r.code == 1 and one_error_line(r) == f"ckptavg: error: {f}: tensor 'a': {words} (a corrupt or crafted header)"


# -- row 47: empty tensors -----------------------------------------------------------------------------
def test_row47_empty_tensors_are_averaged_and_placeholders_only_refused_under_deepspeed(tmp_path, ckptavg):
    """docs/FAULTS.md row 47."""
    paths = []
    for i in range(2):
        p = tmp_path / "run" / f"checkpoint-{(i + 1) * 100}"
        p.mkdir(parents=True)
        save_file({"w": torch.full((4,), float(i)), "e": torch.zeros(0), "f": torch.zeros(3, 0)}, str(p / "model.safetensors"))
        paths.append(p)
    r = ckptavg("average", *paths, "-o", tmp_path / "out")
    assert r.code == 0, r.err
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert got["e"].shape == (0,) and got["f"].shape == (3, 0) and got["w"].tolist() == [0.5] * 4
    for p in paths:
        (p / "zero_to_fp32.py").write_text("# DeepSpeed's consolidation script\n")
    r = ckptavg("average", *paths, "-o", tmp_path / "out2")
    assert r.code == 1 and one_error_line(r) == (
        f"ckptavg: error: {paths[0]}: tensor 'e': is empty (shape [0]) (a DeepSpeed ZeRO-3 partitioned placeholder? "
        "pass its DeepSpeed global_step folder instead, which ckptavg gathers)")


# -- row 45: pickle bombs -------------------------------------------------------------------------------
def write_bomb(path: Path, inflated: int = 2 << 30) -> Path:
    """A torch-like zip whose ``bomb/data.pkl`` is ``inflated`` zero bytes, deflated (about 2 MB for 2 GiB):
    one block of 16 MiB compressed with a full flush, repeated, so nothing large is ever in memory."""
    chunk = 16 << 20
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(bytes(chunk)) + c.flush(zlib.Z_FULL_FLUSH)
    end = zlib.compressobj(9, zlib.DEFLATED, -15).flush()
    crc = 0
    zero = bytes(chunk)
    for _ in range(inflated // chunk):
        crc = zlib.crc32(zero, crc)
    comp = len(block) * (inflated // chunk) + len(end)
    members = [("bomb/data.pkl", 8, crc, comp, inflated), ("bomb/version", 0, zlib.crc32(b"3\n"), 2, 2)]
    with open(path, "wb") as f:
        central, offsets = b"", []
        for name, method, c32, csize, usize in members:
            offsets.append(f.tell())
            f.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0, c32, csize, usize, len(name), 0) + name.encode())
            if method:
                for _ in range(inflated // chunk):
                    f.write(block)
                f.write(end)
            else:
                f.write(b"3\n")
        start = f.tell()
        for (name, method, c32, csize, usize), off in zip(members, offsets):
            central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0, c32, csize, usize,
                                   len(name), 0, 0, 0, 0, 0, off) + name.encode()
        f.write(central)
        f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), start, 0))
    return path


MEASURE = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
           "sys.stdout.write(r.stderr); print('RC', r.returncode); "
           "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def test_row45_pickle_bomb_is_refused_before_loading_within_a_fixed_memory_bound(tmp_path):
    """docs/FAULTS.md row 45: 2 MB on disk, 2 GiB of pickle once inflated. Refused from the zip's directory; the
    child's peak RSS stays under 600 MB (it was 4.4 GB)."""
    bomb = write_bomb(tmp_path / "step_100.pt")
    assert bomb.stat().st_size < 3_000_000
    line = (f"ckptavg: error: {bomb}: member bomb/data.pkl declares 2147483648 bytes of pickle for 0 bytes of tensors, "
            "over the 4194304-byte limit; refused before loading (a decompression bomb or a corrupt file; torch.save "
            "never writes such a file)")
    for args in (["inspect", str(bomb)], ["average", str(bomb), "-o", str(tmp_path / "out")]):
        p = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, "-m", "ckptavg.cli.main", *args],
                           capture_output=True, text=True, timeout=120)
        err, rc, peak = p.stdout.rsplit("\n", 3)[0], p.stdout.split("RC ")[1].split()[0], int(p.stdout.split("PEAK_KB ")[1])
        assert rc == "1" and err.strip().splitlines() == [line], p.stdout
        assert peak < 600_000, f"peak RSS {peak} kB"
    assert not (tmp_path / "out").exists()


def test_row45_a_compressed_member_is_refused(tmp_path, ckptavg):
    """docs/FAULTS.md row 45: torch.save never compresses; a re-zipped (deflated) file is refused, since reading it
    through a memory map would see compressed bytes as tensor data."""
    import zipfile

    good = tmp_path / "a.pt"
    torch.save({"w": torch.ones(3)}, good)
    bad = tmp_path / "step_1.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    info = zipfile.ZipFile(bad).getinfo("a/data.pkl")
    r = ckptavg("inspect", bad)
    assert r.code == 1 and one_error_line(r) == (
        f"ckptavg: error: {bad}: member a/data.pkl is compressed ({info.compress_size} bytes inflating to "
        f"{info.file_size}); refused before loading (torch.save stores members uncompressed; re-save the checkpoint "
        "with torch.save)")
