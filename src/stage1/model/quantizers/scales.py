"""The multi-scale kind's geometry, without a codebook: resampling between scales, raster tokens <-> maps, VAR's scale
schedule and its rule for which phi convolution serves which scale (read by the config check, the kind, the VAR
adapter and the benchmarks)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

VAR_SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # VAR's schedule for a 16 x 16 grid


def area(maps: torch.Tensor, side: int) -> torch.Tensor:
    """(B, C, S, S) -> (B, C, side, side), averages of the cells (VAR's area downsampling); the same map at S."""
    return maps if maps.shape[-1] == side else F.interpolate(maps, size=(side, side), mode="area")


def bicubic(maps: torch.Tensor, side: int) -> torch.Tensor:
    """(B, C, s, s) -> (B, C, side, side), VAR's upsampling; the same map at side."""
    return maps if maps.shape[-1] == side else F.interpolate(maps, size=(side, side), mode="bicubic")


def to_maps(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """(B, side * side, C) raster tokens -> (B, C, side, side)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


def to_tokens(maps: torch.Tensor) -> torch.Tensor:
    """(B, C, s, s) -> (B, s * s, C) in raster order."""
    return maps.flatten(2).transpose(1, 2)


def default_scales(side: int) -> list[int]:
    """VAR's schedule for a 16 x 16 grid, scaled to another side."""
    return sorted({max(1, min(side, math.ceil(s * side / 16))) for s in VAR_SCALES} | {side})


def phi_of_scales(scales: int, convs: int) -> list[int]:
    """Which of `convs` phi convolutions serves each of `scales` scales: VAR's PhiPartiallyShared, scale k at
    k / (scales - 1) in [0, 1] taking the convolution whose tick is nearest (1: all share one; scales: one each).
    numpy's linspace and argmin as VAR's, whose float ties (VAR's 10 scales: 2/9 is as near 1/12 as 13/36) they
    break."""
    ticks = np.linspace(1 / 3 / convs, 1 - 1 / 3 / convs, convs) if convs == 4 else \
        np.linspace(1 / 2 / convs, 1 - 1 / 2 / convs, convs)
    return [int(np.argmin(np.abs(ticks - k / max(scales - 1, 1)))) for k in range(scales)]


def serving_phi_counts(scales: int) -> list[int]:
    """The phi counts whose every convolution serves some scale under VAR's rule (an idle one stops DDP)."""
    return [n for n in range(1, scales + 1) if len(set(phi_of_scales(scales, n))) == n]


__all__ = ["VAR_SCALES", "area", "bicubic", "default_scales", "phi_of_scales", "serving_phi_counts", "to_maps",
           "to_tokens"]
