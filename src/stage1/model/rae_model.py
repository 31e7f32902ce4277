"""RAE: the stage-1 model of RAE ("Diffusion Transformers with Representation Autoencoders", github bytetriper/RAE,
src/stage1/rae.py) on this package, with RAE's constructor, defaults and methods, so that RAE's stage-2 scripts and
YAML configs (`target: stage1.RAE`) run on this package in place of RAE's `src/stage1/`.

It is a VQRAE without a codebook: RAE's encoders, resize, latent statistics, noise and decoder are what VQRAE
does with quantizer.kind none (parity with RAE's own code: tests/test_rae.py, tests/test_rae_stage2.py). RAE differs
from VQRAE in its defaults (noise_tau 0.8; decoder_config_path "vit_mae-base", which names no file here and none in
RAE unless such a folder exists: give RAE's configs/decoder/ViTXL or a preset) and in two behaviours, which RAE's
scripts rely on: `decode` does not clamp, and `forward` is decode(encode(x)) at the decoder's size. A VQRAE whose
codebook was fitted or trained (`target: stage1.from_pretrained` in the same YAML) gives stage 2 the codes' vectors
instead.
"""

from __future__ import annotations

import torch

from .config import VQRAEConfig
from .quantizers import NoQuantizer
from .rae import decoder_state_from_rae
from .vqrae import VQRAE


class RAE(VQRAE):
    """RAE(encoder_cls, encoder_config_path, encoder_input_size, encoder_params, decoder_config_path,
    decoder_patch_size, pretrained_decoder_path, noise_tau, reshape_to_2d, normalization_stat_path, eps), as RAE's.

    encoder_params may name the checkpoint as RAE's encoder classes do (dinov2_path, model_name): it must be
    encoder_config_path's, which it stands for when encoder_config_path is not given (RAE's default there is
    facebook/dinov2-base). decoder_config_path is RAE's ViT-MAE config directory (configs/decoder/ViTXL) or one of
    the presets here (rae_vit_xl, ...)."""

    def __init__(self, encoder_cls: str = "Dinov2withNorm", encoder_config_path: str | None = None,
                 encoder_input_size: int = 224, encoder_params: dict | None = None,
                 decoder_config_path: str = "vit_mae-base", decoder_patch_size: int = 16,
                 pretrained_decoder_path: str | None = None, noise_tau: float = 0.8, reshape_to_2d: bool = True,
                 normalization_stat_path: str | None = None, eps: float = 1e-5):
        path = {} if encoder_config_path is None else {"encoder_config_path": encoder_config_path}
        super().__init__(quantizer_kind=NoQuantizer.kind, encoder_cls=encoder_cls,
                         encoder_input_size=encoder_input_size, encoder_params=encoder_params or {},
                         decoder_config_path=decoder_config_path, decoder_patch_size=decoder_patch_size,
                         pretrained_decoder_path=pretrained_decoder_path, noise_tau=noise_tau,
                         reshape_to_2d=reshape_to_2d, normalization_stat_path=normalization_stat_path, eps=eps, **path)

    @classmethod
    def from_config(cls, config: VQRAEConfig) -> "RAE":
        """An RAE from a whole config (RAE.from_pretrained of a folder saved without a codebook)."""
        if config.quantizer.kind != NoQuantizer.kind:
            raise ValueError(f"an RAE has no codebook, but this config has quantizer.kind {config.quantizer.kind!r}: "
                             f"load it with VQRAE.from_pretrained")
        model = cls.__new__(cls)
        VQRAE.__init__(model, config)  # RAE's constructor takes RAE's keywords, not a config
        return model

    @classmethod
    def from_rae(cls, *args, **keywords):
        raise TypeError("RAE takes RAE's files in its own constructor: RAE(pretrained_decoder_path=..., "
                        "decoder_config_path=..., normalization_stat_path=..., ...); from_rae is VQRAE's")

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Also RAE's own state dicts (its stage-1 training's checkpoints: `ckpt:` in RAE's stage-2 YAML, whose
        instantiate_from_config loads them here): their decoder is mapped onto this one (stage1.model.rae), their
        encoder left out (frozen: loaded from encoder_config_path)."""
        if any("decoder.decoder_" in key for key in state_dict):  # also under DDP's or torch.compile's prefixes
            return self.decoder.load_state_dict(decoder_state_from_rae(dict(state_dict)), strict=strict, assign=assign)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def decode(self, z: torch.Tensor, output_size=None, clamp: bool = False) -> torch.Tensor:
        """Normalised latents -> images, not clamped (RAE's scripts clamp what they save)."""
        return super().decode(z, output_size=output_size, clamp=clamp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x)): RAE's forward (with its noise in training mode), at the decoder's size."""
        return self.decode(self.encode(x))
