"""The work of vqrae-decode (its flags and help text: stage1/cli/arguments.py)."""

from __future__ import annotations

import itertools
import os

import numpy as np
import torch
from tqdm import tqdm

from ..base.precision import autocast
from ..data.images import save_png
from ..data.token_shards import Manifest, read_manifest, shard_rows
from .arguments import launch
from .common import CLIError, batches, check_output, load_model


def inside(folder: str, relative: str) -> str | None:
    """folder/relative if it stays inside folder (no absolute path, no '..' out of it), else None."""
    root = os.path.realpath(folder)
    target = os.path.realpath(os.path.join(root, relative))
    return target if relative and not os.path.isabs(relative) and target.startswith(root + os.sep) else None


def _parents(folder: str, root: str):
    """The folders from `folder` up to (not including) `root`'s real path."""
    root = os.path.realpath(root)
    while folder != root and len(folder) > len(root):
        yield folder
        folder = os.path.dirname(folder)


def check_model_fits(model, manifest: Manifest) -> None:
    layout, k = model.layout, model.layout.vocab_size
    if manifest.codebook_size != k:
        raise CLIError(f"the shards use a codebook of {manifest.codebook_size} codes, the model has {k}: "
                       f"decode with the model that made them ({manifest.model})")
    grid = (model.grid_size,) * 2 if model.grid_size else None
    if grid is not None and manifest.grid_shape != grid:
        raise CLIError(f"the shards hold {list(manifest.grid_shape)} code grids, the model makes {list(grid)}: "
                       f"decode with the model that made them ({manifest.model})")
    scales = list(layout.scales) if layout.scales else None
    if manifest.scales != scales:
        def codes(sides):
            return f"multi-scale codes (scales {sides})" if sides else "one code grid (no scales)"

        raise CLIError(f"the shards hold {codes(manifest.scales)}, the model makes {codes(scales)}: "
                       f"decode with the model that made them ({manifest.model})")
    codes, per_position = manifest.index_shape[2:], list(layout.position_shape)
    if not scales and codes != per_position:
        raise CLIError(f"the shards hold {codes or [1]} code(s) per token, the model's quantizer makes "
                       f"{per_position or [1]}: decode with the model that made them ({manifest.model})")


def run(args) -> int:
    check_output(args.out, folder=True)
    manifest = read_manifest(args.tokens)
    model = load_model(args, needs_codes=True)
    check_model_fits(model, manifest)
    device = next(model.decoder.parameters()).device
    size = manifest.image_size
    entries = manifest.images
    # Manifests are exchanged files: every image path must land inside --out and every shard inside --tokens.
    targets = [inside(args.out, os.path.splitext(entry["path"])[0] + ".png") for entry in entries]
    escaping = [e["path"] for e, t in zip(entries, targets, strict=True) if t is None]
    if escaping:
        raise CLIError(f"the manifest names paths outside the output folder: {escaping[:3]}; refusing to write "
                       f"there")
    if len(set(targets)) != len(targets):
        raise CLIError("two images differ only in their extension (e.g. a.jpg and a.png): their PNGs would collide")
    folders = {os.path.dirname(t) for t in targets}  # every folder a PNG goes in, and the folders above it
    folders |= {parent for folder in folders for parent in _parents(folder, args.out)}
    clash = sorted(folders & set(targets))
    if clash:
        raise CLIError(f"the manifest names {clash[0]!r} both as an image's PNG and as a folder of others (a.jpg "
                       f"and a.png/b.jpg): they cannot both be written")
    long = [t for t in targets if any(len(os.fsencode(part)) > 255 for part in t.split(os.sep))]
    if long:
        raise CLIError(f"the manifest names a path with a part longer than 255 bytes, which no file system takes: "
                       f"{long[0][:300]!r}")
    rows = shard_rows(args.tokens, entries)
    with torch.no_grad():
        for chunk_targets in tqdm(list(batches(targets, args.batch_size)), desc="decode", unit="batch"):
            codes = []
            for row in itertools.islice(rows, len(chunk_targets)):
                row = row[0] if manifest.views > 1 else row  # an augmented tokenization: the first view
                codes.append(torch.from_numpy(row.astype(np.int64)))
            with autocast(device, args.precision):
                images = model.decode_from_indices(torch.stack(codes).to(device), output_size=(size, size))
            for target, image in zip(chunk_targets, images.float().cpu(), strict=True):
                save_png(image, target)
    print(f"decoded {len(entries)} image(s) of {size}x{size} into {args.out}")
    return 0


def main(argv=None) -> int:
    return launch("decode", argv)


if __name__ == "__main__":
    raise SystemExit(main())
