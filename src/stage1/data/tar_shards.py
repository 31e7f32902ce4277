"""Webdataset tar shards: the way large image corpora ship (LAION / DataComp style), and a converter that writes them
from an image folder.

A shard is a tar of samples; a sample is the consecutive files of one key (webdataset's rule: the member name up to
the first dot of its base name): its image (`jpg`, `png`, `webp`, ...), and as our converter writes them,
`path.txt` (the image's path in the folder it came from) and `cls` (its ImageFolder class id). A plain tar of class
folders (`tar cf train.tar n01440764/ ...`: no cls anywhere) has its classes in its member paths: ImageFolder's, the
sorted folders below the samples' common root over all shards (`folder_classes`). Which specs `--data` may give is
shard_specs.py's. Images keep their encoded bytes: nothing is re-encoded.

A shard is a file from other people, read here and nowhere else: only the fields used are read, each after its
size is checked (MAX_IMAGE_BYTES, MAX_TEXT_BYTES); a bad sample (a file over its limit, a `cls` that is not an
integer, a `path.txt` that is not UTF-8, a field given twice, a name given before) comes with its problem and no
image, so it is skipped and listed as an unreadable image is; a tar that breaks or ends early keeps the samples
before the break, and one more entry names the shard and what broke.
"""

from __future__ import annotations

import copy
import io
import itertools
import lzma
import os
import shutil
import tarfile
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, IterableDataset, Subset

from ..base.atomic import atomic_path
from ..base.preemption import StopSignals
from .datasets import ImageDataset, ResumableDistributedSampler, class_labels, find_images, first_readable
from .images import UnreadableImageError, read_image
from .shard_specs import REMOTE, is_tar_source, shard_urls

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff", "gif")
# The field an image file's extension is written as: the names webdataset's to_tuple("jpg", ...) and timm's tar
# reader ("jpg;png;webp") look for (ImageNet's files end in .JPEG). The bytes stay as they are.
FIELD_OF_EXTENSION = {"jpeg": "jpg", "jpe": "jpg", "tiff": "tif"}
TEXT_FIELDS = ("path.txt", "cls")
MAX_IMAGE_BYTES = 1 << 28  # 256 MiB: an encoded image is read whole; the largest photos are a few tens of MB
MAX_TEXT_BYTES = 1 << 12  # path.txt and cls: a path, a number
MAX_OTHER_BYTES = 1 << 20  # any other field (a caption, its metadata): copied through by the wds export only
MAX_OPEN_SHARDS = 64  # descriptors a TarIndex keeps open (per process: each DataLoader worker has its own)
# What a broken tar raises on the way: tarfile's own errors, a short read, a bad gzip / bz2 / xz stream, a bad header.
DAMAGED = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError, ValueError)


@dataclass
class TarSample:
    name: str  # path.txt, else the key with its image field's extension
    data: bytes | None  # the encoded image; None when the sample has none or has a problem
    label: int  # cls, else its class folder's id (FolderClasses), else -1
    problem: str | None = None  # why the sample cannot be used, naming its tar and key

    def image(self) -> bytes:
        """The encoded image, or UnreadableImageError saying why there is none."""
        if self.data is None:
            raise UnreadableImageError(self.problem or "the sample has no image field")
        return self.data


class SampleImages(Mapping):
    """A shard's samples as input_pipeline's contents: name -> encoded image, or UnreadableImageError with the
    sample's problem (read_shard gives every sample of a shard a name of its own)."""

    def __init__(self, samples: list[TarSample]):
        self.samples = {sample.name: sample for sample in samples}

    def __getitem__(self, name: str) -> bytes:
        return self.samples[name].image()

    def __iter__(self):
        return iter(self.samples)

    def __len__(self) -> int:
        return len(self.samples)


def decode(data: bytes):
    """A sample's encoded image -> its decoded pixels (images.read_image); bad bytes: UnreadableImageError."""
    return read_image(io.BytesIO(data))[0]


