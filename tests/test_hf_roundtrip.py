"""A tiny real transformers model, saved by ``save_pretrained`` at several steps, averaged by the CLI,
loads back with ``from_pretrained`` and runs. Built from a config: nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel  # noqa: E402

STEPS = [100, 200, 300]


def _model(seed: int, dtype=torch.float32) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=32, tie_word_embeddings=True)
    model = GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a "training step": every parameter moves
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model.to(dtype)


def _write_trainer_files(folder: Path, step: int) -> None:
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32, "step": step}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<eos>"}))
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "WordLevel", "vocab": {}}}))
    torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")
    torch.save({"cpu_rng": torch.get_rng_state()}, folder / "rng_state.pth")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))


def _save_run(root: Path, dtype=torch.float32, **save_kw) -> tuple[list[Path], list[dict[str, torch.Tensor]]]:
    paths, states = [], []
    for i, step in enumerate(STEPS):
        model = _model(i, dtype)
        model.config.ckptavg_test_step = step  # tells which input's config was copied
        folder = root / f"checkpoint-{step}"
        model.save_pretrained(folder, **save_kw)
        _write_trainer_files(folder, step)
        paths.append(folder)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return paths, states


def _expected_mean(states, name):
    return (sum(s[name].double() for s in states) / len(states)).to(states[0][name].dtype)


def _check_loaded(out: Path, states, dtype):
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, dtype=dtype)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.config.ckptavg_test_step == STEPS[-1]  # config.json from the newest input
    # tied weights survive: one storage for the embedding and the head, holding the average
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    sd = model.state_dict()
    for name in ("transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.ln_f.bias"):
        torch.testing.assert_close(sd[name], _expected_mean(states, name), rtol=0, atol=float(torch.finfo(dtype).eps) * 4)
    assert sd["transformer.wte.weight"].dtype == dtype
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (2, 8, 97) and bool(torch.isfinite(logits).all())
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_pretrained_average_from_pretrained(tmp_path, ckptavg, dtype):
    paths, states = _save_run(tmp_path / "run", dtype)
    out = tmp_path / "avg"
    r = ckptavg("average", *paths, "-o", out)
    assert r.code == 0, r
    _check_loaded(out, states, dtype)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "README.md", "ckptavg.json", "model.safetensors"} <= files
    assert not files & {"optimizer.pt", "rng_state.pth", "trainer_state.json"}
    assert json.loads((out / "tokenizer_config.json").read_text())["step"] == STEPS[-1]
    prov = json.loads((out / "ckptavg.json").read_text())
    assert prov["method"] == "uniform" and prov["steps"] == STEPS
    assert all(len(i["fingerprint"]) == 32 for i in prov["inputs"])
    card = (out / "README.md").read_text()
    assert "uniform" in card and "100, 200, 300" in card


def test_several_averages_load(tmp_path, ckptavg):
    paths, states = _save_run(tmp_path / "run")
    r = ckptavg("average", *paths, "--method", "ema:100", "--method", "lawa:2", "-o", tmp_path / "out")
    assert r.code == 0, r
    for name in ("ema-100", "lawa-2"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / name)
        assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    lawa = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "lawa-2").state_dict()
    torch.testing.assert_close(lawa["transformer.h.1.mlp.c_fc.weight"],
                               _expected_mean(states[-2:], "transformer.h.1.mlp.c_fc.weight"), rtol=0, atol=1e-6)


def test_pickled_tied_weights_are_written_once(tmp_path, ckptavg):
    """pytorch_model.bin holding lm_head.weight and wte.weight as one storage (as torch.save keeps it)."""
    paths, states = [], []
    for i, step in enumerate(STEPS):
        model = _model(i)
        model.config.ckptavg_test_step = step
        folder = tmp_path / "run" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        model.config.save_pretrained(folder)
        sd = model.state_dict()
        assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()
        torch.save(sd, folder / "pytorch_model.bin")
        paths.append(folder)
        states.append({k: v.clone() for k, v in sd.items()})
    out = tmp_path / "avg"
    r = ckptavg("average", *paths, "-o", out)
    assert r.code == 0, r
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        tied = json.loads(f.metadata()["ckptavg.tied"])
    assert ("lm_head.weight" in keys) != ("transformer.wte.weight" in keys)  # stored once
    assert set(tied.items()) <= {("lm_head.weight", "transformer.wte.weight"), ("transformer.wte.weight", "lm_head.weight")}
    _check_loaded(out, states, torch.float32)


def test_sharded_input_and_independent_output_sharding(tmp_path, ckptavg):
    # input shards of 40 kB split the model's tensors over several files
    paths, states = _save_run(tmp_path / "run", max_shard_size="40KB")
    shards = sorted(paths[0].glob("model-*.safetensors"))
    assert len(shards) >= 3 and (paths[0] / "model.safetensors.index.json").exists()
    small = tmp_path / "small"
    r = ckptavg("average", *paths, "--shard-size", "100KB", "-o", small)
    assert r.code == 0, r
    out_shards = sorted(small.glob("model-*.safetensors"))
    assert len(out_shards) >= 2 and len(out_shards) != len(shards)
    index = json.loads((small / "model.safetensors.index.json").read_text())
    total = 0
    names = set()
    for f in out_shards:
        with safe_open(f, "pt") as sf:
            for k in sf.keys():
                t = sf.get_tensor(k)
                total += t.numel() * t.element_size()
                names.add(k)
                assert index["weight_map"][k] == f.name
    assert names == set(index["weight_map"]) and index["metadata"]["total_size"] == total
    for f in out_shards:  # no shard over the limit unless a single tensor is bigger
        with safe_open(f, "pt") as sf:
            sizes = [sf.get_slice(k).get_shape() for k in sf.keys()]
        assert len(sizes) == 1 or f.stat().st_size <= 100_000 + 4096
    big = tmp_path / "big"
    r = ckptavg("average", *paths, "--shard-size", "1GB", "-o", big)
    assert r.code == 0, r
    assert [p.name for p in big.glob("*.safetensors")] == ["model.safetensors"]
    a = _check_loaded(small, states, torch.float32).state_dict()
    b = _check_loaded(big, states, torch.float32).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
