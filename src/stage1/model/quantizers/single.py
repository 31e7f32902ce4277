"""EMA vector quantizer: each feature snaps to its nearest codebook entry.

The codebook is not trained by gradients. It follows the exponential-moving-average rule of the VQ-VAE
paper's appendix (as Sonnet's `VectorQuantizerEMA` implements it), with Laplace smoothing of the cluster
sizes:

    N_k   <- decay * N_k   + (1 - decay) * n_k              n_k: features assigned to code k in the batch
    m_k   <- decay * m_k   + (1 - decay) * sum_{i->k} z_i
    N'_k   = (N_k + eps) / (sum_j N_j + K * eps) * sum_j N_j
    e_k    = m_k / N'_k

Under torch.distributed the batch statistics n_k and sum z_i are summed over ranks before the update, so
every rank computes the same codebook. Wrap a model in DistributedDataParallel without its per-forward buffer
broadcast (stage1.base.distributed.wrap_ddp): the quantizer keeps its buffers in sync itself, and a broadcast from
rank 0 would only cost time (and hide a bug if they ever diverged).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ...base.distributed import all_ranks_true, all_reduce_sum, gather_rows, is_distributed
from ..kmeans import LLOYD_ITERS, fit_kmeans
from ..search import DEFAULT_MAX_DISTANCES_PER_CHUNK, nearest_code
from .base import Quantizer, QuantizerOutput, channels_last_rows, code_use

if TYPE_CHECKING:
    from ..config import QuantizerConfig

EMA_BUFFERS = ("embedding", "ema_cluster_size", "ema_embed_sum")
START_TOKENS_PER_CODE = 8  # a start without a fit: k-means of this many tokens per code of the first batches


def farthest_tokens(flat: torch.Tensor, distances: torch.Tensor, count: int) -> torch.Tensor:
    """`count` tokens where new codes cut the distortion most, the same on every rank: each rank draws candidates
    with probability proportional to their squared distance to their code (D^2 sampling, k-means++'s rule, so one
    outlier does not take them all), every rank's candidates are gathered, and the `count` farthest of them kept."""
    share = min(count, flat.shape[0])
    picks = torch.multinomial(distances.float() + 1e-12, share, replacement=False)
    candidates = gather_rows(torch.cat([flat[picks], distances[picks, None].to(flat.dtype)], dim=1))
    order = candidates[:, -1].argsort(descending=True, stable=True)
    return candidates[order[: min(count, len(order))], :-1].repeat(-(-count // len(order)), 1)[:count]


class VectorQuantizer(Quantizer):
    """Nearest-neighbour quantizer with an EMA codebook and straight-through gradients (quantizer.kind single).

    VectorQuantizer(QuantizerConfig(num_embeddings=K, ...), D). forward(z) takes channels-last features (..., D),
    e.g. (B, N, D) tokens: z_q has z's shape and dtype, indices z's shape without D (long). The EMA update runs only
    in training mode.
    """

    kind = "single"
    options = ("cosine",)

    def __init__(self, config: QuantizerConfig, embedding_dim: int):
        super().__init__()
        if not isinstance(embedding_dim, int) or embedding_dim < 1:
            raise ValueError(f"embedding_dim must be a positive integer, got {embedding_dim!r}")
        self.num_embeddings = config.num_embeddings
        self.embedding_dim = embedding_dim
        self.commitment_cost = config.commitment_cost
        self.decay = config.decay
        self.epsilon = config.epsilon
        self.cosine = config.cosine
        self.restart_window = config.restart_window
        self.max_distances_per_chunk = DEFAULT_MAX_DISTANCES_PER_CHUNK  # a memory bound, not a model value

        # Placeholders until the first training batch (or set_codebook / load_state_dict) puts codes on the data.
        embedding = torch.randn(config.num_embeddings, embedding_dim)
        self.register_buffer("embedding", embedding)
        self.register_buffer("ema_cluster_size", torch.ones(config.num_embeddings))
        self.register_buffer("ema_embed_sum", embedding.clone())
        self.register_buffer("tokens_since_hit", torch.zeros(config.num_embeddings, dtype=torch.long))
        self.register_buffer("initialized", torch.tensor(False))
        self._norms_cache: tuple | None = None
        self._gathered: list[torch.Tensor] = []  # the first batches' tokens, until the codebook can start on them

    @property
    def codebook(self) -> torch.Tensor:
        return self.embedding

    @property
    def started(self) -> bool:
        return bool(self.initialized)

    def describe(self) -> str:
        return f"one EMA codebook of {self.num_embeddings} codes" + (", cosine" if self.cosine else "")

    def _codebook_sq(self) -> torch.Tensor:
        """Squared code norms, recomputed only when the codebook changed (its version counter moves on every
        in-place write: EMA updates, restarts, load_state_dict). Under torch.compile, computed in the graph (a
        version counter is not traceable)."""
        if torch.compiler.is_compiling():
            return self.embedding.pow(2).sum(dim=1)
        cache = self._norms_cache
        if cache is None or cache[0] is not self.embedding or cache[1] != self.embedding._version:
            cache = self._norms_cache = (self.embedding, self.embedding._version, self.embedding.pow(2).sum(dim=1))
        return cache[2]

    def _search(self, flat: torch.Tensor) -> torch.Tensor:
        return nearest_code(flat, self.embedding, self.max_distances_per_chunk, self._codebook_sq())

    def _apply(self, fn, recurse=True):
        # EMA statistics must stay fp32 even if the model is cast to bf16: keep the fp32 values and only
        # follow the device move.
        kept = {name: self._buffers[name] for name in EMA_BUFFERS}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new.dtype != torch.float32:
                self._buffers[name] = old.to(device=new.device, dtype=torch.float32)
        return self

    def _flatten(self, z: torch.Tensor) -> torch.Tensor:
        """(..., D) features -> (M, D) fp32 rows, on the unit sphere with cosine."""
        flat = channels_last_rows(z, self.embedding_dim)
        return F.normalize(flat, dim=1) if self.cosine else flat

    # ---- public API ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest-code indices only (no EMA update, no losses)."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self._search(self._flatten(z)).reshape(z.shape[:-1])

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors for indices of any shape: (B, N) -> (B, N, D)."""
        return self.embedding[indices]

    def forward(self, z: torch.Tensor, may_start: bool = True) -> QuantizerOutput:
        """may_start: whether an unfitted codebook may gather these tokens for its start on the first batches (a
        residual level waits until the level before it has started: its tokens are that level's residuals)."""
        # Distances, losses and EMA statistics in fp32, even inside a bf16 autocast region.
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = self._flatten(z)
            # A NaN/Inf feature on any rank would poison the codebook for good: then no rank updates it.
            update = self.training and all_ranks_true(torch.isfinite(flat.detach()).all())
            if update and not bool(self.initialized):  # no update until the codebook has started
                update = may_start and self._start_from_batches(flat.detach())
            indices = self._search(flat.detach())
            quantized = self.embedding[indices]  # looked up before this step's EMA update, as in Sonnet
            counts = torch.bincount(indices, minlength=self.num_embeddings).float()
            restarted = 0
            if update:
                self._ema_update(counts, indices, flat.detach())  # sums counts over ranks
                restarted = self._restart_dead_codes(flat.detach(), quantized, counts)

            commitment = F.mse_loss(flat, quantized.detach())
            # Straight-through estimator: forward value exactly e (z - sg(z) is exactly 0), gradient
            # d z_q / d z = identity.
            flat_q = quantized + (flat - flat.detach())
            training = {}
            if self.training:
                training = dict(restarted=torch.tensor(float(restarted), device=flat.device),
                                skipped_update=torch.tensor(float(not update), device=flat.device))
        return QuantizerOutput(flat_q.to(z.dtype).reshape(z.shape), indices.reshape(z.shape[:-1]), commitment,
                               self.commitment_cost * commitment, **code_use(counts), **training)

    # ---- EMA ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _ema_update(self, counts: torch.Tensor, indices: torch.Tensor, flat: torch.Tensor) -> None:
        """counts: this batch's assignments per code (summed over ranks in place); flat: its features."""
        self.ema_embed_sum.mul_(self.decay)
        if is_distributed():
            sums = torch.zeros_like(self.ema_embed_sum).index_add_(0, indices, flat)
            all_reduce_sum(counts, sums)
            self.ema_embed_sum.add_(sums, alpha=1.0 - self.decay)
        else:  # touch only the assigned rows: no K x D temporary
            self.ema_embed_sum.index_add_(0, indices, flat, alpha=1.0 - self.decay)
        self.ema_cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        n = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + self.epsilon) / (n + self.num_embeddings * self.epsilon) * n
        torch.div(self.ema_embed_sum, smoothed.unsqueeze(1), out=self.embedding)
        if self.cosine:
            self.embedding.copy_(F.normalize(self.embedding, dim=1))

    @torch.no_grad()
    def set_codebook(self, embedding: torch.Tensor, cluster_size: torch.Tensor) -> None:
        """Start the EMA from `embedding` with `cluster_size` hits per code (any unit: per step, or a fit's
        counts, which the EMA then forgets at its own pace). Sums follow, so e_k = m_k / N_k holds."""
        size = cluster_size.to(self.ema_cluster_size).clamp_min(self.epsilon)
        self.embedding.copy_(F.normalize(embedding, dim=1) if self.cosine else embedding)
        self.ema_cluster_size.copy_(size)
        self.ema_embed_sum.copy_(self.embedding * size.unsqueeze(1))
        self.tokens_since_hit.zero_()
        self.initialized.fill_(True)

    @torch.no_grad()
    def fit(self, samples: torch.Tensor, iters: int, tokens_per_update: float, seed: int = 0) -> list:
        """k-means of samples (M, D) on every rank together -> the codebook, cluster sizes in hits per update of
        `tokens_per_update` tokens (summed over ranks). Returns [KMeansResult]."""
        k, chunk = self.num_embeddings, self.max_distances_per_chunk
        result = fit_kmeans(self._flatten(samples), k, iters=iters, seed=seed, max_distances=chunk,
                            spherical=self.cosine)
        # The counts are over all ranks' samples: their shares of an update's tokens are the per-update hits.
        self.set_codebook(result.centroids, result.counts * (tokens_per_update / result.counts.sum().item()))
        return [result]

    @torch.no_grad()
    def _start_from_batches(self, flat: torch.Tensor) -> bool:
        """Without a fit, the first training batches start the codebook, pooled over ranks, so that every code starts
        on the data (codes far from it would never win a token): k-means of START_TOKENS_PER_CODE tokens per code,
        gathered over as many batches as that takes (one batch of ~2 tokens per code overfits it, and fewer tokens
        than codes would repeat codes), cluster sizes in per-batch hits. Returns whether it has started."""
        self._gathered.append(flat)
        gathered = torch.tensor([float(sum(rows.shape[0] for rows in self._gathered))], device=flat.device)
        all_reduce_sum(gathered)
        needed = START_TOKENS_PER_CODE * self.num_embeddings
        if gathered.item() < needed:
            if len(self._gathered) == 1:
                warnings.warn(f"VectorQuantizer: the codebook has not started; gathering {needed} tokens of the first "
                              f"training batches for its k-means ({int(gathered.item())} so far) and leaving it "
                              f"unchanged until then. Fit it beforehand to skip this (stage1.train.codebook_fit."
                              f"fit_codebook, vqrae-fit-codebook; training does it before step 0)", stacklevel=2)
            return False
        samples, batches = torch.cat(self._gathered), len(self._gathered)
        self._gathered = []
        self.fit(samples, LLOYD_ITERS, tokens_per_update=gathered.item() / batches)  # hits per batch
        return True

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor, quantized: torch.Tensor, counts: torch.Tensor) -> int:
        """Codes that no token chose in the last restart_window * num_embeddings tokens (a window in tokens, so
        it means the same at any batch size: a code of average share expects restart_window hits in it) restart
        on the tokens farthest from their codes, over every rank's batch, where a code cuts the distortion most;
        their EMA statistics are reset to match (else the stale sums would pull them straight back).

        counts: this step's hits per code, summed over ranks, so the dead set is the same on every rank.
        """
        self.tokens_since_hit.add_(counts.sum().long()).masked_fill_(counts > 0, 0)
        if self.restart_window == 0:
            return 0
        dead = self.tokens_since_hit >= self.restart_window * self.num_embeddings
        num_dead = int(dead.sum())
        if num_dead:
            samples = farthest_tokens(flat, (flat - quantized).pow(2).sum(1), num_dead)
            size = (counts.sum() / self.num_embeddings).clamp_min(self.epsilon)  # an average code's hits per step
            self.embedding[dead] = samples
            self.ema_embed_sum[dead] = samples * size
            self.ema_cluster_size[dead] = size
            self.tokens_since_hit[dead] = 0
        return num_dead

    def extra_repr(self) -> str:
        return (
            f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
            f"commitment_cost={self.commitment_cost}, decay={self.decay}, epsilon={self.epsilon}, "
            f"restart_window={self.restart_window}"
        )


__all__ = ["VectorQuantizer", "farthest_tokens"]
