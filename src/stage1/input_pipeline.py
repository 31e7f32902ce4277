"""Image files -> batches of model-ready pixels, read, decoded and resized in worker processes while the model runs.

The commands that pass over a folder or tar shards (tokenize, evaluate, latent-stats, fit-codebook) read through
`image_batches`: a DataLoader over the file names (or a tar shard's samples) with `num_workers` processes, each
image decoded and resized to the model's square (`prepare_image`, the same function a single-image command calls),
batches kept in the order they were asked for, pinned for a non-blocking copy to the GPU. An unreadable file never
stops a pass: it comes back in the batch's `skipped` list with the reason, and the batch holds the readable rest.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from .images import UnreadableImageError, adm_center_crop, read_image, resize_center_crop, to_unit_float

# What an image goes through before the model: vqrae-tokenize records it, so that shards made by another version's
# preprocessing are never mixed with these on resume.
PREPROCESSING = "decode (EXIF upright, RGB), shorter side bicubic antialiased (8-bit images as uint8), center crop"
MAX_AUTO_WORKERS = 8  # decoding beyond this rarely keeps up with a GPU better; --num-workers says more
CROPS = ("center", "adm")  # resize_center_crop, or ADM's center_crop_arr (images.adm_center_crop)


def prepare_image(path: str, size: int, crop: str = "center", data: bytes | None = None) -> tuple[torch.Tensor, str]:
    """An image file (or its encoded bytes `data`, named `path`) as the model sees it, (3, size, size) in [0, 1], with
    a note of every conversion made. Raises UnreadableImageError naming the file."""
    try:
        pixels, note = read_image(path if data is None else io.BytesIO(data))
    except UnreadableImageError as err:
        raise UnreadableImageError(f"cannot read image '{path}': {err}") from err
    if crop == "adm":
        return adm_center_crop(pixels, size), note + f", ADM center_crop_arr to {size}x{size}"
    if tuple(pixels.shape[-2:]) == (size, size):
        return to_unit_float(pixels), note
    return resize_center_crop(pixels, size), note + f", resized (shorter side) and center-cropped to {size}x{size}"


def cores_per_process(local_processes: int = 1) -> int:
    """The cores this process may use, shared with the other `local_processes` - 1 on the machine (torchrun's)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_processes))


def default_workers(local_processes: int = 1) -> int:
    """Worker processes per command process: its cores less one for itself (it runs the model), at least one and at
    most MAX_AUTO_WORKERS."""
    return max(1, min(MAX_AUTO_WORKERS, cores_per_process(local_processes) - 1))


@dataclass
class ImageBatch:
    images: torch.Tensor | None  # (B, 3, size, size) of the readable files, None if none was
    names: list[str]  # the readable files, in the order asked for
    skipped: list[dict]  # {"path", "reason"} of each unreadable one

    def pin_memory(self) -> "ImageBatch":  # the DataLoader's pin_memory=True calls this in its pinning thread
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


class ImageFiles(Dataset):
    """root/names[i] prepared for the model; with `contents` (name -> encoded bytes, e.g. a tar shard's samples)
    the bytes instead of files."""

    def __init__(self, root: str, names: Sequence[str], size: int, crop: str = "center",
                 contents: Mapping[str, bytes | None] | None = None):
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        self.root, self.names, self.size, self.crop, self.contents = root, list(names), size, crop, contents

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, str, str | None]:
        name = self.names[i]
        try:
            if self.contents is None:
                image = prepare_image(os.path.join(self.root, name), self.size, self.crop)[0]
            elif (data := self.contents[name]) is None:
                raise UnreadableImageError(f"cannot read image '{name}': the sample has no image field")
            else:
                image = prepare_image(name, self.size, self.crop, data=data)[0]
            return image, name, None
        except UnreadableImageError as err:
            return None, self.names[i], str(err)


def collate(items: list[tuple[torch.Tensor | None, str, str | None]]) -> ImageBatch:
    readable = [(pixels, name) for pixels, name, reason in items if reason is None]
    images = None
    if readable:
        first = readable[0][0]
        images = torch.empty((len(readable), *first.shape), dtype=first.dtype)
        if torch.utils.data.get_worker_info() is not None:  # stacked straight into the memory it is sent in
            images = images.share_memory_()
        torch.stack([pixels for pixels, _ in readable], out=images)
    return ImageBatch(
        images=images,
        names=[name for _, name in readable],
        skipped=[{"path": name, "reason": reason} for _, name, reason in items if reason is not None],
    )


def image_batches(root: str, chunks: Sequence[Sequence[str]], size: int, num_workers: int = 0,
                  pin_memory: bool = False, crop: str = "center",
                  contents: Mapping[str, bytes | None] | None = None) -> Iterator[ImageBatch]:
    """One ImageBatch per chunk of file names under root (or of `contents`' names), in order. `num_workers` 0
    reads in this process."""
    if num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {num_workers}")
    starts = [0]
    for chunk in chunks:
        starts.append(starts[-1] + len(chunk))
    loader = DataLoader(
        ImageFiles(root, [name for chunk in chunks for name in chunk], size, crop, contents),
        batch_sampler=[range(a, b) for a, b in zip(starts, starts[1:], strict=False)],
        num_workers=num_workers, collate_fn=collate, pin_memory=pin_memory,
        prefetch_factor=4 if num_workers else None,  # batches ready ahead of the model, per worker
    )
    return iter(loader)
