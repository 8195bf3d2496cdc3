"""``ckptavg status``: what a running (or stopped) daemon has done."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from ckptavg.contracts.status import STATUS_FILE, read_status
from ckptavg.errors import UsageError


@click.command()
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--state-dir", type=click.Path(path_type=Path),
              help="The daemon's state folder (default OUTPUT/.ckptavg).")
@click.option("--json", "as_json", is_flag=True, help="Print the raw status JSON.")
def status(output: Path, state_dir: Path | None, as_json: bool) -> None:
    """Show folded steps per average, lag behind the trainer, evaluation, the best model, Hub uploads.

    \b
    Example:
      ckptavg status runs/exp1-avg
    """
    path = (state_dir or output / ".ckptavg") / STATUS_FILE
    try:
        doc = read_status(path)  # StatusError (exit 1) when it is not a status document
    except FileNotFoundError:
        raise UsageError("no daemon status here", path=path,
                         hint="is `ckptavg watch` running with this output?") from None
    if as_json:
        click.echo(json.dumps(doc.to_json(), indent=2))
        return
    age = time.time() - doc.updated
    click.echo(f"daemon:    {doc.state} (pid {doc.pid}, updated {age:.0f} s ago, {doc.watcher})")
    click.echo(f"watching:  {doc.watch}")
    click.echo(f"output:    {doc.output}")
    if doc.folding_step is not None:
        click.echo(f"folding:   step {doc.folding_step}")
    lag = doc.lag_steps
    click.echo(f"folded to: step {doc.last_folded_step}; newest seen {doc.newest_seen_step}"
               + (f"; lag {lag} steps" if lag is not None else "") + f"; {len(doc.queued)} queued")
    fold = doc.last_fold
    if fold:
        click.echo(f"last fold: step {fold.step}, {fold.bytes / 1e9:.3f} GB in {fold.seconds} s ({fold.gbps} GB/s)")
    if doc.last_error:
        click.echo(f"last error: {doc.last_error}")
    if doc.degraded:
        click.echo(f"DEGRADED:  {doc.degraded} (retrying; folding goes on)")
    if doc.halted:
        click.echo(f"HALTED:    {doc.halted}")
    for r in doc.rewinds[-3:]:
        back = r.get("back_to")
        click.echo(f"rewind:    at step {r.get('at')}: rolled back to "
                   f"{'step ' + str(back) if back is not None else 'an empty state'}"
                   + (f", dropped {r.get('abandoned')}" if r.get("abandoned") else "") + f" ({r.get('why')})")
    for g in doc.missed:
        where = f"between steps {g.get('after')} and {g.get('before')}" if g.get("after") is not None \
            else f"before step {g.get('before')}"
        click.echo(f"missed:    {g.get('count')} checkpoint(s) {where} (one every {g.get('every')} steps) never seen")
    click.echo("")
    click.echo(f"{'average':<20}{'method':<10}{'folded':>8}{'last step':>12}")
    for name, a in doc.averages.items():
        click.echo(f"{name:<20}{a.method:<10}{a.folded:>8}{a.last_step!s:>12}")
    ev = doc.evaluation
    if ev:
        click.echo("")
        busy = (f"; evaluating step {ev.running_step}" if ev.running_step is not None else "") + (
            f"; step {ev.pending_step} waiting" if ev.pending_step is not None else "")
        click.echo(f"evaluation: {ev.kind}, {ev.rounds} round(s), last evaluated step "
                   f"{ev.last_evaluated_step}{busy}; {ev.skipped_rounds} stale round(s) skipped, "
                   f"{ev.failures} failure(s)")
        best = ev.best
        if best:
            click.echo(f"best:       {best.candidate} at step {best.step}, {best.metric} = {best.value:.6g} "
                       f"({best.mode}) -> {Path(doc.output) / 'best'}")
        if ev.last_error:
            click.echo(f"eval error: {ev.last_error}")
    hub = doc.hub
    if hub:
        pending = f"; step {hub.pending_step} pending" if hub.pending_step is not None else ""
        click.echo(f"hub:        {hub.repo}@{hub.revision or 'main'}: {hub.state}, last commit "
                   f"{hub.last_commit or '-'} (step {hub.last_step}){pending}")
        if hub.last_error:
            click.echo(f"hub error:  {hub.last_error}")
