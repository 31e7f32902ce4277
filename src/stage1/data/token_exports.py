"""vqrae-tokenize's codes in the layouts downstream trainers read, written from its finished shards.

  shards    (always) OUT/shard-*.npy + manifest.json: the resumable store every other layout is made from.
  llamagen  OUT/llamagen/imagenet{S}_codes/{i}.npy of shape (1, views, h * w) and imagenet{S}_labels/{i}.npy of
            shape (1,), as LlamaGen's extract_codes_c2i.py writes them and its c2i trainer reads them (--code-path
            OUT/llamagen --image-size S --downsample-size D, S / D = h: `llamagen_arguments`); views are the image
            itself without augmentation, else its flips or crops, and the folder is OUT/llamagen_flip (LlamaGen
            picks one view per sample only when its --code-path holds "flip").
  jsonl     OUT/tokens.jsonl: one {"image", "class_id", "tokens"} object per line (TiTok / RAR style), tokens the
            row-major code grid as a flat list (a list per view when augmented).
  maskgit   Halton-MaskGIT's layout (valeoai/Halton-MaskGIT, extract_vq_features.py): ROOT/Train/ or ROOT/Eval/
            (--split train | eval; ROOT: --maskgit-root, default OUT/maskgit, which both splits' runs may share),
            one file per view 0000000.pth, 0000001.pth, ... holding a pickle of {"code": (h, w) uint16 (int32 past
            65536 codes, which its loader also takes), "y": class id}, and ROOT/classes.json (the class names, the
            same for both splits). Pickles are written for a reader that chose them; vqrae never reads them back.
  wds       OUT/wds/000000.tar, ...: webdataset shards, tar i holding the samples of input shard i that were tokenized,
            every field as it came (the image, a caption `txt`, `json`, ...; from an image folder: the image, path.txt
            and cls, as vqrae-make-shards writes them) and `vq_feat.npy`, the codes (np.save, int64), as
            Halton-MaskGIT's text-to-image loader reads them beside the image and caption. One view per image.
  memmap    OUT/codes.npy, one array (N[, views], h, w[, L]) to open with np.load(mmap_mode="r"), OUT/labels.npy
            (N,) int64 and OUT/codes_index.json (the image of each row).
Residual / grouped codes keep their last axis L in every layout. Multi-scale codes are VAR's flat (L,) per view
(jsonl's tokens, memmap's last axis; codes_index.json and the manifest give the `scales` they split into);
LlamaGen's layout is refused for them. Class ids are ImageFolder's (sorted top-level
folders; -1 for an image in the root folder). Every file is written atomically; rerunning rewrites the export.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import pickle
import shutil
import tarfile
from collections.abc import Callable, Iterable

import numpy as np

from ..base.atomic import atomic_path, read_json, remove_leftovers, write_json, write_npy
from .tar_shards import write_sample
from .token_shards import Manifest, read_codes, shard_name, shard_rows

FORMATS = ("shards", "llamagen", "jsonl", "maskgit", "wds", "memmap")
MULTISCALE_LLAMAGEN = ("LlamaGen's GPT predicts one code per grid position; multi-scale codes are VAR's next-scale "
                       "tokens (stage1.VARTokenizer): use --format shards, jsonl or memmap")
# LlamaGen's c2i trainer and samplers: --image-size and --downsample-size choices (its GPT has (S / D)^2 positions).
LLAMAGEN_IMAGE_SIZES = (256, 384, 448, 512)
LLAMAGEN_DOWNSAMPLE_SIZES = (16, 8)  # its default first


def llamagen_arguments(out: str, grid_shape, image_size: int, views: int, per_token: int,
                       scales: list[int] | None = None) -> dict:
    """LlamaGen's --code-path, --image-size and --downsample-size for an export of this grid, or one ValueError
    saying why LlamaGen cannot take it. Of two sizes with the same grid, the tokenized size, else downsample 16."""
    h, w = grid_shape
    if scales:
        raise ValueError(MULTISCALE_LLAMAGEN)
    if per_token > 1:
        raise ValueError(f"LlamaGen's GPT predicts one code per position; these codes have {per_token} per position "
                         f"(a residual / grouped codebook): use --format jsonl, memmap or shards")
    pairs = [(size, down) for down in LLAMAGEN_DOWNSAMPLE_SIZES for size in LLAMAGEN_IMAGE_SIZES
             if size // down == h and size % down == 0]
    if h != w or not pairs:
        sides = sorted({size // down for size in LLAMAGEN_IMAGE_SIZES for down in LLAMAGEN_DOWNSAMPLE_SIZES})
        raise ValueError(f"LlamaGen takes square code grids of side {sides} (--image-size {LLAMAGEN_IMAGE_SIZES} / "
                         f"--downsample-size {LLAMAGEN_DOWNSAMPLE_SIZES}), this model gives {h}x{w}: pick an image "
                         f"size (--image-size, or the model's encoder_input_size) whose grid is one of them, e.g. "
                         f"DINOv2 (patch 14) at 224 / 336 / 448 px gives 16 / 24 / 32")
    size, down = next((pair for pair in pairs if pair[0] == image_size), pairs[0])
    return {"code_path": os.path.join(out, "llamagen" if views == 1 else "llamagen_flip"), "image_size": size,
            "downsample_size": down}


IMAGENET_TRAIN_IMAGES = 1281167  # LlamaGen's CustomDataset's hardcoded length


def llamagen_advice(manifest: Manifest, out: str) -> str:
    """The flags of LlamaGen's train_c2i.py for this export, and what else its trainer needs."""
    arguments = llamagen_arguments(out, manifest.grid_shape, manifest.image_size, manifest.views,
                                   _codes_per_token(manifest), manifest.scales)
    labels = [entry.get("label", -1) for entry in manifest.images]
    classes = len(manifest.classes) if manifest.classes else max(labels, default=-1) + 1
    advice = (f"LlamaGen: train_c2i.py --code-path {arguments['code_path']} --image-size {arguments['image_size']} "
              f"--downsample-size {arguments['downsample_size']} --vocab-size {manifest.codebook_size} "
              f"--num-classes {classes}")
    if manifest.image_size != arguments["image_size"]:
        advice += (f"; these are codes of {manifest.image_size} px crops, LlamaGen's extract_codes_c2i.py crops at "
                   f"{arguments['image_size']} (its codes exactly: --image-size {arguments['image_size']} "
                   f"--protocol adm)")
    if manifest.num_images != IMAGENET_TRAIN_IMAGES:
        advice += (f"; its dataset/imagenet.py hardcodes ImageNet's {IMAGENET_TRAIN_IMAGES} files: for these "
                   f"{manifest.num_images}, use the commented sorted(os.listdir(...)) lines there instead")
    return advice


