"""Power-function EMA (EDM2) as a ckptavg method: its math against an independent float64 implementation of
EDM2's per-step update and against ``ema_pytorch``'s ``KarrasEMA`` fed a real training loop; the one-shot,
the daemon (killed mid-run and resumed) and their bitwise agreement; bad options in every dialect."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import run_cli_subprocess
from safetensors.torch import load_file, save_file
from test_daemon import ckptavg_command, status, stop, wait_for

from ckptavg.averaging.methods import METHODS, FoldInfo, Method, PowerEMA, register, unregister
from ckptavg.averaging.methods.power_ema import SIGMA_REL_MAX, gamma_from_sigma_rel, sigma_rel_from_gamma
from ckptavg.cli.main import cli
from ckptavg.daemon.config import load_config
from ckptavg.errors import UsageError

# irregular: a first checkpoint mid-way, neighbours one step apart, long gaps
STEPS = (7, 20, 21, 60, 150, 151, 400, 1000, 1003, 1200)
SIGMA = 0.1


def edm2_gamma(sigma_rel: float) -> float:
    """EDM2's ``std_to_exp`` (training/phema.py), written out: the largest real root of its cubic."""
    t = sigma_rel ** -2
    return float(np.roots([1, 7, 16 - t, 12 - t]).real.max())


def edm2_reference(steps, states, gamma: float) -> dict[str, torch.Tensor]:
    """EDM2's per-step power EMA in float64, step by step: ``β(t) = (1 − 1/t)^(γ+1)``, ``ema_t = β ema_{t−1} +
    (1 − β) θ_t`` for every ``t = 1 … t_n``, with ``θ_t`` the checkpoint of its interval (``t_{k−1} < t ≤ t_k``)."""
    names = [n for n, v in states[0].items() if v.is_floating_point()]
    ema = {n: torch.zeros_like(states[0][n], dtype=torch.float64) for n in names}
    k = 0
    for t in range(1, steps[-1] + 1):
        while steps[k] < t:
            k += 1
        beta = (1.0 - 1.0 / t) ** (gamma + 1.0)  # β(1) = 0: the first step takes θ whole
        for n in names:
            ema[n] = beta * ema[n] + (1.0 - beta) * states[k][n].double()
    return ema


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(64, 16, generator=g),
        "layers.0.attn.weight": torch.randn(16, 16, generator=g).to(torch.bfloat16),
        "layers.0.norm.weight": (1 + 0.1 * torch.randn(16, generator=g)).double(),
        "layers.0.num_batches_tracked": torch.tensor(seed, dtype=torch.int64),
    }


def write_checkpoint(run: Path, step: int, state: dict[str, torch.Tensor]) -> Path:
    """An HF-Trainer-like checkpoint folder, renamed into place whole (trainer_state.json inside)."""
    final, tmp = run / f"checkpoint-{step}", run / f"tmp-checkpoint-{step}"
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps({"model_type": "test", "step": step}))
    (tmp / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    os.rename(tmp, final)
    return final


def _invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False, standalone_mode=False)


def _average(run: Path, out: Path, *args: object) -> dict[str, torch.Tensor]:
    _invoke("--log-level", "warning", "average", run, "--device", "cpu", *args, "-o", out)
    return load_file(str(out / "model.safetensors"))


# -- γ from σ_rel -------------------------------------------------------------------------------------


