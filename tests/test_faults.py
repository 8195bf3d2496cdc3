"""docs/FAULTS.md rows 2–12, 17 and 18 for the one-shot CLI (``ckptavg average`` / ``ckptavg inspect``),
plus the reader side of row 15 (a file that changes while it is read).

Every case builds tiny real files under ``tmp_path`` and runs the real CLI. A refusal must be:
exit 1 (usage errors 2); one ``ckptavg: error:`` line, the last line of stderr, naming the
offending file (and tensor); no traceback; nothing on stdout; and no output folder (neither
``-o`` nor a ``.ckptavg-tmp-`` sibling). Proofs are physical where they can be: a malicious
pickle's payload would create a sentinel file, and a file that must never be opened is a FIFO
watched by a thread that notices any reader.

Cases marked ``xfail(strict=True, reason="BUG: ...")`` document bugs found while writing
these tests; they start failing (XPASS) once the bug is fixed.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import resource
import struct
import subprocess
import threading
import time
import tracemalloc
import warnings
from pathlib import Path

import pytest
import torch
from conftest import run_cli_subprocess, tiny_state, write_checkpoint
from safetensors.torch import load_file, save_file

from ckptavg.errors import (
    CheckpointChangedError,
    CheckpointVanishedError,
    InvalidHeaderError,
    InvalidOffsetError,
    TensorInvalidInfoError,
    TruncatedFileError,
)
from ckptavg.reading.checkpoint import open_checkpoint
from ckptavg.reading.discover import find_candidates
from ckptavg.reading.fileio import FileCache, identify
from ckptavg.reading.formats.safetensors import read_header
from ckptavg.reading.steps import step_from_name

ERR = "ckptavg: error:"
LOG_PREFIXES = ("INFO: ", "WARNING: ", "DEBUG: ")
OLD_NS = 1_000_000_000 * 1_000_000_000  # 2001-09-09: an mtime that any later write moves


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _parts(r) -> tuple[int, str, str]:
    if isinstance(r, subprocess.CompletedProcess):
        return r.returncode, r.stdout, r.stderr
    return r.code, r.out, r.err


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was written"
    left = [p.name for p in out.parent.iterdir() if ".ckptavg-tmp-" in p.name]
    assert not left, f"temporary output left behind: {left}"


def assert_refused(r, *needles: str, code: int = 1, out: Path | None = None, logs_ok: bool = False) -> str:
    """The CLI refused: exit ``code``, one error line (the last line of stderr) holding every
    needle, no traceback, nothing on stdout, nothing written. Returns the error line.

    Without ``logs_ok`` stderr must be exactly that one line; with it, other lines are allowed
    only if they are single-line log records (``INFO: ...``, ``WARNING: ...``).
    """
    rc, stdout, err = _parts(r)
    assert rc == code, r
    assert "Traceback" not in err, err
    lines = err.splitlines()
    errors = [line for line in lines if line.startswith(ERR)]
    assert len(errors) == 1, err
    line = errors[0]
    assert lines and lines[-1] == line, f"the error is not the last line of stderr:\n{err}"
    others = lines[:-1]
    if logs_ok:
        assert all(o.startswith(LOG_PREFIXES) for o in others), f"stray stderr lines:\n{err}"
    else:
        assert not others, f"stderr is more than the one error line:\n{err}"
    assert stdout.strip() == "", stdout
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    if out is not None:
        assert_nothing_written(out)
    return line


def assert_ok(r) -> None:
    rc, _, err = _parts(r)
    assert rc == 0, r
    assert "Traceback" not in err and ERR not in err, err


def steps_of(out: Path) -> list[int]:
    return json.loads((out / "ckptavg.json").read_text())["steps"]


def load_out(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    assert tensors, f"no weights in {out}"
    return tensors


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def raw_safetensors(path: Path, header: dict | bytes, data: bytes = b"") -> Path:
    """Hand-written safetensors bytes: 8-byte little-endian header length, header, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def f32(shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


def fp32_run(root: Path, n: int, fmt: str = "safetensors", *, edit=None) -> tuple[list[Path], list[dict]]:
    """``n`` float32 checkpoints at steps 100, 200, ...; ``edit(i, state)`` may change a state first."""
    paths, states = [], []
    for i in range(n):
        state = tiny_state(i, dtype=torch.float32)
        if edit is not None:
            edit(i, state)
        step = (i + 1) * 100
        name = f"checkpoint-{step}" if fmt == "safetensors" else f"step_{step}.pt"
        paths.append(write_checkpoint(root / name, state, fmt, step=step if fmt == "safetensors" else None))
        states.append(state)
    return paths, states


def mark_deepspeed(ckpt: Path) -> None:
    """Make ``ckpt`` look saved by DeepSpeed, as HF Trainer leaves it: ``zero_to_fp32.py`` beside the weights."""
    folder = ckpt if ckpt.is_dir() else ckpt.parent
    (folder / "zero_to_fp32.py").write_text("# DeepSpeed's consolidation script\n")


def weights_file(ckpt: Path) -> Path:
    return ckpt / "model.safetensors" if ckpt.is_dir() else ckpt


class FifoWatch:
    """A FIFO that must never be opened. A thread keeps trying a non-blocking open for writing,
    which succeeds only while some reader has the FIFO open (or is blocked opening it); it then
    records the fact and closes, so the reader sees end-of-file instead of hanging."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(self.path)
        self.opened = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-fifo-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: nobody is reading
                self._stop.wait(0.002)
                continue
            self.opened = True
            os.close(fd)
            return

    def stop(self) -> bool:
        self._stop.set()
        self._thread.join(5)
        return self.opened


class _Touch:
    """Unpickling this runs ``Path(sentinel).touch()``."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.sentinel),))


def evil_pickle(path: Path, sentinel: Path, layout: str = "flat") -> Path:
    """A pickle that holds real tensors and a payload that would create ``sentinel``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = {"layer.weight": torch.ones(4, 4), "layer.bias": torch.zeros(4)}
    if layout == "flat":
        torch.save({**weights, "evil": _Touch(sentinel)}, path)
    elif layout == "lightning":
        torch.save({"epoch": 0, "global_step": 5, "state_dict": {f"model.{k}": v for k, v in weights.items()},
                    "hyper_parameters": _Touch(sentinel)}, path)
    elif layout == "legacy":  # pre-1.6 torch.save format (not a zip file)
        torch.save({**weights, "evil": _Touch(sentinel)}, path, _use_new_zipfile_serialization=False)
    elif layout == "raw":  # a plain pickle, not written by torch.save at all
        path.write_bytes(pickle.dumps({"weights": 1, "evil": _Touch(sentinel)}, protocol=4))
    else:
        raise ValueError(layout)
    return path


def assert_payload_is_live(tmp_path: Path) -> None:
    """Positive control: the payload really runs when a pickle is loaded without weights_only."""
    control = tmp_path / "control-SENTINEL"
    f = evil_pickle(tmp_path / "control" / "control.pt", control)
    torch.load(f, weights_only=False)
    assert control.exists()
    control.unlink()


# ---------------------------------------------------------------------------------------------
# row 2: an index lists a missing shard
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["sharded", "bin-sharded"])
def test_row2_index_lists_a_missing_shard(tmp_path, ckptavg, fmt):
    good = write_checkpoint(tmp_path / "run" / "checkpoint-100", tiny_state(0), fmt, shard_bytes=1024, step=100)
    bad = write_checkpoint(tmp_path / "run" / "checkpoint-200", tiny_state(1), fmt, shard_bytes=1024, step=200)
    index = next(bad.glob("*.index.json"))
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    assert len(shards) >= 2
    (bad / shards[-1]).unlink()
    out = tmp_path / "out"
    assert_refused(ckptavg("average", good, bad, "-o", out), str(index), shards[-1], "missing", out=out)
    assert_refused(ckptavg("inspect", bad), str(index), shards[-1])


def test_row2_missing_shard_in_a_run_folder_is_skipped_as_incomplete(tmp_path, ckptavg):
    paths = [write_checkpoint(tmp_path / "run" / f"checkpoint-{s}", tiny_state(i), "sharded", shard_bytes=1024, step=s)
             for i, s in enumerate((100, 200, 300))]
    next(paths[2].glob("model-*.safetensors")).unlink()
    out = tmp_path / "out"
    r = ckptavg("average", tmp_path / "run", "--last", "5", "-o", out)
    assert_ok(r)
    assert steps_of(out) == [100, 200]
    assert "incomplete" in r.err and "checkpoint-300" in r.err


# ---------------------------------------------------------------------------------------------
# row 3: truncated shard
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["single", "shard", "header", "under-8-bytes"])
def test_row3_truncated_safetensors(tmp_path, ckptavg, where):
    fmt = "sharded" if where == "shard" else "safetensors"
    a = write_checkpoint(tmp_path / "run" / "checkpoint-100", tiny_state(0), fmt, shard_bytes=1024, step=100)
    b = write_checkpoint(tmp_path / "run" / "checkpoint-200", tiny_state(1), fmt, shard_bytes=1024, step=200)
    f = max(b.glob("*.safetensors"))
    size = f.stat().st_size
    os.truncate(f, {"single": size - 100, "shard": size - 100, "header": 20, "under-8-bytes": 5}[where])
    with pytest.raises(TruncatedFileError) as info:
        open_checkpoint(b)
    assert info.value.path == f
    out = tmp_path / "out"
    assert_refused(ckptavg("average", a, b, "-o", out), str(f), out=out)
    assert_refused(ckptavg("inspect", b), str(f))


def test_row3_truncated_pickle(tmp_path, ckptavg):
    paths, _ = fp32_run(tmp_path / "run", 2, "pt")
    os.truncate(paths[1], paths[1].stat().st_size - 100)
    out = tmp_path / "out"
    assert_refused(ckptavg("average", *paths, "-o", out), str(paths[1]), out=out)


def test_row3_truncated_newest_in_a_run_folder_is_skipped(tmp_path, ckptavg):
    paths, _ = fp32_run(tmp_path / "run", 3)
    f = paths[2] / "model.safetensors"
    os.truncate(f, f.stat().st_size - 100)
    out = tmp_path / "out"
    r = ckptavg("average", tmp_path / "run", "--last", "3", "-o", out)
    assert_ok(r)
    assert steps_of(out) == [100, 200]
    assert "checkpoint-300" in r.err and "truncated" in r.err


# ---------------------------------------------------------------------------------------------
# row 4: header bomb and garbage
# ---------------------------------------------------------------------------------------------
def _run_measured(fn):
    before_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        r = fn()
        seconds = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_rss
    return r, seconds, peak, grown_kb


@pytest.mark.parametrize("n", [2**40, 100_000_001], ids=["2**40", "limit+1"])
def test_row4_header_bomb_is_rejected_fast_with_flat_memory(tmp_path, ckptavg, n):
    # The file really is that long (sparse, no disk used), so only the size limit stops a
    # reader from allocating and reading the whole claimed header.
    f = tmp_path / "step_1.safetensors"
    with open(f, "wb") as fh:
        fh.write(struct.pack("<Q", n) + b'{"a":')
        try:
            fh.truncate(8 + n + 64)
        except OSError:  # no sparse file that large here: the short file must still hit the limit first
            pass
    good = write_checkpoint(tmp_path / "step_2.safetensors", tiny_state(1), "safetensors-file")
    out = tmp_path / "out"
    try:
        r, seconds, peak, grown_kb = _run_measured(lambda: ckptavg("average", f, good, "-o", out))
        assert_refused(r, str(f), "limit", out=out)
        assert seconds < 1.0
        assert peak < 20 * 2**20, f"traced peak {peak} bytes"
        assert grown_kb < 50_000, f"max RSS grew by {grown_kb} KB"
        r, seconds, peak, _ = _run_measured(lambda: ckptavg("inspect", f))
        assert_refused(r, str(f), "limit")
        assert seconds < 1.0 and peak < 20 * 2**20
    finally:
        f.unlink()


GARBAGE = {
    "bad-utf8": (b'{"a\xff\xfe": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', "UTF-8"),
    "bad-json": (b'{"a": {"dtype": "F32", "shape": [1], ', "JSON"),
    "json-list": (b'[{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}]', "header"),
    "json-string": (b'"just a string"', "header"),
    "empty-header": (b"", "header"),
    "trailing-garbage": (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}} [1]', "JSON"),
    "entry-not-object": (b'{"a": [1, 2, 3]}', "'a'"),
    "metadata-not-strings": (b'{"__metadata__": {"format": 1}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
                             "__metadata__"),
}


@pytest.mark.parametrize("case", list(GARBAGE))
def test_row4_garbage_headers(tmp_path, ckptavg, case):
    raw, needle = GARBAGE[case]
    f = raw_safetensors(tmp_path / "step_1.safetensors", raw, bytes(4))
    with pytest.raises(InvalidHeaderError):
        read_header(f)
    good = write_checkpoint(tmp_path / "step_2.safetensors", tiny_state(1), "safetensors-file")
    out = tmp_path / "out"
    r, seconds, peak, _ = _run_measured(lambda: ckptavg("average", f, good, "-o", out))
    assert_refused(r, str(f), needle, out=out)
    assert seconds < 1.0 and peak < 20 * 2**20
    assert_refused(ckptavg("inspect", f), str(f), needle)


_DEEP = 100_000
GARBAGE_BUGS = {
    # json.loads raises RecursionError / ValueError / TypeError, which escape as an anonymous
    # "TypeError: unhashable type: 'list'"-style line that does not name the file.
    "deep-nesting": b'{"a": ' + b"[" * _DEEP + b"]" * _DEEP + b"}",
    "huge-int-literal": b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}',
    "dtype-not-a-string": b'{"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}',
}


@pytest.mark.parametrize("case", list(GARBAGE_BUGS))
def test_row4_garbage_headers_that_escape_validation(tmp_path, ckptavg, case):
    f = raw_safetensors(tmp_path / "step_1.safetensors", GARBAGE_BUGS[case], bytes(4))
    out = tmp_path / "out"
    assert_refused(ckptavg("average", f, "-o", out), str(f), out=out)


INDEX_GARBAGE = {
    "bad-utf8": b'{"weight_map": {"a\xff": "model-00001-of-00001.safetensors"}}',
    "bad-json": b'{"weight_map": {"a": ',
    "not-an-object": b'[{"weight_map": {"a": "model-00001-of-00001.safetensors"}}]',
    "no-weight-map": b'{"metadata": {}}',
    "null-shard": b'{"weight_map": {"a": null}}',
    "empty-shard-name": b'{"weight_map": {"a": ""}}',
}
INDEX_GARBAGE_BUGS = {
    "shard-is-a-list": b'{"weight_map": {"a": ["model-00001-of-00001.safetensors"]}}',
    "mixed-types": b'{"weight_map": {"a": 1, "b": "model-00001-of-00001.safetensors"}}',
    "deep-nesting": b'{"weight_map": ' + b"[" * _DEEP + b"]" * _DEEP + b"}",
}


@pytest.mark.parametrize("case", [
    *INDEX_GARBAGE,
    *INDEX_GARBAGE_BUGS,  # fixed: read_index_json checks values and catches RecursionError
])
def test_row4_garbage_index(tmp_path, ckptavg, case):
    ck = tmp_path / "checkpoint-1"
    ck.mkdir()
    save_file({"a": torch.ones(2)}, str(ck / "model-00001-of-00001.safetensors"))
    index = ck / "model.safetensors.index.json"
    index.write_bytes({**INDEX_GARBAGE, **INDEX_GARBAGE_BUGS}[case])
    out = tmp_path / "out"
    assert_refused(ckptavg("average", ck, "-o", out), str(index), out=out)


# ---------------------------------------------------------------------------------------------
# row 5: crafted offsets
# ---------------------------------------------------------------------------------------------
CRAFTED = {
    # case: (header, data length, error class, tensor to name, words in the message)
    "overlap": ({"a": f32([4], 0, 16), "b": f32([4], 8, 24)}, 24, InvalidOffsetError, "b", "overlaps"),
    "gap": ({"a": f32([4], 0, 16), "b": f32([2], 24, 32)}, 32, InvalidOffsetError, "b", "gap"),
    "far-out-of-bounds": ({"a": f32([4], 0, 16), "b": f32([4], 4096, 4112)}, 32, InvalidOffsetError, "b", "[4096, 4112)"),
    "shape-not-bytes": ({"a": f32([4], 0, 32)}, 32, TensorInvalidInfoError, "a", "needs 16 bytes"),
    "bf16-shape-not-bytes": ({"a": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 8]}}, 8, TensorInvalidInfoError, "a",
                             "needs 6 bytes"),
    "begin-after-end": ({"a": f32([0], 16, 0)}, 16, InvalidOffsetError, "a", "begin <= end"),
    "negative-offset": ({"a": f32([4], -16, 0)}, 16, InvalidOffsetError, "a", "data_offsets"),
    "unknown-dtype": ({"a": {"dtype": "F31", "shape": [4], "data_offsets": [0, 16]}}, 16, TensorInvalidInfoError, "a",
                      "unknown dtype"),
    "negative-dim": ({"a": f32([-4], 0, 16)}, 16, TensorInvalidInfoError, "a", "shape"),
    "shape-overflow": ({"a": f32([2**62, 2**62], 0, 16)}, 16, TensorInvalidInfoError, "a", "overflows 64 bits when multiplied out"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_row5_crafted_offsets(tmp_path, ckptavg, case):
    header, nbytes, error, tensor, words = CRAFTED[case]
    f = raw_safetensors(tmp_path / "step_1.safetensors", header, bytes(nbytes))
    with pytest.raises(error) as info:
        read_header(f)
    assert info.value.tensor == tensor and info.value.path == f
    good = raw_safetensors(tmp_path / "step_2.safetensors", {"a": f32([4], 0, 16)}, bytes(16))
    out = tmp_path / "out"
    assert_refused(ckptavg("average", good, f, "-o", out), str(f), f"tensor {tensor!r}", words, out=out)
    assert_refused(ckptavg("inspect", f), str(f), f"tensor {tensor!r}")


def test_row5_out_of_bounds_at_the_end_is_refused(tmp_path, ckptavg):
    # the last range runs past the end of the file: safetensors calls this MetadataIncompleteBuffer
    f = raw_safetensors(tmp_path / "step_1.safetensors", {"a": f32([4], 0, 16), "b": f32([8], 16, 48)}, bytes(32))
    with pytest.raises(TruncatedFileError):
        read_header(f)
    out = tmp_path / "out"
    assert_refused(ckptavg("average", f, "-o", out), str(f), "48", "32", out=out)


def test_row5_out_of_bounds_at_the_end_names_the_tensor(tmp_path, ckptavg):
    f = raw_safetensors(tmp_path / "step_1.safetensors", {"a": f32([4], 0, 16), "b": f32([8], 16, 48)}, bytes(32))
    out = tmp_path / "out"
    assert_refused(ckptavg("average", f, "-o", out), str(f), "tensor 'b'", out=out)


def test_row5_crafted_shard_in_a_sharded_checkpoint(tmp_path, ckptavg):
    def sharded(ck: Path, crafted: bool) -> Path:
        ck.mkdir(parents=True)
        save_file({"x": torch.ones(4)}, str(ck / "model-00001-of-00002.safetensors"))
        if crafted:
            raw_safetensors(ck / "model-00002-of-00002.safetensors", {"y": f32([4], 0, 16), "z": f32([4], 12, 28)}, bytes(28))
        else:
            save_file({"y": torch.ones(4), "z": torch.ones(4)}, str(ck / "model-00002-of-00002.safetensors"))
        (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors",
            "z": "model-00002-of-00002.safetensors"}}))
        return ck

    a = sharded(tmp_path / "run" / "checkpoint-100", False)
    b = sharded(tmp_path / "run" / "checkpoint-200", True)
    out = tmp_path / "out"
    assert_refused(ckptavg("average", a, b, "-o", out), str(b / "model-00002-of-00002.safetensors"), "tensor 'z'",
                   "overlaps", out=out)


# ---------------------------------------------------------------------------------------------
# row 6: path escape
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["dotdot", "dotdot-bin", "absolute", "symlink"])
def test_row6_index_path_escape_is_refused_before_open(tmp_path, ckptavg, target):
    ck = tmp_path / "run" / "checkpoint-1"
    ck.mkdir(parents=True)
    pickles = target == "dotdot-bin"
    ext = ".bin" if pickles else ".safetensors"
    if pickles:
        torch.save({"b": torch.ones(4)}, ck / "pytorch_model-00001-of-00002.bin")
    else:
        save_file({"b": torch.ones(4)}, str(ck / "model-00001-of-00002.safetensors"))
    # the outside "shard" is a FIFO: opening it would be noticed (and would otherwise hang)
    if target == "absolute":
        watch = FifoWatch(tmp_path / "elsewhere" / f"secret{ext}")
        name = str(watch.path)
    elif target == "symlink":
        watch = FifoWatch(tmp_path / "elsewhere" / f"secret{ext}")
        (ck / f"model-00002-of-00002{ext}").symlink_to(watch.path)
        name = f"model-00002-of-00002{ext}"
    else:
        watch = FifoWatch(tmp_path / f"x{ext}")  # ck/../../x = tmp_path/x
        name = f"../../x{ext}"
    index = ck / ("pytorch_model.bin.index.json" if pickles else "model.safetensors.index.json")
    index.write_text(json.dumps({"weight_map": {"a": name, "b": f"{'pytorch_model' if pickles else 'model'}-00001-of-00002{ext}"}}))
    out = tmp_path / "out"
    try:
        r = ckptavg("average", ck, "-o", out)
        r2 = ckptavg("inspect", ck)
    finally:
        opened = watch.stop()
    assert not opened, "the file outside the checkpoint folder was opened"
    line = assert_refused(r, str(index), "outside", out=out, logs_ok=True)
    assert repr(name) in line
    assert any(ln.startswith("WARNING: security:") for ln in r.err.splitlines()), r.err
    assert_refused(r2, str(index), "outside", logs_ok=True)
    if target == "symlink":
        assert str(watch.path) in line  # says where the link points
    else:
        assert "symbolic link" not in line  # refused for its name, before anything is resolved


def test_row6_escaping_checkpoint_in_a_run_folder_is_skipped_with_a_security_warning(tmp_path, ckptavg):
    _paths, _ = fp32_run(tmp_path / "run", 2)
    ck = tmp_path / "run" / "checkpoint-300"
    ck.mkdir()
    save_file({"b": torch.ones(4)}, str(ck / "model-00001-of-00002.safetensors"))
    watch = FifoWatch(tmp_path / "x.safetensors")
    (ck / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "../../x.safetensors", "b": "model-00001-of-00002.safetensors"}}))
    out = tmp_path / "out"
    try:
        r = ckptavg("average", tmp_path / "run", "--last", "5", "-o", out)
    finally:
        assert not watch.stop()
    assert_ok(r)
    assert steps_of(out) == [100, 200]
    assert "security" in r.err and "checkpoint-300" in r.err


# ---------------------------------------------------------------------------------------------
# row 7: index and shard disagree
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["sharded", "bin-sharded"])
@pytest.mark.parametrize("case", ["index-lists-a-key-the-shard-lacks", "shard-holds-a-key-the-index-lacks"])
def test_row7_index_and_shard_disagree(tmp_path, ckptavg, fmt, case):
    good = write_checkpoint(tmp_path / "run" / "checkpoint-100", tiny_state(0), fmt, shard_bytes=1024, step=100)
    bad = write_checkpoint(tmp_path / "run" / "checkpoint-200", tiny_state(1), fmt, shard_bytes=1024, step=200)
    index = next(bad.glob("*.index.json"))
    data = json.loads(index.read_text())
    shard = data["weight_map"]["layers.0.attn.weight"]
    if case == "index-lists-a-key-the-shard-lacks":
        data["weight_map"]["ghost.weight"] = shard
        key = "ghost.weight"
    else:
        del data["weight_map"]["layers.0.attn.weight"]
        key = "layers.0.attn.weight"
    index.write_text(json.dumps(data))
    out = tmp_path / "out"
    assert_refused(ckptavg("average", good, bad, "-o", out), str(bad / shard), f"tensor {key!r}", index.name, out=out)
    assert_refused(ckptavg("inspect", bad), str(bad / shard), f"tensor {key!r}")


# ---------------------------------------------------------------------------------------------
# row 8: shape/dtype change, empty ZeRO-3 tensors
# ---------------------------------------------------------------------------------------------
def _change(case: str):
    def edit(i: int, state: dict) -> None:
        if i != 1:
            return
        if case == "shape":
            state["layers.0.attn.weight"] = torch.zeros(16, 17)
        elif case == "dtype":
            state["layers.0.attn.weight"] = state["layers.0.attn.weight"].half()
        else:  # a DeepSpeed ZeRO-3 partitioned placeholder
            state["layers.0.attn.weight"] = torch.zeros(0)
    return edit


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
@pytest.mark.parametrize("case", ["shape", "dtype", "zero3"])
def test_row8_tensor_change_is_refused_and_the_old_output_is_untouched(tmp_path, ckptavg, fmt, case):
    paths, _ = fp32_run(tmp_path / "run", 3, fmt, edit=_change(case))
    if case == "zero3":
        for p in paths:
            mark_deepspeed(p)
    # an earlier, good average of the first checkpoint: --force must not replace it on failure
    out = tmp_path / "out"
    assert_ok(ckptavg("average", paths[0], "-o", out))
    before = snapshot(out)
    r = ckptavg("average", *paths, "--force", "-o", out)
    line = assert_refused(r, "layers.0.attn.weight", logs_ok=True)
    assert str(paths[1]) in line  # the checkpoint where the tensor changed
    if case == "zero3":
        assert "ZeRO-3" in line
    assert snapshot(out) == before
    assert not [p for p in tmp_path.iterdir() if ".ckptavg-tmp-" in p.name]
    assert_refused(ckptavg("average", *paths, "-o", tmp_path / "fresh"), "layers.0.attn.weight",
                   out=tmp_path / "fresh", logs_ok=True)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_row8_zero3_placeholders_in_every_checkpoint(tmp_path, ckptavg, fmt):
    def edit(i, state):
        state["layers.0.attn.weight"] = torch.zeros(0)

    paths, _ = fp32_run(tmp_path / "run", 2, fmt, edit=edit)
    for p in paths:
        mark_deepspeed(p)
    out = tmp_path / "out"
    assert_refused(ckptavg("average", *paths, "-o", out), "layers.0.attn.weight", "ZeRO-3", out=out, logs_ok=True)


# ---------------------------------------------------------------------------------------------
# row 9: NaN / Inf
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("method", ["uniform", "ema:150"])
def test_row9_nonfinite_names_checkpoint_and_tensor(tmp_path, ckptavg, fmt, value, method):
    def edit(i, state):
        if i == 1:
            state["layers.0.norm.weight"][5] = value

    paths, _ = fp32_run(tmp_path / "run", 3, fmt, edit=edit)
    out = tmp_path / "out"
    line = assert_refused(ckptavg("average", *paths, "--method", method, "-o", out), str(weights_file(paths[1])),
                          "tensor 'layers.0.norm.weight'", "NaN or Inf", out=out, logs_ok=True)
    assert str(weights_file(paths[0])) not in line and str(weights_file(paths[2])) not in line
    r = ckptavg("average", *paths, "--method", method, "--allow-nonfinite", "-o", out)
    assert_ok(r)
    got = load_out(out)
    assert not torch.isfinite(got["layers.0.norm.weight"]).all()
    assert all(torch.isfinite(t).all() for k, t in got.items() if k != "layers.0.norm.weight")


def test_row9_nonfinite_in_bf16(tmp_path, ckptavg):
    states = [tiny_state(i) for i in range(2)]  # bf16 matrices
    states[1]["embed.weight"][3, 3] = float("nan")
    paths = [write_checkpoint(tmp_path / "run" / f"checkpoint-{(i + 1) * 100}", s) for i, s in enumerate(states)]
    out = tmp_path / "out"
    assert_refused(ckptavg("average", *paths, "-o", out), str(paths[1] / "model.safetensors"), "tensor 'embed.weight'",
                   out=out, logs_ok=True)


def _nan_in_first(i, state):
    if i == 0:
        state["embed.weight"][0, 0] = float("nan")
        state["layers.0.mlp.bias"][:] = float("inf")


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
@pytest.mark.parametrize("window,n", [
    (2, 4),
    (3, 4),
    (2, 3),
    (2, 5),
    (3, 5),
])
def test_row9_nonfinite_that_left_the_lawa_window_does_not_poison(tmp_path, ckptavg, fmt, window, n):
    paths, states = fp32_run(tmp_path / "run", n, fmt, edit=_nan_in_first)
    out = tmp_path / "out"
    r = ckptavg("average", *paths, "--method", f"lawa:{window}", "-o", out)
    assert_ok(r)
    got = load_out(out)
    assert steps_of(out)  # provenance written
    for name in ("embed.weight", "layers.0.mlp.bias", "layers.0.attn.weight"):
        want = sum(s[name].double() for s in states[-window:]) / window
        assert torch.isfinite(got[name]).all(), name
        torch.testing.assert_close(got[name], want.float(), msg=name)


def test_row9_nonfinite_before_the_swa_start_does_not_poison(tmp_path, ckptavg):
    paths, states = fp32_run(tmp_path / "run", 3, edit=_nan_in_first)
    out = tmp_path / "out"
    assert_ok(ckptavg("average", *paths, "--method", "swa:200", "-o", out))
    got = load_out(out)
    torch.testing.assert_close(got["embed.weight"], ((states[1]["embed.weight"].double() + states[2]["embed.weight"]) / 2).float())
    assert steps_of(out) == [200, 300]


# ---------------------------------------------------------------------------------------------
# rows 10 and 11: malicious pickles
# ---------------------------------------------------------------------------------------------
PICKLE_CASES = {
    # case: (file name, layout, give the folder instead of the file)
    "hf-bin-folder": ("pytorch_model.bin", "flat", True),
    "bin-file": ("pytorch_model.bin", "flat", False),
    "pt": ("step_5.pt", "flat", False),
    "pth": ("model_5.pth", "flat", False),
    "lightning-ckpt": ("epoch=0-step=5.ckpt", "lightning", False),
    "legacy-format-pt": ("step_5.pt", "legacy", False),
    "no-suffix-zip": ("weights", "flat", False),
}


@pytest.mark.parametrize("force_env", [False, True], ids=["plain", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"])
@pytest.mark.parametrize("case", list(PICKLE_CASES))
def test_row10_row11_malicious_pickle_is_never_executed(tmp_path, ckptavg, monkeypatch, case, force_env):
    if force_env:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    assert_payload_is_live(tmp_path)
    name, layout, as_folder = PICKLE_CASES[case]
    sentinel = tmp_path / "SENTINEL"
    folder = tmp_path / "in"
    f = evil_pickle(folder / name, sentinel, layout)
    out = tmp_path / "out"
    r = ckptavg("average", folder if as_folder else f, "-o", out)
    assert_refused(r, str(f), "not executed", out=out)
    assert_refused(ckptavg("inspect", folder if as_folder else f), str(f), "not executed")
    assert not sentinel.exists(), "the pickle's payload ran"


def test_row11_the_env_var_really_disables_default_weights_only(tmp_path, monkeypatch):
    """Control for row 11: under the variable, a plain torch.load runs the payload, so ckptavg's
    refusal above is due to its explicit weights_only=True."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    sentinel = tmp_path / "SENTINEL"
    f = evil_pickle(tmp_path / "step_5.pt", sentinel)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch says it is forcing weights_only=False
        torch.load(f)
    assert sentinel.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_row10_raw_pickle_is_refused(tmp_path, ckptavg):
    sentinel = tmp_path / "SENTINEL"
    f = evil_pickle(tmp_path / "step_5.pt", sentinel, "raw")
    out = tmp_path / "out"
    r = ckptavg("average", f, "-o", out)
    assert r.code == 1 and "Traceback" not in r.err and r.err.splitlines()[-1].startswith(f"{ERR} {f}:"), r
    assert "not executed" in r.err
    assert not sentinel.exists() and not out.exists()


def test_row10_raw_pickle_stderr_is_one_line(tmp_path):
    # a real process: in-process, pytest's own warning capture hides the warning
    sentinel = tmp_path / "SENTINEL"
    f = evil_pickle(tmp_path / "step_5.pt", sentinel, "raw")
    p = run_cli_subprocess("average", f, "-o", tmp_path / "out")
    assert not sentinel.exists()
    assert_refused(p, str(f), "not executed", out=tmp_path / "out")


def test_row10_malicious_shard_of_a_sharded_bin(tmp_path, ckptavg):
    sentinel = tmp_path / "SENTINEL"
    ck = write_checkpoint(tmp_path / "run" / "checkpoint-100", tiny_state(0), "bin-sharded")
    shard = ck / "pytorch_model-00002-of-00002.bin"
    keys = list(torch.load(shard, weights_only=True))
    torch.save({**{k: torch.zeros(1) for k in keys}, "evil": _Touch(sentinel)}, shard)
    out = tmp_path / "out"
    assert_refused(ckptavg("average", ck, "-o", out), str(shard), "not executed", out=out)
    assert not sentinel.exists()


def test_row10_malicious_checkpoint_in_a_run_folder_is_skipped(tmp_path, ckptavg):
    sentinel = tmp_path / "SENTINEL"
    for i, step in enumerate((100, 200)):
        write_checkpoint(tmp_path / "run" / f"checkpoint-{step}", tiny_state(i), "bin", step=step)
    evil_pickle(tmp_path / "run" / "checkpoint-300" / "pytorch_model.bin", sentinel)
    out = tmp_path / "out"
    r = ckptavg("average", tmp_path / "run", "--last", "5", "-o", out)
    assert_ok(r)
    assert steps_of(out) == [100, 200]
    assert "checkpoint-300" in r.err and "not executed" in r.err
    assert not sentinel.exists()


# ---------------------------------------------------------------------------------------------
# row 12: pickled side files
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["training_args.bin", "optimizer.pt", "scheduler.pt", "meta.pt", "rng_state_0.pth",
                                  "scaler.pt"])
