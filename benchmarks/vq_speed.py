"""Speed of the quantizer, measured side by side in one run.

    python benchmarks/vq_speed.py [--device cpu|cuda] [--dtype fp32|bf16] [--quick]

Rows:
  1. VQ forward in training mode (EMA update) vs vector_quantize_pytorch.VectorQuantize (EMA, same K, D,
     decay, plain straight-through): target >= 1.5x faster.
  2. nearest-code search alone vs a bare torch.mm(z, codebook.T) of the same shape: target <= 1.3x its time.
  5. exactness: our indices vs a float64 brute-force argmin; a disagreement counts only if it is not a
     near-tie that fp32 cannot resolve: a distance gap above 1e-5 of ||z||^2 + max ||e||^2, the scale of fp32's
     rounding in ||e||^2 - 2 z.e (codes drawn from the very features sit at distance ~0 from some of them, so a
     gap relative to the distance itself would count fp32 rounding as errors).
  6. the certified bf16 search (what `nearest_code` runs on CUDA; on a codebook of distinct codes) vs a bare bf16
     torch.mm of the same shape, the tensor-core limit: target on a GPU <= 1.2x its time, with indices identical
     to the fp32 search's (the share of rows certified and the fp32 search's time are printed beside it). On the
     CPU the fp32 search stays the default.
"""

from __future__ import annotations

import argparse

import torch
from common import machine, print_table, time_interleaved

from stage1.model.config import QuantizerConfig
from stage1.model.quantizers import VectorQuantizer
from stage1.model.search import certified_nearest_code, fp32_nearest_code, nearest_code

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def features(n: int, codebook: torch.Tensor, noise: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Features scattered around codebook entries, as encoder latents are around their codes."""
    g = torch.Generator(device=codebook.device).manual_seed(seed)
    picks = torch.randint(0, codebook.shape[0], (n,), generator=g, device=codebook.device)
    return codebook[picks] + noise * torch.randn(n, codebook.shape[1], generator=g, device=codebook.device)


def brute_force_check(z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor) -> tuple[int, int]:
    """(disagreements, of which real ones): float64 distances, chunked."""
    z64, e64 = z.double(), codebook.double()
    e_sq = e64.pow(2).sum(1)
    wrong = real = 0
    for start in range(0, z.shape[0], 1024):
        chunk = z64[start : start + 1024]
        d = (chunk.pow(2).sum(1, keepdim=True) - 2 * chunk @ e64.T + e_sq).clamp_min(0)
        best = d.argmin(1)
        ours = indices[start : start + 1024].to(best.device)
        differ = ours != best
        wrong += int(differ.sum())
        if differ.any():
            rows = differ.nonzero().squeeze(1)
            gap = d[rows, ours[rows]] - d[rows, best[rows]]
            real += int((gap > 1e-5 * (chunk[rows].pow(2).sum(1) + e_sq.max())).sum())
    return wrong, real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=DTYPES)
    parser.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    k, d, n = (2048, 128, 1024) if args.quick else (16384, 768, 8192)
    torch.manual_seed(0)
    print(f"machine: {machine()}; device {device}, inputs {args.dtype}")

    # A started codebook (its random placeholders, marked started) and no restarts: the update itself is timed.
    config = QuantizerConfig(num_embeddings=k, commitment_cost=0.25, decay=0.99, restart_window=0)
    ours = VectorQuantizer(config, d).to(device).train()
    ours.initialized.fill_(True)
    from vector_quantize_pytorch import VectorQuantize

    peer = VectorQuantize(dim=d, codebook_size=k, decay=0.99, commitment_weight=0.25, rotation_trick=False)
    peer = peer.to(device).train()
    z = features(n, ours.codebook).to(dtype).unsqueeze(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def run_ours():
        with autocast:
            ours(z)

    def run_peer():
        with autocast:
            peer(z)

    t = time_interleaved({"ours": run_ours, "peer": run_peer}, repeats=args.repeats, device=device)
    speedup = t["peer"] / t["ours"]
    rows = [["1. VQ forward + EMA", f"K={k} D={d} N={n}", f"{t['ours'] * 1e3:.1f} ms",
             f"vector-quantize-pytorch {t['peer'] * 1e3:.1f} ms", f"{speedup:.2f}x faster", ">= 1.5x",
             "yes" if speedup >= 1.5 else "NO"]]

    codebook = ours.codebook.to(dtype)
    flat = z[0]
    t = time_interleaved(
        {"search": lambda: nearest_code(flat.float(), codebook.float()),
         "mm": lambda: torch.mm(flat, codebook.T)},
        repeats=args.repeats, device=device,
    )
    ratio = t["search"] / t["mm"]
    rows.append(["2. search only", f"K={k} D={d} N={n}", f"{t['search'] * 1e3:.1f} ms",
                 f"torch.mm {t['mm'] * 1e3:.1f} ms", f"{ratio:.2f}x the GEMM", "<= 1.3x",
                 "yes" if ratio <= 1.3 else "NO"])

    indices = nearest_code(flat.float(), ours.codebook)
    wrong, real = brute_force_check(flat.float(), ours.codebook, indices)
    rows.append(["5. exactness", f"K={k} D={d} N={n}", f"{wrong} differ from fp64", "brute-force argmin",
                 f"{real} beyond near-ties", "0", "yes" if real == 0 else "NO"])
    # Distinct codes, as after a codebook fit (the forward above drew its codes from a batch of N < K features, so
    # it holds duplicates: exact ties, which the certificate rightly sends to the fp32 search).
    e32 = torch.randn(k, d, device=device, generator=torch.Generator(device=device).manual_seed(1))
    z32 = features(n, e32, seed=2)
    z16, e16 = z32.bfloat16(), e32.bfloat16()
    t = time_interleaved(
        {"certified": lambda: certified_nearest_code(z32, e32), "fp32": lambda: fp32_nearest_code(z32, e32),
         "mm": lambda: torch.mm(z16, e16.T)},
        repeats=args.repeats, device=device,
    )
    indices, certified = certified_nearest_code(z32, e32)
    differ = int((indices != fp32_nearest_code(z32, e32)).sum())
    ratio = t["certified"] / t["mm"]
    holds = "NO" if differ else ("yes" if ratio <= 1.2 else "NO") if device.type == "cuda" else "n/a (CPU)"
    rows.append(["6. certified search", f"K={k} D={d} N={n}", f"{t['certified'] * 1e3:.1f} ms",
                 f"bf16 torch.mm {t['mm'] * 1e3:.1f} ms; fp32 search {t['fp32'] * 1e3:.1f} ms",
                 f"{ratio:.2f}x the GEMM; {certified.float().mean().item():.1%} certified; {differ} differ",
                 "<= 1.2x (GPU), 0 differ",
                 holds])
    print_table("quantizer speed", ["case", "shape", "ours", "peer", "ratio", "target", "holds"], rows)


if __name__ == "__main__":
    main()
