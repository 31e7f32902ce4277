"""The codebook fit before training: k-means over real latents, the EMA starting from it."""

import pytest
import torch
from helpers import run_training, smooth_images, tiny_vqrae, train_metrics

from stage1.model.kmeans import assign
from stage1.train.codebook_fit import encode_batches, fit_codebook


def image_batches(count=6, size=4, seed=0):
    return [smooth_images(size, seed=seed + i) for i in range(count)]


def test_the_fit_becomes_the_codebook_and_its_ema_state(dinov2_dir):
    torch.manual_seed(0)
    model = tiny_vqrae(dinov2_dir, num_embeddings=32)
    fit = fit_codebook(model, encode_batches(model, image_batches()), tokens_per_image=8, iters=10,
                       tokens_per_update=100, seed=1)
    q, (result,) = model.quantizer, fit.results
    assert bool(q.initialized) and torch.equal(q.embedding, result.centroids)
    # Cluster sizes in hits per update: the fit's shares of tokens_per_update, sums to match.
    assert q.ema_cluster_size.sum().item() == pytest.approx(100.0, rel=1e-5)
    assert torch.allclose(q.ema_cluster_size, result.counts * 100 / result.counts.sum(), rtol=1e-5)
    assert torch.allclose(q.ema_embed_sum, q.embedding * q.ema_cluster_size.unsqueeze(1), rtol=1e-5)
    assert fit.tokens == result.counts.sum().item() == 6 * 4 * 8
    assert result.distortion[-1] < result.distortion[0]
    # The reported error is the fitted quantizer's own, measured again: k-means' last assignment.
    assert fit.distortion == pytest.approx(result.distortion[-1], rel=1e-4)
    # A training step continues the EMA from the fit instead of re-initialising from its batch.
    before = q.embedding.clone()
    model.train()(smooth_images(2, seed=50), return_loss=True)
    assert (q.embedding - before).norm() < 0.5 * before.norm()


def test_many_images_fit_held_out_latents_better_than_one_batch(dinov2_dir):
    torch.manual_seed(0)
    fitted = tiny_vqrae(dinov2_dir, num_embeddings=32)
    fit_codebook(fitted, encode_batches(fitted, image_batches(count=12)), tokens_per_image=16, iters=20,
                 tokens_per_update=64)
    torch.manual_seed(0)
    first_batch = tiny_vqrae(dinov2_dir, num_embeddings=32).train()
    first_batch(smooth_images(16, seed=0), return_loss=True)  # k-means on one batch: 16 images, 8 tokens a code
    held_out = torch.cat([fitted.encode_tokens(x)[0].flatten(0, 1) for x in image_batches(count=4, seed=100)])
    distortion = {name: assign(held_out, m.quantizer.embedding)[1].mean().item()
                  for name, m in [("fitted", fitted), ("first_batch", first_batch)]}
    assert distortion["fitted"] < distortion["first_batch"], distortion


def test_too_few_tokens_for_the_codebook_is_a_clear_error(dinov2_dir):
    model = tiny_vqrae(dinov2_dir, num_embeddings=64)
    with pytest.raises(ValueError, match="sampled 8 tokens for 64 codes: raise codebook_fit.images"):
        fit_codebook(model, encode_batches(model, image_batches(count=1, size=1)), tokens_per_image=8, iters=2,
                     tokens_per_update=16)


def test_training_fits_the_codebook_before_step_zero(train_images, tmp_path):
    run_training(train_images, tmp_path / "fit", "train.steps=2", "train.sample_every=null",
                 "train.report_reconstructions=false")
    fit = [m for m in train_metrics(tmp_path / "fit") if m.get("codebook_fit")]
    assert len(fit) == 1 and fit[0]["step"] == 0
    assert fit[0]["tokens"] == 8 * 16 and fit[0]["codes_used"] == 64 and fit[0]["distortion"] > 0
    # images=0: the same rule on the first step's images (4 of 16 tokens: one per code), not a second mechanism.
    run_training(train_images, tmp_path / "first", "train.steps=2", "train.sample_every=null",
                 "train.report_reconstructions=false", "codebook_fit.images=0")
    fit = [m for m in train_metrics(tmp_path / "first") if m.get("codebook_fit")]
    assert len(fit) == 1 and fit[0]["tokens"] == 4 * 16 and fit[0]["codes_used"] == 64
    with pytest.raises(ValueError, match="sampled 32 tokens for 64 codes: raise codebook_fit.images or codebook_fit"):
        run_training(train_images, tmp_path / "few", "train.steps=2", "codebook_fit.images=0",
                     "codebook_fit.tokens_per_image=8")


@pytest.mark.parametrize("kind", [dict(kind="residual", depth=3), dict(kind="grouped", groups=4),
                                  dict(kind="grouped", groups=2, cosine=True)])
def test_every_kind_fits_each_of_its_codebooks(dinov2_dir, kind):
    from stage1 import VQRAE

    torch.manual_seed(0)
    base = tiny_vqrae(dinov2_dir, num_embeddings=16)
    model = VQRAE(base.config.__class__.from_dict({**base.config.to_dict(),
                                                   "quantizer": {**base.config.quantizer.to_dict(), **kind}}))
    fit = fit_codebook(model, encode_batches(model, image_batches()), tokens_per_image=16, iters=10,
                       tokens_per_update=64)
    levels = model.quantizer.levels
    assert len(fit.results) == len(levels) and all(bool(level.initialized) for level in levels)
    for level, result in zip(levels, fit.results, strict=True):
        expected = torch.nn.functional.normalize(result.centroids, dim=1) if level.cosine else result.centroids
        assert torch.allclose(level.embedding, expected, atol=1e-6)
    if kind["kind"] == "residual":
        # Each level fits what the levels before it leave: the error falls level by level.
        finals = [r.distortion[-1] for r in fit.results]
        assert finals == sorted(finals, reverse=True) and fit.distortion == pytest.approx(finals[-1], rel=1e-4)
    else:
        # Groups partition the channels: their errors add up to the whole quantizer's.
        assert fit.distortion == pytest.approx(sum(r.distortion[-1] for r in fit.results), rel=1e-4)


def test_one_default_for_the_lloyd_iterations():
    """Training's codebook_fit, vqrae-fit-codebook's flags and a first batch's k-means: one source of defaults."""
    from stage1.base.codebook_start import LLOYD_ITERS, CodebookFitConfig
    from stage1.cli.arguments import fit_codebook_parser

    assert fit_codebook_parser().get_default("iters") == CodebookFitConfig().iters == LLOYD_ITERS
