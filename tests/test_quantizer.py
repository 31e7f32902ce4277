import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stage1 import QuantizerConfig, VectorQuantizer, nearest_code


def single(k: int, d: int, **options) -> VectorQuantizer:
    """The single codebook of K codes of width d, with the config's other fields as keywords."""
    return VectorQuantizer(QuantizerConfig(num_embeddings=k, **options), d)


def brute_force(z, codebook):
    return torch.cdist(z.double(), codebook.double()).argmin(dim=1)


def clustered(n_per, centers, noise=0.01, seed=0):
    g = torch.Generator().manual_seed(seed)
    points = centers.repeat_interleave(n_per, 0)
    return points + noise * torch.randn(points.shape, generator=g)


def test_indices_equal_brute_force_and_chunks_equal_dense():
    g = torch.Generator().manual_seed(0)
    z, codebook = torch.randn(1000, 16, generator=g), torch.randn(300, 16, generator=g)
    expected = brute_force(z, codebook)
    dense = nearest_code(z, codebook, max_distances=10**9)
    chunked = nearest_code(z, codebook, max_distances=300 * 7)  # 7 rows a chunk, last one ragged
    tiny = nearest_code(z, codebook, max_distances=1)  # one row a chunk
    assert torch.equal(dense, expected)
    assert torch.equal(chunked, expected) and torch.equal(tiny, expected)


def test_forward_values_and_index_shapes():
    vq = single(32, 8).eval()
    z = torch.randn(2, 15, 8)  # (B, N, D) tokens
    out = vq(z)
    z_q, idx = out.z_q, out.indices
    assert idx.shape == (2, 15) and idx.dtype == torch.long
    flat = z.reshape(-1, 8)
    assert torch.equal(idx.flatten(), brute_force(flat, vq.codebook))
    # The forward value is exactly the code vector.
    assert torch.equal(z_q, vq.codebook[idx])
    # Any channels-last layout gives the same codes: (B, h, w, D) grids and flat (M, D) rows.
    out = vq(z.reshape(2, 3, 5, 8))
    zg_q, idx_g = out.z_q, out.indices
    assert idx_g.shape == (2, 3, 5) and torch.equal(idx_g.flatten(1), idx)
    assert torch.equal(zg_q.reshape(2, 15, 8), z_q)
    assert torch.equal(vq(flat).indices, idx.flatten())
    assert out.commitment.item() == pytest.approx(((flat - vq.codebook[idx.flatten()]) ** 2).mean().item())
    assert out.loss.item() == pytest.approx(0.25 * out.commitment.item())


def test_straight_through_gradient_reaches_z_unchanged():
    vq = single(16, 4, commitment_cost=0.0).eval()
    z = torch.randn(3, 4, 4, requires_grad=True)
    out = vq(z)
    z_q = out.z_q
    upstream = torch.randn_like(z_q)
    (z_q * upstream).sum().backward()
    assert torch.equal(z.grad, upstream)
    # With a commitment cost the extra gradient is exactly beta * d/dz mean((z - e)^2).
    vq.commitment_cost = 0.5
    z.grad = None
    out = vq(z)
    z_q, idx = out.z_q, out.indices
    ((z_q * upstream).sum() + out.loss).backward()
    e = vq.codebook[idx]
    expected = upstream + 0.5 * 2 * (z.detach() - e) / z.numel()
    assert torch.allclose(z.grad, expected, atol=1e-6)


def test_one_ema_step_matches_the_formula():
    k, d, decay, eps = 6, 3, 0.9, 1e-3
    vq = single(k, d, decay=decay, epsilon=eps).train()
    vq.initialized.fill_(True)  # the state below is the one to update
    g = torch.Generator().manual_seed(1)
    size0 = torch.rand(k, generator=g) + 0.5
    sum0 = torch.randn(k, d, generator=g)
    vq.ema_cluster_size.copy_(size0)
    vq.ema_embed_sum.copy_(sum0)
    vq.embedding.copy_(sum0 / size0.unsqueeze(1))
    codebook0 = vq.embedding.clone()
    z = torch.randn(20, d, generator=g)
    out = vq(z.unsqueeze(0))
    idx = out.indices

    assign = brute_force(z, codebook0)  # assignment uses the codebook from before the step
    assert torch.equal(idx.flatten(), assign)
    counts = torch.stack([(assign == j).sum() for j in range(k)]).float()
    sums = torch.stack([z[assign == j].sum(0) for j in range(k)])
    size1 = decay * size0 + (1 - decay) * counts
    sum1 = decay * sum0 + (1 - decay) * sums
    n = size1.sum()
    smoothed = (size1 + eps) / (n + k * eps) * n
    assert torch.allclose(vq.ema_cluster_size, size1, atol=1e-6)
    assert torch.allclose(vq.ema_embed_sum, sum1, atol=1e-6)
    assert torch.allclose(vq.embedding, sum1 / smoothed.unsqueeze(1), atol=1e-6)


