"""What a training run shows and leaves besides checkpoints: the sample grids, the final model, and the report of
its reconstructions. Each uses the decoder the run would export (the EMA copy when there is one).

    results_dir/samples/step-0002500.png   originals above reconstructions, the same images every time
    results_dir/final/                     config.json + model.safetensors: VQRAE.from_pretrained(...)
    results_dir/reconstructions.png        the final model's codes -> pixels, with a PSNR per image printed
"""

from __future__ import annotations

import os

import torch
from torchvision.utils import make_grid

from ..base.precision import autocast
from ..data.datasets import center_square
from ..data.images import psnr, save_png
from ..model.vqrae import VQRAE


def sample_images(dataset, count: int, image_size: int, device: torch.device) -> tuple[list[str], torch.Tensor]:
    """The first `count` readable images of the dataset, center-cropped as every command crops them."""
    names, images = dataset.first_images(count, lambda pixels: center_square(pixels, image_size))
    if not images:
        raise ValueError("none of data.path's images could be read (each was skipped above, with its reason)")
    return names, torch.stack(images).to(device)


@torch.no_grad()
def reconstruct(model: VQRAE, decoder: torch.nn.Module, images: torch.Tensor, precision: str) -> torch.Tensor:
    """The model's reconstructions in eval mode with `decoder`, the model left in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        with model.decoder_swapped(decoder), autocast(images.device, precision):
            return model(images).float()
    finally:
        model.train(was_training)


def save_samples(model: VQRAE, decoder: torch.nn.Module, images: torch.Tensor, precision: str, results_dir: str,
                 step: int) -> torch.Tensor:
    """samples/step-N.png: the images above their reconstructions; returns the grid (for the logger)."""
    grid = make_grid(torch.cat([images, reconstruct(model, decoder, images, precision)]).cpu(), nrow=len(images),
                     padding=2)
    save_png(grid, os.path.join(results_dir, "samples", f"step-{step:07d}.png"))
    return grid


def export_final(model: VQRAE, decoder: torch.nn.Module, final: str) -> None:
    """results_dir/final: the model to use (the given decoder's weights), loadable with VQRAE.from_pretrained."""
    with model.decoder_swapped(decoder):
        model.save_pretrained(final)


def report_reconstructions(final: str, names: list[str], images: torch.Tensor, results_dir: str) -> None:
    """Reload the exported model and put the images through codes -> pixels (the latent, if continuous): PSNR per
    image printed, and reconstructions.png."""
    model = VQRAE.from_pretrained(final).to(images.device)
    rec = model.reconstruct(images, output_size=images.shape[-2:])[0].float()
    scores = psnr(rec, images)
    path_name = "codes" if model.layout.has_codes else "latent"
    print(f"reconstructions of {len(images)} images by {final} ({path_name} -> pixels):")
    for name, score in zip(names, scores.tolist(), strict=True):
        print(f"  {name:32s} PSNR {score:6.2f} dB")
    print(f"  mean PSNR {scores.mean():.2f} dB")
    path = os.path.join(results_dir, "reconstructions.png")
    save_png(torch.cat([images, rec]), path, nrow=len(images), padding=2)
    print(f"wrote {path} (originals above reconstructions)")