def test_row12_side_file_given_directly_is_refused(tmp_path, ckptavg, name):
    sentinel = tmp_path / "SENTINEL"
    f = evil_pickle(tmp_path / "checkpoint-100" / name, sentinel)
    out = tmp_path / "out"
    assert_refused(ckptavg("average", f, "-o", out), str(f), "never unpickles", out=out)
    assert_refused(ckptavg("inspect", f), str(f), "never unpickles")
    assert not sentinel.exists()


def test_row12_side_file_given_directly_is_never_opened(tmp_path, ckptavg):
    watch = FifoWatch(tmp_path / "checkpoint-100" / "training_args.bin")
    out = tmp_path / "out"
    try:
        r = ckptavg("average", watch.path, "-o", out)
    finally:
        assert not watch.stop(), "training_args.bin was opened"
    assert_refused(r, str(watch.path), "never unpickles", out=out)


@pytest.mark.parametrize("layout", ["dcp", "lightning-fsdp"])
def test_row12_dcp_folder_is_refused_and_metadata_never_unpickled(tmp_path, ckptavg, layout):
    sentinel = tmp_path / "SENTINEL"
    folder = tmp_path / "run" / ("step-10" if layout == "dcp" else "epoch=0-step=10.ckpt")
    evil_pickle(folder / "metadata.pickle", sentinel)
    (folder / "metadata.pickle").rename(folder / ".metadata")
    (folder / "__0_0.distcp").write_bytes(os.urandom(256))
    if layout == "lightning-fsdp":
        evil_pickle(folder / "meta.pt", sentinel)
    out = tmp_path / "out"
    # read only through the restricted unpickler (docs/FAULTS.md row 80): a torch.save zip is no DCP .metadata
    assert_refused(ckptavg("average", folder, "-o", out), str(folder / ".metadata"), "DCP .metadata", out=out)
    assert_refused(ckptavg("inspect", folder), str(folder / ".metadata"), "DCP .metadata")
    assert not sentinel.exists()


