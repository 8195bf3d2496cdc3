"""``ckptavg centre``: the elastic centre (EASGD) of several workers' runs, as a sidecar daemon."""

from __future__ import annotations

from pathlib import Path

import click

from ckptavg.daemon.centre import CentreConfig, CentreService


@click.command()
@click.argument("workers", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="WORKER_DIR...")
@click.option("--alpha", type=float, required=True, metavar="A",
              help="Moving rate of the centre toward each arriving checkpoint, in (0, 1]: x̃ ← x̃ + A (x − x̃).")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Where the centre is published, as OUTPUT/centre (a symlink to its newest version).")
@click.option("--state", "state_dir", type=click.Path(path_type=Path), help="Daemon state (default OUTPUT/.ckptavg).")
@click.option("--poll", type=float, default=2.0, show_default=True, help="Seconds between scans of the worker folders.")
@click.option("--settle", type=float, default=5.0, show_default=True,
              help="Seconds a bare checkpoint file must stay unmodified before it is folded.")
@click.option("--marker", help="Glob that marks a checkpoint finished (e.g. COMPLETE).")
@click.option("--order-wait", type=float, default=60.0, show_default=True,
              help="Seconds a worker's later step waits for an earlier step of that worker still being written.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--threads", type=int, default=1, show_default=True, help="Torch CPU threads.")
@click.option("--eval-python", metavar="MOD:FUNC",
              help="Evaluate each published centre with a Python function (folder or state dict in, metrics out); "
                   "lines go to STATE/centre-metrics.jsonl.")
@click.option("--eval-every", type=int, default=1, show_default=True, help="Evaluate every N folds.")
def centre(workers: tuple[Path, ...], alpha: float, output: Path, state_dir: Path | None, poll: float, settle: float,
           marker: str | None, order_wait: float, device: str, threads: int, eval_python: str | None,
           eval_every: int) -> None:
    """Keep the elastic centre of several workers (Elastic Averaging SGD) up to date.

    Each finished checkpoint of any worker moves the centre toward it, x̃ ← x̃ + α (x − x̃), exactly once,
    each worker's checkpoints in step order; the first one initialises it. Workers may pull toward the
    published centre with ckptavg.integrations (pull_toward_centre, HF and Lightning callbacks).

    \b
    Example:
      ckptavg centre runs/seed0 runs/seed1 runs/seed2 --alpha 0.3 -o runs/centre
    """
    cfg = CentreConfig(workers=tuple(workers), output=output, alpha=alpha, state_dir=state_dir, poll=poll,
                       settle=settle, marker=marker, order_wait=order_wait, device=device, threads=threads,
                       eval_python=eval_python, eval_every=eval_every)
    raise SystemExit(CentreService(cfg).run())
