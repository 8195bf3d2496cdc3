"""A checkpoint on disk: what format it is, which step, which tensors, and how to read them.

:func:`open_checkpoint` recognises a checkpoint whichever way it was saved:

* a folder with ``*.safetensors.index.json`` (sharded safetensors), ``model.safetensors``
  (or a single ``*.safetensors``), ``pytorch_model.bin.index.json`` or
  ``pytorch_model.bin`` / a single ``.pt``/``.pth``/``.ckpt``, or a torch.distributed.checkpoint
  folder (``.metadata`` + ``*.distcp``, or accelerate's ``pytorch_model_fsdp_0/`` inside it);
* a file: ``.safetensors``, ``.pt``/``.pth``/``.bin``, Lightning ``.ckpt``, or an index.

A fairseq file (weights under ``model`` beside ``optimizer_history``) is format ``fairseq`` and its step is
the ``num_updates`` it records; an accelerate ``save_state`` folder is judged complete by accelerate's rule
(:mod:`ckptavg.reading.formats.accelerate`) and its automatic ``checkpoint_<i>`` name gives a save number.

Opening reads headers only (pickles: a data-free ``meta`` load). Tensor bytes are
read later, one tensor at a time, by :class:`CheckpointReader`.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import shutil
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ckptavg.errors import CheckpointError, CheckpointNotFoundError, UnknownFormatError
from ckptavg.reading.fileio import FileCache, open_regular
from ckptavg.reading.formats import accelerate as acc
from ckptavg.reading.formats import dcp
from ckptavg.reading.formats import deepspeed as dsf
from ckptavg.reading.formats import pickle as pkl
from ckptavg.reading.formats import safetensors as st
from ckptavg.reading.formats.refs import FormatIndex, TensorRef, TensorSource, combine_fingerprints
from ckptavg.reading.names import PICKLE_SUFFIXES, is_noise, is_side_file
from ckptavg.reading.remote import ObjectStore, index_remote, is_url
from ckptavg.reading.steps import epoch_from_name, step_from_name
from ckptavg.redact import warn_once

log = logging.getLogger(__name__)

__all__ = ["Checkpoint", "CheckpointReader", "open_checkpoint", "open_remote_checkpoint", "open_remote_many"]

@dataclass
class Checkpoint:
    """A checkpoint indexed from headers: tensors, step, fingerprint. Holds no tensor data."""

    path: Path
    format: str  # safetensors | safetensors-sharded | torch | torch-sharded | lightning | dcp
    tensors: dict[str, TensorRef]
    step: int | None
    step_source: str
    fingerprint: str
    files: list[Path]
    meta_dir: Path | None = None  # where config.json / tokenizer files live
    weights_name: str = "model"
    aliases: dict[str, str] = field(default_factory=dict)  # tied name -> stored name
    metadata: dict[str, str] = field(default_factory=dict)
    incomplete: str | None = None  # why the writer may not be done, or None
    model: str | None = None  # config.json's model_type and architectures, e.g. "gpt2 (GPT2LMHeadModel)"
    zero3: bool = False  # saved by DeepSpeed ZeRO-3: an empty float tensor is a partitioned placeholder
    # reads tensors that are not one byte range (offset None, not a pickle): DCP chunks, DeepSpeed partitions
    source: Callable[[FileCache], TensorSource] | None = field(default=None, repr=False)
    _pickles: list[pkl.PickleIndex] = field(default_factory=list, repr=False)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def label(self) -> str:
        return f"{self.path.name} (step {self.step})" if self.step is not None else self.path.name

    def reader(self, files: FileCache | None = None) -> "CheckpointReader":
        return CheckpointReader(self, files)


class CheckpointReader:
    """Reads one tensor at a time into private CPU memory (never a memory map).

    safetensors tensors are read with ``pread`` straight from their byte range; a
    pickle file is loaded whole (with ``weights_only=True``) the first time one of
    its tensors is asked for, and dropped when another file is needed.
    """

    def __init__(self, checkpoint: Checkpoint, files: FileCache | None = None) -> None:
        self.checkpoint = checkpoint
        self._own = files is None
        self._files = files or FileCache()
        self._loaded_file: Path | None = None
        self._loaded: dict[str, torch.Tensor] = {}
        self._source: TensorSource | None = None

    def read(self, name: str, *, out: torch.Tensor | None = None) -> torch.Tensor:
        ref = self.checkpoint.tensors[name]
        if ref.offset is not None:
            raw = self._files.read(ref.file, ref.identity, ref.offset, ref.nbytes, out=out)
            return raw.view(ref.dtype).reshape(ref.shape)
        if self.checkpoint.source is not None:
            if self._source is None:
                self._source = self.checkpoint.source(self._files)
            t = self._source.read(ref)
            if t.dtype != ref.dtype or tuple(t.shape) != ref.shape:
                raise UnknownFormatError(f"tensor read as {t.dtype} {tuple(t.shape)}, indexed as {ref.dtype} "
                                         f"{ref.shape}", path=ref.file, tensor=name)
            return t.contiguous()
        if self._loaded_file != ref.file:
            self._loaded = {}
            index = next(p for p in self.checkpoint._pickles if p.path == ref.file)
            self._loaded = pkl.load_tensors(
                ref.file, ref.identity, state_key=index.state_key,
                key_of={n: r.key for n, r in index.tensors.items() if r.key is not None},
            )
            self._loaded_file = ref.file
        t = self._loaded[name]
        if t.dtype != ref.dtype or tuple(t.shape) != ref.shape:
            raise UnknownFormatError("tensor differs from the file's index", path=ref.file, tensor=name)
        return t.contiguous()

    def release(self) -> None:
        """Drop a loaded pickle or a source's decoded file (safetensors reads keep nothing)."""
        self._loaded, self._loaded_file = {}, None
        if self._source is not None:
            self._source.release()

    def close(self) -> None:
        self.release()
        if self._own:
            self._files.close()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_combine = combine_fingerprints


