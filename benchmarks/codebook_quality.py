"""Codebook quality on a fixed latent distribution: ours vs vector-quantize-pytorch vs offline k-means, side by side
on the same seeded stream (a frozen encoder's features never change, so the codebook's job is k-means).

Sources (LayerNormed without affine, as DINOv2 emits its tokens):
    synthetic   a Zipf mixture of Gaussian clusters near a 48-d subspace of R^D; held-out tokens are fresh draws
    photos      D-value patches (p x p x 3) of the bundled photos in assets/: each photo is cut into 64 x 64 tiles,
                every fourth tile is held out, and no patch crosses a tile, so no held-out pixel was trained on
Methods, each fed the same --steps batches of --batch tokens, scored on --held-out tokens none of them trained on:
    k-means       offline Lloyd on the fit tokens, --iters iterations: the attainable distortion of one codebook
    k-means r2/r4 the same, greedy residual: level l is k-means of what levels 1..l-1 leave (2 / 4 levels)
    k-means g4    the same per quarter of the channels (4 groups)
    ours          vqrae's recipe: codebook fit on the first --fit-tokens tokens of the stream (quantizer.fit), then
                  the EMA with restarts on the stream; `ours r2` / `ours r4` / `ours g4`: kind=residual depth 2 / 4,
                  grouped 4
    ours 1st      the library's start without a fit: k-means of the first batch, then the same EMA and restarts
                  (`ours 1st r4`: residual depth 4)
    vqp           vector_quantize_pytorch.VectorQuantize (k-means init on the first batch, dead-code restarts)
    vqp r4        vector_quantize_pytorch.ResidualVQ, 4 quantizers
Reported: held-out usage (codes used / K, averaged over codebooks), perplexity (averaged over codebooks), relative
distortion mean ||z - q(z)||^2 / mean ||z - mean z||^2, both against the offline k-means of the same kind, bits per
token, restarted codes over the stream (ours); then the issue's targets, each with whether it holds.

    python benchmarks/codebook_quality.py                        # CPU scale, K = 256 and 1024
    python benchmarks/codebook_quality.py --sources synthetic --k 4096 --batch 8192 --steps 400 --fit-tokens 262144 \
        --held-out 65536 --methods 'k-means,ours,ours 1st,k-means r2,ours r2,k-means r4,ours r4,ours 1st r4'
                                                                 # the issue's proxy (K=4096, 400 steps of 8192)
    python benchmarks/codebook_quality.py --device cuda --k 4096,16384,65536 --batch 8192 --steps 400 \\
        --fit-tokens 262144 --held-out 65536
    python benchmarks/codebook_quality.py --quick                # smoke run
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
from stage1.model.kmeans import assign, fit_kmeans
from stage1.model.quantizers import build_quantizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = {"": dict(), " r2": dict(kind="residual", depth=2), " r4": dict(kind="residual", depth=4),
         " g4": dict(kind="grouped", groups=4)}


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

    def held_out(self, n: int, g: torch.Generator) -> torch.Tensor:
        return self.sample(n, g)


class Photos:
    """p x p x 3 patches (stride `stride`) of the bundled photos, LayerNormed. Tiles of `tile` pixels, every fourth
    one held out; patches never cross a tile, so training and held-out patches share no pixel."""

    def __init__(self, dim: int, tile: int = 64, stride: int = 2):
        p = int(round(math.sqrt(dim / 3)))
        if 3 * p * p != dim or p > tile:
            raise SystemExit(f"--dim {dim} is not 3 p^2 with p <= {tile}: photo patches need e.g. 768 (p=16)")
        train, held = [], []
        for path in sorted(glob.glob(os.path.join(REPO, "assets", "*.jpg"))):
            image = load_image(path)[0]
            tiles = image.unfold(1, tile, tile).unfold(2, tile, tile).flatten(1, 2).movedim(1, 0)  # (T, 3, tile, tile)
            rows = F.unfold(tiles, p, stride=stride).transpose(1, 2)  # (T, positions, 3 p^2)
            train.append(rows[torch.arange(len(rows)) % 4 != 3].flatten(0, 1))
            held.append(rows[3::4].flatten(0, 1))
        self.train_rows = F.layer_norm(torch.cat(train), (dim,))
        self.held_rows = F.layer_norm(torch.cat(held), (dim,))

    def sample(self, n: int, g: torch.Generator) -> torch.Tensor:
        return self.train_rows[torch.randint(self.train_rows.shape[0], (n,), generator=g)]

    def held_out(self, n: int, g: torch.Generator) -> torch.Tensor:
        """Up to n distinct held-out patches (all of them if there are fewer)."""
        return self.held_rows[torch.randperm(self.held_rows.shape[0], generator=g)[:n]]


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


def run_kmeans(kind: dict, k: int, fit_tokens: torch.Tensor, held_out: torch.Tensor, args) -> dict:
    """Offline k-means of the kind's structure, written out here (not through our quantizer classes)."""
    depth, groups = kind.get("depth", 1), kind.get("groups", 1)
    fit_parts, held_parts = fit_tokens.chunk(groups, dim=1), held_out.chunk(groups, dim=1)
    codes, recon = [], []
    for group, (fit_part, held_part) in enumerate(zip(fit_parts, held_parts, strict=True)):
        residual, held_residual = fit_part.clone(), held_part.clone()
        for level in range(depth):
            centroids = fit_kmeans(residual, k, iters=args.iters, seed=args.seed + group + level).centroids
            residual -= centroids[assign(residual, centroids)[0]]
            held_codes, _ = assign(held_residual, centroids)
            held_residual -= centroids[held_codes]
            codes.append(held_codes)
        recon.append(held_part - held_residual)
    return scores(held_out, torch.stack(codes, 1), torch.cat(recon, 1), k)


