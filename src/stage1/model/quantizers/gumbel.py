"""quantizer.kind gumbel: Gumbel-softmax codes (Jang et al. 2017; DALL-E's dVAE) on the frozen features, the design's
differentiable discrete sampling. Logits over K codes come from the features, either

    distance  -exp(log_scale) * ||z - e_k||^2, a learned scale on the distance to each code (VQ's rule, softened)
    linear    a linear head z -> K logits (started equal to the distance logits of the fit)

and in training a code is drawn by Gumbel-softmax at a temperature annealed with the training step (quantizer.tau_start
to tau_end over tau_steps, exponentially): a hard one-hot sample with the soft sample's gradient (quantizer.hard), or
the soft mixture of codes itself. Loss: commitment_cost x ||z_q - z||^2 (z_q near the encoder's latent, as FSQ's) plus
kl_weight x KL(softmax(logits) || uniform) per token (DALL-E's: it flattens each token's distribution, which with
distance logits pulls the scale down against the annealing; it does not act on code use across a batch). In eval
mode and in every command a token's code is the argmax of its logits. The codebook, the scale and the head are
trained by gradient with the decoder (the contract's trained_parameters); the offline fit starts the codebook on the
k-means of the latents, the scale at one over the fit's distortion. The step count is a buffer, saved and resumed
with the model.

Memory: a training forward keeps about six (tokens x K) fp32 tensors for its backward (12 GiB at 8192 tokens and
K = 65536): pick K or the batch to fit. Eval forwards and encode take the argmax chunk by chunk.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..kmeans import KMeansResult, fit_kmeans
from ..search import DEFAULT_MAX_DISTANCES_PER_CHUNK
from .base import Quantizer, QuantizerOutput, channels_last_rows, code_use

if TYPE_CHECKING:
    from ..config import QuantizerConfig


class GumbelQuantizer(Quantizer):
    kind = "gumbel"
    options = ("logits", "tau_start", "tau_end", "tau_steps", "hard", "kl_weight")

    @classmethod
    def state_elements(cls, config: QuantizerConfig, dim: int) -> int:
        return (2 if config.logits == "linear" else 1) * config.num_embeddings * dim  # codebook (and linear head)

    @classmethod
    def check_options(cls, config: QuantizerConfig) -> None:
        config.require(0 < config.tau_end <= config.tau_start, "tau_end", f"in (0, tau_start = {config.tau_start}]")
        config.require(config.tau_steps >= 0, "tau_steps", ">= 0 (0: tau_end from the first step)")
        config.require(config.kl_weight >= 0, "kl_weight", ">= 0")

    def __init__(self, config: QuantizerConfig, embedding_dim: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim = config.num_embeddings, embedding_dim
        self.commitment_cost, self.kl_weight, self.hard = config.commitment_cost, config.kl_weight, config.hard
        self.tau_start, self.tau_end, self.tau_steps = config.tau_start, config.tau_end, config.tau_steps
        self.codebook = nn.Parameter(torch.randn(config.num_embeddings, embedding_dim))
        # One of the two (a parameter no loss reaches would stop DDP): the distance's scale, or the linear head.
        self.head = nn.Linear(embedding_dim, config.num_embeddings) if config.logits == "linear" else None
        self.log_scale = nn.Parameter(torch.tensor(-math.log(2.0 * embedding_dim))) if self.head is None else None
        self.register_buffer("step", torch.tensor(0, dtype=torch.long))  # training forwards so far
        self.register_buffer("initialized", torch.tensor(False))
        self.max_distances_per_chunk = DEFAULT_MAX_DISTANCES_PER_CHUNK

    @property
    def started(self) -> bool:
        return bool(self.initialized) or int(self.step) > 0

    def describe(self) -> str:
        sample = "hard" if self.hard else "soft"
        return (f"Gumbel-softmax ({'linear head' if self.head is not None else 'distance'} logits, {sample}, tau "
                f"{self.tau_start:g} -> {self.tau_end:g}), {self.num_embeddings} codes")

    def trained_parameters(self) -> list[dict]:
        return [{"params": list(self.parameters())}]

    def temperature(self) -> float:
        """tau at the current step: tau_start * (tau_end / tau_start) ** (step / tau_steps), then tau_end."""
        progress = 1.0 if self.tau_steps == 0 else min(int(self.step) / self.tau_steps, 1.0)
        return self.tau_start * (self.tau_end / self.tau_start) ** progress

    def logits(self, flat: torch.Tensor) -> torch.Tensor:
        """(M, D) fp32 latents -> (M, K) logits."""
        if self.head is not None:
            return self.head(flat)
        distances = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codebook.T
                     + self.codebook.pow(2).sum(1)[None])
        return -self.log_scale.exp() * distances

    def _flatten(self, z: torch.Tensor) -> torch.Tensor:
        return channels_last_rows(z, self.embedding_dim)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        with torch.autocast(device_type=z.device.type, enabled=False):  # logits and the codebook mix in fp32
            flat = self._flatten(z.detach())
            if self.training:
                log_probs = self.logits(flat).log_softmax(1)  # gumbel_softmax is shift-invariant: the same samples
                weights = F.gumbel_softmax(log_probs, tau=self.temperature(), hard=self.hard)
                self.step += 1
                indices = weights.argmax(1)
                z_q = weights @ self.codebook
                kl = (log_probs.exp() * (log_probs + math.log(self.num_embeddings))).sum(1).mean()
            else:  # the argmax, as every command, and the KL in one pass of chunks: no (tokens x K) tensor kept
                indices, kl = [], 0.0
                for rows in self._chunks(flat):
                    logits = self.logits(rows)
                    log_probs = logits.log_softmax(1)
                    indices.append(logits.argmax(1))  # the logits' argmax, as encode takes it
                    kl = kl + (log_probs.exp() * (log_probs + math.log(self.num_embeddings))).sum()
                indices, kl = torch.cat(indices), kl / flat.shape[0]
                z_q = self.codebook[indices]
            commitment = F.mse_loss(z_q, flat)
            counts = torch.bincount(indices, minlength=self.num_embeddings).float()
        return QuantizerOutput(z_q.to(z.dtype).reshape(z.shape), indices.reshape(z.shape[:-1]), commitment.detach(),
                               self.commitment_cost * commitment + self.kl_weight * kl, **code_use(counts),
                               extra={"kl_loss": kl})

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self._argmax(self._flatten(z)).reshape(z.shape[:-1])

    def _chunks(self, flat: torch.Tensor):
        return flat.split(max(1, self.max_distances_per_chunk // self.num_embeddings))  # (rows, K) logits at a time

    def _argmax(self, flat: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.logits(part).argmax(1) for part in self._chunks(flat)])

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=indices.device.type, enabled=False):
            return self.codebook[indices]

    @torch.no_grad()
    def fit(self, samples: torch.Tensor, iters: int, tokens_per_update: float, seed: int = 0) -> list[KMeansResult]:
        """The codebook: k-means of the latents (M, D) on every rank together; the scale: one over the fit's mean
        squared distance to the nearest code; a linear head: the same logits (up to ||z||^2, which softmax drops)."""
        result = fit_kmeans(samples.float(), self.num_embeddings, iters=iters, seed=seed,
                            max_distances=self.max_distances_per_chunk)
        self.codebook.copy_(result.centroids)
        scale = 1.0 / max(result.distortion[-1], 1e-12)
        if self.head is None:
            self.log_scale.fill_(math.log(scale))
        else:
            self.head.weight.copy_(2 * scale * result.centroids)
            self.head.bias.copy_(-scale * result.centroids.pow(2).sum(1))
        self.initialized.fill_(True)
        return [result]


__all__ = ["GumbelQuantizer"]
