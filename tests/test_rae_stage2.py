"""stage1.RAE and VQRAE under RAE's stage-2 scripts: built from RAE's stage-1 YAML as RAE's
`utils.model_utils.instantiate_from_config` builds it (`target` + `params`), then used as its train.py, sample.py
and calculate_stat.py use it (eval, encode, decode, a compiled encode). The reference is tests/rae_reference.py,
RAE's encode / decode written independently of stage1; tolerances are fp32 rounding (1e-5)."""

import importlib

import pytest
import torch
import yaml
from helpers import smooth_images
from omegaconf import OmegaConf
from rae_reference import ReferenceDecoder, rae_decode, rae_dinov2, rae_encode, randomize

from stage1.base.config_section import ConfigError
from stage1.model.encoders import IMAGENET_MEAN, IMAGENET_STD
from stage1.model.tiny import save_tiny_encoder
from stage1.train.codebook_fit import fit_codebook

MEAN, STD = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
WIDTH, GRID, INPUT, EPS = 32, 4, 32, 1e-3  # an eps other than RAE's default, to see it used


@pytest.fixture(scope="module")
def rae_release(tmp_path_factory):
    """RAE's files for a tiny DINOv2 with registers: model.pt, the decoder config directory, stat.pt ([C, h, w])."""
    root = tmp_path_factory.mktemp("rae")
    encoder = save_tiny_encoder("dinov2_reg", str(root / "encoder"), hidden_size=WIDTH, num_hidden_layers=2,
                                num_attention_heads=2, patch_size=8, image_size=INPUT)
    reference = randomize(ReferenceDecoder(WIDTH, 48, 2, 4, 96, patch_size=8, num_patches=GRID * GRID)).eval()
    weights, decoder_config = reference.save_rae_files(str(root))
    g = torch.Generator().manual_seed(3)
    stats = {"mean": torch.randn(WIDTH, GRID, GRID, generator=g) * 0.3,
             "var": torch.rand(WIDTH, GRID, GRID, generator=g) + 0.5}
    torch.save(stats, root / "stat.pt")
    return dict(encoder=encoder, reference=reference, weights=weights, decoder_config=decoder_config, stats=stats,
                stat_path=str(root / "stat.pt"))


def stage_1_yaml(files, target="stage1.RAE", **changes):
    """The stage_1 section of RAE's configs/stage2/training/ImageNet256/DiTDH-XL_DINOv2-B.yaml, for the tiny files."""
    params = dict(encoder_cls="Dinov2withNorm", encoder_config_path=files["encoder"], encoder_input_size=INPUT,
                  encoder_params={"dinov2_path": files["encoder"], "normalize": True},
                  decoder_config_path=files["decoder_config"], decoder_patch_size=8,
                  pretrained_decoder_path=files["weights"], noise_tau=0.0, reshape_to_2d=True,
                  normalization_stat_path=files["stat_path"], eps=EPS)
    return yaml.safe_dump({"stage_1": {"target": target, "params": {**params, **changes}}})


def instantiate_from_config(config):
    """RAE's utils.model_utils.instantiate_from_config, without its `ckpt` branch."""
    module, name = config["target"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**config.get("params", {}))


def build(files, target="stage1.RAE", **changes):
    """As RAE's utils.train_utils.parse_configs reads its YAML (OmegaConf: params are a DictConfig)."""
    return instantiate_from_config(OmegaConf.create(stage_1_yaml(files, target, **changes)).stage_1)


def test_rae_from_raes_yaml_encodes_and_decodes_as_rae(rae_release):
    from stage1 import RAE

    rae = build(rae_release).eval()
    assert isinstance(rae, RAE) and rae.config.quantizer.kind == "none"
    encoder, stats = rae_dinov2(rae_release["encoder"]), rae_release["stats"]
    x = smooth_images(2, size=40, seed=5)  # resized to 32 as RAE resizes
    with torch.no_grad():
        z = rae.encode(x)
        expected_z = rae_encode(encoder, x, INPUT, MEAN, STD, stats, eps=EPS)
        assert z.shape == (2, WIDTH, GRID, GRID) and (z - expected_z).abs().max().item() <= 1e-5
        images = rae.decode(z)
        expected = rae_decode(rae_release["reference"], expected_z, MEAN, STD, stats, eps=EPS)
        assert (images - expected).abs().max().item() <= 1e-5
        assert expected.min() < 0 or expected.max() > 1  # RAE does not clamp, and neither does RAE here
        assert torch.equal(rae(x), images)  # forward: decode(encode(x)) at the decoder's size
        # Samples of a diffusion model are any latents of that shape.
        latents = torch.randn(3, WIDTH, GRID, GRID, generator=torch.Generator().manual_seed(1))
        sampled = rae_decode(rae_release["reference"], latents, MEAN, STD, stats, eps=EPS)
        assert (rae.decode(latents) - sampled).abs().max().item() <= 1e-5


