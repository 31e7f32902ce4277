"""quantizer.kind none, the continuous model: the latent goes to the decoder as it is, and there are no codes
(VQRAE is then RAE)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .base import Quantizer, QuantizerOutput

if TYPE_CHECKING:
    from ..config import QuantizerConfig


class NoQuantizer(Quantizer):
    kind = "none"
    fit_need = "none"

    @classmethod
    def state_elements(cls, config: QuantizerConfig, dim: int) -> int:
        return 0

    @classmethod
    def weights_at_least(cls, config: QuantizerConfig) -> int:
        return 0

    def __init__(self, config: QuantizerConfig, embedding_dim: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim = 0, embedding_dim

    def describe(self) -> str:
        return "none: the continuous latent goes to the decoder (RAE)"

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        zero = z.new_zeros((), dtype=torch.float32)
        return QuantizerOutput(z, None, zero, zero)

    def encode(self, *args, **kwargs):
        raise ValueError("this model is continuous (quantizer.kind='none'): it has no codes to encode to or decode "
                         "from; use encode() / decode() for its latents, or build it with a codebook")

    lookup = encode


__all__ = ["NoQuantizer"]
