"""LlamaGen's tokenizer interface on a VQRAE, so that LlamaGen's code extraction and samplers
(autoregressive/train/extract_codes_c2i.py, autoregressive/sample/sample_c2i.py, sample_c2i_ddp.py and the FID
evaluation of its samples) run on a vqrae tokenizer with one change: the VQModel they build and load becomes

    vq_model = LlamaGenTokenizer.from_pretrained(args.vq_ckpt, image_size=args.image_size).to(device)

LlamaGen's VQModel (tokenizer/tokenizer_image/vq_model.py) takes and paints images in [-1, 1], and its
`decode_code(indices, qzshape)` gets the GPT's codes (B, h * w) with qzshape = [B, codebook_embed_dim, h, w].
Only a quantizer with one code per grid position fits its GPT (single, fsq, simvq, gumbel; not residual, grouped or
multi-scale).

Halton-MaskGIT (valeoai/Halton-MaskGIT) builds LlamaGen's VQModel as its `ae` too, and takes this adapter in its place
(scripts/halton_maskgit.py puts it there): its samplers call `decode_code(code)` on (B, h, w) codes, its extractor
unpacks `encode` as `_, _, [_, _, code]`, and its --codebook-size is `codebook_size`.
"""

from __future__ import annotations

import numbers
import os

import torch
from torch import nn

from ..base.limits import MAX_IMAGE_SIDE
from .vqrae import VQRAE, from_signed, tokens_to_grid

NO_LOSSES = (None, None, None, 0)  # VQModel's (vq_loss, commit_loss, entropy_loss, codebook_usage) in eval mode


class LlamaGenTokenizer(nn.Module):
    """A VQRAE behind LlamaGen's VQModel methods: encode, decode, decode_code, forward (images in [-1, 1])."""

    def __init__(self, model: VQRAE, image_size: int | None = None):
        """image_size: the side of the images it paints (LlamaGen's --image-size, which its FID evaluation and
        sample grids assume); None: the model's own (grid x decoder patch)."""
        super().__init__()
        layout = model.layout
        if not layout.has_codes or layout.scales or layout.position_shape:
            raise ValueError(f"LlamaGen's GPT predicts one code per position on a grid; this model's quantizer is "
                             f"{model.quantizer.describe()}")
        if image_size is not None and not (isinstance(image_size, int) and not isinstance(image_size, bool)
                                           and 0 < image_size <= MAX_IMAGE_SIDE):
            raise ValueError(f"image_size (the side of the images it paints) must be an integer in [1, "
                             f"{MAX_IMAGE_SIDE}] or None (the model's own), got {image_size!r}")
        self.model = model.eval()
        self.output_size = None if image_size is None else (image_size, image_size)
        self.codebook_size = layout.vocab_size  # LlamaGen's --codebook-size / --vocab-size
        self.codebook_embed_dim = model.encoder.hidden_size  # its --codebook-embed-dim (qzshape[1])

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, image_size: int | None = None,
                        **options) -> "LlamaGenTokenizer":
        """A vqrae folder or Hub repo (VQRAE.from_pretrained's options), in eval mode."""
        return cls(VQRAE.from_pretrained(path, **options), image_size)

    def train(self, mode: bool = True):
        return super().train(False)  # a tokenizer here only encodes and decodes: the codebook never moves

    @torch.no_grad()
    def encode(self, x: torch.Tensor):
        """Images in [-1, 1] (B, 3, H, W) -> (quant (B, C, h, w): the codes' vectors, losses (none in eval mode),
        (None, None, indices (B * h * w,))), as VQModel.encode; extract_codes_c2i.py reshapes the indices per image."""
        indices = self.model.encode_to_indices(from_signed(x))
        quant = tokens_to_grid(self.model.quantizer.lookup(indices.flatten(1)), tuple(indices.shape[1:]))
        return quant, NO_LOSSES, (None, None, indices.flatten())

    @torch.no_grad()
    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> images in [-1, 1]."""
        return self.model.decode(quant, output_size=self.output_size) * 2 - 1

    @torch.no_grad()
    def decode_code(self, code_b: torch.Tensor, shape=None, channel_first: bool = True) -> torch.Tensor:
        """Codes (B, h, w) (Halton-MaskGIT's), or (B, h * w) or any layout with `shape` = [B, C, h, w] ([B, h, w, C]
        when not channel_first; LlamaGen's) -> images in [-1, 1]; C is not used (LlamaGen passes its
        --codebook-embed-dim there)."""
        if not isinstance(code_b, torch.Tensor):
            raise ValueError(f"codes must be a tensor of integers, got {type(code_b).__name__}")
        if shape is not None:
            if not (isinstance(shape, (list, tuple)) and len(shape) == 4
                    and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in shape)):
                raise ValueError(f"shape must be 4 positive integers, [B, C, h, w] ([B, h, w, C] when not "
                                 f"channel_first), got {shape!r}")
            b, h, w = (shape[0], shape[2], shape[3]) if channel_first else tuple(shape[:3])
            if code_b.numel() != b * h * w:
                raise ValueError(f"{code_b.numel()} codes do not fill the shape {list(shape)} ({b} x {h} x {w})")
            code_b = code_b.reshape(b, h, w)
        return self.model.decode_from_indices(code_b, output_size=self.output_size) * 2 - 1

    def forward(self, x: torch.Tensor):
        """Images in [-1, 1] -> (reconstructions in [-1, 1], losses), as VQModel.forward."""
        quant, losses, _ = self.encode(x)
        return self.decode(quant), losses
