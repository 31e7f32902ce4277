"""VQRAE: frozen encoder -> EMA vector quantizer -> ViT decoder.

    image [0, 1] --encode--> latents (B, C, h, w) --quantize--> codes (B, h, w) / z_q --decode--> image [0, 1]

Sizes. The encoder sees images resized to `encoder_input_size` (None: as given, which must then be a
multiple of its patch size), so its grid is h = encoder_input_size / encoder patch. The decoder paints
h * decoder_patch_size pixels per side (DINOv2 p=14 at 224 -> 16x16 tokens -> 256 px with p=16).
`model(x)` returns x's size (resizing the decoder's output only where the two differ); `decode` and
`decode_from_indices` return the decoder's native size unless given `output_size`.

Outputs are clamped to [0, 1] in eval mode; in training mode `model(x)` returns the raw reconstruction so
that losses have gradients everywhere.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils import cached_file

from .atomic import atomic_path, write_json
from .decoder import ViTDecoder, load_decoder_config
from .encoders import build_encoder
from .quantizer import VectorQuantizer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ENCODER_SUBDIR = "encoder"
RANGE_TOLERANCE = 1e-3  # interpolation overshoot of a few 1e-4 is not a user error


def _read_latent_stats(path: str, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std from a safetensors file holding `mean` and `var` (or `std`)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"normalization_stat_path '{path}' does not exist")
    stats = load_file(path)
    if "mean" not in stats or not ({"var", "std"} & set(stats)):
        raise ValueError(f"{path} must hold tensors 'mean' and 'var' (or 'std'); found {sorted(stats)}")
    mean = stats["mean"].float().flatten()
    std = stats["std"].float().flatten() if "std" in stats else (stats["var"].float().flatten() + 1e-6).sqrt()
    if mean.numel() != channels or std.numel() != channels:
        raise ValueError(
            f"{path} holds statistics for {mean.numel()} channels, but the encoder has {channels} channels"
        )
    return mean, std


class VQRAE(nn.Module):
    def __init__(
        self,
        encoder_cls: str = "Dinov2withNorm",
        encoder_config_path: str = "facebook/dinov2-base",
        encoder_input_size: int | None = 224,
        encoder_params: dict | None = None,
        decoder_config_path: str | dict | None = None,
        decoder_patch_size: int | None = 16,
        num_embeddings: int = 8192,
        commitment_cost: float = 0.25,
        vq_decay: float = 0.99,
        vq_epsilon: float = 1e-5,
        dead_code_threshold: float = 0.0,
        kmeans_init: bool = False,
        noise_tau: float = 0.0,
        reshape_to_2d: bool = True,
        normalization_stat_path: str | None = None,
        quantize_before_reshape: bool = False,
        recon_loss: str = "l1",
    ):
        super().__init__()
        if recon_loss not in ("l1", "l2"):
            raise ValueError(f"recon_loss must be 'l1' or 'l2', got '{recon_loss}'")
        if noise_tau < 0:
            raise ValueError(f"noise_tau must be >= 0, got {noise_tau}")
        if encoder_input_size is not None and encoder_input_size < 1:
            raise ValueError(f"encoder_input_size must be a positive integer or None, got {encoder_input_size}")
        self.encoder = build_encoder(encoder_cls, encoder_config_path, **(encoder_params or {}))
        patch = self.encoder.patch_size
        if encoder_input_size is not None and encoder_input_size % patch:
            raise ValueError(
                f"encoder_input_size ({encoder_input_size}) must be a multiple of the encoder's patch size ({patch})"
            )
        latent_dim = self.encoder.hidden_size
        decoder_config = load_decoder_config(decoder_config_path, patch_size=decoder_patch_size)

        # Everything needed to rebuild the model; the decoder config is stored resolved, the encoder by reference.
        self.config = dict(
            encoder_cls=encoder_cls,
            encoder_config_path=encoder_config_path,
            encoder_input_size=encoder_input_size,
            encoder_params=dict(encoder_params or {}),
            decoder_config_path=decoder_config.to_dict(),
            decoder_patch_size=decoder_config.patch_size,
            num_embeddings=num_embeddings,
            commitment_cost=commitment_cost,
            vq_decay=vq_decay,
            vq_epsilon=vq_epsilon,
            dead_code_threshold=dead_code_threshold,
            kmeans_init=kmeans_init,
            noise_tau=noise_tau,
            reshape_to_2d=reshape_to_2d,
            normalization_stat_path=normalization_stat_path,
            quantize_before_reshape=quantize_before_reshape,
            recon_loss=recon_loss,
        )
        self.encoder_input_size = encoder_input_size
        self.noise_tau = float(noise_tau)
        self.reshape_to_2d = reshape_to_2d
        self.quantize_before_reshape = quantize_before_reshape
        self.recon_loss = recon_loss

        mean, std = torch.zeros(latent_dim), torch.ones(latent_dim)
        if normalization_stat_path is not None:
            mean, std = _read_latent_stats(normalization_stat_path, latent_dim)
        # Saved with the weights, so a checkpoint does not need the stats file any more.
        self.register_buffer("latent_mean", mean)
        self.register_buffer("latent_std", std)

        self.quantizer = VectorQuantizer(
            num_embeddings,
            latent_dim,
            commitment_cost=commitment_cost,
            decay=vq_decay,
            epsilon=vq_epsilon,
            dead_code_threshold=dead_code_threshold,
            kmeans_init=kmeans_init,
        )
        grid = (encoder_input_size or 224) // patch
        self.decoder = ViTDecoder(latent_dim, decoder_config, grid_size=grid)

    @property
    def image_size(self) -> int | None:
        """Side of the images this model paints natively (None when encoder_input_size is None)."""
        grid = self.grid_size
        return None if grid is None else grid * self.decoder.patch_size

    @property
    def grid_size(self) -> int | None:
        """Codes per side for the encoder's input size (None when encoder_input_size is None)."""
        return None if self.encoder_input_size is None else self.encoder_input_size // self.encoder.patch_size

    # ---- checks ---------------------------------------------------------------------------------------------
    def _check_images(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"expected images as a torch.Tensor of shape (B, 3, H, W), got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"expected images of shape (B, 3, H, W), got rank {x.dim()} shape {tuple(x.shape)}")
        if x.numel() == 0:
            raise ValueError(f"expected a non-empty batch of images, got shape {tuple(x.shape)}")
        if x.shape[1] != 3:
            raise ValueError(f"expected 3 (RGB) channels, got {x.shape[1]} channels in shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"expected float images in [0, 1], got dtype {x.dtype}; e.g. use x.float() / 255")
        if self.encoder_input_size is None:
            p = self.encoder.patch_size
            if x.shape[-2] % p or x.shape[-1] % p:
                raise ValueError(
                    f"image size {tuple(x.shape[-2:])} must be a multiple of the encoder's patch size {p} "
                    f"(or set encoder_input_size to resize)"
                )
        lo, hi = torch.aminmax(x.detach())
        lo, hi = float(lo), float(hi)
        if not (lo >= -RANGE_TOLERANCE and hi <= 1 + RANGE_TOLERANCE):  # also catches NaN
            raise ValueError(f"expected finite pixel values in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")

    def _check_indices(self, indices) -> None:
        k = self.quantizer.num_embeddings
        if not isinstance(indices, torch.Tensor):
            raise ValueError(f"expected indices as a torch.Tensor, got {type(indices).__name__}")
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise ValueError(f"expected integer indices (torch.long), got dtype {indices.dtype}")
        if indices.dim() not in (2, 3):
            raise ValueError(f"expected indices of shape (B, h, w) or (B, h*w), got shape {tuple(indices.shape)}")
        if indices.numel() == 0:
            raise ValueError(f"expected a non-empty batch of indices, got shape {tuple(indices.shape)}")
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= k:
            raise ValueError(f"indices must lie in [0, {k - 1}] (codebook size {k}), got values in [{lo}, {hi}]")

    # ---- data path ------------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> normalised latents (B, C, h, w), or (B, N, C) with reshape_to_2d=False."""
        self._check_images(x)
        if self.encoder_input_size is not None and tuple(x.shape[-2:]) != (self.encoder_input_size,) * 2:
            x = F.interpolate(x, size=self.encoder_input_size, mode="bicubic", align_corners=False, antialias=True)
        tokens = self.encoder(x)
        tokens = (tokens - self.latent_mean.to(tokens.dtype)) / self.latent_std.to(tokens.dtype)
        if not self.reshape_to_2d:
            return tokens
        h, w = x.shape[-2] // self.encoder.patch_size, x.shape[-1] // self.encoder.patch_size
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)

    def quantize(self, z: torch.Tensor):
        """Latents -> (z_q, losses, indices), z_q in z's layout, indices (B, h, w) or (B, N)."""
        if self.quantize_before_reshape and z.dim() == 4:
            # Quantize the token sequence, then restore the grid: the same codes, in sequence order.
            b, c, h, w = z.shape
            z_q, losses, indices = self.quantizer(z.flatten(2).transpose(1, 2))
            return z_q.transpose(1, 2).reshape(b, c, h, w), losses, indices.reshape(b, h, w)
        return self.quantizer(z)

    def decode(self, z_q: torch.Tensor, output_size=None, clamp: bool = True) -> torch.Tensor:
        """Quantized latents (B, C, h, w) or (B, N, C) -> images (B, 3, h*p, w*p), or `output_size`."""
        if z_q.dim() == 3:
            z_q = self._tokens_to_grid(z_q)
        x = self.decoder(z_q) * 0.5 + 0.5
        if output_size is not None and tuple(x.shape[-2:]) != tuple(output_size):
            x = F.interpolate(x, size=tuple(output_size), mode="bicubic", align_corners=False, antialias=True)
        return x.clamp(0.0, 1.0) if clamp else x

    def forward(self, x: torch.Tensor, return_loss: bool = False):
        z = self.encode(x)
        z_q, vq_losses, _ = self.quantize(z)
        if self.training and self.noise_tau > 0:
            # RAE-style decoder noise: sigma ~ U(0, noise_tau) per image, after quantization.
            sigma = torch.rand(z_q.shape[0], *([1] * (z_q.dim() - 1)), device=z_q.device) * self.noise_tau
            z_q = z_q + sigma.to(z_q.dtype) * torch.randn_like(z_q)
        raw = self.decode(z_q, output_size=x.shape[-2:], clamp=False)
        x_rec = raw if self.training else raw.clamp(0.0, 1.0)
        if not return_loss:
            return x_rec
        error = raw.float() - x.float()
        recon = error.abs().mean() if self.recon_loss == "l1" else error.pow(2).mean()
        losses = {"recon_loss": recon, **vq_losses}
        losses["loss"] = recon + vq_losses["vq_loss"]
        return x_rec, losses

    @torch.no_grad()
    def encode_to_indices(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> code indices (B, h, w), long. Never updates the codebook."""
        z = self.encode(x)
        if z.dim() == 3:
            z = self._tokens_to_grid(z)
        return self.quantizer.encode(z)

    @torch.no_grad()
    def decode_from_indices(self, indices: torch.Tensor, output_size=None) -> torch.Tensor:
        """Code indices (B, h, w) or (B, h*w) -> images in [0, 1]."""
        self._check_indices(indices)
        if indices.dim() == 2:
            indices = self._tokens_to_grid(indices.unsqueeze(-1)).squeeze(1)
        return self.decode(self.quantizer.lookup(indices.long()), output_size=output_size, clamp=True)

    @staticmethod
    def _tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, C, h, h) for a square token count."""
        b, n, c = tokens.shape
        side = int(round(n**0.5))
        if side * side != n:
            raise ValueError(f"{n} tokens do not form a square grid; pass a (B, h, w) grid instead")
        return tokens.transpose(1, 2).reshape(b, c, side, side)

    # ---- parameters and checkpoints ------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen encoder: decoder, codebook, latent statistics."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}

    def save_pretrained(self, directory: str | os.PathLike, save_encoder: bool = False) -> None:
        """Write `model.safetensors` + `config.json`; the frozen encoder is stored by reference unless asked."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        config = dict(self.config, normalization_stat_path=None)  # the stats travel in the weights
        if save_encoder:
            self.encoder.model.save_pretrained(os.path.join(directory, ENCODER_SUBDIR))
            write_json(
                os.path.join(directory, ENCODER_SUBDIR, "preprocessor_config.json"),
                {"image_mean": self.encoder.image_mean.flatten().tolist(),
                 "image_std": self.encoder.image_std.flatten().tolist()},
            )
            config["encoder_config_path"] = ENCODER_SUBDIR
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.trainable_state_dict().items()}
        with atomic_path(os.path.join(directory, WEIGHTS_NAME)) as tmp:
            save_file(tensors, tmp, metadata={"format": "pt"})
        write_json(os.path.join(directory, CONFIG_NAME), config)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, weights_name: str = WEIGHTS_NAME, **overrides) -> "VQRAE":
        """Load from a directory written by save_pretrained (or a training checkpoint: weights_name=
        "ema.safetensors" for its EMA weights) or a Hub repo id. Overrides replace config entries, e.g.
        encoder_config_path=<local dir> where the referenced Hub encoder is not available offline."""
        import json

        path = os.fspath(path)
        with open(cls._resolve(path, CONFIG_NAME)) as f:
            config = json.load(f)
        unknown = sorted(set(config) - set(cls._config_keys()))
        if unknown:
            raise ValueError(f"{os.path.join(path, CONFIG_NAME)} has unknown keys {unknown}")
        weights_file = cls._resolve(path, weights_name)
        config.update(overrides)
        if config["encoder_config_path"] == ENCODER_SUBDIR and os.path.isdir(os.path.join(path, ENCODER_SUBDIR)):
            config["encoder_config_path"] = os.path.join(path, ENCODER_SUBDIR)
        model = cls(**config)
        state = load_file(weights_file)
        expected = model.trainable_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        mismatched = [
            f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in set(state) & set(expected)
            if state[k].shape != expected[k].shape
        ]
        if missing or unexpected or mismatched:
            raise ValueError(
                f"weights in {weights_file} do not match its config: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}, shape mismatches {mismatched[:5]}"
            )
        model.load_state_dict(state, strict=False)
        return model

    @staticmethod
    def _resolve(path: str, name: str) -> str:
        try:
            return cached_file(path, name)
        except OSError as err:
            raise FileNotFoundError(
                f"'{path}' is not a VQRAE checkpoint: expected a directory (or Hub repo) with {CONFIG_NAME} and "
                f"{name} ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
            ) from err

    @classmethod
    def _config_keys(cls) -> list[str]:
        import inspect

        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