def test_row12_dcp_metadata_is_never_opened(tmp_path, ckptavg):
    folder = tmp_path / "step-10"
    watch = FifoWatch(folder / ".metadata")
    (folder / "__0_0.distcp").write_bytes(os.urandom(256))
    out = tmp_path / "out"
    try:
        r = ckptavg("average", folder, "-o", out)
    finally:
        assert not watch.stop(), ".metadata was opened"
    assert_refused(r, str(folder / ".metadata"), "never opened", out=out)


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_row12_hf_folder_with_malicious_side_files_averages_without_touching_them(tmp_path, ckptavg, weights):
    sentinel = tmp_path / "SENTINEL"
    paths = []
    for i, step in enumerate((100, 200)):
        p = write_checkpoint(tmp_path / "run" / f"checkpoint-{step}", tiny_state(i, dtype=torch.float32), weights,
                             step=step, config=True)
        for side in ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt"):
            evil_pickle(p / side, sentinel)
        paths.append(p)
    out = tmp_path / "out"
    r = ckptavg("average", *paths, "-o", out)
    assert_ok(r)
    assert steps_of(out) == [100, 200]
    got = load_out(out)
    torch.testing.assert_close(got["embed.weight"], (tiny_state(0, dtype=torch.float32)["embed.weight"]
                                                     + tiny_state(1, dtype=torch.float32)["embed.weight"]) / 2)
    assert not [p.name for p in out.iterdir() if p.name.startswith(("training_args", "optimizer", "rng_state"))]
    assert_ok(ckptavg("average", tmp_path / "run", "--last", "2", "-o", tmp_path / "out2"))
    assert_ok(ckptavg("inspect", paths[1]))
    assert_ok(ckptavg("inspect", tmp_path / "run"))
    assert not sentinel.exists()


