"""RAE interop: RAE's decoder files load into ViTDecoder exactly, RAE's stat.pt loads, and the continuous model
(quantizer.kind=none) is RAE's pipeline. The reference is tests/rae_reference.py (transformers' ViT-MAE layers in
RAE's layout); tolerances are fp32 rounding (1e-5)."""

import json
import os
from unittest import mock

import pytest
import torch
from helpers import smooth_images
from rae_reference import ReferenceDecoder, rae_dinov2, rae_forward, randomize

from stage1 import VQRAE
from stage1.model.decoder import ViTDecoder
from stage1.model.encoders import IMAGENET_MEAN, IMAGENET_STD
from stage1.model.rae import decoder_state_from_rae, rae_decoder_config, read_rae_decoder
from stage1.model.tiny import save_tiny_encoder

MEAN, STD = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
WIDTH, GRID, INPUT = 32, 4, 32  # tiny DINOv2 with registers: 32 channels, patch 8 at 32 px -> 4 x 4 tokens


@pytest.fixture(scope="module")
def reg_dir(tmp_path_factory):
    return save_tiny_encoder("dinov2_reg", str(tmp_path_factory.mktemp("reg")), hidden_size=WIDTH,
                             num_hidden_layers=2, num_attention_heads=2, patch_size=8, image_size=INPUT)


@pytest.fixture(scope="module")
def rae_files(tmp_path_factory):
    """A random RAE decoder for the tiny encoder, released as RAE does: model.pt + a ViT-MAE config directory."""
    reference = randomize(ReferenceDecoder(WIDTH, 48, 2, 4, 96, patch_size=8, num_patches=GRID * GRID)).eval()
    weights, config = reference.save_rae_files(str(tmp_path_factory.mktemp("rae")))
    return reference, weights, config


def rae_stats(root, per_position=True):
    g = torch.Generator().manual_seed(3)
    shape = (WIDTH, GRID, GRID) if per_position else (WIDTH,)
    stats = {"mean": torch.randn(shape, generator=g) * 0.3, "var": torch.rand(shape, generator=g) + 0.5}
    path = os.path.join(root, "stat.pt")
    torch.save(stats, path)
    return stats, path


