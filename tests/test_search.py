"""The certified bf16 search (stage1.model.search.certified_nearest_code) gives the fp32 search's indices exactly: on
fitted codebooks, where nearly every row is certified, and on adversarial near-ties, where the certificate must fail
and the rows go to the fp32 search. bf16 matmul runs on the CPU too, so the CUDA path is tested here (apart from
CUDA's fp32 GEMM output, which only tightens the bound)."""

import pytest
import torch

from stage1.model.kmeans import fit_kmeans
from stage1.model.search import certified_nearest_code, fp32_nearest_code, nearest_code


def layer_normed(n, dim, seed, rank=12, noise=0.3):
    """Tokens as a frozen encoder emits them: near a low-dimensional subspace, LayerNormed without affine."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, dim, generator=torch.Generator().manual_seed(99))
    x = torch.randn(n, rank, generator=g) @ basis + noise * torch.randn(n, dim, generator=g)
    return torch.nn.functional.layer_norm(x, (dim,))


def naive_bf16(z, codebook):
    return (codebook.bfloat16().float().pow(2).sum(1) - 2 * (z.bfloat16() @ codebook.bfloat16().T).float()).argmin(1)


def test_certified_search_equals_fp32_on_a_fitted_codebook():
    train, z = layer_normed(8192, 64, seed=0), layer_normed(4096, 64, seed=1)
    codebook = fit_kmeans(train, 256, iters=5).centroids
    reference = fp32_nearest_code(z, codebook)
    indices, certified = certified_nearest_code(z, codebook, max_distances=1 << 18)  # several chunks
    assert torch.equal(indices, reference)
    assert certified.float().mean() > 0.9  # the fast path really serves (measured: 0.99)
    assert torch.equal(nearest_code(z, codebook, method="certified"), reference)


def test_certified_search_is_exact_on_adversarial_near_ties():
    dim = 96
    g = torch.Generator().manual_seed(2)
    base = 40 + torch.randn(64, dim, generator=g)  # a large common offset: ||z|| >> the distances
    twins = base + 1e-3 * torch.randn(64, dim, generator=g)  # codes closer than bf16 can tell apart
    ulp = base.clone()
    ulp[:, 0] = torch.nextafter(base[:, 0], torch.full_like(base[:, 0], 1e9))  # one fp32 ulp away
    codebook = torch.cat([base, twins, ulp, base[:8]])  # exact duplicates too: fp32 takes the first index
    midpoints = (base + twins) / 2  # equidistant from two codes, up to fp32 rounding
    near = base + 2e-4 * torch.randn(64, dim, generator=g)
    z = torch.cat([midpoints, base, twins, near, ulp])
    reference = fp32_nearest_code(z, codebook)
    assert (naive_bf16(z, codebook) != reference).sum() > 20  # bf16 alone gets many rows wrong here
    indices, certified = certified_nearest_code(z, codebook, shortlist=4)
    assert torch.equal(indices, reference)
    assert not certified.all() and (~certified).sum() >= 64  # the near-ties went to the fp32 search


@pytest.mark.parametrize("shortlist", [1, 3, 40])
def test_certified_search_holds_for_any_shortlist_and_codebook_size(shortlist):
    z = layer_normed(1000, 32, seed=3)
    for k in (1, 2, 5, 300):
        codebook = layer_normed(k, 32, seed=4 + k)
        indices, _ = certified_nearest_code(z, codebook, shortlist=shortlist)
        assert torch.equal(indices, fp32_nearest_code(z, codebook)), (k, shortlist)
    empty = certified_nearest_code(z[:0], codebook)[0]
    assert empty.shape == (0,)


def test_search_method_is_checked_and_auto_is_fp32_on_the_cpu(monkeypatch):
    import stage1.model.search as search

    z, codebook = layer_normed(64, 16, seed=5), layer_normed(8, 16, seed=6)
    with pytest.raises(ValueError, match="'auto', 'fp32' or 'certified'"):
        nearest_code(z, codebook, method="bf16")
    monkeypatch.setattr(search, "certified_nearest_code", lambda *a, **k: pytest.fail("certified on the CPU"))
    assert torch.equal(nearest_code(z, codebook), fp32_nearest_code(z, codebook))