def test_row12_hf_folder_side_files_are_never_opened(tmp_path, ckptavg):
    paths, _ = fp32_run(tmp_path / "run", 2)
    watches = [FifoWatch(p / side) for p in paths for side in ("training_args.bin", "optimizer.pt")]
    out = tmp_path / "out"
    try:
        r = ckptavg("average", *paths, "-o", out)
        r2 = ckptavg("average", tmp_path / "run", "--last", "2", "-o", tmp_path / "out2")
    finally:
        opened = [w.path for w in watches if w.stop()]
    assert not opened, f"side files were opened: {opened}"
    assert_ok(r)
    assert_ok(r2)
    assert steps_of(out) == steps_of(tmp_path / "out2") == [100, 200]


def test_row12_index_pointing_at_a_side_file_never_runs_it(tmp_path, ckptavg):
    sentinel = tmp_path / "SENTINEL"
    ck = tmp_path / "checkpoint-100"
    evil_pickle(ck / "training_args.bin", sentinel)
    (ck / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"layer.weight": "training_args.bin"}}))
    out = tmp_path / "out"
    assert_refused(ckptavg("average", ck, "-o", out), str(ck / "training_args.bin"), out=out)
    assert not sentinel.exists()


# ---------------------------------------------------------------------------------------------
# row 17: noise entries
# ---------------------------------------------------------------------------------------------
NOISE_DIRS = [
    # the names from the brief: complete-looking staging folders
    "tmp-checkpoint-300", "checkpoint-400.orbax-checkpoint-tmp-1", ".hidden-500",
    # the same kinds of noise with a step in the name, so only the noise rules keep them out
    "tmp-step-310", "tmp_step_320", "step_410.orbax-checkpoint-tmp-1", ".step-510", "step-610.tmp", "step-620.partial",
    "step-630.incomplete", "avg.ckptavg-tmp-1-ab12/step-640",
]
NOISE_FILES = ["x.metadata.tmp", "step-700.metadata.tmp", "tmp-step_710.safetensors", ".step_720.safetensors",
               "step_730.orbax-checkpoint-tmp-9.safetensors"]


