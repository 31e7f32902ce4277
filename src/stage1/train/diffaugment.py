"""DiffAugment (Zhao et al. 2020), as RAE applies it to its discriminator's inputs (StyleGAN-T's policy): random
translation by up to 1/8 of the side (zeros slide in), colour (brightness, saturation, contrast) and optionally
cutout, each switched on with probability `prob` per batch and drawn per image. Differentiable, so the generator's
gradient passes through the same augmentation. Images in [0, 1]; the policy works in [-1, 1], as RAE applies it
(so pixels that slide or are cut in are mid-grey, and brightness moves by up to 1/4 of the [0, 1] range)."""

from __future__ import annotations

import torch


class DiffAugment:
    def __init__(self, prob: float = 1.0, cutout: float = 0.0):
        if not 0.0 <= prob <= 1.0 or not 0.0 <= cutout < 1.0:
            raise ValueError(f"DiffAugment needs prob in [0, 1] and cutout in [0, 1), got {prob}, {cutout}")
        self.prob, self.cutout = prob, cutout

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.prob == 0:
            return images
        return (self.augment_signed(images * 2 - 1, generator) + 1) / 2

    def augment_signed(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The policy on images in [-1, 1]."""
        translate, color, cut = (torch.rand(3, generator=generator) < self.prob).tolist()
        b, _, h, w = x.shape
        draws = torch.rand(7, b, 1, 1, generator=generator).to(x.device)
        rows = torch.arange(h, device=x.device).view(1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, w)
        if translate:
            dh, dw = round(h / 8), round(w / 8)
            shift_h = (draws[0] * (2 * dh + 1)).floor().long() - dh
            shift_w = (draws[1] * (2 * dw + 1)).floor().long() - dw
            padded = torch.nn.functional.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)  # a zero border to slide in
            images = torch.arange(b, device=x.device).view(b, 1, 1)
            x = padded[images, (rows + shift_h + 1).clamp(0, h + 1), (cols + shift_w + 1).clamp(0, w + 1)]
            x = x.permute(0, 3, 1, 2)
        if color:
            x = x + (draws[2].unsqueeze(1) - 0.5)  # brightness
            mean = x.mean(dim=1, keepdim=True)
            x = (x - mean) * (draws[3].unsqueeze(1) * 2) + mean  # saturation
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * (draws[4].unsqueeze(1) + 0.5) + mean  # contrast
        if cut and self.cutout > 0:  # a window of cutout x the side, centred at a random pixel, zeroed
            ch, cw = round(h * self.cutout), round(w * self.cutout)
            top = (draws[5] * (h + 1 - ch % 2)).floor().long() - ch // 2
            left = (draws[6] * (w + 1 - cw % 2)).floor().long() - cw // 2
            inside = (rows >= top) & (rows < top + ch) & (cols >= left) & (cols < left + cw)
            x = x * (~inside).unsqueeze(1).to(x.dtype)
        return x

    def __repr__(self) -> str:
        return f"DiffAugment(prob={self.prob}, cutout={self.cutout})"