def read_shard(url: str, classes: FolderClasses | None = None) -> list[TarSample]:
    """Every sample of one shard (a local file or a stream), in the tar's order; `classes` (folder_classes) label the
    samples of a plain tar of class folders."""
    from webdataset.gopen import gopen

    samples, names = [], set()
    try:
        with gopen(url, "rb") as stream:
            watched = _Watched(stream)
            with tarfile.open(fileobj=watched, mode="r|*") as tar:
                for key, files in _sample_files(tar, by_position=False):
                    sample = TarSample(*_sample(url, key, files, names))
                    if "cls" not in files and classes is not None:
                        sample.label = classes.label(key)
                    samples.append(sample)
                watched.check_end(tar)
    except DAMAGED as err:
        samples.append(TarSample(*_damaged(url, len(samples), err)))
    return samples


class _Watched:
    """A stream read through, noting where its last non-zero byte was. tarfile takes a header cut off or garbled
    for the end of the archive; after a tar's last member only zero blocks may follow."""

    def __init__(self, stream, position: int = 0):
        self.stream, self.position, self.data_end = stream, position, position  # position: where it starts
        self.reads_at_end = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self.stream.read(size)
        if size and not chunk:
            self.reads_at_end += 1
            if self.reads_at_end > 4:  # tarfile skips a member block by block, past the end too, for all its size
                raise tarfile.ReadError("unexpected end of data: a member declares more bytes than the tar holds")
        data = len(chunk.rstrip(b"\0"))
        if data:
            self.data_end = self.position + data
        self.position += len(chunk)
        return chunk

    def check_end(self, tar: tarfile.TarFile) -> None:
        """Read to the end; tarfile.ReadError unless only zeros follow the last member."""
        if getattr(tar.fileobj, "comptype", "tar") != "tar":  # compressed: a cut-off stream is the decompressor's
            return
        while self.read(1 << 20):
            pass
        if self.data_end > tar.offset or self.position % tarfile.BLOCKSIZE:
            raise tarfile.ReadError(f"{self.position - tar.offset:,} bytes after the last complete member are not "
                                    f"a tar's end (the file is cut off, or a header is damaged)")


def read_sample_fields(url: str):
    """(key, name, fields) of each sample of one shard, in the tar's order, named as read_shard names them; fields:
    every field of the sample within its bound (images MAX_IMAGE_BYTES, path.txt and cls MAX_TEXT_BYTES, others
    MAX_OTHER_BYTES; a field over it, or given twice, is left out). A tar that breaks ends the samples there, as
    read_shard's do."""
    from webdataset.gopen import gopen

    names = set()
    try:
        with gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for key, files in _sample_files(tar, by_position=False, other_fields=True):
                name = _sample(url, key, files, names)[0]
                yield _printable(key), name, {field: data for field, data in files.items() if isinstance(data, bytes)}
    except DAMAGED:
        return


def _sample_files(tar: tarfile.TarFile, by_position: bool, other_fields: bool = False):
    """(key, files) of each sample of an open tar, in order. files: field -> its bytes ((offset, size) of an image
    when `by_position`), or a problem. Fields this package does not use are not read, unless `other_fields`."""
    key, files = None, {}
    for member in tar:
        tar.members = []  # tarfile keeps every header it has read: a tar of millions of empty members fills memory
        if member.size < 0:  # a pax size; tarfile (before 3.12.12) would step back to this header forever
            raise tarfile.ReadError(f"{_printable(member.name)} declares a negative size ({member.size})")
        folder, base = os.path.split(member.name)
        stem, dot, field = base.partition(".")
        field = field.lower()
        if not member.isfile() or not dot or base.startswith("."):  # folders, links, macOS' ._ files
            continue
        if os.path.join(folder, stem) != key:
            if key is not None:
                yield key, files
            key, files = os.path.join(folder, stem), {}
        limit = (MAX_TEXT_BYTES if field in TEXT_FIELDS else MAX_IMAGE_BYTES if field in IMAGE_FIELDS
                 else MAX_OTHER_BYTES if other_fields else None)
        if limit is None:
            continue
        if field in files:
            files[field] = f"its {field} is given twice"
        elif member.issparse():  # its data is a map of holes: tarfile would make up zeros for them
            files[field] = f"its {field} is a sparse file"
        elif member.size > limit:
            files[field] = f"its {field} is {member.size:,} bytes, over the {limit:,} accepted"
        elif by_position and field in IMAGE_FIELDS:
            files[field] = (member.offset_data, member.size)
        else:
            files[field] = tar.extractfile(member).read()
            if len(files[field]) != member.size:  # a stream that ends inside the member: tarfile returns it short
                raise tarfile.ReadError(f"unexpected end of data in {member.name}")
    if key is not None:
        yield key, files