def test_gamma_from_sigma_rel_round_trips_through_edm2s_closed_form():
    """σ_rel → γ (bisection) → σ_rel (EDM2's exp_to_std) is the identity; γ → σ_rel → γ too; and γ is the root
    of EDM2's cubic, as their std_to_exp (numpy.roots) finds it, with the paper's values (σ_rel 0.10 → 6.94)."""
    for s in [1e-6, 1e-4, 0.001, 0.01, 0.05, 0.1, 0.15, 0.2, 0.25, 0.28, 0.2886, SIGMA_REL_MAX]:
        g = gamma_from_sigma_rel(s)
        assert g >= 0
        assert sigma_rel_from_gamma(g) == pytest.approx(s, rel=1e-14, abs=0)
        # the root of γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²), relative to the size of its terms
        t = s ** -2
        assert abs(g ** 3 + 7 * g ** 2 + (16 - t) * g + (12 - t)) <= 1e-12 * (g ** 3 + 7 * g ** 2 + t * (g + 1) + 16 * g + 12)
        assert g == pytest.approx(edm2_gamma(s), rel=1e-9, abs=1e-9)
    for g in [0.0, 0.5, 1.0, 3.0, 6.94, 16.97, 100.0, 1e4, 1e8]:
        assert gamma_from_sigma_rel(sigma_rel_from_gamma(g)) == pytest.approx(g, rel=1e-12, abs=1e-12)
    assert gamma_from_sigma_rel(0.10) == pytest.approx(6.94, abs=0.005)  # EDM2, section 3.1
    assert gamma_from_sigma_rel(0.05) == pytest.approx(16.97, abs=0.005)
    assert gamma_from_sigma_rel(SIGMA_REL_MAX) == 0.0  # γ = 0: the plain mean of every step
    # σ_rel falls strictly with γ: the map is one to one on (0, 1/√12] ↔ [0, ∞)
    grid = [gamma_from_sigma_rel(s) for s in np.linspace(0.001, SIGMA_REL_MAX, 200)]
    assert all(a > b for a, b in itertools.pairwise(grid))


def test_the_fold_coefficient_is_the_product_of_edm2s_per_step_betas():
    """``(t_{k−1}/t_k)^(γ+1) = Π_{t=t_{k−1}+1}^{t_k} (1 − 1/t)^(γ+1)`` (float64, to rounding)."""
    m = PowerEMA(sigma_rel=SIGMA)
    for last, step in [(0, 1), (0, 9), (1, 2), (7, 20), (20, 21), (151, 400), (1003, 2500), (99_000, 100_000)]:
        prod = 1.0
        for t in range(last + 1, step + 1):
            prod *= (1.0 - 1.0 / t) ** (m.gamma + 1.0)
        assert m.coefficient(last, step) == pytest.approx(prod, rel=1e-10, abs=1e-300)


# -- against EDM2's per-step formulas: one-shot, daemon, daemon killed and resumed ----------------------


