"""Tiny real ``transformers`` models, saved at several training steps, averaged by the CLI and
loaded back with ``from_pretrained``.

Models are built from configs (nothing is downloaded). Each "checkpoint" is the same initial
model moved by a different random step, saved the way a trainer saves it: ``save_pretrained``
(single or sharded safetensors) or ``torch.save(state_dict)`` as ``pytorch_model.bin`` with the
tied embedding/head stored under both names, one storage (transformers 5 ignores
``safe_serialization=False`` and always writes safetensors). Beside the weights: config,
generation config, hand-written tokenizer files and HF Trainer files.

Expected values are computed independently from the saved files (float64, cast to the model
dtype) and compared with what ``from_pretrained`` loads from ckptavg's output.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

STEPS = [100, 200, 300, 400]
VOCAB = 100

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TRAINER_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "trainer_state.json")


# -- building and saving checkpoints ------------------------------------------------------------

def _config(kind: str):
    if kind == "gpt2":
        return GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64,
                          tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)
    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=64,
                       tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)


def _model(kind: str, seed: int, dtype: torch.dtype):
    """The same initial model for every seed, then a seed-specific 'training step' on every parameter."""
    torch.manual_seed(1234)
    cls = GPT2LMHeadModel if kind == "gpt2" else LlamaForCausalLM
    model = cls(_config(kind))
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in model.parameters():  # tied parameters are listed once
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.to(dtype).eval()


def _write_side_files(folder: Path, step: int) -> None:
    """Tokenizer files (each carrying the step, to see which input they came from) and Trainer files."""
    vocab = {f"t{i}": i for i in range(VOCAB)}
    (folder / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}, "ckptavg_step": step}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64, "ckptavg_step": step}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "t1", "ckptavg_step": step}))
    torch.save({"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
               folder / "optimizer.pt")
    torch.save({"last_epoch": step}, folder / "scheduler.pt")
    torch.save({"cpu_rng_state": torch.get_rng_state()}, folder / "rng_state.pth")
    torch.save({"output_dir": "x", "learning_rate": 0.1}, folder / "training_args.bin")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))


def _save_run(root: Path, kind: str, dtype: torch.dtype, how: str) -> list[Path]:
    """Save one checkpoint per step under ``root/checkpoint-<step>``.

    how: ``safetensors`` (save_pretrained), ``sharded`` (save_pretrained with a small
    max_shard_size) or ``bin`` (torch.save of the state dict as pytorch_model.bin; both tied
    names kept, sharing storage, exactly as torch.save preserves them).
    """
    paths = []
    for i, step in enumerate(STEPS):
        model = _model(kind, i, dtype)
        model.config.ckptavg_step = step  # tells which input's config.json was copied
        model.generation_config.max_new_tokens = step  # ... and which generation_config.json
        folder = root / f"checkpoint-{step}"
        if how == "bin":
            folder.mkdir(parents=True)
            model.config.save_pretrained(folder)
            model.generation_config.save_pretrained(folder)
            sd = model.state_dict()
            if kind == "gpt2":
                assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()
            torch.save(sd, folder / "pytorch_model.bin")
        elif how == "sharded":
            model.save_pretrained(folder, max_shard_size="20KB")
            assert (folder / "model.safetensors.index.json").is_file()
        else:
            model.save_pretrained(folder)
        _write_side_files(folder, step)
        paths.append(folder)
    return paths


def _saved_state(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint folder holds, read with the reference loaders (not ckptavg)."""
    if (folder / "pytorch_model.bin").exists():
        return dict(torch.load(folder / "pytorch_model.bin", weights_only=True, map_location="cpu"))
    state: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as sf:
            for k in sf.keys():  # noqa: SIM118 (safe_open is not iterable)
                state[k] = sf.get_tensor(k)
    assert state, folder
    return state


def _combine(states: list[dict[str, torch.Tensor]], coeffs: list[float]) -> dict[str, torch.Tensor]:
    """Σ c_i θ_i in float64, cast to each tensor's dtype."""
    out = {}
    for name, ref in states[-1].items():
        acc = sum(c * s[name].double() for c, s in zip(coeffs, states) if c)
        out[name] = acc.to(ref.dtype)
    return out