def run_ours(kind: dict, k: int, stream, fit_tokens, held_out, args, fit: bool = True) -> dict:
    torch.manual_seed(args.seed)
    config = QuantizerConfig(num_embeddings=k, decay=0.99, restart_window=args.restart_window, **kind)
    q = build_quantizer(config, held_out.shape[1]).to(held_out.device)
    if fit:  # else the first batch starts it (k-means on its tokens)
        q.fit(fit_tokens, args.iters, tokens_per_update=args.batch, seed=args.seed)
    q.train()
    restarts = 0
    for batch in stream:
        restarts += int(q(batch.to(held_out.device).unsqueeze(0)).restarted)
    q.eval()
    codes = q.encode(held_out)
    return {**scores(held_out, codes, q.lookup(codes).float(), k), "restarts": restarts}


def run_peer(kind: dict, k: int, stream, held_out, args) -> dict:
    from vector_quantize_pytorch import ResidualVQ, VectorQuantize

    torch.manual_seed(args.seed)
    options = dict(dim=held_out.shape[1], codebook_size=k, decay=0.99, kmeans_init=True, kmeans_iters=args.iters,
                   threshold_ema_dead_code=2)
    q = ResidualVQ(num_quantizers=kind["depth"], **options) if kind else VectorQuantize(**options)
    q = q.to(held_out.device).train()
    for batch in stream:
        q(batch.to(held_out.device).unsqueeze(0))
    q.eval()
    with torch.no_grad():
        recon, codes, _ = q(held_out.unsqueeze(0))  # vector-quantize-pytorch's (quantized, indices, loss)
    return scores(held_out, codes[0], recon[0].float(), k)


