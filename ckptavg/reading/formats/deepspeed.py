"""DeepSpeed checkpoints (``engine.save_checkpoint``), ZeRO stages 0-3, any number of data-parallel ranks.

Layout: ``save_dir/global_stepN/`` holds ``mp_rank_00_model_states.pt`` (stages 0-2; ZeRO-3 writes one
``zero_pp_rank_R_mp_rank_00_model_states.pt`` per rank) with the module's state dict (under ZeRO-3 its float
parameters are empty placeholders), ``param_shapes``, ``buffer_names``, ``shared_params``, ``frozen_param_*``,
and one ``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt`` per rank holding that rank's flat fp32 partitions
(stages 1/2: ``single_partition_of_fp32_groups``; stage 3: ``fp32_flat_groups``) beside its Adam moments.
``save_dir/latest`` names the tag once the tag folder is written (the completion signal). The HF Trainer's
``checkpoint-N/`` holds ``latest`` and ``global_stepN/`` the same way.

The fp32 master weights are reconstructed the way DeepSpeed's ``zero_to_fp32.py`` does: stages 1/2 concatenate
the ranks' partitions of each parameter group and walk the group's parameters (with their alignment paddings);
stage 3 partitions every parameter across the ranks (``ceil(numel / world)`` each, the last one padded). Frozen
parameters and buffers come from the model states (floating buffers as fp32, as zero_to_fp32 returns them), tied
parameters (``shared_params``) are aliases. Frozen parameters that zero_to_fp32 drops (DeepSpeed's bf16
optimizer does not record them) are read from the module as saved, so the result is a whole model.

Nothing is memory-mapped and no rank file is ever decoded whole: indexing loads each file's pickle part with a
``meta`` map location (through :func:`ckptavg.reading.formats.pickle._torch_load`, ``weights_only``), which gives
every stored tensor's byte offset in the file (``_checkpoint_offset``) without reading tensor data; a tensor is
then read by ``pread``-ing exactly the byte ranges of its pieces (one range for most parameters; two where a
parameter straddles a rank boundary), through the reader's :class:`FileCache`, which checks each file's identity
before and after every read. Peak memory is one tensor, whatever the rank files hold.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ckptavg.errors import IncompleteCheckpointError, UnknownFormatError, UnsupportedCheckpointError
from ckptavg.reading.fileio import FileCache, FileIdentity, identify
from ckptavg.reading.formats.pickle import Inert, _torch_load
from ckptavg.reading.formats.refs import FormatIndex, TensorRef

__all__ = ["WEIGHTS", "holds_deepspeed", "index_deepspeed", "is_rank_file", "is_tag_folder", "locate_tag", "tag_folders",
           "untagged"]

WEIGHTS = ("fp32", "module")  # --deepspeed-weights: the fp32 master weights, or the module's (bf16/fp16) weights

_MODEL_RE = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
_OPTIM_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def _model_files(folder: Path) -> list[Path]:
    try:
        names = [p for p in folder.iterdir() if _MODEL_RE.match(p.name)]
    except OSError:
        return []
    return sorted(names, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])


def is_rank_file(name: str) -> bool:
    """A DeepSpeed model-states or optimizer-states file name."""
    return bool(_MODEL_RE.match(name) or _OPTIM_RE.match(name))


def is_tag_folder(folder: Path) -> bool:
    """A DeepSpeed tag folder (``global_stepN``), or its flat retained copy: it holds ``*_model_states.pt``."""
    return bool(_model_files(folder))


def locate_tag(folder: Path) -> Path | None:
    """The DeepSpeed tag folder ``folder`` stands for: itself when it holds the model states; the tag its
    ``latest`` names (a DeepSpeed save folder, an HF Trainer ``checkpoint-N``); None when not DeepSpeed's."""
    if is_tag_folder(folder):
        return folder
    latest = folder / "latest"
    if latest.is_file():
        tag = latest.read_text(errors="replace").strip()
        if tag and "/" not in tag and tag not in (".", "..") and is_tag_folder(folder / tag):
            return folder / tag
    return None


