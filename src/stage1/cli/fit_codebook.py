"""vqrae-fit-codebook: fit a model's codebook to the latents of an image folder (k-means), and save the model.

    vqrae-fit-codebook --model results/run/final --data /data/train --out fitted/ [--images 20000]
        [--tokens-per-image 64] [--iters 20]
    torchrun --standalone --nproc_per_node=8 -m stage1.cli.fit_codebook --model ... --data ... --out ...

Images are sampled from the folder (a seeded draw of --images), resized and center-cropped to the model's size,
split over ranks; --tokens-per-image random latent tokens of each go into an exact k-means (all ranks together,
stage1/kmeans.py). OUT loads with VQRAE.from_pretrained: the same model with the fitted codebook and its EMA
state (cluster sizes in hits per --batch-size images on every rank), to use as it is or to train on.
OUT/codebook_fit.json records the fit.
"""

from __future__ import annotations

import os

import torch

from .. import distributed
from ..atomic import write_json
from ..codebook_fit import fit_codebook
from ..data import find_images
from ..precision import autocast
from .common import (
    CLIError,
    add_model_args,
    add_runtime_args,
    batches,
    check_output,
    command_parser,
    load_model,
    model_image_size,
    prepare_batch,
    run_cli,
)


def parse(argv):
    parser = command_parser("vqrae-fit-codebook", __doc__)
    add_model_args(parser)
    parser.add_argument("--data", required=True, help="folder of images (searched recursively)")
    parser.add_argument("--out", required=True, help="folder for the model with the fitted codebook")
    parser.add_argument("--images", type=int, default=20000, help="images to sample (all, if the folder has fewer)")
    parser.add_argument("--tokens-per-image", type=int, default=64, help="random latent tokens kept per image")
    parser.add_argument("--iters", type=int, default=20, help="Lloyd iterations")
    parser.add_argument("--seed", type=int, default=0)
    add_runtime_args(parser, batch_size=32)
    return parser.parse_args(argv)


def run(argv=None) -> int:
    args = parse(argv)
    check_output(args.out, folder=True)
    for name in ("images", "tokens_per_image", "batch_size"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.iters < 0:
        raise CLIError(f"--iters must be >= 0, got {args.iters}")
    if os.path.realpath(args.out) == os.path.realpath(args.model):
        raise CLIError("--out must differ from --model: the fitted model is written beside the original, never over it")
    paths = find_images(args.data)
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(args.seed))[: args.images].tolist()
    info = distributed.setup(args.device)
    try:
        model = load_model(args, info.device, needs_codes=True)
        size = model_image_size(model, args.image_size)
        mine = [paths[i] for i in order[info.rank :: info.world_size]]
        skipped = []

        def images():
            for chunk in batches(mine, args.batch_size):
                x, _, chunk_skipped = prepare_batch(args.data, chunk, size)
                skipped.extend(chunk_skipped)
                if x is not None:
                    yield x.to(info.device)

        result = fit_codebook(
            model, images(), args.tokens_per_image, args.iters,
            tokens_per_update=args.batch_size * info.world_size * model.grid_side(size) ** 2, seed=args.seed,
            precision_context=autocast(info.device, args.precision), show_progress=info.is_main,
        )
        if info.is_main:
            model.save_pretrained(args.out)
            record = {"model": str(args.model), "data": str(args.data), "images": len(order), "image_size": size,
                      "tokens": result.tokens, "codebook_size": model.quantizer.num_embeddings,
                      "codebooks": len(result.results), "iters": args.iters, "distortion": result.distortion,
                      "kmeans_distortion": [r.distortion for r in result.results], "reseeded": result.reseeded,
                      "codes_used": result.codes_used, "skipped_on_rank0": skipped}
            write_json(os.path.join(args.out, "codebook_fit.json"), record)
            print(f"fitted {record['codebooks']} codebook(s) of {record['codebook_size']} codes to {result.tokens} "
                  f"latent tokens of {len(order)} images: squared error per token {result.distortion:.4f}, "
                  f"{result.codes_used} codes used; wrote {args.out}")
    finally:
        distributed.teardown()
    return 0


def main(argv=None) -> int:
    return run_cli("vqrae-fit-codebook", run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
