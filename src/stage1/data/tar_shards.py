"""Webdataset tar shards: the way large image corpora ship (LAION / DataComp style), read with the `webdataset`
package, and a converter that writes them from an image folder.

A shard is a tar of samples; a sample is the files of one key: its image (`jpg`, `png`, `webp`, ...), and as our
converter writes them, `path.txt` (the image's path in the folder it came from) and `cls` (its ImageFolder class
id). `--data` names shards as webdataset does: a brace pattern (`shards/{000000..000127}.tar`), a list separated
by `::`, or any URL it opens (`pipe:`, `https://`, ...). Images keep their encoded bytes: nothing is re-encoded.
"""

from __future__ import annotations

import copy
import io
import itertools
import os
import shutil
import tarfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

import torch
from torch.utils.data import DataLoader, IterableDataset, Subset

from ..base.atomic import atomic_path
from .datasets import ImageDataset, ResumableDistributedSampler, class_labels, find_images, first_readable
from .images import UnreadableImageError, read_image

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff", "gif")
REMOTE = ("pipe:", "http://", "https://", "gs://", "s3://", "ais://")


@dataclass
class TarSample:
    name: str  # path.txt, else the key with its image field's extension
    data: bytes | None  # the encoded image; None when the sample has no image field
    label: int  # cls, else -1


def decode(data: bytes | None):
    """A sample's encoded image -> its decoded pixels (images.read_image); no image field or bad bytes:
    UnreadableImageError."""
    return read_image(io.BytesIO(data or b""))[0]


def is_tar_source(data: str) -> bool:
    """Whether --data names tar shards rather than an image folder."""
    return data.startswith(REMOTE) or ".tar" in data


