"""``ckptavg status``: what a running (or stopped) daemon has done."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from ckptavg.errors import UsageError


@click.command()
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--state-dir", type=click.Path(path_type=Path), help="The daemon's state folder (default OUTPUT/.ckptavg).")
@click.option("--json", "as_json", is_flag=True, help="Print the raw status JSON.")
def status(output: Path, state_dir: Path | None, as_json: bool) -> None:
    """Show folded steps per average, lag behind the trainer, evaluation, the best model, Hub uploads.

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
        click.echo(f"{name:<20}{a['method']:<10}{a['folded']:>8}{a['last_step']!s:>12}")
    ev = data.get("evaluation")
    if ev:
        click.echo("")
        busy = (f"; evaluating step {ev['running_step']}" if ev.get("running_step") is not None else "") + (
            f"; step {ev['pending_step']} waiting" if ev.get("pending_step") is not None else "")
        click.echo(f"evaluation: {ev['kind']}, {ev.get('rounds', 0)} round(s), last evaluated step "
                   f"{ev.get('last_evaluated_step')}{busy}; {ev.get('skipped_rounds', 0)} stale round(s) skipped, "
                   f"{ev.get('failures', 0)} failure(s)")
        best = ev.get("best")
        if best:
            click.echo(f"best:       {best['candidate']} at step {best['step']}, {best['metric']} = {best['value']:.6g} "
                       f"({best['mode']}) -> {Path(data['output']) / 'best'}")
        if ev.get("last_error"):
            click.echo(f"eval error: {ev['last_error']}")
    hub = data.get("hub")
    if hub:
        pending = f"; step {hub['pending_step']} pending" if hub.get("pending_step") is not None else ""
        click.echo(f"hub:        {hub.get('repo')}@{hub.get('revision') or 'main'}: {hub.get('state')}, last commit "
                   f"{hub.get('last_commit') or '-'} (step {hub.get('last_step')}){pending}")
        if hub.get("last_error"):
            click.echo(f"hub error:  {hub['last_error']}")
