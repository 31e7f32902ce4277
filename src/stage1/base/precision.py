"""One rule for numeric precision, shared by training and the commands: `auto` is bf16 autocast on CUDA and
fp32 elsewhere; `bf16` / `fp16` autocast on request (fp16 training adds a gradient scaler)."""

from __future__ import annotations

from contextlib import nullcontext

import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def resolve_precision(precision: str, device: torch.device) -> str:
    """`precision` (one of PRECISIONS: checked by the training config and the commands' arguments) made concrete."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device, precision: str):
    """The autocast context for `precision` on `device` (a no-op for fp32)."""
    dtype = _AUTOCAST_DTYPES[resolve_precision(precision, device)]
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