def tag_folders(folder: Path) -> list[Path]:
    """The ``global_step*`` tag folders right under ``folder`` (a DeepSpeed save folder)."""
    return [p for p in _subdirs(folder) if is_tag_folder(p)]


def holds_deepspeed(folder: Path) -> bool:
    """Whether ``folder`` is (or holds, as an HF Trainer ``checkpoint-N`` does) a DeepSpeed checkpoint."""
    return locate_tag(folder) is not None or any(is_tag_folder(p) for p in _subdirs(folder))


def _subdirs(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.name.startswith("global_step") and p.is_dir())
    except OSError:
        return []


def untagged(folder: Path) -> IncompleteCheckpointError | None:
    """A folder with ``global_step*/`` model states but no ``latest`` naming one: DeepSpeed has not finished."""
    if locate_tag(folder) is None and any(is_tag_folder(p) for p in _subdirs(folder)):
        return IncompleteCheckpointError(
            "holds DeepSpeed global_step folders but no 'latest' file naming one (DeepSpeed writes it last)",
            path=folder, hint="wait for the save to finish, or pass the global_step folder itself")
    return None


# --------------------------------------------------------------------------- the files' structure


@dataclass(frozen=True)
class _Piece:
    """A byte range of a stored tensor: ``numel`` elements of ``dtype`` at byte ``offset`` of ``file``."""

    file: Path
    identity: FileIdentity
    offset: int
    numel: int
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def part(self, start: int, numel: int) -> "_Piece":
        return _Piece(self.file, self.identity, self.offset + start * self.dtype.itemsize, numel, self.dtype)


def _load_meta(path: Path) -> Any:
    """The file's objects with every tensor on the ``meta`` device (no tensor byte is read). A rank file that
    does not load and lacks its zip end record is still being written: DeepSpeed's rank 0 writes ``latest``
    without waiting for the other ranks' files (``engine.save_checkpoint``), so this is a normal moment."""
    try:
        return _torch_load(path, "meta")
    except UnknownFormatError:
        if not _zip_ended(path):
            raise IncompleteCheckpointError("is still being written (no zip end record yet)", path=path,
                                            hint="a DeepSpeed rank is still saving; it is read once complete") from None
        raise


def _zip_ended(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 65_558))  # the end record (22 bytes) and the longest zip comment
            return b"PK\x05\x06" in f.read()
    except OSError:
        return False


def _piece(t: Any, path: Path, identity: FileIdentity, what: str) -> _Piece:
    if not isinstance(t, torch.Tensor):
        raise UnknownFormatError(f"{what} is a {type(t).__name__}, not a tensor", path=path)
    offset = getattr(t.untyped_storage(), "_checkpoint_offset", None)
    if offset is None:
        raise UnsupportedCheckpointError(f"{what}: this torch does not report where tensors are stored",
                                         path=path, hint="upgrade torch to 2.6 or newer")
    n = t.numel()
    if n and t.stride() != _contiguous_strides(tuple(t.shape)):
        raise UnsupportedCheckpointError(f"{what} is stored non-contiguous; ckptavg reads contiguous tensors",
                                         path=path)
    start = offset + t.storage_offset() * t.element_size()
    if start + n * t.element_size() > identity.size:
        raise IncompleteCheckpointError(f"{what} lies beyond the end of the file", path=path,
                                        hint="the file is truncated or still being written")
    return _Piece(path, identity, start, n, t.dtype)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(strides))


def _plain(value: Any) -> Any:
    """An enum (``ZeroStageEnum``) pickled beside the weights arrives as an :class:`Inert`: its value."""
    if isinstance(value, Inert):
        args = getattr(value, "args", ())
        return args[0] if len(args) == 1 else None
    return value


def _shape(s: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in s)


@dataclass
class _Rank:
    rank: int
    path: Path
    identity: FileIdentity
    stage: int
    partition_count: int
    groups: list[_Piece]  # this rank's flat fp32 partition of each parameter group
    paddings: list[list[int]] | None  # stages 1/2: padding after each parameter, per group (newer DeepSpeed)


