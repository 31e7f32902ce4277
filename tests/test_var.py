"""VAR's tokenizer interface (issue 22, point 3): VARTokenizer gives VQVAE's and VectorQuantizer2's methods with VAR's
shapes and semantics (FoundationVision/VAR models/vqvae.py, models/quant.py). A tiny next-scale transformer of our own,
with VAR's shapes (class token as the first scale's input, teacher forcing from idxBl_to_var_input, block-causal
attention over scales), trains on the codes and samples scale by scale through get_next_autoregressive_input."""

import pytest
import torch
from helpers import smooth_images, tiny_vqrae
from torch import nn

from stage1 import VARTokenizer
from stage1.train.codebook_fit import fit_codebook

SCALES, K = (1, 2, 4), 16  # the tiny encoder's 4 x 4 grid: 1 + 4 + 16 = 21 codes


@pytest.fixture(scope="module", params=[(False, 0), (True, 0), (False, 2)], ids=["per-scale", "shared", "phi"])
def tokenizer(dinov2_dir, tmp_path_factory, request):
    torch.manual_seed(0)
    shared, phi = request.param
    model = tiny_vqrae(dinov2_dir, quantizer_kind="multiscale", scales=list(SCALES), num_embeddings=K,
                       shared_codebook=shared, phi=phi)
    with torch.no_grad():  # phi as after training, away from its identity start: every path must apply it
        for conv in model.quantizer.phi or []:
            conv.weight.add_(torch.randn_like(conv.weight) * 0.1)
            conv.bias.add_(torch.randn_like(conv.bias) * 0.1)
    batches = [model.encode_tokens(smooth_images(8, seed=s))[0] for s in range(4)]
    fit_codebook(model, batches, tokens_per_image=16, iters=5, tokens_per_update=128, show_progress=False)
    path = tmp_path_factory.mktemp("var") / "model"
    model.save_pretrained(path)
    return VARTokenizer.from_pretrained(path)


class TinyVAR(nn.Module):
    """VAR's next-scale model in shape: the first scale's input is the class embedding (pos_start), later scales'
    are word_embed(teacher-forcing / sampled inputs), plus position and level embeddings; each token attends to its
    own and earlier scales; logits over the codebook for every token."""

    def __init__(self, cvae, vocab, num_classes, scales, width=32):
        super().__init__()
        self.scales, self.L = scales, sum(s * s for s in scales)
        self.classes = nn.Embedding(num_classes, width)
        self.word_embed = nn.Linear(cvae, width)
        self.positions = nn.Parameter(torch.randn(1, self.L, width) * 0.02)
        levels = torch.cat([torch.full((s * s,), i) for i, s in enumerate(scales)])
        self.register_buffer("levels", levels)
        self.lvl_embed = nn.Embedding(len(scales), width)
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)

    def forward(self, labels, x_wo_first_l):  # (B,), (B, t - 1, Cvae) -> logits (B, t, V), t a prefix of scales
        first = self.classes(labels)[:, None]
        x = torch.cat([first, self.word_embed(x_wo_first_l)], 1) if x_wo_first_l is not None else first
        t = x.shape[1]
        x = x + self.positions[:, :t] + self.lvl_embed(self.levels[:t])
        mask = torch.where(self.levels[:t, None] >= self.levels[None, :t], 0.0, float("-inf"))
        return self.head(self.blocks(x, mask=mask))


