"""Exact k-means (Lloyd) over latent tokens, in one process or across torchrun ranks.

The encoder is frozen, so the distribution a codebook must cover never changes: fitting the codebook is k-means
on a fixed distribution. Each rank holds its own samples; every step that needs all of them is a collective, so
all ranks end with the same centroids:

    seeding      k-means++ on a pool gathered from every rank (the same pool, the same seed, the same centres on
                 every rank), in `seed_rounds` rounds: each round draws its share of centres with probability
                 proportional to D^2 (the squared distance to the nearest centre so far), then updates D^2 with one
                 GEMM against the new centres (k-means|| style, so K sequential steps become a few GEMMs)
    Lloyd        assign every sample to its nearest centroid (exact, chunked: stage1.model.search.nearest_code), then
                 move each centroid to the mean of its samples; counts and sums are all-reduced
    empty        a cluster left empty is re-seeded with the sample farthest from its centroid, over all ranks
                 (each empty cluster a different sample): it then takes that sample's distortion away

Everything runs in fp32 (sums in fp64), whatever the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base.codebook_start import LLOYD_ITERS
from ..base.distributed import all_reduce_sum, broadcast_from_main, gather_rows, world_size
from .search import DEFAULT_MAX_DISTANCES_PER_CHUNK, nearest_code


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # (K, D) fp32
    counts: torch.Tensor  # (K,) samples per cluster in the last assignment, over all ranks
    distortion: list[float]  # mean squared distance to the nearest centroid: after seeding, then after each update
    reseeded: int  # empty clusters re-seeded over the whole fit


def assign(samples: torch.Tensor, centroids: torch.Tensor, max_distances: int = DEFAULT_MAX_DISTANCES_PER_CHUNK):
    """Nearest centroid of every sample and the squared distance to it."""
    indices = nearest_code(samples, centroids, max_distances)
    distances = (samples - centroids[indices]).pow(2).sum(dim=1)
    return indices, distances


def seed_kmeans_pp(pool: torch.Tensor, k: int, generator: torch.Generator, rounds: int = 64,
                   max_distances: int = DEFAULT_MAX_DISTANCES_PER_CHUNK) -> torch.Tensor:
    """k centres from `pool` by D^2 sampling in `rounds` rounds (rounds=k is classic k-means++)."""
    n = pool.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least as many samples as clusters: {n} samples for {k} clusters")
    first = torch.randint(n, (1,), generator=generator).item()
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[first] = True
    centres = [pool[first : first + 1]]
    nearest = (pool - centres[0]).pow(2).sum(dim=1)
    remaining = k - 1
    for r in range(rounds):
        if remaining == 0:
            break
        take = -(-remaining // (rounds - r))  # ceil: spread what is left over the rounds left
        weights = nearest.clamp_min(0).cpu().double()
        weights[chosen] = 0
        if weights.sum() <= 0:  # every sample coincides with a centre: fall back to uniform over the rest
            weights = (~chosen).double()
        picks = torch.multinomial(weights, take, replacement=False, generator=generator)
        chosen[picks] = True
        new = pool[picks.to(pool.device)]
        centres.append(new)
        _, to_new = assign(pool, new, max_distances)
        nearest = torch.minimum(nearest, to_new)
        remaining -= take
    return torch.cat(centres)


def fit_kmeans(samples: torch.Tensor, k: int, iters: int = LLOYD_ITERS, seed: int = 0, pool_size: int | None = None,
               seed_rounds: int = 64, max_distances: int = DEFAULT_MAX_DISTANCES_PER_CHUNK,
               spherical: bool = False, progress=None) -> KMeansResult:
    """k-means of this rank's `samples` (N, D) together with every other rank's. `pool_size`: rows gathered over
    all ranks for seeding (default 16 k, capped by what there is). `spherical`: unit samples, and each centroid
    renormalised after its update (cosine codebooks). `progress`: called with (iteration, distortion) after each
    assignment."""
    if k < 1 or iters < 0:
        raise ValueError(f"k-means needs k >= 1 and iters >= 0, got k={k}, iters={iters}")
    samples = samples.float()
    generator = torch.Generator().manual_seed(seed)
    per_rank = -(-(pool_size or 16 * k) // world_size())
    local = samples[torch.randperm(samples.shape[0], generator=generator)[:per_rank].to(samples.device)]
    centroids = seed_kmeans_pp(gather_rows(local), k, generator, seed_rounds, max_distances)
    centroids = broadcast_from_main(centroids.contiguous())
    distortion, reseeded = [], 0
    for iteration in range(iters + 1):  # iters updates; the last assignment gives the final counts
        indices, distances = assign(samples, centroids, max_distances)
        counts = torch.bincount(indices, minlength=k).double()
        sums = torch.zeros(k, samples.shape[1], dtype=torch.float64, device=samples.device)
        sums.index_add_(0, indices, samples.double())
        spent = distances.double().sum().reshape(1)
        all_reduce_sum(counts, sums, spent)
        distortion.append(float(spent / counts.sum()))  # counts sum to the samples of all ranks
        if progress is not None:
            progress(iteration, distortion[-1])
        if iteration == iters:
            break
        filled = counts > 0
        centroids[filled] = (sums[filled] / counts[filled].unsqueeze(1)).float()
        if spherical:
            centroids = torch.nn.functional.normalize(centroids, dim=1)
        empty = (~filled).nonzero().flatten()
        if len(empty):
            centroids[empty] = _farthest(samples, distances, len(empty))
            reseeded += len(empty)
    return KMeansResult(centroids, counts.float(), distortion, reseeded)


def _farthest(samples: torch.Tensor, distances: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` samples farthest from their centroids over all ranks (ties broken by rank order)."""
    top = distances.topk(min(count, distances.shape[0]))
    rows = torch.cat([top.values.unsqueeze(1), samples[top.indices]], dim=1)
    pooled = gather_rows(rows)
    best = pooled[:, 0].topk(count).indices
    return pooled[best, 1:].contiguous()