def test_rae_noise_in_training_mode_is_raes(rae_release):
    rae = build(rae_release, noise_tau=0.8).train()
    encoder = rae_dinov2(rae_release["encoder"])
    x = smooth_images(2, size=INPUT, seed=6)
    with torch.no_grad():
        torch.manual_seed(7)
        ours = rae.encode(x)
        torch.manual_seed(7)
        expected = rae_encode(encoder, x, INPUT, MEAN, STD, rae_release["stats"], eps=EPS, noise_tau=0.8,
                              training=True)
        clean = rae_encode(encoder, x, INPUT, MEAN, STD, rae_release["stats"], eps=EPS)
    assert (ours - expected).abs().max().item() <= 1e-4  # through the de-normalised latent and back
    assert (expected - clean).abs().max().item() > 1e-2  # the noise was really there
    with torch.no_grad():
        assert torch.equal(rae.eval().encode(x), rae.encode(x))  # and none in eval mode


def test_rae_takes_raes_own_checkpoints(rae_release):
    """`ckpt:` in RAE's stage-2 YAML: instantiate_from_config loads RAE's stage-1 training checkpoint (its EMA model's
    state dict: the frozen encoder's tensors and RAE's decoder names) with load_state_dict(strict=True)."""
    rae = build(rae_release, pretrained_decoder_path=None).eval()  # a decoder of random weights
    trained = randomize(ReferenceDecoder(WIDTH, 48, 2, 4, 96, patch_size=8, num_patches=GRID * GRID), seed=9).eval()
    state = {f"decoder.{k}": v for k, v in trained.rae_state_dict().items()}
    state["encoder.encoder.embeddings.cls_token"] = torch.zeros(1, 1, WIDTH)  # RAE's frozen encoder, left out
    rae.load_state_dict(state, strict=True)
    latents = torch.randn(2, WIDTH, GRID, GRID, generator=torch.Generator().manual_seed(2))
    stats = rae_release["stats"]
    with torch.no_grad():
        expected = rae_decode(trained, latents, MEAN, STD, stats, eps=EPS)
        assert (rae.decode(latents) - expected).abs().max().item() <= 1e-5
    with pytest.raises(RuntimeError, match="Missing key"):
        rae.load_state_dict({k: v for k, v in state.items() if "decoder_pred" not in k}, strict=True)
    fresh = build(rae_release, pretrained_decoder_path=None).eval()
    fresh.load_state_dict({f"module.{k}": v for k, v in state.items()})  # saved from a DDP-wrapped model
    with torch.no_grad():
        assert torch.equal(fresh.decode(latents), rae.decode(latents))
    with pytest.raises(TypeError, match="RAE takes RAE's files in its own constructor"):
        type(rae).from_rae(rae_release["weights"], rae_release["decoder_config"])


def test_rae_encode_compiles_as_raes_train_py_does(rae_release):
    """train.py --compile compiles encode before its first call: one graph, no break (a lazily cached layout took a
    lock torch.compile cannot trace; the codebook's started check was a host sync)."""
    rae = build(rae_release).eval()
    x = smooth_images(2, size=INPUT, seed=8)
    with torch.no_grad():
        assert torch._dynamo.explain(build(rae_release).eval().encode)(x).graph_break_count == 0
        compiled = torch.compile(rae.encode, backend="eager")  # train.py --compile, before any call
        assert torch.allclose(compiled(x), rae.eval().encode(x), atol=1e-6)


