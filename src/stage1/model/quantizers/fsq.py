"""quantizer.kind fsq: finite scalar quantization (Mentzer et al., "Finite Scalar Quantization: VQ-VAE Made Simple",
2023) on the frozen features, with no codebook to collapse.

    z (..., D) --in_proj--> h (..., d) --bound--> each channel i in (-L_i / 2, L_i / 2) --round--> an integer grid
               --/ (L_i // 2)--> codes in [-1, 1]^d --out_proj--> z_q (..., D)

d = len(quantizer.levels); a token's code is the mixed-radix number of its d digits, so the vocabulary is
prod(levels) ([8, 5, 5, 5] = 1000, [8, 8, 8, 6, 5] = 15360, [8, 8, 8, 5, 5, 5] = 64000). Rounding passes the
gradient straight through (FSQ's round_ste). The two projections are trained by gradient with the decoder (the
contract's trained_parameters) and by `loss` = commitment_cost * ||z_q - z||^2, which keeps z_q on the encoder's
latent (the decoder, RAE's, paints from there; the encoder is frozen, so nothing is committed to the codes).

quantizer.entropy_weight > 0 adds MAGVIT-v2's entropy penalty (Yu et al., "Language Model Beats Diffusion", 2023):
each token's soft assignment to its channel's levels should be sharp (low entropy a token) while the batch spreads
over all of them (high entropy of the batch's mean). It is factorized over the channels (the sum of each channel's
entropies, as Open-MAGVIT2 does for large vocabularies; exact for one channel, and never a prod(levels)-wide
softmax). With levels of 2 this is LFQ (MAGVIT-v2's lookup-free quantization): binary codes and its penalty.

The offline fit (before step 0, as the codebooks' k-means) starts them where a linear code can do best: in_proj on
the d principal directions of the latents, each whitened to unit variance (the bound's steep part) and centred on
the middle of its levels (FSQ's bound maps h = 0 to the code 0, the top edge of a level of 2 and off-centre for every
even level; the bias takes that shift back, so the levels split the whitened channel evenly), and out_proj the
least-squares map back from the codes, over every rank's samples.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ...base.distributed import all_reduce_sum
from ...base.limits import MAX_CODES
from ..kmeans import KMeansResult
from .base import Quantizer, QuantizerOutput, channels_last_rows, code_use

if TYPE_CHECKING:
    from ..config import QuantizerConfig

BOUND_EPS = 1e-3  # FSQ's: the bound stays inside the outer levels' rounding interval
MAX_FSQ_CHANNELS = 64
# The soft assignment's temperature, in steps of the levels: MAGVIT-v2's 0.01 on codes +-1 (a step of 2).
ENTROPY_TEMPERATURE = 0.0025
RIDGE = 1e-4  # relative ridge of the least-squares out_proj (codes that barely vary stay solvable)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Rounded in the forward pass, the identity in the backward pass."""
    return x + (x.round() - x).detach()