def _read_rank(path: Path, rank: int) -> _Rank:
    identity = identify(path)
    obj = _load_meta(path)
    osd = obj.get("optimizer_state_dict") if isinstance(obj, Mapping) else None
    if not isinstance(osd, Mapping) or "zero_stage" not in osd:
        raise UnknownFormatError("is not a DeepSpeed ZeRO optimizer-state file (no optimizer_state_dict/zero_stage)",
                                 path=path)
    stage = _plain(osd["zero_stage"])
    if not isinstance(stage, int):
        raise UnknownFormatError(f"zero_stage is {osd['zero_stage']!r}, not a number", path=path)
    count = osd.get("partition_count")
    count = max(count) if isinstance(count, list) and count else count
    key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
    flat = osd.get(key)
    if not isinstance(count, int) or not isinstance(flat, list):
        raise UnknownFormatError(f"ZeRO stage {stage} optimizer states lack partition_count or {key}", path=path)
    groups = [_piece(t, path, identity, f"{key}[{i}]") for i, t in enumerate(flat)]
    if any(p.dtype != torch.float32 for p in groups):
        raise UnsupportedCheckpointError(f"{key} is not float32", path=path)
    pads = osd.get("param_alignment_paddings")
    paddings = [[int(x) for x in g] for g in pads] if isinstance(pads, list) else None
    return _Rank(rank, path, identity, stage, count, groups, paddings)


# --------------------------------------------------------------------------- the index


@dataclass(frozen=True)
class _Plan:
    """How one tensor is read: its pieces in order, the first ``numel`` elements, reshaped, cast to ``dtype``."""

    pieces: tuple[_Piece, ...]
    numel: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def _span(pieces: list[_Piece], start: int, numel: int) -> list[_Piece]:
    """The parts of a flat run of ``pieces`` (one after the other) covering ``[start, start + numel)``."""
    out, base = [], 0
    for p in pieces:
        lo, hi = max(start, base), min(start + numel, base + p.numel)
        if lo < hi:
            out.append(p.part(lo - base, hi - lo))
        base += p.numel
        if base >= start + numel:
            break
    return out


class _Builder:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.plans: dict[str, _Plan] = {}
        self.aliases: dict[str, str] = {}
        self.notes: list[str] = []

    def add(self, name: str, pieces: list[_Piece], numel: int, shape: tuple[int, ...], dtype: torch.dtype | None = None,
            *, where: Path) -> None:
        if name in self.plans:
            raise UnknownFormatError(f"tensor {name!r} is recorded twice", path=where)
        have = sum(p.numel for p in pieces)
        if have < numel:
            raise UnknownFormatError(f"tensor {name!r} needs {numel} elements, the partitions hold {have}", path=where,
                                     hint="the checkpoint is corrupt or was saved by an unsupported DeepSpeed layout")
        src = pieces[0].dtype if pieces else (dtype or torch.float32)
        self.plans[name] = _Plan(tuple(pieces), numel, shape, dtype or src)

    def index(self, fmt: str, files: list[Path], *, step: int | None, incomplete: str | None,
              metadata: dict[str, str], meta_dir: Path | None) -> FormatIndex:
        tensors: dict[str, TensorRef] = {}
        fp = hashlib.sha256()
        for name, plan in self.plans.items():
            first = plan.pieces[0] if plan.pieces else None
            direct = (first is not None and len(plan.pieces) == 1 and first.numel == plan.numel
                      and first.dtype == plan.dtype)
            file = first.file if first else files[0]
            ident = first.identity if first else identify(files[0])
            tensors[name] = TensorRef(
                name=name, dtype=plan.dtype, shape=plan.shape, file=file, identity=ident,
                offset=first.offset if direct and first else None, nbytes=plan.numel * plan.dtype.itemsize,
                key=name,
            )
            fp.update(f"{name}|{plan.dtype}|{plan.shape};".encode())
        for f in files:
            fp.update(f"{f.name}|{identify(f).size};".encode())
        plans = self.plans
        missing = incomplete
        if self.notes:
            metadata = {**metadata, "deepspeed_note": "; ".join(self.notes)}
        return FormatIndex(
            format=fmt, tensors=tensors, files=files, fingerprint=fp.hexdigest()[:32],
            source=lambda cache: _Source(plans, cache, missing), step=step,
            step_source="global_steps in the model states" if step is not None else "", meta_dir=meta_dir,
            metadata=metadata, incomplete=incomplete, aliases=dict(self.aliases),
        )


