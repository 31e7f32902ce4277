"""quantizer.kind simvq: SimVQ (Zhu et al., "Addressing Representation Collapse in Vector Quantized Models with One
Linear Layer", 2024) on the frozen features: the codebook is a frozen basis times one learned linear map,
codebook = basis @ W, so every step moves every code together and none is left behind.

    z (..., D) --nearest row of basis @ W (exact fp32 search)--> index --> z_q = (basis @ W)[index]

High-dimensional codes, as VQRAE's (KlingAIResearch/VQRAE): the codes have the encoder's width D (768 for DINOv2-B).
The basis starts from the offline k-means fit of the latents (quantizer.basis=fit, this project's start; W = the
identity, so the fitted codebook is the start) or random (quantizer.basis=random: N(0, 1) rows, the normalised
latents' scale, and no fit; SimVQ's own draws std D^-1/2 before a default-initialised map).
W learns by SimVQ's codebook term ||sg(z) - z_q||^2 (weight 1), trained with the decoder's optimizer (the contract's
trained_parameters); its commitment term has nothing to move, the encoder being frozen. z_q passes the decoder's
gradient straight through to z, as the other kinds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..kmeans import KMeansResult, fit_kmeans
from ..search import DEFAULT_MAX_DISTANCES_PER_CHUNK, nearest_code
from .base import Quantizer, QuantizerOutput, channels_last_rows, code_use

if TYPE_CHECKING:
    from ..config import QuantizerConfig


class SimVQuantizer(Quantizer):
    kind = "simvq"
    options = ("basis",)

    @classmethod
    def state_elements(cls, config: QuantizerConfig, dim: int) -> int:
        return config.num_embeddings * dim + dim * dim  # the frozen basis and the map

    def __init__(self, config: QuantizerConfig, embedding_dim: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim = config.num_embeddings, embedding_dim
        self.commitment_cost = config.commitment_cost
        self.fit_need = "offline" if config.basis == "fit" else "none"
        self.register_buffer("basis", torch.randn(config.num_embeddings, embedding_dim))  # frozen: saved, not trained
        self.register_buffer("initialized", torch.tensor(config.basis == "random"))
        self.map = nn.Linear(embedding_dim, embedding_dim, bias=False)
        with torch.no_grad():
            self.map.weight.copy_(torch.eye(embedding_dim))  # the basis itself is the first codebook
        self.max_distances_per_chunk = DEFAULT_MAX_DISTANCES_PER_CHUNK

    @property
    def started(self) -> bool:
        return bool(self.initialized)

    def describe(self) -> str:
        return f"SimVQ, {self.num_embeddings} codes of width {self.embedding_dim} (a frozen basis times a learned map)"

    def trained_parameters(self) -> list[dict]:
        return [{"params": list(self.map.parameters())}]

    @torch.no_grad()
    def codebook(self) -> torch.Tensor:
        """basis @ W, (K, D) fp32, for the search (K x D x D: built once a call, without a graph)."""
        return self.map(self.basis.float())

    def _codes(self, indices: torch.Tensor) -> torch.Tensor:
        """The codes of `indices` (...) -> (..., D), with W's gradient: only the rows used are mapped."""
        return self.map(self.basis[indices].float())

    def _flatten(self, z: torch.Tensor) -> torch.Tensor:
        return channels_last_rows(z, self.embedding_dim)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        with torch.autocast(device_type=z.device.type, enabled=False):  # the search and the map in fp32
            flat = self._flatten(z)
            indices = nearest_code(flat.detach(), self.codebook(), self.max_distances_per_chunk)
            quantized = self._codes(indices)
            codebook_term = F.mse_loss(quantized, flat.detach())  # SimVQ's: moves W
            commitment = codebook_term.detach()
            z_q = quantized.detach() + (flat - flat.detach())  # forward: the code; gradient to z: the identity
            counts = torch.bincount(indices, minlength=self.num_embeddings).float()
        return QuantizerOutput(z_q.to(z.dtype).reshape(z.shape), indices.reshape(z.shape[:-1]), commitment,
                               codebook_term + self.commitment_cost * F.mse_loss(flat, quantized.detach()),
                               **code_use(counts))

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = self._flatten(z)
            return nearest_code(flat, self.codebook(), self.max_distances_per_chunk).reshape(z.shape[:-1])

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=indices.device.type, enabled=False):
            return self._codes(indices)

    @torch.no_grad()
    def fit(self, samples: torch.Tensor, iters: int, tokens_per_update: float, seed: int = 0) -> list[KMeansResult]:
        """The basis: k-means of the latents (M, D) on every rank together; W back to the identity."""
        result = fit_kmeans(samples.float(), self.num_embeddings, iters=iters, seed=seed,
                            max_distances=self.max_distances_per_chunk)
        self.basis.copy_(result.centroids)
        self.map.weight.copy_(torch.eye(self.embedding_dim, device=self.map.weight.device))
        self.initialized.fill_(True)
        return [result]


__all__ = ["SimVQuantizer"]
