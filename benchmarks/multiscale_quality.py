"""Multi-scale tokens against single and residual codebooks at the same K, on feature maps with real spatial structure.

Source: 16 x 16 grids of LayerNormed p x p x 3 patches (D = 3 p^2; p = 4: D = 48) of the bundled photos. Each photo is
cut into 16p-pixel tiles, every fourth one held out; the training tiles are taken in their 8 flips and rotations,
so the per-scale codebooks have grids enough to fit their 1 x 1 scale. Every method is fitted offline (exact Lloyd,
--iters iterations) on the training grids and scored on the held-out grids:
    single        one codebook: k-means of the tokens (256 codes per grid)
    residual d    greedy residual k-means, d levels (256 d codes)
    ms shared     quantizer.kind=multiscale, VAR's scales, one codebook for every scale (its offline fit)
    ms per-scale  the same with a codebook per scale
    ms ... + phi  the same with VAR's phi (4 convolutions, from the identity): --phi-rounds rounds of --phi-steps Adam
                  steps on training's vq_loss (commitment + VAR's phi_loss) of the training grids (codes found under
                  the current phi, codebooks fixed), each followed by a refit of the codebooks under the trained phi.
                  In training, phi learns from the decoder's loss as well; this measures what it can do for the
                  features alone (benchmarks/phi_training.py: with the decoder).
Reported: relative distortion mean ||z - q(z)||^2 / mean ||z - mean z||^2 on the held-out grids, codes and bits per
grid, codes used; the coarse-to-fine curve of the multi-scale quantizers (distortion after each scale), beside the
same scheme without quantization ("exact": each scale's area-downsampled residual kept as it is), the floor no
codebook of the coarse scales can beat: how much of the features' variance the coarse scales can carry at all; and
the issue's targets with whether they hold (multi-scale at 680 codes below single at 256 and residual 2 at 512;
where it stands against residual 3 at 768).

    python benchmarks/multiscale_quality.py                 # K = 256 and 1024, p = 4
    python benchmarks/multiscale_quality.py --quick         # smoke run
    python benchmarks/multiscale_quality.py --encoder facebook/dinov2-with-registers-base --data /data/imagenet/val \
        --images 4000 --k 256,1024,4096 --device cuda        # the deciding table: a real encoder's 16 x 16 features

--encoder: the grids are the encoder's features (Dinov2withNorm: LayerNormed; what VQRAE quantizes without latent
statistics) of the first --images images of --data at 224 px (every fourth held out), instead of photo patches; the
scales are VAR's, scaled to the encoder's grid.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import time

import torch
import torch.nn.functional as F
from common import machine, print_table

from stage1.data.images import load_image
from stage1.model.config import QuantizerConfig
from stage1.model.quantizers import build_quantizer
from stage1.model.quantizers.scales import area, bicubic, to_maps, to_tokens

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VAR_SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def photo_grids(patch: int, side: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) grids (G, side * side, 3 patch^2) of LayerNormed patches; train in 8 flips / rotations."""
    tile = side * patch
    train, held = [], []
    for path in sorted(glob.glob(os.path.join(REPO, "assets", "*.jpg"))):
        image = load_image(path)[0]
        tiles = image.unfold(1, tile, tile).unfold(2, tile, tile).flatten(1, 2).movedim(1, 0)  # (T, 3, tile, tile)
        keep = torch.arange(len(tiles)) % 4 != 3
        turned = [torch.rot90(t, k, (2, 3)) for t in (tiles[keep], tiles[keep].flip(3)) for k in range(4)]
        train.append(torch.cat(turned))
        held.append(tiles[~keep])
    dim = 3 * patch * patch

    def grids(tiles):
        rows = F.unfold(tiles, patch, stride=patch).transpose(1, 2)  # (T, side * side, 3 p^2), raster order
        return F.layer_norm(rows, (dim,))

    return grids(torch.cat(train)), grids(torch.cat(held))


