"""``ckptavg soup``: a greedy model soup of fine-tuned models, runs or averages, by a held-out metric."""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch

from ckptavg.averaging.engine import Engine
from ckptavg.cli.average import resolve_inputs
from ckptavg.errors import UsageError
from ckptavg.evaluators import Candidate, make_evaluator
from ckptavg.soup import SoupResult, greedy_soup
from ckptavg.units import parse_size


def soup_table(result: SoupResult) -> str:
    """Member, its metric, the soup's metric when it was tried, and whether it was added; then the uniform soup."""
    metric = result.metric
    rows = [("#", "member", metric, f"soup {metric} with it", "added")]
    for i, m in enumerate(result.members, 1):
        own = "failed" if m.metrics is None else f"{m.metrics[metric]:.6g}"
        tried = "-" if m.tried is None else f"{m.tried[metric]:.6g}"
        if m.tried_error is not None:
            tried = "failed"
        added = "yes (best single)" if i == 1 else "yes" if m.added else "no"
        rows.append((str(i), str(m.path), own, tried, added))
    n = len(result.members)
    rows.append(("", f"greedy soup ({len(result.greedy)} of {n})", f"{result.greedy_value:.6g}", "", ""))
    uv = result.uniform_value
    rows.append(("", f"uniform soup (all {n})", "failed" if uv is None else f"{uv:.6g}", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(f"greedy soup written to {result.output}"
                 + (f", uniform soup to {result.uniform_output}" if result.uniform_output is not None else ""))
    return "\n".join(lines)


@click.command()
@click.argument("models", nargs=-1, required=True, metavar="MODEL...")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Where the greedy soup is written.")
@click.option("--eval", "eval_command", metavar="CMD",
              help="Evaluate with a shell command; {model_dir}, {step}, {name} are filled in; it prints a JSON "
                   "object of metrics as its last stdout line.")
@click.option("--eval-python", metavar="MOD:FUNC", help="Evaluate with a Python function (state dict or folder in).")
@click.option("--eval-hf-perplexity", metavar="DATA", help="Evaluate causal-LM perplexity on a .txt/.jsonl file.")
@click.option("--eval-timeout", type=float, help="Seconds before an --eval command is killed (default 3600).")
@click.option("--metric", help="The held-out metric (default: the evaluator's first).")
@click.option("--mode", type=click.Choice(["min", "max"]), default="min", show_default=True,
              help="min: lower --metric is better (a loss); max: higher is better (an accuracy).")
@click.option("--keep-uniform", type=click.Path(path_type=Path),
              help="Also write the uniform soup of every member here.")
@click.option("--json", "as_json", is_flag=True, help="Print the soup's record as JSON instead of the table.")
@click.option("--device", default="auto", show_default=True,
              help="Where the averaging runs: auto, cpu, cuda or cuda:N.")
@click.option("--accum-dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True,
              help="Accumulator precision (the soups keep each tensor's source dtype).")
@click.option("--shard-size", default="5GB", show_default=True, help="Largest output shard (e.g. 500MB, 2GB).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for the arithmetic (default: all cores but one).")
@click.option("--state-key", help="Pickles: the entry that holds the state dict (e.g. 'ema' or 'model/state').")
@click.option("--strip-prefix", help="Pickles: a prefix to remove from every tensor name.")
@click.option("--force", is_flag=True, help="Replace existing output folders (atomically).")
def soup(models: tuple[str, ...], output: Path, eval_command: str | None, eval_python: str | None,
         eval_hf_perplexity: str | None, eval_timeout: float | None, metric: str | None, mode: str,
         keep_uniform: Path | None, as_json: bool, device: str, accum_dtype: str, shard_size: str,
         threads: int | None, state_key: str | None, strip_prefix: str | None, force: bool) -> None:
    """Greedy model soup: add each model, best first, only if the soup's held-out metric improves.

    \b
    Examples:
      ckptavg soup ft-*/checkpoint-500 --eval-hf-perplexity valid.txt -o soup
      ckptavg soup runA/final runB/final out/ema --eval 'python eval.py {model_dir}' --metric acc --mode max -o soup
    """
    chosen = {k: v for k, v in (("command", eval_command), ("python", eval_python),
                                ("hf-perplexity", eval_hf_perplexity)) if v is not None}
    if len(chosen) != 1:
        raise UsageError("give one evaluator: --eval CMD, --eval-python MOD:FUNC or --eval-hf-perplexity DATA")
    (kind, spec), = chosen.items()
    if eval_timeout is not None and kind != "command":
        raise UsageError("--eval-timeout applies to --eval commands only")
    if eval_timeout is not None and not eval_timeout > 0:
        raise UsageError(f"--eval-timeout must be positive, got {eval_timeout}")
    key = {"command": "command", "python": "function", "hf-perplexity": "data"}[kind]
    options = {key: spec, **({"timeout": eval_timeout} if eval_timeout is not None else {})}
    max_shard = parse_size(shard_size, option="--shard-size")
    strip = None if strip_prefix in (None, "auto") else ("" if strip_prefix == "none" else strip_prefix)
    ckpts, run_folders = resolve_inputs(models, last=None, steps=None, state_key=state_key, strip_prefix=strip)
    evaluator = make_evaluator(kind, options)
    try:
        steps = {c.path: c.step for c in ckpts}

        def evaluate(model_dir: Path, name: str) -> dict[str, float]:
            return evaluator.evaluate(Candidate(name=name, step=0, model_dir=model_dir, kind="average",
                                                info={"method": "soup", "steps": steps}))

        with Engine(device=device, threads=threads) as engine:
            result = greedy_soup(ckpts, evaluate, output, metric=metric, mode=mode, engine=engine,
                                 accum_dtype=getattr(torch, accum_dtype), max_shard_bytes=max_shard, force=force,
                                 keep_uniform=keep_uniform, protected=run_folders)
    finally:
        evaluator.close()
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    click.echo(soup_table(result))
    click.echo("")
    click.echo(result.summary())
