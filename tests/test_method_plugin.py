"""A method is one file: a test-only method, registered from here, gets its ``ckptavg average`` flag,
its inline ``NAME:VALUE``, its ``ckptavg watch`` flag, its TOML keys and their validation, without any
other module knowing about it. Also: the README's method table is the registry's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from ckptavg.averaging.methods import METHODS, FoldInfo, Method, Option, Plan, Slot, methods_table, register, unregister
from ckptavg.cli.main import cli
from ckptavg.daemon.config import load_config

ROOT = Path(__file__).resolve().parents[1]


class ScaledMax(Method):
    """Elementwise maximum of the checkpoints, times ``scale`` (a test-only method)."""

    name = "smax"
    summary = "elementwise maximum, scaled (test only)"
    reference = "-"
    buffers = ("max",)
    params = (Option("scale", float, "Factor applied to the maximum.", metavar="F", low=0, low_open=True, high=10),)
    main_option = "scale"

    scale: float

    def prepare(self, slot: Slot, info: FoldInfo) -> Plan:
        return Plan(first=slot.count == 0)

    def apply(self, slot: Slot, plan: Plan, x: torch.Tensor, old: torch.Tensor | None, lo: int, hi: int,
              tmp: torch.Tensor) -> None:
        buf = slot.bufs["max"][lo:hi]
        if plan.first:
            buf.copy_(x)
        else:
            torch.maximum(buf, x, out=buf)

    def value(self, slot: Slot) -> torch.Tensor:
        return slot.bufs["max"] * self.scale


@pytest.fixture
def smax():
    register(ScaledMax)
    yield ScaledMax
    unregister("smax")
    assert "smax" not in METHODS


def _run(tmp_path: Path) -> list[Path]:
    g = torch.Generator().manual_seed(0)
    paths = []
    for step in (100, 200, 300):
        d = tmp_path / "run" / f"checkpoint-{step}"
        d.mkdir(parents=True)
        save_file({"w": torch.randn(4, 5, generator=g), "b": torch.randn(5, generator=g)}, str(d / "model.safetensors"))
        paths.append(d)
    return paths


def _invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False, standalone_mode=False)


def test_a_registered_method_gets_its_flag_and_its_math(tmp_path, smax):
    paths = _run(tmp_path)
    _invoke("average", *paths, "--method", "smax", "--scale", "2", "-o", tmp_path / "a")
    _invoke("average", *paths, "--method", "smax:2", "-o", tmp_path / "b")
    inputs = [load_file(str(p / "model.safetensors")) for p in paths]
    for out in ("a", "b"):
        got = load_file(str(tmp_path / out / "model.safetensors"))
        for name in ("w", "b"):
            want = torch.stack([s[name] for s in inputs]).amax(0) * 2
            torch.testing.assert_close(got[name], want, rtol=0, atol=0)


def test_its_validation_speaks_in_flags_on_the_command_line(tmp_path, smax):
    from ckptavg.errors import UsageError

    paths = _run(tmp_path)
    for args, message in [
        (("--method", "smax", "--scale", "11"), "--scale must be a number in (0, 10], got 11.0"),
        (("--method", "smax:0"), "--method 'smax:0': '0' is not a number in (0, 10]"),
        (("--method", "smax"), "--method smax needs --scale F, or write smax:F"),
        (("--method", "smax:2", "--scale", "3"), "--scale is not used by any --method here: smax:2 already sets it inline"),
        (("--method", "uniform", "--scale", "3"), "--scale is not used by any --method here: it applies to --method smax"),
    ]:
        with pytest.raises(UsageError) as e:
            _invoke("average", *paths, *args, "-o", tmp_path / "x")
        assert str(e.value) == message


def test_its_toml_keys_and_watch_flag(tmp_path, smax):
    good = tmp_path / "good.toml"
    good.write_text('watch = "run"\noutput = "avg"\n[[average]]\nmethod = "smax"\nscale = 3\n')
    cfg = load_config(good)
    assert cfg.averages[0].name == "smax-3" and cfg.averages[0].options == {"scale": 3}
    bad = tmp_path / "bad.toml"
    for body, message in [
        ('scale = "big"', "average[0].scale: must be a number in (0, 10], got 'big'"),
        ("scale = 2\nwindow = 3", "average[0].window: unknown key for method smax (allowed: method, name, rules, scale)"),
        ("", "average[0]: method smax needs scale"),
    ]:
        bad.write_text(f'watch = "run"\noutput = "avg"\n[[average]]\nmethod = "smax"\n{body}\n')
        with pytest.raises(Exception) as e:
            load_config(bad)
        assert str(e.value) == f"{bad}: {message}"
    help_text = CliRunner().invoke(cli, ["watch", "--help"]).output
    assert re.search(r"--smax F\s+SMAX average: scale F \(repeatable\)", help_text), help_text
    assert "--scale" in CliRunner().invoke(cli, ["average", "--help"]).output


def test_watch_folds_a_registered_method(tmp_path, smax):
    """The daemon, in-process, folds the plug-in like any method (the --smax flag builds the config)."""
    from ckptavg.daemon.config import config_from_flags
    from ckptavg.daemon.service import Service

    paths = _run(tmp_path)
    cfg = config_from_flags(str(tmp_path / "run"), str(tmp_path / "avg"), [{"method": "smax", "scale": 2.0}],
                            settle=0.0, poll="always", poll_interval=0.1, ionice_idle=False, nice=0)
    svc = Service(cfg)
    import threading

    t = threading.Thread(target=svc.run)
    t.start()
    try:
        for _ in range(200):
            if svc.last_step == 300:
                break
            threading.Event().wait(0.05)
    finally:
        svc.stopping.set()
        svc.wake.set()
        t.join(30)
    got = load_file(str(tmp_path / "avg" / "smax-2" / "model.safetensors"))
    inputs = [load_file(str(p / "model.safetensors")) for p in paths]
    torch.testing.assert_close(got["w"], torch.stack([s["w"] for s in inputs]).amax(0) * 2, rtol=0, atol=0)


def test_readme_method_table_is_the_registry():
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- methods-table:[^>]*-->\n(.*?)\n<!-- /methods-table -->", readme, re.S)
    assert m, "README.md lost its generated method table"
    assert m.group(1) == methods_table(), "README's method table is stale: paste methods_table()'s output"
