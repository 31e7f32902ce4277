"""VAR's tokenizer interface on a multi-scale VQRAE, so that VAR's trainer and sampler (FoundationVision/VAR:
trainer.py, models/var.py) use a vqrae tokenizer in place of its VQVAE:

    vae_local = VARTokenizer.from_pretrained("ckpt/")    # instead of VQVAE(...) and its load_state_dict

VQVAE's side (images in [-1, 1]): Cvae, vocab_size, img_to_idxBl, idxBl_to_img, fhat_to_img,
img_to_reconstructed_img, encoder and decoder (views of the model's, which train.py counts), and `quantize`,
VectorQuantizer2's side: embedding (called on indices, or its .weight), v_patch_nums, idxBl_to_var_input (training's
teacher forcing), get_next_autoregressive_input (sampling) and prog_si (train.py --pg's progressive training).
VAR's f_hat is here the sum of the upsampled code maps in the quantizer's space (the normalised latent), each
refined by the model's phi convolutions where it has them (quantizer.phi), as VAR's. VAR calls
`quantize.embedding(idx_Bl)` on one scale's codes at a time, so with a codebook per scale the scale is told by their
length (s * s); `.weight` (VAR's smoothed sampling, more_smooth=True) needs one codebook.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .quantizers.scales import area, to_tokens
from .vqrae import VQRAE, from_signed


def check_scale_codes(layout, ms_idx_Bl) -> list[torch.Tensor]:
    """VAR's codes of the first scales, one tensor a scale ((B, s * s) or (B, s, s)), checked as decode_from_indices
    checks its codes: the scales whole and in order, one batch, integers inside the vocabulary; returns them flat."""
    sides = list(layout.scales)
    if not isinstance(ms_idx_Bl, (list, tuple)) or not 0 < len(ms_idx_Bl) <= len(sides):
        count = len(ms_idx_Bl) if isinstance(ms_idx_Bl, (list, tuple)) else "no list"
        raise ValueError(f"expected a list of the first scales' codes of {sides}, one (B, s * s) tensor a scale, got "
                         f"{type(ms_idx_Bl).__name__} ({count})")
    shapes = [tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__ for idx in ms_idx_Bl]
    batch = shapes[0][0] if isinstance(shapes[0], tuple) and shapes[0] else None
    if any(shape not in ((batch, s * s), (batch, s, s)) for shape, s in zip(shapes, sides, strict=False)):
        raise ValueError(f"expected the scales' codes in order, [(B, 1), (B, 4), ...] for scales {sides}, got "
                         f"{shapes}")
    flats = [idx.reshape(batch, -1) for idx in ms_idx_Bl]
    layout.check_indices(torch.cat(flats, dim=1))  # integers inside the vocabulary
    return flats


class ScaleCodebooks:
    """The scales' codebooks as VAR's `quantize.embedding`: called on one scale's indices (B, s * s), the scale told
    by their length; `.weight` (K, Cvae) when one codebook serves every scale."""

    def __init__(self, quantizer):
        self.quantizer = quantizer

    @property
    def weight(self) -> torch.Tensor:
        if not self.quantizer.shared:
            raise ValueError("quantize.embedding.weight is one codebook for every scale, and this model has one per "
                             "scale: sample without VAR's more_smooth (its gumbel mix of the codebook); VAR leaves "
                             "its kv-cache on after this error (for b in var.blocks: b.attn.kv_caching(False))")
        return self.quantizer.levels[0].embedding

    def __call__(self, indices: torch.Tensor) -> torch.Tensor:
        lengths = self.quantizer.lengths
        if not isinstance(indices, torch.Tensor) or indices.dim() != 2 or indices.shape[-1] not in lengths:
            raise ValueError(f"VAR's embedding takes one scale's codes (B, s * s) with s in "
                             f"{list(self.quantizer.scales)}, got {tuple(getattr(indices, 'shape', ()))}")
        if indices.is_floating_point() or indices.dtype == torch.bool or indices.numel() and not (
                0 <= int(indices.min()) and int(indices.max()) < self.quantizer.num_embeddings):
            raise ValueError(f"VAR's embedding takes integer codes in [0, {self.quantizer.num_embeddings - 1}], got "
                             f"{indices.dtype} values" + (f" in [{int(indices.min())}, {int(indices.max())}]"
                                                          if not indices.is_floating_point() else ""))
        return self.quantizer.codebook(lengths.index(indices.shape[-1])).lookup(indices)


class VARQuantizer(nn.Module):
    """VectorQuantizer2's methods that VAR's trainer and sampler call, on a multi-scale quantizer."""

    def __init__(self, quantizer):
        super().__init__()
        self._quantizer = (quantizer,)  # a reference: its buffers stay the model's own
        self.embedding = ScaleCodebooks(quantizer)
        self.v_patch_nums = tuple(quantizer.scales)
        self.Cvae, self.vocab_size = quantizer.embedding_dim, quantizer.num_embeddings
        # VAR's progressive training (train.py --pg): its trainer sets this to the last scale trained on (-1: all);
        # the codes and the teacher-forcing input stop there, as VectorQuantizer2's.
        self.prog_si = -1

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        """The quantizer's trained parameters (phi), which VAR's train.py counts as VAE.quant: read through, never
        registered here (the adapter's state_dict stays the model's)."""
        return self._quantizer[0].named_parameters(prefix, recurse, remove_duplicate)

    def scales_in_training(self) -> int:
        """How many scales VAR's trainer works on now: prog_si + 1 in progressive training, else all."""
        return len(self.v_patch_nums) if self.prog_si < 0 else min(self.prog_si + 1, len(self.v_patch_nums))

    @torch.no_grad()  # the tokenizer is frozen: no graph into phi
    def idxBl_to_var_input(self, gt_ms_idx_Bl: list[torch.Tensor]) -> torch.Tensor | None:
        """The teacher-forcing input (B, L - first_l, Cvae): after each scale but the last (in progressive training:
        the last of the first prog_si + 1), f_hat (the sum of the scales so far, upsampled to the grid)
        area-downsampled to the next scale, raster tokens; None when only the first scale is trained."""
        flats = check_scale_codes(self._quantizer[0].layout, gt_ms_idx_Bl)
        inputs = self.scales_in_training() - 1
        if inputs == 0:
            return None
        if len(flats) < inputs:
            raise ValueError(f"teacher forcing at prog_si {self.prog_si} takes the codes of the first {inputs + 1} "
                             f"scales at least, got {len(flats)}")
        codes = torch.cat(flats[:inputs], dim=1)
        f_hats = self._quantizer[0].prefix_sums(codes)  # one map at a time: each is the grid's size
        sides = self.v_patch_nums[1 : inputs + 1]
        return torch.cat([to_tokens(area(f_hat, side)) for f_hat, side in zip(f_hats, sides, strict=True)], dim=1)

    @torch.no_grad()  # the tokenizer is frozen: no graph into phi
    def get_next_autoregressive_input(self, si: int, SN: int, f_hat: torch.Tensor, h_BChw: torch.Tensor):
        """Sampling: the codes' vectors of scale si (B, Cvae, s, s), upsampled (and refined by phi), added into f_hat
        (in place, as VAR), and the next scale's input, f_hat area-downsampled (f_hat itself after the last scale)."""
        f_hat.add_(self._quantizer[0].upsample(si, h_BChw.float()))
        if si == SN - 1:
            return f_hat, f_hat
        return f_hat, area(f_hat, self.v_patch_nums[si + 1])


