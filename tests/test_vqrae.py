import json
import os
import re
import subprocess
import sys

import pytest
import torch
from helpers import IMAGE_SIZE, smooth_images, tiny_vqrae
from safetensors.torch import load_file, save_file

from stage1 import VQRAE


@pytest.fixture(scope="module")
def model(dinov2_dir):
    torch.manual_seed(0)
    model = tiny_vqrae(dinov2_dir).eval()
    model.quantizer.initialized.fill_(True)  # its placeholders taken as a started codebook: these tests train on
    return model  # batches too small to start one (test_quantizer.py tests the start)


@pytest.mark.parametrize("reshape_to_2d", [True, False])
def test_index_round_trip_equals_forward(dinov2_dir, reshape_to_2d):
    torch.manual_seed(0)
    model = tiny_vqrae(dinov2_dir, reshape_to_2d=reshape_to_2d).eval()
    x = smooth_images(3)
    indices = model.encode_to_indices(x)
    assert indices.shape == (3, 4, 4) and indices.dtype == torch.long
    x_rec = model(x)
    assert x_rec.shape == x.shape
    assert torch.equal(model.decode_from_indices(indices), x_rec)
    assert torch.equal(model.decode_from_indices(indices.flatten(1)), x_rec)  # (B, N) indices too
    z_q, _, quantizer_indices = model.quantize(model.features(x))
    assert torch.equal(quantizer_indices.reshape(3, 4, 4), indices)
    assert torch.equal(model.decode(z_q), x_rec)
    with pytest.raises(ValueError, match="codebook was never fitted or trained"):
        model.encode(x)  # the latent the decoder takes: not the vectors of a random codebook
    model.quantizer.initialized.fill_(True)  # taken as fitted
    assert torch.equal(model.encode(x), z_q)  # the codes' vectors


def test_layout_options_give_the_same_codes(dinov2_dir):
    outputs = []
    for reshape_to_2d in (True, False):
        torch.manual_seed(0)
        model = tiny_vqrae(dinov2_dir, reshape_to_2d=reshape_to_2d).eval()
        x = smooth_images(2)
        z = model.features(x)
        assert z.shape == ((2, 32, 4, 4) if reshape_to_2d else (2, 16, 32))
        outputs.append((model.encode_to_indices(x), model(x)))
    for indices, images in outputs[1:]:
        assert torch.equal(indices, outputs[0][0]) and torch.equal(images, outputs[0][1])


def test_decoder_patch_differs_from_encoder_patch(dinov2_dir):
    torch.manual_seed(0)
    model = tiny_vqrae(dinov2_dir, decoder_patch_size=16).eval()  # 4x4 tokens -> 64 px natively
    x = smooth_images(2)
    indices = model.encode_to_indices(x)
    assert model.decode_from_indices(indices).shape == (2, 3, 64, 64)
    x_rec = model(x)
    assert x_rec.shape == x.shape  # model(x) keeps the input's size
    assert torch.equal(model.decode_from_indices(indices, output_size=(IMAGE_SIZE, IMAGE_SIZE)), x_rec)


def test_encoder_input_size_resizes_for_the_encoder(dinov2_dir):
    torch.manual_seed(0)
    model = tiny_vqrae(dinov2_dir, encoder_input_size=32).eval()
    big = smooth_images(1, size=64)
    assert model.encode_to_indices(big).shape == (1, 4, 4)
    assert model(big).shape == big.shape
    unresized = tiny_vqrae(dinov2_dir, encoder_input_size=None).eval()
    assert unresized.encode_to_indices(big).shape == (1, 8, 8)


