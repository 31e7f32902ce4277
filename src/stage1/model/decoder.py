"""ViT decoder (MAE-decoder style): latent tokens -> pixels.

Linear in from the latent width, 2-D sin-cos position embeddings (learned from that start, or fixed), an optional
trainable CLS token in front, pre-norm transformer blocks (timm's), a linear head to patch_size^2 * 3 values per
token, unpatchify. The image it outputs has side = tokens per side * patch_size: with DINOv2 (p=14) at 224 px the
grid is 16x16 and a p=16 decoder paints 256 px.

RAE's decoder (`GeneralDecoder`, transformers' ViT-MAE decoder layers) is this decoder with `cls_token=True`,
`pos_embed="fixed"`, `layer_norm_eps=1e-12` and `pixel_space="encoder"` (stage1.model.rae builds that config and maps
its weights). What the decoder emits is pixels in `pixel_space`; VQRAE maps them to [0, 1].
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import DecoderConfig


def sincos_pos_embed(side: int, dim: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos embedding of a side x side grid in raster order, (side^2, dim): the first half of the
    channels encodes the column, the second the row, each as [sin | cos] over dim/4 frequencies."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64),
                                indexing="ij")
    parts = [torch.outer(coord.flatten(), omega) for coord in (cols, rows)]
    return torch.cat([f(p) for p in parts for f in (torch.sin, torch.cos)], dim=1).float()


class ViTDecoder(nn.Module):
    def __init__(self, latent_dim: int, config: DecoderConfig, grid_size: int, out_channels: int = 3):
        super().__init__()
        self.config = config
        self.grid_size = int(grid_size)
        self.patch_size = config.patch_size
        self.out_channels = out_channels
        self.num_prefix_tokens = int(config.cls_token)
        hidden = config.hidden_size
        self.embed = nn.Linear(latent_dim, hidden)
        pos = sincos_pos_embed(self.grid_size, hidden)
        pos = torch.cat([pos.new_zeros(self.num_prefix_tokens, hidden), pos]).unsqueeze(0)  # the CLS slot: zeros
        if config.pos_embed == "learned":
            self.pos_embed = nn.Parameter(pos)
        else:
            self.register_buffer("pos_embed", pos)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden)) if config.cls_token else None
        norm = partial(nn.LayerNorm, eps=config.layer_norm_eps)
        self.blocks = nn.ModuleList(
            Block(
                hidden,
                config.num_attention_heads,
                # timm sizes the MLP as int(hidden * mlp_ratio); +0.5 makes that exactly intermediate_size.
                mlp_ratio=(config.intermediate_size + 0.5) / hidden,
                qkv_bias=config.qkv_bias,
                norm_layer=norm,
            )
            for _ in range(config.num_hidden_layers)
        )
        self.norm = norm(hidden)
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
        return resample_abs_pos_embed(self.pos_embed, [height, width], old_size=[self.grid_size] * 2,
                                      num_prefix_tokens=self.num_prefix_tokens)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, h*w, C) latent tokens in raster order over an h x w grid -> (B, 3, h * p, w * p) pixels in the
        config's pixel_space, unclamped."""
        b, n, _ = tokens.shape
        h, w = grid
        if n != h * w:
            raise ValueError(f"{n} tokens do not fill a {h}x{w} grid")
        x = self.embed(tokens)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(b, -1, -1).to(x.dtype), x], dim=1)
        x = x + self.position_embedding(h, w).to(x.dtype)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.head(self.norm(x))[:, self.num_prefix_tokens :]
        p, c = self.patch_size, self.out_channels
        return x.reshape(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h * p, w * p)
