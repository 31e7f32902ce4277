"""Exact nearest-code search: argmin_k ||z - e_k||^2 for every row of z, in bounded memory."""

from __future__ import annotations

import torch

# The search never materialises more than this many distances at once (64 MiB in fp32).
DEFAULT_MAX_DISTANCES_PER_CHUNK = 1 << 24


def nearest_code(
    z: torch.Tensor,
    codebook: torch.Tensor,
    max_distances: int = DEFAULT_MAX_DISTANCES_PER_CHUNK,
    codebook_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """Index of the nearest code (squared L2) for every row of z (M, D), searched in row chunks.

    argmin_k ||z - e_k||^2 = argmin_k (||e_k||^2 - 2 z.e_k): ||z||^2 is the same for every k, so each chunk
    costs one GEMM (addmm, the norms added as its bias) and an argmin, and holds at most `max_distances`
    distances. One workspace serves every chunk: fresh large buffers cost page faults on the CPU.
    `codebook_sq` (the squared norms of the codes) may be passed in when cached.
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