def test_eval_and_encode_never_update_the_codebook():
    vq = single(8, 4)
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    z = torch.randn(2, 36, 4)  # 72 tokens: enough (8 a code) for a training forward to start the codebook
    vq.eval()(z)
    vq.train().encode(z)
    for key, value in vq.state_dict().items():
        assert torch.equal(value, before[key]), key
    vq.train()(z)
    assert not torch.equal(vq.embedding, before["embedding"])


def trained_on(vq, codebook):
    """`vq` with this codebook as if it had trained (no first-batch initialisation)."""
    vq.set_codebook(codebook, torch.ones(codebook.shape[0]))
    return vq


def test_a_code_unused_for_its_window_of_tokens_restarts_on_a_far_token():
    """restart_window counts tokens: with K=8 and restart_window 18.75 a code is dead after 150 tokens without a hit,
    three steps of 50 here (six of 25 would be the same window). It restarts where a code cuts the distortion most:
    drawn by squared distance to the tokens' codes, the one far-off token of the batch."""
    torch.manual_seed(0)
    codebook = torch.randn(8, 4)
    vq = trained_on(single(8, 4, restart_window=18.75, decay=0.9).train(), codebook)
    vq.embedding[3] = 1000.0  # far from all data: no token ever picks code 3
    vq.ema_embed_sum[3] = 1000.0 * vq.ema_cluster_size[3]

    def near_codes(n):  # tokens right on the live codes
        live = torch.tensor([0, 1, 2, 4, 5, 6, 7])
        return vq.embedding[live[torch.randint(7, (n,))]] + 0.01 * torch.randn(n, 4)

    for step in range(1, 3):
        out = vq(near_codes(50).unsqueeze(0))
        assert out.restarted.item() == 0 and vq.tokens_since_hit[3] == 50 * step  # not before 150
    far = torch.tensor([[9.0, -9.0, 9.0, -9.0]])
    z = torch.cat([near_codes(49), far]).unsqueeze(0)
    out = vq(z)
    idx = out.indices
    assert out.restarted.item() == 1
    assert torch.equal(vq.embedding[3], far[0])  # the far token, not one of the 49 others
    # Its EMA state was reset to match, so the next update cannot drag it back to where it was.
    size = idx.numel() / 8
    assert vq.ema_cluster_size[3].item() == pytest.approx(size)
    assert torch.allclose(vq.ema_embed_sum[3], far[0] * size)
    assert vq.tokens_since_hit[3] == 0
    vq(torch.cat([near_codes(49), far + 0.01]).unsqueeze(0))
    assert (vq.embedding[3] - far[0]).norm() < 0.1 and vq.tokens_since_hit[3] == 0  # it now wins its token


def test_restarts_leave_codes_that_are_merely_rare_alone():
    """A fitted code with a small share of the data is no dead code: over a window of 64 tokens per code, a code
    of a tenth of the average share still expects 6.4 hits, and restarts never touch a code that is hit."""
    torch.manual_seed(0)
    centers = torch.randn(16, 8) * 5
    share = torch.ones(16)
    share[:4] = 0.1  # four rare clusters
    vq = trained_on(single(16, 8, decay=0.99).train(), centers)
    restarted = 0
    for _ in range(100):
        which = torch.multinomial(share, 256, replacement=True)
        restarted += int(vq((centers[which] + 0.1 * torch.randn(256, 8)).unsqueeze(0)).restarted)
    assert restarted == 0 and torch.cdist(centers, vq.codebook).min(dim=1).values.max() < 0.2


