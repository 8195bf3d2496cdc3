"""Check averaged model folders against an independent float64 reference.

For every tensor the reference is the exact mean of the inputs, computed in float64
(a sum of K bf16 values is exact in float64; the division is rounded once) and then
rounded *once*, correctly, to the output dtype. Going float64 → float32 → bf16 with
round-to-nearest-even twice could land on the wrong side of a bf16 tie, so the
float32 step uses round-to-odd, which makes the second rounding correct.

Work is done in row chunks of at most ``CHUNK_ELEMS`` elements read with
``safe_open(...).get_slice``, so memory stays bounded whatever the model size, and
all outputs are compared in the same pass over the inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from common import shard_map
from safetensors import safe_open

__all__ = ["Check", "check_outputs", "correctly_rounded", "ulp_distance"]

CHUNK_ELEMS = 4 << 20


@dataclass
class Check:
    """Agreement of one output with the correctly rounded float64 mean."""

    elements: int = 0
    mismatched: int = 0
    max_abs_err: float = 0.0
    max_ulps: int = 0
    missing: list[str] = field(default_factory=list)

    @property
    def mismatch_fraction(self) -> float:
        return self.mismatched / self.elements if self.elements else 1.0

    def exact(self, tolerance: float) -> bool:
        """Every element within one ulp of the correctly rounded mean, and at most ``tolerance``
        of them one ulp away (fp32 accumulation rounds twice: to fp32, then to bf16)."""
        return not self.missing and self.elements > 0 and self.max_ulps <= 1 and self.mismatch_fraction <= tolerance

    def to_json(self) -> dict:
        return {"elements": self.elements, "mismatched": self.mismatched, "mismatch_fraction": self.mismatch_fraction,
                "max_abs_err": self.max_abs_err, "max_ulps": self.max_ulps, "missing": self.missing}


def correctly_rounded(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round float64 ``x`` once, to nearest even, into ``dtype`` (bf16, fp16 or fp32).

    float64 → float32 → 16 bits is right except where the float32 value sits exactly
    on a 16-bit tie while ``x`` does not; those few elements are redone with
    round-to-odd in the first step (truncate toward zero, set the last bit), which
    makes the second rounding correct.
    """
    f = x.to(torch.float32)
    if dtype == torch.float32:
        return f
    out = f.to(dtype)
    bits = f.view(torch.int32)
    drop = 16 if dtype == torch.bfloat16 else 13  # float32 mantissa bits the target lacks
    half = 1 << (drop - 1)
    tie = (bits & ((1 << drop) - 1)) == half
    if dtype == torch.float16:
        tie |= True  # fp16 subnormals and range: take the careful path everywhere (rare dtype here)
    idx = tie.nonzero().reshape(-1)
    if idx.numel():
        xs, fs = x[idx], f[idx]
        inexact = fs.to(torch.float64) != xs
        b = fs.view(torch.int32)
        toward_zero = torch.where(inexact & (fs.to(torch.float64).abs() > xs.abs()), b - 1, b)
        odd = torch.where(inexact, toward_zero | 1, toward_zero)
        out[idx] = odd.view(torch.float32).to(dtype)
    return out


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of their (16-bit) dtype lie between ``a`` and ``b``."""
    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (ordered(a) - ordered(b)).abs()


def check_outputs(inputs: Sequence[Path], outputs: dict[str, Path]) -> dict[str, Check]:
    """Compare each output folder (by label) with the uniform float64 mean of ``inputs``."""
    in_maps = [shard_map(p) for p in inputs]
    out_maps = {label: shard_map(p) for label, p in outputs.items()}
    checks = {label: Check() for label in outputs}
    handles: dict[Path, object] = {}

    def open_(f: Path):
        h = handles.get(f)
        if h is None:
            h = handles[f] = safe_open(str(f), framework="pt").__enter__()
        return h

    try:
        for name in in_maps[-1]:
            sl = open_(in_maps[-1][name]).get_slice(name)
            shape = sl.get_shape()
            rows = shape[0] if shape else 1
            per_row = max(1, math.prod(shape[1:]) if len(shape) > 1 else 1)
            step = max(1, CHUNK_ELEMS // per_row)
            for label, m in out_maps.items():
                if name not in m:
                    checks[label].missing.append(name)
            for lo in range(0, rows, step):
                hi = min(rows, lo + step)

                def part(f: Path, name: str = name, lo: int = lo, hi: int = hi, scalar: bool = not shape) -> torch.Tensor:
                    s = open_(f).get_slice(name)
                    return (s[:] if scalar else s[lo:hi]).reshape(-1)

                acc = None
                for m in in_maps:
                    t = part(m[name])
                    acc = t.to(torch.float64) if acc is None else acc.add_(t.to(torch.float64))
                assert acc is not None
                mean = acc.div_(len(in_maps))
                src_dtype = part(in_maps[-1][name]).dtype
                ref = correctly_rounded(mean, src_dtype)
                for label, m in out_maps.items():
                    if name not in m:
                        continue
                    got = part(m[name])
                    c = checks[label]
                    if got.dtype != src_dtype:
                        c.missing.append(f"{name} (dtype {got.dtype})")
                        continue
                    c.elements += got.numel()
                    c.max_abs_err = max(c.max_abs_err, float(got.to(torch.float64).sub_(mean).abs_().max()))
                    off = (got != ref).nonzero().reshape(-1)
                    if off.numel():
                        c.mismatched += off.numel()
                        if got.element_size() == 2:
                            c.max_ulps = max(c.max_ulps, int(ulp_distance(got[off], ref[off]).max()))
                        else:
                            c.max_ulps = max(c.max_ulps, 2)  # fp32 outputs: any difference counts as inexact
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)  # type: ignore[attr-defined]
    return checks
