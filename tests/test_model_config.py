"""VQRAEConfig: one name per value from the command line to the module, checked once, JSON on disk."""

import dataclasses
import json
import os

import pytest
import torch
from helpers import IMAGE_SIZE, smooth_images, tiny_vqrae

from stage1 import VQRAE, DecoderConfig, EncoderConfig, QuantizerConfig, VQRAEConfig
from stage1.losses import LossConfig
from stage1.model_config import CONFIG_DIR, KEYWORDS, SECTIONS
from stage1.train_config import load_train_config, model_config


def tiny_config(encoder_dir, **quantizer) -> VQRAEConfig:
    return VQRAEConfig(
        encoder=EncoderConfig(cls="Dinov2withNorm", path=encoder_dir, input_size=IMAGE_SIZE),
        quantizer=QuantizerConfig(num_embeddings=64, **quantizer),
        decoder=DecoderConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                              patch_size=8),
    )


def test_keyword_form_builds_the_same_model_as_the_config(dinov2_dir):
    config = tiny_config(dinov2_dir, decay=0.9, commitment_cost=0.5)
    torch.manual_seed(0)
    from_config = VQRAE(config).eval()
    torch.manual_seed(0)
    from_keywords = tiny_vqrae(dinov2_dir, vq_decay=0.9, commitment_cost=0.5).eval()
    assert from_keywords.config == config
    state_a, state_b = from_config.state_dict(), from_keywords.state_dict()
    assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    x = smooth_images(2)
    assert torch.equal(from_config(x), from_keywords(x))
    # The value reaches the module under the same name.
    assert from_config.quantizer.decay == config.quantizer.decay == 0.9
    with pytest.raises(TypeError, match="not both"):
        VQRAE(config, num_embeddings=8)
    with pytest.raises(TypeError, match=r"unknown VQRAE keyword arguments \['num_embedings'\]"):
        VQRAE(num_embedings=8)


def test_config_round_trips_through_json(dinov2_dir, tmp_path):
    config = dataclasses.replace(tiny_config(dinov2_dir, restart_after_steps=7), noise_tau=0.3,
                                 reshape_to_2d=False)
    config.save(str(tmp_path / "config.json"))
    assert VQRAEConfig.load(str(tmp_path / "config.json")) == config
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert set(on_disk) >= set(SECTIONS) and on_disk["quantizer"]["restart_after_steps"] == 7


def test_every_keyword_names_a_config_field():
    for keyword, (section, name) in KEYWORDS.items():
        owner = SECTIONS[section] if section else VQRAEConfig
        assert name in {f.name for f in dataclasses.fields(owner)}, keyword


GROUPS = {"encoder": EncoderConfig, "quantizer": QuantizerConfig, "decoder": DecoderConfig, "loss": LossConfig}


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_hydra_groups_have_the_config_fields_one_to_one(group):
    fields = {f.name for f in dataclasses.fields(GROUPS[group])}
    options = sorted(os.path.splitext(n)[0] for n in os.listdir(os.path.join(CONFIG_DIR, group)))
    assert options
    for option in options:
        cfg = load_train_config([f"{group}={option}", "data.path=x", "results_dir=r"])
        keys = set(cfg[group]) - ({"tiny"} if group == "encoder" else set())  # tiny: the stand-in's recipe
        assert keys == fields, (option, keys ^ fields)
    top = {f.name for f in dataclasses.fields(VQRAEConfig)} - set(SECTIONS)
    assert set(load_train_config(["data.path=x"]).model) == top


def test_a_command_line_value_reaches_the_module(dinov2_dir):
    cfg = load_train_config(["experiment=tiny_test", "data.path=x", "results_dir=r", "quantizer.decay=0.7",
                             "decoder.num_hidden_layers=1", f"encoder.path={dinov2_dir}", "image_size=32",
                             "model.noise_tau=0.2"])
    model = VQRAE(model_config(cfg))
    assert model.quantizer.decay == 0.7 and len(model.decoder.blocks) == 1 and model.config.noise_tau == 0.2


def test_bad_config_files_are_refused_clearly(dinov2_dir, tmp_path):
    good = tiny_config(dinov2_dir).to_dict()
    cases = [
        ({**good, "quantizer": {**good["quantizer"], "decya": 0.9}}, r"unknown quantizer config keys \['decya'\]"),
        ({**good, "decoder": {"hidden_size": 64}}, r"decoder config lacks keys \['num_hidden_layers'"),
        ({**good, "encoder": "dinov2"}, "encoder must be a mapping"),
        ({**good, "quantizer": {**good["quantizer"], "kind": "magic"}}, "quantizer.kind must be one of"),
    ]
    for values, message in cases:
        (tmp_path / "config.json").write_text(json.dumps(values))
        with pytest.raises(ValueError, match=message):
            VQRAEConfig.load(str(tmp_path / "config.json"))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        VQRAEConfig.load(str(tmp_path / "config.json"))


def test_a_flat_config_written_by_vqrae_0_1_still_loads(dinov2_dir, tmp_path):
    torch.manual_seed(0)
    model = tiny_vqrae(dinov2_dir).eval()
    model.save_pretrained(tmp_path / "ckpt")
    decoder = model.config.decoder.to_dict()
    flat = dict(encoder_cls="Dinov2withNorm", encoder_config_path=dinov2_dir, encoder_input_size=IMAGE_SIZE,
                encoder_params={}, decoder_config_path=decoder, decoder_patch_size=8, num_embeddings=64,
                commitment_cost=0.25, vq_decay=0.99, vq_epsilon=1e-5, dead_code_threshold=0.0, kmeans_init=False,
                noise_tau=0.0, reshape_to_2d=True, normalization_stat_path=None, quantize_before_reshape=False,
                recon_loss="l1")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(flat))
    loaded = VQRAE.from_pretrained(tmp_path / "ckpt").eval()
    # vqrae 0.1 resized with antialiasing; such a file keeps doing so.
    assert loaded.config == dataclasses.replace(model.config,
                                                encoder=dataclasses.replace(model.config.encoder, antialias=True))
    x = smooth_images(2)
    assert torch.equal(loaded(x), model(x))


def test_json_and_yaml_syntax_errors_name_their_file(tmp_path, dinov2_dir):
    """Issue 12, case 11 (messages): a broken decoder config, encoder preprocessor config or tokenize listing names
    the file that is broken."""
    import shutil

    from stage1.encoders import build_encoder
    from stage1.model_config import load_decoder_config

    (tmp_path / "decoder.json").write_text('{"hidden_size": 64,')
    with pytest.raises(ValueError, match=r"decoder.json is not valid JSON"):
        load_decoder_config(str(tmp_path / "decoder.json"))
    (tmp_path / "decoder.yaml").write_text("hidden_size: [64")
    with pytest.raises(ValueError, match=r"decoder.yaml is not valid YAML"):
        load_decoder_config(str(tmp_path / "decoder.yaml"))
    shutil.copytree(dinov2_dir, tmp_path / "encoder")
    (tmp_path / "encoder" / "preprocessor_config.json").write_text("{'image_mean': [0.5]}")
    with pytest.raises(ValueError, match=r"preprocessor_config.json is not valid JSON"):
        build_encoder("Dinov2withNorm", str(tmp_path / "encoder"))
