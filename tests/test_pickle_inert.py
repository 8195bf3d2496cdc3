"""Objects beside the weights in a pickle are read as inert stand-ins (docs/FAULTS.md rows 49-51).

Lightning's ``save_hyperparameters()`` stores whatever the module was given (paths, namespaces, enums,
dataclasses), DeepSpeed stores its loss scaler, accelerate numpy random states: ``weights_only`` loading
refuses all of them. ckptavg reads such objects as :class:`~ckptavg.reading.formats.pickle.Inert`
stand-ins: the class's module is never imported and none of its code runs.
"""

from __future__ import annotations

import argparse
import enum
import pathlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import run_cli_subprocess
from safetensors.torch import load_file

from ckptavg import open_checkpoint


class Mode(enum.Enum):
    TRAIN = "train"


@dataclass
class DataConfig:
    root: pathlib.Path
    batch: int = 8


def _weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"model.layer.weight": torch.randn(4, 3, generator=g), "model.layer.bias": torch.randn(4, generator=g)}


def _lightning_ckpt(path: Path, step: int, seed: int) -> Path:
    torch.save({"epoch": 0, "global_step": step, "pytorch-lightning_version": "2.5.0", "state_dict": _weights(seed),
                "hyper_parameters": {"data_dir": pathlib.Path("/data/set"), "args": argparse.Namespace(lr=0.1),
                                     "mode": Mode.TRAIN, "data": DataConfig(pathlib.Path("/data"))}}, path)
    return path


def test_row49_lightning_hyperparameters_do_not_block_the_weights(tmp_path, ckptavg):
    run = tmp_path / "run"
    run.mkdir()
    files = [_lightning_ckpt(run / f"epoch=0-step={s}.ckpt", s, s) for s in (10, 20)]
    ckpt = open_checkpoint(files[0])
    assert ckpt.step == 10 and set(ckpt.tensors) == {"layer.weight", "layer.bias"}
    with ckpt.reader() as r:
        assert torch.equal(r.read("layer.weight"), _weights(10)["model.layer.weight"])
    r = ckptavg("average", run, "--last", "2", "--method", "uniform", "-o", tmp_path / "out")
    assert r.code == 0, r
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    ref = (_weights(10)["model.layer.weight"].double() + _weights(20)["model.layer.weight"].double()) / 2
    torch.testing.assert_close(got["layer.weight"].double(), ref, rtol=0, atol=1e-7)


def test_row49_the_objects_module_is_never_imported(tmp_path):
    """The class lives in a module whose import leaves a mark; a fresh process reads the checkpoint
    without that module on its path being imported, so the mark never appears."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    mark = tmp_path / "IMPORTED"
    (pkg / "loud_config.py").write_text(
        f"import pathlib\npathlib.Path({str(mark)!r}).touch()\n\nclass LoudConfig:\n    def __init__(self, n):\n"
        f"        self.n = n\n    def __setstate__(self, state):\n        pathlib.Path({str(mark)!r}).touch()\n")
    path = tmp_path / "step_5.pt"
    code = (f"import sys, torch; sys.path.insert(0, {str(pkg)!r}); from loud_config import LoudConfig; "
            f"torch.save({{'model': {{'w': torch.ones(2)}}, 'config': LoudConfig(3)}}, {str(path)!r})")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    mark.unlink()  # the save imported it; from here on nothing may
    r = run_cli_subprocess("inspect", path, env={"PYTHONPATH": str(pkg)})  # importable, yet never imported
    assert r.returncode == 0, r.stderr
    assert "step" in r.stdout and not mark.exists()


def test_row50_a_stand_in_where_a_tensor_should_be_is_refused(tmp_path, ckptavg):
    path = tmp_path / "epoch=0-step=3.ckpt"
    torch.save({"global_step": 3, "state_dict": {"model.w": torch.ones(2), "model.scale": DataConfig(pathlib.Path("/"))}},
               path)
    r = ckptavg("inspect", path)
    assert r.code != 0
    assert "model.scale" in r.err and "DataConfig" in r.err and "Traceback" not in r.err


@pytest.mark.parametrize("payload", ["function", "hostile-class"])
def test_row51_calls_and_hostile_modules_stay_refused(tmp_path, ckptavg, payload):
    sentinel = tmp_path / "RAN"

    class Touch:
        def __reduce__(self):
            if payload == "function":
                return (pathlib.Path.touch, (pathlib.Path(sentinel),))
            return (subprocess.Popen, (["touch", str(sentinel)],))

    path = tmp_path / "step_1.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": Touch()}, path)
    r = ckptavg("inspect", path)
    assert r.code != 0 and "not executed" in r.err and not sentinel.exists()
