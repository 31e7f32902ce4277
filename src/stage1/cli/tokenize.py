"""The work of vqrae-tokenize (its flags and help text: stage1/cli/arguments.py)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os

import numpy as np
import torch
from torchvision.transforms import v2
from tqdm import tqdm

from ..base import distributed
from ..base.atomic import read_json, write_json
from ..base.precision import autocast, resolve_precision
from ..data.datasets import class_labels, find_images
from ..data.input_pipeline import PREPROCESSING, PROTOCOL_CROPS, PROTOCOLS
from ..data.shard_specs import is_tar_source, shard_urls
from ..data.tar_shards import folder_classes, folder_sample, read_sample_fields
from ..data.token_exports import (
    WDS_ONE_VIEW,
    check_labels,
    check_maskgit_classes,
    export_tokens,
    llamagen_advice,
    llamagen_arguments,
    maskgit_advice,
    maskgit_arguments,
    remove_exports,
)
from ..data.token_shards import MANIFEST, RUN_FILE, assemble_manifest, shard_done, write_shard
from .arguments import INDEX_DTYPES, launch
from .common import (
    CLIError,
    batches,
    check_output,
    load_model,
    model_image_size,
    read_batches,
    tar_batches,
)

VIEWS = {"none": 1, "flip": 2, "ten-crop": 10}  # code grids per image for each --augment


def index_dtype(codebook_size: int, requested: str = "auto") -> np.dtype:
    """The requested index type (checked to hold codebook_size codes), or the smallest unsigned one that does."""
    candidates = INDEX_DTYPES if requested == "auto" else (requested,)
    for name in candidates:
        if codebook_size - 1 <= np.iinfo(np.dtype(name)).max:
            return np.dtype(name)
    raise CLIError(f"--index-dtype {requested} holds at most {np.iinfo(np.dtype(requested)).max + 1} codes, "
                   f"but the model's codebook has {codebook_size}")


def codes_fingerprint(model) -> str:
    """SHA-256 of everything a token's codes depend on: the encoder's weights, the latent statistics, the
    codebook(s) and the configs of encoder and quantizer (not the decoder, which never touches the codes)."""
    digest = hashlib.sha256()
    config = model.config.to_dict()
    digest.update(json.dumps({k: config[k] for k in ("encoder", "quantizer")}, sort_keys=True).encode())
    tensors = {f"encoder.{k}": v for k, v in model.encoder.model.state_dict().items()}
    tensors.update({k: v for k, v in model.state_dict().items() if k.startswith(("quantizer.", "latent_"))})
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def listing_fingerprint(paths: list[str]) -> str:
    # JSON, not lines: a name may hold a newline, and {"a", "b\nc"} joined by lines is {"a\nb", "c"}
    return hashlib.sha256(json.dumps(paths).encode()).hexdigest()


def views_of(images: torch.Tensor, augment: str, size: int) -> torch.Tensor:
    """(B, 3, S, S) -> (B, views, 3, size, size): the images, with their mirrors (flip), or the ten crops of each
    (torchvision's order: four corners and the centre, then the same of the mirror)."""
    if augment == "none":
        return images.unsqueeze(1)
    if augment == "flip":
        return torch.stack([images, images.flip(-1)], dim=1)
    return torch.stack(v2.functional.ten_crop(images, [size, size]), dim=1)


def codes_of_views(model, args, size: int):
    """The model's work on a batch (input_pipeline's step): the codes of every view, (B, views, h, w[, L])."""

    def step(images: torch.Tensor) -> torch.Tensor:
        views = views_of(images, args.augment, size)
        with torch.no_grad(), autocast(images.device, args.precision):
            grids = model.encode_to_indices(views.flatten(0, 1), flat=bool(model.layout.scales)).cpu()
        return grids.view(views.shape[0], views.shape[1], *grids.shape[1:])

    return step


def tokenize_shard(model, stream, size, args) -> tuple[np.ndarray, list[str], list[dict]]:
    """The codes of one shard's batches, read from `stream`: (n, h, w[, L]), or (n, views, h, w[, L])."""
    codes, kept, skipped = [], [], []
    for batch in stream:
        kept += batch.names
        skipped += batch.skipped
        if batch.images is not None:
            codes.append(batch.output)
    views = VIEWS[args.augment]
    empty = (0, views, *model.code_shape(size))
    array = torch.cat(codes).numpy() if codes else np.zeros(empty, dtype=np.int64)
    array = array[:, 0] if views == 1 else array
    return array.astype(index_dtype(model.layout.vocab_size, args.index_dtype)), kept, skipped


def run(args) -> int:
    check_output(args.out, folder=True)
    source = TarInput(args.data) if is_tar_source(args.data) else FolderInput(args.data, args.shard_size)
    _check_apart(source.local_paths(), args.out, "--data")
    if args.format == "maskgit" and args.maskgit_root is not None and os.path.exists(args.maskgit_root) and \
            not os.path.isdir(args.maskgit_root):
        raise CLIError(f"--maskgit-root {args.maskgit_root} is not a folder: expected a folder (or a new path) for "
                       f"Halton-MaskGIT's Train/ and Eval/")
    info = distributed.setup(args.device)
    try:
        device = info.device
        model = load_model(args, device, needs_codes=True)
        size = model_image_size(model, args.image_size)
        index_dtype(model.layout.vocab_size, args.index_dtype)  # fails before any work if it cannot fit
        read_size = int(size * args.crop_range) if args.augment == "ten-crop" else size
        if args.format == "wds" and args.augment != "none":
            raise CLIError(WDS_ONE_VIEW)
        if args.format in ("llamagen", "maskgit"):  # what LlamaGen / MaskGIT cannot take is refused before any work
            grid, reader = (model.grid_side(size),) * 2, "LlamaGen" if args.format == "llamagen" else "Halton-MaskGIT"
            if args.format == "llamagen":
                llamagen_arguments(args.out, grid, size, VIEWS[args.augment], model.layout.codes_per_position,
                                   model.layout.scales)
            else:
                maskgit_arguments(grid, size, model.layout.codes_per_position, model.layout.scales,
                                  model.layout.vocab_size)
                if not (args.restart and args.maskgit_root is None):  # --restart discards OUT/maskgit
                    check_maskgit_classes(maskgit_root(args), source.classes)
            if isinstance(source, FolderInput):
                check_labels(source.labels, reader)
            elif source.folders is not None:  # plain tars: their unlabelled samples are known from the headers
                check_labels([-1] * source.folders.unlabelled, reader)
        run_record = {
            "model": str(args.model),
            "codebook_size": model.layout.vocab_size,
            "image_size": size,
            "index_dtype": args.index_dtype,
            **source.record(),
            "preprocessing": PREPROCESSING,
            **({"protocol": PROTOCOLS[args.protocol]} if args.protocol != "vqrae" else {}),
            "augment": args.augment if args.augment != "ten-crop" else f"ten-crop of {read_size}",
            "codes_fingerprint": codes_fingerprint(model),
            "precision": resolve_precision(args.precision, device),  # bf16 and fp32 codes differ in places
        }
        os.makedirs(args.out, exist_ok=True)
        if info.is_main:
            _check_or_write_run_record(args.out, run_record, args.restart)
        distributed.barrier()

        mine = [i for i in range(source.num_shards) if i % info.world_size == info.rank]
        todo = [i for i in mine if not shard_done(args.out, i)]
        if info.is_main and len(todo) < len(mine):
            print(f"resuming: {len(mine) - len(todo)} of {len(mine)} shard(s) already done")
        # Counted in images, not shards (a shard holds thousands); tar shards are counted as they are read.
        bar = tqdm(total=source.images_in(todo), desc="tokenize", unit="image", disable=not info.is_main)
        step = codes_of_views(model, args, size)
        for i, names, labels, stream in source.shard_streams(todo, args, read_size, device, info.local_world_size,
                                                             step):
            array, kept, skipped = tokenize_shard(model, stream, size, args)
            label_of = dict(zip(names, labels, strict=True))
            write_shard(args.out, i, array, kept, [label_of[name] for name in kept], skipped)
            bar.update(len(names))
        bar.close()
        distributed.barrier()
        if info.is_main:
            manifest = assemble_manifest(args.out, source.num_shards, dict(
                model=run_record["model"], encoder=model.config.encoder.path, codebook_size=run_record["codebook_size"],
                views=VIEWS[args.augment], augment=args.augment, classes=source.classes, image_size=size,
                scales=list(model.layout.scales) if model.layout.scales else None))
            exported = export_tokens(args.format, args.out, manifest, args.split, maskgit_root(args),
                                     source.sample_fields)
            layout = (f"{manifest.index_shape[0]} multi-scale codes (scales {manifest.scales})" if manifest.scales
                      else f"{manifest.grid_shape[0]}x{manifest.grid_shape[1]} codes")
            print(f"tokenized {manifest.num_images} image(s) into {source.num_shards} shard(s) of {layout} "
                  f"({manifest.dtype}); "
                  f"{len(manifest.skipped)} unreadable image(s) skipped; manifest: "
                  f"{os.path.join(args.out, MANIFEST)}" + (f"; {args.format} export: {exported}"
                                                           if args.format != "shards" else ""))
            if args.format == "llamagen":
                print(llamagen_advice(manifest, args.out))
            if args.format == "maskgit":
                print(maskgit_advice(manifest, maskgit_root(args)))
    finally:
        distributed.teardown()
    return 0


def maskgit_root(args) -> str:
    """Halton-MaskGIT's --data-folder: the folder its Train/ and Eval/ go in."""
    return args.maskgit_root or os.path.join(args.out, "maskgit")


class FolderInput:
    """An image folder: its sorted paths cut into shards of --shard-size, read as one stream of batches (reading
    runs ahead across shard boundaries), ImageFolder class ids."""

    def __init__(self, root: str, shard_size: int):
        self.root, self.paths, self.shard_size = root, find_images(root), shard_size
        self.classes, self.labels = class_labels(self.paths)
        self.num_shards = (len(self.paths) + shard_size - 1) // shard_size

    def record(self) -> dict:
        return {"shard_size": self.shard_size, "images": len(self.paths), "listing": listing_fingerprint(self.paths)}

    def local_paths(self) -> list[str]:
        return [self.root]

    def sample_fields(self, i: int):
        """Shard i's images as the samples vqrae-make-shards writes of them: (key, name, fields)."""
        for index in range(len(self.paths))[self._span(i)]:
            key, fields = folder_sample(self.root, self.paths[index], index, int(self.labels[index]))
            yield key, self.paths[index], fields

    def _span(self, i: int) -> slice:
        return slice(i * self.shard_size, (i + 1) * self.shard_size)

    def images_in(self, shards: list[int]) -> int:
        return sum(len(self.paths[self._span(i)]) for i in shards)

    def shard_streams(self, todo, args, size, device, local_processes, step):
        chunks = {i: list(batches(self.paths[self._span(i)], args.batch_size)) for i in todo}
        stream = read_batches(args, [chunk for i in todo for chunk in chunks[i]], size, device, local_processes,
                              crop=PROTOCOL_CROPS[args.protocol], step=step)
        for i in todo:
            yield i, self.paths[self._span(i)], self.labels[self._span(i)], itertools.islice(stream, len(chunks[i]))
        stream.close()  # the readers end and the model's threads are given back


class TarInput:
    """Webdataset tar shards (stage1/data/tar_shards.py): shard i of the codes is tar shard i, read when its turn comes,
    so a resumed run skips finished tars without opening them; class ids from each sample's `cls`, or for plain tars
    of class folders from their member paths (then `classes` names them, as ImageFolder's)."""

    def __init__(self, spec: str):
        self.urls = shard_urls(spec)
        self.num_shards = len(self.urls)
        self.folders = folder_classes(self.urls)
        self.classes = self.folders.names if self.folders else None

    def local_paths(self) -> list[str]:
        return [url for url in self.urls if os.path.isfile(url)]

    def record(self) -> dict:
        local = [os.path.getsize(url) if os.path.isfile(url) else None for url in self.urls]
        return {"tar_shards": len(self.urls),
                "listing": hashlib.sha256(json.dumps([self.urls, local]).encode()).hexdigest()}

    def images_in(self, shards: list[int]) -> None:
        return None  # unknown until read

    def sample_fields(self, i: int):
        """Tar shard i's samples, every field as it came: (key, name, fields)."""
        return read_sample_fields(self.urls[i])

    def shard_streams(self, todo, args, size, device, local_processes, step):
        for i in todo:
            samples, stream = tar_batches(args, self.urls[i], size, device, local_processes,
                                          crop=PROTOCOL_CROPS[args.protocol], step=step, classes=self.folders)
            yield i, [sample.name for sample in samples], [sample.label for sample in samples], stream


def _check_apart(paths: list[str], out: str, what: str) -> None:
    """An input inside --out would be overwritten by an export or removed by --restart."""
    out = os.path.realpath(out)
    inside = [p for p in paths if os.path.commonpath([out, os.path.realpath(p)]) == out]
    if inside:
        raise CLIError(f"{what} {inside[0]} lies inside --out {out}, whose exports and --restart would overwrite or "
                       f"remove it: tokenize into another folder")


def _check_or_write_run_record(out: str, record: dict, restart: bool) -> None:
    """Reuse finished shards only for the same tokenization; --restart removes another one's files first. Shards
    without a record (a --restart killed while removing them, or a record deleted) are another tokenization's too."""
    path = os.path.join(out, RUN_FILE)
    if os.path.isfile(path):
        previous = read_json(path)
        differ = sorted(k for k in {*record, *(previous if isinstance(previous, dict) else {})}
                        if not isinstance(previous, dict) or previous.get(k) != record.get(k))
    else:
        shards = any(name.startswith("shard-") for name in os.listdir(out))
        differ = ["no record of the tokenization (tokenize_run.json)"] if shards else []
    if differ and not restart:
        raise CLIError(f"{out} holds shards of another tokenization (it differs in {differ}: a different image "
                       f"listing, model weights or options); use an empty --out, or --restart to discard them")
    if differ:
        names = sorted(os.listdir(out), key=lambda name: name != RUN_FILE)  # the record first: a kill leaves none
        for name in names:
            if name == RUN_FILE or name == MANIFEST or name.startswith("shard-"):
                os.remove(os.path.join(out, name))
        remove_exports(out)
        print(f"--restart: removed the shards and exports of another tokenization from {out}")
    if not os.path.isfile(path):
        write_json(path, record)


def main(argv=None) -> int:
    return launch("tokenize", argv)


if __name__ == "__main__":
    raise SystemExit(main())