class FSQuantizer(Quantizer):
    kind = "fsq"
    options = ("levels", "entropy_weight")

    @classmethod
    def check_options(cls, config: QuantizerConfig) -> None:
        levels = config.levels
        config.require(1 <= len(levels) <= MAX_FSQ_CHANNELS and all(level >= 2 for level in levels)
                       and math.prod(levels) <= MAX_CODES, "levels",
                       f"1 to {MAX_FSQ_CHANNELS} levels of at least 2 whose product (the vocabulary) is at most "
                       f"{MAX_CODES:,}, e.g. [8, 5, 5, 5] (1000 codes), [8, 8, 8, 6, 5] (15360), [8, 8, 8, 5, 5, 5]")
        config.require(math.isfinite(config.entropy_weight) and config.entropy_weight >= 0, "entropy_weight",
                       ">= 0 (0: no entropy penalty)")

    @classmethod
    def state_elements(cls, config: QuantizerConfig, dim: int) -> int:
        return 2 * len(config.levels) * dim  # the two projections: no codebook

    @classmethod
    def weights_at_least(cls, config: QuantizerConfig) -> int:
        return len(config.levels)  # its projections hold at least 2 D d; d is the least it can be told apart by

    def __init__(self, config: QuantizerConfig, embedding_dim: int):
        super().__init__()
        levels = torch.tensor(config.levels, dtype=torch.long)
        self.register_buffer("levels", levels, persistent=False)
        # Digit i of a code counts prod(levels[:i]): the mixed-radix basis.
        self.register_buffer("basis", torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), 0), persistent=False)
        self.num_embeddings, self.embedding_dim = math.prod(config.levels), embedding_dim
        self.commitment_cost, self.entropy_weight = config.commitment_cost, config.entropy_weight
        self.in_proj = nn.Linear(embedding_dim, len(config.levels))
        self.out_proj = nn.Linear(len(config.levels), embedding_dim)

    def describe(self) -> str:
        penalty = f", entropy weight {self.entropy_weight:g}" if self.entropy_weight else ""
        return f"FSQ, levels {self.levels.tolist()} ({self.num_embeddings} codes{penalty})"

    def trained_parameters(self) -> list[dict]:
        return [{"params": [*self.in_proj.parameters(), *self.out_proj.parameters()]}]

    @property
    def min_fit_tokens(self) -> int:
        return len(self.levels) + 1

    @property
    def fit_tokens_for(self) -> str:
        return f"for the principal directions of its {len(self.levels)} channels"

    # ---- codes ------------------------------------------------------------------------------------------------
    def _codes(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (..., D) -> codes in [-1, 1]^d on each channel's grid of levels, straight-through."""
        return round_ste(self._bounded(z)) / (self.levels // 2)

    def _bounded(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (..., D) -> each channel in (-L / 2, L / 2), before rounding to its levels."""
        h = self.in_proj(channels_last_rows(z, self.embedding_dim)).reshape(*z.shape[:-1], -1)
        half, offset = self._half_and_offset()
        return torch.tanh(h + torch.atanh(offset / half)) * half - offset

    def entropy_penalty(self, bounded: torch.Tensor) -> torch.Tensor:
        """MAGVIT-v2's entropy term, factorized over the channels: the mean over tokens of each token's entropy over
        its channels' levels, minus the entropy of the tokens' mean assignment, summed over channels."""
        flat = bounded.reshape(-1, len(self.levels))
        steps = torch.arange(int(self.levels.max()), device=flat.device, dtype=flat.dtype)
        grid = steps - (self.levels // 2)[:, None]  # (d, L_max): channel i's integer levels, from -(L_i // 2)
        logits = -(flat[:, :, None] - grid).pow(2) / ENTROPY_TEMPERATURE
        logits = logits.masked_fill(steps >= self.levels[:, None], -math.inf)  # a channel with fewer levels
        probs = logits.softmax(-1)
        per_token = -(probs * logits.log_softmax(-1).nan_to_num(neginf=0.0)).sum(-1).mean(0)
        mean = probs.mean(0)
        of_mean = -(mean * mean.clamp_min(1e-12).log()).sum(-1)
        return (per_token - of_mean).sum()

    def _half_and_offset(self) -> tuple[torch.Tensor, torch.Tensor]:
        """FSQ's bound: h -> tanh(h + atanh(offset / half)) * half - offset, in (-L / 2, L / 2) around the grid."""
        half = (self.levels - 1) * (1 + BOUND_EPS) / 2
        return half, (self.levels % 2 == 0).float() * 0.5  # even levels: the grid sits half a step off zero

    def _indices(self, codes: torch.Tensor) -> torch.Tensor:
        digits = (codes * (self.levels // 2) + self.levels // 2).round().long()
        return (digits * self.basis).sum(-1)

    def codes_of(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (...) -> codes (..., d) in [-1, 1]."""
        digits = indices.long().unsqueeze(-1) // self.basis % self.levels
        return (digits - self.levels // 2).float() / (self.levels // 2)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        with torch.autocast(device_type=z.device.type, enabled=False):  # fp32: the bound and rounding are exact
            bounded = self._bounded(z)
            codes = round_ste(bounded) / (self.levels // 2)
            z_q = self.out_proj(codes)
            commitment = F.mse_loss(z_q, z.detach().float())
            indices = self._indices(codes.detach())
            counts = torch.bincount(indices.flatten(), minlength=self.num_embeddings).float()
            loss, extra = self.commitment_cost * commitment, {}
            if self.entropy_weight:
                extra["entropy_loss"] = self.entropy_penalty(bounded)
                loss = loss + self.entropy_weight * extra["entropy_loss"]
        return QuantizerOutput(z_q.to(z.dtype), indices, commitment.detach(), loss, **code_use(counts), extra=extra)

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self._indices(self._codes(z))

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=indices.device.type, enabled=False):
            return self.out_proj(self.codes_of(indices))

    # ---- offline fit ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def fit(self, samples: torch.Tensor, iters: int, tokens_per_update: float, seed: int = 0) -> list[KMeansResult]:
        """in_proj: the latents' d principal directions, whitened and centred on each channel's levels; out_proj:
        least squares from the codes back to the latents; both over every rank's samples (M, D). `iters`,
        `tokens_per_update` and `seed` are the codebooks' (a PCA has no iterations and no randomness)."""
        with torch.autocast(device_type=samples.device.type, enabled=False):
            return self._fit(samples.float())

    def _fit(self, x: torch.Tensor) -> list[KMeansResult]:
        d = len(self.levels)
        count = x.new_tensor([float(x.shape[0])])
        total, outer = x.sum(0), x.T @ x
        all_reduce_sum(count, total, outer)
        mean = total / count
        covariance = outer / count - torch.outer(mean, mean)
        variances, directions = torch.linalg.eigh(covariance.double())  # ascending
        top = directions[:, -d:].flip(-1).float()
        scale = variances[-d:].flip(-1).clamp_min(1e-12).sqrt().float()
        self.in_proj.weight.copy_(top.T / scale[:, None])
        half, offset = self._half_and_offset()
        self.in_proj.bias.copy_(-(mean @ top) / scale - torch.atanh(offset / half))  # the bound's shift taken back
        codes = torch.cat([self._codes(x), torch.ones_like(x[:, :1])], dim=1)  # (M, d + 1): codes and a bias
        gram, cross = codes.T @ codes, codes.T @ x
        all_reduce_sum(gram, cross)
        ridge = RIDGE * gram.diagonal().mean() * torch.eye(d + 1, device=gram.device)
        solution = torch.linalg.solve((gram + ridge).double(), cross.double()).float()  # (d + 1, D)
        self.out_proj.weight.copy_(solution[:-1].T)
        self.out_proj.bias.copy_(solution[-1])
        indices = self._indices(codes[:, :-1])
        counts = torch.bincount(indices, minlength=self.num_embeddings)
        all_reduce_sum(counts)
        error = (self.out_proj(codes[:, :-1]) - x).pow(2).sum(1).sum().reshape(1)
        all_reduce_sum(error)
        return [KMeansResult(centroids=x.new_zeros(0, self.embedding_dim), counts=counts,
                             distortion=[float(error / count)], reseeded=0)]


__all__ = ["FSQuantizer", "round_ste"]