def _noisy_run(root: Path) -> None:
    for i, step in enumerate((100, 200)):
        write_checkpoint(root / f"checkpoint-{step}", tiny_state(i), step=step)
    for i, name in enumerate(NOISE_DIRS):
        write_checkpoint(root / name, tiny_state(10 + i), step=1000 + i)  # complete: weights + trainer_state.json
    sub = root / "nested"
    for i, name in enumerate(NOISE_FILES):
        write_checkpoint(sub / name, tiny_state(30 + i), "safetensors-file")


def test_row17_noise_entries_are_ignored(tmp_path, ckptavg):
    run = tmp_path / "run"
    _noisy_run(run)
    assert all(step_from_name(n) is not None for n in NOISE_DIRS[3:] + NOISE_FILES[1:])  # the test stays meaningful
    out = tmp_path / "out"
    r = ckptavg("average", run, "--last", "5", "-o", out)
    assert_ok(r)
    assert steps_of(out) == [100, 200]
    assert [Path(i["path"]).name for i in json.loads((out / "ckptavg.json").read_text())["inputs"]] == \
        ["checkpoint-100", "checkpoint-200"]
    assert [p.name for p in find_candidates(run)] == ["checkpoint-100", "checkpoint-200"]
    r = ckptavg("inspect", run, "--json")
    assert_ok(r)
    assert [Path(c["path"]).name for c in json.loads(r.out)["checkpoints"]] == ["checkpoint-100", "checkpoint-200"]
    r = ckptavg("inspect", run)
    assert_ok(r)
    assert "2 checkpoint(s)" in r.out
    assert not any(n.split("/")[0] in r.out for n in NOISE_DIRS)
    # without --last, the run folder is still recognised as one
    r = ckptavg("average", run, "-o", tmp_path / "out-all")
    assert_ok(r)
    assert steps_of(tmp_path / "out-all") == [100, 200]


