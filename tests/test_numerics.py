"""Every method against an independent float64 reference, and against torch's AveragedModel.

References are computed here from the formulas in DESIGN.md, in float64, on fully
loaded tensors — never by calling ckptavg's own math.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_state, write_checkpoint
from safetensors.torch import load_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, get_swa_multi_avg_fn

from ckptavg.averaging.methods import LAWA, FoldInfo

REGULAR = list(range(100, 2300, 100))  # 22 checkpoints
IRREGULAR = [3, 10, 11, 40, 41, 42, 90, 200, 201, 260, 400, 401, 402, 700, 703, 900, 1000, 1500, 1510, 1600, 2000, 2100]


def _states(steps, dtype):
    return [tiny_state(i, dtype=dtype, scale=1 + 0.05 * i) for i in range(len(steps))]


def _write(tmp_path, steps, states, fmt):
    paths = []
    for s, st in zip(steps, states):
        name = f"step_{s}.pt" if fmt == "pt" else f"checkpoint-{s}"
        paths.append(write_checkpoint(tmp_path / "run" / name, st, fmt))
    return paths


def _load(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def ref_uniform(states, name, weights=None):
    w = weights or [1.0] * len(states)
    return sum(wi * s[name].double() for wi, s in zip(w, states)) / sum(w)


def ref_ema(states, steps, name, h):
    ema = states[0][name].double()
    for i in range(1, len(states)):
        beta = 0.5 ** ((steps[i] - steps[i - 1]) / h)
        ema = beta * ema + (1 - beta) * states[i][name].double()
    return ema


def ref_lawa(states, name, k):
    window = states[-k:]
    return sum(s[name].double() for s in window) / len(window)


def ref_swa(states, steps, name, start):
    chosen = [s for s, st in zip(states, steps) if st >= start]
    return sum(s[name].double() for s in chosen) / len(chosen)


def assert_matches(got: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype):
    """Equal to the float64 reference rounded to the output dtype, within one ulp of that dtype
    (float32 accumulation may round the other way at a tie); fp32 outputs within float32 tolerance."""
    assert got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), ref64, rtol=2e-6, atol=2e-6)
        return
    expected = ref64.to(dtype)
    eps = torch.finfo(dtype).eps
    diff = (got.double() - expected.double()).abs()
    bound = expected.double().abs().clamp_min(1e-3) * eps * 1.01 + 1e-6
    assert bool((diff <= bound).all()), f"max diff {diff.max().item()} exceeds one {dtype} ulp"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("steps", [REGULAR, IRREGULAR], ids=["regular", "irregular"])
@pytest.mark.parametrize("fmt", ["sharded", "pt"])  # tensor-major and checkpoint-major schedules
def test_methods_match_float64_reference(tmp_path, ckptavg, dtype, steps, fmt):
    states = _states(steps, dtype)
    paths = _write(tmp_path, steps, states, fmt)
    out = tmp_path / "out"
    r = ckptavg("average", *paths, "--method", "uniform", "--method", "ema:250", "--method", "lawa:4",
                "--method", "swa:900", "-o", out)
    assert r.code == 0, r
    got = {name: _load(out / name) for name in ("uniform", "ema-250", "lawa-4", "swa-900")}
    for tensor in states[0]:
        if not states[0][tensor].is_floating_point():
            for avg in got.values():  # integer buffers take the newest value
                assert torch.equal(avg[tensor], states[-1][tensor])
            continue
        src = states[0][tensor].dtype
        assert_matches(got["uniform"][tensor], ref_uniform(states, tensor), src)
        assert_matches(got["ema-250"][tensor], ref_ema(states, steps, tensor, 250.0), src)
        assert_matches(got["lawa-4"][tensor], ref_lawa(states, tensor, 4), src)
        assert_matches(got["swa-900"][tensor], ref_swa(states, steps, tensor, 900), src)


def test_weighted_mean_and_decay(tmp_path, ckptavg):
    steps = [10, 20, 30, 40]
    states = _states(steps, torch.float32)
    paths = _write(tmp_path, steps, states, "safetensors")
    r = ckptavg("average", *paths, "--weights", "0.1,0.2,0.3,0.4", "-o", tmp_path / "w")
    assert r.code == 0, r
    got = _load(tmp_path / "w")
    assert_matches(got["embed.weight"], ref_uniform(states, "embed.weight", [0.1, 0.2, 0.3, 0.4]), torch.float32)
    # per-step decay d is the half-life ln 0.5 / ln d
    d = 0.97
    r = ckptavg("average", *paths, "--method", "ema", "--decay", str(d), "-o", tmp_path / "d")
    assert r.code == 0, r
    h = math.log(0.5) / math.log(d)
    assert_matches(_load(tmp_path / "d")["embed.weight"], ref_ema(states, steps, "embed.weight", h), torch.float32)


def test_lawa_has_no_drift_over_many_folds():
    """300 folds of large-magnitude values: the window mean stays exact to float32 level."""
    k = 7
    lawa = LAWA(k)
    slot = lawa.new_slot((4096,), torch.float32, torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    xs = []
    worst = 0.0
    for i in range(300):
        x = (torch.randn(4096, generator=g) * 1e3 + 1e4 * math.sin(i / 10)).float()
        xs.append(x)
        info = FoldInfo(ident=i, step=i)
        plan = lawa.prepare(slot, info)
        old = xs[plan.old] if plan.old is not None else None
        lawa.apply(slot, plan, x, old, 0, 4096, torch.empty(4096))
        lawa.commit(slot, plan, info)
        ref = torch.stack([t.double() for t in xs[-k:]]).mean(0)
        rel = ((lawa.value(slot).double() - ref).abs().max() / ref.abs().max()).item()
        worst = max(worst, rel)
    # k-1 add/subtract pairs at most separate S from an exact sum: a few float32 ulps, never growing
    assert worst < 20 * torch.finfo(torch.float32).eps, worst


def test_lawa_reads_are_constant_per_fold():
    """Each fold asks for at most one earlier checkpoint (the one leaving the window)."""
    lawa = LAWA(5)
    slot = lawa.new_slot((3,), torch.float32, torch.float32, torch.device("cpu"))
    asked = []
    for i in range(40):
        plan = lawa.prepare(slot, FoldInfo(ident=i, step=i))
        asked.append(plan.old)
        old = torch.full((3,), float(plan.old)) if plan.old is not None else None
        lawa.apply(slot, plan, torch.full((3,), float(i)), old, 0, 3, torch.empty(3))
        lawa.commit(slot, plan, FoldInfo(ident=i, step=i))
    assert asked[:5] == [None] * 5 and asked[5:] == list(range(35))
    assert lawa.value(slot).tolist() == [37.0] * 3


class _Net(torch.nn.Module):
    def __init__(self, state):
        super().__init__()
        self.w = torch.nn.Parameter(state["embed.weight"].clone())
        self.b = torch.nn.Parameter(state["layers.0.mlp.bias"].clone())

    def load(self, state):
        with torch.no_grad():
            self.w.copy_(state["embed.weight"])
            self.b.copy_(state["layers.0.mlp.bias"])


@pytest.mark.parametrize("method", ["uniform", "ema"])
def test_matches_torch_averaged_model(tmp_path, ckptavg, method):
    steps = list(range(50, 1250, 50))  # 24 checkpoints, regular interval 50
    states = _states(steps, torch.float32)
    paths = _write(tmp_path, steps, states, "safetensors")
    h = 300.0
    net = _Net(states[0])
    if method == "uniform":
        avg_model = AveragedModel(net, multi_avg_fn=get_swa_multi_avg_fn())
        args = ["--method", "uniform"]
    else:
        avg_model = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.5 ** (50 / h)))
        args = ["--method", f"ema:{h:g}"]
    for st in states:
        net.load(st)
        avg_model.update_parameters(net)
    r = ckptavg("average", *paths, *args, "-o", tmp_path / "out")
    assert r.code == 0, r
    got = _load(tmp_path / "out")
    theirs = dict(avg_model.module.named_parameters())
    torch.testing.assert_close(got["embed.weight"], theirs["w"].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["layers.0.mlp.bias"], theirs["b"].detach(), rtol=1e-5, atol=1e-6)


def test_rules_latest_exclude_and_half_life(tmp_path, ckptavg):
    steps = [100, 200, 300, 400]
    states = _states(steps, torch.float32)
    paths = _write(tmp_path, steps, states, "safetensors")
    r = ckptavg("average", *paths, "--rule", "layers.0.norm.*=latest", "--rule", "layers.0.mlp.*=exclude",
                "--rule", "layers.0.attn.*=half-life:50", "-o", tmp_path / "out")
    assert r.code == 0, r
    got = _load(tmp_path / "out")
    assert "layers.0.mlp.bias" not in got
    assert torch.equal(got["layers.0.norm.weight"], states[-1]["layers.0.norm.weight"])
    assert_matches(got["layers.0.attn.weight"], ref_ema(states, steps, "layers.0.attn.weight", 50.0), torch.float32)
    assert_matches(got["embed.weight"], ref_uniform(states, "embed.weight"), torch.float32)


def test_growth_new_tensor_starts_fresh_and_shape_change_policies(tmp_path, ckptavg):
    steps = [100, 200, 300, 400, 500]
    states = _states(steps, torch.float32)
    for i in range(2):
        del states[i]["layers.0.mlp.bias"]  # appears from the third checkpoint on
    paths = _write(tmp_path, steps, states, "safetensors")
    r = ckptavg("average", *paths, "--method", "lawa:2", "--method", "swa:0", "--method", "ema:100", "-o", tmp_path / "g")
    assert r.code == 0, r
    grown = states[2:]
    assert_matches(_load(tmp_path / "g" / "swa-0")["layers.0.mlp.bias"], ref_uniform(grown, "layers.0.mlp.bias"), torch.float32)
    assert_matches(_load(tmp_path / "g" / "lawa-2")["layers.0.mlp.bias"], ref_lawa(grown, "layers.0.mlp.bias", 2), torch.float32)
    assert_matches(_load(tmp_path / "g" / "ema-100")["layers.0.mlp.bias"],
                   ref_ema(grown, steps[2:], "layers.0.mlp.bias", 100.0), torch.float32)

    # a shape change: error by default (nothing written), restart with --on-shape-change reset
    states2 = _states(steps, torch.float32)
    for i in (3, 4):
        states2[i]["embed.weight"] = torch.randn(80, 16, generator=torch.Generator().manual_seed(i))
    paths2 = _write(tmp_path / "b", steps, states2, "safetensors")
    r = ckptavg("average", *paths2, "-o", tmp_path / "err")
    assert r.code == 1 and "embed.weight" in r.err and "checkpoint-400" in r.err, r
    assert not (tmp_path / "err").exists()
    r = ckptavg("average", *paths2, "--on-shape-change", "reset", "-o", tmp_path / "reset")
    assert r.code == 0, r
    got = _load(tmp_path / "reset")
    assert got["embed.weight"].shape == (80, 16)
    assert_matches(got["embed.weight"], ref_uniform(states2[3:], "embed.weight"), torch.float32)
    assert_matches(got["layers.0.attn.weight"], ref_uniform(states2, "layers.0.attn.weight"), torch.float32)


def test_schedules_chunking_and_single_vs_multi_are_bitwise_identical(tmp_path, ckptavg):
    from ckptavg import Engine, open_checkpoint
    from ckptavg.oneshot import AverageSpec, average_checkpoints, build_averages

    steps = [100, 150, 300, 320, 500, 800]
    states = _states(steps, torch.bfloat16)
    st_paths = _write(tmp_path / "st", steps, states, "sharded")
    pt_paths = _write(tmp_path / "pt", steps, states, "pt")
    specs = [AverageSpec("ema", {"half_life": 120.0}), AverageSpec("lawa", {"window": 3}), AverageSpec("swa", {"start_step": 300})]
    results = {}
    for label, paths, chunk in (("st", st_paths, 1 << 20), ("pt", pt_paths, 1 << 20), ("st-chunk7", st_paths, 7)):
        with Engine(device="cpu", chunk_elems=chunk) as engine:
            averages = build_averages(specs, device=engine.device)
            average_checkpoints([open_checkpoint(p) for p in paths], averages, tmp_path / label, engine=engine)
        results[label] = {a: _load(tmp_path / label / a) for a in ("ema-120", "lawa-3", "swa-300")}
    # each method alone through the CLI
    for spec in ("ema:120", "lawa:3", "swa:300"):
        r = ckptavg("average", *st_paths, "--method", spec, "-o", tmp_path / f"alone-{spec}")
        assert r.code == 0, r
        results.setdefault("alone", {})[spec.replace(":", "-")] = _load(tmp_path / f"alone-{spec}")
    base = results["st"]
    for label, res in results.items():
        for avg, tensors in res.items():
            assert tensors.keys() == base[avg].keys()
            for k in tensors:
                assert torch.equal(tensors[k], base[avg][k]), (label, avg, k)


def test_float64_accumulation(tmp_path, ckptavg):
    steps = [1, 2, 3]
    states = _states(steps, torch.float32)
    paths = _write(tmp_path, steps, states, "safetensors")
    r = ckptavg("average", *paths, "--accum-dtype", "float64", "-o", tmp_path / "o")
    assert r.code == 0, r
    got = _load(tmp_path / "o")["embed.weight"]
    assert torch.equal(got, ref_uniform(states, "embed.weight").float())


def test_steps_required_given_sorted_and_unique(tmp_path, ckptavg):
    states = _states([0, 1, 2], torch.float32)
    paths = [write_checkpoint(tmp_path / f"{n}.safetensors", st, "safetensors-file") for n, st in zip("abc", states)]
    r = ckptavg("average", *paths, "--method", "ema:10", "-o", tmp_path / "x")
    assert r.code == 2 and "step" in r.err and "a.safetensors" in r.err, r
    assert not (tmp_path / "x").exists()
    # --steps supplies them; given out of order, inputs are folded in step order
    r = ckptavg("average", paths[2], paths[0], paths[1], "--steps", "30,10,20", "--method", "ema:10", "-o", tmp_path / "y")
    assert r.code == 0, r
    assert_matches(_load(tmp_path / "y")["embed.weight"], ref_ema(states, [10, 20, 30], "embed.weight", 10.0), torch.float32)
    r = ckptavg("average", *paths, "--steps", "10,10,20", "-o", tmp_path / "z")
    assert r.code == 2 and "same step" in r.err, r
