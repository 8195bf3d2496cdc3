"""``ckptavg sweep``: which average is best? Many averaging horizons from one read of a run's checkpoints.

The sweep driver lives here, above the daemon: the core (:mod:`ckptavg.sweep`) parses the grid from the
method registry, folds every average in one pass and ranks the scores; evaluation and ``OUT/best`` go
through the daemon's own :class:`~ckptavg.daemon.evaluation.Evaluation` (the same evaluators, the same
``metrics.jsonl`` rows, the same versioned ``best/`` swap).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import click
import torch

from ckptavg.averaging.engine import Engine
from ckptavg.cli.average import resolve_inputs
from ckptavg.cli.progressbar import make_progress
from ckptavg.daemon.config import evaluate_config
from ckptavg.daemon.evaluation import BEST_LINK, Evaluation, snapshot_checkpoint
from ckptavg.errors import OutputError, UsageError
from ckptavg.evaluators import Candidate
from ckptavg.oneshot import _input_paths, _protect, order_checkpoints
from ckptavg.sweep import (
    LAST,
    Entry,
    SweepReport,
    available_cpus,
    average_entries,
    fold_grid,
    parse_grid,
    rank,
    raw_entries,
)
from ckptavg.units import parse_size

log = logging.getLogger("ckptavg.cli")

# what a sweep writes in OUT; a later sweep with --force replaces exactly these
_MADE = ("sweep.json", "sweep.csv", "sweep.png", "averages", ".ckptavg", BEST_LINK, ".best-versions")


def _tomllib() -> Any:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    return tomllib


def _eval_table(config: Path | None, evaluators: dict[str, Any], tuning: dict[str, Any]) -> dict[str, Any]:
    if len(evaluators) > 1:
        raise UsageError("give one of --eval, --eval-python, --eval-hf-perplexity")
    if config is not None:
        if evaluators:
            raise UsageError("--config gives the evaluator ([evaluate]); do not combine it with --eval/--eval-python/"
                             "--eval-hf-perplexity")
        try:
            data = _tomllib().loads(config.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError("config file not found", path=config) from None
        except (ValueError, UnicodeDecodeError) as e:
            raise UsageError(f"not valid TOML: {e}", path=config) from None
        table = data.get("evaluate")
        if not isinstance(table, dict):
            raise UsageError("the config has no [evaluate] table", path=config)
        return {**table, **tuning}
    if not evaluators:
        raise UsageError("a sweep needs an evaluator: --eval CMD, --eval-python MOD:FUNC, --eval-hf-perplexity DATA "
                         "or --config FILE with an [evaluate] table")
    return {**evaluators, **tuning}


def _prepare_output(out: Path, force: bool) -> None:
    """OUT is new, empty, or (with --force) a former sweep's: only what a sweep made is replaced."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {out} is a file; give a folder")
    if not out.is_dir() or not any(out.iterdir()):
        out.mkdir(parents=True, exist_ok=True)
        return
    if not (out / "sweep.json").is_file():
        raise UsageError(f"-o {out} is not empty and holds no earlier sweep; not writing there",
                         hint="give a new or empty folder")
    if not force:
        raise UsageError(f"-o {out} holds an earlier sweep", hint="pass --force to replace it")
    for name in _MADE:
        p = out / name
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)


def _written_at(files: list[Path]) -> float | None:
    try:
        return max(os.stat(f).st_mtime for f in files)
    except (OSError, ValueError):
        return None


def _evaluate(evaluation: Evaluation, entries: list[Entry], ckpts: list, *, raw: bool) -> None:
    """Score every entry through the daemon's evaluation: each raw checkpoint in its own round (no selection),
    then every average in one round at the newest step, whose best is published to OUT/best."""
    by_name = {e.name: e for e in entries}
    if raw:
        for c, e in zip(ckpts, [e for e in entries if e.kind == "raw"]):
            rnd = evaluation.new_round(c.step if c.step is not None else 0, _written_at(list(c.files)))
            snapshot_checkpoint(c, rnd.folder / "raw")
            rnd.candidates.append(Candidate(e.name, rnd.step, rnd.folder / "raw", kind="raw",
                                            info={"method": None, "options": None, "steps": [c.step]}))
            _take(evaluation.run_round(rnd, select=False), by_name)
    avgs = [e for e in entries if e.kind == "average"]
    newest = max((c.step for c in ckpts if c.step is not None), default=0)
    rnd = evaluation.new_round(newest, _written_at(list(ckpts[-1].files)))
    for e in avgs:
        options = {} if e.option == LAST else {e.option: e.horizon}
        rnd.candidates.append(Candidate(e.name, newest, e.model_dir, kind="average",
                                        info={"method": e.method, "options": options, "steps": e.steps}))
    _take(evaluation.run_round(rnd, select=True), by_name)


