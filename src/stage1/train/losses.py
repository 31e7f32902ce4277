"""Every training loss term, configured by the `loss` group (configs/loss/*.yaml) alone:

    generator      recon_weight * L1|L2(x_rec, x)                          from step 0
                 + lpips_weight * LPIPS(x_rec, x)                          from loss.lpips_start
                 + vq_loss (the quantizer's commitment term; with phi, VAR's phi_loss)
                 + disc_weight * adaptive_weight * -D(x_rec)               from loss.disc_start
    discriminator  hinge(D(x), D(x_rec.detach()))                          from loss.disc_update_start (or
                                                                           disc_start)

D is a PatchGAN (`disc: patchgan`) or RAE's frozen-DINO discriminator with trainable heads (`disc: dino`,
stage1.train.dino_discriminator), optionally seeing DiffAugment'ed images (`diffaug_prob`) and, for its own update,
fakes rounded to 8-bit values (`disc_round_fakes`), as RAE trains it. The adaptive weight is VQGAN's ratio of gradient
norms at the decoder's last layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..base.config_section import ConfigSection, choice
from .diffaugment import DiffAugment
from .dino_discriminator import DinoDiscriminator


def reconstruction_loss(x_rec: torch.Tensor, x: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Mean absolute (l1) or squared (l2) pixel error, in fp32."""
    error = x_rec.float() - x.float()
    return error.abs().mean() if kind == "l1" else error.pow(2).mean()


@dataclass
class LossConfig(ConfigSection):
    section = "loss"
    recon_loss: str = choice("l1", "l2")
    recon_weight: float = 1.0
    lpips_weight: float = 1.0
    lpips_start: int = 0
    lpips_net: str = choice("vgg", "alex")
    lpips_random_backbone: bool = False  # true only offline (tests, quickstart): the distance is then not perceptual
    disc_weight: float = 0.75
    disc_start: int = 20000  # no adversarial term in the decoder's loss before this step
    disc_update_start: int | None = None  # the discriminator trains from this step (RAE: earlier, a warm-up); null:
    # disc_start
    disc: str = choice("patchgan", "dino")  # dino: RAE's, a frozen DINO ViT with trainable heads
    disc_lr: float = 2e-4
    disc_betas: tuple[float, float] = (0.5, 0.9)  # the discriminator's AdamW; RAE's: (0.9, 0.95)
    disc_weight_decay: float = 0.01  # RAE's: 0
    disc_schedule: str = choice("constant", "cosine")  # cosine: the decoder's warm-up + cosine (train.*), scaled
    # to disc_lr
    disc_channels: int = 64  # patchgan
    disc_layers: int = 3  # patchgan
    dino_path: str | None = None  # dino: the DINO ViT checkpoint (RAE: dino_vit_small_patch8_224.pth)
    disc_kernel: int = 9  # dino: the heads' convolution width over tokens
    diffaug_prob: float = 0.0  # DiffAugment of the discriminator's inputs, per batch (RAE's: 1.0)
    diffaug_cutout: float = 0.0  # DiffAugment's cutout side, as a fraction of the image's (RAE's: 0)
    disc_round_fakes: bool = False  # the discriminator's update sees fakes clamped and rounded to 8 bits (RAE)
    adaptive_weight_max: float = 1e4

    def check(self):
        for name in ("recon_weight", "lpips_weight", "disc_weight", "lpips_start", "disc_start", "disc_weight_decay"):
            self.require(getattr(self, name) >= 0, name, ">= 0")
        self.require(self.disc_update_start is None or self.disc_update_start >= 0, "disc_update_start",
                     ">= 0 or null")
        self.require_positive("disc_lr", "disc_channels", "disc_layers", "adaptive_weight_max", "disc_kernel")
        self.require(not (self.disc == "dino" and self.disc_weight > 0 and not self.dino_path), "dino_path",
                     "the DINO ViT checkpoint with loss.disc=dino (RAE: dino_vit_small_patch8_224.pth)")
        self.require(all(0 <= b < 1 for b in self.disc_betas), "disc_betas", "two numbers in [0, 1)")
        DiffAugment(self.diffaug_prob, self.diffaug_cutout)  # checks its own values