class VARTokenizer(nn.Module):
    """A multi-scale VQRAE behind VAR's VQVAE methods (images in [-1, 1])."""

    def __init__(self, model: VQRAE):
        super().__init__()
        if not model.layout.scales:
            raise ValueError(f"VAR's tokenizer interface needs multi-scale codes (quantizer.kind multiscale); this "
                             f"model's quantizer is {model.quantizer.describe()}")
        self.model = model.eval()
        self.quantize = VARQuantizer(model.quantizer)
        self.Cvae, self.vocab_size = self.quantize.Cvae, self.quantize.vocab_size
        self.V = self.vocab_size

    # VQVAE's parts, which VAR's train.py counts the parameters of: views of the model's own, never registered here
    # (the adapter's state_dict stays the model's).
    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    @property
    def decoder(self) -> nn.Module:
        return self.model.decoder

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **options) -> "VARTokenizer":
        """A vqrae folder or Hub repo (VQRAE.from_pretrained's options), in eval mode."""
        return cls(VQRAE.from_pretrained(path, **options))

    def train(self, mode: bool = True):
        return super().train(False)  # a tokenizer here: its codebook never moves

    def check_scales(self, v_patch_nums) -> None:
        """VQVAE(v_patch_nums=...)'s scales must be this tokenizer's (a launcher building VAR's VQVAE checks them)."""
        if v_patch_nums is not None and tuple(v_patch_nums) != self.quantize.v_patch_nums:
            raise ValueError(f"this tokenizer's scales are {list(self.quantize.v_patch_nums)}, not "
                             f"{list(v_patch_nums)}")

    @torch.no_grad()
    def img_to_idxBl(self, inp_img_no_grad: torch.Tensor, v_patch_nums=None) -> list[torch.Tensor]:
        """Images in [-1, 1] -> each scale's codes (B, s * s), coarsest first (in VAR's progressive training, the first
        quantize.prog_si + 1 scales)."""
        self.check_scales(v_patch_nums)
        maps = self.model.encode_to_indices(from_signed(inp_img_no_grad))
        return [scale.flatten(1) for scale in maps[: self.quantize.scales_in_training()]]

    @torch.no_grad()
    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """f_hat (B, Cvae, S, S) -> images in [-1, 1]."""
        return self.model.decode(f_hat) * 2 - 1

    @torch.no_grad()
    def idxBl_to_img(self, ms_idx_Bl: list[torch.Tensor], same_shape: bool, last_one: bool = False):
        """The first scales' codes -> images in [-1, 1] after each of them (a coarse-to-fine list), or after all
        (last_one). same_shape=False (VAR's experimental decoding at each scale's own size) is not supported: the
        decoder paints from the whole grid."""
        if not same_shape:
            raise ValueError("same_shape=False decodes each scale at its own size, which this decoder cannot: its "
                             "input is the whole grid (VAR marks that path experimental)")
        flats = check_scale_codes(self.model.layout, ms_idx_Bl)
        prefixes = [flats] if last_one else [flats[: k + 1] for k in range(len(flats))]
        images = [self.model.decode_from_indices(torch.cat(prefix, dim=1)) * 2 - 1 for prefix in prefixes]
        return images[0] if last_one else images

    @torch.no_grad()
    def img_to_reconstructed_img(self, x: torch.Tensor, v_patch_nums=None, last_one: bool = False):
        """Images in [-1, 1] -> their reconstructions after each scale (or after all), in [-1, 1]."""
        return self.idxBl_to_img(self.img_to_idxBl(x, v_patch_nums), same_shape=True, last_one=last_one)
