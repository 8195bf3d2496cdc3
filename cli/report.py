"""``ckptavg report``: the raw checkpoints against each average, as a table, a PNG and an HTML page."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ckptavg.cli.interrupts import deferred_sigint
from ckptavg.errors import OutputError, UsageError
from ckptavg.publishing.report import PLOT_SKIPPED, build_report
from ckptavg.soup import SOUP_FILE


@click.command()
@click.argument("output", metavar="OUT", type=click.Path(path_type=Path))
@click.option("--metric", help="The metric to report (default: the daemon's selection metric in eval.json).")
@click.option("--mode", type=click.Choice(["min", "max"]),
              help="min: lower is better (a loss); max: higher is better (an accuracy). Default from eval.json.")
@click.option("--target", type=float,
              help="The score to reach; steps and trainer hours to reach it are counted (default: the raw best).")
@click.option("--png", "png_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Where to write the plot (default OUT/report.png).")
@click.option("--html", "html_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Where to write the self-contained HTML page (default OUT/report.html).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of the table.")
def report(output: Path, metric: str | None, mode: str | None, target: float | None, png_path: Path | None,
           html_path: Path | None, as_json: bool) -> None:
    """Show how each average did against the raw checkpoints, from the daemon's evaluations.

    OUT is the daemon's output folder (it reads OUT/.ckptavg/metrics.jsonl), a `ckptavg sweep` output
    (the same file), a metrics.jsonl file, or a `ckptavg soup` output (its soup.json: the members, what
    the greedy soup kept, and the uniform soup).
    For each candidate: best value and its step, final value, the step and trainer time at which the
    target was first reached, and the gain against the raw checkpoint.

    \b
    Examples:
      ckptavg report runs/exp1-avg
      ckptavg report runs/exp1-avg --metric val_acc --mode max --target 0.8
      ckptavg report runs/exp1-avg --json > report.json
      ckptavg report soups/greedy                 # a soup: members, added or not, uniform soup
    """
    if (output / SOUP_FILE).is_file():  # a greedy soup's output: its record is the report
        _soup_report(output, as_json)
        return
    rep = build_report(output, metric=metric, mode=mode, target=target)
    click.echo(json.dumps(rep.to_json(), indent=2) if as_json else rep.table_text(), nl=as_json)
    png_path = png_path or rep.out_dir / "report.png"
    html_path = html_path or rep.out_dir / "report.html"
    try:
        with deferred_sigint():  # matplotlib's import can swallow a Ctrl-C
            rep.png_bytes()  # raises only when matplotlib cannot be imported
    except OutputError:
        plotted = False
    else:
        plotted = True
        rep.write_png(png_path)
        click.echo(f"plot: {png_path}", err=as_json)
    rep.write_html(html_path)  # without matplotlib: the table and a note instead of the plot
    click.echo(f"html: {html_path}", err=as_json)
    if not plotted:  # the table is the report, the plot a view of it: exit 0
        click.echo(PLOT_SKIPPED, err=True)


def _soup_report(output: Path, as_json: bool) -> None:
    from ckptavg.cli.soup import soup_table
    from ckptavg.soup import SoupResult

    try:
        record = json.loads((output / SOUP_FILE).read_text(encoding="utf-8"))
        result = SoupResult.from_json(record)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{SOUP_FILE} cannot be read as a soup's record ({type(e).__name__}: {e})", path=output,
                         hint="it is written by `ckptavg soup`; run the soup again") from None
    click.echo(json.dumps(record, indent=2) if as_json else soup_table(result) + "\n\n" + result.summary())
