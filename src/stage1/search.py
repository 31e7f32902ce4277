"""Exact nearest-code search: argmin_k ||z - e_k||^2 for every row of z, in bounded memory.

Two ways to the same indices. `fp32_nearest_code` is the reference: one fp32 GEMM per chunk of rows and an argmin.
`certified_nearest_code` runs that GEMM in bf16 (tensor cores on a GPU, several times the fp32 rate), keeps a short
list of candidates per row, re-ranks them in fp32, and proves for each row that the answer is the fp32 search's;
rows it cannot prove go to the fp32 search. `nearest_code` picks the certified search on CUDA.

The certificate. Write d_k = ||e_k||^2 - 2 z.e_k (the distance less ||z||^2, which no k changes), u = 2^-24 (fp32
unit roundoff), and g = (D + 2) u for a D-term dot product with a bias and a scale (Higham's gamma_n, n u to first
order, for any summation order). Cauchy-Schwarz bounds every sum of |z_j e_kj| by ||z|| max_k ||e_k||.
  fp32 search: its computed d_k is within E32 = g (max_k ||e_k||^2 + 2 ||z|| max_k ||e_k||) of d_k.
  bf16 scores: distances are the same after moving z and the codes by one vector, so both are centred on the codes'
    mean c first (smaller norms, a tighter bound). Inputs rounded to bf16 (unit roundoff v = 2^-8, plus the fp32
    centring) and products summed in fp32: |P~ - P| <= a S with S = ||z - c|| max_k ||e_k - c|| and
    a = (2 v + v^2 + g)(1 + g)(1 + w) + w, where w = v if the GEMM's output is rounded to bf16 (CPU) and 0 where it
    is written in fp32 (CUDA, out_dtype). So each score is within Elp = 2 a S + g (max_k ||e_k - c||^2 + 2 S).
  re-rank: r_k = sum_j (z_j - e_kj)^2 in fp32 is within (g + 3u) r_k of ||z - e_k||^2: relative to the distance
    itself, far tighter than either form above.
Take the m + 1 lowest scores s_(0) <= ... <= s_(m), the first m as the short list. Certificate A: if
s_(m) - s_(0) > 2 (Elp + E32), every code left out is more than 2 E32 farther than the true nearest one, which is
in the list, so neither the true argmin nor the fp32 search's can be outside it. Certificate B: if the fp32 re-rank's
best two differ by more than their two re-rank bounds plus 2 E32, its best is the true nearest code and every other
code is more than 2 E32 farther, so the fp32 search picks it too. Both bounds are doubled in the code, to spare.
"""

from __future__ import annotations

import torch

# The search never materialises more than this many distances at once (64 MiB in fp32).
DEFAULT_MAX_DISTANCES_PER_CHUNK = 1 << 24
SHORTLIST = 16  # candidates per row that the certified search re-ranks in fp32
FP32_ROUNDOFF, BF16_ROUNDOFF = 2.0**-24, 2.0**-8
SPARE = 2.0  # every error bound is doubled


def nearest_code(
    z: torch.Tensor,
    codebook: torch.Tensor,
    max_distances: int = DEFAULT_MAX_DISTANCES_PER_CHUNK,
    codebook_sq: torch.Tensor | None = None,
    method: str = "auto",
) -> torch.Tensor:
    """Index of the nearest code (squared L2) for every row of z (M, D): `fp32` or `certified` (the same indices),
    `auto` the certified search on CUDA (bf16 tensor cores) and the fp32 one elsewhere."""
    if method not in ("auto", "fp32", "certified"):
        raise ValueError(f"search method must be 'auto', 'fp32' or 'certified', got {method!r}")
    if method == "certified" or (method == "auto" and z.is_cuda):
        return certified_nearest_code(z, codebook, max_distances, codebook_sq)[0]
    return fp32_nearest_code(z, codebook, max_distances, codebook_sq)


