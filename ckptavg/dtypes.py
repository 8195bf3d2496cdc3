"""The safetensors dtype names, their torch dtypes, and what ckptavg does with each.

Every dtype the safetensors format defines (``safetensors`` 0.8's ``Dtype``) is listed in
:data:`BITS` (its width, used for the header arithmetic exactly as the format does it).
Those with a torch dtype are read and written; how each is averaged is :func:`policy`:

* ``F64``, ``F32``, ``F16``, ``BF16``: averaged in the accumulator dtype, rounded back.
* ``F8_E4M3``, ``F8_E5M2``, ``F8_E4M3FNUZ``, ``F8_E5M2FNUZ``: averaged in the accumulator dtype and
  rounded back *saturating*: a finite value beyond the format's largest is stored as that largest
  (:func:`cast_back`; torch's own cast saturates for E4M3 but overflows E5M2 to Inf and FNUZ to NaN).
* ``F8_E8M0`` (power-of-two block scales of MX formats), integers and ``BOOL``: the latest value —
  a scale belongs to the block it scales, and a mean of integers or flags is not one of them.
* ``C64``: the latest value (complex tensors in checkpoints are fixed buffers such as rotary tables).
* ``F4``, ``F6_E2M3``, ``F6_E3M2`` (sub-byte, packed): refused, naming the tensor; torch has no
  dtype that holds them element for element.
"""

from __future__ import annotations

import torch

# every dtype the safetensors format defines -> its width in bits
BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}

# safetensors name -> torch dtype (only those this torch build has)
_CANDIDATES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "BOOL": "bool",
    "C64": "complex64",
}

SAFETENSORS_TO_TORCH: dict[str, torch.dtype] = {
    name: getattr(torch, attr) for name, attr in _CANDIDATES.items() if hasattr(torch, attr)
}
TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_TO_TORCH.items()}

_WIDE = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# 8-bit floats that are averaged; each rounds back saturating to its largest finite value
SATURATING: tuple[torch.dtype, ...] = tuple(
    getattr(torch, a) for a in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, a)
)


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def is_averageable(dtype: torch.dtype) -> bool:
    """Floating tensors (fp8 E4M3/E5M2 included) are averaged; integer, bool, complex and E8M0 scales take the latest."""
    return dtype in _WIDE or dtype in SATURATING


def policy(name: str) -> str:
    """What ckptavg does with safetensors dtype ``name``: ``average``, ``average, saturating``, ``latest`` or ``refused``."""
    dtype = SAFETENSORS_TO_TORCH.get(name)
    if dtype is None:
        return "refused"
    if dtype in SATURATING:
        return "average, saturating"
    return "average" if is_averageable(dtype) else "latest"


def cast_back(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``value`` (an average in the accumulator dtype) in its source ``dtype``; 8-bit floats saturate:
    finite values beyond the format's range become its largest finite value (NaN/Inf, only present
    with ``--allow-nonfinite``, are left to torch's cast)."""
    if dtype in SATURATING and value.dtype != dtype:
        big = torch.finfo(dtype).max
        value = torch.where(value.isfinite(), value.clamp(-big, big), value)
    return value.to(dtype)


def short_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
