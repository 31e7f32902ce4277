import json
import shutil

import pytest
import torch
from helpers import CUSTOM_MEAN, CUSTOM_STD, TINY

from stage1 import ENCODERS, EncoderNotAvailableError, build_encoder
from stage1.model.tiny import TINY_FAMILIES

NAMES = list(TINY_FAMILIES)


@pytest.fixture(scope="module")
def encoders(tiny_encoders):
    return {name: build_encoder(*tiny_encoders[name]) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_patch_grid_shape_on_non_square_images(encoders, name):
    encoder = encoders[name]
    x = torch.rand(2, 3, 32, 48)
    tokens = encoder(x)
    p = TINY["patch_size"]
    # CLS / register tokens dropped: exactly one token per patch.
    assert tokens.shape == (2, (32 // p) * (48 // p), TINY["hidden_size"])
    assert torch.isfinite(tokens).all()


@pytest.mark.parametrize("name", NAMES)
def test_encoder_is_frozen(encoders, name):
    encoder = encoders[name]
    wrapper = torch.nn.Sequential(encoder)
    wrapper.train()
    assert not encoder.training and not encoder.model.training
    assert all(not p.requires_grad for p in encoder.parameters())
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    tokens = encoder(x)
    assert not tokens.requires_grad  # ran under no_grad: no graph into the encoder
    head = torch.nn.Linear(tokens.shape[-1], 1)
    head(tokens).sum().backward()
    assert head.weight.grad is not None
    assert all(p.grad is None for p in encoder.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_final_layernorm_has_no_affine_so_tokens_are_normalised(encoders, name):
    tokens = encoders[name](torch.rand(2, 3, 32, 32))
    assert torch.allclose(tokens.mean(-1), torch.zeros(()), atol=1e-4)
    assert torch.allclose(tokens.var(-1, unbiased=False), torch.ones(()), atol=1e-2)


@pytest.mark.parametrize("name", NAMES)
def test_a_saved_encoder_is_the_whole_checkpoint(encoders, tiny_encoders, name, tmp_path):
    """save_pretrained gives back what was loaded, the final LayerNorm's dropped affine included: transformers loads
    it with no weight missing (no "newly initialized" report), and it is the same encoder with the affine (normalize
    false) and without."""
    cls, tiny = tiny_encoders[name]
    model = type(encoders[name].model).from_pretrained(tiny)  # the tiny checkpoint with a final affine that shows
    norm = getattr(model, "post_layernorm" if hasattr(model, "post_layernorm") else "layernorm")
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    source = str(tmp_path / "source")
    model.save_pretrained(source)
    encoder = build_encoder(cls, source)
    encoder.save_pretrained(str(tmp_path / "saved"))
    _, info = type(encoder.model).from_pretrained(str(tmp_path / "saved"), output_loading_info=True)
    assert not info["missing_keys"]
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(build_encoder(cls, str(tmp_path / "saved"))(x), encoder(x))
    with_affine = build_encoder(cls, source, normalize=False)(x)
    assert torch.equal(build_encoder(cls, str(tmp_path / "saved"), normalize=False)(x), with_affine)
    assert not torch.allclose(with_affine, encoder(x), atol=1e-3)  # the affine is there, and not the identity


def test_input_normalisation_read_from_preprocessor_config(encoders):
    encoder = encoders["dinov2"]
    assert encoder.image_mean.flatten().tolist() == pytest.approx(CUSTOM_MEAN)
    assert encoder.image_std.flatten().tolist() == pytest.approx(CUSTOM_STD)
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(CUSTOM_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CUSTOM_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        manual = encoder.model(pixel_values=(x - mean) / std).last_hidden_state[:, 1:]
    assert torch.allclose(encoder(x), manual, atol=1e-6)
    # Without a preprocessor config the family's defaults apply (SigLIP: 0.5 / 0.5).
    assert encoders["siglip"].image_mean.flatten().tolist() == pytest.approx([0.5] * 3)


def test_registers_are_dropped(encoders):
    encoder = encoders["dinov2_reg"]
    x = torch.rand(1, 3, 32, 32)
    pixel_values = (x - encoder.image_mean) / encoder.image_std
    with torch.no_grad():
        full = encoder.model(pixel_values=pixel_values).last_hidden_state
    assert full.shape[1] == 1 + 4 + 16
    assert torch.equal(encoder(x), full[:, 5:])


def test_mae_keeps_every_patch_in_order(encoders):
    encoder = encoders["mae"]
    assert encoder.model.config.mask_ratio == 0.0
    x = torch.rand(2, 3, 32, 32)
    first, second = encoder(x), encoder(x)
    # ViT-MAE shuffles tokens by random noise unless told otherwise: repeated calls would differ.
    assert torch.equal(first, second)
    # The token at each position depends on its own patch: change one patch, that token moves most.
    y = x.clone()
    y[:, :, 8:16, 16:24] = 1 - y[:, :, 8:16, 16:24]
    change = (encoder(y) - first).norm(dim=-1).mean(0)
    assert change.argmax().item() == 1 * 4 + 2


def test_siglip2_naflex_patch_layout_matches_image_processor(encoders):
    from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

    encoder = encoders["siglip2_naflex"]
    x = torch.rand(2, 3, 32, 48)
    pixel_values = (x - encoder.image_mean) / encoder.image_std
    patches = torch.stack([convert_image_to_patches(img, 8) for img in pixel_values])
    with torch.no_grad():
        expected = encoder.model(
            pixel_values=patches,
            pixel_attention_mask=torch.ones(2, 24, dtype=torch.long),
            spatial_shapes=torch.tensor([[4, 6], [4, 6]]),
        ).last_hidden_state
    assert torch.allclose(encoder(x), expected, atol=1e-6)


def test_missing_weights_give_one_clear_error(tmp_path):
    with pytest.raises(EncoderNotAvailableError) as err:
        build_encoder("Dinov2withNorm", "no-such-org/no-such-dinov2")
    message = str(err.value)
    assert "no-such-org/no-such-dinov2" in message and "--local-dir" in message
    with pytest.raises(EncoderNotAvailableError):
        build_encoder("MAE", str(tmp_path / "empty-dir"))


def test_unknown_encoder_name_and_wrong_family(tiny_encoders):
    with pytest.raises(ValueError, match="Unknown encoder_cls 'DINOv9'.*Dinov2withNorm"):
        build_encoder("DINOv9", "whatever")
    with pytest.raises(ValueError, match="expects a ViT-MAE checkpoint, got model_type='dinov2'"):
        build_encoder("MAE", tiny_encoders["dinov2"][1])
    assert {"Dinov2withNorm", "SigLIP2", "MAE"} <= set(ENCODERS)


def test_a_model_folder_that_would_run_its_own_code_is_refused_without_running_it(tmp_path):
    """Issue 20: an encoder config.json with an auto_map made transformers ask "run the custom code? [y/N]", and a
    `y` on standard input ran the folder's Python. Every load says trust_remote_code=False: one clear error."""
    import subprocess
    import sys

    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "evil_vit", "hidden_size": 8, "auto_map": {
        "AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}}))
    marker = tmp_path / "RAN"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    probe = ("import sys\nfrom stage1.model.encoders import build_encoder\ntry:\n"
             f"    build_encoder('Dinov2withNorm', {str(folder)!r})\nexcept ValueError as err:\n    print(err)\n")
    run = subprocess.run([sys.executable, "-c", probe], input="y\ny\n", capture_output=True, text=True, timeout=120)
    assert "asks to run Python code of its own (auto_map in its config.json)" in run.stdout, run.stdout + run.stderr
    assert not marker.exists()


@pytest.mark.parametrize("stats, message", [
    ({"image_mean": [0.5, 0.5, 0.5], "image_std": [0, 0, 0]},
     r"image_std must be a list of 3 numbers from 1e-6 to 1000 \(a std of 0 makes every image one input\)"),
    ({"image_mean": None}, r"image_mean must be a list of 3 numbers from -1000 to 1000, got None"),
    ({"image_mean": [0.5, 0.5]}, r"image_mean must be a list of 3 numbers from -1000 to 1000, got \[0.5, 0.5\]"),
    ({"image_std": ["1", 1, 1]}, r"image_std must be a list of 3"),
    # A second probe: finite in JSON, Inf in float32 (every image code 0), or so wide every image is one input.
    ({"image_mean": [3.5e38] * 3}, r"image_mean must be a list of 3 numbers from -1000 to 1000"),
    ({"image_std": [1e300] * 3}, r"image_std must be a list of 3 numbers from 1e-6 to 1000"),
    ([0.5, 0.5, 0.5], r"expected a JSON object \(with image_mean / image_std\), got list"),
])
def test_a_hostile_preprocessor_config_is_one_error(tiny_encoders, tmp_path, stats, message):
    """Issue 32, point 3: image_std [0, 0, 0] was accepted (every token one code, exit 0); a null mean or a list
    in place of the object were tracebacks."""
    import shutil

    cls, folder = tiny_encoders["dinov2"]
    copy = tmp_path / "encoder"
    shutil.copytree(folder, copy)
    (copy / "preprocessor_config.json").write_text(json.dumps(stats))
    with pytest.raises(ValueError, match=message):
        build_encoder(cls, str(copy))


@pytest.mark.parametrize("key, value, message", [
    ("patch_size", 0, r"cannot be built from its config.json and weights \(ZeroDivisionError"),
    ("hidden_act", "nope", r"cannot be built from its config.json and weights \(KeyError: 'nope'\)"),
    ("patch_size", [8, 8], r"patch_size and hidden_size must be positive integers \(square patches\), got \[8, 8\]"),
    ("hidden_size", "32", r"cannot be built from its config.json and weights \(StrictDataclassFieldValidationError"),
    ("model_type", "nosuch", r"cannot be built from its config.json and weights \(ValueError: .*nosuch"),
    ("num_hidden_layers", 7, r"describes 7 layers of width 32 .* not this checkpoint's config"),
])
def test_an_encoder_folder_transformers_cannot_build_is_one_error_naming_it(tiny_encoders, tmp_path, key, value,
                                                                             message):
    """A second probe of issue 32: an encoder folder's config.json edited (a patch size of 0, an unknown activation or
    model_type, a size of another type) was a ZeroDivisionError, KeyError or TypeError from transformers, or "no such
    directory" for a folder that exists; a config.json of 200,000 nested brackets a RecursionError."""
    folder = tmp_path / "encoder"
    shutil.copytree(tiny_encoders["dinov2"][1], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ValueError, match=message):
        build_encoder("Dinov2withNorm", str(folder))
    (folder / "config.json").write_text("[" * 200_000)
    with pytest.raises(ValueError, match="config.json nests too deeply to be read"):
        build_encoder("Dinov2withNorm", str(folder))