def test_only_the_decoder_gets_gradients(model):
    model.train()
    try:
        assert not model.encoder.training
        _, losses = model(smooth_images(2), return_loss=True)
        losses["loss"].backward()
        assert all(p.grad is None for p in model.encoder.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.parameters())
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(n.startswith("decoder.") for n in trainable)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_losses_have_the_documented_entries(model):
    model.train()
    try:
        x = smooth_images(2)
        x_rec, losses = model(x, return_loss=True)
    finally:
        model.eval()
    for key in ("recon_loss", "vq_loss", "commitment_loss", "codebook_loss", "perplexity", "codebook_usage", "loss"):
        assert key in losses and torch.isfinite(losses[key]), key
    assert losses["recon_loss"].item() == pytest.approx((x_rec - x).abs().mean().item(), rel=1e-5)
    assert 0 < losses["codebook_usage"].item() <= 1
    assert losses["loss"].item() == pytest.approx(losses["recon_loss"].item() + losses["vq_loss"].item(), rel=1e-6)


def test_the_model_returns_its_outputs_and_the_loss_module_owns_the_terms(model):
    """As LlamaGen's VQModel returns (dec, codebook_loss) to its VQLoss: return_quantizer_losses gives the
    reconstruction and the quantizer's outputs, which training's VQRAELoss weighs; return_loss is the convenience
    built on them. The model module imports no loss (nor, through it, a discriminator)."""
    x = smooth_images(2)
    x_rec, quantizer = model(x, return_quantizer_losses=True)  # eval mode: the codebook stays where it is
    x_rec2, losses = model(x, return_loss=True)
    assert torch.equal(x_rec, x_rec2) and "recon_loss" not in quantizer and "loss" not in quantizer
    assert {k: v.item() for k, v in quantizer.items()} == \
        {k: v.item() for k, v in losses.items() if k not in ("recon_loss", "loss")}
    probe = "import sys, stage1.model.vqrae; print(sorted(m for m in sys.modules if m.startswith('stage1.')))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120).stdout
    assert "stage1.model.vqrae" in loaded and "stage1.train" not in loaded and "stage1.data" not in loaded


def test_noise_only_in_training(dinov2_dir):
    torch.manual_seed(0)
    model = tiny_vqrae(dinov2_dir, noise_tau=0.5)
    model.quantizer.initialized.fill_(True)
    x = smooth_images(2)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_save_and_load_give_identical_outputs(model, tmp_path):
    x = smooth_images(2)
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "model.safetensors"]
    weights = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert not any(k.startswith("encoder.") for k in weights)  # the frozen encoder is stored by reference
    assert "quantizer.embedding" in weights and "decoder.head.weight" in weights
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["encoder"]["path"] == model.config.encoder.path
    loaded = VQRAE.from_pretrained(tmp_path / "ckpt").eval()
    assert torch.equal(loaded(x), model(x))
    assert torch.equal(loaded.encode_to_indices(x), model.encode_to_indices(x))


def test_a_loaded_model_is_in_eval_mode_and_a_forward_moves_no_buffer(dinov2_dir, tmp_path):
    """As every Hub-style from_pretrained: a plain model(x) right after loading must not move the EMA codebook."""
    torch.manual_seed(0)
    trained = tiny_vqrae(dinov2_dir, vq_decay=0.5).train()
    trained(smooth_images(32, seed=1))  # starts (8 tokens a code) and moves the codebook: training mode does
    trained.save_pretrained(tmp_path / "ckpt")
    loaded = VQRAE.from_pretrained(tmp_path / "ckpt")
    assert not loaded.training and not any(m.training for m in loaded.modules())
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    loaded(smooth_images(4, seed=2))
    loaded(smooth_images(4, seed=2), return_loss=True)
    after = loaded.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    loaded.train()(smooth_images(4, seed=2))  # and training still trains it
    assert not torch.equal(before["quantizer.embedding"], loaded.state_dict()["quantizer.embedding"])


def test_save_with_encoder_is_self_contained(model, tmp_path):
    x = smooth_images(2)
    model.save_pretrained(tmp_path / "full", save_encoder=True)
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert config["encoder"]["path"] == "encoder"
    loaded = VQRAE.from_pretrained(tmp_path / "full").eval()
    assert torch.equal(loaded(x), model(x))