def encoder_grids(encoder_path: str, data: str, images: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) grids of a frozen encoder's features of the first `images` images of `data` at 224 px."""
    from stage1.data.datasets import find_images
    from stage1.data.input_pipeline import prepare_image
    from stage1.model.encoders import build_encoder

    encoder = build_encoder("Dinov2withNorm", encoder_path).to(device)
    paths = find_images(data)[:images]
    side = 224 // encoder.patch_size * encoder.patch_size
    grids = []
    with torch.no_grad():
        for start in range(0, len(paths), 64):
            batch = torch.stack([prepare_image(os.path.join(data, p), side)[0] for p in paths[start : start + 64]])
            grids.append(encoder(batch.to(device)).float().cpu())
    grids = torch.cat(grids)
    held = torch.arange(len(grids)) % 4 == 3
    return grids[~held], grids[held]


def exact_curve(grids: torch.Tensor, scales: tuple[int, ...]) -> list[float]:
    """VAR's scheme with every scale's residual kept exactly (no codes): the distortion after each scale."""
    side = scales[-1]
    maps = to_maps(grids.float(), side)
    rest, curve = maps, []
    for s in scales:
        rest = rest - bicubic(area(rest, s), side)
        curve.append(relative(grids, to_tokens(maps - rest)))
    return curve


def relative(z: torch.Tensor, q: torch.Tensor) -> float:
    z, q = z.reshape(-1, z.shape[-1]).double(), q.reshape(-1, q.shape[-1]).double()
    return ((z - q).pow(2).sum(1).mean() / (z - z.mean(0)).pow(2).sum(1).mean()).item()


