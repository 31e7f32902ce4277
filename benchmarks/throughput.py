"""End-to-end throughput: tokenization (images/s through encode_to_indices) with DINOv2-B at 224 px, and
decoder training steps (images/s, forward + backward + AdamW) for a ViT decoder at 256 px.

    python benchmarks/throughput.py [--device cuda] [--dtype bf16] [--batch 64] [--decoder vit_xl] [--compile]

DINOv2-B is built from its config (random weights, the real arithmetic; nothing is downloaded).
`--compile` also times torch.compile'd versions of the encoder and decoder (CUDA is where it pays).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from common import machine, print_table, sync

from stage1 import VQRAE


def images_per_second(step, batch: int, device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    sync(device)
    return batch * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32", choices=("fp32", "bf16"))
    parser.add_argument("--batch", type=int, default=64 if torch.cuda.is_available() else 4)
    parser.add_argument("--decoder", default="vit_xl" if torch.cuda.is_available() else "vit_b")
    parser.add_argument("--num-embeddings", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=10 if torch.cuda.is_available() else 2)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"machine: {machine()}; device {device}, {args.dtype}, batch {args.batch}, decoder {args.decoder}")
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        Dinov2Model(Dinov2Config(image_size=224)).save_pretrained(tmp)
        model = VQRAE(encoder_config_path=tmp, encoder_input_size=224, decoder_config_path=args.decoder,
                      decoder_patch_size=16, num_embeddings=args.num_embeddings).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    images = torch.rand(args.batch, 3, 256, 256, device=device)
    optimizer = torch.optim.AdamW(model.decoder.parameters(), lr=1e-4, fused=device.type == "cuda")

    def tokenize():
        with torch.no_grad(), autocast:
            model.encode_to_indices(images)

    def train_step():
        with autocast:
            _, losses = model(images, return_loss=True)
        losses["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    rows = []
    variants = [("eager", lambda: None)]
    if args.compile:
        variants.append(("torch.compile", model.compile_parts))  # what --compile and train.compile=true do
    for name, prepare in variants:
        prepare()
        model.eval()
        tok = images_per_second(tokenize, args.batch, device, args.repeats)
        model.train()
        trn = images_per_second(train_step, args.batch, device, args.repeats)
        rows.append([name, f"{tok:.1f}", f"{trn:.1f}"])
    print_table(f"throughput (DINOv2-B 224 px -> {args.num_embeddings} codes; {args.decoder} decoder 256 px)",
                ["mode", "tokenize images/s", "train step images/s"], rows)


if __name__ == "__main__":
    main()
