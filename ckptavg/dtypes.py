"""The safetensors dtype names and their torch dtypes."""

from __future__ import annotations

import torch

# safetensors name -> torch dtype (only those this torch build has)
_CANDIDATES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
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


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def is_averageable(dtype: torch.dtype) -> bool:
    """Floating tensors are averaged; integer, bool and fp8 tensors take the latest value."""
    return dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def short_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
