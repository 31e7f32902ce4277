"""Latent statistics files: the mean and variance that normalise an encoder's latents.

Two formats are read: safetensors (what `vqrae-latent-stats` writes) and RAE's `stat.pt` (a torch file, read with
`weights_only=True`, so nothing in it is unpickled beyond tensors). Either holds `mean` and `var` (ours may hold
`std` instead), each of shape [C] (per channel) or [C, h, w] (per channel and position, as RAE computes them).
The latent is normalised as RAE does: (z - mean) / sqrt(var + eps), eps 1e-5 unless given.
"""

from __future__ import annotations

import torch

from ..base.tensor_files import read_tensor_file

STATS_EPS = 1e-5  # RAE's


def read_latent_stats(path: str, channels: int, eps: float = STATS_EPS,
                      grid: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """mean and std for tokens (B, N, C): shape (C,) per channel, or (h * w, C) per position (raster order), whose
    [C, h, w] must be the model's `grid` where it has one ([64, 8, 32] is not a 16 x 16 grid, though both hold 256)."""
    stats = read_tensor_file(path, "normalization_stat_path")
    if not isinstance(stats, dict) or "mean" not in stats or not ({"var", "std"} & set(stats)):
        found = sorted(map(str, stats)) if isinstance(stats, dict) else type(stats).__name__
        raise ValueError(f"{path} must hold tensors 'mean' and 'var' (or 'std'); found {found}")
    mean, spread = stats["mean"], stats["std"] if "std" in stats else stats["var"]
    if not all(isinstance(t, torch.Tensor) for t in (mean, spread)) or mean.shape != spread.shape or \
            mean.dim() not in (1, 3) or mean.shape[0] != channels:
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in (mean, spread)]
        raise ValueError(f"{path}: expected mean and var of shape [{channels}] or [{channels}, h, w] for this "
                         f"encoder's {channels} channels, got {shapes}")
    if mean.dim() == 3 and grid is not None and tuple(mean.shape[1:]) != (grid, grid):
        raise ValueError(f"{path}: per-position statistics of shape {list(mean.shape)} are not this model's "
                         f"{grid} x {grid} grid: expected [{channels}, {grid}, {grid}]")
    if not (mean.is_floating_point() and spread.is_floating_point()):
        raise ValueError(f"{path}: mean and var must be floating-point tensors, got {mean.dtype} / {spread.dtype}")
    std = spread.float() if "std" in stats else (spread.float() + eps).sqrt()
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
        raise ValueError(f"{path}: mean and var must be finite and var >= 0 (std > 0); NaN, Inf or a negative "
                         f"variance would normalise every latent to NaN")
    # [C, h, w] -> (h * w, C): the token layout
    return tuple(t.float().flatten(1).T.contiguous() if t.dim() == 3 else t.float() for t in (mean, std))
