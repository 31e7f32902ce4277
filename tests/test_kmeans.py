"""Offline k-means: exact Lloyd iterations, sound seeding, empty clusters re-seeded, identical across ranks."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stage1.model.kmeans import fit_kmeans, seed_kmeans_pp


def reference_lloyd(samples: torch.Tensor, centroids: torch.Tensor, iters: int) -> torch.Tensor:
    """Textbook Lloyd in float64 with a dense distance matrix (no cluster may empty on the test data)."""
    x, c = samples.double(), centroids.double().clone()
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(dim=1)
        for j in range(c.shape[0]):
            members = x[assign == j]
            assert len(members), "the reference does not re-seed; pick data without empty clusters"
            c[j] = members.mean(0)
    return c.float()


def blobs(n_per: int, k: int, d: int, seed: int = 0, spread: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 3
    return (centres.repeat_interleave(n_per, 0) + spread * torch.randn(k * n_per, d, generator=g))[
        torch.randperm(k * n_per, generator=g)]


def test_fit_equals_a_reference_lloyd_from_the_same_seeds():
    samples = blobs(60, 12, 5)
    seeds = fit_kmeans(samples, 16, iters=0, seed=3).centroids
    result = fit_kmeans(samples, 16, iters=8, seed=3, max_distances=16 * 7)  # chunked search, ragged last chunk
    assert torch.allclose(result.centroids, reference_lloyd(samples, seeds, 8), atol=1e-5)
    assert result.counts.sum().item() == samples.shape[0]
    assert len(result.distortion) == 9
    steps = zip(result.distortion, result.distortion[1:], strict=False)
    assert all(b <= a + 1e-6 for a, b in steps)  # a Lloyd step never raises the distortion


def test_seeding_finds_well_separated_clusters():
    """D^2 seeding puts one seed in each of k far-apart blobs (uniform seeding usually misses some)."""
    samples = blobs(50, 10, 8, spread=0.05)
    seeds = seed_kmeans_pp(samples, 10, torch.Generator().manual_seed(0), rounds=10)
    nearest_seed = torch.cdist(samples, seeds).argmin(dim=1)
    assert nearest_seed.unique().numel() == 10
    result = fit_kmeans(samples, 10, iters=5, seed=0)
    assert result.distortion[-1] < 0.05**2 * 8 * 1.2  # the within-blob variance: every blob found


def test_an_empty_cluster_is_reseeded_with_the_farthest_sample(monkeypatch):
    from stage1.model import kmeans

    samples = torch.cat([torch.zeros(20, 2), torch.ones(20, 2) * 10, torch.tensor([[100.0, 100.0]])])
    # Seeds where two coincide: one of them gets no sample in the first assignment.
    monkeypatch.setattr(kmeans, "seed_kmeans_pp", lambda *a, **k: torch.tensor([[0.0, 0.0], [0.0, 0.0], [10.0, 10.0]]))
    result = fit_kmeans(samples, 3, iters=3)
    assert result.reseeded == 1
    # The outlier, farthest from every centroid, became its own cluster: no code wasted, distortion gone.
    assert torch.equal(result.centroids[result.counts == 1], torch.tensor([[100.0, 100.0]]))
    assert sorted(result.counts.tolist()) == [1, 20, 20] and result.distortion[-1] == 0.0


def test_too_few_samples_is_a_clear_error():
    with pytest.raises(ValueError, match="at least as many samples as clusters: 5 samples for 8 clusters"):
        fit_kmeans(torch.randn(5, 3), 8)


def _fit_rank(rank, world, init_file, out_dir, samples):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    shard = samples[rank::world]
    seeds = fit_kmeans(shard, 16, iters=0, seed=7).centroids
    result = fit_kmeans(shard, 16, iters=6, seed=7)
    torch.save({"seeds": seeds, "centroids": result.centroids, "counts": result.counts},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow  # spawns processes (torchrun / mp.spawn / a killed writer)
def test_two_ranks_fit_identical_centroids_equal_to_lloyd_on_all_samples(tmp_path):
    samples = blobs(40, 12, 4, seed=1)
    mp.spawn(_fit_rank, args=(2, str(tmp_path / "init"), str(tmp_path), samples), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    # Sums and counts are all-reduced: the fit is Lloyd on the union of the shards.
    assert torch.allclose(rank0["centroids"], reference_lloyd(samples, rank0["seeds"], 6), atol=1e-5)
    assert rank0["counts"].sum().item() == samples.shape[0]
