"""RAE's released files in: decoder weights, decoder config directory and latent statistics.

RAE ("Diffusion Transformers with Representation Autoencoders", github bytetriper/RAE) releases its decoders as
`torch.save`d state dicts of its `GeneralDecoder` (transformers' ViT-MAE decoder layers), with a ViT-MAE
`config.json` for their sizes, and latent statistics as `stat.pt` (stage1.model.latent_stats reads those). Its
decoder is stage1.model.decoder.ViTDecoder with RAE's options (`rae_decoder_config`); its weights map onto ours one to
one, except that the separate query / key / value projections become one qkv projection (`decoder_state_from_rae`).
"""

from __future__ import annotations

import os
import re

import torch

from ..base.atomic import read_json
from ..base.tensor_files import read_tensor_file
from .config import DecoderConfig

# RAE's GeneralDecoder names -> ViTDecoder names (query / key / value are merged into qkv separately).
RENAMES = [
    (r"decoder_embed\.", "embed."),
    (r"decoder_pos_embed$", "pos_embed"),
    (r"trainable_cls_token$", "cls_token"),
    (r"decoder_layers\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"decoder_layers\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"decoder_layers\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"decoder_layers\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"decoder_layers\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"decoder_norm\.", "norm."),
    (r"decoder_pred\.", "head."),
]
QKV = re.compile(r"decoder_layers\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "decoder.")  # DDP, torch.compile, a whole RAE model's state dict
RAE_LAYOUT = ("RAE's layout is decoder=rae_vit_b / rae_vit_l / rae_vit_xl, or VQRAE.from_rae with its config "
              "directory")


def rae_decoder_config(path: str, patch_size: int = 16) -> DecoderConfig:
    """RAE's decoder config (a ViT-MAE config.json, or its directory) -> the DecoderConfig of the same decoder.
    RAE takes the patch size from its stage-1 YAML (`decoder_patch_size`, 16 by default), not from this file."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"RAE decoder config '{path}' is neither a config.json nor a directory holding one "
                                f"(RAE ships them as configs/decoder/ViTB, ViTL, ViTXL)")
    values = read_json(file)
    sizes = ("decoder_hidden_size", "decoder_num_hidden_layers", "decoder_num_attention_heads",
             "decoder_intermediate_size")
    if not isinstance(values, dict) or any(key not in values for key in sizes):
        raise ValueError(f"{file} is not a ViT-MAE decoder config: expected the keys {list(sizes)}")
    if values.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{file}: hidden_act {values['hidden_act']!r} is not supported (RAE's decoders use 'gelu')")
    return DecoderConfig(  # which checks each value's type and range (a "false" string is no bool)
        hidden_size=values["decoder_hidden_size"],
        num_hidden_layers=values["decoder_num_hidden_layers"],
        num_attention_heads=values["decoder_num_attention_heads"],
        intermediate_size=values["decoder_intermediate_size"],
        patch_size=patch_size,
        qkv_bias=values.get("qkv_bias", True),
        cls_token=True,
        pos_embed="fixed",
        layer_norm_eps=values.get("layer_norm_eps", 1e-12),  # ViT-MAE's default
        pixel_space="encoder",
    )


def read_rae_decoder(path: str, config: DecoderConfig | None = None) -> dict[str, torch.Tensor]:
    """RAE's decoder weights: a torch state dict (read with weights_only=True: tensors only, nothing else is
    unpickled) or a safetensors file. Given the decoder's `config`, the file must hold at least the numbers such a
    decoder has, checked before the decoder is built (a config.json of huge sizes beside a small file would allocate
    them)."""
    state = read_tensor_file(path, "RAE decoder weights")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{path} is not a flat state dict of tensors (a training checkpoint? RAE's "
                         f"src/extract_decoder.py writes the decoder's own state dict)")
    damaged = [key for key, value in state.items() if not value.is_floating_point() or not value.isfinite().all()]
    if damaged:
        raise ValueError(f"{path}: decoder weights must be finite floating-point tensors; {damaged[:5]} are not")
    held = sum(value.numel() for value in state.values())
    if config is not None and config.parameters_at_least() > held:
        raise ValueError(f"RAE decoder weights {path} hold {held:,} numbers, but its config describes a decoder of "
                         f"at least {config.parameters_at_least():,} ({config.to_dict()}): the config is not this "
                         f"file's; {RAE_LAYOUT}")
    return state


def decoder_state_from_rae(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A GeneralDecoder state dict -> ViTDecoder's: names mapped, query / key / value stacked into qkv."""
    renamed, qkv, unknown = {}, {}, []
    for key, value in state.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = next(key[len(p):] for p in WRAPPER_PREFIXES if key.startswith(p))
        if key.startswith("encoder."):  # a whole RAE model's state dict: its frozen encoder is loaded elsewhere
            continue
        match = QKV.match(key)
        if match:
            layer, part, kind = match.groups()
            qkv.setdefault((layer, kind), {})[part] = value
            continue
        for pattern, replacement in RENAMES:
            if re.match(pattern, key):
                renamed[re.sub(pattern, replacement, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"not RAE decoder weights: unexpected tensors {unknown[:5]}")
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"RAE decoder layer {layer}: {kind} of {sorted(parts)} only, expected query, key, value")
        shapes = {part: tuple(tensor.shape) for part, tensor in parts.items()}
        if len(set(shapes.values())) > 1 or not parts["query"].dim():
            raise ValueError(f"RAE decoder layer {layer}: the query, key and value {kind}s are of shapes {shapes}; "
                             f"expected one shape of at least one dimension")
        renamed[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return renamed


def load_rae_decoder(decoder, state: dict[str, torch.Tensor], path: str) -> None:
    """RAE's released decoder weights (`state`, as read_rae_decoder read them from `path`) into `decoder`, a
    ViTDecoder in RAE's layout; one clear error names every tensor that does not fit."""
    state = decoder_state_from_rae(state)
    expected = decoder.state_dict()
    problems = sorted(set(expected) ^ set(state)) + [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if problems:
        raise ValueError(f"RAE decoder weights {path} do not fit this decoder (grid {decoder.grid_size}, config "
                         f"{decoder.config}): {problems[:5]}; {RAE_LAYOUT}")
    decoder.load_state_dict(state)
