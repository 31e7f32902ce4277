"""Tensor files that users exchange (RAE's model.pt and stat.pt, safetensors): read without running their code."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file


def read_tensor_file(path: str, what: str) -> dict:
    """A safetensors file, or a torch file read with weights_only=True (tensors and plain containers only: a pickle
    of anything else is refused, never run). `what` names the file in errors."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} '{path}' does not exist")
    if path.endswith(".safetensors"):
        try:
            return load_file(path)
        except Exception as err:  # safetensors' own error type: a truncated or foreign file
            raise ValueError(f"{what} {path} is not a readable safetensors file (truncated or damaged? copy it "
                             f"again): {str(err).splitlines()[0][:200]}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle with more than tensors, or not a torch file at all
        raise ValueError(f"{what} {path} is not a safetensors file or a torch file of tensors: "
                         f"{type(err).__name__}: {str(err).splitlines()[0][:200]}") from None