def _take(rows: list, by_name: dict[str, Entry]) -> None:
    for row in rows:
        e = by_name[row.candidate]
        e.metrics, e.error = row.metrics, row.error


def _print_table(rep: SweepReport, n_raw: int) -> None:
    from rich.console import Console
    from rich.table import Table

    m = rep.metric
    raw_best = None if rep.best_raw is None else rep.best_raw.value(m)
    table = Table(title=f"ckptavg sweep: {m} ({'lower' if rep.mode == 'min' else 'higher'} is better)")
    for col in ("average", "swept", "checkpoints", m, "vs best raw"):
        table.add_column(col, justify="left" if col in ("average", "swept") else "right", no_wrap=True)
    for rows in rep.by_method().values():
        for e in rows:
            v = e.value(m)
            shown = "failed" if e.error else "-" if v is None else f"{v:.6g}" + (" *" if e is rep.best_average else "")
            swept = f"newest {e.horizon:g}" if e.option == LAST else f"{e.option} {e.horizon:g}"
            vs = "" if v is None or not raw_best else f"{v / raw_best:.4f}x"
            table.add_row(e.name, swept, str(len(e.steps)), shown, vs)
    if rep.best_raw is not None:
        table.add_row(f"raw, best of {n_raw}", f"step {rep.best_raw.step}", "1", f"{raw_best:.6g}", "1.0000x",
                      style="dim")
    Console(soft_wrap=True).print(table)


@click.command()
@click.argument("inputs", nargs=-1, required=True, metavar="RUN_FOLDER | CHECKPOINT...")
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path),
              help="Folder for the results: sweep.json, sweep.csv, sweep.png, best/ (and averages/ with --keep-all).")
@click.option("--grid", "grids", multiple=True, required=True, metavar="METHOD:V1,V2,...",
              help="Averages to sweep, repeatable: ema:HALF_LIFES, lawa:WINDOWS, swa:START_STEPS, uniform:NEWEST_N, or "
                   "any registered method with its main option's values.")
@click.option("--last", default="all", show_default=True, metavar="N|all",
              help="With a run folder: sweep over its newest N complete checkpoints, or all of them.")
@click.option("--eval", "eval_command", metavar="CMD",
              help="Evaluate with a shell command; {model_dir}, {step}, {name} are filled in; it prints a JSON "
                   "object of metrics as its last stdout line.")
@click.option("--eval-python", metavar="MOD:FUNC", help="Evaluate with a Python function (state dict or folder in).")
@click.option("--eval-hf-perplexity", metavar="DATA", help="Evaluate causal-LM perplexity on a .txt/.jsonl file.")
@click.option("--config", "config_path", type=click.Path(path_type=Path),
              help="A TOML file whose [evaluate] table sets the evaluator (as for ckptavg watch).")
@click.option("--metric", help="Metric that ranks the averages (default: the evaluator's first).")
@click.option("--mode", type=click.Choice(["min", "max"]), help="Whether lower or higher --metric is better (default min).")
@click.option("--eval-timeout", type=float, help="Seconds before an --eval command is killed (default 3600).")
@click.option("--no-raw", is_flag=True, help="Do not evaluate the raw checkpoints (the baseline; also raw = false in "
              "the config's [evaluate]).")
@click.option("--keep-all", is_flag=True, help="Keep every average's model folder in OUT/averages/ (default: only best/).")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda or cuda:N.")
@click.option("--accum-dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True,
              help="Accumulator precision (outputs keep each tensor's source dtype).")
@click.option("--memory-budget", help="Host memory for long-lived accumulators (pickle inputs), e.g. 8GiB; averages "
              "beyond it fold through an fp32 disk store.")
@click.option("--scratch-dir", type=click.Path(path_type=Path), help="Folder for that disk store.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for the arithmetic (default: all cores: a sweep's time is its arithmetic, its one "
                   "read mostly waits on storage).")
@click.option("--fold-workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Threads folding different averages of a tensor piece at once, each with one arithmetic thread "
                   "(instead of --threads).")