# What the layouts write inside OUT (maskgit: its default --maskgit-root): a tokenization's own, discarded with it.
EXPORTED_FOLDERS = ("llamagen", "llamagen_flip", "maskgit", "wds")
EXPORTED_FILES = ("tokens.jsonl", "codes.npy", "labels.npy", "codes_index.json")


def remove_exports(out: str) -> None:
    """Every layout written inside `out`, for --restart: they are the discarded tokenization's (a maskgit root given
    elsewhere is shared with the other split's run, and stays)."""
    for name in EXPORTED_FOLDERS:
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    for name in EXPORTED_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out, name))


def remove_numbered(folder: str, suffix: str, count: int) -> None:
    """An export folder's files ending in `suffix` other than the `count` just written, numbered from 0 (a rerun over a
    larger export: the downstream loaders list the folder, so they would read them)."""
    for path in glob.glob(os.path.join(folder, f"*{suffix}")):
        name = os.path.basename(path)[: -len(suffix)]
        if not (name.isdigit() and int(name) < count):
            os.remove(path)
    remove_leftovers(folder)  # a killed writer's temporary files, which a loader listing the folder would read


def check_labels(labels, reader: str = "LlamaGen") -> None:
    """LlamaGen's and MaskGIT's class embeddings take ids 0..num_classes-1; -1 (an image without a class) fails on
    the GPU."""
    missing = int((np.asarray(labels) < 0).sum())
    if missing:
        raise ValueError(f"{missing} image(s) have no class (label -1: outside the class folders of --data, or tar "
                         f"samples without a cls field or class folder), which {reader}'s class embedding cannot "
                         f"take: put every image in a class folder, or use --format jsonl / memmap / shards")


# ---- Halton-MaskGIT ---------------------------------------------------------------------------------------------
MASKGIT_SPLITS = {"train": "Train", "eval": "Eval"}  # its extract_vq_features.py's folders, which its loader reads
MASKGIT_SAMPLER_CLASSES = 1000  # its samplers' default labels (during training too) reach class 999
MASKGIT_CLASSES = "classes.json"  # beside Train/ and Eval/: the class names both splits' ids count
MASKGIT_UINT16_CODES = 2**16  # its extractor's uint16; its loader casts to int32, so wider codes go as int32


