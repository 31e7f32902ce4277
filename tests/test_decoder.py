import json

import pytest
import torch

from stage1 import DECODER_PRESETS, ViTDecoder, load_decoder_config


def test_output_size_is_grid_times_decoder_patch():
    decoder = ViTDecoder(32, load_decoder_config("tiny", patch_size=16), grid_size=4)
    out = decoder(torch.randn(2, 32, 4, 4))
    assert out.shape == (2, 3, 64, 64)
    # Other grids (non-square too) use resampled position embeddings.
    assert decoder(torch.randn(1, 32, 3, 5)).shape == (1, 3, 48, 80)


def test_unpatchify_puts_each_token_in_its_own_patch():
    decoder = ViTDecoder(8, load_decoder_config("tiny", patch_size=4), grid_size=3).eval()
    z = torch.randn(1, 8, 3, 3)
    # Transformer blocks mix tokens, so bypass them to check the layout of the head's output alone.
    decoder.blocks = torch.nn.ModuleList()
    base = decoder(z)
    z2 = z.clone()
    z2[0, :, 1, 2] += 10.0
    changed = (decoder(z2) - base).abs().sum(1)[0] > 1e-6  # (H, W) mask of changed pixels
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


def test_bad_decoder_configs(tmp_path):
    with pytest.raises(ValueError, match=r"unknown decoder config keys \['depth'\]"):
        load_decoder_config({"depth": 3})
    with pytest.raises(ValueError, match="neither a preset"):
        load_decoder_config("vit_huge")
    with pytest.raises(ValueError, match="hidden_size must be a positive integer, got -8"):
        load_decoder_config({"hidden_size": -8})
    with pytest.raises(ValueError, match="divisible by num_attention_heads"):
        load_decoder_config({"hidden_size": 64, "num_attention_heads": 5})
