"""Fit a model's codebook to real latents before training: k-means over tokens sampled from many images.

The encoder is frozen, so the latents a codebook must cover are known before the first step. A first batch
holds a few tokens per code; this stage streams `images` images (split over ranks), keeps `tokens_per_image`
random tokens of each, and runs stage1.model.kmeans.fit_kmeans over all of them on every rank together.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from tqdm import tqdm

from ..base.distributed import all_reduce_sum
from ..model.kmeans import KMeansResult


def encode_batches(model, batches: Iterable[torch.Tensor], precision_context=None) -> Iterator[torch.Tensor]:
    """Each batch of images as its (B, N, D) latent tokens, as the quantizer sees them (normalised)."""
    for images in batches:
        with torch.no_grad(), precision_context or nullcontext():
            yield model.encode_tokens(images)[0]


@torch.no_grad()
def sample_latents(token_batches: Iterable[torch.Tensor], tokens_per_image: int, generator: torch.Generator,
                   show_progress: bool = True, whole_grids: bool = False) -> torch.Tensor:
    """Up to `tokens_per_image` random tokens of each image's (N, D) latents. whole_grids (a quantizer that fits on
    grids, Quantizer.fits_whole_grids): every token of a random share tokens_per_image / N of the images instead, the
    same number of tokens in all, grid after grid."""
    rows = []
    for tokens in tqdm(token_batches, desc="latents for the codebook fit", unit="batch", disable=not show_progress):
        if whole_grids:
            kept = torch.rand(tokens.shape[0], generator=generator) < tokens_per_image / tokens.shape[1]
            rows.append(tokens.float()[kept.to(tokens.device)].flatten(0, 1))
            continue
        take = min(tokens_per_image, tokens.shape[1])
        picks = torch.rand(tokens.shape[:2], generator=generator).argsort(dim=1)[:, :take].to(tokens.device)
        rows.append(tokens.float().gather(1, picks.unsqueeze(-1).expand(-1, -1, tokens.shape[2])).flatten(0, 1))
    return torch.cat(rows)


@dataclass
class CodebookFit:
    tokens: int  # latent tokens fitted, over all ranks
    distortion: float  # the fitted quantizer's mean squared error per token on them (its own space: cosine too)
    codes_used: int  # codes (over all codebooks) with at least one token in the last assignment
    reseeded: int  # empty clusters re-seeded during the fits
    results: list[KMeansResult]  # one per codebook (residual levels in order, groups in order)


@torch.no_grad()
def quantizer_distortion(quantizer, latents: torch.Tensor, rows: int = 65536) -> float:
    """Squared error per token (summed over channels, averaged over tokens) of `quantizer` on latents (M, D),
    over all ranks, without updating it (latents of whole grids, one after the other, for a quantizer that fits
    on grids)."""
    was_training = quantizer.training
    quantizer.eval()
    grid = quantizer.layout.scales[-1] ** 2 if quantizer.fits_whole_grids else 1
    rows = max(grid, rows // grid * grid)
    try:
        spent = torch.zeros(1, dtype=torch.float64, device=latents.device)
        for start in range(0, latents.shape[0], rows):
            chunk = latents[start : start + rows]
            batch = chunk.reshape(-1, grid, chunk.shape[1]) if grid > 1 else chunk.unsqueeze(0)
            spent += quantizer(batch).commitment.double() * chunk.numel()
    finally:
        quantizer.train(was_training)
    count = torch.tensor([float(latents.shape[0])], dtype=torch.float64, device=latents.device)
    all_reduce_sum(spent, count)
    return float(spent / count)


def fit_codebook(model, token_batches: Iterable[torch.Tensor], tokens_per_image: int, iters: int,
                 tokens_per_update: int, seed: int = 0, show_progress: bool = True,
                 more: str = "codebook_fit.images or codebook_fit.tokens_per_image") -> CodebookFit:
    """Fit model.quantizer's codebooks by k-means of sampled latents (all ranks together; residual levels on what
    the levels before them leave, groups on their channels) and start the EMA there, with cluster sizes in hits
    per update (`tokens_per_update`: tokens one training forward quantizes, summed over ranks), so the EMA goes on
    from the fit as if it had been running on this distribution. `token_batches`: (B, N, D) latents of images
    (encode_batches), drawn in eval mode when they are encoded as they are drawn."""
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        latents = sample_latents(token_batches, tokens_per_image, generator, show_progress,
                                 whole_grids=model.quantizer.fits_whole_grids)
    finally:
        model.train(was_training)
    total = torch.tensor([float(latents.shape[0])], device=latents.device)
    all_reduce_sum(total)
    needed = model.quantizer.min_fit_tokens
    if total.item() < needed:
        raise ValueError(f"the codebook fit sampled {int(total.item())} tokens {model.quantizer.fit_tokens_for}: raise "
                         f"{more} (at least {needed} tokens)")
    results = model.quantizer.fit(latents, iters, tokens_per_update, seed)
    return CodebookFit(
        tokens=int(total.item()),
        distortion=quantizer_distortion(model.quantizer, latents),
        codes_used=sum(int((r.counts > 0).sum()) for r in results),
        reseeded=sum(r.reseeded for r in results),
        results=results,
    )