UNIFORM = [1 / len(STEPS)] * len(STEPS)
# EMA, half-life 100 steps, checkpoints 100 steps apart: beta = 0.5 at every fold
EMA_100 = [0.125, 0.125, 0.25, 0.5]
LAWA_2 = [0.0, 0.0, 0.5, 0.5]


# -- checking an output folder ------------------------------------------------------------------

@pytest.fixture
def hf_log(caplog):
    """transformers' log records (its loader prints a LOAD REPORT for missing/unexpected keys)."""
    transformers.logging.enable_propagation()
    caplog.set_level(logging.WARNING, logger="transformers")
    try:
        yield caplog
    finally:
        transformers.logging.disable_propagation()


def _assert_close_to(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
    assert got.shape == want.shape, name
    if want.dtype == torch.bfloat16:
        # the float32 accumulation cast to bf16 may land one bf16 step away from the float64 mean
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-6, msg=name)
        assert (got != want).float().mean().item() <= 0.02, name
    else:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-7, msg=name)


def _load(out: Path, hf_log):
    hf_log.clear()
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not info["error_msgs"], info
    reports = [r.getMessage() for r in hf_log.records if "LOAD REPORT" in r.getMessage()
               or "newly initialized" in r.getMessage() or "not used" in r.getMessage()]
    assert not reports, reports
    return model.eval()


def _check_model(out: Path, kind: str, dtype: torch.dtype, expected: dict[str, torch.Tensor], hf_log) -> None:
    model = _load(out, hf_log)
    assert model.dtype == dtype
    assert model.config.ckptavg_step == STEPS[-1]
    sd = model.state_dict()
    for name, want in expected.items():
        _assert_close_to(sd[name], want, name)
    if kind == "gpt2":  # tied: one storage holding the averaged embedding
        assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
        _assert_close_to(model.lm_head.weight.detach(), expected["transformer.wte.weight"], "lm_head.weight")
    else:  # untied: two storages, each its own average
        assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
        assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (2, 9, VOCAB) and logits.dtype == dtype
    assert bool(torch.isfinite(logits.float()).all())
    if dtype == torch.float32:  # the same forward as a model holding the expected weights
        ref = (GPT2LMHeadModel if kind == "gpt2" else LlamaForCausalLM)(_config(kind)).eval()
        missing, unexpected = ref.load_state_dict(expected, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}
        ref.tie_weights()
        with torch.no_grad():
            torch.testing.assert_close(logits, ref(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def _check_folder_files(out: Path, newest: Path) -> None:
    names = {p.name for p in out.iterdir()}
    # config, generation config and tokenizer files: byte copies of the NEWEST input's
    for name in ("config.json", "generation_config.json", *TOKENIZER_FILES):
        assert name in names, name
        assert (out / name).read_bytes() == (newest / name).read_bytes(), name
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == STEPS[-1]
    assert json.loads((out / "tokenizer_config.json").read_text())["ckptavg_step"] == STEPS[-1]
    # trainer state is never copied, nor any pickle
    assert not names & set(TRAINER_FILES), names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt"))], names
    assert "README.md" in names and "ckptavg.json" in names
    assert "model.safetensors" in names or "model.safetensors.index.json" in names


# -- tests --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,dtype,how", [
    ("gpt2", torch.float32, "safetensors"),
    ("gpt2", torch.float32, "bin"),
    ("gpt2", torch.bfloat16, "safetensors"),
    ("gpt2", torch.bfloat16, "bin"),
    ("llama", torch.bfloat16, "sharded"),
    ("llama", torch.float32, "bin"),
], ids=["gpt2-fp32-safetensors", "gpt2-fp32-bin", "gpt2-bf16-safetensors", "gpt2-bf16-bin",
        "llama-bf16-sharded", "llama-fp32-bin"])
