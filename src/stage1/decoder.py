"""ViT decoder (MAE-decoder style): quantized latent grid -> pixels.

Linear in from the latent width, learned position embeddings (sin-cos initialised, resampled for other grid
sizes), timm transformer blocks, a linear head to patch_size^2 * 3 values per token, unpatchify.
The image it outputs has side = tokens per side * patch_size: with DINOv2 (p=14) at 224 px the grid is
16x16 and a p=16 decoder paints 256 px.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields

import torch
from timm.layers import resample_abs_pos_embed
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class DecoderConfig:
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    patch_size: int = 16
    qkv_bias: bool = True

    def __post_init__(self):
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"decoder {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"decoder hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.hidden_size % 4:
            raise ValueError(f"decoder hidden_size must be divisible by 4 (2-D sin-cos init), got {self.hidden_size}")

    def to_dict(self) -> dict:
        return asdict(self)


# Widths and depths of the MAE / RAE decoders (XL is RAE's ViT-XL decoder).
DECODER_PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
    "small": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512),
    "vit_b": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "vit_l": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "vit_xl": dict(hidden_size=1152, num_hidden_layers=28, num_attention_heads=16, intermediate_size=4096),
}


def load_decoder_config(source: str | dict | DecoderConfig | None, **overrides) -> DecoderConfig:
    """A DecoderConfig from a preset name, a .json/.yaml path, a dict, or None (vit_b); overrides win."""
    if isinstance(source, DecoderConfig):
        values = source.to_dict()
    elif source is None:
        values = dict(DECODER_PRESETS["vit_b"])
    elif isinstance(source, dict):
        values = dict(source)
    elif source in DECODER_PRESETS:
        values = dict(DECODER_PRESETS[source])
    elif os.path.isfile(source):
        with open(source) as f:
            if source.endswith((".yaml", ".yml")):
                import yaml

                values = yaml.safe_load(f) or {}
            else:
                values = json.load(f)
        if not isinstance(values, dict):
            raise ValueError(f"decoder config {source} must hold a mapping, got {type(values).__name__}")
    else:
        raise ValueError(
            f"decoder config '{source}' is neither a preset ({', '.join(DECODER_PRESETS)}) nor an existing "
            f".json/.yaml file"
        )
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(DecoderConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown decoder config keys {unknown}; expected a subset of {sorted(known)}")
    return DecoderConfig(**values)


class ViTDecoder(nn.Module):
    def __init__(self, latent_dim: int, config: DecoderConfig, grid_size: int, out_channels: int = 3):
        super().__init__()
        self.config = config
        self.grid_size = int(grid_size)
        self.patch_size = config.patch_size
        self.out_channels = out_channels
        hidden = config.hidden_size
        self.embed = nn.Linear(latent_dim, hidden)
        pos = build_sincos2d_pos_embed([self.grid_size, self.grid_size], dim=hidden)
        self.pos_embed = nn.Parameter(pos.unsqueeze(0))
        self.blocks = nn.ModuleList(
            Block(
                hidden,
                config.num_attention_heads,
                # timm sizes the MLP as int(hidden * mlp_ratio); +0.5 makes that exactly intermediate_size.
                mlp_ratio=(config.intermediate_size + 0.5) / hidden,
                qkv_bias=config.qkv_bias,
                norm_layer=nn.LayerNorm,
            )
            for _ in range(config.num_hidden_layers)
        )
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, config.patch_size**2 * out_channels)
        self.gradient_checkpointing = False
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the output head (for adaptive GAN-loss weighting)."""
        return self.head.weight

    def position_embedding(self, height: int, width: int) -> torch.Tensor:
        if (height, width) == (self.grid_size, self.grid_size):
            return self.pos_embed
        return resample_abs_pos_embed(
            self.pos_embed, [height, width], old_size=[self.grid_size] * 2, num_prefix_tokens=0
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents -> (B, 3, h * p, w * p) image (in [-1, 1] scale, unclamped)."""
        b, _, h, w = z.shape
        x = self.embed(z.flatten(2).transpose(1, 2)) + self.position_embedding(h, w)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.head(self.norm(x))
        p, c = self.patch_size, self.out_channels
        return x.reshape(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h * p, w * p)
