"""How a codebook starts, and its defaults in one place: k-means of real latents before step 0, the EMA going on
from there. Training's `codebook_fit` section and vqrae-fit-codebook's flags both read these (this module imports
no torch, so the commands' --help stays instant)."""

from __future__ import annotations

from dataclasses import dataclass

from .config_section import ConfigSection

LLOYD_ITERS = 20  # Lloyd iterations of every codebook start (training's codebook_fit.iters, a first batch's)


@dataclass
class CodebookFitConfig(ConfigSection):
    """How the codebook starts, the one rule: before step 0, k-means of real latents (stage1/train/codebook_fit.py), the
    EMA going on from there. At least one sampled token per code is needed, or the run stops saying so."""

    section = "codebook_fit"
    images: int = 20000  # center-cropped images from data.path, split over ranks (all, if fewer); 0: the images
    # of the first step instead (augmented, as training sees them)
    tokens_per_image: int = 64  # random latent tokens kept per image
    iters: int = LLOYD_ITERS  # Lloyd iterations (exact search)

    def check(self):
        self.require(self.images >= 0, "images", ">= 0 (0: the first step's images)")
        self.require_positive("tokens_per_image")
        self.require(self.iters >= 0, "iters", ">= 0")


__all__ = ["LLOYD_ITERS", "CodebookFitConfig"]
