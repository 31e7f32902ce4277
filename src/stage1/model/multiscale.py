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

import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import QuantizerConfig
from .kmeans import KMeansResult
from .quantizer_kinds import combine_losses, single_codebook

FIT_ROUNDS = 2  # a shared codebook's offline fit: on the scales' features, then once more on the residuals it leaves
PHI_RATIO = 0.5  # VAR's quant_resi: phi(h) = (1 - ratio) h + ratio conv(h)


def area(maps: torch.Tensor, side: int) -> torch.Tensor:
    """(B, C, S, S) -> (B, C, side, side), averages of the cells (VAR's area downsampling); the same map at S."""
    return maps if maps.shape[-1] == side else F.interpolate(maps, size=(side, side), mode="area")


def bicubic(maps: torch.Tensor, side: int) -> torch.Tensor:
    """(B, C, s, s) -> (B, C, side, side), VAR's upsampling; the same map at side."""
    return maps if maps.shape[-1] == side else F.interpolate(maps, size=(side, side), mode="bicubic")


def to_maps(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """(B, side * side, C) raster tokens -> (B, C, side, side)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


def to_tokens(maps: torch.Tensor) -> torch.Tensor:
    """(B, C, s, s) -> (B, s * s, C) in raster order."""
    return maps.flatten(2).transpose(1, 2)


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


def phi_of_scales(scales: int, convs: int) -> list[int]:
    """Which of `convs` phi convolutions serves each of `scales` scales: VAR's PhiPartiallyShared, scale k at
    k / (scales - 1) in [0, 1] taking the convolution whose tick is nearest (1: all share one; scales: one each).
    numpy's linspace and argmin as VAR's, whose float ties (VAR's 10 scales: 2/9 is as near 1/12 as 13/36) they
    break."""
    ticks = np.linspace(1 / 3 / convs, 1 - 1 / 3 / convs, convs) if convs == 4 else \
        np.linspace(1 / 2 / convs, 1 - 1 / 2 / convs, convs)
    return [int(np.argmin(np.abs(ticks - k / max(scales - 1, 1)))) for k in range(scales)]


class MultiScaleQuantizer(nn.Module):
    index_suffix: tuple[int, ...] = ()  # indices are (B, L): no grid, no codebook axis
    whole_grids = True  # fits on whole grids of tokens (stage1.train.codebook_fit), not on tokens drawn from them

    def __init__(self, config: QuantizerConfig, embedding_dim: int):
        super().__init__()
        self.scales = tuple(config.scales)
        self.levels = nn.ModuleList(single_codebook(config, embedding_dim)
                                    for _ in range(1 if config.shared_codebook else len(self.scales)))
        self.num_embeddings, self.embedding_dim = config.num_embeddings, embedding_dim
        self.commitment_cost = config.commitment_cost
        self.lengths = [side * side for side in self.scales]  # codes per scale
        self.ends = list(itertools.accumulate(self.lengths))  # flat codes after each scale: where a prefix may end
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

    def codebook(self, k: int):
        """The codebook (a VectorQuantizer) of scale k."""
        return self.levels[0 if self.shared else k]

    def split(self, indices: torch.Tensor) -> list[torch.Tensor]:
        """Flat (B, L') indices of the first scales -> their maps [(B, 1, 1), (B, 2, 2), ...]; L' must end a scale."""
        scales = self.scales_in(indices.shape[-1])
        parts = indices.split(self.lengths[:scales], dim=-1)
        return [part.reshape(*indices.shape[:-1], side, side) for part, side in zip(parts, self.scales, strict=False)]

    def scales_in(self, length: int) -> int:
        """How many scales `length` flat codes hold: a prefix of whole scales, or ValueError."""
        if length not in self.ends:
            raise ValueError(f"{length} codes are not whole scales of {list(self.scales)}: a prefix has "
                             f"{', '.join(map(str, self.ends))} codes")
        return self.ends.index(length) + 1

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

    # ---- training: EMA updates, losses ------------------------------------------------------------------------
    def forward(self, z: torch.Tensor):
        """(B, S * S, C) tokens -> (z_q: the sum of the scales' upsampled codes, straight-through; losses; (B, L))."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            features = rest = self._maps(z.detach())
            total = torch.zeros_like(rest)
            level_losses, indices, residuals, prefix_errors = [], [], [], []
            for k, side in enumerate(self.scales):
                r = to_tokens(area(rest, side))
                level = self.codebook(k)
                if self.shared:  # one EMA update below, over every scale's residuals
                    idx = level.encode(r)
                    q = level.lookup(idx) if bool(level.initialized) else torch.zeros_like(r)
                    residuals.append(r)
                else:
                    level.gathers = k == 0 or bool(self.levels[k - 1].initialized)
                    q, losses, idx = level(r)
                    level_losses.append(losses)
                h = self.upsample(k, to_maps(q.detach().float(), side))  # phi's gradient flows from here
                total, rest = total + h, rest - h.detach()
                indices.append(idx)
                if self.phi is not None:
                    prefix_errors.append(F.mse_loss(total, features))
            if self.shared:
                started = bool(self.levels[0].initialized)
                level_losses.append(self.levels[0](torch.cat(residuals, dim=1))[1])
                if self.training:  # the codebook moved (a start on the first batches is a fit)
                    self._pin_zero(fitted=not started)
            total = to_tokens(total)
            commitment = F.mse_loss(z.float(), total.detach())  # phi learns from phi_loss and the decoder (VAR's)
            z_q = total + (z.float() - z.float().detach())  # forward: exactly the sum; gradient: identity
            losses = combine_losses(level_losses, commitment, self.commitment_cost)
            if self.phi is not None:  # VAR's term for phi: every prefix's f_hat near the features
                losses["phi_loss"] = torch.stack(prefix_errors).mean()
                losses["vq_loss"] = losses["vq_loss"] + losses["phi_loss"]
        return z_q.to(z.dtype), losses, torch.cat(indices, 1)

    @torch.no_grad()
    def _pin_zero(self, fitted: bool = False) -> None:
        """A shared codebook's code 0 back at zero after its EMA update or restarts (its hits still count); after a
        fit, the code nearest zero becomes code 0 first, so that no fitted code is lost to the pin."""
        level = self.levels[0]
        if not bool(level.initialized):
            return
        if fitted:
            nearest = int(level.embedding.norm(dim=1).argmin())
            for name in ("embedding", "ema_embed_sum", "ema_cluster_size", "tokens_since_hit"):
                rows = getattr(level, name)
                rows[[0, nearest]] = rows[[nearest, 0]].clone()
        level.embedding[0] = 0
        level.ema_embed_sum[0] = 0

    # ---- codes ------------------------------------------------------------------------------------------------
    def _subtract_codes(self, rest: torch.Tensor, k: int, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One greedy step: the codes of scale k's residual tokens r (B, s * s, C), and rest (B, C, S, S) without
        their upsampled vectors."""
        idx = self.codebook(k).encode(r)
        return idx, rest - self.upsample(k, to_maps(self.codebook(k).lookup(idx), self.scales[k]))

    def _greedy(self, maps: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every scale's residual tokens (B, s * s, C) and codes (B, s * s) under the codebooks as they are."""
        rest, residuals, indices = maps, [], []
        for k, side in enumerate(self.scales):
            residuals.append(to_tokens(area(rest, side)))
            idx, rest = self._subtract_codes(rest, k, residuals[-1])
            indices.append(idx)
        return residuals, indices

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, S * S, C) tokens -> (B, L) codes, never updating a codebook."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            return torch.cat(self._greedy(self._maps(z))[1], 1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, L') codes of the first scales -> (B, S * S, C): the sum of their upsampled vectors."""
        total = None
        for k, (maps, side) in enumerate(zip(self.split(indices), self.scales, strict=False)):
            h = self.upsample(k, to_maps(self.codebook(k).lookup(maps.flatten(1)), side))
            total = h if total is None else total + h
        return to_tokens(total)

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
            rest, results = maps, []
            for k, (side, level) in enumerate(zip(self.scales, self.levels, strict=True)):
                r = to_tokens(area(rest, side))  # (grids, side * side, C)
                if r.shape[0] * side * side < self.num_embeddings:  # coarse scales: one token per grid at 1 x 1
                    raise ValueError(f"the multi-scale fit has {r.shape[0] * side * side} tokens at scale {side}x"
                                     f"{side} for the {self.num_embeddings} codes of its own codebook: fit whole "
                                     f"grids of at least {-(-self.num_embeddings // (side * side))} images "
                                     f"(codebook_fit.images), or share one codebook (quantizer.shared_codebook=true)")
                results += level.fit(r.reshape(-1, self.embedding_dim), iters, per_update * side * side, seed + k)
                _, rest = self._subtract_codes(rest, k, r)
            return results
        level, residuals = self.levels[0], [to_tokens(area(maps, side)) for side in self.scales]
        for round_ in range(FIT_ROUNDS):
            if round_:  # the residuals the codebook of the round before leaves
                residuals = self._greedy(maps)[0]
            results = level.fit(torch.cat(residuals, 1).reshape(-1, self.embedding_dim), iters,
                                per_update * self.length, seed + round_)
            self._pin_zero(fitted=True)
        return results


def default_scales(side: int) -> list[int]:
    """VAR's schedule for a 16 x 16 grid (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), scaled to another side."""
    var = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    return sorted({max(1, min(side, math.ceil(s * side / 16))) for s in var} | {side})


__all__ = ["MultiScaleQuantizer", "area", "bicubic", "default_scales"]
