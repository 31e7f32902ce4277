"""Training data: every image under a folder (an ImageFolder tree or a flat folder), in [0, 1].

Determinism: the sampler yields (index, epoch) pairs and the dataset seeds each sample's augmentation from
(seed, epoch, index), so the images a step sees do not depend on worker count, timing or resumption.
"""

from __future__ import annotations

import copy
import os
import warnings
from functools import partial
from typing import Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from .images import UnreadableImageError, read_image, resize_center_crop, resize_shorter_side, to_unit_float

IMAGE_EXTENSIONS = (*IMG_EXTENSIONS, ".gif")  # what read_image reads (a GIF: its first frame)


def find_images(root: str) -> list[str]:
    """Sorted relative paths of all image files under root (recursively); clear errors if there are none. Only
    regular files count: a FIFO or device named like an image would block its reader forever."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data folder '{root}' does not exist or is not a directory")
    by_file, seen_folders = {}, {os.path.realpath(root)}
    for folder, dirs, files in os.walk(root, followlinks=True):
        # Links are followed, but each real folder and file once (under its first name in sorted order): a link back
        # up the tree would loop (a photo found again under again/again/...), two names of one file count it twice.
        dirs.sort()
        dirs[:] = [d for d in dirs if (real := os.path.realpath(os.path.join(folder, d))) not in seen_folders
                   and not seen_folders.add(real)]
        for f in files:
            path = os.path.join(folder, f)
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".") and os.path.isfile(path):  # regular
                relative, real = os.path.relpath(path, root), os.path.realpath(path)  # files (or links to them) only
                by_file[real] = min(relative, by_file.get(real, relative))
    found = sorted(by_file.values())
    if not found:
        raise ValueError(
            f"no images found under '{root}' (looked recursively for files ending in {', '.join(IMG_EXTENSIONS)})"
        )
    return found


def class_labels(paths: list[str]) -> tuple[list[str], list[int]]:
    """ImageFolder's classes: the sorted top-level folders of the relative `paths`, and each path's class index
    (-1 for an image directly in the root, which has no class)."""
    folders = [p.replace(os.sep, "/").split("/", 1)[0] if "/" in p.replace(os.sep, "/") else None for p in paths]
    classes = sorted({f for f in folders if f is not None})
    index = {name: i for i, name in enumerate(classes)}
    return classes, [index[f] if f is not None else -1 for f in folders]


def first_readable(candidates, count: int, transform) -> tuple[list[str], list[torch.Tensor]]:
    """The names and transformed images of the first `count` of (name, load) candidates whose load() succeeds; an
    unreadable image is skipped and said so, as everywhere."""
    names, images = [], []
    for name, load in candidates:
        if len(images) == count:
            break
        try:
            images.append(transform(load()))
            names.append(name)
        except UnreadableImageError as err:
            print(f"samples: skipping unreadable image {name}: {err}")
    return names, images


def unit_range(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0.0, 1.0)


def center_square(pixels: torch.Tensor, image_size: int) -> torch.Tensor:
    """The one center crop of the package, on decoded pixels (images.read_image): the commands' (prepare_image,
    images.resize_center_crop: shorter side bicubic antialiased, as RAE's PIL resize), then floats in [0, 1]. The
    codebook fit, the sample grid and augment=center_crop see the pixels vqrae-tokenize sees, bit for bit."""
    return to_unit_float(resize_center_crop(pixels, image_size))


def build_transform(image_size: int, augment: str, min_scale: float = 0.8, hflip: bool = True,
                    resize: int | None = None):
    """Decoded pixels (uint8, or floats for deeper images) -> a training crop in [0, 1]. random_resized_crop: a
    random min_scale..1 area, resized; resize_random_crop (RAE's): the shorter side resized to `resize`, then a
    random image_size crop; center_crop: center_square."""
    if augment == "random_resized_crop":  # bilinear on floats: no overshoot
        crop = [to_unit_float, v2.RandomResizedCrop(image_size, scale=(min_scale, 1.0), antialias=True)]
    elif augment == "resize_random_crop":  # resize >= image_size: checked by RunConfig
        # Bicubic as RAE resizes; it can overshoot [0, 1], so the result is clamped back.
        crop = [to_unit_float, partial(resize_shorter_side, size=resize), unit_range, v2.RandomCrop(image_size)]
    else:  # center_crop
        crop = [partial(center_square, image_size=image_size)]
    flip = [v2.RandomHorizontalFlip()] if hflip else []
    return v2.Compose([*crop, *flip])


class ImageDataset(Dataset):
    """Images under `root`. An unreadable file is skipped (the next readable one stands in), warned about once,
    and counted in the sample's `skipped` field so the trainer can report the total."""

    def __init__(self, root: str, transform, seed: int = 0):
        self.root = root
        self.paths = find_images(root)
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def with_transform(self, transform) -> "ImageDataset":
        """The same files (no second scan of the folder) under another transform."""
        other = copy.copy(self)
        other.transform = transform
        return other

    def load(self, index: int) -> torch.Tensor:
        """The decoded pixels (images.read_image); the transform makes them floats."""
        return read_image(os.path.join(self.root, self.paths[index]))[0]

    def first_images(self, count: int, transform) -> tuple[list[str], list[torch.Tensor]]:
        """The first `count` readable images in listing order, under `transform`, and their names (the sample
        grid's images)."""
        return first_readable(((name, partial(self.load, i)) for i, name in enumerate(self.paths)), count, transform)

    def __getitem__(self, item):
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        for skipped in range(min(len(self), 100)):
            candidate = (index + skipped) % len(self)
            try:  # the transform too: an image may be decodable, yet too elongated to resize
                image = self.load(candidate)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(hash((self.seed, epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF)
                    pixels = self.transform(image)
                return {"image": pixels, "skipped": skipped}
            except UnreadableImageError as err:
                warnings.warn(f"skipping unreadable image {self.paths[candidate]}: {err}", stacklevel=2)
        raise RuntimeError(f"100 consecutive unreadable images under {self.root}, starting at {self.paths[index]}")


class ResumableDistributedSampler(Sampler):
    """Endless stream of (index, epoch) for this rank, shuffled per epoch exactly as DistributedSampler does,
    starting `start` samples in: resuming at step s with per-rank batch b starts at s * b."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int = 0, start: int = 0):
        self.sampler = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        per_epoch = len(self.sampler)
        epoch, offset = divmod(self.start, per_epoch)
        while True:
            self.sampler.set_epoch(epoch)
            for index in list(self.sampler)[offset:]:
                yield index, epoch
            epoch, offset = epoch + 1, 0