def _folders(key: str) -> tuple[str, ...]:
    """The folders of a sample's member path, "./" and empty parts dropped (`tar cf x.tar -C train .`)."""
    return tuple(_printable(part) for part in key.split("/")[:-1] if part not in ("", "."))


@dataclass
class FolderClasses:
    """ImageFolder's classes of plain tars: the folders right below the samples' common root, sorted; a sample
    directly in the root has none (-1)."""

    root: tuple[str, ...]
    names: list[str]
    unlabelled: int  # samples directly in the root

    def __post_init__(self):
        self._ids = {name: i for i, name in enumerate(self.names)}  # a label per sample: no list search

    def label(self, key: str) -> int:
        folders = _folders(key)
        if folders[: len(self.root)] != self.root or len(folders) == len(self.root):
            return -1
        return self._ids.get(folders[len(self.root)], -1)


def folder_classes(urls: list[str]) -> FolderClasses | None:
    """The classes of local tar shards none of whose samples has a cls, from their member paths (headers only: image
    bytes are skipped, not read): the folders below the common root of all samples (`tar cf x.tar train/` has
    train/ as its root), or that root itself when every sample is in it (one class). None when a sample has a cls
    (the shards say their classes themselves), when no sample is in a folder, or for streams (read once, not twice)."""
    if not all(os.path.isfile(url) for url in urls):
        return None
    paths = []
    for url in urls:
        try:
            with tarfile.open(url, "r:*") as tar:
                for key, files in _sample_files(tar, by_position=True):
                    if "cls" in files:
                        return None
                    paths.append(_folders(key))
        except DAMAGED:
            continue  # reading the shard lists the damage; the samples before it count
    if not any(paths):
        return None
    root = tuple(os.path.commonprefix(paths))  # element-wise: the folders all samples share
    if all(len(folders) == len(root) for folders in paths):
        root = root[:-1]  # every sample in one folder: that folder is the one class
    names = sorted({folders[len(root)] for folders in paths if len(folders) > len(root)})
    return FolderClasses(root, names, sum(len(folders) == len(root) for folders in paths))


def _sample(url: str, key: str, files: dict, names: set) -> tuple[str, object, int, str | None]:
    """(name, image, label, problem) of one sample's files, the image None when there is a problem; `names` (those
    given so far) keeps names unique."""
    key = _printable(key)
    field = next((f for f in IMAGE_FIELDS if f in files), None)
    name, label = f"{key}.{field or 'missing'}", -1
    problems = [value for value in files.values() if isinstance(value, str)]
    if field is None:
        problems.append("it has no image field")
    if isinstance(path := files.get("path.txt"), bytes):
        try:
            name = path.decode()
        except UnicodeDecodeError:
            problems.append("its path.txt is not UTF-8 text")
    if isinstance(cls := files.get("cls"), bytes):
        try:
            label = int(cls.decode())
            if not -1 <= label < 2**31:
                raise ValueError
        except ValueError:  # UnicodeDecodeError too
            label = -1
            problems.append(f"its cls {cls[:40]!r} is not a class id (an integer from -1 to 2^31 - 1)")
    if name in names:
        problems.append(f"a sample before it is also named {name}")
        name = next(f"{name}#{n}" for n in itertools.count(2) if f"{name}#{n}" not in names)  # a name of its own
    names.add(name)
    if problems:
        return name, None, label, f"{url}, sample {key}: {'; '.join(problems)}"
    return name, files[field], label, None


