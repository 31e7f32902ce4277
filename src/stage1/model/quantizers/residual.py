"""quantizer.kind residual: `depth` codebooks in turn, level l quantizing z - (q_1 + ... + q_{l-1}).

Indices (..., depth), K^depth combinations per token. The forward value is exactly the sum of the codes; the
gradient reaches z unchanged (straight-through).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ...base.limits import MAX_LEVELS
from .base import Quantizer, QuantizerOutput
from .levels import Levels, single_codebook

if TYPE_CHECKING:
    from ..config import QuantizerConfig


class ResidualQuantizer(Levels, Quantizer):
    kind = "residual"
    options = ("depth",)

    @classmethod
    def state_elements(cls, config: QuantizerConfig, dim: int) -> int:
        return config.depth * config.num_embeddings * dim  # a codebook per level

    @classmethod
    def check_options(cls, config: QuantizerConfig) -> None:
        config.require_at_most(MAX_LEVELS, "depth")

    def __init__(self, config: QuantizerConfig, embedding_dim: int):
        super().__init__()
        self.levels = nn.ModuleList(single_codebook(config, embedding_dim) for _ in range(config.depth))
        self.num_embeddings, self.embedding_dim = config.num_embeddings, embedding_dim
        self.commitment_cost = config.commitment_cost

    def describe(self) -> str:
        return f"residual, {len(self.levels)} levels of {self.num_embeddings} codes"

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        with torch.autocast(device_type=z.device.type, enabled=False):
            residual = z.detach().float()
            total = torch.zeros_like(residual)
            outputs = []
            for i, level in enumerate(self.levels):
                # A start without a fit: each level's first batches are residuals of a level that has started.
                out = level(residual, may_start=i == 0 or self.levels[i - 1].started)
                total = total + out.z_q.detach()
                residual = residual - out.z_q.detach()
                outputs.append(out)
            commitment = F.mse_loss(z.float(), total)
            z_q = total + (z.float() - z.float().detach())  # forward: exactly the sum of codes; gradient: identity
        indices = torch.stack([out.indices for out in outputs], -1)
        return QuantizerOutput.of_codebooks(z_q.to(z.dtype), indices, commitment, self.commitment_cost, outputs)

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        residual, indices = z.float(), []
        for level in self.levels:
            idx = level.encode(residual)
            residual = residual - level.lookup(idx)
            indices.append(idx)
        return torch.stack(indices, -1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        return sum(level.lookup(indices[..., i]) for i, level in enumerate(self.levels))

    @torch.no_grad()
    def fit(self, samples: torch.Tensor, iters: int, tokens_per_update: float, seed: int = 0) -> list:
        """Level by level: each fits the residuals the fitted levels before it leave."""
        residual, results = samples.float(), []
        for i, level in enumerate(self.levels):
            results += level.fit(residual, iters, tokens_per_update, seed + i)
            residual = residual - level.lookup(level.encode(residual))
        return results


__all__ = ["ResidualQuantizer"]
