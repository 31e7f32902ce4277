"""vqrae-tokenize's codes in the layouts downstream trainers read, written from its finished shards.

  shards    (always) OUT/shard-*.npy + manifest.json: the resumable store every other layout is made from.
  llamagen  OUT/llamagen/imagenet{S}_codes/{i}.npy of shape (1, views, h * w) and imagenet{S}_labels/{i}.npy of
            shape (1,), as LlamaGen's extract_codes_c2i.py writes them and its c2i trainer reads them (--code-path
            OUT/llamagen --image-size S --downsample-size D, S / D = h: `llamagen_arguments`); views are the image
            itself without augmentation, else its flips or crops, and the folder is OUT/llamagen_flip (LlamaGen
            picks one view per sample only when its --code-path holds "flip").
  jsonl     OUT/tokens.jsonl: one {"image", "class_id", "tokens"} object per line (TiTok / RAR style), tokens the
            row-major code grid as a flat list (a list per view when augmented).
  memmap    OUT/codes.npy, one array (N[, views], h, w[, L]) to open with np.load(mmap_mode="r"), OUT/labels.npy
            (N,) int64 and OUT/codes_index.json (the image of each row).
Residual / grouped codes keep their last axis L in every layout. Multi-scale codes are VAR's flat (L,) per view
(jsonl's tokens, memmap's last axis; codes_index.json and the manifest give the `scales` they split into);
LlamaGen's layout is refused for them. Class ids are ImageFolder's (sorted top-level
folders; -1 for an image in the root folder). Every file is written atomically; rerunning rewrites the export.
"""

from __future__ import annotations

import json
import os

import numpy as np

from ..base.atomic import atomic_path, write_json, write_npy
from .token_shards import Manifest, read_codes

FORMATS = ("shards", "llamagen", "jsonl", "memmap")
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


def check_llamagen_labels(labels) -> None:
    """LlamaGen's class embedding takes ids 0..num_classes-1; -1 (an image without a class) fails on the GPU."""
    missing = int((np.asarray(labels) < 0).sum())
    if missing:
        raise ValueError(f"{missing} image(s) have no class (label -1: outside the class folders of --data, or tar "
                         f"samples without a cls field or class folder), which LlamaGen's class embedding cannot "
                         f"take: put every image in a class folder, or use --format jsonl / memmap / shards")


def _codes_per_token(manifest: Manifest) -> int:
    """L of residual / grouped codes (their last axis), 1 otherwise."""
    return int(np.prod(manifest.index_shape[2:], dtype=np.int64))


def flat_views(code: np.ndarray, views: int, per_token: int) -> np.ndarray:
    """One image's codes as (views, h * w[, L]): each view's grid in row-major order."""
    return code.reshape(views, -1, per_token) if per_token > 1 else code.reshape(views, -1)


def export_tokens(fmt: str, tokens: str, manifest: Manifest) -> str:
    """Write the `fmt` layout of a finished tokenization in folder `tokens`; returns where it went."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "shards":
        return os.path.join(tokens, "manifest.json")
    codes, labels = read_codes(tokens, manifest)
    views, per_token = manifest.views, _codes_per_token(manifest)
    if fmt == "llamagen":
        arguments = llamagen_arguments(tokens, manifest.grid_shape, manifest.image_size, views, per_token,
                                       manifest.scales)
        check_llamagen_labels(labels)
        root, size = arguments["code_path"], arguments["image_size"]
        code_dir, label_dir = (os.path.join(root, f"imagenet{size}_{kind}") for kind in ("codes", "labels"))
        os.makedirs(code_dir, exist_ok=True)
        os.makedirs(label_dir, exist_ok=True)
        for i, (code, label) in enumerate(zip(codes, labels, strict=True)):
            write_npy(os.path.join(code_dir, f"{i}.npy"), flat_views(code, views, per_token)[None].astype(np.int64))
            write_npy(os.path.join(label_dir, f"{i}.npy"), np.array([label], dtype=np.int64))
        return root
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
