"""RAE's stage-1 discriminator: a frozen DINO ViT (S/8 in RAE) with trainable heads on its token features.

The image is resized (bilinear) to the ViT's own input size and normalised with ImageNet statistics; the tokens
after blocks `key_depths` and after the last block go, each as (B, C, N), through a head of 1-D convolutions over
the token axis (spectral norm, per-image normalisation, LeakyReLU; a residual block with kernel `kernel_size`,
circular padding), giving one logit per token and feature level. Only the heads train; gradients reach the images.

The ViT comes from a checkpoint file in DINO's (and timm's) layout, e.g. RAE's `dino_vit_small_patch8_224.pth`,
read with weights_only=True; its sizes (width, depth, patch, grid) are read off the tensors.
"""

from __future__ import annotations

import math
import os
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..base.tensor_files import read_tensor_file
from ..model.encoders import IMAGENET_MEAN, IMAGENET_STD

KEY_DEPTHS = (2, 5, 8, 11)  # RAE's: features after these blocks, besides the last one
DINO_HINT = ("RAE's stage-1 recipe uses DINO ViT-S/8 (RAE names it models/discs/dino_vit_small_patch8_224.pth: "
             "DINO's released dino_deitsmall8_pretrain.pth); download it on a machine with network and set "
             "loss.dino_path to the file")


def frozen_dino(path: str) -> VisionTransformer:
    """The DINO ViT of a checkpoint file, frozen, in eval mode."""
    if not os.path.isfile(path or ""):
        raise FileNotFoundError(f"the DINO discriminator's ViT weights '{path}' do not exist. {DINO_HINT}")
    state = read_tensor_file(path, "DINO ViT weights")
    state = state.get("model", state) if isinstance(state, dict) else state  # some releases nest the weights
    needed = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")
    if not isinstance(state, dict) or any(k not in state for k in needed):
        raise ValueError(f"{path} is not a DINO ViT state dict (expected tensors {list(needed)}). {DINO_HINT}")
    width, patch = state["cls_token"].shape[-1], state["patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    vit = VisionTransformer(
        img_size=grid * patch, patch_size=patch, embed_dim=width, num_heads=max(1, width // 64),  # DINO: 64 per head
        depth=1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks.")),
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / width, qkv_bias=True, num_classes=0, global_pool="",
        act_layer=partial(nn.GELU, approximate="tanh"), norm_layer=partial(nn.LayerNorm, eps=1e-6),  # RAE's
    )
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing, unexpected = vit.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: DINO ViT weights do not fit (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return vit.eval().requires_grad_(False)


def conv_block(channels: int, kernel_size: int) -> nn.Sequential:
    conv = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2, padding_mode="circular")
    return nn.Sequential(nn.utils.spectral_norm(conv), nn.InstanceNorm1d(channels, affine=True, eps=1e-6),
                         nn.LeakyReLU(0.2))


class Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return (self.fn(x) + x) / math.sqrt(2)


class DinoDiscriminator(nn.Module):
    def __init__(self, dino_path: str, kernel_size: int = 9, key_depths=KEY_DEPTHS):
        super().__init__()
        vit = frozen_dino(dino_path)
        self.key_depths = tuple(d for d in key_depths if d < len(vit.blocks))
        self.image_size = vit.patch_embed.img_size
        width = vit.embed_dim
        self.heads = nn.ModuleList(
            nn.Sequential(conv_block(width, 1), Residual(conv_block(width, kernel_size)),
                          nn.utils.spectral_norm(nn.Conv1d(width, 1, 1)))
            for _ in range(len(self.key_depths) + 1)
        )
        self.vit = (vit,)  # a tuple hides the frozen ViT from parameters(), state_dict() and DDP
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _apply(self, fn, recurse=True):
        self.vit[0]._apply(fn)  # device and dtype moves reach the hidden ViT too
        return super()._apply(fn, recurse)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images in [0, 1] -> token features (B, C, N): after the last block, then after each key depth."""
        vit = self.vit[0]
        x = F.interpolate(images, size=vit.patch_embed.img_size, mode="bilinear", align_corners=False)
        x = vit.patch_embed((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))
        x = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + vit.pos_embed
        levels = []
        for depth, block in enumerate(vit.blocks):
            x = block(x)
            if depth in self.key_depths:
                levels.append(x[:, 1:].transpose(1, 2))
        return [x[:, 1:].transpose(1, 2)] + levels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> logits (B, levels * tokens)."""
        return torch.cat([head(level).flatten(1) for head, level in zip(self.heads, self.features(images),
                                                                         strict=True)], dim=1)
