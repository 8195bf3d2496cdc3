"""``ckptavg inspect``: what a checkpoint (or a run folder) holds, from headers only."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import click

from ckptavg.dtypes import short_name
from ckptavg.errors import CheckpointError, CheckpointNotFoundError, UnknownFormatError
from ckptavg.reading.checkpoint import Checkpoint, open_checkpoint, open_remote_checkpoint
from ckptavg.reading.discover import find_candidates
from ckptavg.reading.formats import deepspeed as dsf
from ckptavg.reading.ready import Readiness, check_ready, remote_ready
from ckptavg.reading.remote import is_run_folder, is_url, list_run, parse_storage_options, store_for
from ckptavg.units import format_bytes


def readiness(path: Path, settle: float, deepspeed_weights: str = "fp32") -> Readiness:
    """The daemon's verdict on ``path`` now (ready.py's rule for its writer); never raises."""
    try:
        return check_ready(path, settle=settle, deepspeed_weights=deepspeed_weights)
    except OSError as e:
        return Readiness("waiting", f"changed while being looked at ({e.strerror or e})")


def describe(ckpt: Checkpoint, ready: Readiness | None = None) -> dict:
    by_dtype: Counter = Counter()
    count: Counter = Counter()
    for ref in ckpt.tensors.values():
        by_dtype[short_name(ref.dtype)] += ref.nbytes
        count[short_name(ref.dtype)] += 1
    return {
        "path": str(ckpt.path),
        "format": ckpt.format,
        "step": ckpt.step,
        "step_source": ckpt.step_source or None,
        "complete": ckpt.incomplete is None,
        "incomplete_reason": ckpt.incomplete,
        **({"ranks": int(ckpt.metadata["deepspeed_ranks"]), "deepspeed_weights": ckpt.metadata["deepspeed_weights"]}
           if "deepspeed_ranks" in ckpt.metadata else {}),
        "ready": ready.state if ready else None,
        "ready_reason": ready.reason if ready else None,
        "files": [str(f) for f in ckpt.files],
        "tensors": len(ckpt.tensors),
        "bytes": ckpt.nbytes,
        "dtypes": {k: {"tensors": count[k], "bytes": v} for k, v in sorted(by_dtype.items())},
        "tied": ckpt.aliases,
        "fingerprint": ckpt.fingerprint,
        "config_files": sorted(p.name for p in ckpt.meta_dir.iterdir() if p.suffix == ".json") if ckpt.meta_dir else [],
    }


def _inspect_remote(url: str, show_tensors: bool, as_json: bool, settle: float, storage: dict) -> None:
    """``ckptavg inspect s3://...``: a checkpoint in object storage, or a run folder of them (headers only)."""
    store, path = store_for(url, storage)
    if is_run_folder(url, storage_options=storage):
        rows = []
        for p, _ in list_run(store, path):
            ready = remote_ready(store, p, settle=settle)
            c = ready.checkpoint
            rows.append({"path": str(store.location(p)), "step": c.step if c else None,
                         "step_source": (c.step_source or None) if c else None, "format": c.format if c else None,
                         "bytes": c.nbytes if c else None, "complete": c is not None and c.incomplete is None,
                         "note": None if c else ready.reason, "ready": ready.state, "ready_reason": ready.reason})
        _print_run(str(store.location(path)), rows, as_json)
        return
    ready = remote_ready(store, path, settle=settle)
    ckpt = ready.checkpoint or open_remote_checkpoint(url, store=store)
    _print_one(ckpt, ready, show_tensors, as_json)


@click.command()
@click.argument("path", type=str)
@click.option("--tensors", "show_tensors", is_flag=True, help="List every tensor (name, dtype, shape, bytes, file).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--state-key", help="Pickles: the entry that holds the state dict.")
@click.option("--deepspeed-weights", type=click.Choice(["fp32", "module"]), default="fp32", show_default=True,
              help="DeepSpeed checkpoints: the fp32 master weights or the module's weights.")
@click.option("--settle", type=float, default=5.0, show_default=True,
              help="Seconds a checkpoint must stay unmodified to count as ready (as `ckptavg watch --settle`).")
@click.option("--storage-option", "storage_option", multiple=True, metavar="KEY=VALUE",
              help="For s3:// (any fsspec URL): an option of the storage client, e.g. endpoint_url=http://host:9000.")
