"""Shared fixtures: tiny real checkpoints on disk, the CLI in-process, thread-leak guard.

Checkpoints are real files written by the real writers (``safetensors.torch.save_file``,
``torch.save``, ``transformers``' ``save_pretrained``), never mocks.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: a second OpenMP thread only adds synchronisation (and spins on a busy machine).
    A module asks for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Fail a test that leaves ckptavg threads running (prefetchers must be joined)."""
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive() and t.name.startswith("ckptavg")]
    for t in leaked:
        t.join(timeout=2)
    leaked = [t for t in leaked if t.is_alive()]
    assert not leaked, f"leaked threads: {leaked}"


def tiny_state(seed: int = 0, *, dtype: torch.dtype = torch.bfloat16, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """A small state dict: matrices in ``dtype``, an fp32 norm, a bias, an int64 buffer."""
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": (torch.randn(64, 16, generator=g) * scale).to(dtype),
        "layers.0.attn.weight": (torch.randn(16, 16, generator=g) * scale).to(dtype),
        "layers.0.norm.weight": 1 + 0.1 * torch.randn(16, generator=g),
        "layers.0.mlp.bias": (torch.randn(48, generator=g) * scale).to(dtype),
        "layers.0.num_batches_tracked": torch.tensor(seed, dtype=torch.int64),
    }


def write_sharded_safetensors(folder: Path, state: dict[str, torch.Tensor], shard_bytes: int,
                              *, base: str = "model") -> Path:
    """Write ``state`` as HF-style shards of at most ``shard_bytes`` plus ``<base>.safetensors.index.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"{base}-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    index = folder / f"{base}.safetensors.index.json"
    total = sum(t.numel() * t.element_size() for t in state.values())
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return index


def write_checkpoint(path: Path, state: dict[str, torch.Tensor], fmt: str = "safetensors", *,
                     shard_bytes: int = 2048, step: int | None = None, config: bool = False) -> Path:
    """Write ``state`` in one of the formats ckptavg reads. Returns the checkpoint path.

    fmt: ``safetensors`` (folder with model.safetensors), ``safetensors-file`` (``path`` is the file),
    ``sharded`` (folder, sharded safetensors + index), ``bin`` (folder with pytorch_model.bin),
    ``bin-sharded``, ``pt`` (``path`` is a .pt file), ``lightning`` (``path`` is a .ckpt file).
    """
    path = Path(path)
    if fmt == "safetensors-file":
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
        return path
    if fmt == "pt":
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
        return path
    if fmt == "lightning":
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"epoch": 0, "global_step": step or 0, "pytorch-lightning_version": "2.5.0",
                    "state_dict": {f"model.{k}": v for k, v in state.items()},
                    "optimizer_states": [], "lr_schedulers": []}, path)
        return path
    path.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
    elif fmt == "sharded":
        write_sharded_safetensors(path, state, shard_bytes)
    elif fmt == "bin":
        torch.save(state, path / "pytorch_model.bin")
    elif fmt == "bin-sharded":
        names = list(state)
        half = math.ceil(len(names) / 2)
        parts = [names[:half], names[half:]]
        weight_map = {}
        for i, part in enumerate(parts):
            fname = f"pytorch_model-{i + 1:05d}-of-00002.bin"
            torch.save({k: state[k] for k in part}, path / fname)
            weight_map.update({k: fname for k in part})
        (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        raise ValueError(fmt)
    if config:
        (path / "config.json").write_text(json.dumps({"model_type": "tiny", "hidden_size": 16}))
    if step is not None:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


@pytest.fixture
def make_run(tmp_path: Path) -> Callable[..., list[Path]]:
    """``make_run(steps, fmt=..., dtype=...)`` → checkpoint paths ``run/checkpoint-<step>`` of drifting weights."""

    def make(steps, fmt: str = "safetensors", dtype: torch.dtype = torch.bfloat16, root: Path | None = None,
             **kw) -> list[Path]:
        root = root or tmp_path / "run"
        paths = []
        for i, step in enumerate(steps):
            state = tiny_state(i, dtype=dtype)
            if fmt in ("pt", "safetensors-file"):
                p = root / f"step_{step}{'.pt' if fmt == 'pt' else '.safetensors'}"
            elif fmt == "lightning":
                p = root / f"epoch=0-step={step}.ckpt"
            else:
                p = root / f"checkpoint-{step}"
            paths.append(write_checkpoint(p, state, fmt, step=step, **kw))
        return paths

    return make


class CliResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def __repr__(self) -> str:
        return f"CliResult(code={self.code}, out={self.out!r}, err={self.err!r})"


@pytest.fixture(autouse=True)
def _logging_levels_restored():
    """An in-process CLI run configures logging for a whole process (``configure_logging``: the root logger's
    and the ``ckptavg`` logger's levels, warnings captured); put the levels back after every test, so a later
    test's ``caplog.set_level`` sees the records it counts whatever ran before it."""
    root, ours = logging.getLogger(), logging.getLogger("ckptavg")
    levels = (root.level, ours.level)
    yield
    root.setLevel(levels[0])
    ours.setLevel(levels[1])
    logging.captureWarnings(False)


@pytest.fixture
def ckptavg(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """Run the ``ckptavg`` CLI in-process: ``ckptavg("average", a, b, "-o", out)`` → CliResult."""
    from ckptavg.cli.main import main

    def run(*args: object) -> CliResult:
        capsys.readouterr()
        code = 0
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def run_cli_subprocess(*args: object, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m ckptavg.cli.main`` as a real process (exit codes, no traceback on stderr)."""
    import os

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "ckptavg.cli.main", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
