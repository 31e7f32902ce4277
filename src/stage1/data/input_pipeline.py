"""Image files -> batches of model-ready pixels (and the model's work on them), read, decoded and resized while
the model runs.

The commands that pass over a folder or tar shards (tokenize, evaluate, latent-stats, fit-codebook) read through
`image_batches`: each image decoded and resized to the model's square (`prepare_image`, the same function a
single-image command calls), batches kept in the order they were asked for. Beside a GPU, DataLoader worker
processes read into pinned memory for a non-blocking copy; on the CPU, threads read and run the model on one core
each. An unreadable file never stops a pass: it comes back in the batch's `skipped` list with the reason, and the
batch holds the readable rest.
"""

from __future__ import annotations

import io
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from .images import UnreadableImageError, adm_center_crop, read_image, resize_center_crop, to_unit_float

# What an image goes through before the model: vqrae-tokenize records it, so that shards made by another version's
# preprocessing are never mixed with these on resume.
PREPROCESSING = "decode (EXIF upright, RGB), shorter side bicubic antialiased (8-bit images as uint8), center crop"
MAX_AUTO_WORKERS = 8  # decoding beyond this rarely keeps up with a GPU better; --num-workers says more
READERS = ("auto", "processes", "threads")  # image_batches' readers
CROPS = ("center", "adm")  # resize_center_crop, or ADM's center_crop_arr (images.adm_center_crop)
# The commands' --protocol: its crop, and what a results file says of it.
PROTOCOL_CROPS = {"vqrae": "center", "adm": "adm"}
PROTOCOLS = {
    "vqrae": "shorter side resized (antialiased bicubic) to image_size, central square "
             "(stage1.data.images.resize_center_crop)",
    "adm": "ADM's center_crop_arr: box-filter halvings while the shorter side is >= 2x image_size, PIL bicubic to "
           "image_size, central square (stage1.data.images.adm_center_crop)",
}


def prepare_image(path: str, size: int, crop: str = "center", data: bytes | None = None) -> tuple[torch.Tensor, str]:
    """An image file (or its encoded bytes `data`, named `path`) as the model sees it, (3, size, size) in [0, 1], with
    a note of every conversion made. Raises UnreadableImageError naming the file."""
    pixels, note = prepare_pixels(path, size, crop, data)
    return to_unit_float(pixels), note


def prepare_pixels(path: str, size: int, crop: str = "center", data: bytes | None = None) -> tuple[torch.Tensor, str]:
    """prepare_image's pixels before the float conversion: uint8 for an 8-bit image, so readers send a quarter of
    the bytes (to_unit_float on the device gives the same floats)."""
    try:
        pixels, note = read_image(path if data is None else io.BytesIO(data))
        if crop == "adm":
            return adm_center_crop(pixels, size), note + f", ADM center_crop_arr to {size}x{size}"
        if tuple(pixels.shape[-2:]) == (size, size):
            return pixels, note
        return resize_center_crop(pixels, size), note + f", resized (shorter side) and center-cropped to {size}x{size}"
    except UnreadableImageError as err:  # undecodable, or too elongated to resize
        raise UnreadableImageError(f"cannot read image '{path}': {err}") from err


