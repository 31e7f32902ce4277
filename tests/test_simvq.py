"""quantizer.kind simvq (issue 29, point 4): the codebook is a frozen basis times a learned map. Its search against
brute force, the straight-through value and gradient, the map's gradient (SimVQ's codebook term) against autograd
of the formula written here, the k-means start, the map learning a shifted latent with every code moving, the random
basis, bf16 and bad options. The whole path is tests/test_quantizer_registry.py's."""

import pytest
import torch
import torch.nn.functional as F

from stage1 import QuantizerConfig, build_quantizer
from stage1.model.kmeans import fit_kmeans

K, D = 32, 8


def simvq(**options):
    torch.manual_seed(0)
    return build_quantizer(QuantizerConfig(kind="simvq", num_embeddings=K, **options), D)


def test_codes_are_the_nearest_rows_of_the_mapped_basis_and_the_gradients_are_simvqs():
    q = simvq(basis="random")
    with torch.no_grad():
        q.map.weight.add_(0.1 * torch.randn(D, D))
    z = torch.randn(3, 50, D, requires_grad=True)
    out = q(z)
    codebook = (q.basis @ q.map.weight.T).detach()  # basis @ W, W as nn.Linear holds it
    expected = torch.cdist(z.detach().reshape(-1, D).double(), codebook.double()).argmin(1).reshape(3, 50)
    assert torch.equal(out.indices, expected) and torch.equal(q.encode(z.detach()), expected)
    assert torch.allclose(out.z_q, codebook[expected], atol=1e-6) and torch.allclose(q.lookup(expected), out.z_q)
    upstream = torch.randn_like(out.z_q)
    ((out.z_q * upstream).sum() + out.loss).backward()
    # z's gradient: the identity (straight-through) plus the commitment term, which only z feels.
    commitment = 0.25 * 2 * (z.detach() - codebook[expected]) / z.numel()
    assert torch.allclose(z.grad, upstream + commitment, atol=1e-6)
    # W's: SimVQ's codebook term ||sg(z) - (basis @ W)[index]||^2, by autograd on the formula.
    weight = q.map.weight.detach().clone().requires_grad_()
    F.mse_loss((q.basis @ weight.T)[expected.flatten()], z.detach().reshape(-1, D)).backward()
    assert torch.allclose(q.map.weight.grad, weight.grad, atol=1e-6)
    assert out.commitment.item() == pytest.approx(F.mse_loss(z.detach(), codebook[expected]).item(), rel=1e-5)


def test_the_fit_is_kmeans_and_the_map_then_follows_a_shifted_latent_moving_every_code():
    g = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(K, D, generator=g)

    def latents(n, shift=0.0):
        return centres[torch.randint(K, (n,), generator=g)] * (1 + shift) + 0.1 * torch.randn(n, D, generator=g)

    q, samples = simvq(), latents(2000)
    assert not q.started and q.fit_need == "offline"
    result = q.fit(samples, iters=10, tokens_per_update=256, seed=3)[0]
    assert q.started
    reference = fit_kmeans(samples, K, iters=10, seed=3)
    assert torch.equal(q.basis, reference.centroids) and torch.equal(q.lookup(torch.arange(K)), reference.centroids)
    assert result.distortion == reference.distortion
    # The latent drifts (scaled by 1.3); one linear map moves every code after it, used or not.
    held = latents(1000, shift=0.3)
    spread = (held - held.mean(0)).pow(2).sum(1).mean()

    def relative():
        return ((q.lookup(q.encode(held)) - held).pow(2).sum(1).mean() / spread).item()

    before, start = relative(), q.lookup(torch.arange(K)).detach()
    optimizer = torch.optim.Adam([p for group in q.trained_parameters() for p in group["params"]], lr=1e-2)
    for _ in range(150):
        out = q(latents(256, shift=0.3))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert relative() < 0.5 * before, (relative(), before)
    moved = (q.lookup(torch.arange(K)).detach() - start).norm(dim=1)
    assert (moved > 0.1).all()
    assert q(held).usage.item() == 1.0


def test_a_random_basis_needs_no_fit_and_bf16_gives_the_fp32_codes():
    q = simvq(basis="random")
    assert q.started and q.fit_need == "none" and abs(q.basis.std().item() - 1) < 0.2
    z = torch.randn(2, 40, D)
    reference = q.encode(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z)
    assert torch.equal(out.indices, reference) and out.commitment.dtype == torch.float32


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match=r"quantizer.basis must be one of \['fit', 'random'\], got 'pca'"):
        QuantizerConfig(kind="simvq", basis="pca")
    with pytest.raises(ValueError, match=r"quantizer.basis must be \"fit\" with kind 'single' \(an option of simvq\)"):
        QuantizerConfig(kind="single", basis="random")
