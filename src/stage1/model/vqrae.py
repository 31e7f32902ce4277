"""VQRAE: frozen encoder -> EMA vector quantizer -> ViT decoder.

    image [0, 1] --encoder--> tokens (B, N, C) --quantizer--> codes (B, N) / z_q (B, N, C) --decoder--> image [0, 1]

Latents stay tokens from the encoder to the decoder; only the public methods speak grids: `features` and `encode`
return (B, C, h, w) when config.reshape_to_2d (the default), and indices are (B, h, w).

Sizes. The encoder sees images resized to `encoder.input_size` (None: as given, which must then be a multiple of
its patch size), so its grid is h = input_size / encoder patch. The decoder paints h * decoder.patch_size pixels
per side (DINOv2 p=14 at 224 -> 16x16 tokens -> 256 px with p=16). `model(x)` returns x's size (resizing the
decoder's output only where the two differ); `decode` and `decode_from_indices` return the decoder's native size
unless given `output_size`.

Outputs are clamped to [0, 1] in eval mode; in training mode `model(x)` returns the raw reconstruction so that
losses have gradients everywhere.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .config import VQRAEConfig
from .decoder import ViTDecoder
from .encoders import build_encoder
from .keywords import config_with_keywords
from .latent_stats import read_latent_stats
from .pretrained import Pretrained
from .quantizers import build_quantizer
from .rae import load_rae_decoder, read_rae_decoder

RANGE_TOLERANCE = 1e-3  # interpolation overshoot of a few 1e-4 is not a user error
COMPILE_OPTIONS: dict = {}  # torch.compile's own defaults (inductor); the tests trace with {"backend": "eager"}
DEFAULT_GRID_IMAGE = 224  # with encoder.input_size None, the decoder's position grid is sized for 224 px
MIN_LATENT_STD = 1e-6  # RAE's stats hold sqrt(var + 1e-5) >= 3e-3


# ---- layouts: only the public methods convert ------------------------------------------------------------------
def grid_to_tokens(z: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, C, h, w) -> (B, h*w, C) in raster order, and (h, w)."""
    return z.flatten(2).transpose(1, 2), (z.shape[2], z.shape[3])


def tokens_to_grid(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, h*w, C) -> (B, C, h, w)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)


def add_latent_noise(latent: torch.Tensor, noise_tau: float) -> torch.Tensor:
    """RAE's latent noise on a raw latent: sigma ~ U(0, noise_tau) per image, times N(0, 1) on every value (RAE's two
    draws, in its order, so a seed gives RAE's noise)."""
    sigma = noise_tau * torch.rand((latent.shape[0],) + (1,) * (latent.dim() - 1), device=latent.device)
    return latent + sigma.to(latent.dtype) * torch.randn_like(latent)


def from_signed(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (LlamaGen's and VAR's) -> [0, 1], for check_images to check. Integer images are refused
    first: in uint8, 255 + 1 wraps to 0, and a white image would get a black one's codes."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected float images in [-1, 1] of shape (B, 3, H, W), got {got}")
    return (images + 1) / 2


def square_grid(n: int) -> tuple[int, int]:
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"{n} tokens do not form a square grid; pass a (B, h, w) grid instead")
    return side, side


