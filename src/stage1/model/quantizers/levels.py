"""Kinds made of several single codebooks (VectorQuantizer levels): what residual, grouped and multiscale share.

Each level is a VectorQuantizer with its own EMA statistics, restarts and first-batch start, so every guarantee of
the single codebook (exact fp32 search, fp32 statistics, identical codebooks on every rank) holds per level.
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

from .base import CodeLayout
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

    @cached_property
    def layout(self) -> CodeLayout:
        """A code of every level at each position, (..., levels) (residual, grouped; the multi-scale kind lays its
        codes out by scale instead)."""
        n = len(self.levels)
        return CodeLayout(self.num_embeddings, (n,), codebooks=tuple(range(n)))


__all__ = ["Levels", "single_codebook"]
