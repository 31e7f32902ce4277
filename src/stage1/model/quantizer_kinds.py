"""Quantizers made of several single codebooks (stage1.model.quantizer.VectorQuantizer), chosen by `quantizer.kind`:

    single     one codebook                         indices (...)        K codes per token
    residual   `depth` codebooks in turn: level l   indices (..., depth)  K^depth combinations
               quantizes z - (q_1 + ... + q_{l-1})
    grouped    channels split into `groups` equal    indices (..., groups) product of per-group codes
               slices, each with its own codebook
    multiscale VAR's residual scales on the grid       indices (B, L)        stage1.model.multiscale
    none       no codebook: the latent passes as it is  no indices          continuous (VQRAE is then RAE)

Each level is a VectorQuantizer with its own EMA statistics, restarts and first-batch initialisation, so every
guarantee of the single codebook (exact fp32 search, fp32 statistics, identical codebooks on every rank) holds
per level. The forward value is exactly the sum (residual) or concatenation (grouped) of the codes;
the gradient reaches z unchanged (straight-through).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .config import QuantizerConfig
from .quantizer import VectorQuantizer


def single_codebook(config: QuantizerConfig, embedding_dim: int) -> VectorQuantizer:
    """One single-codebook level with the kind's options."""
    return VectorQuantizer(dataclasses.replace(config, kind="single", depth=1, groups=1, phi=0), embedding_dim)


def combine_losses(levels: list[dict], commitment: torch.Tensor, commitment_cost: float) -> dict:
    """One losses dict for several codebooks: the whole quantizer's commitment; usage metrics averaged over
    codebooks, restarts summed, a skipped update if any level skipped."""
    losses = {
        "vq_loss": commitment_cost * commitment,
        "commitment_loss": commitment,
        "codebook_loss": commitment.detach(),
        "perplexity": torch.stack([level["perplexity"] for level in levels]).mean(),
        "codebook_usage": torch.stack([level["codebook_usage"] for level in levels]).mean(),
    }
    if "skipped_ema_update" in levels[0]:
        losses["skipped_ema_update"] = torch.stack([level["skipped_ema_update"] for level in levels]).max()
        losses["restarted_codes"] = torch.stack([level["restarted_codes"] for level in levels]).sum()
    return losses


class ResidualQuantizer(nn.Module):
    def __init__(self, config: QuantizerConfig, embedding_dim: int):
        super().__init__()
        self.levels = nn.ModuleList(single_codebook(config, embedding_dim) for _ in range(config.depth))
        self.num_embeddings, self.embedding_dim = config.num_embeddings, embedding_dim
        self.commitment_cost = config.commitment_cost
        self.index_suffix = (config.depth,)

    def forward(self, z: torch.Tensor):
        with torch.autocast(device_type=z.device.type, enabled=False):
            residual = z.detach().float()
            total = torch.zeros_like(residual)
            level_losses, indices = [], []
            for i, level in enumerate(self.levels):
                # A start without a fit: each level's first batches are residuals of a level that has started.
                level.gathers = i == 0 or bool(self.levels[i - 1].initialized)
                q, losses, idx = level(residual)
                total = total + q.detach()
                residual = residual - q.detach()
                level_losses.append(losses)
                indices.append(idx)
            commitment = F.mse_loss(z.float(), total)
            z_q = total + (z.float() - z.float().detach())  # forward: exactly the sum of codes; gradient: identity
        return z_q.to(z.dtype), combine_losses(level_losses, commitment, self.commitment_cost), torch.stack(indices, -1)

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


class GroupedQuantizer(nn.Module):
    def __init__(self, config: QuantizerConfig, embedding_dim: int):
        super().__init__()
        if embedding_dim % config.groups:
            raise ValueError(f"quantizer.groups ({config.groups}) must divide the latent channels ({embedding_dim})")
        width = embedding_dim // config.groups
        self.levels = nn.ModuleList(single_codebook(config, width) for _ in range(config.groups))
        self.num_embeddings, self.embedding_dim = config.num_embeddings, embedding_dim
        self.commitment_cost = config.commitment_cost
        self.index_suffix = (config.groups,)

    def _slices(self, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if z.dim() < 2 or z.shape[-1] != self.embedding_dim:
            raise ValueError(f"expected channels-last features (..., {self.embedding_dim}), got shape {tuple(z.shape)}")
        return z.chunk(len(self.levels), dim=-1)

    def forward(self, z: torch.Tensor):
        outputs = [level(part) for level, part in zip(self.levels, self._slices(z), strict=True)]
        z_q = torch.cat([q for q, _, _ in outputs], dim=-1)  # each part straight-through already
        commitment = torch.stack([losses["commitment_loss"] for _, losses, _ in outputs]).mean()  # equal widths
        losses = combine_losses([losses for _, losses, _ in outputs], commitment, self.commitment_cost)
        return z_q, losses, torch.stack([idx for _, _, idx in outputs], -1)

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


class NoQuantizer(nn.Module):
    """kind=none, the continuous model: the latent goes to the decoder as it is, and there are no codes."""

    index_suffix: tuple[int, ...] = ()

    def __init__(self, config: QuantizerConfig, embedding_dim: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim = 0, embedding_dim

    def forward(self, z: torch.Tensor):
        zero = z.new_zeros((), dtype=torch.float32)
        return z, {"vq_loss": zero, "commitment_loss": zero, "codebook_loss": zero}, None

    def encode(self, *args, **kwargs):
        raise ValueError("this model is continuous (quantizer.kind='none'): it has no codes to encode to or decode "
                         "from; use encode() / decode() for its latents, or build it with a codebook")

    lookup = fit = encode


def build_quantizer(config: QuantizerConfig, embedding_dim: int) -> nn.Module:
    """The quantizer of config.kind for latents of embedding_dim channels."""
    if config.kind == "none":
        return NoQuantizer(config, embedding_dim)
    if config.kind == "residual":
        return ResidualQuantizer(config, embedding_dim)
    if config.kind == "grouped":
        return GroupedQuantizer(config, embedding_dim)
    if config.kind == "multiscale":
        from .multiscale import MultiScaleQuantizer  # it builds on this module

        return MultiScaleQuantizer(config, embedding_dim)
    return VectorQuantizer(config, embedding_dim)


__all__ = ["ResidualQuantizer", "GroupedQuantizer", "NoQuantizer", "build_quantizer"]
