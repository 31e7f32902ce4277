"""The quantizer contract: what every kind gives and what the rest of the package reads of it.

    forward(z) -> QuantizerOutput    training's pass: z_q (straight-through), codes, the loss the trainer adds, metrics
    encode(z) -> indices             codes only, never moving a codebook
    lookup(indices) -> z_q           the vectors codes stand for (a prefix of scales where the kind has an order)
    layout -> CodeLayout             what one image's codes are: shape, vocabulary, codebooks (files, exports, checks)
    fit(samples, ...)                an offline k-means start where `fit_need` says the kind has one
    trained_parameters()             optimizer groups trained by gradient with the decoder (phi)
    describe()                       one line for the model card and the logs

Every kind takes channels-last latents (..., D) (a multi-scale kind: whole grids (B, S * S, D)) and is built from a
QuantizerConfig; its class names the config fields it reads besides the common ones (`options`) and checks them
(`check_options`), so the config refuses another kind's option instead of ignoring it.
"""

from __future__ import annotations

import itertools
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:  # the config module imports the registry of kinds; kinds only read a config's fields
    from ..config import QuantizerConfig


@dataclass
class QuantizerOutput:
    """What a quantizer's forward gives. Metrics are None where a kind has no such thing (no codebook: no usage)."""

    z_q: torch.Tensor  # z's shape and dtype; forward value the codes' vectors, gradient to z the identity
    indices: torch.Tensor | None  # the codes as encode() gives them; None without codes
    commitment: torch.Tensor  # mean ||z - z_q||^2 (fp32), the commitment term before its weight
    loss: torch.Tensor  # what the trainer adds to the decoder's loss: the weighted commitment and any `extra` term
    usage: torch.Tensor | None = None  # share of codes chosen in this batch, averaged over codebooks
    perplexity: torch.Tensor | None = None  # exp(entropy) of this batch's code counts, averaged over codebooks
    restarted: torch.Tensor | None = None  # codes restarted this training step, over all codebooks
    skipped_update: torch.Tensor | None = None  # 1.0 when some codebook skipped this training step's update
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # a kind's own terms, already in `loss` (phi_loss)

    def terms(self) -> dict[str, torch.Tensor]:
        """The terms by their log names (metrics.jsonl, TensorBoard; `VQRAE(x, return_loss=True)`'s dict)."""
        terms = {"vq_loss": self.loss, "commitment_loss": self.commitment,
                 "codebook_loss": self.commitment.detach()}  # ||sg(z) - e||^2: reported; no gradient moves a code
        named = (("codebook_usage", self.usage), ("perplexity", self.perplexity),
                 ("restarted_codes", self.restarted), ("skipped_ema_update", self.skipped_update))
        return {**terms, **{name: value for name, value in named if value is not None}, **self.extra}

    @classmethod
    def of_codebooks(cls, z_q: torch.Tensor, indices: torch.Tensor, commitment: torch.Tensor, commitment_cost: float,
                     codebooks: list[QuantizerOutput]) -> QuantizerOutput:
        """One output for a quantizer made of several codebooks: its own commitment, usage and perplexity averaged
        over the codebooks, restarts summed, a skipped update if any codebook skipped."""

        def combined(name: str, reduce):
            values = [getattr(out, name) for out in codebooks]
            return None if values[0] is None else reduce(torch.stack(values))

        return cls(z_q, indices, commitment, commitment_cost * commitment,
                   usage=combined("usage", torch.mean), perplexity=combined("perplexity", torch.mean),
                   restarted=combined("restarted", torch.sum), skipped_update=combined("skipped_update", torch.amax))