def test_codes_start_on_the_first_batch_so_none_is_left_behind():
    """Codes drawn at random far from the data never win a token (collapse); codes drawn from the first
    batch's features all start on it."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(64, 16, generator=g) * 2 + 6  # 64 clusters, offset from the origin
    def batch():
        return clustered(8, centers, noise=0.3, seed=int(torch.randint(1000, (1,)))).unsqueeze(0)
    torch.manual_seed(0)
    # No restarts, which would revive the left-behind codes: the start alone is measured.
    default, placeholder = (single(64, 16, restart_window=0).train() for _ in range(2))
    placeholder.initialized.fill_(True)  # keep the random placeholders, as an uninitialised codebook would
    for _ in range(20):
        default(batch())
        placeholder(batch())
    held_out = clustered(20, centers, noise=0.3, seed=999)
    usage = {name: vq.encode(held_out).unique().numel() / 64 for name, vq in
             [("default", default), ("placeholder", placeholder)]}
    assert usage["placeholder"] < 0.2 and usage["default"] >= 0.9, usage


def test_the_first_batch_start_finds_the_clusters_or_gathers_enough_tokens_first():
    torch.manual_seed(0)
    centers = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [-5.0, -5.0, -5.0]])
    z = clustered(50, centers)
    # 200 tokens for 256 codes cannot start them (drawn codes would repeat): the first batches are gathered until
    # they hold 8 tokens per code, with a warning, and the codebook stays as it is until then.
    gathering = single(256, 3).train()
    placeholders = gathering.embedding.clone()
    with pytest.warns(UserWarning, match="the codebook has not started; gathering 2048 tokens"):
        out = gathering(z.unsqueeze(0))
    assert not bool(gathering.initialized) and out.skipped_update.item() == 1.0
    assert torch.equal(gathering.embedding, placeholders)
    for seed in range(1, 11):
        gathering(clustered(50, centers, seed=seed).unsqueeze(0))
    assert bool(gathering.initialized) and not torch.equal(gathering.embedding, placeholders)
    vq = single(4, 3).train()
    assert not bool(vq.initialized)
    out = vq(z.unsqueeze(0))
    assert bool(vq.initialized)
    # One code per cluster, each at its cluster's mean (up to the EMA step after init).
    distance = torch.cdist(centers, vq.codebook).min(dim=1).values
    assert (distance < 0.1).all()
    assert out.usage.item() == 1.0
    assert out.perplexity.item() == pytest.approx(4.0, rel=1e-4)


def test_usage_metrics():
    vq = single(8, 2).eval()
    out = vq(vq.codebook.clone().unsqueeze(0))  # every code used once
    assert out.perplexity.item() == pytest.approx(8.0, rel=1e-5)
    assert out.usage.item() == 1.0
    out = vq(vq.codebook[2].repeat(5, 1).unsqueeze(0))  # one code only
    assert out.perplexity.item() == pytest.approx(1.0, rel=1e-5)
    assert out.usage.item() == pytest.approx(1 / 8)


def test_bf16_autocast_gives_the_fp32_indices_and_keeps_fp32_buffers():
    torch.manual_seed(0)
    centers = torch.randn(16, 8) * 4
    vq = trained_on(single(16, 8).train(), centers)
    z = clustered(4, centers, noise=0.05).reshape(1, 64, 8)
    reference = vq.encode(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(z)
        z_q, idx = out.z_q, out.indices
        out = vq(z.to(torch.bfloat16))
        idx_bf16_input = out.indices
    assert torch.equal(idx, reference) and torch.equal(idx_bf16_input, reference)
    assert out.commitment.dtype == torch.float32
    vq.to(torch.bfloat16)
    assert all(getattr(vq, name).dtype == torch.float32 for name in ("embedding", "ema_cluster_size", "ema_embed_sum"))
    out = vq(z.to(torch.bfloat16))
    z_q = out.z_q
    assert z_q.dtype == torch.bfloat16 and torch.isfinite(vq.codebook).all()


def test_bad_feature_shapes_and_arguments():
    vq = single(8, 4)
    # A channels-first grid (B, D, h, w) is not taken for tokens.
    with pytest.raises(ValueError, match=r"expected channels-last features \(\.\.\., 4\).*got shape \(1, 4, 2, 5\)"):
        vq(torch.randn(1, 4, 2, 5))
    with pytest.raises(ValueError, match="got shape"):
        vq(torch.randn(4))
    with pytest.raises(ValueError, match="decay must be in"):
        single(8, 4, decay=1.5)
    with pytest.raises(ValueError, match="embedding_dim must be a positive integer, got 0"):
        single(8, 0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'decya'"):
        single(8, 4, decya=0.9)


# ---- two processes (gloo): statistics are all-reduced, codebooks stay identical ----------------------------
MODES = {  # quantizer options, and whether the test starts from a trained codebook
    "ema": (dict(), True),
    "restarts": (dict(restart_window=4.0), True),  # dead after 64 tokens: one step of both ranks' 32
    "batch_init": (dict(restart_window=4.0), False),
}


def _train_rank(rank, world, init_file, out_dir, data, mode):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(100 + rank)  # different random draws per rank: the gathered pools must fix that
    vq = single(16, 4, decay=0.8, **MODES[mode][0]).train()
    state = torch.load(os.path.join(out_dir, "init.pt"), weights_only=True)
    vq.load_state_dict(state)
    restarted = 0
    for step_data in data:
        shard = step_data.chunk(world)[rank]
        restarted += int(vq(shard.unsqueeze(0)).restarted)
    torch.save({**vq.state_dict(), "restarted": torch.tensor(restarted)}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow  # spawns processes (torchrun / mp.spawn / a killed writer)
@pytest.mark.parametrize("mode", sorted(MODES))
def test_two_ranks_keep_identical_codebooks_equal_to_one_process(tmp_path, mode):
    torch.manual_seed(0)
    data = [torch.randn(64, 4) + 3 * i for i in range(4)]  # the data drifts, so some codes die
    options, trained = MODES[mode]
    reference = single(16, 4, decay=0.8, **options).train()
    if trained:
        trained_on(reference, torch.randn(16, 4))
    torch.save(reference.state_dict(), tmp_path / "init.pt")
    mp.spawn(_train_rank, args=(2, str(tmp_path / "init"), str(tmp_path), data, mode), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert bool(rank0["initialized"])
    if "restart_window" in options:
        assert rank0["restarted"] > 0  # the rule fired, on both ranks alike
    if mode == "ema":
        # Summed statistics over two halves == statistics of the whole batch in one process.
        for step_data in data:
            reference(step_data.unsqueeze(0))
        assert torch.allclose(rank0["embedding"], reference.embedding, atol=1e-5)
        assert torch.allclose(rank0["ema_cluster_size"], reference.ema_cluster_size, atol=1e-5)


def test_search_never_holds_more_than_the_distance_budget(monkeypatch):
    """The N x K distance matrix is only ever built in blocks of at most `max_distances` entries."""
    blocks = []
    real_addmm = torch.addmm

    def spy(*args, **kwargs):
        out = real_addmm(*args, **kwargs)
        blocks.append(out.numel())
        return out

    monkeypatch.setattr(torch, "addmm", spy)
    z, codebook = torch.randn(4096, 8), torch.randn(512, 8)
    budget = 512 * 100
    indices = nearest_code(z, codebook, max_distances=budget)
    assert blocks and max(blocks) <= budget and sum(blocks) == 4096 * 512
    monkeypatch.setattr(torch, "addmm", real_addmm)
    assert torch.equal(indices, brute_force(z, codebook))


def test_cached_code_norms_follow_every_codebook_change():
    vq = single(32, 4).eval()
    z = torch.randn(256, 4)
    assert torch.equal(vq.encode(z.unsqueeze(0))[0], brute_force(z, vq.codebook))
    before = vq.codebook.clone()
    vq.train()(z.unsqueeze(0))  # the start and EMA update write the codebook in place
    assert not torch.equal(vq.codebook, before)
    vq.eval()
    assert torch.equal(vq.encode(z.unsqueeze(0))[0], brute_force(z, vq.codebook))
    vq.embedding[5] = z[0] + 1e-4  # a direct write
    assert vq.encode(z[:1].unsqueeze(0)).item() == 5
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    state["embedding"] = torch.randn(32, 4)
    vq.load_state_dict(state)
    assert torch.equal(vq.encode(z.unsqueeze(0))[0], brute_force(z, vq.codebook))


def test_non_finite_features_never_reach_the_codebook():
    vq = single(8, 4, restart_window=1.0).train()
    z = torch.randn(1, 64, 4)
    z[0, 3, 1] = float("nan")
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    out = vq(z)
    assert out.skipped_update.item() == 1.0
    for key, value in vq.state_dict().items():
        assert torch.equal(value, before[key]), key  # not even k-means initialisation ran
    z[0, 3, 1] = float("inf")
    vq(z)
    assert torch.isfinite(vq.codebook).all() and not bool(vq.initialized)
    out = vq(torch.randn(1, 64, 4))
    assert out.skipped_update.item() == 0.0 and bool(vq.initialized)
