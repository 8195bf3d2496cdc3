"""A small, real training run to show what averaging buys, on any CPU in seconds.

A two-layer MLP learns a noisy 16-class problem with SGD at a high learning
rate (the regime where averaging helps most: the iterates bounce around a
minimum). The plain training loop saves a safetensors checkpoint every
``save_every`` steps, each written to a temporary folder and renamed into
place as careful trainers do; ``ckptavg demo`` runs it as its own process
(``python -m ckptavg.demo train RUN``) with the daemon beside it, and
:func:`evaluate_folder` is the daemon's evaluator (held-out loss and
accuracy). Nothing is downloaded: the data are drawn from a fixed random
generator.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = ["DemoConfig", "evaluate", "evaluate_folder", "make_model", "train"]


@dataclass(frozen=True)
class DemoConfig:
    steps: int = 1200
    save_every: int = 40
    batch_size: int = 32
    lr: float = 0.3
    hidden: int = 256
    dim: int = 64
    classes: int = 16
    label_noise: float = 0.2
    seed: int = 0


def make_model(cfg: DemoConfig) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    return torch.nn.Sequential(
        torch.nn.Linear(cfg.dim, cfg.hidden), torch.nn.GELU(), torch.nn.LayerNorm(cfg.hidden),
        torch.nn.Linear(cfg.hidden, cfg.classes),
    )


def _data(cfg: DemoConfig, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + cfg.seed)
    centers = torch.randn(cfg.classes, cfg.dim, generator=g) * 1.2
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, cfg.classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, cfg.dim, generator=g) * 1.5
    flip = torch.rand(n, generator=g) < cfg.label_noise
    y = torch.where(flip, torch.randint(0, cfg.classes, (n,), generator=g), y)
    return x, y


def train(out: Path, cfg: DemoConfig = DemoConfig(), *, step_delay: float = 0.0) -> list[Path]:
    """Train and save ``out/checkpoint-<step>/model.safetensors`` (+ a config). Returns the checkpoints.

    ``step_delay`` seconds of sleep per step make the run last like a real one (the demo's daemon folds live).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = make_model(cfg)
    x, y = _data(cfg, 8192, seed=cfg.seed + 1)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    g = torch.Generator().manual_seed(cfg.seed + 2)
    saved = []
    started = time.time()
    for step in range(1, cfg.steps + 1):
        idx = torch.randint(0, x.shape[0], (cfg.batch_size,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step_delay:
            time.sleep(step_delay)
        if step % cfg.save_every == 0:
            folder = out / f"checkpoint-{step}"
            tmp = out / f".checkpoint-{step}.tmp"
            tmp.mkdir(exist_ok=True)
            state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps({"model_type": "ckptavg-demo-mlp", **cfg.__dict__}))
            (tmp / "trainer_state.json").write_text(json.dumps({"global_step": step, "wall_time": time.time() - started}))
            os.replace(tmp, folder)
            saved.append(folder)
    return saved


@torch.no_grad()
def evaluate(state: dict[str, torch.Tensor], cfg: DemoConfig = DemoConfig()) -> dict[str, float]:
    """Held-out cross-entropy and accuracy of a state dict."""
    model = make_model(cfg)
    model.load_state_dict(state)
    model.eval()
    x, y = _data(cfg, 4096, seed=cfg.seed + 99)
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits, y).item()
    acc = (logits.argmax(-1) == y).float().mean().item()
    return {"val_loss": loss, "val_acc": acc, "val_ppl": math.exp(loss)}


def evaluate_folder(model_dir: Path) -> dict[str, float]:
    """The daemon's evaluator for the demo: rebuild the model from ``config.json``, load the weights, evaluate."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    saved = json.loads((model_dir / "config.json").read_text())
    cfg = DemoConfig(**{k: saved[k] for k in DemoConfig.__dataclass_fields__ if k in saved})
    state: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return evaluate(state, cfg)


def main(argv: list[str] | None = None) -> None:
    """``python -m ckptavg.demo train RUN [--steps N] [--save-every N] [--step-delay S]``: the demo's trainer."""
    parser = argparse.ArgumentParser(prog="python -m ckptavg.demo")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the demo model, saving checkpoints into RUN")
    t.add_argument("run", type=Path)
    t.add_argument("--steps", type=int, default=DemoConfig.steps)
    t.add_argument("--save-every", type=int, default=DemoConfig.save_every)
    t.add_argument("--step-delay", type=float, default=0.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    saved = train(args.run, DemoConfig(steps=args.steps, save_every=args.save_every), step_delay=args.step_delay)
    print(f"trained {args.steps} steps; {len(saved)} checkpoints in {args.run}", flush=True)

