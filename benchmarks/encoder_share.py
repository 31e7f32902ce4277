"""The quantizer's cost next to the frozen encoder's, at DINOv2-B shapes, measured side by side.

    python benchmarks/encoder_share.py [--device cpu|cuda] [--dtype fp32|bf16] [--batch 8]

A ViT-B/14 at 224 px does about 86M multiply-adds per token; the search does K * D per token (12.6M at
K=16384, D=768): an arithmetic share of 0.15. Target (row 4): VQ forward (training mode, EMA update) takes
at most that share + 25% of the encoder's forward time. The encoder is DINOv2-B built from its config
(random weights: the same arithmetic as the real one, which cannot be downloaded here), loaded through
stage1's own encoder class.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from common import machine, print_table, time_interleaved

from stage1.model.config import QuantizerConfig
from stage1.model.encoders import build_encoder
from stage1.model.quantizers import VectorQuantizer

ENCODER_MACS_PER_TOKEN = 86e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--codebooks", default="8192,16384,65536")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"machine: {machine()}; device {device}, {args.dtype}")
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        Dinov2Model(Dinov2Config(image_size=224)).save_pretrained(tmp)  # DINOv2-B: 768 wide, 12 layers, p=14
        encoder = build_encoder("Dinov2withNorm", tmp).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    images = torch.rand(args.batch, 3, 224, 224, device=device)
    with torch.no_grad(), autocast:
        tokens = encoder(images)
    rows = []
    for k in (int(v) for v in args.codebooks.split(",")):
        config = QuantizerConfig(num_embeddings=k, decay=0.99, restart_window=0)
        vq = VectorQuantizer(config, tokens.shape[-1]).to(device).train()
        vq.initialized.fill_(True)  # a started codebook: the update itself is timed

        def run_encoder():
            with autocast:
                encoder(images)

        def run_vq(vq=vq):
            with autocast:
                vq(tokens)

        t = time_interleaved({"encoder": run_encoder, "vq": run_vq}, repeats=args.repeats, device=device)
        share = k * tokens.shape[-1] / ENCODER_MACS_PER_TOKEN
        ratio = t["vq"] / t["encoder"]
        target = share * 1.25
        rows.append([f"4. VQ / encoder, K={k}", f"{tokens.shape[0] * tokens.shape[1]} tokens x {tokens.shape[-1]}",
                     f"{t['vq'] * 1e3:.1f} ms", f"{t['encoder'] * 1e3:.1f} ms", f"{ratio:.3f}",
                     f"<= {target:.3f} (share {share:.3f} + 25%)", "yes" if ratio <= target else "NO"])
    print_table("quantizer vs frozen encoder (DINOv2-B, 224 px, batch %d)" % args.batch,
                ["case", "tokens", "VQ forward", "encoder forward", "ratio", "target", "holds"], rows)


if __name__ == "__main__":
    main()