def build_lpips(net: str = "vgg", random_backbone: bool = False) -> nn.Module:
    """LPIPS from the `lpips` package, frozen. Its linear heads ship with the package; the VGG/AlexNet
    backbone comes from torchvision's weight cache (downloaded on first use). `random_backbone=True` builds
    it untrained instead, for offline tests and the quickstart only: such a distance is not perceptual."""
    import warnings

    import lpips
    import torch.hub
    from huggingface_hub.constants import HF_HUB_OFFLINE
    from torchvision import models

    try:
        backbone = {"vgg": models.VGG16_Weights, "alex": models.AlexNet_Weights}[net].IMAGENET1K_V1.url
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(backbone))
        if not random_backbone and not os.path.isfile(cached):  # looked for first: no "Downloading" line to fail
            if HF_HUB_OFFLINE:
                raise FileNotFoundError(f"{os.path.basename(backbone)} is not in torchvision's cache, and "
                                        f"HF_HUB_OFFLINE=1 says not to download it")
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            torch.hub.download_url_to_file(backbone, cached, progress=False)
        with warnings.catch_warnings():  # lpips still uses torchvision's deprecated `pretrained=` argument
            warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
            model = lpips.LPIPS(net=net, pnet_rand=random_backbone, verbose=False)
    except Exception as err:  # the torchvision download fails in many ways offline (URLError, OSError, ...)
        raise RuntimeError(
            f"LPIPS needs torchvision's pretrained {net} backbone, which could not be loaded "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}). Where there is network, "
            f"run `python -c \"import torchvision; torchvision.models.{'vgg16' if net == 'vgg' else 'alexnet'}"
            f"(weights='IMAGENET1K_V1')\"` once, or copy {os.path.basename(backbone)} into "
            f"{os.path.join(torch.hub.get_dir(), 'checkpoints')}/. For tests and offline smoke runs only, an "
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


class VQRAELoss(nn.Module):
    """All training loss terms. Holds the frozen LPIPS network and the discriminator (the only trainable part)."""

    def __init__(self, config: LossConfig):
        super().__init__()
        self.config = config
        self.lpips = build_lpips(config.lpips_net, config.lpips_random_backbone) if config.lpips_weight > 0 else None
        self.discriminator = None
        if config.disc_weight > 0 and config.disc == "dino":
            self.discriminator = DinoDiscriminator(config.dino_path, config.disc_kernel)
        elif config.disc_weight > 0:
            self.discriminator = PatchDiscriminator(channels=config.disc_channels, num_layers=config.disc_layers)
        self.augment = DiffAugment(config.diffaug_prob, config.diffaug_cutout)

    def adversarial(self, step: int) -> bool:
        """Whether the decoder's loss has the adversarial term at `step` (steps done so far)."""
        return self.discriminator is not None and step >= self.config.disc_start

    def discriminator_trains(self, step: int) -> bool:
        """Whether the discriminator takes its own step at `step` (from disc_update_start, else disc_start)."""
        start = self.config.disc_update_start
        return self.discriminator is not None and step >= (self.config.disc_start if start is None else start)

    def generator_loss(self, x, x_rec, quantizer_losses: dict, step: int, last_layer: torch.Tensor):
        """The decoder's total loss and its logged terms (the quantizer's among them), from the model's outputs
        (VQRAE(x, return_quantizer_losses=True)). `last_layer` is the decoder's output weight."""
        c = self.config
        recon = reconstruction_loss(x_rec, x, c.recon_loss)
        nll = c.recon_weight * recon
        terms = {**quantizer_losses, "recon_loss": recon}
        if self.lpips is not None and step >= c.lpips_start:
            terms["lpips"] = self.lpips(x_rec.float() * 2 - 1, x * 2 - 1).mean()
            nll = nll + c.lpips_weight * terms["lpips"]
        total = nll + quantizer_losses["vq_loss"]
        if self.adversarial(step):
            # The bare discriminator: its gradients from this pass are discarded before its own step.
            terms["g_loss"] = generator_loss(self.discriminator(self.augment(x_rec)))
            terms["adaptive_weight"] = c.disc_weight * adaptive_weight(
                nll, terms["g_loss"], last_layer, c.adaptive_weight_max
            )
            total = total + terms["adaptive_weight"] * terms["g_loss"]
        return total, terms

    def discriminator_loss(self, x, x_rec, discriminator: nn.Module | None = None) -> torch.Tensor:
        """Hinge loss on real x and detached fakes. `discriminator`: its DDP wrapper under torchrun."""
        fakes = x_rec.detach()
        if self.config.disc_round_fakes:  # what an image file would hold: no sub-8-bit tell for D to learn
            fakes = (fakes.float().clamp(0, 1) * 255).round() / 255
        # One forward over real and fake together: DDP wants each module once per backward.
        logits = (discriminator or self.discriminator)(self.augment(torch.cat([x, fakes.to(x.dtype)])))
        return hinge_d_loss(*logits.chunk(2))