def test_latent_normalisation_from_stats_file(dinov2_dir, tmp_path):
    g = torch.Generator().manual_seed(3)
    mean, var = torch.randn(32, generator=g), torch.rand(32, generator=g) + 0.5
    save_file({"mean": mean, "var": var}, str(tmp_path / "stats.safetensors"))
    torch.manual_seed(0)
    plain = tiny_vqrae(dinov2_dir, reshape_to_2d=False).eval()
    torch.manual_seed(0)
    normed = tiny_vqrae(dinov2_dir, reshape_to_2d=False, normalization_stat_path=str(tmp_path / "stats.safetensors"))
    normed.eval()
    x = smooth_images(2)
    expected = (plain.features(x) - mean) / (var + 1e-5).sqrt()  # RAE's epsilon
    assert torch.allclose(normed.features(x), expected, atol=1e-5)
    # The statistics travel with the weights: the reloaded model no longer needs the file.
    normed.save_pretrained(tmp_path / "ckpt")
    os.remove(tmp_path / "stats.safetensors")
    assert torch.allclose(VQRAE.from_pretrained(tmp_path / "ckpt").features(x), expected, atol=1e-5)
    save_file({"mean": mean[:8], "var": var[:8]}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"expected mean and var of shape \[32\] or \[32, h, w\]"):
        tiny_vqrae(dinov2_dir, normalization_stat_path=str(tmp_path / "bad.safetensors"))


def test_overfitting_four_images_lowers_recon_loss_5x(dinov2_dir):
    torch.manual_seed(0)
    model = tiny_vqrae(dinov2_dir, vq_decay=0.9).train()
    x = smooth_images(4, seed=1)
    optimizer = torch.optim.AdamW(model.decoder.parameters(), lr=2e-3)
    history = []
    # A loop of one's own without a codebook fit: the start gathers 8 tokens a code (8 steps of 64), and says so.
    with pytest.warns(UserWarning, match="the codebook has not started; gathering 512 tokens"):
        for _ in range(300):
            _, losses = model(x, return_loss=True)
            optimizer.zero_grad()
            losses["loss"].backward()
            optimizer.step()
            history.append(losses["recon_loss"].item())
    assert bool(model.quantizer.initialized)
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    print(f"recon_loss {first:.4f} -> {last:.4f}")
    assert last < first / 5, (first, last)


BAD_IMAGES = [
    (torch.rand(2, 4, 32, 32), re.escape("expected 3 (RGB) channels, got 4 channels in shape (2, 4, 32, 32)")),
    (torch.rand(3, 32, 32), r"expected images of shape \(B, 3, H, W\), got rank 3"),
    ((torch.rand(2, 3, 32, 32) * 255).to(torch.uint8), "expected float images in \\[0, 1\\], got dtype torch.uint8"),
    (torch.rand(2, 3, 32, 32) * 255, r"expected finite pixel values in \[0, 1\], got values in"),
    (torch.full((1, 3, 32, 32), float("nan")), "expected finite pixel values"),
    (torch.full((1, 3, 32, 32), float("inf")), "expected finite pixel values"),
    (torch.rand(1, 3, 32, 32).double().to(torch.complex64), "expected float images"),
    (torch.rand(0, 3, 32, 32), "non-empty batch"),
    (torch.rand(2, 3, 0, 32), r"non-empty batch of images, got shape \(2, 3, 0, 32\)"),
]


@pytest.mark.parametrize("images,message", BAD_IMAGES)
def test_bad_images_raise_clear_errors(model, images, message):
    with pytest.raises(ValueError, match=message):
        model.encode_to_indices(images)
    with pytest.raises(ValueError, match=message):
        model(images)


def test_image_size_must_fit_the_patch_size_without_resizing(dinov2_dir):
    model = tiny_vqrae(dinov2_dir, encoder_input_size=None)
    with pytest.raises(ValueError, match=r"image size \(30, 32\) must be a multiple of the encoder's patch size \(8\)"):
        model.encode_to_indices(torch.rand(1, 3, 30, 32))
    message = r"encoder_input_size \(30\) must be a multiple of the encoder's patch size \(8\)"
    with pytest.raises(ValueError, match=message):
        tiny_vqrae(dinov2_dir, encoder_input_size=30)


