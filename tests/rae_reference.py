"""RAE's stage-1 pipeline assembled for the tests from transformers' ViT-MAE decoder layers, in the layout of RAE's
`GeneralDecoder` (github bytetriper/RAE, src/stage1/decoders/decoder.py and src/stage1/model/rae.py), written
independently of stage1's code: the reference the parity tests compare against, and the source of RAE-format files.
"""

import json
import os

import numpy as np
import torch
from torch import nn
from transformers import ViTMAEConfig
from transformers.models.vit_mae.modeling_vit_mae import ViTMAELayer


def mae_sincos(dim: int, side: int) -> np.ndarray:
    """MAE's get_2d_sincos_pos_embed with add_cls_token=True, as RAE has it (numpy, meshgrid w first)."""
    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=float) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32)), axis=0)
    emb = np.concatenate([one(dim // 2, grid[0]), one(dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0)


class ReferenceDecoder(nn.Module):
    """RAE's GeneralDecoder: embed, trainable CLS in front, fixed sin-cos (CLS slot included), ViT-MAE layers,
    norm, pred, CLS dropped, unpatchify."""

    def __init__(self, latent_dim, hidden, layers, heads, intermediate, patch_size, num_patches, eps=1e-12):
        super().__init__()
        config = ViTMAEConfig(hidden_size=hidden, num_attention_heads=heads, intermediate_size=intermediate,
                              layer_norm_eps=eps, hidden_act="gelu", qkv_bias=True)
        config._attn_implementation = "eager"
        self.patch_size, self.side = patch_size, int(num_patches**0.5)
        self.decoder_embed = nn.Linear(latent_dim, hidden)
        pos = torch.from_numpy(mae_sincos(hidden, self.side)).float().unsqueeze(0)
        self.decoder_pos_embed = nn.Parameter(pos, requires_grad=False)
        self.decoder_layers = nn.ModuleList(ViTMAELayer(config) for _ in range(layers))
        self.decoder_norm = nn.LayerNorm(hidden, eps=eps)
        self.decoder_pred = nn.Linear(hidden, patch_size**2 * 3)
        self.trainable_cls_token = nn.Parameter(torch.zeros(1, 1, hidden))

    def forward(self, z):
        x = self.decoder_embed(z)
        x = torch.cat([self.trainable_cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.decoder_pos_embed
        for layer in self.decoder_layers:
            x = layer(x)
        logits = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        b, p, s = x.shape[0], self.patch_size, self.side
        return torch.einsum("nhwpqc->nchpwq", logits.reshape(b, s, s, p, p, 3)).reshape(b, 3, s * p, s * p)

    # transformers' current ViT-MAE layer names -> RAE's (its copy of the older ones)
    RAE_NAMES = {"attention.q_proj": "attention.attention.query", "attention.k_proj": "attention.attention.key",
                 "attention.v_proj": "attention.attention.value", "attention.o_proj": "attention.output.dense",
                 "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}

    def rae_state_dict(self):
        """The state dict under RAE's names."""
        out = {}
        for key, value in self.state_dict().items():
            for ours, theirs in self.RAE_NAMES.items():
                key = key.replace(f".{ours}.", f".{theirs}.")
            out[key] = value.clone()
        return out

    def load_rae_state_dict(self, state):
        """rae_state_dict's inverse: a state dict under RAE's names loaded (strictly) into this module."""
        renamed = {}
        for key, value in state.items():
            for ours, theirs in self.RAE_NAMES.items():
                key = key.replace(f".{theirs}.", f".{ours}.")
            renamed[key] = value
        self.load_state_dict(renamed)
        return self

    def save_rae_files(self, root):
        """RAE's release: model.pt (a torch state dict) and a ViT-MAE config directory."""
        os.makedirs(os.path.join(root, "config"), exist_ok=True)
        torch.save(self.rae_state_dict(), os.path.join(root, "model.pt"))
        layer = self.decoder_layers[0]
        with open(os.path.join(root, "config", "config.json"), "w") as f:
            json.dump({"model_type": "vit_mae", "hidden_size": 768,
                       "decoder_hidden_size": self.decoder_embed.out_features,
                       "decoder_num_hidden_layers": len(self.decoder_layers),
                       "decoder_num_attention_heads": layer.attention.num_attention_heads,
                       "decoder_intermediate_size": layer.mlp.fc1.out_features,
                       "layer_norm_eps": self.decoder_norm.eps, "hidden_act": "gelu", "qkv_bias": True,
                       "patch_size": "SHOULD BE RELOADED"}, f)
        return os.path.join(root, "model.pt"), os.path.join(root, "config")


def randomize(module, seed=0, scale=0.2):
    """Random values in every trainable tensor: a non-zero CLS token, LayerNorm scales around 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.requires_grad:
                centre = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                p.copy_(torch.randn(p.shape, generator=g) * scale + centre)
    return module


def rae_dinov2(path):
    """RAE's Dinov2withNorm: DINOv2 with registers, final LayerNorm without its affine, patch tokens only."""
    from transformers import Dinov2WithRegistersModel

    model = Dinov2WithRegistersModel.from_pretrained(path).eval()
    model.layernorm.elementwise_affine = False
    model.layernorm.weight = None
    model.layernorm.bias = None
    skip = 1 + model.config.num_register_tokens
    return lambda x: model(x).last_hidden_state[:, skip:]


def rae_encode(encoder, x, input_size, image_mean, image_std, stats=None, eps=1e-5, noise_tau=0.0, training=False,
               reshape_to_2d=True):
    """RAE.encode: bicubic resize without antialias, encoder normalisation, encoder, noise (training mode: sigma =
    noise_tau * U(0, 1) per image, drawn before the normal noise), the (B, C, h, w) grid, stats normalisation."""
    if x.shape[-1] != input_size:
        x = nn.functional.interpolate(x, size=(input_size, input_size), mode="bicubic", align_corners=False)
    z = encoder((x - image_mean) / image_std)
    if training and noise_tau > 0:
        sigma = noise_tau * torch.rand((z.size(0),) + (1,) * (len(z.shape) - 1))
        z = z + sigma * torch.randn_like(z)
    if reshape_to_2d:
        b, n, c = z.shape
        z = z.transpose(1, 2).reshape(b, c, int(n**0.5), int(n**0.5))
    if stats is not None:
        z = (z - stats["mean"]) / torch.sqrt(stats["var"] + eps)
    return z


def rae_decode(decoder, z, image_mean, image_std, stats=None, eps=1e-5, reshape_to_2d=True):
    """RAE.decode: de-normalisation, tokens, decoder, pixels x std + mean. No clamp."""
    if stats is not None:
        z = z * torch.sqrt(stats["var"] + eps) + stats["mean"]
    if reshape_to_2d:
        b, c, h, w = z.shape
        z = z.reshape(b, c, h * w).transpose(1, 2)
    return decoder(z) * image_std + image_mean


def rae_forward(encoder, decoder, x, input_size, image_mean, image_std, stats=None, eps=1e-5, noise_tau=0.0):
    """RAE.forward: decode(encode(x)); noise_tau > 0 as in training mode. [C] stats as RAE with reshape_to_2d=False
    applies them (on tokens), [C, h, w] stats on the grid."""
    flat = stats is not None and stats["mean"].dim() == 1
    z = rae_encode(encoder, x, input_size, image_mean, image_std, stats, eps, noise_tau, training=noise_tau > 0,
                   reshape_to_2d=not flat)
    return rae_decode(decoder, z, image_mean, image_std, stats, eps, reshape_to_2d=not flat)
