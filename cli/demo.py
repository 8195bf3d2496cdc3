"""``ckptavg demo``: train a small model on CPU, average its checkpoints, show the gain."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import click
from safetensors.torch import load_file

from ..checkpoint import open_checkpoint
from ..demo import DemoConfig, evaluate, train
from ..engine import Engine
from ..errors import UsageError
from ..oneshot import AverageSpec, average_checkpoints, build_averages
from ..progress import Progress


class _Quiet(Progress):
    def checkpoint_done(self, ckpt, nbytes, seconds):  # type: ignore[no-untyped-def]
        pass

log = logging.getLogger("ckptavg.cli")


def _load_folder(folder: Path) -> dict:
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


@click.command()
@click.option("--out", "out", type=click.Path(path_type=Path), default=Path("ckptavg-demo"), show_default=True,
              help="Folder for the demo run (run/) and its averages (avg/).")
@click.option("--steps", type=int, default=DemoConfig.steps, show_default=True, help="Training steps.")
@click.option("--save-every", type=int, default=DemoConfig.save_every, show_default=True, help="Checkpoint interval.")
@click.option("--force", is_flag=True, help="Replace an earlier demo in --out.")
def demo(out: Path, steps: int, save_every: int, force: bool) -> None:
    """Train a small model on CPU (seconds), average its checkpoints, print held-out loss raw vs averaged.

    \b
    Example:
      ckptavg demo --out /tmp/ckptavg-demo
    """
    if steps < 2 * save_every:
        raise UsageError("--steps must allow at least two checkpoints (steps >= 2 * --save-every)")
    run, avg = out / "run", out / "avg"
    if out.exists() and any(out.iterdir()) and not force:
        raise UsageError(f"{out} already holds a demo", hint="pass --force to replace it, or --out elsewhere")
    shutil.rmtree(run, ignore_errors=True)
    shutil.rmtree(avg, ignore_errors=True)
    cfg = DemoConfig(steps=steps, save_every=save_every)
    t0 = time.perf_counter()
    paths = train(run, cfg)
    t_train = time.perf_counter() - t0
    log.info("trained %d steps in %.1f s; %d checkpoints in %s", steps, t_train, len(paths), run)
    ckpts = [open_checkpoint(p) for p in paths]
    half_life = 4 * save_every
    specs = [AverageSpec("ema", {"half_life": float(half_life)}), AverageSpec("lawa", {"window": 5}),
             AverageSpec("swa", {"start_step": steps // 2}), AverageSpec("uniform")]
    with Engine(device="cpu") as engine:
        averages = build_averages(specs, device=engine.device)
        result = average_checkpoints(ckpts, averages, avg, engine=engine, progress=_Quiet())
    rows = [("raw (last checkpoint)", evaluate(load_file(str(paths[-1] / "model.safetensors")), cfg))]
    for name, folder in result.outputs.items():
        rows.append((name, evaluate(_load_folder(folder), cfg)))
    base = rows[0][1]["val_loss"]
    click.echo(f"\nckptavg demo: {steps} SGD steps, {len(paths)} checkpoints, averaged in {result.seconds:.2f} s\n")
    click.echo(f"{'model':<24}{'val loss':>10}{'vs raw':>10}{'val acc':>10}")
    for name, m in rows:
        click.echo(f"{name:<24}{m['val_loss']:>10.4f}{m['val_loss'] / base:>9.3f}x{m['val_acc']:>10.3f}")
    better = [n for n, m in rows[1:] if m["val_loss"] < base]
    click.echo("")
    if better:
        click.echo(f"Averages with a lower held-out loss than the raw checkpoint: {', '.join(better)}.")
    else:
        click.echo("No average beat the raw checkpoint on this run.")
    click.echo(f"Model folders: {avg}/<name>/ (safetensors + model card + ckptavg.json)")