def shard_urls(data: str) -> list[str]:
    """The shards a spec names, in order; local ones must exist."""
    from webdataset.shardlists import expand_urls

    urls = [url for part in data.split("::") for url in expand_urls(part)]
    missing = [url for url in urls if not url.startswith(REMOTE) and not os.path.isfile(url)]
    if missing:
        raise FileNotFoundError(f"tar shard(s) not found: {', '.join(missing[:3])}" +
                                (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    return urls


def read_shard(url: str) -> list[TarSample]:
    """Every sample of one shard, in the tar's order."""
    import webdataset as wds

    samples = []
    # No node or worker splitting of its own: the callers deal shards to ranks and workers themselves.
    for sample in wds.WebDataset(url, shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None):
        field = next((f for f in IMAGE_FIELDS if f in sample), None)
        name = sample["path.txt"].decode() if "path.txt" in sample else f"{sample['__key__']}.{field or 'missing'}"
        label = int(sample["cls"].decode()) if "cls" in sample else -1
        samples.append(TarSample(name, sample[field] if field else None, label))
    return samples


def write_shards(folder: str, out: str, shard_size: int) -> list[str]:
    """The images under `folder` as tar shards OUT/000000.tar, ... of `shard_size` samples each (sorted paths, class
    ids from the folder tree), each written atomically; returns their paths."""
    paths = find_images(folder)
    _, labels = class_labels(paths)
    os.makedirs(out, exist_ok=True)
    written = []
    for start in range(0, len(paths), shard_size):
        target = os.path.join(out, f"{start // shard_size:06d}.tar")
        with atomic_path(target) as tmp, tarfile.open(tmp, "w") as tar:
            for index in range(start, min(start + shard_size, len(paths))):
                path = paths[index]
                with open(os.path.join(folder, path), "rb") as f:
                    image = f.read()
                extension = os.path.splitext(path)[1].lower().lstrip(".")
                key = f"{index:09d}"  # a key with no dot: webdataset splits a member name at its first dot
                for field, data in ((extension, image), ("path.txt", path.encode()),
                                    ("cls", str(labels[index]).encode())):
                    member = tarfile.TarInfo(f"{key}.{field}")
                    member.size, member.mode = len(data), 0o644
                    tar.addfile(member, io.BytesIO(data))
        written.append(target)
    return written


def index_shard(path: str) -> list[tuple[str, int, int]]:
    """(name, offset, size) of every sample's image bytes in a local tar, in the tar's order, from its headers
    (the images themselves are not read)."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, base = os.path.split(member.name)
            key, _, field = base.partition(".")  # webdataset's rule: a sample's files share the name before a dot
            sample = samples.setdefault(os.path.join(folder, key), {})
            if field == "path.txt":
                sample["name"] = tar.extractfile(member).read().decode()
            elif field.lower() in IMAGE_FIELDS and "image" not in sample:
                sample["image"], sample["field"] = (member.offset_data, member.size), field
    return [(sample.get("name", f"{key}.{sample['field']}"), *sample["image"])
            for key, sample in samples.items() if "image" in sample]


class TarIndex(Mapping):
    """The images of local tar shards by name: name -> encoded bytes, read by position (pread: no shared file
    position, so forked DataLoader workers may read one descriptor at once). Built from the tar headers."""

    def __init__(self, urls: list[str]):
        remote = [url for url in urls if url.startswith(REMOTE)]
        if remote:
            raise ValueError(f"{remote[0]} is a stream, which cannot be read by position: copy the shards to local "
                             f"disk (the commands that stream, tokenize, evaluate and latent-stats, read it as it is)")
        self.where = {}
        for url in urls:
            for name, offset, size in index_shard(url):
                if name in self.where:
                    raise ValueError(f"two samples are named {name} ({url} and {self.where[name][0]})")
                self.where[name] = (url, offset, size)
        self.names = list(self.where)
        self._files: dict[str, int] = {}

    def __getitem__(self, name: str) -> bytes:
        url, offset, size = self.where[name]
        if url not in self._files:
            self._files[url] = os.open(url, os.O_RDONLY)
        return os.pread(self._files[url], size, offset)

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def local_copies(urls: list[str], cache: str | None) -> list[str]:
    """The shards as local files: streams (pipe:, https://, ...) copied once into `cache` (each atomically, so
    processes that copy the same shard at once, or a copy cut short, leave no broken file), local files as they are;
    with no cache, the streams stay as they are (and TarIndex refuses them)."""
    from webdataset.gopen import gopen

    copies = []
    for i, url in enumerate(urls):
        if cache is None or not url.startswith(REMOTE):
            copies.append(url)
            continue
        os.makedirs(cache, exist_ok=True)
        target = os.path.join(cache, f"{i:06d}-{os.path.basename(url.split()[-1]) or 'shard.tar'}")
        if not os.path.isfile(target):
            with atomic_path(target) as tmp, open(tmp, "wb") as f, gopen(url, "rb") as stream:
                shutil.copyfileobj(stream, f, 1 << 20)
        copies.append(target)
    return copies


class TarImageDataset(ImageDataset):
    """The training dataset over tar shards (a TarIndex of local files, streams copied to `cache` first), so the
    sampler, exact resume, per-sample seeds and skipping of unreadable images are the image folder's."""

    def __init__(self, spec: str, transform, seed: int = 0, cache: str | None = None, urls: list[str] | None = None):
        self.root, self.transform, self.seed = spec, transform, seed
        self.index = TarIndex(local_copies(urls if urls is not None else shard_urls(spec), cache))
        self.paths = self.index.names
        if not self.paths:
            raise ValueError(f"no images in the tar shards {spec}")

    def load(self, index: int):
        return decode(self.index[self.paths[index]])


class TarStream(IterableDataset):
    """Training samples streamed from tar shards that are not copied to local disk (a stream spec, data.tar_cache
    null), in an order that is a pure function of (seed, epoch, rank, worker), so a resumed run goes on exactly
    where it stopped. Each epoch shuffles the shards and deals them to the rank x worker readers; a reader shuffles
    each of its shards in memory and yields its samples; DataLoader's batch i comes from worker i % W. Resuming at
    the rank's batch b, worker w skips the samples of its batches before b (shards it has passed are read again,
    not decoded: that is the cost of a stream). An unreadable sample is replaced by the next readable one of its
    shard and counted, as the folder dataset does. `for_rank` gives the readers of one rank."""

    def __init__(self, urls: list[str], transform, seed: int = 0):
        self.urls, self.transform, self.seed = urls, transform, seed
        self.rank, self.world, self.workers, self.batch_size, self.start, self.epochs = 0, 1, 1, 1, 0, None

    def for_rank(self, rank: int, world: int, workers: int, batch_size: int, start_batches: int = 0,
                 epochs: int | None = None) -> "TarStream":
        """The readers of one rank, from its batch `start_batches` on, for `epochs` passes (None: endless)."""
        other = copy.copy(self)
        other.rank, other.world, other.workers = rank, world, max(1, workers)
        other.batch_size, other.start, other.epochs = batch_size, start_batches, epochs
        if len(self.urls) < world * other.workers:
            raise ValueError(f"{len(self.urls)} tar shard(s) for {world * other.workers} readers (ranks x "
                             f"data.num_workers): a streamed set needs at least one shard per reader")
        return other

    def with_transform(self, transform) -> "TarStream":
        other = copy.copy(self)
        other.transform = transform
        return other

    def first_images(self, count: int, transform) -> tuple[list[str], list]:
        """The first `count` readable images of the first shards, in their order (the sample grid's)."""
        samples = (sample for url in self.urls for sample in read_shard(url))  # read as far as needed
        return first_readable(((s.name, partial(decode, s.data)) for s in samples), count, transform)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        readers, reader = self.world * self.workers, self.rank * self.workers + worker
        skip = max(0, -(-(self.start - worker) // self.workers)) * self.batch_size  # ceil: this worker's batches
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            order = torch.randperm(len(self.urls), generator=torch.Generator().manual_seed(self.seed + epoch))
            for shard in order[reader::readers].tolist():
                samples = read_shard(self.urls[shard])
                if not samples:
                    raise ValueError(f"{self.urls[shard]} holds no samples")
                if skip >= len(samples):
                    skip -= len(samples)
                    continue
                shuffle = torch.Generator().manual_seed(hash((self.seed, epoch, shard)) & 0x7FFF_FFFF_FFFF_FFFF)
                positions = torch.randperm(len(samples), generator=shuffle).tolist()
                for at in range(skip, len(positions)):
                    yield self._sample(samples, positions, at, epoch, shard)
                skip = 0
            epoch += 1

    def _sample(self, samples: list[TarSample], positions: list[int], at: int, epoch: int, shard: int) -> dict:
        for skipped in range(len(positions)):
            sample = samples[positions[(at + skipped) % len(positions)]]
            try:
                image = decode(sample.data)
                break
            except UnreadableImageError as err:
                warnings.warn(f"skipping unreadable image {sample.name}: {err}", stacklevel=2)
        else:
            raise RuntimeError(f"no readable image in {self.urls[shard]}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, epoch, shard, positions[at])) & 0x7FFF_FFFF_FFFF_FFFF)
            pixels = self.transform(image)
        return {"image": pixels, "skipped": skipped}


def training_dataset(path: str, transform, seed: int, cache: str | None):
    """data.path's training images: an image folder, local tar shards read by position, streamed shards copied to
    `cache` (data.tar_cache) and read by position, or, with no cache, streamed (TarStream)."""
    if not is_tar_source(path):
        return ImageDataset(path, transform, seed=seed)
    urls = shard_urls(path)
    if cache is None and any(url.startswith(REMOTE) for url in urls):
        return TarStream(urls, transform, seed=seed)
    return TarImageDataset(path, transform, seed=seed, cache=cache, urls=urls)


def training_loader(dataset, rank: int, world: int, batch_size: int, workers: int, seed: int, start_batches: int,
                    pin_memory: bool) -> DataLoader:
    """One rank's endless training batches from its batch `start_batches` on (where a resumed run stood): a folder
    or indexed tars through the resumable sampler, a stream through its readers, which skip the batches taken."""
    if isinstance(dataset, TarStream):
        stream = dataset.for_rank(rank, world, workers, batch_size, start_batches=start_batches)
        return DataLoader(stream, batch_size=batch_size, num_workers=workers, pin_memory=pin_memory,
                          persistent_workers=workers > 0)
    sampler = ResumableDistributedSampler(dataset, world, rank, seed=seed, start=start_batches * batch_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=workers > 0,
                      generator=torch.Generator().manual_seed(seed))  # keeps the global RNG out of data loading


def spread_images(dataset, count: int, rank: int, world: int, batch_size: int, workers: int, seed: int):
    """One pass over this rank's share of `count` images of the dataset, under its transform, in batches (the
    codebook fit's images): a random `count` of a folder or indexed tars, the first ones a stream's readers give."""
    if isinstance(dataset, TarStream):
        images = dataset.for_rank(rank, world, workers, batch_size, epochs=1)
        return itertools.islice(DataLoader(images, batch_size=batch_size, num_workers=workers),
                                -(-count // (world * batch_size)))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    mine = order[:count][rank::world].tolist()
    return DataLoader(Subset(dataset, mine), batch_size=batch_size, num_workers=workers, generator=torch.Generator())