def _damaged(url: str, read: int, err: Exception) -> tuple[str, None, int, str]:
    """The entry that lists a tar broken after `read` samples."""
    return (f"{url} (after sample {read})", None, -1,
            f"{url} is damaged or ends early after {read} sample(s) ({type(err).__name__}: "
            f"{_printable(str(err))[:200]}); the rest of the shard is skipped")


def _printable(text: str) -> str:
    """Member names are decoded with surrogate escapes: undecodable bytes as \\xNN, so they can be printed."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


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
                write_sample(tar, *folder_sample(folder, paths[index], index, labels[index]))
        written.append(target)
    return written


def folder_sample(folder: str, path: str, index: int, label: int) -> tuple[str, dict[str, bytes]]:
    """The sample write_shards makes of image `path` under `folder`: its key (the image's index: a key with no dot,
    since webdataset splits a member name at its first dot) and fields (the image's bytes under its extension's
    field, path.txt, cls)."""
    extension = os.path.splitext(path)[1].lower().lstrip(".")
    full = os.path.join(folder, path)
    if os.path.getsize(full) > MAX_IMAGE_BYTES:  # no reader takes it: left out unread, and listed when read back
        return f"{index:09d}", {"path.txt": _printable(path).encode(), "cls": str(label).encode()}
    with open(full, "rb") as f:
        image = f.read()
    # A name that is not UTF-8 (its bytes decoded with surrogate escapes) is written printable, as \xNN: path.txt
    # must be UTF-8 for the readers to take the sample
    return f"{index:09d}", {FIELD_OF_EXTENSION.get(extension, extension): image, "path.txt": _printable(path).encode(),
                            "cls": str(label).encode()}


def write_sample(tar: tarfile.TarFile, key: str, fields: dict[str, bytes]) -> None:
    """One sample into an open tar: a file key.field per field, in the given order."""
    for field, data in fields.items():
        member = tarfile.TarInfo(f"{key}.{field}")
        member.size, member.mode = len(data), 0o644
        tar.addfile(member, io.BytesIO(data))


def index_shard(url: str, names: set | None = None) -> list[tuple[str, int, int, str | None]]:
    """(name, offset, size, problem) of every sample's image bytes in a local uncompressed tar, in the tar's order,
    from its headers and text fields (the images themselves are not read). `names` keeps names unique across
    shards."""
    if url.endswith((".tar.gz", ".tgz")):
        raise ValueError(f"{url} is compressed, so it cannot be read by position: decompress it, or stream it "
                         f"(data.path=pipe:'gunzip -c {url}' with data.tar_cache=null)")
    names = set() if names is None else names
    entries, end = [], os.path.getsize(url)
    try:
        with tarfile.open(url, "r:") as tar:
            for key, files in _sample_files(tar, by_position=True):
                name, image, _, problem = _sample(url, key, files, names)
                offset, size = image or (0, 0)
                if offset + size > end:
                    problem = f"{url}, sample {key}: its image ends past the end of the file (a header that lies)"
                entries.append((name, offset, size, problem))
            tar.fileobj.seek(tar.offset)  # what follows the last member, as read_shard checks it
            _Watched(tar.fileobj, position=tar.offset).check_end(tar)
    except DAMAGED as err:
        name, _, _, problem = _damaged(url, len(entries), err)
        entries.append((name, 0, 0, problem))
    return entries


class TarIndex(Mapping):
    """The images of local tar shards by name: name -> encoded bytes, read by position (pread: no shared file
    position, so forked DataLoader workers may read one descriptor at once), or UnreadableImageError for a sample
    with a problem. Built from the tar headers. At most MAX_OPEN_SHARDS descriptors stay open, the least recently
    read closed first: a shuffled epoch over ImageNet's ~1300 shards would otherwise pass the usual limit of 1024
    open files in every DataLoader worker."""

    def __init__(self, urls: list[str]):
        remote = [url for url in urls if url.startswith(REMOTE)]
        if remote:
            raise ValueError(f"{remote[0]} is a stream, which cannot be read by position: copy the shards to local "
                             f"disk (the commands that stream, tokenize, evaluate and latent-stats, read it as it is)")
        self.where, names = {}, set()
        for url in urls:
            for name, offset, size, problem in index_shard(url, names):
                self.where[name] = (url, offset, size, problem)
        self.names = list(self.where)
        self._files: OrderedDict[str, int] = OrderedDict()  # url -> descriptor, the most recently read last

    def __getitem__(self, name: str) -> bytes:
        url, offset, size, problem = self.where[name]
        if problem is not None:
            raise UnreadableImageError(problem)
        if url in self._files:
            self._files.move_to_end(url)
        else:
            while len(self._files) >= MAX_OPEN_SHARDS:
                os.close(self._files.popitem(last=False)[1])
            self._files[url] = os.open(url, os.O_RDONLY)
        return os.pread(self._files[url], size, offset)

    def close(self) -> None:
        """Close the open shards (reading again reopens them)."""
        while self._files:
            os.close(self._files.popitem()[1])

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
        return first_readable(((s.name, lambda s=s: decode(s.image())) for s in samples), count, transform)

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
                if all(sample.data is None for sample in samples):  # empty, damaged, or every sample bad
                    warnings.warn(f"skipping tar shard {self.urls[shard]}: no usable sample"
                                  + (f" ({samples[0].problem})" if samples else ""), stacklevel=2)
                    continue
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
            try:  # the transform too: an image may be decodable, yet too elongated to resize
                image = decode(sample.image())
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(hash((self.seed, epoch, shard, positions[at])) & 0x7FFF_FFFF_FFFF_FFFF)
                    pixels = self.transform(image)
                return {"image": pixels, "skipped": skipped}
            except UnreadableImageError as err:
                warnings.warn(f"skipping unreadable image {sample.name}: {err}", stacklevel=2)
        raise RuntimeError(f"no readable image in {self.urls[shard]}")


def training_dataset(path: str, transform, seed: int, cache: str | None):
    """data.path's training images: an image folder, local tar shards read by position, streamed shards copied to
    `cache` (data.tar_cache) and read by position, or, with no cache, streamed (TarStream)."""
    if not is_tar_source(path):
        return ImageDataset(path, transform, seed=seed)
    urls = shard_urls(path, "data.path")
    if cache is None and any(url.startswith(REMOTE) for url in urls):
        return TarStream(urls, transform, seed=seed)
    return TarImageDataset(path, transform, seed=seed, cache=cache, urls=urls)


def training_loader(dataset, rank: int, world: int, batch_size: int, workers: int, seed: int, start_batches: int,
                    pin_memory: bool) -> DataLoader:
    """One rank's endless training batches from its batch `start_batches` on (where a resumed run stood): a folder
    or indexed tars through the resumable sampler, a stream through its readers, which skip the batches taken."""
    # Workers outlive a SIGTERM meant for the whole job, so the training process can checkpoint (base/preemption).
    options = dict(batch_size=batch_size, num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0,
                   worker_init_fn=StopSignals.pass_over_in_worker)
    if isinstance(dataset, TarStream):
        return DataLoader(dataset.for_rank(rank, world, workers, batch_size, start_batches=start_batches), **options)
    sampler = ResumableDistributedSampler(dataset, world, rank, seed=seed, start=start_batches * batch_size)
    return DataLoader(dataset, sampler=sampler, **options,
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
