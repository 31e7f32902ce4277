"""vqrae-tokenize's codes in the layouts downstream trainers read, written from its finished shards.

  shards    (always) OUT/shard-*.npy + manifest.json: the resumable store every other layout is made from.
  llamagen  OUT/llamagen/imagenet{size}_codes/{i}.npy of shape (1, views, h * w) and imagenet{size}_labels/{i}.npy
            of shape (1,), as LlamaGen's extract_codes_c2i.py writes them and its c2i trainer reads them
            (--code-path OUT/llamagen); views are the image itself without augmentation, else its flips or crops.
  jsonl     OUT/tokens.jsonl: one {"image", "class_id", "tokens"} object per line (TiTok / RAR style), tokens the
            row-major code grid as a flat list (a list per view when augmented).
  memmap    OUT/codes.npy, one array (N[, views], h, w[, L]) to open with np.load(mmap_mode="r"), OUT/labels.npy
            (N,) int64 and OUT/codes_index.json (the image of each row).
Residual / grouped codes keep their last axis L in every layout. Class ids are ImageFolder's (sorted top-level
folders; -1 for an image in the root folder). Every file is written atomically; rerunning rewrites the export.
"""

from __future__ import annotations

import json
import os

import numpy as np

from ..base.atomic import atomic_path, write_json, write_npy
from .token_shards import Manifest, read_codes

FORMATS = ("shards", "llamagen", "jsonl", "memmap")


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
    views, per_token = manifest.views, int(np.prod(manifest.index_shape[2:], dtype=np.int64))
    if fmt == "llamagen":
        root = os.path.join(tokens, "llamagen")
        size = manifest.image_size
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
                                                          "classes": manifest.classes})
    return path