class _Source:
    """Reads a DeepSpeed tensor from its byte ranges; keeps nothing between reads."""

    def __init__(self, plans: dict[str, _Plan], files: FileCache, incomplete: str | None) -> None:
        self.plans, self.files, self.incomplete = plans, files, incomplete

    def read(self, ref: TensorRef) -> torch.Tensor:
        if self.incomplete:
            raise IncompleteCheckpointError(self.incomplete, path=ref.file, tensor=ref.name)
        plan = self.plans[ref.name]
        chunks = [self.files.read(p.file, p.identity, p.offset, p.nbytes).view(p.dtype) for p in plan.pieces]
        flat = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        t = flat[: plan.numel].reshape(plan.shape)
        return t.to(plan.dtype) if t.dtype != plan.dtype else t

    def release(self) -> None:
        pass


def index_deepspeed(folder: Path, *, weights: str = "fp32", meta_dir: Path | None = None) -> FormatIndex:
    """Index the DeepSpeed tag folder ``folder`` (``global_stepN``, or its flat retained copy)."""
    if weights not in WEIGHTS:
        raise UnsupportedCheckpointError(f"unknown DeepSpeed weights {weights!r}", path=folder,
                                         hint="--deepspeed-weights fp32 (the master weights) or module")
    models = _model_files(folder)
    if not models:
        raise UnknownFormatError("holds no DeepSpeed *_model_states.pt", path=folder)
    if any(int(_MODEL_RE.match(p.name).group(2)) != 0 for p in models):  # type: ignore[union-attr]
        raise UnsupportedCheckpointError(
            "is a model-parallel DeepSpeed checkpoint (mp_rank_01...); ckptavg reads data-parallel ZeRO checkpoints",
            path=folder, hint="consolidate it with DeepSpeed's ds_to_universal.py first")
    first = models[0]
    state = _load_meta(first)
    if not isinstance(state, Mapping) or "module" not in state:
        raise UnknownFormatError("is not a DeepSpeed model-states file (no module entry)", path=first)
    module = state.get("module")
    if not isinstance(module, Mapping):
        raise UnknownFormatError("the model states hold no module state dict", path=first)
    step = state.get("global_steps") if isinstance(state.get("global_steps"), int) else None
    dp = state.get("dp_world_size") if isinstance(state.get("dp_world_size"), int) else None
    mp = state.get("mp_world_size")
    if isinstance(mp, int) and mp > 1:
        raise UnsupportedCheckpointError(f"was saved with model parallelism (mp_world_size {mp})", path=first,
                                         hint="consolidate it with DeepSpeed's ds_to_universal.py first")
    config = state.get("ds_config") if isinstance(state.get("ds_config"), Mapping) else {}
    zo = config.get("zero_optimization") if isinstance(config, Mapping) else None
    config_stage = zo.get("stage") if isinstance(zo, Mapping) and isinstance(zo.get("stage"), int) else None
    metadata = {"deepspeed_version": str(state.get("ds_version", "?"))}

    if not isinstance(state.get("param_shapes"), (list, Mapping)):
        # no ZeRO (stage 0): the module's weights, which are the master weights unless training in bf16/fp16
        metadata.update(deepspeed_stage="0", deepspeed_ranks=str(dp or 1), deepspeed_weights="module")
        return _module_index(folder, first, state, module, "deepspeed-zero0", step, metadata, meta_dir)
    optims: dict[int, Path] = {}
    for p in folder.iterdir():
        m = _OPTIM_RE.match(p.name)
        if m:
            optims[int(m.group(1))] = p
    stage = config_stage if config_stage is not None else (1 if optims else 0)
    incomplete: str | None = None
    ranks: list[_Rank] = []
    if optims:
        ranks = [_read_rank(optims[r], r) for r in sorted(optims)]
        stage = ranks[0].stage
        world = ranks[0].partition_count
        want = set(range(world))
        if set(optims) - want:
            raise UnknownFormatError(f"holds optimizer states of rank {max(optims)} but the partition count is "
                                     f"{world}", path=optims[max(optims)])
        if set(optims) != want:
            gone = sorted(want - set(optims))
            incomplete = (f"DeepSpeed rank file(s) missing: ranks {', '.join(map(str, gone))} of {world} "
                          f"(e.g. {optims[min(optims)].name.replace(f'rank_{min(optims)}_', f'rank_{gone[0]}_')})")
    elif stage >= 1:
        world = dp or 1
        incomplete = f"no DeepSpeed optimizer-state files (*_optim_states.pt) yet for ZeRO stage {stage}"
    else:
        world = dp or 1
    if stage == 3 and incomplete is None and len(models) != world:
        have = {int(_MODEL_RE.match(p.name).group(1) or 0) for p in models}  # type: ignore[union-attr]
        gone = sorted(set(range(world)) - have)
        incomplete = (f"DeepSpeed ZeRO-3 model-states file(s) missing: ranks {', '.join(map(str, gone))} of {world}"
                      if gone else f"{len(models)} ZeRO-3 model-states files for {world} ranks")
    fmt = f"deepspeed-zero{stage}"
    metadata["deepspeed_stage"] = str(stage)
    metadata["deepspeed_ranks"] = str(world)
    metadata["deepspeed_weights"] = weights

    if weights == "module" and stage == 3:
        raise UnsupportedCheckpointError(
            "--deepspeed-weights module cannot read a ZeRO-3 checkpoint: its module weights are empty placeholders "
            "(each rank holds only its partition)", path=folder,
            hint="use --deepspeed-weights fp32 (the default), which gathers the fp32 master weights from the ranks")
    if weights == "module":
        return _module_index(folder, first, state, module, fmt, step, metadata, meta_dir, incomplete)

    b = _Builder(folder)
    identity = identify(first)
    shared = state.get("shared_params") if isinstance(state.get("shared_params"), Mapping) else {}
    buffer_names = [n for n in state.get("buffer_names") or [] if isinstance(n, str)]

    # buffers (zero_to_fp32 returns floating ones as fp32)
    for name in buffer_names:
        t = module.get(name)
        if isinstance(t, torch.Tensor):
            p = _piece(t, first, identity, f"module[{name!r}]")
            b.add(name, [p], p.numel, tuple(t.shape), torch.float32 if t.is_floating_point() else t.dtype, where=first)

    param_shapes = state["param_shapes"]
    groups = param_shapes if isinstance(param_shapes, list) else [param_shapes]
    groups = [{str(k): _shape(v) for k, v in g.items()} for g in groups if isinstance(g, Mapping)]
    frozen = state.get("frozen_param_shapes") if isinstance(state.get("frozen_param_shapes"), Mapping) else {}
    files = list(models) + [r.path for r in ranks]

    if stage == 3:
        model_states = [(first, state)] + [(p, _load_meta(p)) for p in models[1:]]
        for name, shape in frozen.items():
            shape = _shape(shape)
            n = math.prod(shape)
            pieces = []
            for path, st in model_states:
                frag = (st.get("frozen_param_fragments") or {}).get(name) if isinstance(st, Mapping) else None
                if frag is None:
                    raise UnknownFormatError(f"no frozen fragment of {name!r}", path=path)
                pieces.append(_piece(frag, path, identify(path), f"frozen_param_fragments[{name!r}]"))
            b.add(name, _span(pieces, 0, n), n, shape, where=folder)
        if ranks and incomplete is None:
            offset = 0
            for name, shape in ((k, v) for g in groups for k, v in g.items()):
                n = math.prod(shape)
                part = math.ceil(n / world)
                pieces = [pc for r in ranks for pc in _span(r.groups, offset, part)]
                b.add(name, _span(pieces, 0, n), n, shape, where=folder)
                offset += part
            avail = sum(p.numel for p in ranks[0].groups)
            if offset != avail:
                raise UnknownFormatError(f"the parameters take {offset} elements of each rank's partition, which holds "
                                         f"{avail}", path=ranks[0].path)
        else:
            _placeholders(b, groups, first)
    else:
        for name, shape in frozen.items():
            frag = (state.get("frozen_param_fragments") or {}).get(name)
            p = _piece(frag, first, identity, f"frozen_param_fragments[{name!r}]")
            b.add(name, [p], p.numel, _shape(shape), where=first)
        paddings = ranks[0].paddings if ranks else None
        if ranks and incomplete is None:
            for g, shapes in enumerate(groups):
                flat = [r.groups[g] for r in ranks]
                offset = 0
                pads = paddings[g] if paddings is not None and g < len(paddings) else None
                if pads is not None and len(pads) != len(shapes):
                    raise UnknownFormatError(f"{len(pads)} alignment paddings for {len(shapes)} parameters of group "
                                             f"{g}", path=ranks[0].path)
                for i, (name, shape) in enumerate(shapes.items()):
                    n = math.prod(shape)
                    b.add(name, _span(flat, offset, n), n, shape, where=folder)
                    offset += n + (pads[i] if pads is not None else 0)
                align = 2 * world
                avail = sum(p.numel for p in flat)
                if align * math.ceil(offset / align) != align * math.ceil(avail / align):
                    raise UnknownFormatError(f"group {g}: the parameters take {offset} elements, the partitions hold "
                                             f"{avail}", path=ranks[0].path)
        else:
            _placeholders(b, groups, first)
        # frozen parameters that the optimizer states do not record (zero_to_fp32 drops them): the module's
        covered = set(b.plans) | set(buffer_names) | set(shared)
        for name, t in module.items():
            if isinstance(name, str) and isinstance(t, torch.Tensor) and name not in covered:
                p = _piece(t, first, identity, f"module[{name!r}]")
                b.add(name, [p], p.numel, tuple(t.shape), where=first)
                b.notes.append(f"{name} from the module weights ({t.dtype})")
    for name, target in shared.items():
        if isinstance(name, str) and isinstance(target, str) and target in b.plans and name not in b.plans:
            b.aliases[name] = target
    return b.index(fmt, files, step=step, incomplete=incomplete, metadata=metadata, meta_dir=meta_dir)