def test_row17_staging_names_on_the_command_line(tmp_path, ckptavg):
    run = tmp_path / "run"
    _noisy_run(run)
    # a shell glob that caught a staging folder: dropped with a warning
    out = tmp_path / "out"
    r = ckptavg("average", run / "checkpoint-100", run / "tmp-checkpoint-300", run / "checkpoint-200", "-o", out)
    assert_ok(r)
    assert steps_of(out) == [100, 200]
    assert "tmp-checkpoint-300" in r.err
    # only staging names: a usage error, nothing written
    out = tmp_path / "out2"
    assert_refused(ckptavg("average", run / "tmp-checkpoint-300", run / ".hidden-500", "-o", out), "no checkpoints",
                   code=2, out=out, logs_ok=True)


def test_row17_staging_weights_file_at_the_top_of_a_run_folder(tmp_path, ckptavg):
    run = tmp_path / "run"
    for i, step in enumerate((100, 200)):
        write_checkpoint(run / f"checkpoint-{step}", tiny_state(i), step=step)
    write_checkpoint(run / "tmp-checkpoint-300.safetensors", tiny_state(5), "safetensors-file")
    r = ckptavg("inspect", run, "--json")
    assert_ok(r)
    assert [Path(c["path"]).name for c in json.loads(r.out).get("checkpoints", [])] == ["checkpoint-100", "checkpoint-200"]
    out = tmp_path / "out"
    assert_ok(ckptavg("average", run, "-o", out))
    assert steps_of(out) == [100, 200]


