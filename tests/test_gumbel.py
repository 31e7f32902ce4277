"""quantizer.kind gumbel (issue 29, point 3): the annealed temperature, distance logits against brute force, argmax
codes in eval mode and every command, the fit's start (a linear head equal to the distance logits), hard and soft
samples, the KL term, the step count as saved state, learning by gradient, bad options. The whole path (training,
exact resume, commands, card, two ranks) is tests/test_quantizer_registry.py's."""

import math

import pytest
import torch

from stage1 import QuantizerConfig, build_quantizer

K, D = 16, 6


def gumbel(**options):
    torch.manual_seed(0)
    return build_quantizer(QuantizerConfig(kind="gumbel", num_embeddings=K, **options), D)


def test_the_temperature_anneals_exponentially_with_the_training_forwards():
    q = gumbel(tau_start=1.0, tau_end=0.01, tau_steps=100)
    taus = []
    for step in (0, 50, 100, 1000):
        q.step.fill_(step)
        taus.append(q.temperature())
    assert taus == pytest.approx([1.0, 0.1, 0.01, 0.01])
    z = torch.randn(1, 10, D)
    q.step.fill_(0)
    q.eval()(z)
    assert int(q.step) == 0  # eval forwards do not count
    q.train()(z)
    q(z)
    assert int(q.step) == 2 and "step" in q.state_dict()  # saved with the model: a resumed run anneals on


def test_codes_are_the_argmax_of_the_logits_and_distance_logits_pick_the_nearest_code():
    q = gumbel().eval()
    z = torch.randn(4, 30, D)
    flat = z.reshape(-1, D)
    squared = torch.cdist(flat.double(), q.codebook.detach().double()).pow(2)
    assert torch.allclose(q.logits(flat).double(), -q.log_scale.exp().double() * squared, rtol=1e-4, atol=1e-4)
    nearest = squared.argmin(1).reshape(4, 30)
    out = q(z)
    assert torch.equal(q.encode(z), nearest) and torch.equal(out.indices, nearest)
    assert torch.equal(out.z_q, q.codebook[nearest].detach()) and torch.equal(q.lookup(nearest), q.codebook[nearest])


def test_the_fit_starts_the_codebook_on_kmeans_and_a_linear_head_on_the_same_codes():
    g = torch.Generator().manual_seed(0)
    samples = 3 * torch.randn(K, D, generator=g).repeat(30, 1) + 0.1 * torch.randn(30 * K, D, generator=g)
    distance, linear = gumbel(), gumbel(logits="linear")
    assert not distance.started
    result = distance.fit(samples, iters=10, tokens_per_update=64)[0]
    linear.fit(samples, iters=10, tokens_per_update=64)
    assert distance.started and torch.equal(distance.codebook, linear.codebook)
    assert distance.log_scale.exp().item() == pytest.approx(1 / result.distortion[-1], rel=1e-5)
    held = 3 * torch.randn(K, D, generator=g).repeat(4, 1)
    assert torch.equal(distance.encode(held), linear.encode(held))
    # The head's logits are the distance logits plus scale * ||z||^2, the same for every code of a token.
    gap = linear.logits(held) - distance.logits(held)
    assert torch.allclose(gap, gap[:, :1].expand_as(gap), atol=1e-3 * gap.abs().max().item())


def test_hard_samples_are_codes_soft_ones_mixtures_and_peaked_logits_their_argmax():
    z = torch.randn(2, 200, D)
    hard = gumbel().train()
    out = hard(z)
    assert torch.allclose(out.z_q, hard.codebook[out.indices].detach(), atol=1e-6)  # one-hot forward value
    (out.z_q.sum() + out.loss).backward()
    assert hard.codebook.grad.abs().sum() > 0 and hard.log_scale.grad != 0  # both learn from the sample
    soft = gumbel(hard=False).train()
    mixed = soft(z)
    assert (mixed.z_q - soft.codebook[mixed.indices].detach()).norm(dim=-1).mean() > 1e-3  # not one code
    # A sample follows softmax(logits) (Gumbel-max): peaked logits give their argmax, the commands' code.
    sharp = gumbel().train()
    with torch.no_grad():
        sharp.log_scale.fill_(math.log(1e3))
    assert (sharp(z).indices == sharp.encode(z)).float().mean() > 0.95
    cold = gumbel(hard=False, tau_start=1e-3, tau_end=1e-3).train()  # a cold soft sample is one code
    out = cold(z)
    assert ((out.z_q - cold.codebook[out.indices]).detach().abs().amax(-1) < 1e-3).float().mean() > 0.95


def test_the_kl_term_is_the_divergence_from_uniform_code_use():
    q = gumbel(kl_weight=2.0, commitment_cost=0.0).eval()
    z = torch.randn(1, 50, D)
    out = q(z)
    probs = q.logits(z.reshape(-1, D)).softmax(1).double()
    kl = (probs * (probs * K).log()).sum(1).mean()
    assert out.extra["kl_loss"].item() == pytest.approx(kl.item(), rel=1e-4)
    assert out.loss.item() == pytest.approx(2.0 * kl.item(), rel=1e-4)
    with torch.no_grad():
        q.log_scale.fill_(-30.0)  # flat logits: every code as likely
    assert q(z).extra["kl_loss"].item() == pytest.approx(0.0, abs=1e-6)
    assert "kl_loss" in q(z).terms()  # logged as its own term


def test_the_codebook_learns_by_gradient_from_a_random_start():
    g = torch.Generator().manual_seed(1)
    centres = 2 * torch.randn(K, D, generator=g)
    q = gumbel(tau_start=0.5, tau_end=0.1, tau_steps=300).train()
    optimizer = torch.optim.Adam(q.trained_parameters()[0]["params"], lr=0.05)
    errors = []
    for _ in range(300):
        z = centres[torch.randint(K, (256,), generator=g)] + 0.05 * torch.randn(256, D, generator=g)
        out = q(z)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        errors.append(out.commitment.item())
    assert sum(errors[-20:]) / 20 < 0.3 * sum(errors[:20]) / 20, (errors[:3], errors[-3:])


@pytest.mark.parametrize("options, message", [
    (dict(tau_start=0.5, tau_end=1.0), r"quantizer.tau_end must be in \(0, tau_start = 0.5\]"),
    (dict(tau_end=0.0), r"quantizer.tau_end must be in \(0"),
    (dict(tau_steps=-1), "quantizer.tau_steps must be >= 0"),
    (dict(kl_weight=-0.1), "quantizer.kl_weight must be >= 0"),
    (dict(logits="cosine"), r"quantizer.logits must be one of \['distance', 'linear'\]"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        QuantizerConfig(kind="gumbel", **options)
