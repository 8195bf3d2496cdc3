"""Helpers shared by the benchmark driver (``run.py``) and its child processes (``child.py``).

Kept free of torch so that the read-floor child measures Python reading bytes,
not the cost of importing torch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

__all__ = ["RESULT_MARK", "checkpoint_files", "drop_cache", "files_bytes", "resident_bytes", "shard_map"]

RESULT_MARK = "BENCH-RESULT "  # a child's last stdout line: this mark, then its JSON result


def shard_map(folder: Path) -> dict[str, Path]:
    """Tensor name -> shard file of a safetensors model folder (sharded with an index, or single file)."""
    folder = Path(folder)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        return {name: folder / fname for name, fname in weight_map.items()}
    from safetensors import safe_open  # only the reference check needs this path

    out: dict[str, Path] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            out.update({k: f for k in sf.keys()})  # noqa: SIM118 - safe_open is not iterable
    return out


def checkpoint_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder, in name order."""
    return sorted(Path(folder).glob("*.safetensors"))


def files_bytes(files: list[Path]) -> int:
    return sum(os.path.getsize(f) for f in files)


def drop_cache(files: list[Path]) -> None:
    """Evict ``files`` from the page cache (no root needed): flush, then POSIX_FADV_DONTNEED."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_bytes(files: list[Path]) -> int | None:
    """Bytes of ``files`` now in the page cache (util-linux ``fincore``), or None when unavailable."""
    exe = shutil.which("fincore")
    if exe is None or not files:
        return None
    try:
        out = subprocess.run([exe, "--bytes", "--noheadings", "--raw", "--output", "RES", *map(str, files)],
                             capture_output=True, text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return sum(int(line) for line in out.split() if line.strip().isdigit())