def _start(run: Path, out: Path, *how: str, config: Path | None = None) -> subprocess.Popen:
    args = (["watch", "--config", str(config)] if config else
            ["watch", str(run), "-o", str(out), *how, "--settle", "0.1", "--poll-interval", "0.2", "--device", "cpu"])
    return subprocess.Popen([*ckptavg_command(None), *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _folded_to(out: Path, daemon: subprocess.Popen, step: int):
    return lambda: (status(out).get("pid") == daemon.pid and status(out).get("last_folded_step") == step
                    and status(out).get("state") == "watching")


@pytest.mark.slow
def test_matches_edm2_per_step_in_one_shot_and_daemon_killed_mid_run(tmp_path):
    """docs/FAULTS.md row 100: a daemon killed with SIGKILL mid-run, while the trainer goes on saving, resumes
    from its committed state: its power-EMA is bit-identical to an uninterrupted daemon's and to the one-shot's,
    and all equal EDM2's step-by-step power EMA (float64, every step of every interval) on real safetensors
    checkpoints at irregular steps.

    Tolerance: float32 accumulation over 10 folds, each two correctly rounded ops (≤ 2⁻²⁴ relative each, on
    values |x| ≲ 4: ≲ 5e-6 in all), against a float64 reference: rtol 1e-5 / atol 2e-6 for fp32 and fp64 tensors; bf16
    tensors are compared at bf16's own resolution (one rounding of the result: 2⁻⁸ relative). With
    ``--accum-dtype float64`` the fp64 tensor agrees to 1e-12."""
    run = tmp_path / "run"
    states = [_state(i) for i in range(len(STEPS))]
    gamma = edm2_gamma(SIGMA)
    want = edm2_reference(STEPS, states, gamma)

    # daemon A, uninterrupted, configured by TOML; daemon B by the --power-ema flag, killed half-way
    out_a, out_b = tmp_path / "avg-a", tmp_path / "avg-b"
    config = tmp_path / "a.toml"
    config.write_text(textwrap.dedent(f"""\
        watch = "{run}"
        output = "{out_a}"
        device = "cpu"
        settle = 0.1
        poll_interval = 0.2
        [[average]]
        method = "power-ema"
        sigma_rel = {SIGMA}
        """))
    run.mkdir()
    a = _start(run, out_a, config=config)
    b = _start(run, out_b, "--power-ema", str(SIGMA))
    half = len(STEPS) // 2
    try:
        for i, step in enumerate(STEPS[:half]):
            write_checkpoint(run, step, states[i])
        assert wait_for(_folded_to(out_b, b, STEPS[half - 1]), 60), status(out_b)
        b.kill()  # SIGKILL: no chance to persist anything more
        b.wait()
        for i, step in enumerate(STEPS[half:], half):
            write_checkpoint(run, step, states[i])
        b = _start(run, out_b, "--power-ema", str(SIGMA))
        assert wait_for(_folded_to(out_b, b, STEPS[-1]), 60), status(out_b)
        assert wait_for(_folded_to(out_a, a, STEPS[-1]), 60), status(out_a)
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                code, err = stop(proc)
                assert code == 0, err
    assert status(out_a)["averages"]["power-ema-0.1"]["folded"] == len(STEPS)
    assert status(out_b)["averages"]["power-ema-0.1"]["folded"] == len(STEPS)
    assert status(out_a)["averages"]["power-ema-0.1"]["options"]["gamma"] == pytest.approx(gamma, rel=1e-12)

    one = _average(run, tmp_path / "one", "--method", f"power-ema:{SIGMA}")
    got_a = load_file(str(out_a / "power-ema-0.1" / "model.safetensors"))
    got_b = load_file(str(out_b / "power-ema-0.1" / "model.safetensors"))
    assert one.keys() == got_a.keys() == got_b.keys() == set(states[0])
    for name in one:
        assert one[name].dtype == states[0][name].dtype
        assert torch.equal(got_a[name], one[name]) and torch.equal(got_b[name], one[name]), name
    assert torch.equal(one["layers.0.num_batches_tracked"], states[-1]["layers.0.num_batches_tracked"])
    for name, ref in want.items():
        if one[name].dtype == torch.bfloat16:
            torch.testing.assert_close(one[name], ref.to(torch.bfloat16), rtol=2 ** -8, atol=2 ** -8)
        else:
            torch.testing.assert_close(one[name].double(), ref, rtol=1e-5, atol=2e-6)
    # float64 accumulation: the fp64 tensor matches EDM2's per-step recursion to float64 rounding
    exact = _average(run, tmp_path / "f64", "--method", "power-ema", "--sigma-rel", SIGMA, "--accum-dtype", "float64")
    torch.testing.assert_close(exact["layers.0.norm.weight"], want["layers.0.norm.weight"], rtol=1e-12, atol=1e-12)
    # a real average: the newest checkpoint weighs 1 − (1003/1200)^(γ+1) ≈ 0.76, far from all of it
    assert (one["embed.weight"] - states[-1]["embed.weight"]).abs().max() > 0.1


@pytest.mark.slow
def test_one_shot_last_n_and_gamma_option(tmp_path):
    """``--last N`` starts the profile at the first of the N (it stands for every step before it); ``--gamma``
    gives the same average as the σ_rel it corresponds to; the README's example command runs."""
    run = tmp_path / "run"
    states = [_state(i) for i in range(len(STEPS))]
    for i, step in enumerate(STEPS):
        write_checkpoint(run, step, states[i])
    gamma = edm2_gamma(0.05)
    last4 = _average(run, tmp_path / "last", "--last", 4, "--method", "power-ema:0.05", "--accum-dtype", "float64")
    ref = edm2_reference(STEPS[-4:], states[-4:], gamma)
    torch.testing.assert_close(last4["layers.0.norm.weight"], ref["layers.0.norm.weight"], rtol=1e-12, atol=1e-12)
    by_gamma = _average(run, tmp_path / "g", "--method", "power-ema", "--gamma", gamma_from_sigma_rel(0.05))
    by_sigma = _average(run, tmp_path / "s", "--method", "power-ema:0.05")
    for name in by_sigma:
        assert torch.equal(by_gamma[name], by_sigma[name]), name
    card = json.loads((tmp_path / "g" / "ckptavg.json").read_text())
    assert card["name"] == "power-ema-gamma-16.9722" and card["options"]["gamma"] == gamma_from_sigma_rel(0.05)


# -- against ema_pytorch's KarrasEMA on a real training loop -------------------------------------------


@pytest.mark.slow
def test_matches_ema_pytorch_karras_ema_on_a_training_loop(tmp_path):
    """A tiny real training loop updates ``ema_pytorch.KarrasEMA`` (EDM2's power EMA) after every optimizer step
    and saves a checkpoint after every step; ckptavg over those checkpoints equals KarrasEMA's model.

    ``KarrasEMA`` defaults to ``update_every=100``: set to 1, it updates at every call. Its step counter is
    incremented before β is read, so its n-th update uses ``β = (1 − 1/(n+1))^(γ+1)``, EDM2's ``β(t)`` at
    ``t = n + 1`` (and its first update copies the model); so the model after the n-th update is saved as
    ``checkpoint-<n+1>``: ckptavg's fold of step n+1 then applies ``(n/(n+1))^(γ+1)``, the same β.

    Tolerance: KarrasEMA accumulates in float32 with ``lerp_`` (≤ 2 roundings per step, 60 steps); ckptavg here
    in float64 (exact to ~1e-15), cast to float32 once. 60 × 2 × 2⁻²⁴ ≈ 7e-6 relative is the worst-case drift;
    rtol 1e-5, atol 1e-6 on weights of size ≲ 1.3 (measured: 6e-8 with float64 accumulation, 2.4e-7 with
    float32). With the wrong step alignment (``checkpoint-<n>``) the difference is ~1e-3 (checked), so the
    comparison can fail."""
    ema_pytorch = pytest.importorskip("ema_pytorch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.LayerNorm(32), torch.nn.GELU(), torch.nn.Linear(32, 1))
    ema = ema_pytorch.KarrasEMA(model, sigma_rel=SIGMA, update_every=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    x = torch.randn(256, 8)
    y = (x[:, :1] * 2 - x[:, 1:2]).tanh()
    run, shifted = tmp_path / "run", tmp_path / "shifted"
    n_steps = 60
    for n in range(1, n_steps + 1):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        ema.update()
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        write_checkpoint(run, n + 1, state)
        write_checkpoint(shifted, n, state)
    assert ema.gamma == pytest.approx(gamma_from_sigma_rel(SIGMA), rel=1e-12)
    want = {k: v.detach() for k, v in ema.ema_model.state_dict().items()}
    got = _average(run, tmp_path / "out", "--method", f"power-ema:{SIGMA}", "--accum-dtype", "float64")
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6)
    # float32 accumulation (the default) stays within the same bound
    got32 = _average(run, tmp_path / "out32", "--method", f"power-ema:{SIGMA}")
    for name, value in want.items():
        torch.testing.assert_close(got32[name], value, rtol=1e-5, atol=1e-6)
    # the test can fail: off by one step, the profile differs measurably
    off = _average(shifted, tmp_path / "off", "--method", f"power-ema:{SIGMA}", "--accum-dtype", "float64")
    assert max((off[k] - want[k]).abs().max().item() for k in want) > 1e-4


# -- bad values, missing steps, the registry ------------------------------------------------------------


def _run3(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    for i, step in enumerate((100, 250, 300)):
        write_checkpoint(run, step, _state(i))
    return run


def test_bad_options_are_clear_errors_on_the_command_line(tmp_path):
    """docs/FAULTS.md row 99: σ_rel ≤ 0 or beyond 1/√12, NaN, a negative γ, both or neither given: one line
    naming the flag and the valid range (``ckptavg watch --power-ema``: the next test); nothing is written."""
    run = _run3(tmp_path)
    expect = "a number in (0, 0.288675] (1/√12, the mean of every step)"
    for args, message in [
        (("--method", "power-ema:0"), f"--method 'power-ema:0': '0' is not {expect}"),
        (("--method", "power-ema:-0.1"), f"--method 'power-ema:-0.1': '-0.1' is not {expect}"),
        (("--method", "power-ema:0.3"), f"--method 'power-ema:0.3': '0.3' is not {expect}"),
        (("--method", "power-ema:nan"), f"--method 'power-ema:nan': 'nan' is not {expect}"),
        (("--method", "power-ema", "--sigma-rel", "0.5"), f"--sigma-rel must be {expect}, got 0.5"),
        (("--method", "power-ema", "--gamma", "-1"), "--gamma must be a number >= 0, got -1.0"),
        (("--method", "power-ema", "--gamma", "7", "--sigma-rel", "0.1"),
         "--method power-ema takes only one of --sigma-rel and --gamma"),
        (("--method", "power-ema"), "--method power-ema needs --sigma-rel S or --gamma G, or write power-ema:S"),
        (("--method", "power-ema:0.1", "--gamma", "7"),
         "--gamma is not used by any --method here: power-ema:0.1 already sets it inline"),
    ]:
        with pytest.raises(UsageError) as e:
            _invoke("average", run, *args, "-o", tmp_path / "x")
        assert str(e.value) == message, args
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_bad_options_exit_2_with_one_line(tmp_path):
    """docs/FAULTS.md row 99, as real processes: exit 2, the one line, no traceback."""
    run = _run3(tmp_path)
    expect = "a number in (0, 0.288675] (1/√12, the mean of every step)"
    config = tmp_path / "c.toml"
    config.write_text(f'watch = "{run}"\noutput = "{tmp_path / "w"}"\n[[average]]\nmethod = "power-ema"\n')
    for args, message in [
        (("average", run, "--method", "power-ema:0", "-o", tmp_path / "x"),
         f"--method 'power-ema:0': '0' is not {expect}"),
        (("watch", run, "-o", tmp_path / "w", "--power-ema", "0"), f"--power-ema: must be {expect}, got 0.0"),
        (("watch", run, "-o", tmp_path / "w", "--power-ema", "0.5"), f"--power-ema: must be {expect}, got 0.5"),
        (("watch", "--config", config), f"{config}: average[0]: method power-ema needs exactly one of sigma_rel or gamma"),
    ]:
        r = run_cli_subprocess(*args)
        assert r.returncode == 2 and r.stderr.strip() == f"ckptavg: error: {message}", (args, r.stderr)
    assert not (tmp_path / "w").exists() and not (tmp_path / "x").exists()


def test_bad_options_are_clear_errors_in_the_config_file(tmp_path):
    """docs/FAULTS.md row 99, TOML dialect: the key and the valid range, with the file's name."""
    good = tmp_path / "good.toml"
    good.write_text('watch = "run"\noutput = "avg"\n[[average]]\nmethod = "power-ema"\nsigma_rel = 0.05\n'
                    '[[average]]\nmethod = "power-ema"\ngamma = 7\n')
    cfg = load_config(good)
    assert [(a.method, a.name, a.options) for a in cfg.averages] == [
        ("power-ema", "power-ema-0.05", {"sigma_rel": 0.05}), ("power-ema", "power-ema-gamma-7", {"gamma": 7})]
    bad = tmp_path / "bad.toml"
    expect = "a number in (0, 0.288675] (1/√12, the mean of every step)"
    for body, message in [
        ("sigma_rel = 0", f"average[0].sigma_rel: must be {expect}, got 0"),
        ("sigma_rel = -0.05", f"average[0].sigma_rel: must be {expect}, got -0.05"),
        ("sigma_rel = 0.29", f"average[0].sigma_rel: must be {expect}, got 0.29"),
        ('sigma_rel = "0.1"', f"average[0].sigma_rel: must be {expect}, got '0.1'"),
        ("gamma = -0.5", "average[0].gamma: must be a number >= 0, got -0.5"),
        ("sigma_rel = 0.1\ngamma = 7", "average[0]: method power-ema takes only one of sigma_rel and gamma"),
        ("", "average[0]: method power-ema needs exactly one of sigma_rel or gamma"),
        ("sigma_rel = 0.1\nhalf_life = 7",
         "average[0].half_life: unknown key for method power-ema (allowed: gamma, method, name, rules, sigma_rel)"),
    ]:
        bad.write_text(f'watch = "run"\noutput = "avg"\n[[average]]\nmethod = "power-ema"\n{body}\n')
        with pytest.raises(UsageError) as e:
            load_config(bad)
        assert str(e.value) == f"{bad}: {message}", body


def test_steps_are_required_and_must_increase(tmp_path):
    """docs/FAULTS.md row 98: a checkpoint without a step is refused naming it and --steps; a repeated step, or a
    negative one, is refused, and nothing is written."""
    run = _run3(tmp_path)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for src, dst in zip(sorted(run.glob("checkpoint-*"))[:2], (a, b)):
        dst.write_bytes((src / "model.safetensors").read_bytes())
    with pytest.raises(Exception) as e:
        _invoke("average", a, b, "--method", "power-ema:0.1", "-o", tmp_path / "x")
    text = str(e.value)
    assert str(a) in text and "power-ema-0.1 average needs training steps" in text and "--steps" in text
    with pytest.raises(Exception) as e:
        _invoke("average", a, b, "--method", "power-ema:0.1", "--steps", "5,5", "-o", tmp_path / "x")
    assert str(b) in str(e.value) and "has the same step (5)" in str(e.value)
    with pytest.raises(UsageError, match=r"power-EMA needs training steps >= 0 .*got step -5"):
        _invoke("average", a, b, "--method", "power-ema:0.1", "--steps=-5,10", "-o", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    # the method itself refuses a step that does not increase (the daemon's rewind handling runs before it)
    m = PowerEMA(sigma_rel=0.1)
    slot = m.new_slot((3,), torch.float32, torch.float32, torch.device("cpu"))
    m.commit(slot, m.prepare(slot, FoldInfo("a", 10)), FoldInfo("a", 10))
    with pytest.raises(UsageError, match="power-EMA needs increasing steps; got step 10 after 10"):
        m.prepare(slot, FoldInfo("b", 10))


def test_registry_flags_help_and_hyphenated_names(tmp_path):
    """The registry gives ``power-ema`` its ``ckptavg average`` flags, its repeatable ``ckptavg watch --power-ema``
    flag (its README row: tests/test_method_plugin.py); method names may hold single hyphens (the click
    destination takes underscores)."""
    assert METHODS["power-ema"] is PowerEMA
    watch_help = CliRunner().invoke(cli, ["watch", "--help"]).output
    assert re.search(r"--power-ema S\s+POWER-EMA average: sigma rel S \(repeatable\)", watch_help), watch_help
    avg_help = CliRunner().invoke(cli, ["average", "--help"]).output
    assert "--sigma-rel S" in avg_help and "--gamma G" in avg_help
    for bad in ("Power-ema", "-x", "x-", "a--b", "a b", "a.b"):
        cls = type("Bad", (Method,), {"name": bad, "buffers": ()})
        with pytest.raises(UsageError, match="lower-case name of words joined by single hyphens"):
            register(cls)
    # a hyphenated plug-in gets a working watch flag
    from ckptavg.cli.methodflags import watch_averages, watch_flags

    class Twin(PowerEMA):
        name = "twin-ema"

    register(Twin)
    try:
        flag = next(o for o in watch_flags() if "--twin-ema" in o.opts)
        assert flag.name == "watch_twin_ema"
        assert watch_averages({"watch_twin_ema": (0.1,)}) == [{"method": "twin-ema", "sigma_rel": 0.1}]
    finally:
        unregister("twin-ema")
