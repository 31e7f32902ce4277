"""Quantizer kinds through whole trainings at about equal bits per token (issue 29, point 6): runs from one config
that differ only in the quantizer (the same seed, data and steps), each final model scored by vqrae-evaluate on
held-out images, side by side with the EMA codebook, vqrae's default.

    python benchmarks/kind_training.py      # CPU: phi_training.py's setup (the quickstart recipe on 64 px tiles of
                                            # the bundled photos, every fourth held out and scored; a tiny stand-in
                                            # encoder, 8 x 8 grid), ~10 bits per token, 600 steps a run
    python benchmarks/kind_training.py --seeds 0 --eval-data /data/imagenet/val --limit 10000 -- \\
        experiment=vqrae_dinov2_b_decxl data.path=/data/imagenet/train train.steps=20000   # deciding, on a GPU

The kinds with trained parameters (fsq, simvq, gumbel) run a second time as "<kind> averaged": the final model takes
the EMA of the quantizer's trained parameters, at the decoder's EMA decay, instead of the live ones the decoder's EMA
copy is paired with by default (the measurement that decides where they go, as phi's did).

Arguments after `--` are the training's hydra overrides (they replace the CPU default's); each variant's quantizer
overrides follow them. Reported per run: PSNR, SSIM, LPIPS (where its VGG weights are at hand), the latent's relative
distortion ||z - z_q||^2 / ||z - mean z||^2 and codebook usage (vqrae-evaluate's), and the training's wall time.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from contextlib import contextmanager, nullcontext

import torch
from common import machine, print_table
from phi_training import SCORES, TILE, photo_tiles, score

from stage1.train import outputs
from stage1.train.trainer import Trainer

VARIANTS = {  # ~10 bits per token each
    "ema": ["quantizer.kind=single", "quantizer.num_embeddings=1024"],
    "grouped 2": ["quantizer.kind=grouped", "quantizer.groups=2", "quantizer.num_embeddings=32"],
    "fsq": ["quantizer.kind=fsq", "quantizer.levels=[8,5,5,5]"],
    "lfq": ["quantizer.kind=fsq", f"quantizer.levels=[{','.join(['2'] * 10)}]", "quantizer.entropy_weight=0.1"],
    "simvq": ["quantizer.kind=simvq", "quantizer.num_embeddings=1024"],
    "gumbel": ["quantizer.kind=gumbel", "quantizer.num_embeddings=1024"],
}
VARIANTS.update({f"{kind} averaged": VARIANTS[kind] for kind in ("fsq", "simvq", "gumbel")})


@contextmanager
def quantizer_averaged():
    """Trainings in which the final model takes the EMA of the quantizer's trained parameters (updated after each
    decoder step, at train.ema_decay, as the decoder's EMA copy) in place of the live ones."""
    update, export, averages = Trainer._generator_update, outputs.export_final, {}

    def update_and_average(trainer, logs):
        finite = update(trainer, logs)
        if finite and trainer.ema is not None:
            with torch.no_grad():
                for group in trainer.model.quantizer.trained_parameters():
                    for p in group["params"]:
                        if id(p) in averages:
                            averages[id(p)][1].lerp_(p, 1 - trainer.cfg.train.ema_decay)
                        else:  # the first update copies, as AveragedModel's
                            averages[id(p)] = (p, p.detach().clone())
        return finite

    def export_averaged(model, decoder, final):
        with torch.no_grad():
            for p, average in averages.values():
                p.copy_(average)
        export(model, decoder, final)

    Trainer._generator_update, outputs.export_final = update_and_average, export_averaged
    try:
        yield
    finally:
        Trainer._generator_update, outputs.export_final = update, export


def cpu_run(tiles: str, steps: int) -> list[str]:
    """The CPU default: the quickstart recipe on the photo tiles; every variant fits on all 90 training tiles."""
    return ["experiment=quickstart", f"data.path={tiles}/train", f"image_size={TILE}", "codebook_fit.images=90",
            f"codebook_fit.tokens_per_image={(TILE // 8) ** 2}", f"train.steps={steps}",
            f"train.warmup_steps={min(60, steps // 5)}", "train.sample_every=null",
            "train.report_reconstructions=false"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"some of {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="0", help="training seeds, comma-separated: every variant for each")
    parser.add_argument("--eval-data", default=None, help="images the final models are scored on (default: the "
                                                          "held-out photo tiles)")
    parser.add_argument("--limit", type=int, default=None, help="score the first N images of --eval-data")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: the CPU default, ema and fsq averaged, 10 steps")
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("overrides", nargs="*", help="the training's hydra overrides (after --)")
    args = parser.parse_args()
    variants = ["ema", "fsq averaged"] if args.quick else args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or variants[0] != "ema":
        raise SystemExit(f"--variants must start with ema (the reference) and name some of {list(VARIANTS)}; "
                         f"unknown: {unknown}")
    out = args.out or tempfile.mkdtemp(prefix="kind-training-")
    overrides, eval_data, variant = args.overrides, args.eval_data, dict(VARIANTS)
    if not overrides:
        tiles, steps = photo_tiles(os.path.join(out, "tiles")), 10 if args.quick else 600
        overrides, eval_data = cpu_run(tiles, steps), eval_data or os.path.join(tiles, "held")
        for name in ("gumbel", "gumbel averaged"):  # annealed over the short run
            variant[name] = [*VARIANTS[name], f"quantizer.tau_steps={steps}"]
    if eval_data is None:
        raise SystemExit("with your own training overrides, name the images to score: --eval-data")
    print(f"{machine()}\ntraining: {' '.join(overrides)}\nscored on: {eval_data}; runs in {out}")
    rows = []
    for seed in [0] if args.quick else [int(s) for s in args.seeds.split(",")]:
        reference = None
        for name in variants:
            with quantizer_averaged() if name.endswith(" averaged") else nullcontext():
                scores, seconds = score(os.path.join(out, f"seed{seed}-{name.replace(' ', '')}"),
                                        [*overrides, f"seed={seed}", *variant[name]], eval_data, args.limit)
            reference = reference or scores
            psnr_gap = scores["psnr"] - reference["psnr"]
            rows.append([f"seed {seed}, {name}", *(f"{v:.4f}" if v is not None else "-" for v in scores.values()),
                         f"{psnr_gap:+.2f}", f"{seconds:.0f}"])
    print_table("quantizer kinds trained with the decoder at ~10 bits per token (higher PSNR / SSIM, lower LPIPS / "
                "latent distortion is better)", ["run", *SCORES.values(), "PSNR vs ema", "train s"], rows)


if __name__ == "__main__":
    main()
