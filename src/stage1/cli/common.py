"""What the commands' work shares: the device, model loading, image preprocessing, batches and output checks."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from ..base.atomic import read_json
from ..data.datasets import find_images
from ..data.images import UnreadableImageError
from ..data.input_pipeline import ImageBatch, default_workers, image_batches, prepare_image
from ..data.shard_specs import is_tar_source, shard_urls
from ..data.tar_shards import FolderClasses, SampleImages, TarSample, read_shard
from ..model.config import MAX_CONFIG_BYTES
from ..model.pretrained import ENCODER_SUBDIR
from ..model.vqrae import VQRAE
from .arguments import CLIError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


def load_model(args, device: torch.device | None = None, needs_codes: bool = False) -> VQRAE:
    """The model of --model (and --encoder-path); `needs_codes`: a command that has nothing to do without a codebook
    refuses a continuous model (quantizer.kind=none) here, before it writes anything."""
    overrides = {"encoder_config_path": args.encoder_path} if args.encoder_path else {}
    model = VQRAE.from_pretrained(args.model, **overrides)
    if needs_codes and not model.layout.has_codes:
        raise CLIError(f"{args.model} is a continuous model (quantizer.kind=none): it has no codes; vqrae-evaluate "
                       f"and vqrae-reconstruct work with it")
    model = model.to(device or resolve_device(args.device)).eval()
    return model.compile_parts() if args.compile else model


def model_image_size(model: VQRAE, requested: int | None) -> int:
    """The side images get: as asked, else what the model paints natively, else 256 (fitted to the patch)."""
    patch = model.encoder.patch_size
    size = requested or model.image_size or 256 // patch * patch
    if model.config.encoder.input_size is None:
        model.encoder.check_fits("--image-size", size)
    return size


def prepare(path: str, size: int) -> tuple[torch.Tensor, str]:
    """An image file as the model needs it, with a note of every conversion made; an unreadable one is an error."""
    try:
        return prepare_image(path, size)
    except UnreadableImageError as err:
        raise CLIError(str(err)) from err


def read_batches(args, chunks: Sequence[Sequence[str]], size: int, device: torch.device,
                 local_processes: int = 1, crop: str = "center", contents: Mapping[str, bytes] | None = None,
                 step: Callable[[torch.Tensor], Any] | None = None) -> Iterator[ImageBatch]:
    """The images of --data in these chunks of names on `device`, read by --num-workers (auto: default_workers), each
    batch with `step`'s output (input_pipeline.image_batches)."""
    workers = default_workers(device, local_processes) if args.num_workers == "auto" else args.num_workers
    return image_batches(args.data, chunks, size, workers, device, step, crop, contents)


def data_batches(args, size: int, device: torch.device, limit: int | None = None, crop: str = "center",
                 step: Callable[[torch.Tensor], Any] | None = None) -> tuple[int | None, Iterator[ImageBatch]]:
    """All of --data (the first `limit` images) as batches of --batch-size, in order: an image folder (sorted paths)
    or webdataset tar shards (their order, each read when its turn comes). Returns the number of images when it is
    known before reading (a folder) and the batches."""
    if not is_tar_source(args.data):
        paths = find_images(args.data)[:limit]
        return len(paths), read_batches(args, list(batches(paths, args.batch_size)), size, device, crop=crop,
                                        step=step)
    urls = shard_urls(args.data)

    def from_tars() -> Iterator[ImageBatch]:
        left = limit
        for url in urls:
            samples, stream = tar_batches(args, url, size, device, crop=crop, limit=left, step=step)
            yield from stream
            left = None if left is None else left - len(samples)
            if left is not None and left <= 0:
                return

    return None, from_tars()


def tar_batches(args, url: str, size: int, device: torch.device, local_processes: int = 1, crop: str = "center",
                limit: int | None = None, step: Callable[[torch.Tensor], Any] | None = None,
                classes: FolderClasses | None = None) -> tuple[list[TarSample], Iterator[ImageBatch]]:
    """One tar shard's samples (its first `limit`, labelled by `classes` when they come from member paths) and their
    batches of --batch-size (with `step`'s outputs)."""
    samples = read_shard(url, classes)[:limit]
    return samples, read_batches(args, list(batches([sample.name for sample in samples], args.batch_size)), size,
                                 device, local_processes, crop, SampleImages(samples), step)


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    """`items` in runs of `size` (the parser's positive --batch-size)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def check_apart_from_model(out: str, model: str, flag: str = "--out") -> None:
    """A folder written whole is neither the model's folder, the encoder saved inside it, nor the encoder its
    config.json names: writing there would overwrite the files the model is read from."""
    folders = [model, os.path.join(model, ENCODER_SUBDIR)]
    config_file = os.path.join(model, "config.json")
    if os.path.isfile(config_file):
        with contextlib.suppress(ValueError, OSError):  # a damaged config.json is the model loader's to name
            config = read_json(config_file, MAX_CONFIG_BYTES)
            encoder = config.get("encoder") if isinstance(config, dict) else None
            if isinstance(encoder, dict) and isinstance(encoder.get("path"), str):
                folders.append(encoder["path"])
    if any(os.path.realpath(out) == os.path.realpath(folder) for folder in folders if os.path.isdir(folder)):
        raise CLIError(f"{flag} {out} is the model's own folder or its encoder's: the files it is read from would be "
                       f"overwritten; write to another folder")


def check_output(path: str, folder: bool) -> None:
    """Where --out will go, checked before any work, creating nothing: the right kind of thing if it exists, and
    otherwise a writable folder to make it in."""
    kind = "a folder" if folder else "a file"
    if os.path.exists(path) and os.path.isdir(path) != folder:
        raise CLIError(f"--out {path} is {'a file' if folder else 'a folder'}; expected {kind}")
    parent = os.path.abspath(path if folder else os.path.dirname(os.path.abspath(path)))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise CLIError(f"--out {path}: {parent} is a file, so {kind} cannot be made there")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f"--out {path}: {parent} is not writable")