def inspect(path: str, show_tensors: bool, as_json: bool, state_key: str | None, deepspeed_weights: str,
            settle: float, storage_option: tuple[str, ...]) -> None:
    """Show a checkpoint's format, step (and where it came from), tensors, dtypes, bytes, shards, completeness
    and readiness (whether `ckptavg watch` would fold it now, by its writer's rule, and why).

    Reads headers only (pickles: a data-free load). Given a run folder, lists its checkpoints.

    \b
    Examples:
      ckptavg inspect runs/exp1/checkpoint-9000
      ckptavg inspect runs/exp1/checkpoint-9000 --tensors
      ckptavg inspect runs/exp1            # every checkpoint of the run
      ckptavg inspect s3://bucket/runs/exp1/checkpoint-9000   # object storage: headers by ranged reads
    """
    if is_url(path):
        _inspect_remote(path, show_tensors, as_json, settle, parse_storage_options(storage_option))
        return
    path = Path(path)
    if path.is_dir() and len(dsf.tag_folders(path)) > 1:  # a DeepSpeed save folder: its global_step tags
        _inspect_run(path, as_json, settle)
        return
    ready = readiness(path, settle, deepspeed_weights)
    ckpt = ready.checkpoint if state_key is None else None
    if ckpt is None:
        try:
            ckpt = open_checkpoint(path, state_key=state_key, deepspeed_weights=deepspeed_weights)
        except (CheckpointNotFoundError, UnknownFormatError):
            if path.is_dir() and find_candidates(path):
                _inspect_run(path, as_json, settle)
                return
            raise
    _print_one(ckpt, ready, show_tensors, as_json)


def _print_one(ckpt: Checkpoint, ready: Readiness | None, show_tensors: bool, as_json: bool) -> None:
    info = describe(ckpt, ready)
    if show_tensors:
        info["tensor_list"] = [
            {"name": r.name, "dtype": short_name(r.dtype), "shape": list(r.shape), "bytes": r.nbytes, "file": r.file.name}
            for r in ckpt.tensors.values()
        ]
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"path:        {info['path']}")
    click.echo(f"format:      {info['format']}")
    click.echo(f"step:        {info['step']}" + (f" (from {info['step_source']})" if info["step_source"] else ""))
    click.echo(f"complete:    {'yes' if info['complete'] else 'no: ' + str(info['incomplete_reason'])}")
    click.echo(f"ready:       {info['ready']}: {info['ready_reason']}")
    if "ranks" in info:
        click.echo(f"ranks:       {info['ranks']} (DeepSpeed, {info['deepspeed_weights']} weights)")
    click.echo(f"tensors:     {info['tensors']} ({format_bytes(info['bytes'])})")
    for dt, d in info["dtypes"].items():
        click.echo(f"  {dt:<10} {d['tensors']:>6} tensors  {format_bytes(d['bytes']):>12}")
    click.echo(f"files:       {len(info['files'])}")
    for f in info["files"]:
        click.echo(f"  {Path(f).name}")
    if info["tied"]:
        click.echo("tied:        " + ", ".join(f"{a} -> {t}" for a, t in info["tied"].items()))
    if info["config_files"]:
        click.echo("config:      " + ", ".join(info["config_files"]))
    click.echo(f"fingerprint: {info['fingerprint']}")
    if show_tensors:
        click.echo("")
        width = max(len(t["name"]) for t in info["tensor_list"])
        for t in info["tensor_list"]:
            click.echo(f"{t['name']:<{width}}  {t['dtype']:<9} {str(t['shape']):<20} {format_bytes(t['bytes']):>10}  {t['file']}")


def _inspect_run(root: Path, as_json: bool, settle: float) -> None:
    rows = []
    for p in find_candidates(root):
        ready = readiness(p, settle)
        row = {"path": str(p), "step": None, "step_source": None, "format": None, "bytes": None, "complete": False,
               "note": None, "ready": ready.state, "ready_reason": ready.reason}
        try:
            c = ready.checkpoint or open_checkpoint(p)
            row.update(step=c.step, step_source=c.step_source or None, format=c.format, bytes=c.nbytes,
                       complete=c.incomplete is None, note=c.incomplete)
        except CheckpointError as e:
            row["note"] = str(e)
        rows.append(row)
    _print_run(str(root), rows, as_json)


def _print_run(root: str, rows: list[dict], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"run": str(root), "checkpoints": rows}, indent=2))
        return
    click.echo(f"run folder {root}: {len(rows)} checkpoint(s)")
    for r in rows:
        size = format_bytes(r["bytes"]) if r["bytes"] is not None else "-"
        state = "complete" if r["complete"] else f"incomplete: {r['note']}"
        click.echo(f"  {Path(r['path']).name:<40} step {str(r['step']):>8}  {str(r['format']):<20} {size:>10}  {state}")
        click.echo(f"  {'':<40} step from {r['step_source'] or '-'}; {r['ready']}: {r['ready_reason']}")
