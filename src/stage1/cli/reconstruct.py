"""The work of vqrae-reconstruct (its flags and help text: stage1/cli/arguments.py)."""

from __future__ import annotations

import os

import torch
from tqdm import tqdm

from ..base.precision import autocast
from ..data.images import psnr, save_png
from .arguments import launch
from .common import (
    CLIError,
    batches,
    check_output,
    load_model,
    model_image_size,
    prepare,
)


def run(args) -> int:
    check_output(args.out, folder=False)
    missing = [p for p in args.image if not os.path.isfile(p)]
    if missing:
        raise CLIError(f"image file(s) not found: {', '.join(missing)}")
    model = load_model(args)
    device = next(model.decoder.parameters()).device
    size = model_image_size(model, args.image_size)
    prepared = [prepare(p, size) for p in args.image]  # every file is read before any work or output
    for path, (_, note) in zip(args.image, prepared, strict=True):
        print(f"{path}: {note}")
    originals = torch.stack([pixels for pixels, _ in prepared])
    reconstructions = []
    with torch.no_grad():
        for chunk in tqdm(list(batches(originals, args.batch_size)), desc="reconstruct", unit="batch",
                          disable=len(originals) <= args.batch_size):
            x = chunk.to(device)
            with autocast(device, args.precision):
                reconstructions.append(model.reconstruct(x, output_size=(size, size))[0].float().cpu())
    reconstructions = torch.cat(reconstructions)
    for path, score in zip(args.image, psnr(reconstructions, originals).tolist(), strict=True):
        print(f"{path}: PSNR {score:.2f} dB")
    pairs = torch.stack([originals, reconstructions], dim=1).flatten(0, 1)  # o1 r1 o2 r2 ...
    save_png(pairs, args.out, nrow=2, padding=2)
    print(f"wrote {args.out} ({len(originals)} row(s) of original | reconstruction, {size}x{size} each)")
    return 0


def main(argv=None) -> int:
    return launch("reconstruct", argv)


if __name__ == "__main__":
    raise SystemExit(main())