# ---------------------------------------------------------------------------------------------
# row 18: symlinks and loops
# ---------------------------------------------------------------------------------------------
def _find_with_deadline(root: Path, seconds: float = 20.0) -> list[Path]:
    from ckptavg.cli.main import configure_logging

    configure_logging("info")  # log to this test's stderr, as the CLI would
    result: list = []
    t = threading.Thread(target=lambda: result.append(find_candidates(root)), name="test-find", daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "find_candidates hangs on a symlink loop"
    return result[0]


def _lightning_run(tmp_path: Path) -> tuple[Path, Path, list[dict]]:
    run = tmp_path / "run"
    ckdir = run / "lightning_logs" / "version_0" / "checkpoints"
    states = []
    for i, step in enumerate((100, 200, 300)):
        state = tiny_state(i, dtype=torch.float32)
        write_checkpoint(ckdir / f"epoch={i}-step={step}.ckpt", state, "lightning", step=step)
        states.append(state)
    (ckdir / "last.ckpt").symlink_to("epoch=2-step=300.ckpt")  # Lightning's save_last="link"
    os.link(ckdir / "epoch=2-step=300.ckpt", ckdir / "epoch=2-step=300-v1.ckpt")  # one inode, two step names
    (run / "loop").symlink_to(".")  # directory loops
    (ckdir / "up").symlink_to("../../..")
    (run / "lightning_logs" / "again").symlink_to("version_0")
    (run / "ping").symlink_to("pong")  # a dangling symlink loop
    (run / "pong").symlink_to("ping")
    elsewhere = tmp_path / "elsewhere"  # checkpoints outside the root, reachable only through links
    write_checkpoint(elsewhere / "epoch=9-step=900.ckpt", tiny_state(9, dtype=torch.float32), "lightning", step=900)
    write_checkpoint(elsewhere / "checkpoint-950", tiny_state(9, dtype=torch.float32), step=950)
    (ckdir / "epoch=9-step=900.ckpt").symlink_to(elsewhere / "epoch=9-step=900.ckpt")
    (run / "checkpoint-950").symlink_to(elsewhere / "checkpoint-950")
    (run / "escape").symlink_to("..")
    return run, ckdir, states


def test_row18_symlinks_and_loops_in_a_run_folder(tmp_path, ckptavg):
    run, _ckdir, states = _lightning_run(tmp_path)
    found = _find_with_deadline(run)
    assert [step_from_name(p) for p in found] == [100, 200, 300], found  # each file once, whatever its name
    assert len({(p.stat().st_dev, p.stat().st_ino) for p in found}) == 3
    real_run = run.resolve()
    assert all(real_run in p.resolve().parents for p in found)
    out = tmp_path / "out"
    t0 = time.perf_counter()
    # its own process: this one has warned about these links already, and says each once (row 68)
    r = run_cli_subprocess("average", run, "--last", "10", "-o", out)
    assert time.perf_counter() - t0 < 20
    assert_ok(r)
    assert steps_of(out) == [100, 200, 300]
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("WARNING: security:") and "outside" in ln]
    assert any("epoch=9-step=900.ckpt" in ln for ln in warnings), r.stderr
    assert any("checkpoint-950" in ln for ln in warnings), r.stderr
    got = load_out(out)
    want = sum(s["embed.weight"].double() for s in states) / 3
    torch.testing.assert_close(got["embed.weight"], want.float())
    r = ckptavg("inspect", run, "--json")
    assert_ok(r)
    assert [c["step"] for c in json.loads(r.out)["checkpoints"]] == [100, 200, 300]


def test_row18_one_file_by_two_names_is_taken_once(tmp_path, ckptavg):
    _run, ckdir, states = _lightning_run(tmp_path)
    out = tmp_path / "out"
    r = ckptavg("average", ckdir / "last.ckpt", ckdir / "epoch=2-step=300.ckpt", ckdir / "epoch=2-step=300-v1.ckpt",
                ckdir / "epoch=0-step=100.ckpt", "-o", out)
    assert_ok(r)
    assert "taken once" in r.err
    assert steps_of(out) == [100, 300]
    got = load_out(out)
    want = (states[0]["embed.weight"].double() + states[2]["embed.weight"]) / 2
    torch.testing.assert_close(got["embed.weight"], want.float())


def test_row18_weights_file_linking_out_of_the_root_is_not_followed(tmp_path, ckptavg):
    _paths, _ = fp32_run(tmp_path / "run", 2)
    outside = write_checkpoint(tmp_path / "elsewhere" / "model.safetensors", tiny_state(9, dtype=torch.float32),
                               "safetensors-file")
    ck = tmp_path / "run" / "checkpoint-300"
    ck.mkdir()
    (ck / "model.safetensors").symlink_to(outside)
    out = tmp_path / "out"
    r = ckptavg("average", tmp_path / "run", "--last", "5", "-o", out)
    assert_ok(r)
    assert steps_of(out) == [100, 200]
    assert "outside" in r.err


