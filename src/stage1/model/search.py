"""Exact nearest-code search: argmin_k ||z - e_k||^2 for every row of z, in bounded memory.

Two ways to the same indices. `fp32_nearest_code` is the reference: one fp32 GEMM per chunk of rows and an argmin.
`certified_nearest_code` runs that GEMM in bf16 (tensor cores on a GPU, several times the fp32 rate) and proves for
each row that its answer is the fp32 search's; rows it cannot prove go to the fp32 search. `nearest_code` picks the
certified search on CUDA.

The certificate. Write d_k = ||e_k||^2 - 2 z.e_k (the distance less ||z||^2, which no k changes), u = 2^-24 (fp32
unit roundoff), v = 2^-8 (bf16's), and g = (D + 2) u for a D-term dot product with a bias and a scale (Higham's
gamma_n, n u to first order, for any summation order). Cauchy-Schwarz bounds every sum of |z_j e_kj| by
||z|| max_k ||e_k||.
  fp32 search: its computed d_k is within E32 = g (max_k ||e_k||^2 + 2 ||z|| max_k ||e_k||) of d_k.
  bf16 scores: distances are the same after moving z and the codes by one vector, so both are centred on the codes'
    mean c first (smaller norms, a tighter bound). Inputs rounded to bf16 (roundoff v + 2u with the fp32 centring),
    products summed in fp32 with the bias ||e_k - c||^2 (rounded to bf16) added, the result rounded to bf16: with
    S = ||z - c|| max_k ||e_k - c|| and B = max_k ||e_k - c||^2, each score is within
    Elp = 2 (2v' + v'^2 + g)(1 + g) S + (2v + g)(B + 2S) of d_k (v' = v + 2u).
  re-rank: r_k = sum_j (z_j - e_kj)^2 in fp32 is within (g + 3u) r_k of ||z - e_k||^2: relative to the distance
    itself, far tighter than either form above.
A code whose score exceeds the lowest score by more than 2 (Elp + E32) is more than 2 E32 farther than the true
nearest code, so neither the true argmin nor the fp32 search's can be it (certificate A). So a row with one code in
that band is proven by the bf16 argmin alone, which is most rows; a row with 2 to `shortlist` codes in it has them
re-ranked in fp32, and if the best two differ by more than their two re-rank bounds plus 2 E32, the best is the true
nearest code and every other code is more than 2 E32 farther, so the fp32 search picks it too (certificate B). Every
bound is doubled in the code, to spare. On CUDA the search turns off bf16 reduced-precision reductions in split-K
GEMMs (torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction) while it runs: they would add error the
bound does not count.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

# The search never materialises more than this many distances at once (64 MiB in fp32).
DEFAULT_MAX_DISTANCES_PER_CHUNK = 1 << 24
SHORTLIST = 64  # most candidates a row may have for the certified search to re-rank them in fp32
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
    dtype = torch.promote_types(z.dtype, codebook.dtype)  # not torch.result_type: a graph break under compile
    workspace = torch.empty(rows, codebook.shape[0], dtype=dtype, device=z.device)
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
    """fp32_nearest_code's indices for fp32 z (M, D) and codebook (K, D), from one bf16 GEMM, and an fp32 re-rank of
    up to `shortlist` candidates where the bf16 scores are too close to call (the module docstring derives the
    certificate); rows without a certificate are searched in fp32. Returns the indices and which rows were
    certified."""
    z, codebook = z.float(), codebook.float()
    k, dim = codebook.shape
    if codebook_sq is None:
        codebook_sq = codebook.pow(2).sum(dim=1)
    indices = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    certified = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
    g = (dim + 2) * FP32_ROUNDOFF
    g, v = g / (1 - g), BF16_ROUNDOFF + 2 * FP32_ROUNDOFF
    center = codebook.mean(dim=0)
    centered = codebook - center
    centered_sq = centered.pow(2).sum(dim=1)
    centered_low, bias_low = centered.to(torch.bfloat16), centered_sq.to(torch.bfloat16)
    code_norm, centered_max = codebook_sq.max().sqrt(), centered_sq.max()
    rows = min(max(1, max_distances // k), max(z.shape[0], 1))
    with _exact_bf16_reductions(z.device):
        for start in range(0, z.shape[0], rows):
            chunk = z[start : start + rows]
            zc = chunk - center
            s = zc.norm(dim=1) * centered_max.sqrt()
            scores = torch.addmm(bias_low, zc.to(torch.bfloat16), centered_low.t(), beta=1.0, alpha=-2.0)
            e_32 = SPARE * g * (codebook_sq.max() + 2 * chunk.norm(dim=1) * code_norm)
            e_low = SPARE * (2 * (2 * v + v * v + g) * (1 + g) * s + (2 * BF16_ROUNDOFF + g) * (centered_max + 2 * s))
            lowest, best = scores.min(dim=1)
            band = lowest.float() + 2 * (e_low + e_32)
            band = (band + band.abs() * 2.0**-7).to(torch.bfloat16)  # widened so that rounding cannot narrow it
            within = (scores <= band.unsqueeze(1)).sum(dim=1)  # compared in bf16: no fp32 copy of the scores
            indices[start : start + rows] = best
            certified[start : start + rows] = within == 1  # certificate A with a list of one
            close_rows = ((within > 1) & (within <= shortlist)).nonzero().squeeze(1)
            for part in close_rows.split(max(1, max_distances // (shortlist * dim))) if close_rows.numel() else ():
                # Every code of these rows' band is among their `shortlist` lowest scores: re-ranked in fp32.
                candidates = scores[part].topk(min(shortlist, k), dim=1, largest=False).indices
                reranked = (chunk[part].unsqueeze(1) - codebook[candidates]).pow(2).sum(dim=2)
                best2, at = reranked.topk(2, dim=1, largest=False, sorted=True)
                bound = SPARE * (g + 3 * FP32_ROUNDOFF) * best2.sum(dim=1) + 2 * e_32[part]
                indices[start + part] = candidates.gather(1, at[:, :1]).squeeze(1)
                certified[start + part] = best2[:, 1] - best2[:, 0] > bound  # certificate B
    unproven = (~certified).nonzero().squeeze(1)
    if unproven.numel():
        indices[unproven] = fp32_nearest_code(z[unproven], codebook, max_distances, codebook_sq)
    return indices, certified


@contextmanager
def _exact_bf16_reductions(device: torch.device):
    """bf16 GEMMs on CUDA that sum in fp32 all the way (no reduced-precision split-K reduction), then as before."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_bf16_reduced_precision_reduction
    matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        matmul.allow_bf16_reduced_precision_reduction = before
