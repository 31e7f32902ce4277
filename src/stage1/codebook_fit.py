"""Fit a model's codebook to real latents before training: k-means over tokens sampled from many images.

The encoder is frozen, so the latents a codebook must cover are known before the first step. A first batch
holds a few tokens per code; this stage streams `images` images (split over ranks), keeps `tokens_per_image`
random tokens of each, and runs stage1.kmeans.fit_kmeans over all of them on every rank together.
"""

from __future__ import annotations

from typing import Iterable

import torch
from tqdm import tqdm

from .distributed import all_reduce_sum
from .kmeans import KMeansResult, fit_kmeans


@torch.no_grad()
def sample_latents(model, batches: Iterable[torch.Tensor], tokens_per_image: int, generator: torch.Generator,
                   precision_context=None, show_progress: bool = True) -> tuple[torch.Tensor, int]:
    """Up to `tokens_per_image` random latent tokens of each image, as the quantizer sees them (normalised), and
    the number of tokens per image."""
    from contextlib import nullcontext

    rows, per_image = [], 0
    for images in tqdm(batches, desc="latents for the codebook fit", unit="batch", disable=not show_progress):
        with precision_context or nullcontext():
            tokens, _ = model.encode_tokens(images)
        per_image = tokens.shape[1]
        take = min(tokens_per_image, per_image)
        picks = torch.rand(tokens.shape[:2], generator=generator).argsort(dim=1)[:, :take].to(tokens.device)
        rows.append(tokens.float().gather(1, picks.unsqueeze(-1).expand(-1, -1, tokens.shape[2])).flatten(0, 1))
    return torch.cat(rows), per_image


def fit_codebook(model, batches: Iterable[torch.Tensor], tokens_per_image: int, iters: int, tokens_per_update: int,
                 seed: int = 0, precision_context=None, show_progress: bool = True) -> KMeansResult:
    """Fit model.quantizer's codebook by k-means of sampled latents (all ranks together) and start its EMA there,
    with cluster sizes in hits per update (`tokens_per_update`: tokens one training forward quantizes, summed
    over ranks), so the EMA continues from the fit as if it had been running on this distribution."""
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        latents, _ = sample_latents(model, batches, tokens_per_image, generator, precision_context, show_progress)
    finally:
        model.train(was_training)
    total = torch.tensor([float(latents.shape[0])], device=latents.device)
    all_reduce_sum(total)
    quantizer = model.quantizer
    k = quantizer.num_embeddings
    if total.item() < k:
        raise ValueError(f"the codebook fit sampled {int(total.item())} tokens for {k} codes: raise "
                         f"codebook_fit.images or codebook_fit.tokens_per_image (at least one token per code)")
    result = fit_kmeans(latents, k, iters=iters, seed=seed, max_distances=quantizer.max_distances_per_chunk)
    quantizer.set_codebook(result.centroids, result.counts * (tokens_per_update / total.item()))
    return result
