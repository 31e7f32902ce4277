"""Kinds made of several single codebooks (VectorQuantizer levels): what residual, grouped and multiscale share.

Each level is a VectorQuantizer with its own EMA statistics, restarts and first-batch start, so every guarantee of
the single codebook (exact fp32 search, fp32 statistics, identical codebooks on every rank) holds per level.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .single import VectorQuantizer

if TYPE_CHECKING:
    from ..config import QuantizerConfig


def single_codebook(config: QuantizerConfig, embedding_dim: int, cosine: bool = False) -> VectorQuantizer:
    """One level: a single codebook with the kind's common options (its size, EMA rule, restarts)."""
    return VectorQuantizer(config.for_kind(VectorQuantizer.kind, cosine=cosine), embedding_dim)


class Levels:
    """The part of a kind that holds its codebooks in `self.levels` (an nn.ModuleList of VectorQuantizer)."""

    levels: list[VectorQuantizer]

    @property
    def started(self) -> bool:
        return all(level.started for level in self.levels)


__all__ = ["Levels", "single_codebook"]