def cores_per_process(local_processes: int = 1) -> int:
    """The cores this process may use, shared with the other `local_processes` - 1 on the machine (torchrun's)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_processes))


def default_workers(device: torch.device, local_processes: int = 1) -> int:
    """--num-workers auto. Beside a GPU: reader processes, the cores per process less one for this one (it drives
    the GPU), at least one and at most MAX_AUTO_WORKERS. On the CPU: a thread per core, each reading and running
    the model (image_batches)."""
    cores = cores_per_process(local_processes)
    return cores if device.type == "cpu" else max(1, min(MAX_AUTO_WORKERS, cores - 1))


@dataclass
class ImageBatch:
    images: torch.Tensor | None  # (B, 3, size, size) of the readable files, None if none was; handed out as floats
    names: list[str]  # the readable files, in the order asked for
    skipped: list[dict]  # {"path", "reason"} of each unreadable one
    output: Any = None  # what image_batches' `step` made of the images

    def pin_memory(self) -> "ImageBatch":  # the DataLoader's pin_memory=True calls this in its pinning thread
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


class ImageFiles(Dataset):
    """root/names[i] prepared for the model; with `contents` (name -> encoded bytes, e.g. a tar shard's samples)
    the bytes instead of files."""

    def __init__(self, root: str, names: Sequence[str], size: int, crop: str = "center",
                 contents: Mapping[str, bytes] | None = None):
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        self.root, self.names, self.size, self.crop, self.contents = root, list(names), size, crop, contents

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, str, str | None]:
        name = self.names[i]
        try:
            if self.contents is None:
                image = prepare_pixels(os.path.join(self.root, name), self.size, self.crop)[0]
            else:  # the bytes, or UnreadableImageError saying why the sample has none
                image = prepare_pixels(name, self.size, self.crop, data=self.contents[name])[0]
            return image, name, None
        except UnreadableImageError as err:
            return None, self.names[i], str(err)


def collate(items: list[tuple[torch.Tensor | None, str, str | None]]) -> ImageBatch:
    readable = [(pixels, name) for pixels, name, reason in items if reason is None]
    if len({pixels.dtype for pixels, _ in readable}) > 1:  # 8-bit beside deeper images: all as floats
        readable = [(to_unit_float(pixels), name) for pixels, name in readable]
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
                  device: torch.device | str = "cpu", step: Callable[[torch.Tensor], Any] | None = None,
                  crop: str = "center", contents: Mapping[str, bytes] | None = None,
                  readers: str = "auto") -> Iterator[ImageBatch]:
    """One ImageBatch per chunk of file names under root (or of `contents`' names), in order, its images on `device`
    and, with `step`, `batch.output = step(batch.images)` (a pure function of the batch: the model's work on it).
    `readers` "processes" (auto beside a GPU): `num_workers` processes read while this one runs the steps.
    "threads" (auto on the CPU, where reading and the model share the cores): `num_workers` threads each read a
    batch and run its step, every one on a single core. 0 workers do everything here, one batch after the other."""
    if num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {num_workers}")
    if readers not in READERS:
        raise ValueError(f"readers must be one of {READERS}, got {readers!r}")
    device = torch.device(device)
    files = ImageFiles(root, [name for chunk in chunks for name in chunk], size, crop, contents)
    spans, start = [], 0
    for chunk in chunks:
        spans.append(range(start, start + len(chunk)))
        start += len(chunk)
    if num_workers and (readers == "threads" or (readers == "auto" and device.type == "cpu")):
        return _in_threads(files, spans, num_workers, device, step)
    return _in_processes(files, spans, num_workers, device, step)


def _in_processes(files: ImageFiles, spans: list[range], num_workers: int, device: torch.device,
                  step) -> Iterator[ImageBatch]:
    loader = DataLoader(files, batch_sampler=spans, num_workers=num_workers, collate_fn=collate,
                        pin_memory=device.type == "cuda",  # for the non-blocking copy below
                        prefetch_factor=4 if num_workers else None)  # batches ready ahead of the model, per worker
    for batch in loader:
        if batch.images is not None:
            batch.images = to_unit_float(batch.images.to(device, non_blocking=True))
            batch.output = None if step is None else step(batch.images)
        yield batch


def _in_threads(files: ImageFiles, spans: list[range], threads: int, device: torch.device,
                step) -> Iterator[ImageBatch]:
    """Each batch read and stepped by one of `threads` threads, every op on one core (torch's intra-op threads at 1
    until the batches end), so each core does a whole batch's work. Reader processes beside a multi-threaded model
    stall its OpenMP team whenever one takes a core (0.67 of the pipeline's limit on 2 cores, against 0.9 and more
    this way: benchmarks/README.md). Decoding (libjpeg-turbo, PIL) and torch ops release the GIL."""

    def job(span: range) -> ImageBatch:
        batch = collate([files[i] for i in span])
        if batch.images is not None:
            batch.images = to_unit_float(batch.images.to(device))
            batch.output = None if step is None else step(batch.images)
        return batch

    intra_op = torch.get_num_threads()
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(threads, thread_name_prefix="vqrae-batch")
    try:
        ahead = deque()  # batches submitted, in order; two per thread keep every thread fed
        for span in spans:
            ahead.append(pool.submit(job, span))
            if len(ahead) > 2 * threads:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(intra_op)
