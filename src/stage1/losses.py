"""Training losses for the decoder: reconstruction + LPIPS + adversarial (PatchGAN, hinge), with the VQGAN
adaptive weight that balances the adversarial gradient against the reconstruction gradient at the
decoder's last layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def build_lpips(net: str = "vgg", random_backbone: bool = False) -> nn.Module:
    """LPIPS from the `lpips` package, frozen. Its linear heads ship with the package; the VGG/AlexNet
    backbone comes from torchvision's weight cache (downloaded on first use). `random_backbone=True` builds
    it untrained instead, for offline tests and the quickstart only: such a distance is not perceptual."""
    import warnings

    import lpips

    try:
        with warnings.catch_warnings():  # lpips still uses torchvision's deprecated `pretrained=` argument
            warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
            model = lpips.LPIPS(net=net, pnet_rand=random_backbone, verbose=False)
    except Exception as err:  # the torchvision download fails in many ways offline (URLError, OSError, ...)
        import torch.hub

        raise RuntimeError(
            f"LPIPS needs torchvision's pretrained {net} backbone, which could not be loaded "
            f"({type(err).__name__}: {err}). Either give this machine network access once, or place the "
            f"weights file in {torch.hub.get_dir()}/checkpoints/. For tests and offline smoke runs only, an "
            f"untrained backbone can stand in (training: loss.lpips_random_backbone=true); it is not perceptual."
        ) from err
    return model.eval().requires_grad_(False)


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / VQGAN): strided 4x4 convolutions -> a map of real/fake logits.
    GroupNorm instead of BatchNorm, so its statistics need no syncing across ranks."""

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        width = channels
        for i in range(1, num_layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < num_layers else 1
            layers += [
                nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False),
                nn.GroupNorm(min(32, out // 4), out),
                nn.LeakyReLU(0.2, True),
            ]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images * 2 - 1)  # images in [0, 1] -> [-1, 1]


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4):
    """VQGAN: ||grad_L nll|| / (||grad_L g|| + 1e-4) at the decoder's last layer L, clamped, no gradient."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
