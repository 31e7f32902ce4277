"""Tiny, randomly initialised encoder checkpoints, built from transformers configs and saved to disk.

They let the tests and the offline quickstart run the real `from_pretrained` loading path without any
download. Their features are random projections, not pretrained ones: a stand-in, never a substitute.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..base.atomic import follow_umask, write_json
from ..base.config_section import ConfigSection, choice

TINY_FAMILIES = ("dinov2", "dinov2_reg", "siglip", "siglip2_naflex", "mae")
MAX_TINY_WIDTH, MAX_TINY_LAYERS = 1024, 64  # a stand-in's largest width, and its largest layer / head / patch counts
ENCODER_CLS = {
    "dinov2": "Dinov2withNorm",
    "dinov2_reg": "Dinov2withNorm",
    "siglip": "SigLIP2",
    "siglip2_naflex": "SigLIP2",
    "mae": "MAE",
}


def save_tiny_encoder(
    family: str,
    directory: str,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    patch_size: int = 8,
    image_size: int = 32,
    seed: int = 0,
    image_mean=None,
    image_std=None,
) -> str:
    """Write a tiny `family` checkpoint to `directory` (config.json + model.safetensors); return the path.

    With image_mean/image_std, a preprocessor_config.json is written too, as Hub checkpoints have.
    """
    import transformers as tf

    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny encoder family '{family}'; expected one of {TINY_FAMILIES}")
    dims = dict(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=4 * hidden_size,
        patch_size=patch_size,
    )
    sized = dict(dims, image_size=image_size)
    with torch.random.fork_rng(devices=[]):  # leave the caller's random stream untouched
        torch.manual_seed(seed)
        model = _build(tf, family, dims, sized, image_size, patch_size)
    model.save_pretrained(directory)
    if image_mean is not None or image_std is not None:
        write_json(os.path.join(directory, "preprocessor_config.json"),
                   {"image_mean": list(image_mean), "image_std": list(image_std)})
    follow_umask(directory)
    return directory


def _build(tf, family, dims, sized, image_size, patch_size):
    if family == "dinov2":
        model = tf.Dinov2Model(tf.Dinov2Config(**sized))
    elif family == "dinov2_reg":
        model = tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(num_register_tokens=4, **sized))
    elif family == "siglip":
        # A full image-text checkpoint, as the Hub's fixed-resolution SigLIP / SigLIP2 repos are.
        text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                    vocab_size=64, bos_token_id=1, eos_token_id=2)
        model = tf.SiglipModel(tf.SiglipConfig(vision_config=sized, text_config=text))
    elif family == "siglip2_naflex":
        grid = image_size // patch_size
        model = tf.Siglip2VisionModel(tf.Siglip2VisionConfig(num_patches=grid * grid, **dims))
    else:
        model = tf.ViTMAEModel(tf.ViTMAEConfig(**sized))
    return model


@dataclass
class TinyEncoderConfig(ConfigSection):
    """A training stand-in's recipe (`init.tiny_encoder` in configs/encoder/tiny_*.yaml): its family and sizes, which
    save_tiny_encoder takes. Bounded: a stand-in is small (hidden 65536 x 64 layers tried to allocate 17 GB)."""

    section = "init.tiny_encoder"
    family: str = choice(*TINY_FAMILIES)
    hidden_size: int = 32
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    patch_size: int = 8

    def check(self):
        self.require_at_most(MAX_TINY_WIDTH, "hidden_size")
        self.require_at_most(MAX_TINY_LAYERS, "num_hidden_layers", "num_attention_heads", "patch_size")
        self.require(self.hidden_size % self.num_attention_heads == 0, "hidden_size",
                     f"divisible by init.tiny_encoder.num_attention_heads ({self.num_attention_heads})")


def write_stand_in_encoder(spec: TinyEncoderConfig, directory: str, image_size: int, seed: int = 0) -> None:
    """The training stand-in: written once to `directory`, kept on resume."""
    if os.path.isfile(os.path.join(directory, "config.json")):
        return
    sizes = spec.to_dict()
    family = sizes.pop("family")
    save_tiny_encoder(family, directory, image_size=image_size, seed=seed, **sizes)
    print(f"encoder: a tiny randomly initialised {family} stand-in at {directory}. It is untrained: the "
          f"reconstructions show the pipeline working, not a real tokenizer. On a machine with network and a GPU, "
          f"train with a real encoder, e.g. encoder=dinov2_b decoder=vit_b.")
