"""``ckptavg average``: one-shot averaging of saved checkpoints."""

from __future__ import annotations

import glob
import logging
import sys
from pathlib import Path

import click
import torch

from ckptavg.averaging.engine import Engine
from ckptavg.averaging.rules import parse_rules
from ckptavg.cli.methodflags import DerivedOptionsCommand, average_flags, parse_methods
from ckptavg.cli.progressbar import make_progress
from ckptavg.distributed import average_on_ranks, launch_from_env
from ckptavg.errors import CheckpointNotFoundError, IncompleteCheckpointError, UnknownFormatError, UsageError
from ckptavg.oneshot import average_checkpoints, build_averages
from ckptavg.reading.checkpoint import Checkpoint, open_checkpoint, open_remote_many
from ckptavg.reading.formats import deepspeed as dsf
from ckptavg.reading.discover import find_candidates, latest_complete, remote_latest_complete
from ckptavg.reading.names import is_noise
from ckptavg.reading.remote import is_run_folder, is_url, looks_like_url, parse_storage_options, redact_url
from ckptavg.units import format_bytes, parse_size

log = logging.getLogger("ckptavg.cli")

def _expand(inputs: tuple[str, ...]) -> list[str]:
    """Expand globs that the shell left alone (quoted), dropping staging names."""
    out: list[str] = []
    for text in inputs:
        if is_url(text):  # object storage: taken as written (no glob expansion over a bucket)
            out.append(text)
        elif not Path(text).exists() and glob.has_magic(text):
            matches = sorted(glob.glob(text))
            if not matches:
                raise CheckpointNotFoundError("matches nothing", path=text)
            out.extend(matches)
        else:
            out.append(text)
    kept = []
    for text in out:
        if is_noise(Path(text).name):
            log.warning("ignoring %s: a staging or hidden name, not a finished checkpoint", text)
            continue
        kept.append(text)
    return kept


def _parse_list(text: str | None, option: str, kind: type) -> list | None:
    if text is None:
        return None
    try:
        return [kind(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise UsageError(f"{option} {text!r}: expected comma-separated numbers") from None


def resolve_inputs(inputs: tuple[str, ...], *, last: int | None, steps: list[int] | None,
                   state_key: str | None, strip_prefix: str | None,
                   deepspeed_weights: str = "fp32", kind: str | None = None,
                   storage_options: dict | None = None) -> tuple[list[Checkpoint], list[Path]]:
    """Checkpoints named on the command line, and the run folders they came from (never written to).
    URLs (``s3://...``) are read from object storage with ``storage_options``."""
    paths = _expand(inputs)
    if not paths:
        raise UsageError("no checkpoints given (all inputs were staging or hidden names)")
    opts = {"state_key": state_key, "strip_prefix": strip_prefix, "deepspeed_weights": deepspeed_weights}
    run_folders: list[Path] = []
    if len(paths) == 1 and is_url(paths[0]) and (
            last is not None or is_run_folder(paths[0], storage_options=storage_options)):
        if steps is not None or kind is not None:
            raise UsageError("--steps and --checkpoint-kind cannot be used with a run folder in object storage")
        ckpts = remote_latest_complete(paths[0], last or sys.maxsize, storage_options=storage_options)
        log.info("%s: using %d checkpoint(s): %s", redact_url(paths[0]), len(ckpts), ", ".join(c.path.name for c in ckpts))
        return ckpts, []
    if any(is_url(p) for p in paths):
        opts["storage_options"] = storage_options  # type: ignore[assignment]
    if len(paths) == 1 and Path(paths[0]).is_dir() and (last is not None or _is_run_folder(Path(paths[0]))):
        root = Path(paths[0])
        if steps is not None:
            raise UsageError("--steps cannot be used with a run folder; the steps come from the checkpoint names")
        ckpts = latest_complete(root, last or sys.maxsize, kind=kind, **opts)
        log.info("%s: using %d checkpoint(s): %s", root, len(ckpts), ", ".join(c.path.name for c in ckpts))
        return ckpts, [root]
    if kind is not None:
        raise UsageError("--checkpoint-kind takes a single run folder (e.g. `ckptavg average runs/fairseq --last 5 "
                         "--checkpoint-kind epoch`)")
    if last is not None:
        raise UsageError("--last N takes a single run folder (e.g. `ckptavg average runs/exp1 --last 5`)")
    if steps is not None and len(steps) != len(paths):
        raise UsageError(f"--steps has {len(steps)} values for {len(paths)} checkpoints")
    ckpts = []
    remote = {}  # URLs, indexed several at once (each is a few round trips to the store)
    if sum(is_url(p) for p in paths) > 1:
        urls = [p for p in paths if is_url(p)]
        remote = dict(zip(urls, open_remote_many(urls, storage_options=storage_options)))
    for i, p in enumerate(paths):
        if isinstance(remote.get(p), Exception):
            raise remote[p]
        ckpt = remote[p] if p in remote else open_checkpoint(p, step=None if steps is None else steps[i], **opts)
        if p in remote and steps is not None:
            ckpt.step, ckpt.step_source = steps[i], "given"
        if ckpt.incomplete:
            raise IncompleteCheckpointError(ckpt.incomplete, path=ckpt.path,
                                            hint="wait until the trainer has finished writing it")
        ckpts.append(ckpt)
    return ckpts, run_folders


def _is_run_folder(path: Path) -> bool:
    if len(dsf.tag_folders(path)) > 1:  # a DeepSpeed save folder with several global_step tags
        return True
    try:
        open_checkpoint(path)
        return False
    except (CheckpointNotFoundError, UnknownFormatError):
        return bool(find_candidates(path))


@click.command(cls=DerivedOptionsCommand, derive=average_flags)
@click.argument("inputs", nargs=-1, required=True, metavar="CHECKPOINT... | RUN_FOLDER")
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path),
              help="Output model folder (with several methods: a folder holding one subfolder per average).")