BAD_INDICES = [
    (torch.zeros(1, 4, 4), "expected integer indices \\(torch.long\\), got dtype torch.float32"),
    (torch.full((1, 4, 4), 64), re.escape("indices must lie in [0, 63] (codebook size 64), got values in [64, 64]")),
    (torch.full((1, 4, 4), -1), re.escape("got values in [-1, -1]")),
    (torch.zeros(4, dtype=torch.long), r"expected indices of shape \(B, h, w\) or \(B, h\*w\), got shape \(4,\)"),
    (torch.zeros(1, 15, dtype=torch.long), "15 tokens do not form a square grid"),
]


@pytest.mark.parametrize("indices,message", BAD_INDICES)
def test_bad_indices_raise_clear_errors(model, indices, message):
    with pytest.raises(ValueError, match=message):
        model.decode_from_indices(indices)


def test_weights_with_nan_or_the_wrong_dtype_are_refused_when_loaded(model, tmp_path):
    """Issue 20: a codebook of NaN tokenized every image to code 0, and an integer codebook or Inf decoder weights
    loaded silently. Weights are checked for dtype and finiteness when loaded."""
    model.save_pretrained(tmp_path / "ckpt")
    good = load_file(tmp_path / "ckpt" / "model.safetensors")
    embedding, head = good["quantizer.embedding"], good["decoder.head.weight"]
    cases = [("quantizer.embedding", embedding * float("nan"), r"NaN or Inf in \['quantizer.embedding'\]"),
             ("decoder.head.weight", head + float("inf"), r"NaN or Inf in \['decoder.head.weight'\]"),
             ("quantizer.embedding", embedding.round().int(), "quantizer.embedding: torch.int32 for torch.float32"),
             ("quantizer.initialized", torch.tensor(1.0), "quantizer.initialized: torch.float32 for torch.bool")]
    for key, value, message in cases:
        save_file({**good, key: value}, tmp_path / "ckpt" / "model.safetensors")
        with pytest.raises(ValueError, match=message):
            VQRAE.from_pretrained(tmp_path / "ckpt")
    save_file(good, tmp_path / "ckpt" / "model.safetensors")
    VQRAE.from_pretrained(tmp_path / "ckpt")


def test_broken_checkpoints_give_clear_errors(model, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="is not a VQRAE checkpoint"):
        VQRAE.from_pretrained(tmp_path / "nothing-here")
    # A missing path is answered at once, not retried as a Hub id (it took ~70 s without network).
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such directory .*a local path, not a Hub repo id"):
        VQRAE.from_pretrained("results/quickstart/final")
    with pytest.raises(FileNotFoundError, match=r"no such directory, and not in the Hugging Face cache with the Hub "
                                                r"off \(HF_HUB_OFFLINE=1\)"):
        VQRAE.from_pretrained("results/final")  # reads as org/name, but the tests run offline, with no such cache
    (tmp_path / "results").mkdir()  # now results/ is a folder here: results/final is a missing run, known at once
    with pytest.raises(FileNotFoundError, match=r"'results/final' is not a VQRAE checkpoint: no such directory "
                                                r"\(seen from .*\), and a local path, not a Hub repo id"):
        VQRAE.from_pretrained("results/final")
    model.save_pretrained(tmp_path / "ckpt")
    weights = load_file(tmp_path / "ckpt" / "model.safetensors")
    weights["quantizer.embedding"] = weights["quantizer.embedding"][:10]
    save_file(weights, str(tmp_path / "ckpt" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"quantizer.embedding: file \(10, 32\) vs model \(64, 32\)"):
        VQRAE.from_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["encoder"]["cls"] = "DINOv9"
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="Unknown encoder_cls 'DINOv9'"):
        VQRAE.from_pretrained(tmp_path / "ckpt")