def _module_index(folder: Path, first: Path, state: Mapping, module: Mapping, fmt: str, step: int | None,
                  metadata: dict[str, str], meta_dir: Path | None, incomplete: str | None = None) -> FormatIndex:
    """The module's state dict as saved in the model states (bf16/fp16 under mixed precision)."""
    b = _Builder(folder)
    identity = identify(first)
    shared = state.get("shared_params") if isinstance(state.get("shared_params"), Mapping) else {}
    seen: dict[tuple, str] = {}
    for name, t in module.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            continue
        if isinstance(shared.get(name), str) and shared[name] in module:
            b.aliases[name] = shared[name]
            continue
        p = _piece(t, first, identity, f"module[{name!r}]")
        ident = (p.offset, p.numel, tuple(t.shape), t.dtype)
        if ident in seen and p.numel:  # tied weights share one storage
            b.aliases[name] = seen[ident]
            continue
        seen[ident] = name
        b.add(name, [p], p.numel, tuple(t.shape), where=first)
    return b.index(fmt, [first], step=step, incomplete=incomplete, metadata=metadata, meta_dir=meta_dir)


def _placeholders(b: _Builder, groups: list[dict[str, tuple[int, ...]]], where: Path) -> None:
    """Names and shapes of an incomplete checkpoint's trainable parameters, for ``inspect``; never read."""
    for name, shape in ((k, v) for g in groups for k, v in g.items()):
        if name not in b.plans:
            b.plans[name] = _Plan((), math.prod(shape), shape, torch.float32)