@pytest.mark.parametrize("sizes", [(32, 48, 2, 4, 96, 8, 4), (16, 64, 3, 2, 100, 4, 3), (24, 32, 1, 1, 32, 2, 5)])
def test_decoder_equals_raes_general_decoder(tmp_path, sizes):
    latent, hidden, layers, heads, intermediate, patch, side = sizes
    reference = randomize(ReferenceDecoder(latent, hidden, layers, heads, intermediate, patch, side * side),
                          seed=sum(sizes)).eval()
    assert reference.trainable_cls_token.abs().sum() > 0  # a non-zero CLS token takes part
    weights, config_dir = reference.save_rae_files(str(tmp_path))
    decoder = ViTDecoder(latent, rae_decoder_config(config_dir, patch), grid_size=side).eval()
    decoder.load_state_dict(decoder_state_from_rae(read_rae_decoder(weights)))
    z = torch.randn(3, side * side, latent, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (decoder(z, (side, side)) - reference(z)).abs().max().item()
    assert diff <= 1e-5, diff
    assert decoder.pos_embed.requires_grad is False and "pos_embed" in decoder.state_dict()  # fixed, and saved


def test_continuous_model_is_raes_forward(reg_dir, rae_files, tmp_path):
    reference, weights, config = rae_files
    model = VQRAE.from_rae(weights, config, encoder_config_path=reg_dir, encoder_input_size=INPUT,
                           decoder_patch_size=8)
    assert model.config.quantizer.kind == "none"
    encoder = rae_dinov2(reg_dir)
    x = smooth_images(2, size=INPUT, seed=4)
    model.eval()
    with torch.no_grad():
        expected = rae_forward(encoder, reference, x, INPUT, MEAN, STD)
        assert (model.decode(model.encode(x), clamp=False) - expected).abs().max().item() <= 1e-5
        # Training mode: no clamp, and RAE's latent noise drawn in RAE's order from the same seed.
        model.train()
        model.config.noise_tau = 0.8
        torch.manual_seed(7)
        ours = model(x)
        torch.manual_seed(7)
        noisy = rae_forward(encoder, reference, x, INPUT, MEAN, STD, noise_tau=0.8)
    assert (ours - noisy).abs().max().item() <= 1e-5
    assert (noisy - expected).abs().max().item() > 1e-2  # the noise was really there


@pytest.mark.parametrize("per_position", [True, False])
def test_rae_stat_pt_and_resize_as_rae(reg_dir, rae_files, tmp_path, per_position):
    reference, weights, config = rae_files
    stats, stat_path = rae_stats(str(tmp_path), per_position)
    model = VQRAE.from_rae(weights, config, stat_path, encoder_config_path=reg_dir, encoder_input_size=INPUT,
                           decoder_patch_size=8, reshape_to_2d=False).eval()
    x = smooth_images(2, size=40, seed=5)  # resized to 32 as RAE resizes: bicubic, no antialias
    encoder = rae_dinov2(reg_dir)
    with torch.no_grad():
        resized = torch.nn.functional.interpolate(x, size=(INPUT, INPUT), mode="bicubic", align_corners=False)
        raw = encoder((resized - MEAN) / STD)
        layout = stats["mean"].flatten(1).T if per_position else stats["mean"]
        scale = (stats["var"].flatten(1).T if per_position else stats["var"]) + 1e-5
        assert (model.encode(x) - (raw - layout) / scale.sqrt()).abs().max().item() <= 1e-5
        expected = rae_forward(encoder, reference, x, INPUT, MEAN, STD, stats=stats)
        assert (model.decode(model.encode(x), clamp=False) - expected).abs().max().item() <= 1e-5
    # Saved and loaded back: the stats travel in the weights (per position too), the fixed layout in the config.
    model.save_pretrained(tmp_path / "saved")
    loaded = VQRAE.from_pretrained(tmp_path / "saved", encoder_config_path=reg_dir).eval()
    with torch.no_grad():
        assert torch.equal(loaded.decode(loaded.encode(x), clamp=False), model.decode(model.encode(x), clamp=False))


def test_codebook_in_front_of_an_rae_decoder(reg_dir, rae_files):
    reference, weights, config = rae_files
    model = VQRAE.from_rae(weights, config, encoder_config_path=reg_dir, encoder_input_size=INPUT,
                           decoder_patch_size=8, num_embeddings=16).eval()
    assert model.config.quantizer.kind == "single"
    x = smooth_images(2, size=INPUT, seed=6)
    indices = model.encode_to_indices(x)
    with torch.no_grad():
        codes = model.quantizer.lookup(indices.flatten(1))
        expected = reference(codes) * STD + MEAN  # the decoder gets the (raw) code vectors, as RAE's does
    assert (model.decode_from_indices(indices) - expected.clamp(0, 1)).abs().max().item() <= 1e-5


def test_continuous_model_has_no_codes(reg_dir, rae_files):
    _, weights, config = rae_files
    model = VQRAE.from_rae(weights, config, encoder_config_path=reg_dir, encoder_input_size=INPUT,
                           decoder_patch_size=8)
    with pytest.raises(ValueError, match="continuous .*no codes"):
        model.encode_to_indices(smooth_images(1, size=INPUT))
    _, losses = model.train()(smooth_images(2, size=INPUT), return_loss=True)
    assert losses["vq_loss"].item() == 0 and losses["loss"].item() == losses["recon_loss"].item()


def test_bad_rae_files_get_one_clear_error(tmp_path, rae_files, reg_dir):
    reference, weights, config = rae_files
    state = reference.rae_state_dict()
    with pytest.raises(ValueError, match="unexpected tensors.*mask_token"):
        decoder_state_from_rae({**state, "mask_token": torch.zeros(1)})
    with pytest.raises(ValueError, match="query, key, value"):
        decoder_state_from_rae({k: v for k, v in state.items() if ".key." not in k})
    # DDP / compile prefixes and a whole RAE model's state dict are accepted.
    wrapped = {f"module.decoder.{k}": v for k, v in state.items()} | {"encoder.layer.weight": torch.zeros(1)}
    assert decoder_state_from_rae(wrapped).keys() == decoder_state_from_rae(state).keys()
    # A decoder for another grid: the shapes are named.
    with pytest.raises(ValueError, match="pos_embed"):
        VQRAE.from_rae(weights, config, encoder_config_path=reg_dir, encoder_input_size=24, decoder_patch_size=8)
    with pytest.raises(ValueError, match="not a ViT-MAE decoder config"):
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "config.json").write_text(json.dumps({"hidden_size": 8}))
        rae_decoder_config(str(tmp_path / "bad"), 8)
    # Issue 32, point 2: a config's values are typed (eps null was float()'s TypeError, qkv_bias "false" was true),
    # a key of the weights must be a name (an int key was an AttributeError) ...
    rae_config = json.loads(open(os.path.join(config, "config.json")).read())
    for key, value, expected in [("layer_norm_eps", None, "decoder.layer_norm_eps must be a finite number, got None"),
                                 ("qkv_bias", "false", "decoder.qkv_bias must be true or false, got 'false'")]:
        (tmp_path / "bad" / "config.json").write_text(json.dumps({**rae_config, key: value}))
        with pytest.raises(ValueError, match=expected):
            rae_decoder_config(str(tmp_path / "bad"), 8)
    torch.save({**state, 0: torch.zeros(1)}, tmp_path / "int_key.pt")
    with pytest.raises(ValueError, match="not a flat state dict of tensors"):
        read_rae_decoder(str(tmp_path / "int_key.pt"))
    # ... and a config of 100,000 layers beside these weights is refused before the decoder is built.
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**rae_config, "decoder_num_hidden_layers": 10**5}))
    with mock.patch("stage1.model.vqrae.ViTDecoder", side_effect=AssertionError("built")), \
            pytest.raises(ValueError, match=r"hold [\d,]+ numbers, but its config describes a decoder of at least"):
        VQRAE.from_rae(weights, str(tmp_path / "bad"), encoder_config_path=reg_dir, encoder_input_size=INPUT,
                       decoder_patch_size=8)