@click.option("--method", "methods", multiple=True, metavar="NAME[:VALUE]",
              help="An averaging method (default uniform; see the method options below); repeat for several "
                   "averages in one read (ema:2000, lawa:5, swa:6000 set the main option inline).")
@click.option("--weights", help="Comma-separated weights, one per input checkpoint (weighted mean).")
@click.option("--last", type=int, help="With a run folder: its newest N complete checkpoints.")
@click.option("--steps", help="Comma-separated training steps, one per input (when names carry none).")
@click.option("--checkpoint-kind", type=click.Choice(["epoch", "update"]),
              help="With a run folder: only fairseq epoch checkpoints (checkpoint<E>.pt) or update checkpoints "
                   "(checkpoint_<E>_<U>.pt), like fairseq's average_checkpoints.py --num-epoch-checkpoints / "
                   "--num-update-checkpoints (default: both, ordered by num_updates).")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda or cuda:N.")
@click.option("--accum-dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True,
              help="Accumulator precision (outputs keep each tensor's source dtype).")
@click.option("--rule", "rules", multiple=True, metavar="GLOB=ACTION",
              help="Per-tensor rule, first match wins: GLOB=latest | GLOB=exclude | GLOB=half-life:H.")
@click.option("--on-shape-change", type=click.Choice(["error", "reset"]), default="error", show_default=True,
              help="A tensor whose shape or dtype changes: stop with an error, or restart its average.")
@click.option("--output-format", type=click.Choice(["safetensors", "dcp"]), default="safetensors", show_default=True,
              help="safetensors: a model folder from_pretrained loads; dcp: a torch.distributed.checkpoint folder "
                   "(.metadata + one .distcp file) that dcp.load reads into a model's state dict.")
@click.option("--shard-size", default="5GB", show_default=True, help="Largest output shard (e.g. 500MB, 2GB).")
@click.option("--memory-budget", help="Host memory for long-lived accumulators (pickle inputs), e.g. 8GiB; averages "
              "beyond it fold through an fp32 disk store in --scratch-dir.")
@click.option("--scratch-dir", type=click.Path(path_type=Path),
              help="Folder for the disk store (default: a hidden folder beside -o, removed at the end).")
@click.option("--state-key", help="Pickles: the entry that holds the state dict (e.g. 'ema' or 'model/state').")
@click.option("--strip-prefix", help="Pickles: a prefix to remove from every tensor name ('none' to keep "
              "Lightning's module prefix; 'module.' and '_orig_mod.' are always removed).")
@click.option("--deepspeed-weights", type=click.Choice(["fp32", "module"]), default="fp32", show_default=True,
              help="DeepSpeed checkpoints: the fp32 master weights (gathered from the ZeRO partitions) or the "
                   "module's bf16/fp16 weights (not under ZeRO-3).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for the arithmetic (default: all cores but one).")
@click.option("--allow-nonfinite", is_flag=True, help="Average tensors holding NaN/Inf instead of stopping.")
@click.option("--allow-mixed-models", is_flag=True,
              help="Average checkpoints of different models (config model_type/architectures, or tensor sets that "
                   "each hold names the other lacks) instead of stopping.")
@click.option("--storage-option", "storage_option", multiple=True, metavar="KEY=VALUE",
              help="For s3:// (gs://, any fsspec URL) inputs: an option of the storage client, e.g. "
                   "endpoint_url=http://127.0.0.1:9000 (repeatable; credentials come from the provider's chain).")