def test_vars_interface_shapes_and_values(tokenizer):
    x = smooth_images(2, seed=11) * 2 - 1  # VAR's images are in [-1, 1]
    idx = tokenizer.img_to_idxBl(x)
    assert [tuple(i.shape) for i in idx] == [(2, s * s) for s in SCALES] and idx[0].dtype == torch.long
    assert tokenizer.Cvae == 32 and tokenizer.vocab_size == K and tokenizer.quantize.v_patch_nums == SCALES
    model = tokenizer.model
    assert all(torch.equal(a.flatten(1), b) for a, b in zip(model.encode_to_indices((x + 1) / 2), idx, strict=True))
    # Teacher forcing: f_hat after each scale but the last, area-downsampled to the next: (B, L - 1, Cvae).
    var_input = tokenizer.quantize.idxBl_to_var_input(idx)
    assert var_input.shape == (2, 21 - 1, 32) and var_input.dtype == torch.float32
    f_hat = torch.zeros(2, 32, 4, 4)
    for si, s in enumerate(SCALES):
        h = tokenizer.quantize.embedding(idx[si]).transpose(1, 2).reshape(2, 32, s, s)
        f_hat, next_map = tokenizer.quantize.get_next_autoregressive_input(si, len(SCALES), f_hat, h)
        if si < len(SCALES) - 1:
            start = sum(t * t for t in SCALES[1 : si + 1])
            expected = var_input[:, start : start + SCALES[si + 1] ** 2]
            assert torch.allclose(next_map.flatten(2).transpose(1, 2), expected, atol=1e-6)
    flat = torch.cat(idx, 1)
    with torch.no_grad():
        lookup = model.quantizer.lookup(flat).transpose(1, 2).reshape(2, 32, 4, 4)
    assert torch.allclose(f_hat, lookup, atol=1e-6)  # f_hat: the sum of the upsampled scales
    images = tokenizer.fhat_to_img(f_hat)
    assert images.shape == (2, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert torch.allclose(images, model.decode_from_indices(flat) * 2 - 1, atol=1e-5)
    previews = tokenizer.idxBl_to_img(idx, same_shape=True)
    assert len(previews) == 3 and torch.equal(previews[-1], tokenizer.idxBl_to_img(idx, True, last_one=True))
    assert torch.equal(previews[0], model.decode_from_indices(idx[0]) * 2 - 1)  # the 1 x 1 scale alone
    with pytest.raises(ValueError, match="same_shape=False"):
        tokenizer.idxBl_to_img(idx, same_shape=False)


def test_a_tiny_var_trains_with_teacher_forcing_and_samples_scale_by_scale(tokenizer):
    """trainer.py's step (img_to_idxBl, idxBl_to_var_input, cross-entropy on the concatenated codes), then
    autoregressive_infer_cfg's loop (greedy, no guidance): the overfitted model's samples are the training codes,
    and f_hat decodes to the images the codes decode to."""
    images = smooth_images(2, seed=12) * 2 - 1
    labels = torch.tensor([0, 1])
    gt_idx = tokenizer.img_to_idxBl(images)
    targets = torch.cat(gt_idx, 1)
    var_input = tokenizer.quantize.idxBl_to_var_input(gt_idx)
    torch.manual_seed(0)
    var = TinyVAR(tokenizer.Cvae, tokenizer.vocab_size, 2, SCALES)
    optimizer = torch.optim.AdamW(var.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = nn.functional.cross_entropy(var(labels, var_input).flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])

    # Sampling, scale by scale: the next scale's input comes from get_next_autoregressive_input.
    f_hat, inputs, sampled = torch.zeros(2, tokenizer.Cvae, 4, 4), None, []
    with torch.no_grad():
        for si, s in enumerate(SCALES):
            logits = var(labels, inputs)[:, -s * s :]
            idx = logits.argmax(-1)
            sampled.append(idx)
            h = tokenizer.quantize.embedding(idx).transpose(1, 2).reshape(2, tokenizer.Cvae, s, s)
            f_hat, next_map = tokenizer.quantize.get_next_autoregressive_input(si, len(SCALES), f_hat, h)
            if si < len(SCALES) - 1:
                step = next_map.flatten(2).transpose(1, 2)
                inputs = step if inputs is None else torch.cat([inputs, step], 1)
    assert torch.equal(torch.cat(sampled, 1), targets)
    decoded = tokenizer.fhat_to_img(f_hat).add(1).mul(0.5)  # VAR de-normalises to [0, 1]
    assert torch.allclose(decoded, tokenizer.model.decode_from_indices(targets), atol=1e-5)


def test_the_adapter_needs_multiscale_codes_and_tells_the_scale_by_length(tokenizer, dinov2_dir):
    with pytest.raises(ValueError, match="needs multi-scale codes"):
        VARTokenizer(tiny_vqrae(dinov2_dir))
    quantizer = tokenizer.model.quantizer
    codes = torch.tensor([[3, 1, 4, 1]])  # four codes: the 2 x 2 scale's
    assert torch.equal(tokenizer.quantize.embedding(codes), quantizer.codebook(1).lookup(codes))
    with pytest.raises(ValueError, match=r"one scale's codes \(B, s \* s\)"):
        tokenizer.quantize.embedding(torch.zeros(1, 3, dtype=torch.long))
    if quantizer.shared:
        assert tokenizer.quantize.embedding.weight is quantizer.levels[0].embedding
    else:
        with pytest.raises(ValueError, match="more_smooth"):
            _ = tokenizer.quantize.embedding.weight


def test_progressive_training_stops_the_codes_and_teacher_forcing_at_prog_si(tokenizer):
    """VAR's train.py --pg sets quantize.prog_si to the last scale trained on: VectorQuantizer2 then gives the first
    prog_si + 1 scales' codes and the teacher forcing of scales 1..prog_si (None at 0), so its trainer's logits and
    targets both end at begin_ends[prog_si][1] (VAR: the 130 vs 5 size mismatch when they did not)."""
    x = smooth_images(2, seed=13) * 2 - 1
    full_codes = tokenizer.img_to_idxBl(x)
    full_input = tokenizer.quantize.idxBl_to_var_input(full_codes)
    ends = [sum(s * s for s in SCALES[: k + 1]) for k in range(len(SCALES))]  # VAR's begin_ends[k][1]
    try:
        for prog_si in range(len(SCALES)):
            tokenizer.quantize.prog_si = prog_si
            codes = tokenizer.img_to_idxBl(x)
            assert len(codes) == prog_si + 1
            assert all(torch.equal(a, b) for a, b in zip(codes, full_codes, strict=False))
            var_input = tokenizer.quantize.idxBl_to_var_input(codes)
            if prog_si == 0:
                assert var_input is None  # VAR's model feeds the class token alone
                continue
            # 1 (the class token's position) + the inputs = the targets: what VAR's assert checks.
            assert 1 + var_input.shape[1] == torch.cat(codes, 1).shape[1] == ends[prog_si]
            assert torch.equal(var_input, full_input[:, : ends[prog_si] - 1])  # a prefix: later scales do not matter
    finally:
        tokenizer.quantize.prog_si = -1
    assert len(tokenizer.img_to_idxBl(x)) == len(SCALES)


def test_the_encoder_and_decoder_views_leave_the_saved_weights_alone(tokenizer):
    """VAR's train.py prints the parameter counts of vae_local.encoder and .decoder: views of the model's own parts,
    not registered in the adapter (its state_dict is the model's, key for key)."""
    model = tokenizer.model
    assert tokenizer.encoder is model.encoder and tokenizer.decoder is model.decoder
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731 (VAR's count_p)
    assert count(tokenizer.decoder) == count(model.decoder) > 0 and count(tokenizer.encoder) > 0
    phi = sum(p.numel() for conv in model.quantizer.phi or [] for p in conv.parameters())
    assert count(tokenizer.quantize) == phi  # VAE.quant: phi's weights (codebooks are buffers), 0 without phi
    assert count(tokenizer) == count(model)  # nothing counted twice
    assert list(tokenizer.state_dict()) == [f"model.{key}" for key in model.state_dict()]


def test_the_adapters_check_what_their_callers_give_as_decode_from_indices_does(tokenizer, dinov2_dir):
    """Issue 32, point 4: scales out of order or of no scale's length, negative codes, codes past the codebook and a
    bad image size were images, IndexErrors or torch errors; each is one ValueError naming what was expected."""
    from stage1 import LlamaGenTokenizer

    x = smooth_images(2, seed=14) * 2 - 1
    idx = tokenizer.img_to_idxBl(x)
    quantize = tokenizer.quantize
    cases = [
        (lambda: tokenizer.idxBl_to_img([idx[1], idx[0], idx[2]], True), r"scales' codes in order"),
        (lambda: tokenizer.idxBl_to_img([idx[0], idx[1][:, :3]], True), r"scales' codes in order"),
        (lambda: tokenizer.idxBl_to_img([], True), r"a list of the first scales' codes"),
        (lambda: tokenizer.idxBl_to_img([idx[0].float(), idx[1]], True), r"integer indices"),
        (lambda: quantize.idxBl_to_var_input([idx[0], idx[1] + K, idx[2]]), r"must lie in \[0, 15\]"),
        (lambda: quantize.idxBl_to_var_input([idx[0]]), r"the first 3 scales at least, got 1"),
        (lambda: quantize.embedding(idx[1] - 1 - idx[1].max()), r"integer codes in \[0, 15\], got torch.int64 "
                                                                 r"values in \[-"),
        (lambda: quantize.embedding(idx[1].float()), r"integer codes in \[0, 15\]"),
        (lambda: LlamaGenTokenizer(tiny_vqrae(dinov2_dir), image_size=0), r"image_size .* must be an integer in "
                                                                           r"\[1, 8192\] or None"),
        # A second probe: image_size True was taken as 1; integer images wrapped (uint8 255 + 1 is 0: a white
        # image got a black one's codes).
        (lambda: LlamaGenTokenizer(tiny_vqrae(dinov2_dir), image_size=True), r"must be an integer in \[1, 8192\]"),
        (lambda: tokenizer.img_to_idxBl(torch.full((1, 3, 32, 32), 255, dtype=torch.uint8)),
         r"expected float images in \[-1, 1\] of shape \(B, 3, H, W\), got torch.uint8"),
        (lambda: LlamaGenTokenizer(tiny_vqrae(dinov2_dir)).encode(torch.ones(1, 3, 32, 32, dtype=torch.bool)),
         r"expected float images in \[-1, 1\] of shape \(B, 3, H, W\), got torch.bool"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
