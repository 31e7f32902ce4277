"""quantizer.kind grouped: the channels split into `groups` equal slices, each with its own codebook.

Indices (..., groups): the product of the groups' codes per token. The forward value is exactly the concatenation
of the codes; the gradient reaches z unchanged (straight-through).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ...base.limits import MAX_LEVELS
from .base import Quantizer, QuantizerOutput
from .levels import Levels, single_codebook

if TYPE_CHECKING:
    from ..config import QuantizerConfig


class GroupedQuantizer(Levels, Quantizer):
    kind = "grouped"
    options = ("groups", "cosine")

    @classmethod
    def check_options(cls, config: QuantizerConfig) -> None:
        config.require_at_most(MAX_LEVELS, "groups")

    def __init__(self, config: QuantizerConfig, embedding_dim: int):
        super().__init__()
        if embedding_dim % config.groups:
            raise ValueError(f"quantizer.groups ({config.groups}) must divide the latent channels ({embedding_dim})")
        width = embedding_dim // config.groups
        self.levels = nn.ModuleList(single_codebook(config, width, config.cosine) for _ in range(config.groups))
        self.num_embeddings, self.embedding_dim = config.num_embeddings, embedding_dim
        self.commitment_cost = config.commitment_cost

    def describe(self) -> str:
        cosine = ", cosine" if self.levels[0].cosine else ""
        return f"grouped, {len(self.levels)} codebooks of {self.num_embeddings} codes{cosine}"

    def _slices(self, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if z.dim() < 2 or z.shape[-1] != self.embedding_dim:
            raise ValueError(f"expected channels-last features (..., {self.embedding_dim}), got shape {tuple(z.shape)}")
        return z.chunk(len(self.levels), dim=-1)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        outputs = [level(part) for level, part in zip(self.levels, self._slices(z), strict=True)]
        z_q = torch.cat([out.z_q for out in outputs], dim=-1)  # each part straight-through already
        commitment = torch.stack([out.commitment for out in outputs]).mean()  # equal widths
        indices = torch.stack([out.indices for out in outputs], -1)
        return QuantizerOutput.of_codebooks(z_q, indices, commitment, self.commitment_cost, outputs)

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.stack([level.encode(part) for level, part in zip(self.levels, self._slices(z), strict=True)], -1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.cat([level.lookup(indices[..., i]) for i, level in enumerate(self.levels)], dim=-1)

    @torch.no_grad()
    def fit(self, samples: torch.Tensor, iters: int, tokens_per_update: float, seed: int = 0) -> list:
        parts = self._slices(samples.float())
        return [r for i, (level, part) in enumerate(zip(self.levels, parts, strict=True))
                for r in level.fit(part, iters, tokens_per_update, seed + i)]


__all__ = ["GroupedQuantizer"]