def code_use(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """A batch's hits per code (K,) -> QuantizerOutput's usage (share of codes chosen) and perplexity."""
    probs = counts / counts.sum().clamp_min(1.0)
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
    return {"usage": (counts > 0).float().mean(), "perplexity": torch.exp(entropy)}


def channels_last_rows(z: torch.Tensor, width: int) -> torch.Tensor:
    """(..., width) features -> (M, width) fp32 rows, or one ValueError naming the shape expected."""
    if z.dim() < 2 or z.shape[-1] != width:
        raise ValueError(f"expected channels-last features (..., {width}), e.g. (B, N, {width}) tokens, got shape "
                         f"{tuple(z.shape)}")
    return z.reshape(-1, width).float()


@dataclass(frozen=True)
class CodeLayout:
    """What one image's codes are: the one description token shards and manifests, the exports, vqrae-decode,
    vqrae-evaluate, the model card and VQRAE's index checks read.

    On a grid (scales None), an image's codes are (h, w, *position_shape): () one code per position, (L,) L codes
    (residual levels, channel groups). With scales, they are VAR's flat (L,) codes: each scale's s x s map in raster
    order after the coarser ones, any prefix of whole scales decoding to a preview."""

    vocab_size: int  # the values one code takes (its codebook's size); 0: no codes (a continuous model)
    position_shape: tuple[int, ...] = ()  # the trailing axes of one grid position's codes
    scales: tuple[int, ...] | None = None  # the sides of the scales' maps (flat codes, not a grid)
    codebooks: tuple[int, ...] = (0,)  # the codebook of each code of a position, or of each scale's codes

    @property
    def has_codes(self) -> bool:
        return self.vocab_size > 0

    @property
    def codes_per_position(self) -> int:
        return math.prod(self.position_shape)

    @property
    def num_codebooks(self) -> int:
        return max(self.codebooks) + 1

    @cached_property
    def prefix_ends(self) -> tuple[int, ...]:
        """Flat codes after each scale: where a prefix of scales may end (once per layout: every decode checks it)."""
        return tuple(itertools.accumulate(side * side for side in self.scales or ()))

    def image_shape(self, side: int) -> tuple[int, ...]:
        """One image's codes on a side x side grid (multi-scale: (L,), whatever the side)."""
        return (self.prefix_ends[-1],) if self.scales else (side, side, *self.position_shape)

    def codes_per_image(self, side: int) -> int:
        return math.prod(self.image_shape(side)) if self.has_codes else 0

    def bits_per_image(self, side: int) -> float:
        return self.codes_per_image(side) * math.log2(self.vocab_size) if self.has_codes else 0.0

    def codebook_of(self, side: int) -> torch.Tensor:
        """The codebook of each of one image's codes, flattened as they are stored (evaluate counts codes apart)."""
        if self.scales:
            return torch.cat([torch.full((s * s,), self.codebooks[k]) for k, s in enumerate(self.scales)])
        return torch.tensor(self.codebooks).repeat(side * side)

    def scales_in(self, length: int) -> int:
        """How many scales `length` flat codes hold: a prefix of whole scales, or ValueError."""
        ends = self.prefix_ends
        if length not in ends:
            raise ValueError(f"{length} codes are not whole scales of {list(self.scales or ())}: a prefix has "
                             f"{', '.join(map(str, ends))} codes")
        return ends.index(length) + 1

    def split(self, indices: torch.Tensor) -> list[torch.Tensor]:
        """Flat (B, L') codes of the first scales -> their maps [(B, 1, 1), (B, 2, 2), ...]."""
        sides = self.scales[: self.scales_in(indices.shape[-1])]
        parts = indices.split([s * s for s in sides], dim=-1)
        return [part.reshape(*indices.shape[:-1], s, s) for part, s in zip(parts, sides, strict=True)]

    def check_indices(self, indices) -> torch.Tensor:
        """Codes as a caller gives them (decode_from_indices, a code file), checked against this layout: integer,
        of the layout's shape, inside the vocabulary. Returns them as a tensor (multi-scale maps made flat)."""
        if not self.has_codes:
            raise ValueError("this model is continuous (no quantizer codes): there are no indices to decode")
        if self.scales and isinstance(indices, (list, tuple)):
            indices = self._flat_scales(indices)
        if not isinstance(indices, torch.Tensor):
            raise ValueError(f"expected indices as a torch.Tensor, got {type(indices).__name__}")
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise ValueError(f"expected integer indices (torch.long), got dtype {indices.dtype}")
        suffix = self.position_shape
        if self.scales:
            if indices.dim() != 2:
                raise ValueError(f"expected multi-scale indices as VAR's flat (B, L) or a list of the scales' maps "
                                 f"[(B, 1, 1), (B, 2, 2), ...], got shape {tuple(indices.shape)}")
            self.scales_in(indices.shape[1])
        elif indices.dim() - len(suffix) not in (2, 3) or tuple(indices.shape[indices.dim() - len(suffix):]) != suffix:
            codes = "".join(f", {n}" for n in suffix)
            raise ValueError(f"expected indices of shape (B, h, w{codes}) or (B, h*w{codes}), got shape "
                             f"{tuple(indices.shape)}")
        if indices.numel() == 0:
            raise ValueError(f"expected a non-empty batch of indices, got shape {tuple(indices.shape)}")
        lo, hi = (int(v) for v in torch.aminmax(indices.long()))  # uint16 etc. have no min() kernel
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"indices must lie in [0, {self.vocab_size - 1}] (codebook size {self.vocab_size}), got "
                             f"values in [{lo}, {hi}]")
        return indices

    def _flat_scales(self, maps) -> torch.Tensor:
        """[(B, 1, 1), (B, 2, 2), ...]: the maps of the first scales -> VAR's flat (B, L')."""
        sides = self.scales[: len(maps)]
        shapes = [tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__ for m in maps]
        batch = shapes[0][0] if maps and isinstance(shapes[0], tuple) and len(shapes[0]) == 3 else None
        if not maps or len(maps) > len(self.scales) or shapes != [(batch, s, s) for s in sides]:
            raise ValueError(f"expected the code maps of the first scales of {list(self.scales)}, "
                             f"[(B, 1, 1), (B, 2, 2), ...] as tensors, got {shapes}")
        return torch.cat([m.reshape(batch, -1) for m in maps], dim=1)