def targets(k: int, held_per_code: float, r: dict) -> list[list]:
    """The issue's targets for one source and K, from the rows in r (those that ran)."""
    rows = []

    def check(target: str, measured: str, holds: bool) -> None:
        rows.append([k, target, measured, "yes" if holds else "NO"])

    ours, ref = r.get("ours"), r.get("k-means")
    if ours and ref:
        ratio = ours["perplexity"] / ref["perplexity"]
        check("perplexity >= 0.9x k-means", f"{ratio:.2f}x", ratio >= 0.9)
        gap = round(100 * (ref["usage"] - ours["usage"]), 1)
        check("usage within 1 point of k-means", f"{0.0 - gap:+.1f} points", gap <= 1.0)
        ratio = ours["distortion"] / ref["distortion"]
        check("distortion <= 1.02x k-means", f"{ratio:.3f}x", ratio <= 1.02)
        if held_per_code >= 64:
            check("usage >= 99% (held-out >= 64 per code)", f"{100 * ours['usage']:.1f}%", ours["usage"] >= 0.99)
    if r.get("ours r4") and ours:
        ratio = r["ours r4"]["distortion"] / ours["distortion"]
        attainable = f"; offline r4 / k-means {r['k-means r4']['distortion'] / ref['distortion']:.2f}x" \
            if r.get("k-means r4") and ref else ""
        check("r4 distortion <= 0.5x depth 1", f"{ratio:.2f}x{attainable}", ratio <= 0.5)
    for mine, peer in (("ours", "vqp"), ("ours r4", "vqp r4")):
        if r.get(mine) and r.get(peer):
            ratio = r[mine]["distortion"] / r[peer]["distortion"]
            check(f"{mine} distortion below {peer}'s", f"{ratio:.3f}x", ratio < 1.0)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--k", default="256,1024", help="codebook sizes, comma-separated")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--batch", type=int, default=4096, help="tokens per step")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--fit-tokens", type=int, default=65536, help="stream tokens our fit and k-means see")
    parser.add_argument("--held-out", type=int, default=65536)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--restart-window", type=float, default=64.0,
                        help="our restart rule: tokens without a hit, per code (quantizer.restart_window)")
    parser.add_argument("--sources", default="synthetic,photos")
    parser.add_argument("--methods", default="k-means,ours,vqp,k-means r4,ours r4,vqp r4,k-means g4,ours g4",
                        help="comma-separated subset of the rows (e.g. 'k-means,ours,vqp' for single codebooks)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.k, args.dim, args.batch, args.steps, args.fit_tokens, args.held_out, args.iters = "64", 192, 512, 5, \
            2048, 2048, 5
    methods = args.methods.split(",")
    unknown = set(methods) - {base + suffix for suffix in KINDS for base in ("k-means", "ours", "ours 1st", "vqp")}
    unknown |= {"vqp g4", "vqp r2"} & set(methods)
    if unknown:
        raise SystemExit(f"unknown --methods {sorted(unknown)}")
    device = torch.device(args.device)
    print(f"machine: {machine()}; device {device}; D={args.dim}, {args.steps} steps of {args.batch} tokens, "
          f"fit on {args.fit_tokens} tokens, up to {args.held_out} held out")
    for source_name in args.sources.split(","):
        rows, checks = [], []
        for k in (int(v) for v in args.k.split(",")):
            source = Synthetic(args.dim, clusters=8 * k, seed=args.seed) if source_name == "synthetic" else \
                Photos(args.dim)
            held_out = source.held_out(args.held_out, torch.Generator().manual_seed(args.seed + 1)).to(device)
            g = torch.Generator().manual_seed(args.seed + 2)
            stream = [source.sample(args.batch, g) for _ in range(args.steps)]
            fit_tokens = torch.cat(stream)[: args.fit_tokens].to(device)  # the stream's first tokens, as in training
            results = {}
            for name in methods:
                base = "ours 1st" if name.startswith("ours 1st") else name.split(" ")[0]
                suffix = name[len(base):]
                start = time.perf_counter()
                if base == "k-means":
                    results[name] = run_kmeans(KINDS[suffix], k, fit_tokens, held_out, args)
                elif base.startswith("ours"):
                    results[name] = run_ours(KINDS[suffix], k, stream, fit_tokens, held_out, args,
                                             fit=base == "ours")
                else:
                    results[name] = run_peer(KINDS[suffix], k, stream, held_out, args)
                results[name]["seconds"] = time.perf_counter() - start
            for name, r in results.items():
                ref = results.get("k-means" + (name[len("ours 1st"):] if name.startswith("ours 1st") else
                                               name[len(name.split(" ")[0]):]))
                rows.append([k, name, f"{100 * r['usage']:.1f}%", f"{r['perplexity']:.0f}",
                             f"{r['perplexity'] / ref['perplexity']:.2f}x" if ref else "-", f"{r['distortion']:.3f}",
                             f"{r['distortion'] / ref['distortion']:.3f}x" if ref else "-", f"{r['bits']:.0f}",
                             r.get("restarts", "-"), f"{r['seconds']:.0f}"])
            checks += targets(k, held_out.shape[0] / k, results)
        print_table(f"codebook quality, {source_name} ({held_out.shape[0]} held-out tokens; 'vs k-means': against "
                    f"the offline k-means of the same kind)",
                    ["K", "method", "usage", "perplexity", "vs k-means", "rel. distortion", "vs k-means",
                     "bits/token", "restarts", "s"], rows)
        print_table(f"targets, {source_name}", ["K", "target", "measured", "holds"], checks)


if __name__ == "__main__":
    main()
