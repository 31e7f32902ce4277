"""vqrae-tokenize's output folder, one owner: the code shards, their listings, the manifest that ties them together,
and reading them back (vqrae-decode, the token exports).

    OUT/shard-00000.npy    codes of the shard's readable images: (n, h, w[, L]), or (n, views, h, w[, L]);
                           multi-scale: VAR's flat (n[, views], L), the manifest's `scales` saying how they split
    OUT/shard-00000.json   {"images", "labels", "skipped"} of that shard; written last, so it marks the shard done
    OUT/manifest.json      the Manifest below: every image's shard and row, the model, the code layout
    OUT/tokenize_run.json  what the shards were made with (vqrae-tokenize resumes only the same tokenization)

A manifest is an exchanged file: `read_manifest` checks every field's type, every entry, and every entry against
the shard it names (inside the folder, its row present, the shard's layout the manifest's, its codes inside the
codebook) before anything is read from the shards or written elsewhere.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ..base.atomic import read_json, write_json, write_npy
from ..base.config_section import ConfigError, ConfigSection
from ..base.limits import MAX_CODES, MAX_IMAGE_SIDE

MANIFEST = "manifest.json"
RUN_FILE = "tokenize_run.json"


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def shard_done(folder: str, i: int) -> bool:
    return all(os.path.isfile(os.path.join(folder, shard_name(i) + ext)) for ext in (".npy", ".json"))


def write_shard(folder: str, i: int, codes: np.ndarray, images: list[str], labels: list[int],
                skipped: list[dict]) -> None:
    """Shard i's codes, then its listing (last: a shard counts as done only when its listing exists)."""
    write_npy(os.path.join(folder, shard_name(i) + ".npy"), codes)
    write_json(os.path.join(folder, shard_name(i) + ".json"), {"images": images, "labels": labels,
                                                               "skipped": skipped})


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class Manifest(ConfigSection):
    section = "manifest"
    model: str  # the model that made the codes
    encoder: str
    codebook_size: int
    grid_shape: tuple[int, int]
    index_shape: list[int]  # per view: the grid, then the codes per token of residual / grouped kinds
    views: int  # code grids per image (--augment); a shard row is (views, *index_shape) when above 1
    augment: str
    classes: list[str] | None  # ImageFolder's: each image's label indexes it (-1: no class); null for tar shards
    image_size: int
    dtype: str
    num_images: int
    num_shards: int
    images: list[dict]  # {"path", "shard", "row", "label"} per image, in shard order
    skipped: list[dict]  # {"path", "reason"} per unreadable image
    scales: list[int] | None = None  # multi-scale codes: the scales' sides (index_shape is [L], their codes' count)

    def check(self):
        self.require_positive("views")
        self.require_at_most(MAX_CODES, "codebook_size")
        self.require_at_most(MAX_IMAGE_SIDE, "image_size")
        if self.scales is not None:
            sides = self.scales
            self.require(bool(sides) and all(_is_int(s) and 0 < s <= MAX_IMAGE_SIDE for s in sides)
                         and sides == sorted(set(sides)) and list(self.grid_shape) == [sides[-1]] * 2
                         and self.index_shape == [sum(s * s for s in sides)], "scales",
                         f"increasing sides, the last the grid's {list(self.grid_shape)}, whose codes are "
                         f"index_shape {self.index_shape}")
        else:
            self.require(len(self.index_shape) in (2, 3) and all(_is_int(n) and n > 0 for n in self.index_shape)
                         and list(self.grid_shape) == self.index_shape[:2], "index_shape",
                         f"the grid {list(self.grid_shape)} and at most one codes-per-token axis, positive integers")
        self.require(self.num_images == len(self.images), "num_images", f"the number of images ({len(self.images)})")
        self.require(self.dtype in ("uint8", "uint16", "int16", "int32", "int64"), "dtype", "an integer type")
        for entry in self.images:
            if not (isinstance(entry, dict) and isinstance(entry.get("path"), str) and entry["path"]
                    and isinstance(entry.get("shard"), str) and _is_int(entry.get("row")) and entry["row"] >= 0
                    and _is_int(entry.get("label", -1))):
                raise ConfigError(f"manifest.images holds a bad entry {str(entry)[:200]}: expected "
                                  f"{{'path': str, 'shard': str, 'row': int >= 0, 'label': int}}")