def test_vqrae_target_trains_stage_2_on_the_codes(rae_release, tmp_path):
    """VQRAE with RAE's keywords and a codebook, fitted (here: training's first-batch start) and saved, then
    `target: stage1.from_pretrained` in a stage-2 YAML: encode gives the codes' vectors and never moves the
    codebook, decode takes them (or a diffusion model's samples) as RAE's decode does, clamped to images. An unfitted
    codebook is refused."""
    from stage1 import VQRAE

    model = build(rae_release, target="stage1.VQRAE", num_embeddings=16)
    assert type(model) is VQRAE and model.config.normalization_eps == EPS
    x = smooth_images(4, size=INPUT, seed=9)
    with pytest.raises(ValueError, match="never fitted or trained.*stage1.from_pretrained"):
        model.eval().encode(x)
    # What vqrae-fit-codebook does: k-means of the model's latents (here of these images), the EMA started there.
    fit_codebook(model, [model.encode_tokens(smooth_images(8, size=INPUT, seed=s))[0] for s in range(2)],
                 tokens_per_image=GRID * GRID, iters=5, tokens_per_update=64, show_progress=False)
    model.save_pretrained(tmp_path / "fitted")
    config = {"target": "stage1.from_pretrained",
              "params": {"path": str(tmp_path / "fitted"), "encoder_config_path": rae_release["encoder"]}}
    model = instantiate_from_config(OmegaConf.create(config))
    codebook = model.quantizer.codebook.clone()
    with torch.no_grad():
        z = model.train().encode(x)  # train mode, as a stage-2 loop that never calls eval() would leave it
        assert torch.equal(model.quantizer.codebook, codebook)
        indices = model.eval().encode_to_indices(x)
        assert torch.equal(z, model.quantizer.lookup(indices.flatten(1)).transpose(1, 2).reshape(z.shape))
        assert torch.equal(model.decode(z), model.decode_from_indices(indices))
        expected = rae_decode(rae_release["reference"], z, MEAN, STD, rae_release["stats"], eps=EPS)
        assert (model.decode(z) - expected.clamp(0, 1)).abs().max().item() <= 1e-5


def test_rae_saves_and_loads_as_an_rae(rae_release, tmp_path):
    from stage1 import RAE, VQRAE

    rae = build(rae_release).eval()
    rae.save_pretrained(tmp_path / "rae")
    loaded = RAE.from_pretrained(tmp_path / "rae", encoder_config_path=rae_release["encoder"])
    x = smooth_images(2, size=INPUT, seed=10)
    with torch.no_grad():
        assert isinstance(loaded, RAE) and torch.equal(loaded(x), rae(x))
    build(rae_release, target="stage1.VQRAE", num_embeddings=16).save_pretrained(tmp_path / "vq")
    with pytest.raises(ValueError, match="an RAE has no codebook.*VQRAE.from_pretrained"):
        RAE.from_pretrained(tmp_path / "vq")
    assert type(VQRAE.from_pretrained(tmp_path / "vq")) is VQRAE


def test_raes_encoder_params_for_each_encoder(tiny_encoders, tmp_path):
    """RAE's encoder classes take their checkpoint in encoder_params (dinov2_path; model_name and SigLIP2wNorm's
    unused num_tokens): it must be encoder_config_path's, and stands for it when that is not given."""
    from stage1 import RAE

    mae = tiny_encoders["mae"][1]
    siglip = tiny_encoders["siglip"][1]
    common = dict(encoder_input_size=INPUT, decoder_config_path="tiny", decoder_patch_size=8)
    rae = RAE(encoder_cls="MAEwNorm", encoder_params={"model_name": mae}, **common)
    assert rae.config.encoder.path == mae and rae.config.encoder.params == {}
    rae = RAE(encoder_cls="SigLIP2wNorm", encoder_config_path=siglip,
              encoder_params={"model_name": siglip, "num_tokens": 16}, **common)
    assert rae.config.encoder.path == siglip
    assert RAE(encoder_cls="MAEwNorm", encoder_config_path=mae + "/", encoder_params={"model_name": mae},
               **common).config.encoder.path == mae + "/"  # one folder, spelt two ways
    with pytest.raises(ConfigError, match="name different checkpoints"):
        RAE(encoder_cls="MAEwNorm", encoder_config_path=siglip, encoder_params={"model_name": mae}, **common)
    with pytest.raises(ConfigError, match="encoder.params"):
        RAE(encoder_cls="MAEwNorm", encoder_params={"model_name": mae, "mask_ratio": 0.5}, **common)
    with pytest.raises(ValueError, match="nor a directory holding RAE's ViT-MAE config.json"):
        RAE(encoder_cls="MAEwNorm", encoder_params={"model_name": mae}, encoder_input_size=INPUT)  # 'vit_mae-base'


def test_a_fitted_codebooks_encode_compiles_in_one_graph(rae_release):
    """`target: stage1.from_pretrained` under train.py --compile: the codes' path (search, code norms, the started
    check) traces as one graph, and the compiled encode gives the eager codes' vectors."""
    model = build(rae_release, target="stage1.VQRAE", num_embeddings=16).eval()
    fit_codebook(model, [model.encode_tokens(smooth_images(8, size=INPUT, seed=s))[0] for s in range(2)],
                 tokens_per_image=GRID * GRID, iters=3, tokens_per_update=64, show_progress=False)
    x = smooth_images(2, size=INPUT, seed=10)
    with torch.no_grad():
        assert torch._dynamo.explain(model.encode)(x).graph_break_count == 0
        assert torch.equal(torch.compile(model.encode, backend="eager")(x), model.encode(x))