class VQRAE(Pretrained, nn.Module):
    """VQRAE(config), or VQRAE(**keywords) with the flat names of RAE (see stage1.model.keywords.KEYWORDS):
    VQRAE(encoder_cls="Dinov2withNorm", encoder_config_path="facebook/dinov2-base", num_embeddings=8192, ...)."""

    def __init__(self, config: VQRAEConfig | None = None, **keywords):
        super().__init__()
        if config is None:
            config = config_with_keywords(VQRAEConfig(), **keywords)
        elif keywords:
            raise TypeError("pass either a VQRAEConfig or keyword arguments, not both")
        self.config = config
        encoder = config.encoder
        self.encoder = build_encoder(encoder.cls, encoder.path, **encoder.params)
        if encoder.input_size is not None:
            self.encoder.check_fits("encoder_input_size", encoder.input_size)
        channels = self.encoder.hidden_size
        stats_file, eps = config.normalization_stat_path, config.normalization_eps
        self.set_latent_stats(*(read_latent_stats(stats_file, channels, eps, self.grid_size)
                                if stats_file is not None else (torch.zeros(channels), torch.ones(channels))))
        self.quantizer = build_quantizer(config.quantizer, channels)
        # Its layout is cached now: functools.cached_property takes a lock on Python <= 3.11 that torch.compile
        # cannot trace, and RAE's train.py compiles encode before its first call.
        self.quantizer.layout  # noqa: B018
        try:
            self.quantizer.check_grid(self.grid_size)
        except ValueError as err:
            raise ValueError(f"{err} (the grid: encoder.input_size {encoder.input_size} / encoder patch "
                             f"{self.encoder.patch_size})") from None
        grid = self.grid_size or DEFAULT_GRID_IMAGE // self.encoder.patch_size
        rae_decoder = config.pretrained_decoder_path
        rae_weights = read_rae_decoder(rae_decoder, config.decoder) if rae_decoder is not None else None
        self.decoder = ViTDecoder(channels, config.decoder, grid_size=grid)
        if rae_weights is not None:
            load_rae_decoder(self.decoder, rae_weights, rae_decoder)

    def set_latent_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """The latent normalisation, (C,) per channel or (h * w, C) per position (for the encoder's own grid).
        Buffers, saved with the weights, so a checkpoint does not need the stats file any more."""
        channels, grid = self.encoder.hidden_size, self.grid_size
        allowed = [(channels,)] + ([(grid * grid, channels)] if grid else [])
        if tuple(mean.shape) not in allowed or mean.shape != std.shape:
            raise ValueError(f"latent statistics of shape {tuple(mean.shape)} / {tuple(std.shape)} do not fit this "
                             f"model: expected one of {allowed} (per channel, or per position of its grid)")
        mean, std = mean.float(), std.float()
        # A std of 0 (or NaN) makes every latent Inf / NaN, and every image one code.
        if not (mean.isfinite().all() and std.isfinite().all() and (std >= MIN_LATENT_STD).all()):
            raise ValueError(f"latent statistics must be finite with std >= {MIN_LATENT_STD}: "
                             f"mean in [{mean.min():.3g}, {mean.max():.3g}], std in [{std.min():.3g}, {std.max():.3g}]")
        self.register_buffer("latent_mean", mean.float())
        self.register_buffer("latent_std", std.float())

    @property
    def layout(self):
        """What its codes are (stage1.model.quantizers.CodeLayout): shape, vocabulary, codebooks, scales."""
        return self.quantizer.layout

    @property
    def grid_size(self) -> int | None:
        """Codes per side for the encoder's input size (None when encoder.input_size is None)."""
        size = self.config.encoder.input_size
        return None if size is None else size // self.encoder.patch_size

    def code_shape(self, image_size: int) -> tuple[int, ...]:
        """One image's codes as encode_to_indices(flat=False) stacks them for square images of `image_size` pixels:
        (h, w[, L]); multi-scale: VAR's flat (L,)."""
        return self.layout.image_shape(self.grid_side(image_size))

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
        if values and not torch.compiler.is_compiling():  # a host sync, and a graph break in torch.compile(encode)
            lo, hi = (float(v) for v in torch.aminmax(x.detach()))
            if not (lo >= -RANGE_TOLERANCE and hi <= 1 + RANGE_TOLERANCE):  # also catches NaN
                raise ValueError(f"expected finite pixel values in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")

    # ---- the data path, in tokens ----------------------------------------------------------------------------
    def encode_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images in [0, 1] (already checked) -> normalised latent tokens (B, N, C) and their grid (h, w)."""
        encoder = self.config.encoder
        if encoder.input_size is not None and tuple(x.shape[-2:]) != (encoder.input_size,) * 2:
            x = F.interpolate(x, size=encoder.input_size, mode="bicubic", align_corners=False,
                              antialias=encoder.antialias)
        tokens = self.encoder(x)
        p = self.encoder.patch_size
        return self.normalize(tokens), (x.shape[-2] // p, x.shape[-1] // p)

    def normalize(self, tokens: torch.Tensor) -> torch.Tensor:
        """Raw encoder tokens (B, N, C) -> the normalised latent the quantizer sees (and RAE's diffusion model)."""
        if self.latent_mean.dim() == 2 and tokens.shape[1] != self.latent_mean.shape[0]:
            raise ValueError(f"per-position latent statistics are for {self.latent_mean.shape[0]} tokens, got "
                             f"{tokens.shape[1]}: use images of the size they were computed at")
        return (tokens - self.latent_mean.to(tokens.dtype)) / self.latent_std.to(tokens.dtype)

    def denormalize(self, tokens: torch.Tensor) -> torch.Tensor:
        """The inverse of normalize: what the decoder takes, as RAE's decoders do."""
        return tokens * self.latent_std.to(tokens.dtype) + self.latent_mean.to(tokens.dtype)

    def _decode_tokens(self, tokens, grid, output_size=None, clamp: bool = True, noise_tau: float = 0.0):
        """Normalised latent tokens -> images in [0, 1] (clamped unless asked not to)."""
        latent = self.denormalize(tokens)
        if noise_tau > 0:
            latent = add_latent_noise(latent, noise_tau)
        x = self.decoder(latent, grid)
        if self.config.decoder.pixel_space == "encoder":
            x = x * self.encoder.image_std.to(x.dtype) + self.encoder.image_mean.to(x.dtype)
        else:
            x = x * 0.5 + 0.5
        if output_size is not None and tuple(x.shape[-2:]) != tuple(output_size):
            x = F.interpolate(x, size=tuple(output_size), mode="bicubic", align_corners=False, antialias=True)
        return x.clamp(0.0, 1.0) if clamp else x

    def forward(self, x: torch.Tensor, return_loss: bool = False, return_quantizer_losses: bool = False):
        """Images in [0, 1] -> reconstructions at x's size (raw in training mode, for gradients everywhere; clamped
        to [0, 1] in eval mode). return_quantizer_losses: (x_rec, the quantizer's losses and metrics), what a
        training loss builds on (stage1.train.losses.VQRAELoss, as LlamaGen's VQLoss on its VQModel's outputs);
        return_loss: (x_rec, those plus recon_loss, the mean absolute error, and loss = recon_loss + vq_loss), a
        convenience for a loop of one's own."""
        self.check_images(x, values=not self.training)  # no host sync per training step
        tokens, grid = self.encode_tokens(x)
        quantized = self.quantizer(tokens)
        vq_losses = quantized.terms()
        raw = self._decode_tokens(quantized.z_q, grid, output_size=x.shape[-2:], clamp=False,
                                  noise_tau=self.config.noise_tau if self.training else 0.0)
        x_rec = raw if self.training else raw.clamp(0.0, 1.0)
        if return_quantizer_losses:
            return x_rec, vq_losses
        if not return_loss:
            return x_rec
        recon = (raw.float() - x.float()).abs().mean()
        return x_rec, {"recon_loss": recon, **vq_losses, "loss": recon + vq_losses["vq_loss"]}

    @torch.no_grad()
    def encode_to_indices(self, x: torch.Tensor, flat: bool = False):
        """Images in [0, 1] -> code indices (B, h, w), long ((B, h, w, L) for residual / grouped quantizers); flat:
        (B, h * w[, L]). Multi-scale: the scales' maps [(B, 1, 1), (B, 2, 2), ..., (B, h, w)], or VAR's flat (B, L).
        Never updates the codebook."""
        self.check_images(x)
        codes = self._indices(*self.encode_tokens(x))
        if self.layout.scales:
            return codes if flat else self.layout.split(codes)
        return codes.flatten(1, 2) if flat else codes

    @torch.no_grad()
    def decode_from_indices(self, indices, output_size=None) -> torch.Tensor:
        """Code indices (B, h, w) or (B, h*w) -> images in [0, 1]; residual / grouped quantizers: (B, h, w, L) or
        (B, h*w, L). Multi-scale: the maps of the first k scales, or VAR's flat (B, L') of them: the first k alone
        give a coarse-to-fine preview."""
        layout = self.layout
        indices = layout.check_indices(indices)
        if layout.scales:
            grid = (layout.scales[-1],) * 2
        else:
            spatial = indices.shape[1 : indices.dim() - len(layout.position_shape)]
            grid = tuple(spatial) if len(spatial) == 2 else square_grid(spatial[0])
        return self._decode_tokens(self._code_tokens(indices), grid, output_size=output_size)

    def _indices(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Normalised latent tokens (B, N, C) -> their codes (B, h, w[, L]); multi-scale: (B, L)."""
        codes = self.quantizer.encode(tokens)
        return codes if self.layout.scales else codes.reshape(-1, *grid, *self.layout.position_shape)

    def _code_tokens(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w[, L]) or (B, h*w[, L]); multi-scale (B, L') -> the tokens (B, N, C) they stand for."""
        if self.layout.scales:
            return self.quantizer.lookup(indices.long())
        return self.quantizer.lookup(indices.reshape(indices.shape[0], -1, *self.layout.position_shape).long())

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, output_size=None, return_latents: bool = False):
        """Images in [0, 1] -> (reconstructions in [0, 1], codes): through the codes (as encode_to_indices gives
        them, decoded as decode_from_indices does) when the model has a codebook; through the continuous latent,
        with codes None, when it has none. return_latents: also (z, z_q), the normalised latent tokens (B, N, C) and
        what the codes make of them (z itself without a codebook)."""
        self.check_images(x)
        z, grid = self.encode_tokens(x)
        codes, z_q = None, z
        if self.layout.has_codes:
            codes = self._indices(z, grid)
            z_q = self._code_tokens(codes)
        x_rec = self._decode_tokens(z_q, grid, output_size=output_size)
        return (x_rec, codes, (z, z_q)) if return_latents else (x_rec, codes)

    # ---- the same path in steps, as grids (B, C, h, w), or tokens (B, N, C) with reshape_to_2d=False -----------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> the encoder's normalised features: what the codebook quantizes."""
        self.check_images(x)
        return self._layout(*self.encode_tokens(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> the normalised latent the decoder takes, RAE's `encode`: the codes' vectors (the
        codebook never moves here), or the features themselves without a codebook; in training mode with RAE's
        noise (noise_tau) on the raw latent. What RAE's stage 2 trains a diffusion model on: a codebook that was never
        fitted or trained is refused (its codes would be random vectors)."""
        self.check_images(x)
        tokens, grid = self.encode_tokens(x)
        if self.layout.has_codes:
            if not torch.compiler.is_compiling() and not self.quantizer.started:  # a host sync: checked eagerly
                raise ValueError("this model's codebook was never fitted or trained: encode would give the vectors of "
                                 "a random codebook. Fit it (vqrae-fit-codebook) or train the model, then load the "
                                 "folder (VQRAE.from_pretrained; target: stage1.from_pretrained in RAE's stage 2)")
            tokens = self._code_tokens(self._indices(tokens, grid))
        if self.training and self.config.noise_tau > 0:
            tokens = self.normalize(add_latent_noise(self.denormalize(tokens), self.config.noise_tau))
        return self._layout(tokens, grid)

    def _layout(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return tokens_to_grid(tokens, grid) if self.config.reshape_to_2d else tokens

    def quantize(self, z: torch.Tensor):
        """Features from features() -> (z_q, losses, indices): z_q in z's layout, indices (B, h, w) or (B, N)
        (with a last axis of L codes for residual / grouped quantizers). In training mode the codebook learns."""
        if z.dim() != 4:
            out = self.quantizer(z)
            return out.z_q, out.terms(), out.indices
        tokens, grid = grid_to_tokens(z)
        out = self.quantizer(tokens)
        indices = out.indices
        if indices is not None and not self.layout.scales:
            indices = indices.reshape(-1, *grid, *self.layout.position_shape)
        return tokens_to_grid(out.z_q, grid), out.terms(), indices

    def decode(self, z_q: torch.Tensor, output_size=None, clamp: bool = True) -> torch.Tensor:
        """Quantized latents (B, C, h, w) or (B, N, C) -> images (B, 3, h*p, w*p), or `output_size`."""
        tokens, grid = grid_to_tokens(z_q) if z_q.dim() == 4 else (z_q, square_grid(z_q.shape[1]))
        return self._decode_tokens(tokens, grid, output_size=output_size, clamp=clamp)

    # ---- parameters (saving and loading: stage1.model.pretrained) --------------------------------------------
    def trained_parameter_groups(self) -> list[dict]:
        """What training moves by gradient, as optimizer groups: the decoder's weights, and the quantizer's own
        (Quantizer.trained_parameters: a multi-scale quantizer's phi). Those are codes-side state like the codebooks:
        never averaged into the decoder's EMA copy, whose codes come from the live quantizer."""
        return [{"params": list(self.decoder.parameters())}, *self.quantizer.trained_parameters()]

    @contextmanager
    def decoder_swapped(self, decoder: nn.Module):
        """The model with another decoder for a while (training's EMA copy: samples, checkpoints, the export)."""
        original, self.decoder = self.decoder, decoder
        try:
            yield self
        finally:
            self.decoder = original

    def compile_parts(self, **options) -> "VQRAE":
        """torch.compile the frozen encoder's and the decoder's forward, in place (nn.Module.compile: the state dict
        keeps its names, so saving, loading and DDP are as before); `options` go to torch.compile. The quantizer
        stays eager: its search and EMA update branch on the data."""
        options = {**COMPILE_OPTIONS, **options}
        self.encoder.model.compile(**options)
        self.decoder.compile(**options)
        return self

    @classmethod
    def from_rae(cls, pretrained_decoder_path: str, decoder_config_path: str,
                 normalization_stat_path: str | None = None, decoder_patch_size: int = 16, **keywords) -> "VQRAE":
        """A model around one of RAE's released decoders: its weights (`model.pt`, or safetensors), its decoder
        config (a ViT-MAE config.json or its directory) and the latent statistics it was trained with (`stat.pt`),
        as RAE's stage-1 YAML names them. Keywords are VQRAE's (encoder_cls, encoder_config_path, ...); by default
        RAE's: DINOv2-B with registers at 224 px, and no codebook (quantizer_kind="none"), so the model is RAE.
        Give num_embeddings (and quantizer_kind for residual / grouped) to put a codebook in front of the decoder.
        (The same as VQRAE(pretrained_decoder_path=..., ...) with RAE's keywords, or stage1.RAE.)"""
        keywords.setdefault("quantizer_kind", "single" if "num_embeddings" in keywords else "none")
        keywords.setdefault("encoder_config_path", "facebook/dinov2-with-registers-base")
        return cls(pretrained_decoder_path=pretrained_decoder_path, decoder_config_path=decoder_config_path,
                   normalization_stat_path=normalization_stat_path, decoder_patch_size=decoder_patch_size, **keywords)



def from_pretrained(path: str | os.PathLike, **options) -> VQRAE:
    """VQRAE.from_pretrained as a module-level function, for configs that name a callable by its dotted path: RAE's
    stage 2 with `target: stage1.from_pretrained` and `params: {path: results/run/final}`."""
    return VQRAE.from_pretrained(path, **options)