def test_uniform_average_loads_with_from_pretrained(tmp_path, ckptavg, hf_log, kind, dtype, how):
    paths = _save_run(tmp_path / "run", kind, dtype, how)
    states = [_saved_state(p) for p in paths]
    if how == "bin" and kind == "gpt2":
        assert "lm_head.weight" in states[0] and "transformer.wte.weight" in states[0]
    out = tmp_path / "avg"
    r = ckptavg("average", *reversed(paths), "-o", out)  # argument order must not matter: steps decide
    assert r.code == 0, r
    _check_folder_files(out, paths[-1])

    # the written weights keep the model dtype, and the tied pair is stored once
    stored: dict[str, str] = {}
    for f in out.glob("*.safetensors"):
        with safe_open(f, "pt") as sf:
            assert sf.metadata().get("format") == "pt"
            for k in sf.keys():  # noqa: SIM118 (safe_open is not iterable)
                stored[k] = sf.get_slice(k).get_dtype()
    assert set(stored.values()) == {"BF16" if dtype == torch.bfloat16 else "F32"}, stored
    if kind == "gpt2":
        assert "transformer.wte.weight" in stored and "lm_head.weight" not in stored
    else:
        assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(stored)
    cfg = json.loads((out / "config.json").read_text())
    if how != "bin":  # save_pretrained records the dtype (config.save_pretrained alone does not)
        assert cfg.get("dtype", cfg.get("torch_dtype")) == str(dtype).removeprefix("torch.")

    expected = _combine(states, UNIFORM)
    if how == "bin" and kind == "gpt2":
        prov = json.loads((out / "ckptavg.json").read_text())
        assert prov["tied_weights"] == {"lm_head.weight": "transformer.wte.weight"}
        expected.pop("lm_head.weight")  # checked through the tie
    _check_model(out, kind, dtype, expected, hf_log)

    prov = json.loads((out / "ckptavg.json").read_text())
    assert prov["steps"] == STEPS and prov["method"] == "uniform"
    assert [i["path"] for i in prov["inputs"]] == [str(p) for p in paths]


@pytest.mark.parametrize("how", ["safetensors", "bin"])
def test_ema_and_lawa_in_one_read_load(tmp_path, ckptavg, hf_log, how):
    paths = _save_run(tmp_path / "run", "gpt2", torch.float32, how)
    states = [_saved_state(p) for p in paths]
    out = tmp_path / "out"
    r = ckptavg("average", *paths, "--method", "ema:100", "--method", "lawa:2", "-o", out)
    assert r.code == 0, r
    assert sorted(p.name for p in out.iterdir()) == ["ema-100", "lawa-2"]
    for name, coeffs in (("ema-100", EMA_100), ("lawa-2", LAWA_2)):
        folder = out / name
        _check_folder_files(folder, paths[-1])
        expected = _combine(states, coeffs)
        expected.pop("lm_head.weight", None)
        _check_model(folder, "gpt2", torch.float32, expected, hf_log)
        prov = json.loads((folder / "ckptavg.json").read_text())
        assert prov["method"] == name.split("-")[0]
        assert prov["steps"] == STEPS  # LAWA reads every checkpoint, its window keeps the last two
    ema = json.loads((out / "ema-100" / "ckptavg.json").read_text())
    assert ema["options"]["half_life"] == 100
    lawa = json.loads((out / "lawa-2" / "ckptavg.json").read_text())
    assert lawa["options"] == {"window": 2}
    # the two averages really differ (the checkpoints drift)
    a = _saved_state(out / "ema-100")["transformer.h.0.mlp.c_fc.weight"]
    b = _saved_state(out / "lawa-2")["transformer.h.0.mlp.c_fc.weight"]
    assert not torch.equal(a, b)


def test_bf16_mixed_with_fp32_norms_keeps_each_dtype(tmp_path, ckptavg, hf_log):
    """A bf16 model whose norms were kept in fp32 (mixed precision): each tensor keeps its dtype."""
    paths = []
    for i, step in enumerate(STEPS[:3]):
        model = _model("llama", i, torch.bfloat16)
        for mod in model.modules():
            if type(mod).__name__.endswith("RMSNorm"):
                mod.float()
        model.config.ckptavg_step = step
        folder = tmp_path / "run" / f"checkpoint-{step}"
        model.save_pretrained(folder)
        paths.append(folder)
    states = [_saved_state(p) for p in paths]
    dtypes = {k: v.dtype for k, v in states[0].items()}
    assert set(dtypes.values()) == {torch.bfloat16, torch.float32}
    out = tmp_path / "avg"
    r = ckptavg("average", *paths, "-o", out)
    assert r.code == 0, r
    got = _saved_state(out)
    assert {k: v.dtype for k, v in got.items()} == dtypes
    expected = _combine(states, [1 / 3] * 3)
    for k in expected:
        _assert_close_to(got[k], expected[k], k)
    model = _load(out, hf_log)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