def _trainer_step(folder: Path) -> int | None:
    state = folder / "trainer_state.json"
    try:
        data = json.loads(state.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    step = data.get("global_step") if isinstance(data, dict) else None
    return step if isinstance(step, int) else None


def _from_safetensors(path: Path, kind: str, index_or_file: Path, meta_dir: Path | None, weights_name: str) -> Checkpoint:
    if kind == "safetensors-sharded":
        tensors, headers = st.index_sharded(index_or_file)
    else:
        tensors, headers = st.index_file(index_or_file)
    metadata = headers[0].metadata or {} if len(headers) == 1 else {}
    return Checkpoint(
        path=path, format=kind, tensors=tensors, step=None, step_source="", files=[h.path for h in headers],
        fingerprint=_combine([h.fingerprint for h in headers]), meta_dir=meta_dir, weights_name=weights_name,
        metadata=dict(metadata),
    )


def _from_pickles(path: Path, kind: str, indexes: list[pkl.PickleIndex], meta_dir: Path | None) -> Checkpoint:
    tensors: dict[str, TensorRef] = {}
    aliases: dict[str, str] = {}
    for idx in indexes:
        for name, ref in idx.tensors.items():
            if name in tensors:
                raise UnknownFormatError("tensor appears in two shards", path=ref.file, tensor=name)
            tensors[name] = ref
        aliases.update(idx.aliases)
    ckpt = Checkpoint(
        path=path, format=kind, tensors=tensors, step=None, step_source="", files=[i.path for i in indexes],
        fingerprint=_combine([i.fingerprint for i in indexes]), meta_dir=meta_dir, aliases=aliases,
        _pickles=indexes,
    )
    if kind == "lightning" and indexes[0].global_step is not None:
        ckpt.step, ckpt.step_source = indexes[0].global_step, "global_step in the .ckpt"
    if len(indexes) == 1 and indexes[0].fairseq:
        ckpt.format = "fairseq"
        if indexes[0].num_updates is not None:
            ckpt.step, ckpt.step_source = indexes[0].num_updates, "num_updates in fairseq's optimizer_history"
    return ckpt


def _from_index(path: Path, found: FormatIndex) -> Checkpoint:
    """A checkpoint from what a format module (DCP, DeepSpeed, ...) found."""
    return Checkpoint(
        path=path, format=found.format, tensors=found.tensors, step=found.step, step_source=found.step_source,
        fingerprint=found.fingerprint, files=found.files, meta_dir=found.meta_dir, aliases=found.aliases,
        metadata=found.metadata, incomplete=found.incomplete, source=found.source,
    )


def _open_file(path: Path, *, state_key: str | None, strip_prefix: str | None, meta_dir: Path | None) -> Checkpoint:
    name = path.name
    if is_side_file(name):
        raise pkl.refuse_side_file(path)
    if name.endswith(".safetensors.index.json"):
        return _from_safetensors(path, "safetensors-sharded", path, meta_dir, name[: -len(".safetensors.index.json")])
    if name.endswith(".bin.index.json") or name.endswith(".pt.index.json"):
        idx = pkl.index_pickle_sharded(path, state_key=state_key, strip_prefix=strip_prefix)
        return _from_pickles(path, "torch-sharded", idx, meta_dir)
    if name.endswith(".safetensors"):
        return _from_safetensors(path, "safetensors", path, meta_dir, "model")
    if name.endswith(PICKLE_SUFFIXES):
        idx = pkl.index_pickle(path, state_key=state_key, strip_prefix=strip_prefix)
        return _from_pickles(path, "lightning" if name.endswith(".ckpt") else "torch", [idx], meta_dir)
    # unknown suffix: sniff the first bytes
    fd = open_regular(path)
    try:
        head = os.pread(fd, 9, 0)
    finally:
        os.close(fd)
    if head[:2] == b"PK":
        idx = pkl.index_pickle(path, state_key=state_key, strip_prefix=strip_prefix)
        return _from_pickles(path, "torch", [idx], meta_dir)
    if len(head) == 9 and head[8:9] == b"{":
        return _from_safetensors(path, "safetensors", path, meta_dir, "model")
    raise UnknownFormatError(
        "not a checkpoint ckptavg can read",
        path=path, hint="expected .safetensors, a *.safetensors.index.json, .pt/.pth/.bin or Lightning .ckpt",
    )


def _open_folder(folder: Path, *, state_key: str | None, strip_prefix: str | None,
                 deepspeed_weights: str = "fp32") -> Checkpoint:
    if (tag := dsf.locate_tag(folder)) is not None:  # global_stepN, its retained copy, a save dir / checkpoint-N
        return _from_index(folder, dsf.index_deepspeed(tag, weights=deepspeed_weights, meta_dir=folder))
    if (untagged := dsf.untagged(folder)) is not None:
        raise untagged
    if (dcp_folder := dcp.find_dcp_folder(folder)) is not None:
        return _from_index(folder, dcp.index_dcp(dcp_folder, state_key=state_key, strip_prefix=strip_prefix, meta_dir=folder))
    entries = sorted(p.name for p in folder.iterdir() if not is_noise(p.name))
    if (weights := st.choose_weights(entries, folder)) is not None:
        kind, chosen, weights_name = weights
        return _from_safetensors(folder, kind, folder / chosen, folder, weights_name)
    bin_indexes = [n for n in entries if n.endswith((".bin.index.json", ".pt.index.json"))]
    if bin_indexes:
        idx = pkl.index_pickle_sharded(folder / bin_indexes[0], state_key=state_key, strip_prefix=strip_prefix)
        return _from_pickles(folder, "torch-sharded", idx, folder)
    pickles = [n for n in entries if n.endswith(PICKLE_SUFFIXES) and not is_side_file(n) and (folder / n).is_file()]
    if pickles:
        chosen = "pytorch_model.bin" if "pytorch_model.bin" in pickles else (pickles[0] if len(pickles) == 1 else None)
        if chosen is None:
            raise UnknownFormatError(f"holds several checkpoint files ({', '.join(pickles)})", path=folder,
                                     hint="pass the file you want, or the run folder with --last N")
        ckpt = _open_file(folder / chosen, state_key=state_key, strip_prefix=strip_prefix, meta_dir=folder)
        ckpt.path = folder
        return ckpt
    subdirs = [n for n in entries if (folder / n).is_dir()]
    hint = "this looks like a run folder: pass it with --last N, or pass the checkpoints themselves" if subdirs else None
    raise CheckpointNotFoundError("holds no model weights (.safetensors, .bin, .pt, .pth or .ckpt)", path=folder, hint=hint)


def open_checkpoint(
    path: str | os.PathLike[str],
    *,
    step: int | None = None,
    state_key: str | None = None,
    strip_prefix: str | None = None,
    deepspeed_weights: str = "fp32",
    storage_options: Mapping[str, Any] | None = None,
) -> Checkpoint:
    """Index the checkpoint at ``path`` (a folder or a file) from headers only. ``deepspeed_weights``: read a
    DeepSpeed checkpoint's fp32 master weights (``fp32``) or its module's (``module``). A URL (``s3://...``)
    is read from object storage (:mod:`ckptavg.reading.remote`, with ``storage_options``)."""
    if is_url(path):
        return open_remote_checkpoint(str(path), step=step, storage_options=storage_options, state_key=state_key,
                                      strip_prefix=strip_prefix)
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError("no such file or folder", path=path)
    if path.is_file() and dsf.is_rank_file(path.name):  # one file of a DeepSpeed tag: the tag is the checkpoint
        path = path.parent
    if path.is_dir():
        ckpt = _open_folder(path, state_key=state_key, strip_prefix=strip_prefix, deepspeed_weights=deepspeed_weights)
    else:
        meta_dir = path.parent if (path.parent / "config.json").is_file() and path.name.startswith(("model", "pytorch_model")) else None
        ckpt = _open_file(path, state_key=state_key, strip_prefix=strip_prefix, meta_dir=meta_dir)
    if not ckpt.tensors:
        raise CheckpointNotFoundError("holds no tensors", path=path)
    accelerate = path.is_dir() and acc.is_accelerate(os.listdir(path))
    if step is not None:
        ckpt.step, ckpt.step_source = step, "given"
    elif ckpt.format == "fairseq" and ckpt.step is not None:
        pass  # num_updates: epoch and update checkpoints on one axis
    else:
        named = step_from_name(path)
        folder = path if path.is_dir() else path.parent
        if accelerate and (saved := acc.save_number(path)) is not None:
            ckpt.step, ckpt.step_source = saved, acc.SAVE_NUMBER_NOTE
            warn_once(log, ("accelerate-save-number", str(path.parent)),
                      "%s: accelerate names its checkpoints by save number (checkpoint_<i>), not by training step; "
                      "the steps used here are save numbers", path.parent)
        elif named is not None:
            ckpt.step, ckpt.step_source = named, "name"
        elif ckpt.step is None and (s := _trainer_step(folder)) is not None:
            ckpt.step, ckpt.step_source = s, "trainer_state.json"
        elif ckpt.step is None and (e := epoch_from_name(path)) is not None:
            ckpt.step, ckpt.step_source = e, "epoch in the name (the file records no num_updates)"
    if path.is_dir():
        ckpt.incomplete = ckpt.incomplete or (acc.pending(path) if accelerate else _trainer_incomplete(path))
    ckpt.model = _model_identity(ckpt.meta_dir)
    # saved by DeepSpeed but not read by its reader (e.g. weights saved beside it): empty tensors may be placeholders
    ckpt.zero3 = not ckpt.format.startswith("deepspeed") and (
        _is_deepspeed(path if path.is_dir() else path.parent) or any(p.deepspeed for p in ckpt._pickles))
    return ckpt


def open_remote_checkpoint(url: str, *, step: int | None = None, storage_options: Mapping[str, Any] | None = None,
                           store: ObjectStore | None = None, side_files: bool = True, state_key: str | None = None,
                           strip_prefix: str | None = None) -> Checkpoint:
    """A safetensors checkpoint in object storage (``s3://...``), indexed from its headers by ranged reads
    (:mod:`ckptavg.reading.remote`); its config/tokenizer files are fetched into a private temporary folder
    (``meta_dir``; not with ``side_files=False``), removed when the checkpoint is no longer referenced."""
    path, found, weights_name = index_remote(url, storage_options=storage_options, store=store, side_files=side_files,
                                             state_key=state_key, strip_prefix=strip_prefix)
    ckpt = _from_index(path, found)  # type: ignore[arg-type]
    ckpt.weights_name = weights_name
    if found.meta_dir is not None:
        weakref.finalize(ckpt, shutil.rmtree, found.meta_dir, True)
    if step is not None:
        ckpt.step, ckpt.step_source = step, "given"
    ckpt.model = _model_identity(ckpt.meta_dir)
    return ckpt


def open_remote_many(urls: list[str], *, storage_options: Mapping[str, Any] | None = None,
                     store: ObjectStore | None = None, workers: int = 8) -> list[Checkpoint | CheckpointError]:
    """:func:`open_remote_checkpoint` of each URL, several at once (each is a few round trips to the store); a
    checkpoint that cannot be opened is its error, in its place."""
    def one(url: str) -> Checkpoint | CheckpointError:
        try:
            return open_remote_checkpoint(url, storage_options=storage_options, store=store)
        except CheckpointError as e:
            return e

    if len(urls) <= 1:
        return [one(u) for u in urls]
    with concurrent.futures.ThreadPoolExecutor(min(workers, len(urls)), thread_name_prefix="ckptavg-index") as pool:
        return list(pool.map(one, urls))


def _model_identity(meta_dir: Path | None) -> str | None:
    """``model_type (Architecture, ...)`` from ``config.json`` beside the weights; None without one."""
    if meta_dir is None:
        return None
    try:
        config = json.loads((meta_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    kind = config.get("model_type")
    archs = config.get("architectures")
    archs = [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []
    if not isinstance(kind, str) and not archs:
        return None
    text = kind if isinstance(kind, str) else "?"
    return f"{text} ({', '.join(archs)})" if archs else text


def _is_deepspeed(folder: Path) -> bool:
    """Whether DeepSpeed saved here: it copies ``zero_to_fp32.py`` beside its checkpoints and writes
    ``global_step*/`` folders of ``zero_pp_rank_*`` partitions."""
    return (folder / "zero_to_fp32.py").is_file() or next(folder.glob("global_step*/*zero_pp_rank_*"), None) is not None


_TRAINER_FILES = ("optimizer.pt", "optimizer.bin", "scheduler.pt", "training_args.bin", "scaler.pt")


def _trainer_incomplete(folder: Path) -> str | None:
    """An HF Trainer checkpoint is finished when ``trainer_state.json`` exists (written last).

    Only folders that hold Trainer files are judged this way; a bare
    ``save_pretrained`` folder is complete once its weights are whole.
    """
    if (folder / "trainer_state.json").exists():
        return None
    names = set(os.listdir(folder))
    if names & set(_TRAINER_FILES) or any(n.startswith("rng_state") for n in names):
        return "trainer_state.json not written yet (the HF Trainer writes it last)"
    return None



