"""VQRAE: frozen encoder -> EMA vector quantizer -> ViT decoder.

    image [0, 1] --encoder--> tokens (B, N, C) --quantizer--> codes (B, N) / z_q (B, N, C) --decoder--> image [0, 1]

Latents stay tokens from the encoder to the decoder; only the public methods speak grids: `encode` returns
(B, C, h, w) when config.reshape_to_2d (the default), and indices are (B, h, w).

Sizes. The encoder sees images resized to `encoder.input_size` (None: as given, which must then be a multiple of
its patch size), so its grid is h = input_size / encoder patch. The decoder paints h * decoder.patch_size pixels
per side (DINOv2 p=14 at 224 -> 16x16 tokens -> 256 px with p=16). `model(x)` returns x's size (resizing the
decoder's output only where the two differ); `decode` and `decode_from_indices` return the decoder's native size
unless given `output_size`.

Outputs are clamped to [0, 1] in eval mode; in training mode `model(x)` returns the raw reconstruction so that
losses have gradients everywhere.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils import cached_file

from .atomic import atomic_path, write_json
from .decoder import ViTDecoder
from .encoders import build_encoder
from .losses import reconstruction_loss
from .model_config import VQRAEConfig
from .quantizer_kinds import build_quantizer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ENCODER_SUBDIR = "encoder"
RANGE_TOLERANCE = 1e-3  # interpolation overshoot of a few 1e-4 is not a user error
DEFAULT_GRID_IMAGE = 224  # with encoder.input_size None, the decoder's position grid is sized for 224 px


def read_latent_stats(path: str, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
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


# ---- layouts: only the public methods convert ------------------------------------------------------------------
def grid_to_tokens(z: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, C, h, w) -> (B, h*w, C) in raster order, and (h, w)."""
    return z.flatten(2).transpose(1, 2), (z.shape[2], z.shape[3])


def tokens_to_grid(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, h*w, C) -> (B, C, h, w)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)


def square_grid(n: int) -> tuple[int, int]:
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"{n} tokens do not form a square grid; pass a (B, h, w) grid instead")
    return side, side


