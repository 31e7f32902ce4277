"""Multi-scale residual quantization (VAR's tokenizer scheme, FoundationVision/VAR models/quant.py) on frozen features:
the codes of next-scale prediction.

At scales s_1 < ... < s_K = S, the grid's side, the residual feature map is area-downsampled to s_k x s_k,
quantized, upsampled back to S x S (bicubic, as VAR; the last scale is not resampled) and subtracted; the decoder
sees the sum of the K upsampled maps. VAR's scales 1, 2, 3, 4, 5, 6, 8, 10, 13, 16 give 680 codes per 16 x 16 grid.

    f = features (B, C, S, S);  rest = f;  f_hat = 0
    for s in scales:  r = area(rest, s);  q = codes of r;  h = phi(bicubic(q, S));  f_hat += h;  rest -= h

phi (quantizer.phi convolutions, optional): VAR's refinement of each upsampled map, h -> (1 - 0.5) h + 0.5 conv(h)
with a 3x3 convolution, trained by gradient with the decoder: the decoder's loss, and VAR's phi_loss (in vq_loss),
the mean over scales k of ||f_hat after scale k - f||^2, which keeps every prefix near the features; with 4
convolutions (VAR's) each serves the scales nearest its place in the schedule. Phi is codes-side state, like the
codebooks: the decoder's EMA copy never averages it. Ours start as the identity, so a fresh phi changes no code and
no value (in fp32; on CUDA up to cuDNN's TF32 rounding, see Phi) and the offline fits hold; VAR's start random,
as its whole tokenizer is trained from scratch.

Codebooks: one per scale, or one shared by every scale (quantizer.shared_codebook, VAR's). Each is an EMA
VectorQuantizer, so exact fp32 search, fp32 statistics, restarts and identical codebooks on every rank hold as for
the other kinds. A shared codebook takes one EMA update per step, over the residuals of every scale, and its code 0
is pinned at the zero vector: the coarse scales' residuals are small beside the codes the fine ones need, and
without a code near zero each greedy step adds more error than it removes (the distortion grew with every
scale and diverged over fit rounds: benchmarks/multiscale_quality.py). A codebook per scale has its own near-zero
codes. Without an
offline fit the codebooks start on the first batches: a shared one on the area-downsampled features of every
scale, a per-scale one on its scale's residuals once the scales before it have started.

Indices: VAR's flat layout (B, L), each scale's s x s map in raster order after the coarser ones; any prefix of
whole scales decodes (a coarse-to-fine preview).
"""

from __future__ import annotations

from collections import deque
from functools import cached_property
from typing import TYPE_CHECKING, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ...base.limits import MAX_IMAGE_SIDE, MAX_LEVELS
from ..kmeans import KMeansResult
from .base import CodeLayout, Quantizer, QuantizerOutput
from .levels import Levels, single_codebook
from .scales import area, bicubic, default_scales, phi_of_scales, serving_phi_counts, to_maps, to_tokens

if TYPE_CHECKING:
    from ..config import QuantizerConfig

FIT_ROUNDS = 2  # a shared codebook's offline fit: on the scales' features, then once more on the residuals it leaves
PHI_RATIO = 0.5  # VAR's quant_resi: phi(h) = (1 - ratio) h + ratio conv(h)
# One scale's step of the walk: (k, its residual tokens r (B, s * s, C)) -> (their codes, the codes' vectors).
QuantizeScale = Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class Phi(nn.Conv2d):
    """VAR's phi (models/quant.py Phi): h -> (1 - PHI_RATIO) h + PHI_RATIO conv3x3(h), starting as the identity.
    Its bias, VAR's, is a constant map added at every scale, so with phi a shared codebook's pinned code 0 adds
    0.5 bias rather than nothing."""

    def __init__(self, channels: int):
        super().__init__(channels, channels, kernel_size=3, padding=1)
        with torch.no_grad():  # a centred delta kernel and no bias: conv(h) = h
            self.weight.zero_()
            self.weight[range(channels), range(channels), 1, 1] = 1.0
            self.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # fp32 as the rest of the quantizer, whatever the caller's autocast (decoding runs under bf16). On CUDA,
        # cuDNN may use TF32 here, PyTorch's default and VAR's: torch.backends.cudnn.allow_tf32 = False for full
        # fp32, without tensor cores (a C x C x 3 x 3 convolution on the whole grid per scale and image).
        with torch.autocast(device_type=h.device.type, enabled=False):
            h = h.float()
            return h * (1 - PHI_RATIO) + super().forward(h) * PHI_RATIO


