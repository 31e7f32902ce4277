"""ViT decoder (MAE-decoder style): quantized latent tokens -> pixels.

Linear in from the latent width, learned position embeddings (sin-cos initialised, resampled for other grid
sizes), timm transformer blocks, a linear head to patch_size^2 * 3 values per token, unpatchify.
The image it outputs has side = tokens per side * patch_size: with DINOv2 (p=14) at 224 px the grid is
16x16 and a p=16 decoder paints 256 px.
"""

from __future__ import annotations

import torch
from timm.layers import resample_abs_pos_embed
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from .model_config import DecoderConfig


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

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, h*w, C) latent tokens in raster order over an h x w grid -> (B, 3, h * p, w * p) image (in [-1, 1]
        scale, unclamped)."""
        b, n, _ = tokens.shape
        h, w = grid
        if n != h * w:
            raise ValueError(f"{n} tokens do not fill a {h}x{w} grid")
        x = self.embed(tokens) + self.position_embedding(h, w)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.head(self.norm(x))
        p, c = self.patch_size, self.out_channels
        return x.reshape(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h * p, w * p)
