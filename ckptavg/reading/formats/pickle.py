"""PyTorch pickle checkpoints: ``.pt``/``.pth``/``.bin``, sharded ``pytorch_model.bin.index.json``
and Lightning ``.ckpt``.

Pickles can run code when loaded. ckptavg loads them only through
``torch.load(..., weights_only=True)``, always passed explicitly so that
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` cannot turn it off, and refuses pickles
outright on a torch too old to honour that. Objects stored beside the weights that
``weights_only`` does not admit (Lightning hyper-parameters holding paths, namespaces,
enums or dataclasses; DeepSpeed's loss scaler) are read as :class:`Inert` stand-ins, still
under ``weights_only``: their classes are never imported and none of their code runs; a
file that names a function, or a class of ``os``/``subprocess``/``builtins`` and the like,
stays refused. Side files that are pickles of
arbitrary objects (``training_args.bin``, DCP ``.metadata``, Lightning
``meta.pt``) are never loaded.

Indexing reads names, dtypes, shapes and storage sharing out of the pickle
without reading any tensor data (see :func:`_index_load`). A pickle's tensors can only be read by
loading the whole file, so pickles are read one file at a time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import threading
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch

from ckptavg.errors import (
    CheckpointChangedError,
    CheckpointVanishedError,
    UnknownFormatError,
    UnsafePickleError,
    UnsupportedCheckpointError,
)
from ckptavg.reading.fileio import FileIdentity, identify, require_regular
from ckptavg.reading.formats.refs import TensorRef
from ckptavg.reading.formats.safetensors import check_shard_keys, read_index_json, resolve_shards

log = logging.getLogger(__name__)

__all__ = ["Inert", "PickleIndex", "index_pickle", "index_pickle_sharded", "load_tensors", "torch_version"]

# Containers in which trainers nest the model's state dict, most specific first.
STATE_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
# Wrapper prefixes added by DDP (module.) and torch.compile (_orig_mod.): always stripped.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def _check_torch(path: Path) -> None:
    version = torch_version()
    if version < (2, 6):
        raise UnsafePickleError(
            f"refusing to load a pickle with torch {torch.__version__}: before 2.6, weights_only loading "
            "could be overridden or bypassed",
            path=path, hint="upgrade torch to 2.6 or newer, or convert the checkpoint to safetensors",
        )
    if version < (2, 10) and os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        warnings.warn(
            f"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set; ckptavg passes weights_only=True explicitly, "
            f"which torch {torch.__version__} honours, but prefer unsetting it",
            stacklevel=3,
        )


# The pickle part of a torch zip (``*/data.pkl``): names, shapes and storage keys, about 100 bytes per
# tensor. It is bounded before anything is loaded: at most PICKLE_FLOOR or the bytes of the tensors it
# describes, whichever is larger, and never more than PICKLE_LIMIT.
PICKLE_LIMIT = 64 << 20
PICKLE_FLOOR = 4 << 20


def check_zip_bounds(path: Path) -> None:
    """Refuse a torch zip whose loading could take more memory than its tensors need.

    Reads the zip's central directory only (the declared sizes), never a member's data: a member
    that is compressed (``torch.save`` stores every member uncompressed, and a compressed one can
    inflate a thousandfold — a decompression bomb) or a pickle part beyond its bound
    (:data:`PICKLE_LIMIT`, :data:`PICKLE_FLOOR`) is refused. Legacy (non-zip) pickles are bounded by
    their file size and pass.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return  # not a zip (a legacy pickle), or unreadable: torch.load says what is wrong
    pickles = [m for m in members if m.filename.endswith("data.pkl")]
    tensor_bytes = sum(m.file_size for m in members if "/data/" in m.filename)
    allowed = min(PICKLE_LIMIT, max(PICKLE_FLOOR, tensor_bytes))
    for m in pickles:
        if m.file_size > allowed:
            raise UnsafePickleError(
                f"member {m.filename} declares {m.file_size} bytes of pickle for {tensor_bytes} bytes of tensors, "
                f"over the {allowed}-byte limit; refused before loading",
                path=path, hint="a decompression bomb or a corrupt file; torch.save never writes such a file",
            )
    packed = next((m for m in members if m.compress_type != zipfile.ZIP_STORED), None)
    if packed is not None:
        raise UnsafePickleError(
            f"member {packed.filename} is compressed ({packed.compress_size} bytes inflating to {packed.file_size}); "
            "refused before loading",
            path=path, hint="torch.save stores members uncompressed; re-save the checkpoint with torch.save",
        )