def maskgit_arguments(grid_shape, image_size: int, per_token: int, scales, vocab_size: int) -> dict:
    """Halton-MaskGIT's --img-size, --f-factor, --codebook-size and --mask-value for codes of this layout, or one
    ValueError saying why its transformer cannot take them. --img-size is the tokenized size when the grid divides
    it (the adapter paints at it), else the grid times 16."""
    if scales:
        raise ValueError("Halton-MaskGIT predicts one code per grid position; multi-scale codes are VAR's next-scale "
                         "tokens (stage1.VARTokenizer): use --format shards, jsonl or memmap")
    if per_token > 1:
        raise ValueError(f"Halton-MaskGIT predicts one code per grid position; these codes have {per_token} per "
                         f"position (a residual / grouped codebook): use --format jsonl, memmap or shards")
    h, w = grid_shape
    if h != w:
        raise ValueError(f"Halton-MaskGIT's transformer takes square code grids (img_size // f_factor a side), this "
                         f"model gives {h}x{w}: tokenize square images (--image-size)")
    img_size = image_size if image_size % h == 0 else 16 * h
    return {"img_size": img_size, "f_factor": img_size // h, "codebook_size": vocab_size, "mask_value": vocab_size}


def check_maskgit_classes(root: str, classes: list[str] | None) -> None:
    """Both splits' class ids must mean the same classes: these class folders against ROOT/classes.json, which the
    other split's export wrote (nothing to check before the first)."""
    path = os.path.join(root, MASKGIT_CLASSES)
    if not os.path.exists(path):
        return
    written = read_json(path)
    other = written.get("classes") if isinstance(written, dict) else None
    if other != (classes or []):
        raise ValueError(f"{path} lists {len(other) if isinstance(other, list) else 'no'} class folder(s) that differ "
                         f"from these {len(classes or [])}, so the splits' class ids would not agree: give both "
                         f"splits the same class folders, or another --maskgit-root")


class _PortablePickler(pickle.Pickler):
    """Arrays pickled as numpy.ndarray(shape, dtype, bytes): globals every numpy has. numpy 2's own array pickles name
    numpy._core, which the numpy < 1.26 of Halton-MaskGIT's environment cannot import."""

    def reducer_override(self, obj):
        if type(obj) is np.ndarray:
            return np.ndarray, (obj.shape, obj.dtype, np.ascontiguousarray(obj).tobytes())
        return NotImplemented


def write_maskgit(root: str, split: str, codes: np.ndarray, labels: np.ndarray, manifest: Manifest) -> str:
    """ROOT/Train or ROOT/Eval as Halton-MaskGIT's extract_vq_features.py writes it (module docstring); returns the
    split's folder. Each view is a sample of its own; files of an earlier, larger export of the split are removed."""
    check_labels(labels, "Halton-MaskGIT")
    classes = manifest.classes or []
    check_maskgit_classes(root, classes)
    folder = os.path.join(root, MASKGIT_SPLITS[split])
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(root, MASKGIT_CLASSES), {"classes": classes})
    remove_leftovers(root)
    dtype = np.uint16 if manifest.codebook_size <= MASKGIT_UINT16_CODES else np.int32
    views = codes.reshape(-1, *manifest.grid_shape)  # (images * views, h, w), each image's views in turn
    for i, (code, label) in enumerate(zip(views, np.repeat(labels, manifest.views), strict=True)):
        with atomic_path(os.path.join(folder, f"{i:07d}.pth")) as tmp, open(tmp, "wb") as f:
            _PortablePickler(f, protocol=4).dump({"code": code.astype(dtype), "y": int(label)})
    remove_numbered(folder, ".pth", len(views))
    return folder


def maskgit_advice(manifest: Manifest, root: str) -> str:
    """The flags of Halton-MaskGIT's main.py for this export, and what else its trainer needs."""
    arguments = maskgit_arguments(manifest.grid_shape, manifest.image_size, _codes_per_token(manifest),
                                  manifest.scales, manifest.codebook_size)
    classes = len(manifest.classes) if manifest.classes else 1
    return (f"Halton-MaskGIT: main.py --mode cls-to-img --data imagenet_feat --data-folder {root.rstrip('/')}/ "
            f"--vqgan-folder {manifest.model} --img-size {arguments['img_size']} --f-factor {arguments['f_factor']} "
            f"--codebook-size {arguments['codebook_size']} --mask-value {arguments['mask_value']} "
            f"--nb-class {max(classes, MASKGIT_SAMPLER_CLASSES)}, run through scripts/halton_maskgit.py (its "
            f"trainer builds LlamaGen's tokenizer; the script puts this model there). Its loader drops the last "
            f"partial batch: Train and Eval each need at least --global-bsize files; --nb-class is at least "
            f"{MASKGIT_SAMPLER_CLASSES} because its samplers' default labels reach class {MASKGIT_SAMPLER_CLASSES - 1} "
            f"({classes} class(es) here)")


def _codes_per_token(manifest: Manifest) -> int:
    """L of residual / grouped codes (their last axis), 1 otherwise."""
    return int(np.prod(manifest.index_shape[2:], dtype=np.int64))


def flat_views(code: np.ndarray, views: int, per_token: int) -> np.ndarray:
    """One image's codes as (views, h * w[, L]): each view's grid in row-major order."""
    return code.reshape(views, -1, per_token) if per_token > 1 else code.reshape(views, -1)


