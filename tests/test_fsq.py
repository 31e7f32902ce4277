"""quantizer.kind fsq (issue 29, point 1): FSQ's bound, rounding and mixed-radix codes against the reference
formulas written out here (the paper's code: the atanh shift, 1 + eps), the straight-through gradient, the PCA start
and its even use of every level, training of the projections, bf16, bad levels. The whole path (training, resume,
commands, exports, card, two ranks) is tests/test_quantizer_registry.py's."""

import math

import pytest
import torch

from stage1 import QuantizerConfig, build_quantizer

LEVELS = [8, 5, 3, 2]


def fsq(levels=LEVELS, d=16, **options):
    torch.manual_seed(0)
    return build_quantizer(QuantizerConfig(kind="fsq", levels=levels, **options), d)


def paper_codes(h: torch.Tensor, levels: list[int], eps: float = 1e-3) -> torch.Tensor:
    """FSQ's bound, round and normalise, one channel at a time, as its reference code (and vector-quantize-pytorch)
    write them: h -> tanh(h + atanh(offset / half_l)) * half_l - offset."""
    columns = []
    for i, level in enumerate(levels):
        half_l = (level - 1) * (1 + eps) / 2
        offset = 0.5 if level % 2 == 0 else 0.0
        shift = math.atanh(offset / half_l)
        bounded = torch.tanh(h[..., i].double() + shift) * half_l - offset
        columns.append(torch.round(bounded) / (level // 2))
    return torch.stack(columns, -1)


def test_codes_are_the_papers_and_every_index_round_trips():
    q = fsq()
    assert q.layout.vocab_size == q.num_embeddings == 8 * 5 * 3 * 2
    h = 3 * torch.randn(4000, len(LEVELS))
    q.in_proj.weight.data.zero_()
    q.in_proj.weight.data[:, : len(LEVELS)] = torch.eye(len(LEVELS))
    q.in_proj.bias.data.zero_()
    z = torch.cat([h, torch.zeros(4000, 16 - len(LEVELS))], dim=1)  # in_proj picks h out of z
    codes = q._codes(z)
    assert torch.equal(codes.double(), paper_codes(h, LEVELS))
    indices = q.encode(z)
    assert indices.min() >= 0 and indices.max() < q.num_embeddings
    every = torch.arange(q.num_embeddings)
    assert torch.equal(q._indices(q.codes_of(every)), every)  # index -> code -> index
    assert torch.equal(q.codes_of(indices), codes)  # code -> index -> code
    # Mixed radix with the first channel the least significant digit, as FSQ's codes_to_indexes.
    digits = torch.stack([(codes[:, i] * (n // 2) + n // 2).round().long() for i, n in enumerate(LEVELS)], 1)
    assert torch.equal(indices, digits[:, 0] + 8 * digits[:, 1] + 40 * digits[:, 2] + 120 * digits[:, 3])
    assert [len(torch.unique(digits[:, i])) for i in range(len(LEVELS))] == LEVELS  # every level of every channel
    assert torch.equal(q.lookup(indices), q.out_proj(codes))


def test_rounding_passes_the_gradient_straight_through():
    q = fsq()
    z = torch.randn(64, 16, requires_grad=True)
    upstream = torch.randn(64, len(LEVELS))
    (q._codes(z) * upstream).sum().backward()
    h = q.in_proj(z.detach()).detach().requires_grad_()
    half = (torch.tensor(LEVELS) - 1) * 1.001 / 2
    offset = torch.tensor([0.5 if n % 2 == 0 else 0.0 for n in LEVELS])
    bounded = torch.tanh(h + torch.atanh(offset / half)) * half - offset  # no rounding: its gradient is the bound's
    (bounded / torch.tensor([n // 2 for n in LEVELS]) * upstream).sum().backward()
    assert torch.allclose(z.grad, h.grad @ q.in_proj.weight, atol=1e-6)


def test_the_pca_start_reconstructs_a_low_rank_latent_and_training_improves_it():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(16, 4, generator=g))[0]  # a 4-D subspace of 16 channels
    scales = torch.tensor([3.0, 2.0, 1.0, 0.5])

    def latents(n):
        return (torch.randn(n, 4, generator=g) * scales) @ basis.T + 0.01 * torch.randn(n, 16, generator=g) + 1.0

    train, held = latents(4000), latents(1000)
    spread = (held - held.mean(0)).pow(2).sum(1).mean()
    q, fresh = fsq([8, 8, 8, 8]), fsq([8, 8, 8, 8])
    result = q.fit(train, iters=0, tokens_per_update=256)[0]
    assert int(result.counts.sum()) == 4000 and result.reseeded == 0

    def relative(model):
        return ((model.lookup(model.encode(held)) - held).pow(2).sum(1).mean() / spread).item()

    fitted = relative(q)
    # Whitened channels through the bound onto 8 levels lose ~8% of the variance to rounding; random projections
    # lose more than all of it.
    assert fitted < 0.1 < 1.0 < relative(fresh), (fitted, relative(fresh))
    assert result.distortion[0] == pytest.approx(fitted * spread.item(), rel=0.2)  # the fit's own report
    assert q(held).usage.item() > 0.05  # 4096 codes, 1000 tokens: spread over many of them
    optimizer = torch.optim.Adam([p for group in q.trained_parameters() for p in group["params"]], lr=1e-3)
    for _ in range(200):  # the loss the trainer adds trains both projections
        out = q(train[torch.randint(0, 4000, (256,), generator=g)])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert relative(q) < 0.9 * fitted, (relative(q), fitted)


def test_the_fit_spreads_whitened_channels_over_all_their_levels():
    """FSQ's bound maps h = 0 to the code 0: the top edge of a level of 2, so a whitened channel would almost never
    read its other code (measured: 0.01%). The fit's bias takes the shift back: each level takes its share."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(20000, 16, generator=g) @ torch.randn(16, 16, generator=g) + 3.0
    q = fsq([2, 3, 8, 2])
    q.fit(latents, iters=0, tokens_per_update=256)
    codes = q._codes(latents)
    for i, level in enumerate([2, 3, 8, 2]):
        digits = (codes[:, i] * (level // 2) + level // 2).round().long()
        shares = torch.bincount(digits, minlength=level).float() / len(digits)
        assert len(shares) == level and shares.min() > 0.5 / level ** 2, (level, shares)
        if level == 2:
            assert abs(shares[0] - 0.5) < 0.02, shares  # the median splits a symmetric channel


def test_bf16_autocast_gives_the_fp32_codes():
    q = fsq()
    z = torch.randn(2, 40, 16)
    reference = q.encode(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z.to(torch.bfloat16).float())
        encoded = q.encode(z)
    assert torch.equal(encoded, reference) and out.commitment.dtype == torch.float32
    assert out.z_q.dtype == torch.float32 and torch.equal(out.indices, reference)


@pytest.mark.parametrize("levels, message", [
    ([1, 5], "1 to 64 levels of at least 2"),
    ([], "1 to 64 levels of at least 2"),
    ([2] * 21, r"whose product \(the vocabulary\) is at most 1,048,576"),
])
def test_bad_levels_are_refused(levels, message):
    with pytest.raises(ValueError, match=rf"quantizer.levels must be .*{message}"):
        QuantizerConfig(kind="fsq", levels=levels)
    with pytest.raises(ValueError, match=r"quantizer.levels must be \[8, 5, 5, 5\] with kind 'single'"):
        QuantizerConfig(kind="single", levels=[4, 4])


def reference_entropy_penalty(bounded: torch.Tensor, levels: list[int], temperature: float) -> torch.Tensor:
    """MAGVIT-v2's entropy term one channel at a time over that channel's own levels: the mean token entropy minus
    the entropy of the mean assignment, summed over the channels."""
    total = bounded.new_zeros((), dtype=torch.float64)
    for i, level in enumerate(levels):
        grid = torch.arange(level, dtype=torch.float64) - level // 2
        probs = (-(bounded[:, i].double()[:, None] - grid).pow(2) / temperature).softmax(-1)
        per_token = -(probs * probs.clamp_min(1e-300).log()).sum(-1).mean()
        mean = probs.mean(0)
        total = total + per_token + (mean * mean.log()).sum()
    return total


def test_the_entropy_penalty_is_magvit_v2s_per_channel_and_joins_the_loss():
    from stage1.model.quantizers.fsq import ENTROPY_TEMPERATURE

    q = fsq(entropy_weight=0.5)
    z = torch.randn(300, 16)
    bounded = q._bounded(z)
    reference = reference_entropy_penalty(bounded.detach(), LEVELS, ENTROPY_TEMPERATURE)
    assert torch.allclose(q.entropy_penalty(bounded).double(), reference, atol=1e-5)
    out = q(z)
    assert torch.allclose(out.extra["entropy_loss"].double(), reference, atol=1e-5)
    assert torch.allclose(out.loss, 0.25 * out.commitment + 0.5 * out.extra["entropy_loss"])
    assert "entropy_loss" in out.terms() and "entropy_loss" not in fsq()(z).terms()  # only when weighted
    assert "entropy weight 0.5" in q.describe()


def test_lfq_entropy_penalty_spreads_binary_codes_that_favour_one_level():
    """LFQ = levels of 2 with the penalty: from a start where each channel puts 93% of the tokens on its top level
    (one code of 16 unused), training the projection on the penalty alone evens the levels out and fills every code.
    MAGVIT-v2's temperature is sharp: only tokens near a boundary feel it, so the levels even out part of the way."""
    q = fsq(levels=[2] * 4, entropy_weight=1.0)
    z = torch.randn(4096, 16)
    with torch.no_grad():
        q.in_proj.weight.zero_()
        q.in_proj.weight[:, :4] = torch.eye(4)
        q.in_proj.bias.fill_(1.5 - math.atanh(0.5 / (0.5 * 1.001)))  # 1.5 standard deviations past the middle

    def top_share():
        return (q._codes(z) == 0).float().mean(0)

    assert top_share().min() > 0.92 and torch.bincount(q.encode(z), minlength=16).min() == 0
    first = float(q.entropy_penalty(q._bounded(z)).detach())
    optimizer = torch.optim.Adam(q.in_proj.parameters(), lr=0.01)
    for _ in range(150):
        optimizer.zero_grad()
        q.entropy_penalty(q._bounded(z)).backward()
        optimizer.step()
    assert float(q.entropy_penalty(q._bounded(z)).detach()) < first - 1.4  # 4 log 2 = 2.77 at best
    assert top_share().max() < 0.7 and torch.bincount(q.encode(z), minlength=16).min() > 50


@pytest.mark.parametrize("weight, message", [(-0.1, "must be >= 0"), (float("nan"), "must be a finite number"),
                                             (float("inf"), "must be a finite number")])
def test_a_bad_entropy_weight_is_refused(weight, message):
    with pytest.raises(ValueError, match=rf"quantizer.entropy_weight {message}"):
        QuantizerConfig(kind="fsq", entropy_weight=weight)
    with pytest.raises(ValueError, match=r"quantizer.entropy_weight must be 0.0 with kind 'single' \(an option of fsq"):
        QuantizerConfig(kind="single", entropy_weight=0.1)