@pytest.mark.filterwarnings("ignore:VectorQuantizer. the codebook has not started")  # 8192 codes, one small batch
def test_developers_md_api_block_runs_as_written(dinov2_dir):
    text = open(os.path.join(os.path.dirname(__file__), "..", "DEVELOPERS.md")).read()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert "facebook/dinov2-base" in block
    # The Hub id is not reachable offline: the same code runs on a local tiny checkpoint directory.
    code = block.replace('"facebook/dinov2-base"', repr(dinov2_dir))
    namespace = {"x": smooth_images(2, size=224)}
    exec(compile(code, "DEVELOPERS.md", "exec"), namespace)
    indices, losses = namespace["indices"], namespace["losses"]
    assert indices.shape == (2, 28, 28)  # 224 px / the tiny encoder's 8 px patches
    assert {"recon_loss", "vq_loss"} <= set(losses)
    assert namespace["x_rec"].shape == (2, 3, 28 * 16, 28 * 16)  # decoder patch 16: native 448 px


def test_training_forward_checks_shapes_but_syncs_no_pixel_values(model, monkeypatch):
    bad = torch.full((1, 3, 32, 32), 2.0)
    model.train()
    try:
        with pytest.raises(ValueError, match="expected 3 \\(RGB\\) channels"):
            model(torch.rand(1, 4, 32, 32))  # shape checks stay: they cost no sync
        monkeypatch.setattr(torch, "aminmax", lambda *a, **k: pytest.fail("pixel range read in a training step"))
        model(bad)
    finally:
        model.eval()
        monkeypatch.undo()
    with pytest.raises(ValueError, match="expected finite pixel values"):
        model(bad)
    with pytest.raises(ValueError, match="expected finite pixel values"):
        model.check_images(bad)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.int16, torch.int32, torch.uint32])
def test_decode_from_indices_takes_any_integer_dtype(model, dtype):
    """Issue 12, case 9: vqrae-tokenize writes the smallest unsigned dtype (uint16 for K > 256)."""
    indices = model.encode_to_indices(smooth_images(2))
    assert torch.equal(model.decode_from_indices(indices.to(dtype)), model.decode_from_indices(indices))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 63\]"):
        model.decode_from_indices(torch.full_like(indices, 64).to(dtype))


def test_damaged_checkpoints_get_one_clear_error(model, tmp_path):
    """Issue 12, case 5: a truncated model.safetensors or a missing config.json is named, not a traceback."""
    model.save_pretrained(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        VQRAE.from_pretrained(tmp_path / "ckpt")
    os.remove(tmp_path / "ckpt" / "config.json")
    with pytest.raises(FileNotFoundError, match="is not a VQRAE checkpoint: it has no config.json"):
        VQRAE.from_pretrained(tmp_path / "ckpt")


def test_a_saved_model_loads_from_any_working_directory(dinov2_dir, tmp_path, monkeypatch):
    """Issue 12, case 8: a local encoder given as a relative path is stored so that it resolves from anywhere; a
    missing local encoder gets advice that fits (the --encoder-path flag, no Hub download of a folder name)."""
    import shutil

    from stage1 import EncoderNotAvailableError

    shutil.copytree(dinov2_dir, tmp_path / "work" / "encoders" / "tiny")
    monkeypatch.chdir(tmp_path / "work")
    torch.manual_seed(0)
    model = tiny_vqrae("encoders/tiny").eval()
    model.save_pretrained("model")
    x = smooth_images(2)
    monkeypatch.chdir(tmp_path)  # somewhere else
    assert torch.equal(VQRAE.from_pretrained(tmp_path / "work" / "model").eval()(x), model(x))
    shutil.rmtree(tmp_path / "work" / "encoders")
    with pytest.raises(EncoderNotAvailableError, match="no such directory.*--encoder-path DIR to the commands, "
                                                       "encoder.path=DIR to training") as err:
        VQRAE.from_pretrained(tmp_path / "work" / "model")
    assert "huggingface-cli" not in str(err.value)