# ---- webdataset with codes -------------------------------------------------------------------------------------
WDS_CODES_FIELD = "vq_feat.npy"  # Halton-MaskGIT's text-to-image loader's name for a sample's codes
WDS_ONE_VIEW = ("--format wds writes the codes of each image beside it, one view; --augment's views go to the "
                "llamagen, jsonl or memmap layouts")
SampleFields = Callable[[int], Iterable[tuple[str, str, dict[str, bytes]]]]  # shard i -> (key, name, fields)


def write_wds(tokens: str, manifest: Manifest, sample_fields: SampleFields) -> str:
    """OUT/wds/{i:06d}.tar for each input shard i (module docstring): its tokenized samples, found by name in the
    manifest, each with its fields as `sample_fields(i)` gives them and the codes beside them. Tars of an earlier
    export past the last shard are removed."""
    if manifest.views != 1:
        raise ValueError(WDS_ONE_VIEW)
    folder = os.path.join(tokens, "wds")
    os.makedirs(folder, exist_ok=True)
    by_shard: dict[str, dict[str, dict]] = {}
    for entry in manifest.images:
        by_shard.setdefault(entry["shard"], {})[entry["path"]] = entry
    for i in range(manifest.num_shards):
        entries = by_shard.get(f"{shard_name(i)}.npy", {})
        codes = dict(zip(entries, shard_rows(tokens, list(entries.values())), strict=True))
        with atomic_path(os.path.join(folder, f"{i:06d}.tar")) as tmp, tarfile.open(tmp, "w") as tar:
            for key, name, fields in sample_fields(i):
                if name in codes:
                    array = io.BytesIO()
                    np.save(array, codes[name].astype(np.int64), allow_pickle=False)
                    write_sample(tar, key, {**fields, WDS_CODES_FIELD: array.getvalue()})
    remove_numbered(folder, ".tar", manifest.num_shards)
    return folder


def export_tokens(fmt: str, tokens: str, manifest: Manifest, split: str = "train",
                  maskgit_root: str | None = None, sample_fields: SampleFields | None = None) -> str:
    """Write the `fmt` layout of a finished tokenization in folder `tokens` (maskgit: the `split` folder under
    `maskgit_root`, default tokens/maskgit; wds: from the input's samples, `sample_fields`); returns where it went."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "shards":
        return os.path.join(tokens, "manifest.json")
    if fmt == "wds":
        return write_wds(tokens, manifest, sample_fields)
    codes, labels = read_codes(tokens, manifest)
    views, per_token = manifest.views, _codes_per_token(manifest)
    if fmt == "llamagen":
        arguments = llamagen_arguments(tokens, manifest.grid_shape, manifest.image_size, views, per_token,
                                       manifest.scales)
        check_labels(labels)
        root, size = arguments["code_path"], arguments["image_size"]
        code_dir, label_dir = (os.path.join(root, f"imagenet{size}_{kind}") for kind in ("codes", "labels"))
        os.makedirs(code_dir, exist_ok=True)
        os.makedirs(label_dir, exist_ok=True)
        for i, (code, label) in enumerate(zip(codes, labels, strict=True)):
            write_npy(os.path.join(code_dir, f"{i}.npy"), flat_views(code, views, per_token)[None].astype(np.int64))
            write_npy(os.path.join(label_dir, f"{i}.npy"), np.array([label], dtype=np.int64))
        for folder in (code_dir, label_dir):  # LlamaGen lists the folders: an earlier, larger export's files go
            remove_numbered(folder, ".npy", len(codes))
        return root
    if fmt == "maskgit":
        maskgit_arguments(manifest.grid_shape, manifest.image_size, per_token, manifest.scales, manifest.codebook_size)
        return write_maskgit(maskgit_root or os.path.join(tokens, "maskgit"), split, codes, labels, manifest)
    if fmt == "jsonl":
        path = os.path.join(tokens, "tokens.jsonl")
        with atomic_path(path) as tmp, open(tmp, "w") as f:
            for entry, code, label in zip(manifest.images, codes, labels, strict=True):
                flat = flat_views(code, views, per_token)
                line = {"image": entry["path"], "class_id": int(label),
                        "tokens": flat.tolist() if views > 1 else flat[0].tolist()}
                f.write(json.dumps(line) + "\n")
        return path
    path = os.path.join(tokens, "codes.npy")
    with atomic_path(path) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=codes.dtype, shape=codes.shape)
        array[...] = codes
        array.flush()
        del array
    write_npy(os.path.join(tokens, "labels.npy"), labels)
    write_json(os.path.join(tokens, "codes_index.json"), {"images": [e["path"] for e in manifest.images],
                                                          "classes": manifest.classes, "scales": manifest.scales})
    return path