@click.option("--state-key", help="Pickles: the entry that holds the state dict.")
@click.option("--strip-prefix", help="Pickles: a prefix to remove from every tensor name.")
@click.option("--force", is_flag=True, help="Replace an earlier sweep's results in OUT.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
def sweep(inputs: tuple[str, ...], output: Path, grids: tuple[str, ...], last: str, eval_command: str | None,
          eval_python: str | None, eval_hf_perplexity: str | None, config_path: Path | None, metric: str | None,
          mode: str | None, eval_timeout: float | None, no_raw: bool, keep_all: bool, device: str, accum_dtype: str,
          memory_budget: str | None, scratch_dir: Path | None, threads: int | None, fold_workers: int,
          state_key: str | None, strip_prefix: str | None, force: bool, progress: bool | None) -> None:
    """Which average is best? Fold a grid of averages from one read of each checkpoint, evaluate each (and
    every raw checkpoint as the baseline), and publish the best average to OUT/best.

    \b
    Examples:
      ckptavg sweep runs/exp1 --grid ema:100,200,500,1000 --grid lawa:3,5,10 --grid uniform:4,8 \\
          --eval-python mypkg.eval:score -o runs/exp1-sweep
      ckptavg sweep runs/exp1 --last 20 --grid swa:6000,8000 --eval 'python eval.py {model_dir}' -o sweep
    """
    points = parse_grid(grids)
    n_last: int | None = None
    if last != "all":
        n_last = int(last) if last.isdigit() else 0
        if n_last < 1:
            raise UsageError(f"--last {last!r}: expected a positive number of checkpoints or 'all'")
    tuning = {k: v for k, v in (("metric", metric), ("mode", mode)) if v is not None}
    evaluators = {k: v for k, v in (("command", eval_command), ("function", eval_python),
                                    ("data", eval_hf_perplexity)) if v is not None}
    if eval_timeout is not None:
        if "command" not in evaluators:
            raise UsageError("--eval-timeout applies to --eval commands only")
        tuning["timeout"] = eval_timeout
    table = _eval_table(config_path, evaluators, tuning)
    cfg = evaluate_config(table, source=str(config_path) if config_path else "flags")
    budget = None if memory_budget is None else parse_size(memory_budget, option="--memory-budget")
    strip = None if strip_prefix in (None, "auto") else ("" if strip_prefix == "none" else strip_prefix)
    ckpts, run_folders = resolve_inputs(inputs, last=n_last, steps=None, state_key=state_key, strip_prefix=strip)
    ckpts, _ = order_checkpoints(ckpts)
    _protect(output, [*run_folders, *_input_paths(ckpts)])
    _prepare_output(output, force)
    state = output / ".ckptavg"
    folder = output / "averages" if keep_all else state / f"sweep-{os.getpid()}"
    evaluation = Evaluation(cfg, output=output, state_path=state)
    started = time.perf_counter()
    try:
        with Engine(device=device, threads=threads or available_cpus(), fold_workers=fold_workers) as engine, \
                make_progress(sys.stderr.isatty() if progress is None else progress) as bar:
            fold = fold_grid(ckpts, points, folder, engine=engine, accum_dtype=getattr(torch, accum_dtype),
                             memory_budget=budget, scratch_dir=scratch_dir, protected=run_folders, progress=bar)
        folded = time.perf_counter() - started
        raw = cfg.raw and not no_raw
        entries = [*(raw_entries(ckpts) if raw else []), *average_entries(fold)]
        _evaluate(evaluation, entries, ckpts, raw=raw)
    finally:
        evaluation.close()
        if not keep_all:
            shutil.rmtree(folder, ignore_errors=True)
    rep = rank(entries, metric=evaluation.metric or cfg.metric, mode=cfg.mode, read_ratio=fold.read_ratio)
    try:
        paths = rep.write(output)
    except OutputError as e:  # matplotlib missing: the table and the JSON/CSV are the result
        log.warning("%s", e)
        paths = {}
    _print_table(rep, len(ckpts) if raw else 0)
    click.echo(rep.verdict())
    if evaluation.best is not None:
        click.echo(f"published: {output / BEST_LINK} -> {os.readlink(output / BEST_LINK)}")
    log.info("%d averages of %d checkpoint(s) folded in %.2f s from one read (%.2fx the checkpoints' bytes); "
             "evaluated in %.2f s", len(points), len(ckpts), folded, fold.read_ratio,
             time.perf_counter() - started - folded)
    for kind, p in paths.items():
        click.echo(f"{kind}: {p}")
