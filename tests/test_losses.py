"""VQRAELoss: every training term, each with its weight and start step, from the loss config alone."""

import pytest
import torch

from stage1.train.losses import LossConfig, VQRAELoss, adaptive_weight, generator_loss, hinge_d_loss


def fixture_batch():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    last_layer = torch.nn.Parameter(torch.randn(3, 1, 1))  # stands in for the decoder's output weight
    x_rec = torch.sigmoid(last_layer * torch.randn(2, 3, 32, 32))
    return x, x_rec, last_layer


def tiny_loss(**values):
    config = dict(lpips_net="alex", lpips_random_backbone=True, lpips_weight=0.5, disc_weight=0.1, disc_channels=8,
                  disc_layers=2)
    torch.manual_seed(0)
    return VQRAELoss(LossConfig(**{**config, **values}))


def test_each_term_joins_at_its_start_step_with_its_weight():
    x, x_rec, last_layer = fixture_batch()
    quantizer = {"vq_loss": torch.tensor(0.3), "perplexity": torch.tensor(7.0)}  # the model's outputs
    loss = tiny_loss(recon_loss="l2", recon_weight=2.0, lpips_start=5, disc_start=10)
    recon = (x_rec - x).pow(2).mean()
    lpips = loss.lpips(x_rec * 2 - 1, x * 2 - 1).mean()

    total, terms = loss.generator_loss(x, x_rec, quantizer, step=4, last_layer=last_layer)
    assert set(terms) == {"recon_loss", "vq_loss", "perplexity"} and not loss.adversarial(4)
    assert total.item() == pytest.approx(2.0 * recon.item() + 0.3, rel=1e-6)

    total, terms = loss.generator_loss(x, x_rec, quantizer, step=5, last_layer=last_layer)
    assert set(terms) == {"recon_loss", "lpips", "vq_loss", "perplexity"}
    assert total.item() == pytest.approx(2.0 * recon.item() + 0.5 * lpips.item() + 0.3, rel=1e-6)

    total, terms = loss.generator_loss(x, x_rec, quantizer, step=10, last_layer=last_layer)
    assert loss.adversarial(10)
    nll = 2.0 * recon + 0.5 * lpips
    g = generator_loss(loss.discriminator(x_rec))
    weight = 0.1 * adaptive_weight(nll, g, last_layer)
    assert terms["g_loss"].item() == pytest.approx(g.item(), rel=1e-6)
    assert terms["adaptive_weight"].item() == pytest.approx(weight.item(), rel=1e-5)
    assert total.item() == pytest.approx((nll + 0.3 + weight * g).item(), rel=1e-5)


def test_discriminator_loss_is_the_hinge_on_real_and_detached_fakes():
    x, x_rec, last_layer = fixture_batch()
    loss = tiny_loss()
    d_loss = loss.discriminator_loss(x, x_rec)
    expected = hinge_d_loss(loss.discriminator(x), loss.discriminator(x_rec))
    assert d_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    d_loss.backward()
    assert last_layer.grad is None  # the fakes are detached: no gradient reaches the decoder


def test_terms_with_zero_weight_build_nothing():
    loss = VQRAELoss(LossConfig(lpips_weight=0.0, disc_weight=0.0))
    assert loss.lpips is None and loss.discriminator is None and not loss.adversarial(10**9)


@pytest.mark.parametrize("values,message", [
    (dict(recon_loss="l3"), r"loss.recon_loss must be one of \['l1', 'l2'\], got 'l3'"),
    (dict(lpips_net="squeeze"), "loss.lpips_net must be one of"),
    (dict(disc_start=-1), "loss.disc_start must be >= 0"),
    (dict(disc_lr=0.0), "loss.disc_lr must be > 0"),
])
def test_bad_loss_values(values, message):
    with pytest.raises(ValueError, match=message):
        LossConfig(**values)
