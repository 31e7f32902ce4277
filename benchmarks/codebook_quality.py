"""Codebook quality on a fixed latent distribution: ours vs vector-quantize-pytorch vs offline k-means, side by side
on the same seeded stream (a frozen encoder's features never change, so the codebook's job is k-means).

Sources (LayerNormed without affine, as DINOv2 emits its tokens):
    synthetic   a Zipf mixture of Gaussian clusters near a 48-d subspace of R^D
    photos      D-value patches (p x p x 3) of the bundled photos in assets/ (held-out patches from other positions)
Methods, each fed the same --steps batches of --batch tokens, scored on --held-out tokens none of them trained on:
    ours          vqrae's recipe: codebook fit on the first --fit-tokens tokens of the stream (k-means), then the EMA
                  with restarts on the stream
    ours r4 / g4  the same with kind=residual depth 4 / kind=grouped groups 4
    vqp           vector_quantize_pytorch.VectorQuantize (k-means init on the first batch, dead-code restarts)
    vqp r4        vector_quantize_pytorch.ResidualVQ, 4 quantizers
    k-means       offline Lloyd on the fit tokens, --iters iterations: the attainable distortion at this K
Reported: held-out usage (codes used / K, averaged over codebooks), perplexity (averaged over codebooks), relative
distortion mean ||z - q(z)||^2 / mean ||z - mean z||^2, its ratio to the k-means', and bits per token.

    python benchmarks/codebook_quality.py                        # CPU scale (about 15 min on 2 cores)
    python benchmarks/codebook_quality.py --device cuda --k 4096,16384,65536 --batch 8192 --steps 400 \\
        --fit-tokens 262144 --held-out 65536
    python benchmarks/codebook_quality.py --quick                # smoke run
"""

from __future__ import annotations

import argparse
import glob
import math
import os

import torch
import torch.nn.functional as F
from common import machine, print_table

