"""Tensor files that users exchange (RAE's model.pt and stat.pt, safetensors): read without running their code, and
without allocating more than the file holds."""

from __future__ import annotations

import math
import os
import zipfile

import torch
from safetensors import safe_open
from safetensors.torch import load_file


def read_tensor_file(path: str, what: str) -> dict:
    """A safetensors file, or a torch file read with weights_only=True (tensors and plain containers only: a pickle
    of anything else is refused, never run). `what` names the file in errors."""
    _check_exists(path, what)
    if path.endswith(".safetensors"):
        try:
            return load_file(path)  # safetensors checks every tensor's extent against the file's length
        except Exception as err:  # safetensors' own error type: a truncated or foreign file
            raise _damaged_safetensors(path, what, err) from None
    _check_torch_zip(path, what)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle with more than tensors, or not a torch file at all
        raise ValueError(f"{what} {path} is not a safetensors file or a torch file of tensors: "
                         f"{type(err).__name__}: {str(err).splitlines()[0][:200]}") from None
    _check_dense(loaded, path, what)
    return loaded


# The tensor types a weights or statistics file may hold (float8 and complex have no isfinite, among much else).
FILE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int32, torch.int16,
               torch.int8, torch.uint8, torch.bool)


def _check_dense(value, path: str, what: str, name: str = "", depth: int = 0) -> None:
    """Every tensor in a torch file is dense, strided, of a plain dtype and holds its data: weights_only still loads
    sparse tensors (whose comparisons crash deep in torch), meta tensors (no data at all), and views whose storage is
    smaller than their shape (a stride of 0 lets 4 bytes stand for terabytes, which any reduction then allocates)."""
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.is_meta:
            kind = "a meta tensor (no data)" if value.is_meta else f"a {value.layout} tensor"
            raise ValueError(f"{what} {path}: {name or 'a tensor'} is {kind}; expected dense tensors as torch.save "
                             f"writes a state_dict")
        if value.dtype not in FILE_DTYPES:
            raise ValueError(f"{what} {path}: {name or 'a tensor'} is {value.dtype}; expected one of "
                             f"{[str(d).removeprefix('torch.') for d in FILE_DTYPES]}")
        if value.numel() * value.element_size() > value.untyped_storage().nbytes():
            raise ValueError(f"{what} {path}: {name or 'a tensor'} of shape {list(value.shape)} is a view of "
                             f"{value.untyped_storage().nbytes():,} bytes (strides {list(value.stride())}); expected "
                             f"tensors that hold their values")
    elif isinstance(value, dict) and depth < 64:
        for key, item in value.items():
            _check_dense(item, path, what, f"{name}.{key}" if name else str(key), depth + 1)
    elif isinstance(value, (list, tuple)) and depth < 64:
        for i, item in enumerate(value):
            _check_dense(item, path, what, f"{name}[{i}]", depth + 1)


def tensor_elements(path: str, what: str) -> int:
    """The numbers a safetensors file holds, from its header alone (nothing else is read)."""
    _check_exists(path, what)
    try:
        with safe_open(path, framework="pt") as f:
            return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    except Exception as err:
        raise _damaged_safetensors(path, what, err) from None


def _check_exists(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} '{path}' does not exist")


def _damaged_safetensors(path: str, what: str, err: Exception) -> ValueError:
    return ValueError(f"{what} {path} is not a readable safetensors file (truncated or damaged? copy it again): "
                      f"{str(err).splitlines()[0][:200]}")


def _check_torch_zip(path: str, what: str) -> None:
    """torch.save's zip, as torch.save writes it: every entry stored, none compressed. torch.load would inflate a
    compressed entry whatever its size (a few kB of zip can declare gigabytes), and the legacy pre-zip format
    allocates the sizes its pickle declares before reading them."""
    with open(path, "rb") as f:
        magic = f.read(4)
    # torch.load takes a file for a zip by its first bytes (a local header), zipfile by its last (the directory): a
    # legacy pickle with a zip's end record appended passed the one and was read by torch as legacy.
    if magic != b"PK\x03\x04" or not zipfile.is_zipfile(path):
        raise ValueError(f"{what} {path} is not a torch zip file (torch.save's format since torch 1.6; older or "
                         f"foreign files are not read: load and save it again with a current torch)")
    try:
        with zipfile.ZipFile(path) as archive:
            compressed = [entry.filename for entry in archive.infolist() if entry.compress_type != zipfile.ZIP_STORED]
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise ValueError(f"{what} {path} is a damaged zip file: {err}") from None
    if compressed:
        raise ValueError(f"{what} {path} holds compressed entries ({compressed[:3]}), which torch.save never writes; "
                         f"refusing to inflate them")