def read_manifest(folder: str) -> Manifest:
    """The manifest of a finished tokenization, checked field by field and against the shards it names."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no {MANIFEST}: not a finished vqrae-tokenize output")
    try:
        manifest = Manifest.from_dict(read_json(path))
    except ConfigError as err:
        raise ValueError(f"{path} is not a vqrae-tokenize manifest: {err}") from None
    check_against_shards(folder, manifest, path)
    return manifest


def check_against_shards(folder: str, manifest: Manifest, path: str) -> None:
    """Every entry against its shard: the shard inside the folder, of the manifest's row shape and dtype, every code
    inside the codebook, every row there; every label a class of the manifest's (or -1). `path` names the manifest in
    errors."""
    row_shape = (*([manifest.views] if manifest.views > 1 else []), *manifest.index_shape)
    rows = {}
    for name in {entry["shard"] for entry in manifest.images}:
        if os.path.basename(name) != name or not name.endswith(".npy"):
            raise ValueError(f"{path} names a shard outside its folder: {name!r}; refusing to read it")
        shard = _open_shard(os.path.join(folder, name))
        if shard.shape[1:] != row_shape or str(shard.dtype) != manifest.dtype:
            raise ValueError(f"{name} holds {shard.dtype} rows of shape {list(shard.shape[1:])}, the manifest says "
                             f"{manifest.dtype} rows of {list(row_shape)}")
        if shard.size and not 0 <= shard.min() <= shard.max() < manifest.codebook_size:  # one pass over the map
            raise ValueError(f"{name} holds codes from {shard.min()} to {shard.max()}, outside the manifest's "
                             f"codebook of {manifest.codebook_size}")
        rows[name] = shard.shape[0]
    beyond = [e for e in manifest.images if e["row"] >= rows[e["shard"]]]
    if beyond:
        e = beyond[0]
        raise ValueError(f"{path}: {e['path']} is row {e['row']} of {e['shard']}, which holds {rows[e['shard']]} "
                         f"rows ({len(beyond)} such entries)")
    classes = len(manifest.classes) if manifest.classes is not None else None
    odd = [e for e in manifest.images if classes is not None and not -1 <= e.get("label", -1) < classes]
    if odd:
        raise ValueError(f"{path}: {odd[0]['path']} has label {odd[0]['label']}, not one of the {classes} classes "
                         f"(or -1) ({len(odd)} such entries)")


def _open_shard(path: str) -> np.ndarray:
    """A shard mapped, not read, after its header is checked: integer codes, a shape of plain non-negative integers
    that the file holds exactly. Nothing is allocated from the header."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version not in _HEADER_READERS:
                _refuse(f"an .npy version {version}, which vqrae does not write")
            shape, fortran_order, dtype = _HEADER_READERS[version](f)
            if not all(type(n) is int and n >= 0 for n in shape):
                _refuse(f"a shape {shape} that is not of non-negative integers")
            if dtype.kind not in "iu" or fortran_order:
                _refuse(f"{dtype} {'Fortran-order ' if fortran_order else ''}data where integer codes belong")
            held, declared = os.fstat(f.fileno()).st_size - f.tell(), math.prod(shape) * dtype.itemsize
            if declared != held:
                _refuse(f"a header declaring {declared:,} bytes of codes over {held:,}")
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError, TypeError) as err:  # missing, empty, not .npy, a header numpy cannot parse
        raise ValueError(f"cannot read code shard {path}: {err}") from None


_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _refuse(what: str):
    raise ValueError(f"it holds {what}")


def check_listing(listing, rows: int, path: str) -> None:
    """A shard's listing as write_shard wrote it: its images (names) and labels (ints), one per row of the shard's
    codes, and the skipped images ({"path", "reason"}); a listing edited by hand is one error, never a KeyError."""
    ok = (isinstance(listing, dict) and isinstance(listing.get("images"), list)
          and isinstance(listing.get("labels"), list) and isinstance(listing.get("skipped"), list)
          and all(isinstance(p, str) for p in listing["images"]) and all(_is_int(v) for v in listing["labels"])
          and all(isinstance(s, dict) and isinstance(s.get("path"), str) for s in listing["skipped"]))
    if not ok or len(listing["images"]) != rows or len(listing["labels"]) != rows:
        found = (f"{len(listing['images'])} image(s) and {len(listing['labels'])} label(s)" if ok else
                 "no such listing")
        raise ValueError(f"{path} must list the shard's {rows} image(s), their labels and the skipped images, as "
                         f"vqrae-tokenize wrote it; it holds {found} (edited by hand?): delete it and its .npy to "
                         f"recompute that shard, or rerun with --restart")


def assemble_manifest(folder: str, num_shards: int, fields: dict) -> Manifest:
    """manifest.json from the finished shards' listings and arrays; `fields` give the rest (model, classes, ...)."""
    images, skipped, index_shape, dtype = [], [], None, None
    views = fields["views"]
    for i in range(num_shards):
        listing = read_json(os.path.join(folder, shard_name(i) + ".json"))
        array = _open_shard(os.path.join(folder, shard_name(i) + ".npy"))
        check_listing(listing, array.shape[0], os.path.join(folder, shard_name(i) + ".json"))
        index_shape, dtype = list(array.shape[1 if views == 1 else 2 :]), str(array.dtype)
        images += [{"path": p, "shard": shard_name(i) + ".npy", "row": row, "label": label}
                   for row, (p, label) in enumerate(zip(listing["images"], listing["labels"], strict=True))]
        skipped += listing["skipped"]
    scales = fields.get("scales")
    grid = (scales[-1],) * 2 if scales else tuple(index_shape[:2])
    manifest = Manifest(**fields, grid_shape=grid, index_shape=index_shape, dtype=dtype,
                        num_images=len(images), num_shards=num_shards, images=images, skipped=skipped)
    # Resumed shards are files like any other: checked as a reader of this manifest will check them.
    check_against_shards(folder, manifest, os.path.join(folder, MANIFEST))
    write_json(os.path.join(folder, MANIFEST), manifest.to_dict())
    return manifest


def shard_rows(folder: str, entries: list[dict]) -> Iterator[np.ndarray]:
    """The codes of each manifest entry, in order (each shard loaded once)."""
    shards = {}
    for entry in entries:
        if entry["shard"] not in shards:
            shards[entry["shard"]] = _open_shard(os.path.join(folder, entry["shard"]))
        yield shards[entry["shard"]][entry["row"]]


def read_codes(folder: str, manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """Every image's codes in the manifest's order, (N[, views], h, w[, L]), and their class ids (N,)."""
    rows = list(shard_rows(folder, manifest.images))
    empty = (0, *([manifest.views] if manifest.views > 1 else []), *manifest.index_shape)
    codes = np.stack(rows) if rows else np.zeros(empty, dtype=manifest.dtype)
    return codes, np.array([entry.get("label", -1) for entry in manifest.images], dtype=np.int64)