@click.option("--force", is_flag=True, help="Replace an existing output folder (atomically).")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
def average(inputs: tuple[str, ...], output: Path, methods: tuple[str, ...], weights: str | None,
            last: int | None, steps: str | None, checkpoint_kind: str | None, device: str, accum_dtype: str, rules: tuple[str, ...],
            on_shape_change: str, shard_size: str, memory_budget: str | None, scratch_dir: Path | None,
            state_key: str | None, strip_prefix: str | None, deepspeed_weights: str, threads: int | None,
            allow_nonfinite: bool, allow_mixed_models: bool, force: bool, progress: bool | None, output_format: str,
            storage_option: tuple[str, ...] = (), **method_options: object) -> None:
    """Average saved checkpoints into a model folder that from_pretrained loads.

    \b
    Examples:
      ckptavg average runs/exp1/checkpoint-{8000..10000..500} -o out/uniform
      ckptavg average runs/exp1/checkpoint-* --method ema --half-life 2000 -o out/ema
      ckptavg average runs/exp1/checkpoint-* --method lawa --window 5 -o out/lawa
      ckptavg average runs/exp1/checkpoint-* --method swa --start-step 6000 -o out/swa
      ckptavg average runs/exp1/checkpoint-* --method ema:2000 --method lawa:5 -o out   # out/ema-2000, out/lawa-5
      ckptavg average a.safetensors b.safetensors --weights 0.3,0.7 -o out/mix
      ckptavg average runs/exp1 --last 5 -o out/last5
      ckptavg average outputs/checkpoint --last 4 --method ema:200 --output-format dcp -o out/ema-dcp
      ckptavg average runs/fairseq --last 5 --checkpoint-kind update -o out/last5-updates
      ckptavg average s3://bucket/runs/exp1 --last 5 --method ema:2000 -o out/ema   # object storage (ckptavg[s3])
    """
    storage = parse_storage_options(storage_option)
    if looks_like_url(output):
        raise UsageError(f"-o {output}: the output is a local folder (object storage is read, not written)",
                         hint="write locally, then upload the folder (e.g. aws s3 cp --recursive)")
    weight_list = _parse_list(weights, "--weights", float)
    step_list = _parse_list(steps, "--steps", int)
    if last is not None and last < 1:
        raise UsageError(f"--last must be at least 1, got {last}")
    strip = None if strip_prefix in (None, "auto") else ("" if strip_prefix == "none" else strip_prefix)
    specs = parse_methods(methods or ("uniform",), method_options, weighted=weight_list is not None)
    if weight_list is not None and any(s.method != "uniform" for s in specs):
        raise UsageError("--weights applies to the uniform (weighted) mean only")
    max_shard = parse_size(shard_size, option="--shard-size")
    budget = None if memory_budget is None else parse_size(memory_budget, option="--memory-budget")
    if scratch_dir is not None and scratch_dir.exists() and not scratch_dir.is_dir():
        raise UsageError(f"--scratch-dir {scratch_dir}: not a folder")
    launch = launch_from_env()
    if launch is not None:  # started by torchrun: this rank's part (README "Beyond one machine")
        if launch.rank != 0:  # rank 0 tells the story; every rank still prints its error line
            logging.getLogger("ckptavg").setLevel(max(logging.WARNING, logging.getLogger("ckptavg").level))
        if output_format != "safetensors" or budget is not None or scratch_dir is not None:
            raise UsageError("under torchrun, --output-format dcp, --memory-budget and --scratch-dir are not "
                             "available yet", hint="run without torchrun")
        result = average_on_ranks(
            launch, lambda: resolve_inputs(inputs, last=last, steps=step_list, state_key=state_key, strip_prefix=strip,
                                           storage_options=storage),
            specs, output, weights=weight_list, device=device, threads=threads, check_finite=not allow_nonfinite,
            build=lambda dev: build_averages(specs, rules=parse_rules(rules), accum_dtype=getattr(torch, accum_dtype),
                                             on_shape_change=on_shape_change, device=dev),
            max_shard_bytes=max_shard, force=force, allow_mixed_models=allow_mixed_models)
        if launch.rank == 0:
            for name, path in result.outputs.items():
                click.echo(f"{name}: {path}")
        return
    ckpts, run_folders = resolve_inputs(inputs, last=last, steps=step_list, state_key=state_key,
                                        strip_prefix=strip, deepspeed_weights=deepspeed_weights, kind=checkpoint_kind,
                                        storage_options=storage)
    if weight_list is not None and len(weight_list) != len(ckpts):
        raise UsageError(f"--weights has {len(weight_list)} values for {len(ckpts)} checkpoints")
    show_bar = sys.stderr.isatty() if progress is None else progress
    with Engine(device=device, check_finite=not allow_nonfinite, threads=threads) as engine:
        averages = build_averages(specs, rules=parse_rules(rules), accum_dtype=getattr(torch, accum_dtype),
                                  on_shape_change=on_shape_change, device=engine.device, memory_budget=budget)
        with make_progress(show_bar) as bar:
            result = average_checkpoints(ckpts, averages, output, weights=weight_list, engine=engine,
                                         max_shard_bytes=max_shard, force=force, protected=run_folders,
                                         progress=bar, memory_budget=budget, scratch_dir=scratch_dir,
                                         allow_mixed_models=allow_mixed_models, output_format=output_format)
    rate = result.bytes_read / result.seconds / 1e9 if result.seconds else 0.0
    for name, path in result.outputs.items():
        click.echo(f"{name}: {path}")
    on_disk = [name for name, where in result.placement.items() if where == "disk"]
    log.info("read %s from %d checkpoint(s) in %.2f s (%.2f GB/s, %s, %s%s)", format_bytes(result.bytes_read),
             len(ckpts), result.seconds, rate, result.schedule, engine.device,
             f", accumulators of {', '.join(on_disk)} on disk" if on_disk else "")