# ---------------------------------------------------------------------------------------------
# row 15 (reader side): a file rewritten or truncated during the read
# ---------------------------------------------------------------------------------------------
def _data_file(tmp_path: Path) -> tuple[Path, int, int]:
    f = write_checkpoint(tmp_path / "a.safetensors", {"w": torch.arange(1, 1025, dtype=torch.float32)}, "safetensors-file")
    os.utime(f, ns=(OLD_NS, OLD_NS))
    h = read_header(f)
    ref = h.tensors["w"]
    return f, ref.offset, ref.nbytes


@pytest.mark.parametrize("change", ["truncate", "truncate-then-extend-with-zeros", "rewrite-in-place", "append"])
def test_row15_file_changed_between_index_and_read(tmp_path, change):
    f, offset, nbytes = _data_file(tmp_path)
    ident = identify(f)
    if change == "truncate":
        os.truncate(f, ident.size - 100)
    elif change == "truncate-then-extend-with-zeros":
        os.truncate(f, 64)
        os.truncate(f, ident.size)
    elif change == "rewrite-in-place":
        with open(f, "r+b") as fh:
            fh.seek(offset)
            fh.write(bytes(nbytes))
    else:
        with open(f, "ab") as fh:
            fh.write(b"\0" * 8)
    with FileCache() as files, pytest.raises((CheckpointChangedError, TruncatedFileError)):
        files.read(f, ident, offset, nbytes)


@pytest.mark.parametrize("change", ["truncate", "truncate-then-extend-with-zeros", "rewrite-in-place"])
@pytest.mark.parametrize("where", ["inside-the-cut", "past-the-cut"])
def test_row15_file_changed_after_it_was_opened_never_yields_zeros(tmp_path, change, where):
    f, offset, nbytes = _data_file(tmp_path)
    ident = identify(f)
    with FileCache() as files:
        first = files.read(f, ident, offset, 16)  # the descriptor is open and checked
        assert first.view(torch.float32).tolist() == [1.0, 2.0, 3.0, 4.0]
        cut = offset + 64
        if change == "truncate":
            os.truncate(f, cut)
        elif change == "truncate-then-extend-with-zeros":
            os.truncate(f, cut)
            os.truncate(f, ident.size)
        else:
            with open(f, "r+b") as fh:
                fh.seek(offset)
                fh.write(bytes(nbytes))
        start, n = (offset, 32) if where == "inside-the-cut" else (offset + 128, 256)
        with pytest.raises((CheckpointChangedError, TruncatedFileError)):
            files.read(f, ident, start, n)


def test_row15_replaced_or_deleted_file(tmp_path):
    f, offset, _nbytes = _data_file(tmp_path)
    ident = identify(f)
    with FileCache() as files:
        files.read(f, ident, offset, 16)
        tmp = tmp_path / "b"
        tmp.write_bytes(f.read_bytes())
        os.replace(tmp, f)  # same size, another inode
        # the open descriptor still reads the old, whole file: consistent, not mixed
        assert files.read(f, ident, offset, 16).view(torch.float32).tolist() == [1.0, 2.0, 3.0, 4.0]
    with FileCache() as files, pytest.raises(CheckpointChangedError, match="replaced"):
        files.read(f, ident, offset, 16)
    f.unlink()
    with FileCache() as files, pytest.raises(CheckpointVanishedError):
        files.read(f, ident, offset, 16)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_row15_checkpoint_rewritten_after_indexing_is_not_read(tmp_path, fmt):
    path = write_checkpoint(tmp_path / ("checkpoint-100" if fmt == "safetensors" else "step_100.pt"),
                            tiny_state(0, dtype=torch.float32), fmt, step=100 if fmt == "safetensors" else None)
    wf = weights_file(path)
    os.utime(wf, ns=(OLD_NS, OLD_NS))
    ckpt = open_checkpoint(path)
    zeros = {k: torch.zeros_like(v) for k, v in tiny_state(0, dtype=torch.float32).items()}
    if fmt == "safetensors":
        save_file(zeros, str(wf))  # same header, same size, new bytes
    else:
        torch.save(zeros, wf)
    with ckpt.reader() as reader, pytest.raises(CheckpointChangedError):
        reader.read("embed.weight")


# ---------------------------------------------------------------------------------------------
# real processes: exit codes, one line, no traceback (and a traceback with --log-level debug)
# ---------------------------------------------------------------------------------------------
def test_subprocess_truncated_shard_and_debug_traceback(tmp_path):
    paths, _ = fp32_run(tmp_path / "run", 2)
    f = paths[1] / "model.safetensors"
    os.truncate(f, f.stat().st_size - 100)
    out = tmp_path / "out"
    p = run_cli_subprocess("average", *paths, "-o", out)
    assert_refused(p, str(f), "truncated", out=out)
    p = run_cli_subprocess("--log-level", "debug", "average", *paths, "-o", out)
    assert p.returncode == 1
    assert "Traceback" in p.stderr and "TruncatedFileError" in p.stderr
    assert p.stderr.splitlines()[-1].startswith(f"{ERR} {f}:")
    assert_nothing_written(out)


def test_subprocess_malicious_pickle_with_force_env(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    f = evil_pickle(tmp_path / "in" / "epoch=0-step=5.ckpt", sentinel, "lightning")
    out = tmp_path / "out"
    p = run_cli_subprocess("average", f, "-o", out, env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    assert_refused(p, str(f), "not executed", out=out)
    assert not sentinel.exists()


def test_subprocess_usage_errors_exit_2(tmp_path):
    paths, _ = fp32_run(tmp_path / "run", 2)
    before = snapshot(tmp_path / "run")
    inside = paths[1] / "avg"
    p = run_cli_subprocess("average", *paths, "-o", inside)
    assert_refused(p, "never writes", code=2)
    assert not inside.exists() and snapshot(tmp_path / "run") == before
    assert not [q for q in paths[1].iterdir() if ".ckptavg-tmp-" in q.name]


def test_subprocess_path_escape(tmp_path):
    ck = tmp_path / "run" / "checkpoint-1"
    ck.mkdir(parents=True)
    save_file({"b": torch.ones(4)}, str(ck / "model-00001-of-00002.safetensors"))
    index = ck / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "../../x.safetensors", "b": "model-00001-of-00002.safetensors"}}))
    out = tmp_path / "out"
    p = run_cli_subprocess("average", ck, "-o", out)
    assert_refused(p, str(index), "outside", out=out, logs_ok=True)
    assert "WARNING: security:" in p.stderr


@pytest.mark.parametrize("args", [
    ("--last", "0"),
    ("--method", "nope"),
    ("--method", "lawa"),
    ("--weights", "1,2,3"),
])
def test_usage_errors_write_nothing(tmp_path, ckptavg, args):
    paths, _ = fp32_run(tmp_path / "run", 2)
    out = tmp_path / "out"
    inputs = [tmp_path / "run"] if args[0] == "--last" else paths
    assert_refused(ckptavg("average", *inputs, *args, "-o", out), code=2, out=out)