from stage1.images import load_image
from stage1.kmeans import assign, fit_kmeans
from stage1.model_config import QuantizerConfig
from stage1.quantizer_kinds import build_quantizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Synthetic:
    """Tokens from a Zipf mixture of `clusters` Gaussians near a 48-d subspace, LayerNormed."""

    def __init__(self, dim: int, clusters: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.basis = torch.linalg.qr(torch.randn(dim, 48, generator=g)).Q  # (D, 48) orthonormal
        self.centres = torch.randn(clusters, 48, generator=g) * 3.0
        weights = 1.0 / torch.arange(1, clusters + 1).double() ** 1.1
        self.weights = weights / weights.sum()
        self.dim = dim

    def sample(self, n: int, g: torch.Generator) -> torch.Tensor:
        which = torch.multinomial(self.weights, n, replacement=True, generator=g)
        inside = self.centres[which] + 0.5 * torch.randn(n, 48, generator=g)
        x = inside @ self.basis.T + 0.05 * torch.randn(n, self.dim, generator=g)
        return F.layer_norm(x, (self.dim,))


class Photos:
    """p x p x 3 patches of the bundled photos, LayerNormed; `held_out` draws from other patch positions."""

    def __init__(self, dim: int, seed: int = 0):
        p = int(round(math.sqrt(dim / 3)))
        if 3 * p * p != dim:
            raise SystemExit(f"--dim {dim} is not 3 p^2: photo patches need e.g. 768 (p=16) or 192 (p=8)")
        patches = []
        for path in sorted(glob.glob(os.path.join(REPO, "assets", "*.jpg"))):
            image = load_image(path)[0]
            patches.append(F.unfold(image.unsqueeze(0), p, stride=p // 2)[0].T)  # (positions, 3 p^2)
        rows = torch.cat(patches)
        order = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))
        split = rows.shape[0] * 3 // 4
        self.train_rows, self.held_rows = F.layer_norm(rows[order[:split]], (dim,)), F.layer_norm(rows[order[split:]],
                                                                                                   (dim,))

    def sample(self, n: int, g: torch.Generator, held_out: bool = False) -> torch.Tensor:
        rows = self.held_rows if held_out else self.train_rows
        return rows[torch.randint(rows.shape[0], (n,), generator=g)]


def scores(z: torch.Tensor, codes: torch.Tensor, recon: torch.Tensor, k: int) -> dict:
    """codes: (M,) or (M, L) indices; recon: (M, D)."""
    codes = codes.reshape(codes.shape[0], -1)
    usage, perplexity = [], []
    for level in codes.T:
        counts = torch.bincount(level.cpu(), minlength=k).double()
        probs = counts[counts > 0] / counts.sum()
        usage.append((counts > 0).double().mean().item())
        perplexity.append(math.exp(-(probs * probs.log()).sum().item()))
    distortion = (z - recon).pow(2).sum(1).mean() / (z - z.mean(0)).pow(2).sum(1).mean()
    return {"usage": sum(usage) / len(usage), "perplexity": sum(perplexity) / len(perplexity),
            "distortion": distortion.item(), "bits": codes.shape[1] * math.log2(k)}


def run_ours(kind: dict, k: int, dim: int, stream, fit_tokens, held_out, args, device) -> dict:
    torch.manual_seed(args.seed)
    q = build_quantizer(QuantizerConfig(num_embeddings=k, decay=0.99, restart_after_steps=args.restart_after,
                                        **kind), dim).to(device)
    q.fit(fit_tokens.to(device), args.iters, tokens_per_update=args.batch, seed=args.seed)
    q.train()
    for batch in stream:
        q(batch.to(device).unsqueeze(0))
    q.eval()
    codes = q.encode(held_out.to(device))
    return scores(held_out.to(device), codes, q.lookup(codes).float(), k)


def run_peer(residual: bool, k: int, dim: int, stream, held_out, args, device) -> dict:
    from vector_quantize_pytorch import ResidualVQ, VectorQuantize

    torch.manual_seed(args.seed)
    options = dict(dim=dim, codebook_size=k, decay=0.99, kmeans_init=True, kmeans_iters=args.iters,
                   threshold_ema_dead_code=2)
    q = (ResidualVQ(num_quantizers=4, **options) if residual else VectorQuantize(**options)).to(device)
    q.train()
    for batch in stream:
        q(batch.to(device).unsqueeze(0))
    q.eval()
    with torch.no_grad():
        recon, codes, _ = q(held_out.to(device).unsqueeze(0))
    return scores(held_out.to(device), codes[0], recon[0].float(), k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--k", default="256,1024", help="codebook sizes, comma-separated")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--batch", type=int, default=4096, help="tokens per step")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--fit-tokens", type=int, default=65536, help="stream tokens our fit and k-means see")
    parser.add_argument("--held-out", type=int, default=32768)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--restart-after", type=int, default=20, help="our restart rule, in steps without a hit")
    parser.add_argument("--sources", default="synthetic,photos")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.k, args.dim, args.batch, args.steps, args.fit_tokens, args.held_out, args.iters = "64", 192, 512, 5, \
            2048, 2048, 5
    device = torch.device(args.device)
    print(f"machine: {machine()}; device {device}; D={args.dim}, {args.steps} steps of {args.batch} tokens, "
          f"fit on {args.fit_tokens} tokens, {args.held_out} held out")
    for source_name in args.sources.split(","):
        rows = []
        for k in (int(v) for v in args.k.split(",")):
            source = Synthetic(args.dim, clusters=8 * k, seed=args.seed) if source_name == "synthetic" else \
                Photos(args.dim, seed=args.seed)
            g = torch.Generator().manual_seed(args.seed + 1)
            held_out = source.sample(args.held_out, g, held_out=True) if source_name == "photos" else \
                source.sample(args.held_out, g)
            g = torch.Generator().manual_seed(args.seed + 2)
            stream = [source.sample(args.batch, g) for _ in range(args.steps)]
            fit_tokens = torch.cat(stream)[: args.fit_tokens]  # the stream's first tokens, as our training stage
            kmeans = fit_kmeans(fit_tokens.to(device), k, iters=args.iters, seed=args.seed)
            codes, _ = assign(held_out.to(device), kmeans.centroids)
            reference = scores(held_out.to(device), codes, kmeans.centroids[codes], k)
            results = {
                "k-means (offline)": reference,
                "ours": run_ours(dict(), k, args.dim, stream, fit_tokens, held_out, args, device),
                "vqp": run_peer(False, k, args.dim, stream, held_out, args, device),
                "ours r4": run_ours(dict(kind="residual", depth=4), k, args.dim, stream, fit_tokens, held_out, args,
                                    device),
                "vqp r4": run_peer(True, k, args.dim, stream, held_out, args, device),
                "ours g4": run_ours(dict(kind="grouped", groups=4), k, args.dim, stream, fit_tokens, held_out, args,
                                    device),
            }
            for name, r in results.items():
                rows.append([k, name, f"{100 * r['usage']:.1f}%", f"{r['perplexity']:.0f}",
                             f"{r['perplexity'] / reference['perplexity']:.2f}x", f"{r['distortion']:.3f}",
                             f"{r['distortion'] / reference['distortion']:.3f}x", f"{r['bits']:.0f}"])
        print_table(f"codebook quality, {source_name} (held-out tokens)",
                    ["K", "method", "usage", "perplexity", "vs k-means", "rel. distortion", "vs k-means",
                     "bits/token"], rows)


if __name__ == "__main__":
    main()
