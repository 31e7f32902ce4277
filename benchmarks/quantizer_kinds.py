"""Quantizer kinds side by side at matched bits per token (issue 29, point 6): the EMA codebook (vqrae's default)
against the other kinds of the registry, on the same seeded latent stream, scored on held-out tokens.

Every method goes through the quantizer contract alone, as training does: the kind's offline fit on the stream's
first --fit-tokens tokens (k-means for codebooks, a PCA for FSQ's projections), then --steps batches of the stream
in training mode (the EMA updates and restarts of codebooks; an Adam step on the kind's own loss for kinds with
trained parameters: FSQ's projections, SimVQ's map, Gumbel's codebook and logits), then encode + lookup of the
held-out tokens.

Sources: `synthetic` and `photos`, codebook_quality.py's (a Zipf mixture of clusters near a 48-d subspace; patches of
the bundled photos, held-out tiles never trained on). Methods at each --bits b:
    ema          quantizer.kind=single, K = 2^b
    grouped 2    quantizer.kind=grouped, groups=2, K = 2^(b/2) each
    fsq          quantizer.kind=fsq, the levels of FSQ's paper nearest b bits (see FSQ_LEVELS)
    fsq binary   quantizer.kind=fsq, b levels of 2: LFQ's (MAGVIT-v2) binary codes, without its entropy penalty
    lfq          the same with MAGVIT-v2's entropy penalty (quantizer.entropy_weight=0.1, MAGVIT-v2's weight)
    simvq        quantizer.kind=simvq, K = 2^b codes of the tokens' width: the fitted basis times a learned map
    gumbel distance / linear   quantizer.kind=gumbel, K = 2^b, logits from the distance to each code or a linear
                 head, tau annealed from 1 to 1/16 over the stream, hard samples, KL weight 0.01
Reported: held-out usage (codes used / vocabulary; grouped: per codebook), perplexity, relative distortion
mean ||z - q(z)||^2 / mean ||z - mean z||^2, bits per token, seconds; then the issue's targets.

    python benchmarks/quantizer_kinds.py                      # CPU scale: D = 192, 10 and 14 bits
    python benchmarks/quantizer_kinds.py --device cuda --dim 768 --bits 10,14,16 --steps 400 --batch 8192 \\
        --fit-tokens 262144 --held-out 65536
    python benchmarks/quantizer_kinds.py --bits 16 --methods fsq,lfq   # some methods (and ema, the reference)
    python benchmarks/quantizer_kinds.py --quick              # smoke run
"""

from __future__ import annotations

import argparse
import time

import torch
from codebook_quality import Photos, Synthetic, scores
from common import machine, print_table

from stage1.model.config import QuantizerConfig
from stage1.model.quantizers import build_quantizer

FSQ_LEVELS = {8: [8, 6, 5], 10: [8, 5, 5, 5], 12: [7, 5, 5, 5, 5], 14: [8, 8, 8, 6, 5], 16: [8, 8, 8, 5, 5, 5]}


