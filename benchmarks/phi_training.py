"""Does VAR's phi, trained with the decoder, help a multi-scale VQRAE? Trainings from one config that differ only in
quantizer.phi (0, then --phi), with the same seed, data and steps, for each of --seeds; each final model is scored by
vqrae-evaluate on held-out images, side by side, with the ratio phi / none.

    python benchmarks/phi_training.py      # CPU, ~9 min on 2 cores: 64 px tiles of the bundled photos (every fourth
                                           # held out and scored), a tiny stand-in encoder (8 x 8 grid, VAR's
                                           # scales for it), a codebook of 64 codes per scale, 600 steps
    python benchmarks/phi_training.py --seeds 0 --eval-data /data/imagenet/val --limit 10000 -- \\
        experiment=vqrae_ms_dinov2_b_decxl data.path=/data/imagenet/train train.steps=20000   # deciding, on a GPU

Arguments after `--` are the training's hydra overrides (they replace the CPU default's). Reported per run, all from
vqrae-evaluate: PSNR, SSIM and LPIPS (where its VGG weights are at hand) of the reconstructions, the latent's
relative distortion ||z - f_hat||^2 / ||z - mean z||^2 (what phi changes in feature space), codebook usage; and the
wall time of the training.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import tempfile
import time

from common import machine, print_table
from PIL import Image

from stage1.cli import evaluate
from stage1.train.config import load_run_config
from stage1.train.trainer import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCORES = {"psnr": "PSNR", "ssim": "SSIM", "lpips": "LPIPS", "latent_relative_distortion": "latent distortion",
          "codebook_usage": "codebook usage"}  # vqrae-evaluate's results.json keys, and their columns
TILE = 64  # the CPU default's images: the stand-in encoder's patch 8 gives an 8 x 8 grid


def cpu_run(tiles: str, steps: int) -> list[str]:
    """The CPU default: the quickstart recipe on the photo tiles, multi-scale with a codebook per scale."""
    return ["experiment=quickstart", f"data.path={tiles}/train", f"image_size={TILE}", "quantizer.kind=multiscale",
            "quantizer.scales=[1,2,3,4,5,7,8]", "quantizer.num_embeddings=64", "codebook_fit.images=90",
            f"codebook_fit.tokens_per_image={(TILE // 8) ** 2}", f"train.steps={steps}",
            f"train.warmup_steps={min(60, steps // 5)}", "train.sample_every=null",
            "train.report_reconstructions=false"]


def photo_tiles(out: str) -> str:
    """The bundled photos cut into TILE-pixel tiles: out/train, and every fourth in out/held (120 tiles: 90 + 30)."""
    count = 0
    for split in ("train", "held"):
        os.makedirs(os.path.join(out, split), exist_ok=True)
    for path in sorted(glob.glob(os.path.join(REPO, "assets", "*.jpg"))):
        with Image.open(path) as image:
            image = image.convert("RGB")
        name = os.path.splitext(os.path.basename(path))[0]
        for top in range(0, image.height - TILE + 1, TILE):
            for left in range(0, image.width - TILE + 1, TILE):
                tile = os.path.join(out, "held" if count % 4 == 3 else "train", f"{name}_{top}_{left}.png")
                image.crop((left, top, left + TILE, top + TILE)).save(tile)
                count += 1
    return out


def score(run_dir: str, overrides: list[str], eval_data: str, limit: int | None) -> tuple[dict, float]:
    """Train one run into run_dir and score its final model: vqrae-evaluate's SCORES, and the training's seconds."""
    start = time.perf_counter()
    summary = train(load_run_config([*overrides, f"results_dir={run_dir}"]))
    seconds = time.perf_counter() - start
    command = ["--model", summary["final"], "--data", eval_data, "--out", os.path.join(run_dir, "eval")]
    if evaluate.main(command + (["--limit", str(limit)] if limit else [])) != 0:
        raise SystemExit(f"vqrae-evaluate failed on {summary['final']}")
    with open(os.path.join(run_dir, "eval", "results.json")) as f:
        results = json.load(f)
    return {key: results[key] for key in SCORES}, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phi", type=int, default=4, help="quantizer.phi of the second run of a seed (VAR's: 4)")
    parser.add_argument("--seeds", default="0,1", help="training seeds, comma-separated: a pair of runs each")
    parser.add_argument("--eval-data", default=None, help="images the final models are scored on (default: the "
                                                          "held-out photo tiles)")
    parser.add_argument("--limit", type=int, default=None, help="score the first N images of --eval-data")
    parser.add_argument("--quick", action="store_true", help="smoke run: the CPU default, one seed, 10 steps")
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("overrides", nargs="*", help="the training's hydra overrides (after --)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="phi-training-")
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    overrides, eval_data = args.overrides, args.eval_data
    if not overrides:
        tiles = photo_tiles(os.path.join(out, "tiles"))
        overrides, eval_data = cpu_run(tiles, 10 if args.quick else 600), eval_data or os.path.join(tiles, "held")
    if eval_data is None:
        raise SystemExit("with your own training overrides, name the images to score: --eval-data")
    print(f"{machine()}\ntraining: {' '.join(overrides)}\nscored on: {eval_data}; runs in {out}")
    rows, ratios = [], {key: [] for key in SCORES}
    for seed in seeds:
        scores = {}
        for phi in (0, args.phi):
            scores[phi], seconds = score(os.path.join(out, f"seed{seed}-phi{phi}"),
                                         [*overrides, f"seed={seed}", f"quantizer.phi={phi}"], eval_data, args.limit)
            rows.append([f"seed {seed}, phi={phi}", *(f"{v:.4f}" if v is not None else "-"
                                                      for v in scores[phi].values()), f"{seconds:.0f}"])
        for key, values in ratios.items():
            if scores[0][key] and scores[args.phi][key] is not None:
                values.append(scores[args.phi][key] / scores[0][key])
    rows.append(["ratio phi / none, mean", *(f"{sum(v) / len(v):.3f}" if v else "-" for v in ratios.values()), ""])
    print_table("phi trained with the decoder (higher PSNR / SSIM, lower LPIPS / latent distortion is better)",
                ["run", *SCORES.values(), "train s"], rows)


if __name__ == "__main__":
    main()
