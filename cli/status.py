"""``ckptavg status``: what a running (or stopped) daemon has done."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from ..errors import UsageError


@click.command()
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--state-dir", type=click.Path(path_type=Path), help="The daemon's state folder (default OUTPUT/.ckptavg).")
@click.option("--json", "as_json", is_flag=True, help="Print the raw status JSON.")
def status(output: Path, state_dir: Path | None, as_json: bool) -> None:
    """Show folded steps per average, lag behind the trainer, last error and read speed.

    \b
    Example:
      ckptavg status runs/exp1-avg
    """
    path = (state_dir or output / ".ckptavg") / "status.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError("no daemon status here", path=path, hint="is `ckptavg watch` running with this output?") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read the status: {e}", path=path) from None
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    age = time.time() - data.get("updated", 0)
    click.echo(f"daemon:    {data['state']} (pid {data['pid']}, updated {age:.0f} s ago, {data.get('watcher', '?')})")
    click.echo(f"watching:  {data['watch']}")
    click.echo(f"output:    {data['output']}")
    if data.get("folding_step") is not None:
        click.echo(f"folding:   step {data['folding_step']}")
    lag = data.get("lag_steps")
    click.echo(f"folded to: step {data.get('last_folded_step')}; newest seen {data.get('newest_seen_step')}"
               + (f"; lag {lag} steps" if lag is not None else "") + f"; {len(data.get('queued', []))} queued")
    fold = data.get("last_fold")
    if fold:
        click.echo(f"last fold: step {fold['step']}, {fold['bytes'] / 1e9:.3f} GB in {fold['seconds']} s ({fold['gbps']} GB/s)")
    if data.get("last_error"):
        click.echo(f"last error: {data['last_error']}")
    click.echo("")
    click.echo(f"{'average':<20}{'method':<10}{'folded':>8}{'last step':>12}")
    for name, a in data["averages"].items():
        click.echo(f"{name:<20}{a['method']:<10}{a['folded']:>8}{str(a['last_step']):>12}")