class Quantizer(nn.Module, ABC):
    """The base of every kind. A kind is one module with one such class and one line in QUANTIZERS."""

    kind: ClassVar[str]  # its quantizer.kind
    options: ClassVar[tuple[str, ...]] = ()  # the QuantizerConfig fields it reads besides the common ones
    # How it starts before training: "offline", its fit on the frozen latents (k-means for a codebook; stage1.train.
    # codebook_fit: training before step 0, vqrae-fit-codebook); "none", nothing to fit.
    fit_need: ClassVar[str] = "offline"
    fits_whole_grids: ClassVar[bool] = False  # its fit takes whole grids of tokens, not tokens drawn from them

    @classmethod
    def check_options(cls, config: QuantizerConfig) -> None:
        """Checks of its own options' values (config.require), beyond their types."""

    @classmethod
    def state_elements(cls, config: QuantizerConfig, dim: int) -> int:
        """The numbers its codebooks and trained parameters hold for tokens of width `dim` (a config is bounded by
        it before anything is allocated: base.limits.MAX_QUANTIZER_ELEMENTS): one code vector per code by default."""
        return config.num_embeddings * dim

    @classmethod
    def weights_at_least(cls, config: QuantizerConfig) -> int:
        """A lower bound on the numbers its saved state holds (a config.json is checked against its weights file
        before anything is built): one per code by default."""
        return config.num_embeddings

    @abstractmethod
    def forward(self, z: torch.Tensor) -> QuantizerOutput: ...

    @abstractmethod
    def encode(self, z: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def lookup(self, indices: torch.Tensor) -> torch.Tensor: ...

    @cached_property
    def layout(self) -> CodeLayout:
        """What its codes are, fixed when the kind is built (so cached): one code per position from a vocabulary of
        num_embeddings by default; kinds with several codes a position or scales lay theirs out themselves."""
        return CodeLayout(self.num_embeddings)

    @abstractmethod
    def describe(self) -> str: ...

    def fit(self, samples: torch.Tensor, iters: int, tokens_per_update: float, seed: int = 0) -> list:
        """An offline k-means start on latents (M, D); returns one stage1.model.kmeans.KMeansResult per codebook."""
        raise ValueError(f"quantizer.kind {self.kind!r} has no codebook to fit")

    @property
    def min_fit_tokens(self) -> int:
        """The fewest latent tokens its fit takes: one per code by default."""
        return self.num_embeddings

    @property
    def fit_tokens_for(self) -> str:
        """What those tokens are for, in the error that asks for more."""
        return f"for {self.num_embeddings} codes"

    @property
    def started(self) -> bool:
        """Whether its codes stand for something yet (every codebook fitted or trained)."""
        return True

    def trained_parameters(self) -> list[dict]:
        """Optimizer groups trained by gradient with the decoder, kept out of the decoder's EMA copy."""
        return []

    def check_grid(self, side: int | None) -> None:
        """Refuse an encoder grid of `side` tokens per side (None: any) that its codes cannot cover."""


__all__ = ["CodeLayout", "Quantizer", "QuantizerOutput", "channels_last_rows", "code_use"]