def configs(bits: int, steps: int) -> dict[str, QuantizerConfig]:
    """Each method's quantizer at `bits` bits per token (Gumbel's temperature annealed over the `steps`)."""
    out = {"ema": QuantizerConfig(num_embeddings=2**bits, decay=0.99)}
    if bits % 2 == 0:
        out["grouped 2"] = QuantizerConfig(kind="grouped", groups=2, num_embeddings=2 ** (bits // 2), decay=0.99)
    if bits in FSQ_LEVELS:
        out["fsq"] = QuantizerConfig(kind="fsq", levels=FSQ_LEVELS[bits])
    out["fsq binary"] = QuantizerConfig(kind="fsq", levels=[2] * bits)  # LFQ's codes, without its entropy term
    out["lfq"] = QuantizerConfig(kind="fsq", levels=[2] * bits, entropy_weight=0.1)
    out["simvq"] = QuantizerConfig(kind="simvq", num_embeddings=2**bits)
    for logits in ("distance", "linear"):
        out[f"gumbel {logits}"] = QuantizerConfig(kind="gumbel", num_embeddings=2**bits, logits=logits,
                                                  tau_steps=steps)
    return out


def run(config: QuantizerConfig, stream: list[torch.Tensor], fit_tokens: torch.Tensor, held_out: torch.Tensor,
        args) -> dict:
    torch.manual_seed(args.seed)
    q = build_quantizer(config, held_out.shape[1]).to(held_out.device)
    if q.fit_need == "offline":
        q.fit(fit_tokens, args.iters, tokens_per_update=args.batch, seed=args.seed)
    groups = q.trained_parameters()
    optimizer = torch.optim.Adam([p for g in groups for p in g["params"]], lr=args.lr) if groups else None
    q.train()
    for batch in stream:
        out = q(batch.to(held_out.device))
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
    q.eval()
    with torch.no_grad():
        codes = q.encode(held_out)
        result = scores(held_out, codes, q.lookup(codes).float(), q.layout.vocab_size)
    return {**result, "bits": q.layout.bits_per_image(1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bits", default="10,14", help="bits per token, comma-separated")
    parser.add_argument("--dim", type=int, default=192, help="token width (photos: 3 p^2)")
    parser.add_argument("--batch", type=int, default=4096, help="tokens per step")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--fit-tokens", type=int, default=65536, help="stream tokens the offline fits see")
    parser.add_argument("--held-out", type=int, default=32768)
    parser.add_argument("--iters", type=int, default=10, help="Lloyd iterations of the codebook fits")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's, for kinds with trained parameters")
    parser.add_argument("--sources", default="synthetic,photos")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=None, help="some of the methods, comma-separated (default: all; ema is "
                                                         "always run, every ratio is to it)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.bits, args.dim, args.batch, args.steps, args.fit_tokens, args.held_out, args.iters = "8", 48, 512, 5, \
            2048, 2048, 3
    device = torch.device(args.device)
    methods = set(configs(14, 1)) if args.methods is None else {"ema", *args.methods.split(",")}
    if methods - set(configs(14, 1)):
        raise SystemExit(f"--methods: unknown {sorted(methods - set(configs(14, 1)))}; from {list(configs(14, 1))}")
    print(f"machine: {machine()}; device {device}; D={args.dim}, {args.steps} steps of {args.batch} tokens, "
          f"fits on {args.fit_tokens} tokens, up to {args.held_out} held out")
    for source_name in args.sources.split(","):
        source = Synthetic(args.dim, clusters=4096, seed=args.seed) if source_name == "synthetic" else Photos(args.dim)
        held_out = source.held_out(args.held_out, torch.Generator().manual_seed(args.seed + 1)).to(device)
        g = torch.Generator().manual_seed(args.seed + 2)
        stream = [source.sample(args.batch, g) for _ in range(args.steps)]
        fit_tokens = torch.cat(stream)[: args.fit_tokens].to(device)  # the stream's first tokens, as in training
        rows, checks = [], []
        for bits in (int(b) for b in args.bits.split(",")):
            results = {}
            for name, config in configs(bits, args.steps).items():
                if name not in methods:
                    continue
                start = time.perf_counter()
                results[name] = {**run(config, stream, fit_tokens, held_out, args),
                                 "seconds": time.perf_counter() - start}
            for name, r in results.items():
                rows.append([bits, name, f"{r['bits']:.2f}", f"{100 * r['usage']:.1f}%", f"{r['perplexity']:.0f}",
                             f"{r['distortion']:.4f}", f"{r['distortion'] / results['ema']['distortion']:.3f}x",
                             f"{r['seconds']:.0f}"])
            best = min(results, key=lambda n: results[n]["distortion"])
            checks.append([bits, "lowest held-out distortion", best, "ema stays the default" if best == "ema" else
                           f"{best} beats ema"])
            if bits == 14:
                for name, r in results.items():
                    checks.append([bits, f"{name}: usage >= 99%", f"{100 * r['usage']:.1f}%",
                                   "yes" if r["usage"] >= 0.99 else "NO"])
        per_code = held_out.shape[0] / 2 ** max(int(b) for b in args.bits.split(","))
        print_table(f"quantizer kinds at matched bits, {source_name} ({held_out.shape[0]} held-out tokens, "
                    f"{per_code:.1f} per code at the most bits)",
                    ["bits", "method", "bits/token", "usage", "perplexity", "rel. distortion", "vs ema", "s"], rows)
        print_table(f"targets, {source_name}", ["bits", "target", "measured", "holds"], checks)


if __name__ == "__main__":
    main()