def train_phi(q, train: torch.Tensor, args) -> None:
    """Phi by gradient on the quantizer's vq_loss (commitment and phi_loss) of random batches of training grids, the
    codebooks fixed (eval mode: no EMA update)."""
    optimizer = torch.optim.Adam(q.phi.parameters(), lr=args.phi_lr)
    generator = torch.Generator().manual_seed(args.seed)
    for _ in range(args.phi_steps):
        batch = train[torch.randint(len(train), (64,), generator=generator).to(train.device)]
        loss = q(batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def run(kind: dict, k: int, train: torch.Tensor, held: torch.Tensor, args) -> tuple[dict, list[float]]:
    """Fit offline (and train phi, refitting after each round), score on the held-out grids; the curve after each
    scale for the multi-scale kinds."""
    torch.manual_seed(args.seed)
    q = build_quantizer(QuantizerConfig(num_embeddings=k, **kind), train.shape[-1]).to(train.device).eval()
    start = time.perf_counter()
    samples = train.reshape(-1, train.shape[-1])
    q.fit(samples, args.iters, tokens_per_update=float(train.shape[1]), seed=args.seed)
    for round_ in range(args.phi_rounds if kind.get("phi") else 0):
        train_phi(q, train, args)
        q.fit(samples, args.iters, tokens_per_update=float(train.shape[1]), seed=args.seed + 1 + round_)
    seconds = time.perf_counter() - start
    multiscale = kind.get("kind") == "multiscale"
    with torch.no_grad():
        codes = q.encode(held)
        recon = q.lookup(codes)
        curve = []
        if multiscale:
            curve = [relative(held, q.lookup(codes[:, :end])) for end in q.layout.prefix_ends]
    per_grid = codes[0].numel()
    used = len(torch.unique(codes)) if multiscale or kind.get("kind") != "residual" else \
        sum(len(torch.unique(codes[..., level])) for level in range(codes.shape[-1]))
    return {"distortion": relative(held, recon), "codes": per_grid, "bits": per_grid * math.log2(k),
            "used": used, "seconds": seconds}, curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", default="256,1024", help="codebook sizes, comma-separated")
    parser.add_argument("--patch", type=int, default=4, help="patch side p: tokens of 3 p^2 values")
    parser.add_argument("--iters", type=int, default=20, help="Lloyd iterations of every fit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: K = 64, 5 iterations, a few grids")
    parser.add_argument("--encoder", default=None, help="a DINOv2 checkpoint (Hub id or folder): its features")
    parser.add_argument("--data", default=None, help="with --encoder: an image folder")
    parser.add_argument("--images", type=int, default=4000, help="with --encoder: images of --data used")
    parser.add_argument("--phi-rounds", type=int, default=2, help="+ phi: rounds of phi training and refit")
    parser.add_argument("--phi-steps", type=int, default=200, help="+ phi: Adam steps per round")
    parser.add_argument("--phi-lr", type=float, default=1e-3, help="+ phi: Adam's learning rate")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.quick:
        args.k, args.iters, args.phi_steps, args.phi_rounds = "64", 5, 5, 1
    if args.encoder:
        if not args.data:
            raise SystemExit("--encoder needs --data, a folder of images")
        train, held = encoder_grids(args.encoder, args.data, args.images, args.device)
        source = f"{args.encoder}'s features of {len(train) + len(held)} images of {args.data}"
    else:
        train, held = photo_grids(args.patch)
        source = f"photo patches (8 flips / rotations of {train.shape[0] // 8} training tiles)"
    if args.quick:
        train, held = train[:128], held[:16]
    train, held = train.to(args.device), held.to(args.device)
    side = int(round(train.shape[1] ** 0.5))
    print(f"{machine()}\n{source}: {train.shape[0]} training and {held.shape[0]} held-out grids of {side} x {side} "
          f"tokens, D = {train.shape[-1]}, {args.iters} Lloyd iterations")
    scales = tuple(sorted({max(1, round(s * side / 16)) for s in VAR_SCALES} | {side}))
    methods = {
        "single": dict(),
        "residual 2": dict(kind="residual", depth=2),
        "residual 3": dict(kind="residual", depth=3),
        "residual 4": dict(kind="residual", depth=4),
        "ms shared": dict(kind="multiscale", scales=scales, shared_codebook=True),
        "ms per-scale": dict(kind="multiscale", scales=scales, shared_codebook=False),
        "ms shared + phi": dict(kind="multiscale", scales=scales, shared_codebook=True, phi=min(4, len(scales))),
        "ms per-scale + phi": dict(kind="multiscale", scales=scales, shared_codebook=False, phi=min(4, len(scales))),
    }
    for k in (int(v) for v in args.k.split(",")):
        rows, curves, results = [], {}, {}
        for name, kind in methods.items():
            if kind.get("shared_codebook") is False and train.shape[0] < k:
                rows.append([name, "-", "-", "-", "-", f"needs {k} grids at 1x1, has {train.shape[0]}"])
                continue
            result, curve = run(kind, k, train, held, args)
            results[name] = result
            if curve:
                curves[name] = curve
            rows.append([name, f"{result['distortion']:.4f}", str(result["codes"]), f"{result['bits']:.0f}",
                         str(result["used"]), f"{result['seconds']:.1f}"])
        print_table(f"K = {k}: held-out relative distortion", ["method", "distortion", "codes / grid",
                                                                "bits / grid", "codes used", "fit s"], rows)
        if curves:
            curves["exact (no codes)"] = exact_curve(held, scales)
            print_table(f"K = {k}: coarse to fine, distortion after each scale",
                        ["scale", *curves], [[f"{s}x{s}", *(f"{curves[n][i]:.4f}" for n in curves)]
                                             for i, s in enumerate(scales)])
        best = min((results[n]["distortion"], n) for n in results if n.startswith("ms "))
        ms, label = best[0], f"{best[1]} ({results[best[1]]['codes']} codes)"
        versus = {name: f"{label} < {name} ({results[name]['codes']})"
                  for name in ("single", "residual 2", "residual 3")}
        targets = [
            (versus["single"], ms < results["single"]["distortion"]),
            (versus["residual 2"], ms < results["residual 2"]["distortion"]),
            (f"{versus['residual 3']}: ratio {ms / results['residual 3']['distortion']:.3f}",
             ms < results["residual 3"]["distortion"]),
        ]
        print_table(f"K = {k}: targets", ["target", "holds"], [[t, "yes" if ok else "no"] for t, ok in targets])


if __name__ == "__main__":
    main()
