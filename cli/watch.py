"""``ckptavg watch``: the sidecar daemon beside a training job."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ckptavg.averaging.methods import METHODS
from ckptavg.cli.methodflags import DerivedOptionsCommand, watch_averages, watch_flags
from ckptavg.daemon.commit import refuse_ranks_state
from ckptavg.daemon.config import config_from_flags, load_config
from ckptavg.daemon.service import Service
from ckptavg.distributed import launch_from_env
from ckptavg.errors import UsageError
from ckptavg.reading.remote import looks_like_url, parse_storage_options

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@click.command(cls=DerivedOptionsCommand, derive=watch_flags)
@click.argument("run", required=False, type=str)
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Where averages are published as <name>/.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="TOML config (see systemd/exp1.toml).")
@click.option("--state-dir", type=click.Path(path_type=Path), help="Daemon state (default OUTPUT/.ckptavg).")
@click.option("--device", help="auto (CUDA when present), cpu, cuda or cuda:N.")
@click.option("--poll", "poll", flag_value="always", default=None, help="Poll instead of file events (network mounts).")
@click.option("--poll-interval", type=float, help="Seconds between full rescans (default 2).")
@click.option("--settle", type=float, help="Seconds a bare file must stay unmodified (default 5).")
@click.option("--marker", help="Glob that marks a checkpoint finished (e.g. COMPLETE).")
@click.option("--publish-every", type=int, help="Publish after this many folds (default 1).")
@click.option("--persist-every", type=int, help="Persist the state after this many folds (default 1).")
@click.option("--rule", "rules", multiple=True, metavar="GLOB=ACTION",
              help="Per-tensor rule for every average, first match wins: GLOB=latest | GLOB=exclude | "
                   "GLOB=half-life:H (repeatable; replaces the config's rules).")
@click.option("--threads", type=int, help="Torch CPU threads (default 1; at most 4 per CPU).")
@click.option("--deepspeed-weights", type=click.Choice(["fp32", "module"]), default=None,
              help="DeepSpeed checkpoints: the fp32 master weights (default) or the module's bf16/fp16 weights.")
@click.option("--accum-dtype", metavar="float32|float64", help="Accumulator dtype (default float32).")
@click.option("--on-shape-change", type=click.Choice(["error", "reset"]), default=None,
              help="A tensor whose shape or dtype changes: skip that checkpoint with an error (default), or restart "
                   "the tensor's averages there.")
@click.option("--memory-budget", metavar="SIZE",
              help="Host memory for accumulators (e.g. 8GiB); averages beyond it live in STATE/store on disk.")
@click.option("--eval", "eval_command", metavar="CMD",
              help="Evaluate with a shell command; {model_dir}, {step}, {name} are filled in; it prints a JSON "
                   "object of metrics as its last stdout line.")
@click.option("--eval-python", metavar="MOD:FUNC", help="Evaluate with a Python function (state dict or folder in).")
@click.option("--eval-hf-perplexity", metavar="DATA", help="Evaluate causal-LM perplexity on a .txt/.jsonl file.")
@click.option("--metric", help="Metric that picks the best model (default: the evaluator's first).")
@click.option("--mode", type=click.Choice(["min", "max"]), help="Whether lower or higher --metric is better (default min).")
@click.option("--eval-every", type=int, help="An evaluation round every N folds (default 1).")
@click.option("--eval-timeout", type=float, help="Seconds before an --eval command is killed (default 3600).")
@click.option("--hub", "hub_repo", metavar="ORG/NAME", help="Push the best model to this Hugging Face Hub repo.")
@click.option("--hub-revision", metavar="BRANCH", help="Hub branch to push to (default main).")
@click.option("--hub-private", is_flag=True, default=None, help="Create the Hub repo private if it does not exist.")
@click.option("--storage-option", "storage_option", multiple=True, metavar="KEY=VALUE",
              help="For a RUN in object storage (s3://, gs://, any fsspec URL): an option of the storage client, "
                   "e.g. endpoint_url=http://127.0.0.1:9000 (repeatable; over the config's [storage] table).")
def watch(run: str | None, output: Path | None, config_path: Path | None, state_dir: Path | None, device: str | None, poll: str | None,
          poll_interval: float | None, settle: float | None, marker: str | None, publish_every: int | None,
          persist_every: int | None, rules: tuple[str, ...], threads: int | None, deepspeed_weights: str | None,
          accum_dtype: str | None, on_shape_change: str | None,
          memory_budget: str | None, eval_command: str | None, eval_python: str | None,
          eval_hf_perplexity: str | None, metric: str | None, mode: str | None, eval_every: int | None,
          eval_timeout: float | None, hub_repo: str | None, hub_revision: str | None, hub_private: bool | None,
          storage_option: tuple[str, ...] = (), **method_flags: tuple) -> None:
    """Watch a training run's checkpoint folder and keep averages of its checkpoints up to date.

    \b
    Examples:
      ckptavg watch runs/exp1 -o runs/exp1-avg --ema 2000 --lawa 5 --swa-start 6000
      ckptavg watch runs/exp1 -o avg --ema 2000 --lawa 5 \\
          --eval 'python eval.py --model {model_dir}' --metric val_loss --mode min --hub myorg/exp1-averaged
      ckptavg watch --config exp1.toml
      ckptavg watch s3://bucket/runs/exp1 -o avg --ema 2000 --lawa 5   # polled, mirrored locally (ckptavg[s3])
    """
    options = {"state_dir": str(state_dir) if state_dir else None, "device": device, "poll": poll,
               "poll_interval": poll_interval, "settle": settle, "marker": marker, "publish_every": publish_every,
               "persist_every": persist_every, "memory_budget": memory_budget, "rules": list(rules) or None,
               "threads": threads, "accum_dtype": accum_dtype, "deepspeed_weights": deepspeed_weights,
               "on_shape_change": on_shape_change}
    evaluators = {k: v for k, v in (("command", eval_command), ("function", eval_python),
                                    ("data", eval_hf_perplexity)) if v is not None}
    if len(evaluators) > 1:
        raise UsageError("give one of --eval, --eval-python, --eval-hf-perplexity")
    tuning = {k: v for k, v in (("metric", metric), ("mode", mode), ("every", eval_every)) if v is not None}
    if evaluators:
        table = {**evaluators, **tuning}
        if eval_timeout is not None:
            if "command" not in evaluators:
                raise UsageError("--eval-timeout applies to --eval commands only")
            table["timeout"] = eval_timeout
        options["evaluate"] = table
    elif tuning or eval_timeout is not None:
        if config_path is None:
            raise UsageError("--metric/--mode/--eval-every/--eval-timeout need an evaluator: --eval CMD, "
                             "--eval-python MOD:FUNC or --eval-hf-perplexity DATA")
        options["evaluate_overrides"] = {**tuning, **({"timeout": eval_timeout} if eval_timeout is not None else {})}
    if hub_repo is not None:
        options["hub"] = {"repo": hub_repo, **({"revision": hub_revision} if hub_revision else {}),
                          **({"private": True} if hub_private else {})}
    elif hub_revision or hub_private:
        raise UsageError("--hub-revision/--hub-private need --hub ORG/NAME")
    if output is not None and looks_like_url(output):
        raise UsageError(f"-o {output}: the averages are published to a local folder (object storage is read, "
                         "not written)", hint="publish locally; --hub pushes the best model to the Hugging Face Hub")
    if storage_option:
        storage = parse_storage_options(storage_option)
        if config_path is not None:
            options["storage"] = {**dict(load_config_storage(config_path)), **storage}
        else:
            options["storage"] = storage
    tables = watch_averages(method_flags)
    flags = "/".join(f for f in (cls.flag_for_watch() for cls in METHODS.values()) if f)
    if config_path is not None:
        if tables:
            raise UsageError(f"{flags} cannot be combined with --config; add [[average]] tables instead")
        overrides = {**options, "watch": str(run) if run else None, "output": str(output) if output else None}
        cfg = load_config(config_path, **overrides)
    else:
        if run is None or output is None:
            raise UsageError("give RUN and -o OUTPUT (or --config FILE)")
        if not tables:
            raise UsageError(f"ask for at least one average: {flags}")
        cfg = config_from_flags(str(run), str(output), tables, **options)
    launch = launch_from_env()
    if launch is not None:  # started by torchrun: this rank's part (README "Beyond one machine")
        from ckptavg.daemon.ranks import RankService

        raise SystemExit(RankService(cfg, launch=launch, config_path=config_path).run())
    refuse_ranks_state(cfg.state_path)
    raise SystemExit(Service(cfg, config_path=config_path).run())


def load_config_storage(path: Path) -> dict:
    """The config file's ``[storage]`` table (``--storage-option`` flags are laid over it)."""
    try:
        table = tomllib.loads(Path(path).read_text(encoding="utf-8")).get("storage", {})
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return {}  # load_config says what is wrong with the file
    return table if isinstance(table, dict) else {}
