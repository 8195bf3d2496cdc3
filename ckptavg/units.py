"""Byte sizes for humans: parse ``"500MB"`` / ``"2GiB"`` and print ``1.08 GB``."""

from __future__ import annotations

import re

from ckptavg.errors import OptionError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_size(text: str | int, *, option: str = "size") -> int:
    """``"5GB"`` → 5_000_000_000; ``"512MiB"`` → 536_870_912; an int passes through."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", text, re.IGNORECASE)
        if not m:
            raise OptionError.invalid(None, option, text, "a size like 500MB, 2GB or 1GiB")
        value = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
    if value <= 0:
        raise OptionError.invalid(None, option, text, "a positive size")
    return value


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
