import json
import os

import pytest
import torch
import yaml

from stage1 import DECODER_PRESETS, DecoderConfig, ViTDecoder, load_decoder_config
from stage1.model.presets import DECODER_CONFIG_DIR


def test_output_size_is_grid_times_decoder_patch():
    decoder = ViTDecoder(32, load_decoder_config("tiny", patch_size=16), grid_size=4)
    out = decoder(torch.randn(2, 16, 32), (4, 4))
    assert out.shape == (2, 3, 64, 64)
    # Other grids (non-square too) use resampled position embeddings.
    assert decoder(torch.randn(1, 15, 32), (3, 5)).shape == (1, 3, 48, 80)
    with pytest.raises(ValueError, match="15 tokens do not fill a 4x4 grid"):
        decoder(torch.randn(1, 15, 32), (4, 4))


def test_unpatchify_puts_each_token_in_its_own_patch():
    decoder = ViTDecoder(8, load_decoder_config("tiny", patch_size=4), grid_size=3).eval()
    z = torch.randn(1, 9, 8)  # a 3x3 grid of tokens in raster order
    # Transformer blocks mix tokens, so bypass them to check the layout of the head's output alone.
    decoder.blocks = torch.nn.ModuleList()
    base = decoder(z, (3, 3))
    z2 = z.clone()
    z2[0, 1 * 3 + 2] += 10.0  # the token at row 1, column 2
    changed = (decoder(z2, (3, 3)) - base).abs().sum(1)[0] > 1e-6  # (H, W) mask of changed pixels
    expected = torch.zeros(12, 12, dtype=torch.bool)
    expected[4:8, 8:12] = True
    assert torch.equal(changed, expected)


def test_config_sources_agree(tmp_path):
    values = dict(hidden_size=48, num_hidden_layers=1, num_attention_heads=3, intermediate_size=100, patch_size=4)
    (tmp_path / "dec.json").write_text(json.dumps(values))
    (tmp_path / "dec.yaml").write_text("\n".join(f"{k}: {v}" for k, v in values.items()))
    from_json = load_decoder_config(str(tmp_path / "dec.json"))
    from_yaml = load_decoder_config(str(tmp_path / "dec.yaml"))
    assert from_json == from_yaml == load_decoder_config(values)
    assert load_decoder_config(values, patch_size=8).patch_size == 8
    decoder = ViTDecoder(16, from_json, grid_size=2)
    assert decoder.blocks[0].mlp.fc1.out_features == 100  # intermediate_size is honoured exactly
    assert load_decoder_config("vit_xl").intermediate_size == 4096
    assert set(DECODER_PRESETS) >= {"vit_b", "vit_l", "vit_xl", "tiny"}


def test_presets_are_the_hydra_decoder_files():
    """One source of truth for decoder sizes: configs/decoder/NAME.yaml is both hydra's group and the preset."""
    names = sorted(os.path.splitext(n)[0] for n in os.listdir(DECODER_CONFIG_DIR) if n.endswith(".yaml"))
    assert names == sorted(DECODER_PRESETS)
    for name in names:
        with open(os.path.join(DECODER_CONFIG_DIR, f"{name}.yaml")) as f:
            assert load_decoder_config(name).to_dict() == {**DecoderConfig.default_tree(), **yaml.safe_load(f)}, name
    assert load_decoder_config(None) == load_decoder_config("vit_b")


def test_bad_decoder_configs(tmp_path):
    with pytest.raises(ValueError, match=r"unknown decoder config keys \['depth'\]"):
        load_decoder_config({"depth": 3})
    with pytest.raises(ValueError, match="neither a preset"):
        load_decoder_config("vit_huge")
    with pytest.raises(ValueError, match="decoder.hidden_size must be > 0, got -8"):
        load_decoder_config({"hidden_size": -8})
    with pytest.raises(ValueError, match=r"hidden_size must be divisible by decoder.num_attention_heads \(5\), got 64"):
        load_decoder_config({"hidden_size": 64, "num_attention_heads": 5})
    with pytest.raises(ValueError, match=r"decoder.pos_embed must be one of \['learned', 'fixed'\], got 'rope'"):
        load_decoder_config({"pos_embed": "rope"})
    with pytest.raises(ValueError, match="decoder.pixel_space must be one of"):
        load_decoder_config({"pixel_space": "srgb"})
    with pytest.raises(ValueError, match="decoder.layer_norm_eps must be > 0, got 0"):
        load_decoder_config({"layer_norm_eps": 0})
    with pytest.raises(ValueError, match=r"decoder.num_hidden_layers must be an integer, got '12' \(str\)"):
        load_decoder_config({"num_hidden_layers": "12"})
