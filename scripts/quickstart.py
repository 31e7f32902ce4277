"""Quickstart: train a small VQRAE decoder on the bundled sample images, offline, on CPU, in a few minutes.

The encoder here is a tiny, randomly initialised DINOv2 built from a config (no network needed): an
untrained stand-in that shows the whole data path image -> features -> codes -> image working end to end.
With network and a GPU, pass `--encoder facebook/dinov2-base` (any DINOv2 / SigLIP2 / MAE Hub id or local
directory) for real features.

    python scripts/quickstart.py [--steps 400] [--out results/quickstart]
"""

from __future__ import annotations

import argparse
import glob
import os
import time

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from stage1 import VQRAE
from stage1.atomic import atomic_path
from stage1.tiny import save_tiny_encoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_images(folder: str, size: int) -> torch.Tensor:
    paths = sorted(p for ext in ("jpg", "jpeg", "png") for p in glob.glob(os.path.join(folder, f"*.{ext}")))
    if not paths:
        raise SystemExit(f"no .jpg/.png images found in {folder}")
    to_tensor = v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)])
    return [to_tensor(Image.open(p).convert("RGB")) for p in paths], paths


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=os.path.join(ROOT, "assets"))
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "quickstart"))
    parser.add_argument("--encoder", default=None, help="Hub id or local dir; default: a tiny local stand-in")
    parser.add_argument("--encoder-cls", default="Dinov2withNorm")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--num-embeddings", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    os.makedirs(args.out, exist_ok=True)
    encoder = args.encoder
    if encoder is None:
        encoder = save_tiny_encoder(
            "dinov2", os.path.join(args.out, "tiny_dinov2"), hidden_size=64, patch_size=8, image_size=args.image_size
        )
        print(f"encoder: tiny random DINOv2 stand-in at {encoder} (untrained; use --encoder facebook/dinov2-base "
              f"on a machine with network and a GPU for real features)")
    size = args.image_size
    model = VQRAE(
        encoder_cls=args.encoder_cls,
        encoder_config_path=encoder,
        encoder_input_size=size,
        decoder_config_path=dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512),
        decoder_patch_size=8 if args.encoder is None else 16,
        num_embeddings=args.num_embeddings,
        vq_decay=0.95,
        dead_code_threshold=0.05,
        kmeans_init=True,
    ).to(device)

    images, paths = load_images(args.images, size)
    augment = v2.Compose([v2.RandomResizedCrop(size, scale=(0.3, 1.0), antialias=True), v2.RandomHorizontalFlip()])
    optimizer = torch.optim.AdamW(model.decoder.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    model.train()
    start = time.time()
    bar = tqdm(range(args.steps), desc="train", unit="step", mininterval=2.0)
    for _ in bar:
        batch = torch.stack([augment(images[i % len(images)]) for i in torch.randperm(args.batch_size)]).to(device)
        _, losses = model(batch.clamp(0, 1), return_loss=True)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        schedule.step()
        recon, usage = losses["recon_loss"].item(), losses["codebook_usage"].item()
        bar.set_postfix(recon=f"{recon:.4f}", usage=f"{usage:.2f}", refresh=False)
    print(f"trained {args.steps} steps in {time.time() - start:.0f}s")

    checkpoint = os.path.join(args.out, "model")
    model.save_pretrained(checkpoint)
    model = VQRAE.from_pretrained(checkpoint).to(device).eval()

    # Tokenize and decode the full images (center crops), through the index round trip.
    center = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])
    x = torch.stack([center(im) for im in images]).clamp(0, 1).to(device)
    indices = model.encode_to_indices(x)
    x_rec = model.decode_from_indices(indices, output_size=(size, size))
    scores = psnr(x_rec, x)
    for path, score in zip(paths, scores):
        print(f"  {os.path.basename(path):28s} PSNR {score:.2f} dB")
    print(f"mean PSNR {scores.mean():.2f} dB; {indices.shape[1]}x{indices.shape[2]} codes per image, "
          f"{indices.unique().numel()} distinct codes of {model.quantizer.num_embeddings}")
    grid = make_grid(torch.cat([x, x_rec]).cpu(), nrow=len(images), padding=2)
    target = os.path.join(args.out, "reconstructions.png")
    with atomic_path(target) as tmp:
        save_image(grid, tmp, format="png")
    print(f"wrote {target} (originals above reconstructions) and the checkpoint {checkpoint}")


if __name__ == "__main__":
    main()