def fp32_nearest_code(
    z: torch.Tensor,
    codebook: torch.Tensor,
    max_distances: int = DEFAULT_MAX_DISTANCES_PER_CHUNK,
    codebook_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference search, in row chunks.

    argmin_k ||z - e_k||^2 = argmin_k (||e_k||^2 - 2 z.e_k): ||z||^2 is the same for every k, so each chunk
    costs one GEMM (addmm, the norms added as its bias) and an argmin, and holds at most `max_distances`
    distances. One workspace serves every chunk: fresh large buffers cost page faults on the CPU.
    `codebook_sq` (the squared norms of the codes) may be passed in when cached. On CUDA this must be a real fp32
    GEMM: leave torch.backends.cuda.matmul.allow_tf32 off (PyTorch's default).
    """
    if codebook_sq is None:
        codebook_sq = codebook.pow(2).sum(dim=1)
    rows = min(max(1, max_distances // codebook.shape[0]), max(z.shape[0], 1))
    indices = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    workspace = torch.empty(rows, codebook.shape[0], dtype=torch.result_type(z, codebook), device=z.device)
    for start in range(0, z.shape[0], rows):
        chunk = z[start : start + rows]
        distances = workspace[: chunk.shape[0]]
        torch.addmm(codebook_sq, chunk, codebook.t(), beta=1.0, alpha=-2.0, out=distances)
        indices[start : start + rows] = distances.argmin(dim=1)
    return indices


def certified_nearest_code(
    z: torch.Tensor,
    codebook: torch.Tensor,
    max_distances: int = DEFAULT_MAX_DISTANCES_PER_CHUNK,
    codebook_sq: torch.Tensor | None = None,
    shortlist: int = SHORTLIST,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32_nearest_code's indices for fp32 z (M, D) and codebook (K, D), from one bf16 GEMM and an fp32 re-rank of
    `shortlist` candidates per row (the module docstring derives the certificate); rows without a certificate are
    searched in fp32. Returns the indices and which rows were certified."""
    z, codebook = z.float(), codebook.float()
    k, dim = codebook.shape
    if codebook_sq is None:
        codebook_sq = codebook.pow(2).sum(dim=1)
    m = min(shortlist, k - 1)
    if m < 1 or z.shape[0] == 0:  # one code, or no rows: nothing to shortlist
        return fp32_nearest_code(z, codebook, max_distances, codebook_sq), torch.ones(z.shape[0], dtype=torch.bool,
                                                                                        device=z.device)
    g = (dim + 2) * FP32_ROUNDOFF
    g = g / (1 - g)
    center = codebook.mean(dim=0)
    centered = codebook - center
    centered_sq = centered.pow(2).sum(dim=1)
    centered_low = centered.to(torch.bfloat16)
    code_norm, centered_norm = codebook_sq.max().sqrt(), centered_sq.max().sqrt()
    exact_output = z.is_cuda  # CUDA writes the bf16 GEMM's fp32 sums out as they are; the CPU rounds them to bf16
    v = BF16_ROUNDOFF + 2 * FP32_ROUNDOFF  # rounding to bf16 after the fp32 centring
    w = 0.0 if exact_output else BF16_ROUNDOFF
    a = (2 * v + v * v + g) * (1 + g) * (1 + w) + w

    indices = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    certified = torch.empty(z.shape[0], dtype=torch.bool, device=z.device)
    rows = min(max(1, max_distances // max(k, shortlist * dim)), z.shape[0])
    for start in range(0, z.shape[0], rows):
        chunk = z[start : start + rows]
        zc = chunk - center
        s = zc.norm(dim=1) * centered_norm
        low = zc.to(torch.bfloat16)
        products = torch.mm(low, centered_low.t(), out_dtype=torch.float32) if exact_output else \
            torch.mm(low, centered_low.t()).float()
        scores = torch.sub(centered_sq, products, alpha=2.0)
        top, candidates = scores.topk(m + 1, dim=1, largest=False, sorted=True)
        e_low = SPARE * (2 * a * s + g * (centered_sq.max() + 2 * s))
        e_32 = SPARE * g * (code_norm**2 + 2 * chunk.norm(dim=1) * code_norm)
        holds = top[:, m] - top[:, 0] > 2 * (e_low + e_32)  # certificate A
        best = candidates[:, 0]
        if m > 1:  # a list of one needs no re-rank: certificate A alone proves it
            candidates = candidates[:, :m]
            reranked = (chunk.unsqueeze(1) - codebook[candidates]).pow(2).sum(dim=2)  # (rows, m)
            best2, at = reranked.topk(2, dim=1, largest=False, sorted=True)
            e_rerank = SPARE * (g + 3 * FP32_ROUNDOFF) * best2
            holds &= best2[:, 1] - best2[:, 0] > e_rerank.sum(dim=1) + 2 * e_32  # certificate B
            best = candidates.gather(1, at[:, :1]).squeeze(1)
        indices[start : start + rows] = best
        certified[start : start + rows] = holds
    unproven = (~certified).nonzero().squeeze(1)
    if unproven.numel():
        indices[unproven] = fp32_nearest_code(z[unproven], codebook, max_distances, codebook_sq)
    return indices, certified