class Payload:
    """Not a tensor: torch.load(weights_only=True) must refuse to rebuild it."""


def test_pickled_objects_in_rae_files_are_refused(tmp_path):
    from stage1.model.latent_stats import read_latent_stats

    torch.save({"mean": torch.zeros(4), "var": torch.ones(4), "extra": Payload()}, tmp_path / "stat.pt")
    with pytest.raises(ValueError, match="not a safetensors file or a torch file of tensors"):
        read_latent_stats(str(tmp_path / "stat.pt"), 4)
    torch.save({"decoder_embed.weight": Payload()}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="RAE decoder weights .* not a safetensors file or a torch file of tensors"):
        read_rae_decoder(str(tmp_path / "model.pt"))
    torch.save({"mean": torch.zeros(4), "var": [1.0] * 4}, tmp_path / "list.pt")  # loads, but is no tensor
    with pytest.raises(ValueError, match=r"shape \[4\] or \[4, h, w\].*'list'"):
        read_latent_stats(str(tmp_path / "list.pt"), 4)
    torch.save({"mean": torch.zeros(5), "var": torch.ones(5)}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match=r"shape \[4\] or \[4, h, w\]"):
        read_latent_stats(str(tmp_path / "wrong.pt"), 4)


def test_commands_evaluate_and_reconstruct_a_continuous_model(reg_dir, rae_files, tmp_path, capsys):
    from torchvision.utils import save_image

    from stage1.cli import evaluate, reconstruct
    from stage1.data.images import load_image, psnr

    _, weights, config = rae_files
    model = VQRAE.from_rae(weights, config, encoder_config_path=reg_dir, encoder_input_size=INPUT,
                           decoder_patch_size=8).eval()
    model.save_pretrained(tmp_path / "rae")
    images = smooth_images(3, size=INPUT, seed=8)
    (tmp_path / "images").mkdir()
    for i, image in enumerate(images):
        save_image(image, tmp_path / "images" / f"{i}.png")
    x = torch.stack([load_image(str(tmp_path / "images" / f"{i}.png"))[0] for i in range(3)])  # 8-bit, as read
    with torch.no_grad():
        expected = psnr(model(x), x)
    out = tmp_path / "eval"
    assert evaluate.main(["--model", str(tmp_path / "rae"), "--data", str(tmp_path / "images"), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["psnr"] == pytest.approx(expected.mean().item(), rel=1e-5)
    assert results["codebook_usage"] is None and "continuous" in results["notes"]["codes"]
    assert not (out / "code_usage.png").exists()
    argv = ["--model", str(tmp_path / "rae"), "--image", str(tmp_path / "images" / "0.png"), "--out",
            str(tmp_path / "rec.png")]
    assert reconstruct.main(argv) == 0
    assert f"PSNR {expected[0].item():.2f} dB" in capsys.readouterr().out
    # The commands that only make sense with codes say so before they write anything.
    from stage1.cli import fit_codebook, tokenize

    for command in (tokenize, fit_codebook):
        out = tmp_path / f"out_{command.__name__.rsplit('.', 1)[-1]}"
        argv = ["--model", str(tmp_path / "rae"), "--data", str(tmp_path / "images"), "--out", str(out)]
        assert command.main(argv) == 2
        assert "continuous model (quantizer.kind=none): it has no codes" in capsys.readouterr().err
        assert not out.exists()


def test_training_a_continuous_model(train_images, tmp_path):
    from helpers import run_training, train_metrics

    summary = run_training(train_images, tmp_path / "run", "quantizer.kind=none", "train.steps=4")
    logged = train_metrics(tmp_path / "run")
    assert not any("codebook_fit" in line for line in logged)  # nothing to fit
    losses = [line["loss"] for line in logged if "loss" in line]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    model = VQRAE.from_pretrained(summary["final"])
    assert model.config.quantizer.kind == "none" and not any(k.startswith("quantizer.") for k in
                                                             model.state_dict())


def test_rae_presets_are_raes_decoder_configs(tmp_path):
    """decoder=rae_vit_xl (and _b, _l) is what rae_decoder_config makes of RAE's ViT-MAE config files."""
    from stage1.model.keywords import load_decoder_config

    sizes = {"b": (768, 12, 12, 3072), "l": (1024, 24, 16, 4096), "xl": (1152, 28, 16, 4096)}  # RAE's files
    for name, (hidden, layers, heads, intermediate) in sizes.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({
            "decoder_hidden_size": hidden, "decoder_num_hidden_layers": layers, "decoder_num_attention_heads": heads,
            "decoder_intermediate_size": intermediate, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
            "qkv_bias": True}))
        assert load_decoder_config(f"rae_vit_{name}") == rae_decoder_config(str(tmp_path / f"{name}.json"), 16)


def test_training_starts_from_an_rae_decoder(train_images, tmp_path):
    """pretrained_decoder_path loads RAE's model.pt into a decoder in RAE's layout before step 0 (lr 1e-12 keeps it
    there)."""
    from helpers import run_training
    from safetensors.torch import load_file

    reference = randomize(ReferenceDecoder(64, 32, 1, 2, 64, patch_size=8, num_patches=16), seed=5)
    weights, _ = reference.save_rae_files(str(tmp_path / "rae"))
    layout = ["decoder.hidden_size=32", "decoder.num_hidden_layers=1", "decoder.intermediate_size=64",
              "decoder.cls_token=true", "decoder.pos_embed=fixed", "decoder.layer_norm_eps=1e-12",
              "decoder.pixel_space=encoder"]
    summary = run_training(train_images, tmp_path / "run", *layout, f"pretrained_decoder_path={weights}",
                           "train.steps=1", "train.lr=1e-12", "train.min_lr=1e-12",
                           "train.report_reconstructions=false")
    final = load_file(os.path.join(summary["final"], "model.safetensors"))
    expected = decoder_state_from_rae(reference.rae_state_dict())
    assert all(torch.allclose(final[f"decoder.{k}"], v, atol=1e-8) for k, v in expected.items())
    # Our own layout cannot take RAE's weights: the default sizes need more numbers than the file holds (checked
    # before the decoder is built), RAE's sizes without its CLS token and fixed sin-cos miss tensors.
    with pytest.raises(ValueError, match="hold 17,600 numbers, but its config describes a decoder of at least "
                                         "77,824 .*RAE's layout is decoder=rae_vit_b"):
        run_training(train_images, tmp_path / "bad", f"pretrained_decoder_path={weights}", "train.steps=1")
    with pytest.raises(ValueError, match="do not fit this decoder.*cls_token.*RAE's layout is decoder=rae_vit_b"):
        run_training(train_images, tmp_path / "bad", *layout[:3], f"pretrained_decoder_path={weights}",
                     "train.steps=1")


def test_latent_stats_writes_raes_stat_pt_per_position(reg_dir, tmp_path):
    """vqrae-latent-stats --per-position --out stat.pt: RAE's format, [C, h, w] over images, read back by VQRAE."""
    from torchvision.utils import save_image

    from stage1 import build_encoder
    from stage1.cli import latent_stats
    from stage1.data.images import load_image

    (tmp_path / "images").mkdir()
    for i, image in enumerate(smooth_images(5, size=INPUT, seed=11)):
        save_image(image, tmp_path / "images" / f"{i}.png")
    out = tmp_path / "stat.pt"
    argv = ["--encoder", reg_dir, "--data", str(tmp_path / "images"), "--out", str(out), "--image-size", str(INPUT),
            "--per-position", "--batch-size", "2"]
    assert latent_stats.main(argv) == 0
    stats = torch.load(out, weights_only=True)
    assert sorted(stats) == ["mean", "var"] and stats["mean"].shape == (WIDTH, GRID, GRID)
    x = torch.stack([load_image(str(tmp_path / "images" / f"{i}.png"))[0] for i in range(5)])
    tokens = build_encoder("Dinov2withNorm", reg_dir)(x).double()  # (5, N, C)
    grid = tokens.permute(0, 2, 1).reshape(5, WIDTH, GRID, GRID)
    assert torch.allclose(stats["mean"].double(), grid.mean(0), atol=1e-5)
    assert torch.allclose(stats["var"].double(), grid.var(0, unbiased=False), atol=1e-5)
    model = VQRAE(encoder_config_path=reg_dir, encoder_input_size=INPUT, decoder_config_path="tiny",
                  decoder_patch_size=8, quantizer_kind="none", normalization_stat_path=str(out),
                  reshape_to_2d=False).eval()
    z = model.encode(x)  # standardised per position: mean 0 and variance var / (var + 1e-5) at every position
    var = stats["var"].flatten(1).T
    assert z.mean(0).abs().max().item() < 1e-4
    assert torch.allclose(z.var(0, unbiased=False), var / (var + 1e-5), atol=1e-4)
    assert latent_stats.main([*argv[:5], str(tmp_path / "stat.npy"), *argv[6:]]) == 2  # an unknown format