class VQRAE(nn.Module):
    """VQRAE(config), or VQRAE(**keywords) with the flat names of RAE (see model_config.KEYWORDS):
    VQRAE(encoder_cls="Dinov2withNorm", encoder_config_path="facebook/dinov2-base", num_embeddings=8192, ...)."""

    def __init__(self, config: VQRAEConfig | None = None, **keywords):
        super().__init__()
        if config is None:
            config = VQRAEConfig.from_kwargs(**keywords)
        elif keywords:
            raise TypeError("pass either a VQRAEConfig or keyword arguments, not both")
        self.config = config
        encoder = config.encoder
        self.encoder = build_encoder(encoder.cls, encoder.path, **encoder.params)
        if encoder.input_size is not None:
            self.encoder.check_fits("encoder_input_size", encoder.input_size)
        channels = self.encoder.hidden_size
        mean, std = torch.zeros(channels), torch.ones(channels)
        if config.normalization_stat_path is not None:
            mean, std = read_latent_stats(config.normalization_stat_path, channels)
        # Saved with the weights, so a checkpoint does not need the stats file any more.
        self.register_buffer("latent_mean", mean)
        self.register_buffer("latent_std", std)
        self.quantizer = build_quantizer(config.quantizer, channels)
        grid = self.grid_size or DEFAULT_GRID_IMAGE // self.encoder.patch_size
        self.decoder = ViTDecoder(channels, config.decoder, grid_size=grid)

    @property
    def grid_size(self) -> int | None:
        """Codes per side for the encoder's input size (None when encoder.input_size is None)."""
        size = self.config.encoder.input_size
        return None if size is None else size // self.encoder.patch_size

    def grid_side(self, image_size: int) -> int:
        """Codes per side for square images of `image_size` pixels (resized to encoder.input_size if set)."""
        return self.grid_size or image_size // self.encoder.patch_size

    @property
    def image_size(self) -> int | None:
        """Side of the images this model paints natively (None when encoder.input_size is None)."""
        return None if self.grid_size is None else self.grid_size * self.decoder.patch_size

    # ---- input checks: at the public entry points (training checks its first batch) ------------------------------
    def check_images(self, x, values: bool = True) -> None:
        """Shape and dtype checks; with `values`, also the pixel range (a device -> host sync)."""
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
        if self.config.encoder.input_size is None:
            self.encoder.check_fits("image size", *x.shape[-2:], hint=" (or set encoder_input_size to resize)")
        if values:
            lo, hi = (float(v) for v in torch.aminmax(x.detach()))
            if not (lo >= -RANGE_TOLERANCE and hi <= 1 + RANGE_TOLERANCE):  # also catches NaN
                raise ValueError(f"expected finite pixel values in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")

    def _check_indices(self, indices) -> None:
        k, suffix = self.quantizer.num_embeddings, self.quantizer.index_suffix
        if not isinstance(indices, torch.Tensor):
            raise ValueError(f"expected indices as a torch.Tensor, got {type(indices).__name__}")
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise ValueError(f"expected integer indices (torch.long), got dtype {indices.dtype}")
        if indices.dim() - len(suffix) not in (2, 3) or tuple(indices.shape[indices.dim() - len(suffix):]) != suffix:
            codes = "".join(f", {n}" for n in suffix)
            raise ValueError(f"expected indices of shape (B, h, w{codes}) or (B, h*w{codes}), got shape "
                             f"{tuple(indices.shape)}")
        if indices.numel() == 0:
            raise ValueError(f"expected a non-empty batch of indices, got shape {tuple(indices.shape)}")
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= k:
            raise ValueError(f"indices must lie in [0, {k - 1}] (codebook size {k}), got values in [{lo}, {hi}]")

    # ---- the data path, in tokens ----------------------------------------------------------------------------
    def encode_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images in [0, 1] (already checked) -> normalised latent tokens (B, N, C) and their grid (h, w)."""
        size = self.config.encoder.input_size
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        tokens = self.encoder(x)
        tokens = (tokens - self.latent_mean.to(tokens.dtype)) / self.latent_std.to(tokens.dtype)
        p = self.encoder.patch_size
        return tokens, (x.shape[-2] // p, x.shape[-1] // p)

    def _decode_tokens(self, tokens, grid, output_size=None, clamp: bool = True) -> torch.Tensor:
        x = self.decoder(tokens, grid) * 0.5 + 0.5
        if output_size is not None and tuple(x.shape[-2:]) != tuple(output_size):
            x = F.interpolate(x, size=tuple(output_size), mode="bicubic", align_corners=False, antialias=True)
        return x.clamp(0.0, 1.0) if clamp else x

    def forward(self, x: torch.Tensor, return_loss: bool = False):
        self.check_images(x, values=not self.training)  # no host sync per training step
        tokens, grid = self.encode_tokens(x)
        z_q, vq_losses, _ = self.quantizer(tokens)
        if self.training and self.config.noise_tau > 0:
            # RAE-style decoder noise: sigma ~ U(0, noise_tau) per image, after quantization.
            sigma = torch.rand(z_q.shape[0], 1, 1, device=z_q.device) * self.config.noise_tau
            z_q = z_q + sigma.to(z_q.dtype) * torch.randn_like(z_q)
        raw = self._decode_tokens(z_q, grid, output_size=x.shape[-2:], clamp=False)
        x_rec = raw if self.training else raw.clamp(0.0, 1.0)
        if not return_loss:
            return x_rec
        recon = reconstruction_loss(raw, x)  # L1; training weighs its own terms (stage1.losses.VQRAELoss)
        return x_rec, {"recon_loss": recon, **vq_losses, "loss": recon + vq_losses["vq_loss"]}

    @torch.no_grad()
    def encode_to_indices(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> code indices (B, h, w), long ((B, h, w, L) for residual / grouped quantizers).
        Never updates the codebook."""
        self.check_images(x)
        tokens, grid = self.encode_tokens(x)
        return self.quantizer.encode(tokens).reshape(-1, *grid, *self.quantizer.index_suffix)

    @torch.no_grad()
    def decode_from_indices(self, indices: torch.Tensor, output_size=None) -> torch.Tensor:
        """Code indices (B, h, w) or (B, h*w) -> images in [0, 1]; residual / grouped quantizers: (B, h, w, L) or
        (B, h*w, L)."""
        self._check_indices(indices)
        suffix = self.quantizer.index_suffix
        spatial = indices.shape[1 : indices.dim() - len(suffix)]
        grid = tuple(spatial) if len(spatial) == 2 else square_grid(spatial[0])
        tokens = self.quantizer.lookup(indices.reshape(indices.shape[0], -1, *suffix).long())
        return self._decode_tokens(tokens, grid, output_size=output_size)

    # ---- the same path in steps, in encode()'s layout --------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> normalised latents (B, C, h, w), or (B, N, C) with reshape_to_2d=False."""
        self.check_images(x)
        tokens, grid = self.encode_tokens(x)
        return tokens_to_grid(tokens, grid) if self.config.reshape_to_2d else tokens

    def quantize(self, z: torch.Tensor):
        """Latents from encode() -> (z_q, losses, indices): z_q in z's layout, indices (B, h, w) or (B, N)
        (with a last axis of L codes for residual / grouped quantizers)."""
        if z.dim() != 4:
            return self.quantizer(z)
        tokens, grid = grid_to_tokens(z)
        z_q, losses, indices = self.quantizer(tokens)
        return tokens_to_grid(z_q, grid), losses, indices.reshape(-1, *grid, *self.quantizer.index_suffix)

    def decode(self, z_q: torch.Tensor, output_size=None, clamp: bool = True) -> torch.Tensor:
        """Quantized latents (B, C, h, w) or (B, N, C) -> images (B, 3, h*p, w*p), or `output_size`."""
        tokens, grid = grid_to_tokens(z_q) if z_q.dim() == 4 else (z_q, square_grid(z_q.shape[1]))
        return self._decode_tokens(tokens, grid, output_size=output_size, clamp=clamp)

    # ---- parameters and checkpoints ------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen encoder: decoder, codebook, latent statistics."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}

    def save_pretrained(self, directory: str | os.PathLike, save_encoder: bool = False,
                        weights_name: str = WEIGHTS_NAME) -> None:
        """Write `weights_name` + `config.json`; the frozen encoder is stored by reference unless asked.
        Training checkpoints are written by this same method, so every checkpoint loads with from_pretrained."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        config = dataclasses.replace(self.config, normalization_stat_path=None)  # the stats travel in the weights
        if save_encoder:
            self.encoder.model.save_pretrained(os.path.join(directory, ENCODER_SUBDIR))
            write_json(
                os.path.join(directory, ENCODER_SUBDIR, "preprocessor_config.json"),
                {"image_mean": self.encoder.image_mean.flatten().tolist(),
                 "image_std": self.encoder.image_std.flatten().tolist()},
            )
            config.encoder = dataclasses.replace(config.encoder, path=ENCODER_SUBDIR)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.trainable_state_dict().items()}
        with atomic_path(os.path.join(directory, weights_name)) as tmp:
            save_file(tensors, tmp, metadata={"format": "pt"})
        config.save(os.path.join(directory, CONFIG_NAME))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, weights_name: str = WEIGHTS_NAME, **keywords) -> "VQRAE":
        """Load from a directory written by save_pretrained (or a training checkpoint: weights_name=
        "ema.safetensors" for its EMA weights) or a Hub repo id. Keywords (VQRAE's flat names) replace config
        values, e.g. encoder_config_path=<local dir> where the referenced Hub encoder is not available offline."""
        path = os.fspath(path)
        config = VQRAEConfig.load(cls._resolve(path, CONFIG_NAME))
        weights_file = cls._resolve(path, weights_name)
        if config.encoder.path == ENCODER_SUBDIR and os.path.isdir(os.path.join(path, ENCODER_SUBDIR)):
            config.encoder = dataclasses.replace(config.encoder, path=os.path.join(path, ENCODER_SUBDIR))
        model = cls(config.with_keywords(**keywords))
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
