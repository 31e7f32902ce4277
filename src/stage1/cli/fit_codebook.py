"""The work of vqrae-fit-codebook (its flags and help text: stage1/cli/arguments.py)."""

from __future__ import annotations

import os

import torch

from ..base import distributed
from ..base.atomic import write_json
from ..base.precision import autocast
from ..data.datasets import find_images
from ..data.shard_specs import is_tar_source, shard_urls
from ..data.tar_shards import TarIndex
from ..train.codebook_fit import fit_codebook
from .arguments import launch
from .common import (
    batches,
    check_apart_from_model,
    check_output,
    load_model,
    model_image_size,
    read_batches,
)


def run(args) -> int:
    check_output(args.out, folder=True)
    check_apart_from_model(args.out, args.model)
    contents = TarIndex(shard_urls(args.data)) if is_tar_source(args.data) else None  # local tars, read by position
    paths = contents.names if contents is not None else find_images(args.data)
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(args.seed))[: args.images].tolist()
    info = distributed.setup(args.device)
    try:
        model = load_model(args, info.device, needs_codes=True)
        size = model_image_size(model, args.image_size)
        mine = [paths[i] for i in order[info.rank :: info.world_size]]
        skipped = []

        def tokens_of(images: torch.Tensor) -> torch.Tensor:  # the model's work on a batch (input_pipeline's step)
            with torch.no_grad(), autocast(info.device, args.precision):
                return model.encode_tokens(images)[0]

        def token_batches():
            for batch in read_batches(args, list(batches(mine, args.batch_size)), size, info.device,
                                      info.local_world_size, contents=contents, step=tokens_of):
                skipped.extend(batch.skipped)
                if batch.images is not None:
                    yield batch.output

        result = fit_codebook(
            model, token_batches(), args.tokens_per_image, args.iters,
            tokens_per_update=args.batch_size * info.world_size * model.grid_side(size) ** 2, seed=args.seed,
            show_progress=info.is_main, more="--images (with more images in --data) or --tokens-per-image",
        )
        if info.is_main:
            model.save_pretrained(args.out)
            record = {"model": str(args.model), "data": str(args.data), "images": len(order), "image_size": size,
                      "tokens": result.tokens, "codebook_size": model.layout.vocab_size,
                      "codebooks": len(result.results), "iters": args.iters, "distortion": result.distortion,
                      "kmeans_distortion": [r.distortion for r in result.results], "reseeded": result.reseeded,
                      "codes_used": result.codes_used, "skipped_on_rank0": skipped}
            write_json(os.path.join(args.out, "codebook_fit.json"), record)
            print(f"fitted {record['codebooks']} codebook(s) of {record['codebook_size']} codes to {result.tokens} "
                  f"latent tokens of {len(order)} images" + (f" ({len(skipped)} unreadable, skipped: "
                                                               f"codebook_fit.json lists them)" if skipped else "")
                  + f": squared error per token {result.distortion:.4f}, {result.codes_used} codes used; wrote "
                    f"{args.out}")
    finally:
        if contents is not None:
            contents.close()
        distributed.teardown()
    return 0


def main(argv=None) -> int:
    return launch("fit_codebook", argv)


if __name__ == "__main__":
    raise SystemExit(main())