class MultiScaleQuantizer(Levels, Quantizer):
    kind = "multiscale"
    options = ("scales", "shared_codebook", "phi")

    @classmethod
    def state_elements(cls, config: QuantizerConfig, dim: int) -> int:
        books = 1 if config.shared_codebook else len(config.scales)
        return books * config.num_embeddings * dim + config.phi * 9 * dim * dim  # codebooks, phi's 3x3 convolutions
    fits_whole_grids = True  # fits on whole grids of tokens (stage1.train.codebook_fit), not on tokens drawn from them

    @classmethod
    def check_options(cls, config: QuantizerConfig) -> None:
        scales = config.scales
        config.require(len(scales) >= 1 and all(0 < a < b for a, b in zip(scales, scales[1:], strict=False))
                       and 0 < scales[0] and scales[-1] <= MAX_IMAGE_SIDE and len(scales) <= MAX_LEVELS,
                       "scales", f"increasing positive sides, at most {MAX_LEVELS} of them, the last the grid's side")
        config.require(0 <= config.phi <= len(scales), "phi", f"0, or at most one per scale ({len(scales)})")
        if config.phi:  # VAR's rule gives each scale the convolution of the nearest tick: some counts leave one idle
            serving = serving_phi_counts(len(scales))  # (an idle parameter stops DDP)
            config.require(config.phi in serving, "phi", f"a count whose every convolution serves a scale under "
                           f"VAR's rule; for {len(scales)} scales: {serving}")

    def __init__(self, config: QuantizerConfig, embedding_dim: int):
        super().__init__()
        self.scales = tuple(config.scales)
        self.levels = nn.ModuleList(single_codebook(config, embedding_dim)
                                    for _ in range(1 if config.shared_codebook else len(self.scales)))
        self.num_embeddings, self.embedding_dim = config.num_embeddings, embedding_dim
        self.commitment_cost = config.commitment_cost
        self.lengths = [side * side for side in self.scales]  # codes per scale
        self.side = self.scales[-1]
        self.phi = nn.ModuleList(Phi(embedding_dim) for _ in range(config.phi)) if config.phi else None
        self.phi_index = phi_of_scales(len(self.scales), config.phi) if config.phi else None

    @property
    def shared(self) -> bool:
        return len(self.levels) == 1

    @property
    def length(self) -> int:
        """Codes per image, L (680 for VAR's scales)."""
        return sum(self.lengths)

    @cached_property
    def layout(self) -> CodeLayout:
        codebooks = (0,) * len(self.scales) if self.shared else tuple(range(len(self.scales)))
        return CodeLayout(self.num_embeddings, scales=self.scales, codebooks=codebooks)

    def describe(self) -> str:
        books = "one shared codebook" if self.shared else "a codebook per scale"
        phi = f", {len(self.phi)} phi convolutions" if self.phi is not None else ""
        return f"multi-scale (VAR), scales {list(self.scales)}, {books} of {self.num_embeddings} codes{phi}"

    def trained_parameters(self) -> list[dict]:
        """Phi, without weight decay: it would pull phi from the identity towards 0.5 h."""
        return [] if self.phi is None else [{"params": list(self.phi.parameters()), "weight_decay": 0.0}]

    def check_grid(self, side: int | None) -> None:
        if side != self.side:
            raise ValueError(f"quantizer.scales end at {self.side}, but the encoder's grid side is "
                             f"{side or 'not fixed'}: the last scale must be the grid's side, e.g. quantizer.scales="
                             f"{default_scales(side or self.side)}")

    def codebook(self, k: int):
        """The codebook (a VectorQuantizer) of scale k."""
        return self.levels[0 if self.shared else k]

    def upsample(self, k: int, maps: torch.Tensor) -> torch.Tensor:
        """Scale k's code vectors (B, C, s, s) as they add into f_hat (B, C, S, S): bicubic to the grid, then phi."""
        h = bicubic(maps, self.side)
        return h if self.phi is None else self.phi[self.phi_index[k]](h)

    def _maps(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 3 or z.shape[1] != self.side * self.side or z.shape[2] != self.embedding_dim:
            raise ValueError(f"the multi-scale quantizer takes grids of {self.side} x {self.side} tokens of "
                             f"{self.embedding_dim} channels (B, {self.side * self.side}, {self.embedding_dim}), "
                             f"got shape {tuple(z.shape)}: its last scale must be the grid's side")
        return to_maps(z.float(), self.side)

    # ---- the walk over the scales, written once ---------------------------------------------------------------
    def _walk(self, maps: torch.Tensor, quantize: QuantizeScale) -> Iterator[tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]]:
        """VAR's residual walk: at scale k the rest of the features (B, C, S, S), area-downsampled to the scale's
        s x s tokens r, is quantized by quantize(k, r) -> (codes, their vectors); the vectors, upsampled and refined
        by phi, add into f_hat and leave the rest. Yields each scale's (r, codes, f_hat after it), f_hat with phi's
        gradient: a caller keeps what it needs (an f_hat is a grid-sized map; a fit's holds thousands of grids)."""
        rest, f_hat = maps, None
        for k, side in enumerate(self.scales):
            r = to_tokens(area(rest, side))
            codes, vectors = quantize(k, r)
            h = self.upsample(k, to_maps(vectors.detach().float(), side))  # phi's gradient flows from here
            f_hat, rest = h if f_hat is None else f_hat + h, rest - h.detach()
            yield r, codes, f_hat

    def _nearest(self, k: int, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One scale's greedy step under the codebooks as they are."""
        codes = self.codebook(k).encode(r)
        return codes, self.codebook(k).lookup(codes)

    def prefix_sums(self, indices: torch.Tensor) -> Iterator[torch.Tensor]:
        """(B, L') codes of the first scales -> f_hat (B, C, S, S) after each of them (VAR's teacher forcing)."""
        f_hat = None
        for k, (maps, side) in enumerate(zip(self.layout.split(indices), self.scales, strict=False)):
            h = self.upsample(k, to_maps(self.codebook(k).lookup(maps.flatten(1)).float(), side))
            f_hat = h if f_hat is None else f_hat + h
            yield f_hat

    # ---- training: EMA updates, losses ------------------------------------------------------------------------
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """(B, S * S, C) tokens -> z_q (the sum of the scales' upsampled codes, straight-through) and (B, L) codes."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            features = self._maps(z.detach())
            outputs = []

            def quantize(k: int, r: torch.Tensor):
                level = self.codebook(k)
                if self.shared:  # one EMA update below, over every scale's residuals
                    codes = level.encode(r)
                    return codes, level.lookup(codes) if level.started else torch.zeros_like(r)
                outputs.append(level(r, may_start=k == 0 or self.levels[k - 1].started))
                return outputs[-1].indices, outputs[-1].z_q

            residuals, codes, prefix_errors = [], [], []
            for r, idx, f_hat in self._walk(features, quantize):
                if self.shared:
                    residuals.append(r)
                codes.append(idx)
                if self.phi is not None:  # VAR's term for phi: every prefix's f_hat near the features
                    prefix_errors.append(F.mse_loss(f_hat, features))
            if self.shared:
                started = self.levels[0].started
                outputs.append(self.levels[0](torch.cat(residuals, dim=1)))
                if self.training:  # the codebook moved (a start on the first batches is a fit)
                    self._pin_zero(fitted=not started)
            total = to_tokens(f_hat)
            commitment = F.mse_loss(z.float(), total.detach())  # phi learns from phi_loss and the decoder (VAR's)
            z_q = total + (z.float() - z.float().detach())  # forward: exactly the sum; gradient: identity
            out = QuantizerOutput.of_codebooks(z_q.to(z.dtype), torch.cat(codes, 1), commitment, self.commitment_cost,
                                               outputs)
            if self.phi is not None:
                out.extra["phi_loss"] = torch.stack(prefix_errors).mean()
                out.loss = out.loss + out.extra["phi_loss"]
        return out

    @torch.no_grad()
    def _pin_zero(self, fitted: bool = False) -> None:
        """A shared codebook's code 0 back at zero after its EMA update or restarts (its hits still count); after a
        fit, the code nearest zero becomes code 0 first, so that no fitted code is lost to the pin."""
        level = self.levels[0]
        if not level.started:
            return
        if fitted:
            nearest = int(level.embedding.norm(dim=1).argmin())
            for name in ("embedding", "ema_embed_sum", "ema_cluster_size", "tokens_since_hit"):
                rows = getattr(level, name)
                rows[[0, nearest]] = rows[[nearest, 0]].clone()
        level.embedding[0] = 0
        level.ema_embed_sum[0] = 0

    # ---- codes ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, S * S, C) tokens -> (B, L) codes, never updating a codebook."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            return torch.cat([codes for _, codes, _ in self._walk(self._maps(z), self._nearest)], 1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, L') codes of the first scales -> (B, S * S, C): the sum of their upsampled vectors."""
        return to_tokens(deque(self.prefix_sums(indices), maxlen=1)[0])

    # ---- offline fit ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def fit(self, samples: torch.Tensor, iters: int, tokens_per_update: float, seed: int = 0) -> list[KMeansResult]:
        """k-means on whole grids: `samples` (M, C) are M / (S * S) grids of tokens, one after the other
        (codebook_fit keeps whole grids for this kind). Per-scale codebooks are fitted scale by scale, each on the
        residuals the fitted scales before it leave; a shared one on every scale's area-downsampled features, then
        (FIT_ROUNDS) refitted on the residuals of every scale it leaves. Cluster sizes are in hits per update of
        `tokens_per_update` tokens of the grid, i.e. tokens_per_update * L / (S * S) codes for a shared codebook."""
        n = self.side * self.side
        if samples.dim() != 2 or samples.shape[0] % n:
            raise ValueError(f"the multi-scale fit takes whole grids of {n} tokens, got {tuple(samples.shape)}")
        maps = to_maps(samples.float().reshape(-1, n, self.embedding_dim), self.side)
        per_update = tokens_per_update / n  # grids per update
        if not self.shared:
            results = []

            def fit_then_quantize(k: int, r: torch.Tensor):
                side = self.scales[k]
                if r.shape[0] * side * side < self.num_embeddings:  # coarse scales: one token per grid at 1 x 1
                    raise ValueError(f"the multi-scale fit has {r.shape[0] * side * side} tokens at scale {side}x"
                                     f"{side} for the {self.num_embeddings} codes of its own codebook: fit whole "
                                     f"grids of at least {-(-self.num_embeddings // (side * side))} images "
                                     f"(codebook_fit.images), or share one codebook (quantizer.shared_codebook=true)")
                results.extend(self.levels[k].fit(r.reshape(-1, self.embedding_dim), iters, per_update * side * side,
                                                  seed + k))
                return self._nearest(k, r)

            for _ in self._walk(maps, fit_then_quantize):  # each scale fitted before the next one's residuals
                pass
            return results
        level, residuals = self.levels[0], [to_tokens(area(maps, side)) for side in self.scales]
        for round_ in range(FIT_ROUNDS):
            if round_:  # the residuals the codebook of the round before leaves
                residuals = [r for r, _, _ in self._walk(maps, self._nearest)]
            results = level.fit(torch.cat(residuals, 1).reshape(-1, self.embedding_dim), iters,
                                per_update * self.length, seed + round_)
            self._pin_zero(fitted=True)
        return results


__all__ = ["MultiScaleQuantizer", "Phi"]