class Inert:
    """Stands in for a pickled object of a class that ``weights_only`` loading does not admit (a
    ``pathlib.Path``, an ``argparse.Namespace``, an enum, a dataclass, a DeepSpeed loss scaler, a numpy
    random state). It records the pickled arguments and state and runs none of the class's code: the class
    is never imported. One subclass per pickled name, so ``weights_only`` loading admits exactly the names
    the file holds, mapped to these stand-ins (:func:`_inert_load`)."""

    qualname: str = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "Inert":
        obj = object.__new__(cls)
        obj.args, obj.state = args, None  # type: ignore[attr-defined]
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.qualname}, not loaded>"


_INERT_LOCK = threading.Lock()  # the admitted names are process-wide while a load runs
# modules whose names a data pickle never needs: a file naming one is refused outright
_HOSTILE_MODULES = frozenset({"builtins", "__builtin__", "os", "posix", "nt", "sys", "subprocess", "shutil", "socket",
                              "importlib", "runpy", "code", "codeop", "pty", "ctypes", "pickle", "_pickle", "marshal",
                              "webbrowser", "multiprocessing", "signal", "threading", "io", "tempfile", "operator",
                              "functools", "types", "inspect", "torch", "numpy.testing", "copyreg", "mmap", "glob",
                              "http", "urllib", "asyncio", "select", "platform",
                              # Python 2 names, which pickle protocol 2 (torch.save's) writes for the modules above
                              "commands", "copy_reg", "cPickle", "urllib2", "httplib", "exceptions"})


# data classes whose names are not capitalised, known to be pickled beside weights
_LOWERCASE_CLASSES = frozenset({
    "deepspeed.utils.tensor_fragment.fragment_address",  # DeepSpeed's bf16/ZeRO optimizer states: (numel, start)
})


def _stand_in_for(name: str) -> bool:
    """Whether a pickled global may be read as an :class:`Inert`: a class by its name (``pathlib.PosixPath``,
    ``argparse.Namespace``, ``my_pkg.Config``), outside the modules above, or one of the few known data classes
    named in lower case (:data:`_LOWERCASE_CLASSES`). A function or method (``x.y.touch``, ``eval``) is a call,
    not data: such a file stays refused."""
    if name in _LOWERCASE_CLASSES:
        return True
    module, _, last = name.rpartition(".")
    root = module.split(".", 1)[0]
    return bool(module) and last[:1].isupper() and root not in _HOSTILE_MODULES and module not in _HOSTILE_MODULES


def _inert_load(path: Path, map_location: str, mmap: bool) -> Any:
    """``torch.load(weights_only=True)`` with every class the file names beyond torch's allowlist mapped to
    an :class:`Inert` stand-in (never the real class, whose module is never imported). A file that names a
    function, or anything from a module a data pickle never needs, is refused (UnpicklingError)."""
    names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    refused = sorted(n for n in names if not _stand_in_for(n))
    if refused:
        raise pickle.UnpicklingError(f"Unsupported global: {', '.join(refused[:3])} (a call, not data)")
    stand_ins = [(type(f"Inert[{n}]", (Inert,), {"qualname": n}), n) for n in names]
    with _INERT_LOCK, torch.serialization.safe_globals(stand_ins), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    if names:  # DeepSpeed's loss scaler, enums and fragment addresses are in every one of its rank files: expected
        say = log.debug if all(n.startswith("deepspeed.") for n in names) else log.info
        say("%s: read %s as inert stand-ins (no code of theirs runs)", path, ", ".join(sorted(names)))
    return obj


def _torch_load(path: Path, map_location: str, *, mmap: bool = False) -> Any:
    require_regular(path)  # torch.load would block forever on a FIFO
    _check_torch(path)
    check_zip_bounds(path)
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointVanishedError("file was deleted before it could be read", path=path) from None
    except pickle.UnpicklingError as e:
        try:  # objects beside the weights (hyper-parameters, loss scalers): read them as inert stand-ins
            return _inert_load(path, map_location, mmap)
        except FileNotFoundError:
            raise CheckpointVanishedError("file was deleted before it could be read", path=path) from None
        except Exception as retry:  # noqa: BLE001 - any failure of the retry: report torch's first refusal
            e = retry if isinstance(retry, pickle.UnpicklingError) else e
        first = str(e).strip().splitlines()
        reason = next((line for line in first if "Unsupported" in line or "global" in line.lower()), first[0] if first else "")
        raise UnsafePickleError(
            f"pickle needs more than tensors to load and was not executed ({reason.strip()[:200]})",
            path=path, hint="only weights_only=True loading is allowed; convert the checkpoint to safetensors if you trust it",
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnknownFormatError(
            f"cannot read as a PyTorch checkpoint: {msg[:200]}", path=path,
            hint="the file is truncated, corrupt, or not a torch.save file",
        ) from None


def _refuse_inert(node: Mapping[Any, Any], path: Path, where: str | None) -> None:
    """A stand-in where the weights are (a tensor subclass, a quantized parameter) would silently drop a
    tensor: refuse it, naming the entry and its class."""
    for k, v in node.items():
        if isinstance(v, Inert):
            raise UnsupportedCheckpointError(
                f"entry {(where + '/' if where else '') + str(k)!r} of the state dict is a {v.qualname}, which ckptavg "
                "does not load (only plain tensors are read; no code from the file runs)", path=path,
                hint="save the state dict with plain tensors (e.g. tensor.detach().contiguous())")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _find_state_dict(obj: Any, path: Path, state_key: str | None) -> tuple[Mapping[str, torch.Tensor], str | None]:
    """Return (state_dict, key it was found under)."""
    if state_key is not None:
        node = obj
        for part in state_key.split("/"):
            if not isinstance(node, Mapping) or part not in node:
                keys = ", ".join(map(str, list(obj)[:12])) if isinstance(obj, Mapping) else type(obj).__name__
                raise UnknownFormatError(f"no entry {state_key!r} (top-level keys: {keys})", path=path)
            node = node[part]
        tensors = {k: v for k, v in node.items() if isinstance(v, torch.Tensor)} if isinstance(node, Mapping) else {}
        if not tensors:
            raise UnknownFormatError(f"entry {state_key!r} holds no tensors", path=path)
        _refuse_inert(node, path, state_key)
        return tensors, state_key
    if _is_state_dict(obj):
        return obj, None
    if isinstance(obj, Mapping):
        for key in STATE_KEYS:
            node = obj.get(key)
            if isinstance(node, Mapping):
                tensors = {k: v for k, v in node.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
                if tensors:
                    _refuse_inert(node, path, key)
                    return tensors, key
        # a flat dict mixing tensors with a few scalars (e.g. {"step": 3, ...weights})
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors:
            _refuse_inert({k: v for k, v in obj.items() if isinstance(v, Inert) and "." in str(k)}, path, None)
            return tensors, None
        keys = ", ".join(map(str, list(obj)[:12]))
        raise UnknownFormatError(
            f"found no state dict (top-level keys: {keys})",
            path=path, hint="pass --state-key KEY to say which entry holds the weights",
        )
    raise UnknownFormatError(f"holds a {type(obj).__name__}, not a state dict", path=path)


def _strip(names: list[str], *, lightning: bool, strip_prefix: str | None) -> dict[str, str]:
    """Map original key -> output name."""
    out = {}
    for key in names:
        name = key
        if strip_prefix and name.startswith(strip_prefix):
            name = name[len(strip_prefix):]
        out[key] = _unwrap(name)
    if lightning and strip_prefix is None:
        # LightningModule attributes prefix every key, e.g. "model.": strip a single shared one
        firsts = {n.split(".", 1)[0] for n in out.values()}
        if len(firsts) == 1 and all("." in n for n in out.values()):
            prefix = firsts.pop() + "."
            # a compiled or DDP-wrapped submodule puts its wrapper prefix under the Lightning one
            out = {k: _unwrap(v[len(prefix):]) for k, v in out.items()}
            log.info("stripped the LightningModule prefix %r from every tensor name", prefix)
    return out


def _unwrap(name: str) -> str:
    """Remove DDP/torch.compile wrapper prefixes, however nested."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def _index_load(path: Path) -> Any:
    """Load a pickle's structure without reading tensor data.

    Zip-format files (every ``torch.save`` since 1.6) are mapped with ``mmap=True``
    so that tensors sharing one storage (tied weights) share an address; no tensor
    byte is touched, so a concurrent truncation cannot fault this read. Legacy
    files fall back to a ``meta`` load (aliases are then found at read time).
    """
    try:
        return _torch_load(path, "cpu", mmap=True)
    except UnknownFormatError as e:
        if "mmap" not in str(e) and "zip" not in str(e):
            raise
    return _torch_load(path, "meta")


def _fairseq_updates(obj: Mapping[str, Any]) -> int | None:
    """The update count fairseq's ``Trainer.state_dict`` records: ``optimizer_history[-1]["num_updates"]``."""
    history = obj.get("optimizer_history")
    last = history[-1] if isinstance(history, list) and history else None
    updates = last.get("num_updates") if isinstance(last, Mapping) else None
    return updates if isinstance(updates, int) and not isinstance(updates, bool) else None


class PickleIndex:
    """Tensors of one pickle file, from a data-free (meta) load."""

    def __init__(self, path: Path, *, state_key: str | None, strip_prefix: str | None, lightning: bool) -> None:
        self.path = path
        self.identity: FileIdentity = identify(path)
        obj = _index_load(path)
        state, self.state_key = _find_state_dict(obj, path, state_key)
        self.lightning = lightning
        self.deepspeed = isinstance(obj, Mapping) and "ds_version" in obj  # DeepSpeed's model_states files
        self.global_step = obj.get("global_step") if isinstance(obj, Mapping) and isinstance(obj.get("global_step"), int) else None
        self.fairseq = isinstance(obj, Mapping) and self.state_key == "model" and "optimizer_history" in obj
        self.num_updates = _fairseq_updates(obj) if self.fairseq else None
        names = _strip(list(state), lightning=lightning and self.state_key == "state_dict", strip_prefix=strip_prefix)
        self.key_of = {v: k for k, v in names.items()}
        if len(self.key_of) != len(names):
            raise UnknownFormatError("two tensors have the same name after prefix stripping", path=path,
                                     hint="pass --strip-prefix none")
        # tied weights: several names for one storage (meta storages keep their identity)
        seen: dict[tuple, str] = {}
        self.aliases: dict[str, str] = {}
        self.tensors: dict[str, TensorRef] = {}
        fp = hashlib.sha256()
        for key, name in names.items():
            t = state[key]
            ident = (t.untyped_storage().data_ptr() or id(t), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            if ident in seen:
                self.aliases[name] = seen[ident]
                continue
            seen[ident] = name
            self.tensors[name] = TensorRef(
                name=name, dtype=t.dtype, shape=tuple(t.shape), file=path, identity=self.identity,
                offset=None, nbytes=t.numel() * t.element_size(), key=key,
            )
            fp.update(f"{name}|{t.dtype}|{tuple(t.shape)};".encode())
        fp.update(str(self.identity.size).encode())
        self.fingerprint = fp.hexdigest()


def index_pickle(path: Path, *, state_key: str | None = None, strip_prefix: str | None = None) -> PickleIndex:
    return PickleIndex(path, state_key=state_key, strip_prefix=strip_prefix, lightning=path.suffix == ".ckpt")


def index_pickle_sharded(index_path: Path, *, state_key: str | None = None, strip_prefix: str | None = None) -> list[PickleIndex]:
    weight_map = read_index_json(index_path)
    indexes = []
    for shard, path in resolve_shards(index_path, weight_map).items():
        idx = index_pickle(path, state_key=state_key, strip_prefix=strip_prefix)
        listed = {t for t, s in weight_map.items() if s == shard}
        check_shard_keys(listed, set(idx.key_of.values()), path, index_path.name)
        indexes.append(idx)
    return indexes


def load_tensors(path: Path, identity: FileIdentity, *, state_key: str | None, key_of: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Load every tensor of one pickle into private memory, keyed by output name."""
    before = identify(path)
    if before != identity:
        raise CheckpointChangedError("file changed since it was indexed", path=path)
    obj = _torch_load(path, "cpu")
    if identify(path) != identity:
        raise CheckpointChangedError("file changed while ckptavg was reading it", path=path)
    state, _ = _find_state_dict(obj, path, state_key)
    return {name: state[key] for name, key in key_of.items()}


def refuse_side_file(path: Path) -> UnsupportedCheckpointError:
    return UnsupportedCheckpointError(
        "is a pickle of arbitrary Python objects, not model weights; ckptavg never unpickles it",
        path=path,
    )
